//! Cover traffic (§12): rate negotiation and the Poisson tick scheduler.
//!
//! Each side of each link runs its own [`CoverScheduler`]. At every tick of a Poisson process
//! of the negotiated rate it sends one record: real data if any is queued, otherwise cover
//! (unless a credit earned by an early send cancels the tick). Data that waited `max_delay`
//! goes out at once and earns a credit, which keeps the long-run rate at `r`.

use std::time::{Duration, Instant};

use rand_core::RngCore;

use crate::Role;

/// `COVER_MIN`, milli-records/s.
pub const COVER_MIN: u16 = 50;

/// `COVER_MAX`, milli-records/s.
pub const COVER_MAX: u16 = 2000;

/// `COVER_DEFAULT` for client links, milli-records/s.
pub const COVER_DEFAULT_CLIENT: u16 = 200;

/// `COVER_DEFAULT` for relay links, milli-records/s.
pub const COVER_DEFAULT_RELAY: u16 = 2000;

/// §12.1: `clamp(req ≠ 0 ? req : default(role), relay_min, relay_max)`, with the operator's
/// bounds themselves forced into [50, 2000]. Out-of-range requests are clamped, not refused.
pub fn negotiate_rate(req: u16, role: Role, bounds: (u16, u16)) -> u16 {
    let lo = bounds.0.clamp(COVER_MIN, COVER_MAX);
    let hi = bounds.1.clamp(lo, COVER_MAX);
    let want = match (req, role) {
        (0, Role::Client) => COVER_DEFAULT_CLIENT,
        (0, Role::Relay) => COVER_DEFAULT_RELAY,
        (r, _) => r,
    };
    want.clamp(lo, hi)
}

/// `Gap(r)` in seconds from the top 53 bits `r53` of a uniform draw:
/// `−ln((r53 + 1) / 2^53) / (rate_milli / 1000)`. `U` is in (0, 1], so the gap is finite.
pub fn gap_seconds(rate_milli: u16, r53: u64) -> f64 {
    let u = ((r53 & ((1 << 53) - 1)) + 1) as f64 / (1u64 << 53) as f64;
    let rate = f64::from(rate_milli.max(1)) / 1000.0;
    -u.ln() / rate
}

/// `Gap(r)` with a fresh draw from `rng` (the top 53 bits of one `u64`).
pub fn gap(rate_milli: u16, rng: &mut impl RngCore) -> Duration {
    let secs = gap_seconds(rate_milli, rng.next_u64() >> 11);
    // At the lowest rate the longest gap is ~735 s, far inside Duration's range.
    Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
}

/// Local scheduler parameters (not negotiated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoverConfig {
    /// Longest time real data waits for a tick before it goes out anyway.
    pub max_delay: Duration,
    /// Most credits an early send can bank.
    pub credit_max: u32,
}

impl CoverConfig {
    /// Client-link default: `max_delay` 1 s, 8 credits.
    pub const CLIENT_LINK: Self = Self {
        max_delay: Duration::from_secs(1),
        credit_max: 8,
    };

    /// Relay-link default: `max_delay` 250 ms, 8 credits.
    pub const RELAY_LINK: Self = Self {
        max_delay: Duration::from_millis(250),
        credit_max: 8,
    };

    /// The default for a link of `role`.
    pub const fn for_role(role: Role) -> Self {
        match role {
            Role::Client => Self::CLIENT_LINK,
            Role::Relay => Self::RELAY_LINK,
        }
    }
}

/// What the scheduler wants sent now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CoverAction {
    /// Send one block packed from the FIFO.
    Data,
    /// Send a cover block.
    Cover,
}

/// The §12.2 scheduler for one direction of one link.
#[derive(Debug, Clone)]
pub struct CoverScheduler {
    rate_milli: u16,
    cfg: CoverConfig,
    next_tick: Instant,
    credit: u32,
}

impl CoverScheduler {
    /// Starts the tick process at `now` (after record 2 was sent or checked).
    pub fn new(rate_milli: u16, cfg: CoverConfig, now: Instant, rng: &mut impl RngCore) -> Self {
        Self {
            rate_milli,
            cfg,
            next_tick: now + gap(rate_milli, rng),
            credit: 0,
        }
    }

    /// The negotiated rate, milli-records/s.
    pub fn rate(&self) -> u16 {
        self.rate_milli
    }

    /// Banked credits.
    pub fn credit(&self) -> u32 {
        self.credit
    }

    /// The next tick.
    pub fn next_tick(&self) -> Instant {
        self.next_tick
    }

    /// One decision at `now`, given when the FIFO head was queued. Call repeatedly (packing a
    /// block after each `Data`) until it returns `None`.
    pub fn poll(
        &mut self,
        now: Instant,
        head_enqueued: Option<Instant>,
        rng: &mut impl RngCore,
    ) -> Option<CoverAction> {
        if now >= self.next_tick {
            self.next_tick = now + gap(self.rate_milli, rng);
            if head_enqueued.is_some() {
                return Some(CoverAction::Data);
            }
            if self.credit > 0 {
                self.credit -= 1;
                return None;
            }
            return Some(CoverAction::Cover);
        }
        match head_enqueued {
            Some(t) if now >= t + self.cfg.max_delay => {
                self.credit = (self.credit + 1).min(self.cfg.credit_max);
                Some(CoverAction::Data)
            }
            _ => None,
        }
    }

    /// `min(next_tick, enqueue_time(head) + max_delay)`.
    pub fn next_wakeup(&self, head_enqueued: Option<Instant>) -> Instant {
        match head_enqueued {
            Some(t) => self.next_tick.min(t + self.cfg.max_delay),
            None => self.next_tick,
        }
    }
}

#[cfg(test)]
mod tests {
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    use super::*;

    #[test]
    fn negotiation_clamps() {
        let b = (50, 2000);
        assert_eq!(negotiate_rate(0, Role::Client, b), 200);
        assert_eq!(negotiate_rate(0, Role::Relay, b), 2000);
        assert_eq!(negotiate_rate(10, Role::Client, b), 50);
        assert_eq!(negotiate_rate(9000, Role::Relay, b), 2000);
        assert_eq!(negotiate_rate(0, Role::Relay, (100, 500)), 500);
        assert_eq!(negotiate_rate(300, Role::Client, (0, 9999)), 300);
    }

    /// Credits earned by early sends cancel later cover ticks.
    #[test]
    fn early_send_earns_a_credit_that_cancels_a_tick() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let t0 = Instant::now();
        let mut s = CoverScheduler::new(50, CoverConfig::CLIENT_LINK, t0, &mut rng);
        // Far below the mean gap of 20 s, data waiting 1 s is sent early.
        let tick = s.next_tick();
        let queued = t0;
        let at = queued + Duration::from_secs(1);
        assert!(at < tick, "seed 1 gives a first gap above 1 s");
        assert_eq!(s.poll(at, Some(queued), &mut rng), Some(CoverAction::Data));
        assert_eq!(s.credit(), 1);
        let tick = s.next_tick();
        assert_eq!(s.poll(tick, None, &mut rng), None, "credit spent instead");
        assert_eq!(s.credit(), 0);
        let tick = s.next_tick();
        assert_eq!(s.poll(tick, None, &mut rng), Some(CoverAction::Cover));
        assert!(s.next_wakeup(Some(at)) <= at + Duration::from_secs(1));
    }
}
