//! Per-server lag history: a bounded ring of round-trip samples and a summary of them.
//!
//! Samples come from three places (the TCP stack's RTT estimate, keep-alive PING/PONG, and
//! ordinary command round trips) which measure different things, so a summary can be limited
//! to one source. Timestamps are passed in by the caller; nothing here reads a clock.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Where a round-trip sample came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum LagSource {
    /// The kernel's smoothed TCP RTT (`TCP_INFO`): transport only, no server processing.
    Tcp,
    /// An SMP PING answered by PONG: end to end through TLS and the server's command loop.
    Ping,
    /// Any other command and its response (SUB, SEND, ACK, …): includes server work.
    Command,
}

/// One round-trip measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LagSample {
    /// When the answer arrived.
    pub at: Instant,
    /// The measured round-trip time.
    pub rtt: Duration,
    /// What was measured.
    pub source: LagSource,
}

/// Statistics over the samples in a [`LagHistory`] (optionally of one source).
///
/// Percentiles use the nearest-rank method on the sorted RTTs: `p` is the value at
/// position `ceil(p/100 * count)` (1-based), so it is always one of the samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct LagSummary {
    /// Samples summarised.
    pub count: usize,
    /// Smallest RTT.
    pub min: Duration,
    /// Median RTT (nearest rank).
    pub p50: Duration,
    /// 95th-percentile RTT (nearest rank).
    pub p95: Duration,
    /// Largest RTT.
    pub max: Duration,
    /// Arithmetic mean RTT, rounded down to whole nanoseconds.
    pub mean: Duration,
    /// Mean absolute difference between consecutive samples in arrival order (RFC 3550
    /// style jitter without the smoothing); zero with fewer than two samples.
    pub jitter: Duration,
    /// Arrival time of the newest sample.
    pub last_at: Instant,
    /// RTT of the newest sample.
    pub last_rtt: Duration,
}

/// The last `capacity` samples for one server, oldest first.
#[derive(Debug, Clone)]
pub struct LagHistory {
    samples: VecDeque<LagSample>,
    capacity: usize,
}

impl Default for LagHistory {
    fn default() -> Self {
        Self::with_capacity(Self::DEFAULT_CAPACITY)
    }
}

impl LagHistory {
    /// Samples kept by default: ten minutes at one sample per second, 600 × 32 bytes.
    pub const DEFAULT_CAPACITY: usize = 600;

    /// An empty history keeping [`Self::DEFAULT_CAPACITY`] samples.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty history keeping the newest `capacity` samples; 0 is raised to 1 so the
    /// newest sample is always available.
    pub fn with_capacity(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            samples: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    /// Samples kept at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Samples currently held.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// True when no sample has been recorded (or all were cleared).
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Adds a sample, dropping the oldest when full.
    pub fn record(&mut self, sample: LagSample) {
        if self.samples.len() == self.capacity {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
    }

    /// Shorthand for [`record`](Self::record).
    pub fn push(&mut self, at: Instant, rtt: Duration, source: LagSource) {
        self.record(LagSample { at, rtt, source });
    }

    /// The newest sample.
    pub fn last(&self) -> Option<&LagSample> {
        self.samples.back()
    }

    /// The samples, oldest first.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &LagSample> + ExactSizeIterator {
        self.samples.iter()
    }

    /// Forgets every sample (e.g. when the server's address changes).
    pub fn clear(&mut self) {
        self.samples.clear();
    }

    /// Summary over all samples; `None` when empty.
    pub fn summary(&self) -> Option<LagSummary> {
        summarize(self.samples.iter())
    }

    /// Summary over the samples of one source; `None` when there are none.
    pub fn summary_for(&self, source: LagSource) -> Option<LagSummary> {
        summarize(self.samples.iter().filter(|s| s.source == source))
    }
}

fn summarize<'a>(samples: impl Iterator<Item = &'a LagSample>) -> Option<LagSummary> {
    let samples: Vec<&LagSample> = samples.collect();
    let last = **samples.last()?;
    let count = samples.len();

    let mut sum: u128 = 0;
    let mut diff_sum: u128 = 0;
    for (i, s) in samples.iter().enumerate() {
        sum += s.rtt.as_nanos();
        if i > 0 {
            diff_sum += s.rtt.abs_diff(samples[i - 1].rtt).as_nanos();
        }
    }
    let mean = nanos_to_duration(sum / count as u128);
    let jitter = match count {
        1 => Duration::ZERO,
        n => nanos_to_duration(diff_sum / (n as u128 - 1)),
    };

    let mut sorted: Vec<Duration> = samples.iter().map(|s| s.rtt).collect();
    sorted.sort_unstable();
    Some(LagSummary {
        count,
        min: sorted[0],
        p50: nearest_rank(&sorted, 50),
        p95: nearest_rank(&sorted, 95),
        max: sorted[count - 1],
        mean,
        jitter,
        last_at: last.at,
        last_rtt: last.rtt,
    })
}

/// Nearest-rank percentile of a non-empty sorted slice.
fn nearest_rank(sorted: &[Duration], percent: usize) -> Duration {
    let rank = (percent * sorted.len()).div_ceil(100).max(1);
    sorted[rank.min(sorted.len()) - 1]
}

/// A mean of `Duration`s fits in a `Duration`; saturate rather than trust that blindly.
fn nanos_to_duration(nanos: u128) -> Duration {
    const NANOS_PER_SEC: u128 = 1_000_000_000;
    let secs = u64::try_from(nanos / NANOS_PER_SEC).unwrap_or(u64::MAX);
    // The remainder is below 10^9, so it fits in u32.
    let sub = (nanos % NANOS_PER_SEC) as u32;
    Duration::new(secs, sub)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn history(rtts_ms: &[(u64, LagSource)]) -> (LagHistory, Instant) {
        let t0 = Instant::now();
        let mut h = LagHistory::new();
        for (i, &(rtt, source)) in rtts_ms.iter().enumerate() {
            h.push(t0 + Duration::from_secs(i as u64), ms(rtt), source);
        }
        (h, t0)
    }

    #[test]
    fn empty_history_has_no_summary() {
        let h = LagHistory::new();
        assert!(h.is_empty());
        assert_eq!(h.summary(), None);
        assert_eq!(h.summary_for(LagSource::Ping), None);
        assert_eq!(h.capacity(), 600);
    }

    #[test]
    fn known_data_percentiles_mean_and_jitter() {
        use LagSource::Ping;
        // Arrival order 30, 10, 50, 20, 40.
        let (h, t0) = history(&[(30, Ping), (10, Ping), (50, Ping), (20, Ping), (40, Ping)]);
        let s = h.summary().unwrap();
        assert_eq!(s.count, 5);
        assert_eq!(s.min, ms(10));
        // Sorted 10 20 30 40 50: p50 rank ceil(2.5)=3 -> 30; p95 rank ceil(4.75)=5 -> 50.
        assert_eq!(s.p50, ms(30));
        assert_eq!(s.p95, ms(50));
        assert_eq!(s.max, ms(50));
        assert_eq!(s.mean, ms(30));
        // |10-30| + |50-10| + |20-50| + |40-20| = 20+40+30+20 = 110, over 4 gaps.
        assert_eq!(s.jitter, Duration::from_micros(27_500));
        assert_eq!(s.last_rtt, ms(40));
        assert_eq!(s.last_at, t0 + Duration::from_secs(4));
    }

    #[test]
    fn percentiles_over_one_to_hundred() {
        let t0 = Instant::now();
        let mut h = LagHistory::new();
        // Insert 100..=1 descending so sorting matters.
        for v in (1..=100u64).rev() {
            h.push(t0, ms(v), LagSource::Tcp);
        }
        let s = h.summary().unwrap();
        assert_eq!(
            (s.p50, s.p95, s.min, s.max),
            (ms(50), ms(95), ms(1), ms(100))
        );
        // Mean of 1..=100 is 50.5 ms; every consecutive gap is 1 ms.
        assert_eq!(s.mean, Duration::from_micros(50_500));
        assert_eq!(s.jitter, ms(1));
        assert_eq!(s.last_rtt, ms(1));
    }

    #[test]
    fn single_sample_and_mean_rounds_down() {
        let (h, _) = history(&[(7, LagSource::Command)]);
        let s = h.summary().unwrap();
        assert_eq!((s.p50, s.p95, s.jitter), (ms(7), ms(7), Duration::ZERO));

        let t0 = Instant::now();
        let mut h = LagHistory::new();
        for n in [1, 2, 2] {
            h.push(t0, Duration::from_nanos(n), LagSource::Tcp);
        }
        // 5 ns / 3 = 1.67 ns, reported as 1 ns.
        assert_eq!(h.summary().unwrap().mean, Duration::from_nanos(1));
    }

    #[test]
    fn filtering_by_source() {
        use LagSource::{Command, Ping, Tcp};
        let (h, t0) = history(&[(5, Tcp), (100, Ping), (6, Tcp), (300, Command), (200, Ping)]);
        let ping = h.summary_for(Ping).unwrap();
        assert_eq!(ping.count, 2);
        assert_eq!((ping.min, ping.max, ping.mean), (ms(100), ms(200), ms(150)));
        // Jitter is between consecutive *Ping* samples, not across sources.
        assert_eq!(ping.jitter, ms(100));
        assert_eq!(ping.last_at, t0 + Duration::from_secs(4));
        let tcp = h.summary_for(Tcp).unwrap();
        assert_eq!((tcp.count, tcp.jitter, tcp.last_rtt), (2, ms(1), ms(6)));
        assert_eq!(h.summary_for(Command).unwrap().p95, ms(300));
        assert_eq!(h.summary().unwrap().count, 5);
    }

    #[test]
    fn ring_keeps_only_the_newest() {
        let t0 = Instant::now();
        let mut h = LagHistory::with_capacity(3);
        for v in 1..=5u64 {
            h.push(t0 + Duration::from_secs(v), ms(v), LagSource::Ping);
        }
        assert_eq!(h.len(), 3);
        let kept: Vec<u64> = h.iter().map(|s| s.rtt.as_millis() as u64).collect();
        assert_eq!(kept, [3, 4, 5]);
        let s = h.summary().unwrap();
        assert_eq!((s.min, s.max, s.count), (ms(3), ms(5), 3));
        assert_eq!(h.last().unwrap().rtt, ms(5));

        let mut one = LagHistory::with_capacity(0);
        assert_eq!(one.capacity(), 1);
        one.push(t0, ms(1), LagSource::Tcp);
        one.push(t0, ms(2), LagSource::Tcp);
        assert_eq!(one.len(), 1);
        assert_eq!(one.last().unwrap().rtt, ms(2));
        one.clear();
        assert!(one.is_empty());
    }

    #[test]
    fn default_capacity_wraps_at_600() {
        let t0 = Instant::now();
        let mut h = LagHistory::new();
        for v in 0..1000u64 {
            h.push(t0, Duration::from_micros(v), LagSource::Ping);
        }
        assert_eq!(h.len(), 600);
        let s = h.summary().unwrap();
        // Kept 400..=999 µs: sorted nearest-rank p50 is the 300th = 699, p95 the 570th = 969.
        assert_eq!(s.min, Duration::from_micros(400));
        assert_eq!(s.p50, Duration::from_micros(699));
        assert_eq!(s.p95, Duration::from_micros(969));
        assert_eq!(s.mean, Duration::from_nanos(699_500));
    }

    #[test]
    fn huge_rtts_do_not_overflow() {
        let t0 = Instant::now();
        let mut h = LagHistory::with_capacity(4);
        for _ in 0..4 {
            h.push(t0, Duration::MAX, LagSource::Command);
        }
        h.push(t0, Duration::ZERO, LagSource::Command);
        let s = h.summary().unwrap();
        assert_eq!(s.max, Duration::MAX);
        assert_eq!(s.min, Duration::ZERO);
        assert!(s.mean > Duration::from_secs(u64::MAX / 2));
    }
}
