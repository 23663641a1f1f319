//! Deadlines computed from durations that come from configuration or from apps, which may
//! be absurdly long (`Duration::MAX`): `Instant + Duration` panics on overflow, and one such
//! panic would stop the daemon's driver for every app.

use std::time::{Duration, Instant};

/// Fallbacks, longest first, for a deadline that does not fit in an `Instant`. Any of them
/// is "never" for a daemon's lifetime.
const FAR: [Duration; 3] = [
    Duration::from_secs(100 * 365 * 24 * 3600),
    Duration::from_secs(365 * 24 * 3600),
    Duration::from_secs(24 * 3600),
];

/// `t + d`, saturating to a far-off deadline instead of panicking on overflow.
pub(crate) fn later(t: Instant, d: Duration) -> Instant {
    t.checked_add(d)
        .or_else(|| FAR.iter().find_map(|&far| t.checked_add(far.min(d))))
        .unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saturates_instead_of_panicking() {
        let now = Instant::now();
        assert_eq!(
            later(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        let far = later(now, Duration::MAX);
        assert!(
            far >= now + Duration::from_secs(24 * 3600),
            "{:?}",
            far - now
        );
        // Chained: a deadline from a saturated one still does not panic.
        let again = later(far, Duration::MAX);
        assert!(again >= far);
    }
}
