//! Reconnect backoff: a pure, seeded policy that says how long to wait before the next try.
//!
//! The policy holds only counters and its configuration. It never sleeps and never reads a
//! clock; randomness for jitter comes from the caller's RNG, so a seeded RNG replays the same
//! schedule. The pool calls [`Backoff::next_delay`] after each failed attempt and
//! [`Backoff::reset`] only after protocol-level success (handshake *and* resubscription), never
//! when TCP merely connects: a server that accepts sockets but fails the handshake must still
//! back off.

use std::time::Duration;

use rand_core::RngCore;

/// How the computed delay is randomised so that many clients do not retry in lockstep.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Jitter {
    /// Use the computed delay as is (tests, or a single client).
    None,
    /// Multiply the computed delay by a factor drawn uniformly from `[min_fraction, 1.0]`.
    /// The jittered delay therefore never exceeds the cap.
    Multiplicative {
        /// Lower bound of the factor, within `0.0..=1.0`.
        min_fraction: f64,
    },
}

/// Every knob of the policy. Start from [`BackoffConfig::default`] and change fields.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct BackoffConfig {
    /// Delay before the first retry (before jitter). Must be non-zero.
    pub base: Duration,
    /// Growth per attempt; finite and at least 1.0.
    pub factor: f64,
    /// Largest delay ever returned, hint-free and before jitter. Must be at least `base`.
    pub cap: Duration,
    /// Randomisation applied to each delay.
    pub jitter: Jitter,
    /// Delays handed out before the policy gives up ("lost"); `None` retries forever.
    pub max_attempts: Option<u32>,
    /// Upper bound on a server's retry-after hint, so a hostile or buggy server cannot park
    /// the connection for days.
    pub max_hint: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(500),
            factor: 2.0,
            cap: Duration::from_secs(30),
            jitter: Jitter::Multiplicative { min_fraction: 0.5 },
            max_attempts: Some(12),
            max_hint: Duration::from_secs(600),
        }
    }
}

impl BackoffConfig {
    /// Checks the invariants the policy relies on.
    pub fn validate(&self) -> Result<(), BackoffConfigError> {
        if self.base.is_zero() {
            return Err(BackoffConfigError::ZeroBase);
        }
        if self.cap < self.base {
            return Err(BackoffConfigError::CapBelowBase {
                base: self.base,
                cap: self.cap,
            });
        }
        if !self.factor.is_finite() || self.factor < 1.0 {
            return Err(BackoffConfigError::InvalidFactor(self.factor));
        }
        if let Jitter::Multiplicative { min_fraction } = self.jitter
            // NaN fails `contains` too.
            && !(0.0..=1.0).contains(&min_fraction)
        {
            return Err(BackoffConfigError::InvalidJitter(min_fraction));
        }
        if self.max_attempts == Some(0) {
            return Err(BackoffConfigError::ZeroAttempts);
        }
        Ok(())
    }
}

/// Why a [`BackoffConfig`] was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum BackoffConfigError {
    /// A zero base delay never grows: the client would retry in a tight loop.
    #[error("backoff base delay must be non-zero")]
    ZeroBase,
    /// The cap is smaller than the first delay.
    #[error("backoff cap {cap:?} is below the base delay {base:?}")]
    CapBelowBase {
        /// The configured base.
        base: Duration,
        /// The configured cap.
        cap: Duration,
    },
    /// The growth factor is below 1.0, NaN or infinite.
    #[error("backoff factor {0} must be finite and at least 1.0")]
    InvalidFactor(f64),
    /// The jitter fraction is outside `0.0..=1.0` or NaN.
    #[error("backoff jitter min_fraction {0} must be within 0.0..=1.0")]
    InvalidJitter(f64),
    /// `max_attempts = Some(0)` would give up before the first retry; use `None` for
    /// "forever".
    #[error("backoff max_attempts must be at least 1")]
    ZeroAttempts,
}

/// The reconnect policy for one server. See the module docs for when to call what.
#[derive(Debug, Clone)]
pub struct Backoff {
    config: BackoffConfig,
    /// Delays handed out since the last reset or wake.
    attempt: u32,
    /// The un-jittered delay for the next attempt. Grown incrementally (rather than as
    /// `base * factor^attempt`) so the sequence is monotone by construction and cannot
    /// overflow however many attempts there are.
    current: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::from_valid(BackoffConfig::default())
    }
}

impl Backoff {
    /// A fresh policy, or the reason the configuration is unusable.
    pub fn new(config: BackoffConfig) -> Result<Self, BackoffConfigError> {
        config.validate()?;
        Ok(Self::from_valid(config))
    }

    fn from_valid(config: BackoffConfig) -> Self {
        Self {
            current: config.base,
            attempt: 0,
            config,
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &BackoffConfig {
        &self.config
    }

    /// Delays handed out since the last [`reset`](Self::reset) or [`wake`](Self::wake).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// True once `max_attempts` delays have been handed out: the server is "lost" and
    /// [`next_delay`](Self::next_delay) returns `None` until a reset or wake.
    pub fn is_exhausted(&self) -> bool {
        self.config
            .max_attempts
            .is_some_and(|max| self.attempt >= max)
    }

    /// Attempts left before the policy gives up; `None` when it never does.
    pub fn remaining(&self) -> Option<u32> {
        self.config
            .max_attempts
            .map(|max| max.saturating_sub(self.attempt))
    }

    /// The delay before the next attempt, or `None` when the policy has given up.
    ///
    /// Each call counts as one attempt.
    pub fn next_delay(&mut self, rng: &mut impl RngCore) -> Option<Duration> {
        if self.is_exhausted() {
            return None;
        }
        let computed = self.current;
        self.attempt = self.attempt.saturating_add(1);
        self.current = grow(self.current, self.config.factor, self.config.cap);
        Some(self.jittered(computed, rng))
    }

    /// Like [`next_delay`](Self::next_delay), but waits at least as long as the server asked
    /// (bounded by `max_hint`). A hint never revives an exhausted policy.
    pub fn next_delay_with_hint(
        &mut self,
        rng: &mut impl RngCore,
        retry_after: Duration,
    ) -> Option<Duration> {
        let own = self.next_delay(rng)?;
        Some(own.max(retry_after.min(self.config.max_hint)))
    }

    /// Back to the first delay. Call only after protocol-level success (handshake and
    /// resubscription confirmed).
    pub fn reset(&mut self) {
        self.attempt = 0;
        self.current = self.config.base;
    }

    /// An outside event says a retry may now succeed (network change, `muxctl reconnect`).
    ///
    /// Revives an exhausted policy and restarts the schedule from the base delay. It does not
    /// produce a delay itself: the caller connects right away, and if that fails the next
    /// [`next_delay`](Self::next_delay) starts from `base`. Unlike [`reset`](Self::reset) it
    /// says nothing about success; the two are kept apart so callers state which happened.
    pub fn wake(&mut self) {
        self.attempt = 0;
        self.current = self.config.base;
    }

    fn jittered(&self, delay: Duration, rng: &mut impl RngCore) -> Duration {
        match self.config.jitter {
            Jitter::None => delay,
            Jitter::Multiplicative { min_fraction } => {
                let fraction = min_fraction + (1.0 - min_fraction) * unit_f64(rng);
                scale(delay, fraction).min(delay)
            }
        }
    }
}

/// `delay * factor`, saturating at `cap`, and never below `delay`.
fn grow(delay: Duration, factor: f64, cap: Duration) -> Duration {
    scale(delay, factor).max(delay).min(cap)
}

/// `delay * k` for a finite `k >= 0`, saturating at `Duration::MAX` instead of panicking
/// (`Duration::mul_f64` panics on overflow).
fn scale(delay: Duration, k: f64) -> Duration {
    Duration::try_from_secs_f64(delay.as_secs_f64() * k).unwrap_or(Duration::MAX)
}

/// A uniform draw from `[0.0, 1.0]` using the top 53 bits, the precision of an `f64`.
fn unit_f64(rng: &mut impl RngCore) -> f64 {
    // 53 mantissa bits; dividing by 2^53 - 1 makes 1.0 reachable, matching the closed
    // interval the docs promise.
    const MAX53: u64 = (1 << 53) - 1;
    (rng.next_u64() >> 11) as f64 / MAX53 as f64
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand_chacha::ChaCha8Rng;
    use rand_core::SeedableRng;

    use super::*;

    fn no_jitter() -> BackoffConfig {
        BackoffConfig {
            jitter: Jitter::None,
            ..BackoffConfig::default()
        }
    }

    fn drain(b: &mut Backoff, rng: &mut ChaCha8Rng) -> Vec<Duration> {
        std::iter::from_fn(|| b.next_delay(rng))
            .take(10_000)
            .collect()
    }

    #[test]
    fn default_schedule_without_jitter() {
        let mut b = Backoff::new(no_jitter()).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let got = drain(&mut b, &mut rng);
        let ms: Vec<u128> = got.iter().map(Duration::as_millis).collect();
        // 0.5 s doubling, capped at 30 s from the 8th attempt (0.5 * 2^6 = 32 > 30).
        assert_eq!(
            ms,
            [
                500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000, 30000, 30000
            ]
        );
        assert!(b.is_exhausted());
        assert_eq!(b.attempt(), 12);
        assert_eq!(b.remaining(), Some(0));
        assert_eq!(b.next_delay(&mut rng), None);
        assert_eq!(b.attempt(), 12, "a refused call is not an attempt");
    }

    #[test]
    fn same_seed_same_sequence_different_seed_differs() {
        let run = |seed| {
            let mut b = Backoff::default();
            drain(&mut b, &mut ChaCha8Rng::seed_from_u64(seed))
        };
        assert_eq!(run(7), run(7));
        assert_eq!(run(7).len(), 12);
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn default_jitter_stays_within_half_and_full() {
        let mut b = Backoff::default();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let plain = drain(&mut Backoff::new(no_jitter()).unwrap(), &mut rng);
        let jittered = drain(&mut b, &mut rng);
        assert_eq!(plain.len(), jittered.len());
        for (p, j) in plain.iter().zip(&jittered) {
            assert!(*j <= *p && *j >= *p / 2, "{j:?} vs {p:?}");
        }
    }

    #[test]
    fn reset_and_wake_revive_an_exhausted_policy() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut b = Backoff::new(no_jitter()).unwrap();
        drain(&mut b, &mut rng);
        assert!(b.is_exhausted());
        b.wake();
        assert!(!b.is_exhausted());
        assert_eq!(b.next_delay(&mut rng), Some(Duration::from_millis(500)));
        assert_eq!(b.next_delay(&mut rng), Some(Duration::from_secs(1)));
        b.reset();
        assert_eq!(b.attempt(), 0);
        assert_eq!(b.next_delay(&mut rng), Some(Duration::from_millis(500)));
    }

    #[test]
    fn hint_raises_but_is_bounded_and_counts_as_attempt() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut b = Backoff::new(no_jitter()).unwrap();
        assert_eq!(
            b.next_delay_with_hint(&mut rng, Duration::from_secs(5)),
            Some(Duration::from_secs(5))
        );
        // A hint shorter than our own delay does not shorten it.
        assert_eq!(
            b.next_delay_with_hint(&mut rng, Duration::from_millis(1)),
            Some(Duration::from_secs(1))
        );
        // An absurd hint is clamped to max_hint (600 s by default).
        assert_eq!(
            b.next_delay_with_hint(&mut rng, Duration::from_secs(86_400 * 365)),
            Some(Duration::from_secs(600))
        );
        assert_eq!(b.attempt(), 3);
        for _ in 3..12 {
            b.next_delay(&mut rng);
        }
        assert_eq!(
            b.next_delay_with_hint(&mut rng, Duration::from_secs(1)),
            None
        );
    }

    #[test]
    fn validation_rejects_each_bad_field() {
        let bad = [
            (
                BackoffConfig {
                    base: Duration::ZERO,
                    ..BackoffConfig::default()
                },
                BackoffConfigError::ZeroBase,
            ),
            (
                BackoffConfig {
                    cap: Duration::from_millis(499),
                    ..BackoffConfig::default()
                },
                BackoffConfigError::CapBelowBase {
                    base: Duration::from_millis(500),
                    cap: Duration::from_millis(499),
                },
            ),
            (
                BackoffConfig {
                    factor: 0.9,
                    ..BackoffConfig::default()
                },
                BackoffConfigError::InvalidFactor(0.9),
            ),
            (
                BackoffConfig {
                    factor: f64::INFINITY,
                    ..BackoffConfig::default()
                },
                BackoffConfigError::InvalidFactor(f64::INFINITY),
            ),
            (
                BackoffConfig {
                    jitter: Jitter::Multiplicative { min_fraction: 1.5 },
                    ..BackoffConfig::default()
                },
                BackoffConfigError::InvalidJitter(1.5),
            ),
            (
                BackoffConfig {
                    max_attempts: Some(0),
                    ..BackoffConfig::default()
                },
                BackoffConfigError::ZeroAttempts,
            ),
        ];
        for (config, want) in bad {
            assert_eq!(Backoff::new(config).unwrap_err(), want);
        }
        let nan = BackoffConfig {
            jitter: Jitter::Multiplicative {
                min_fraction: f64::NAN,
            },
            ..BackoffConfig::default()
        };
        assert!(matches!(
            nan.validate(),
            Err(BackoffConfigError::InvalidJitter(_))
        ));
        assert!(BackoffConfig::default().validate().is_ok());
    }

    #[test]
    fn unlimited_policy_saturates_without_overflow() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut b = Backoff::new(BackoffConfig {
            factor: 1e300,
            cap: Duration::MAX,
            max_attempts: None,
            jitter: Jitter::None,
            ..BackoffConfig::default()
        })
        .unwrap();
        assert_eq!(b.next_delay(&mut rng), Some(Duration::from_millis(500)));
        assert_eq!(b.next_delay(&mut rng), Some(Duration::MAX));
        // Jump the counter to the edge: it saturates instead of wrapping.
        b.attempt = u32::MAX - 1;
        assert_eq!(b.next_delay(&mut rng), Some(Duration::MAX));
        assert_eq!(b.next_delay(&mut rng), Some(Duration::MAX));
        assert_eq!(b.attempt(), u32::MAX);
        assert!(!b.is_exhausted());
        assert_eq!(b.remaining(), None);
    }

    fn any_config() -> impl Strategy<Value = BackoffConfig> {
        let jitter = prop_oneof![
            Just(Jitter::None),
            (0.0f64..=1.0).prop_map(|min_fraction| Jitter::Multiplicative { min_fraction }),
        ];
        (
            1u64..=u64::MAX / 2,
            prop_oneof![1.0f64..4.0, 1.0f64..1e308],
            any::<u64>(),
            jitter,
            prop_oneof![Just(None), (1u32..200).prop_map(Some)],
            any::<u64>(),
        )
            .prop_map(|(base_ns, factor, extra_ns, jitter, max_attempts, hint)| {
                let base = Duration::from_nanos(base_ns);
                BackoffConfig {
                    base,
                    factor,
                    cap: base.saturating_add(Duration::from_nanos(extra_ns)),
                    jitter,
                    max_attempts,
                    max_hint: Duration::from_nanos(hint),
                }
            })
    }

    proptest! {
        #[test]
        fn never_above_cap_and_jitter_within_bounds(config in any_config(), seed: u64) {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut plain = Backoff::new(BackoffConfig { jitter: Jitter::None, ..config.clone() })
                .unwrap();
            let mut jittered = Backoff::new(config.clone()).unwrap();
            for _ in 0..300 {
                let (Some(p), Some(j)) = (plain.next_delay(&mut rng), jittered.next_delay(&mut rng))
                else {
                    prop_assert_eq!(plain.is_exhausted(), jittered.is_exhausted());
                    break;
                };
                prop_assert!(p <= config.cap && p >= config.base);
                prop_assert!(j <= p);
                if let Jitter::Multiplicative { min_fraction } = config.jitter {
                    // Allow float rounding of a few ns per second of delay.
                    let floor = p.as_secs_f64() * min_fraction;
                    prop_assert!(j.as_secs_f64() >= floor * (1.0 - 1e-12) - 1e-9,
                        "{:?} below {} of {:?}", j, min_fraction, p);
                }
            }
        }

        #[test]
        fn exactly_max_attempts_delays_then_none(config in any_config(), seed: u64) {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut b = Backoff::new(config.clone()).unwrap();
            let n = drain(&mut b, &mut rng).len();
            match config.max_attempts {
                Some(max) => {
                    prop_assert_eq!(n, max as usize);
                    prop_assert!(b.is_exhausted());
                    prop_assert_eq!(b.next_delay_with_hint(&mut rng, Duration::MAX), None);
                }
                None => prop_assert_eq!(n, 10_000),
            }
        }

        #[test]
        fn unjittered_sequence_is_monotone_and_reset_restores_base(
            config in any_config(), seed: u64, steps in 0usize..100,
        ) {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut b = Backoff::new(BackoffConfig { jitter: Jitter::None, ..config.clone() })
                .unwrap();
            let seq: Vec<_> = std::iter::from_fn(|| b.next_delay(&mut rng)).take(steps).collect();
            prop_assert!(seq.windows(2).all(|w| w[0] <= w[1]), "{:?}", seq);
            b.reset();
            prop_assert_eq!(b.attempt(), 0);
            prop_assert_eq!(b.next_delay(&mut rng), Some(config.base));
        }

        #[test]
        fn any_config_is_rejected_or_never_panics(
            base_ns: u64, cap_ns: u64, factor: f64, min_fraction: f64,
            max_attempts: Option<u32>, hint: u64, seed: u64,
        ) {
            let config = BackoffConfig {
                base: Duration::from_nanos(base_ns),
                factor,
                cap: Duration::from_nanos(cap_ns),
                jitter: Jitter::Multiplicative { min_fraction },
                max_attempts,
                max_hint: Duration::from_nanos(hint),
            };
            if let Ok(mut b) = Backoff::new(config) {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                for i in 0..200u64 {
                    let _ = b.next_delay_with_hint(&mut rng, Duration::from_nanos(i.saturating_mul(hint)));
                }
            }
        }
    }
}
