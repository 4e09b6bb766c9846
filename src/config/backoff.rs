//! The retry delay policy of a queue: how long a task waits after a failed attempt.

use std::time::Duration;

/// How the delay grows with each failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackoffKind {
    /// `base * 2^(failed - 1)`, capped at `max`.
    Exponential,
    /// Always `base` (capped at `max`).
    Fixed,
}

impl BackoffKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackoffKind::Exponential => "exponential",
            BackoffKind::Fixed => "fixed",
        }
    }
}

/// A queue's retry delay policy (`backoff = { kind, base, max, jitter }`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub kind: BackoffKind,
    pub base: Duration,
    pub max: Duration,
    pub jitter: bool,
}

impl Default for Backoff {
    /// Exponential from 10s up to 1h, with jitter.
    fn default() -> Self {
        Backoff {
            kind: BackoffKind::Exponential,
            base: Duration::from_secs(10),
            max: Duration::from_secs(60 * 60),
            jitter: true,
        }
    }
}

impl Backoff {
    /// Delay before the next attempt after `failed` failed attempts (failed >= 1).
    ///
    /// Exponential: base * 2^(failed-1), capped at max; Fixed: base (capped at max). With
    /// jitter: a uniformly random value in [d/2, d] ("equal jitter"), so retries of many tasks
    /// that failed together spread out while each still waits at least half its delay. Never
    /// above max, never zero when base > 0 (and max > 0), and no overflow for any `failed`.
    pub(crate) fn delay(&self, failed: u32, rng: &mut impl rand::Rng) -> Duration {
        let d = self.deterministic(failed);
        if !self.jitter || d.is_zero() {
            return d;
        }
        let low = (d / 2).max(Duration::from_nanos(1));
        let spread = (d - low).as_nanos();
        let extra = rng.gen_range(0..=spread);
        // `extra <= spread`, which came from a Duration, so both parts fit.
        let extra = Duration::new(
            (extra / 1_000_000_000) as u64,
            (extra % 1_000_000_000) as u32,
        );
        low + extra
    }

    /// The delay without jitter.
    fn deterministic(&self, failed: u32) -> Duration {
        let d = match self.kind {
            BackoffKind::Fixed => self.base,
            BackoffKind::Exponential => {
                let doublings = failed.saturating_sub(1);
                if self.base.is_zero() {
                    Duration::ZERO
                } else if doublings >= 32 {
                    // 2^32 times even one nanosecond is over four seconds, and any sane max
                    // is reached long before; saturate instead of computing the power.
                    self.max
                } else {
                    self.base.checked_mul(1u32 << doublings).unwrap_or(self.max)
                }
            }
        };
        d.min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn plain(kind: BackoffKind, base: u64, max: u64) -> Backoff {
        Backoff {
            kind,
            base: Duration::from_secs(base),
            max: Duration::from_secs(max),
            jitter: false,
        }
    }

    #[test]
    fn exponential_doubles_until_the_cap() {
        let b = plain(BackoffKind::Exponential, 10, 3600);
        let mut rng = StdRng::seed_from_u64(1);
        let got: Vec<u64> = (1..=10).map(|n| b.delay(n, &mut rng).as_secs()).collect();
        assert_eq!(got, [10, 20, 40, 80, 160, 320, 640, 1280, 2560, 3600]);
        assert_eq!(b.delay(0, &mut rng), Duration::from_secs(10));
        assert_eq!(b.delay(u32::MAX, &mut rng), Duration::from_secs(3600));
        assert_eq!(b.delay(33, &mut rng), Duration::from_secs(3600));
    }

    #[test]
    fn fixed_is_base_capped_at_max() {
        let mut rng = StdRng::seed_from_u64(1);
        let b = plain(BackoffKind::Fixed, 10, 3600);
        assert_eq!(b.delay(1, &mut rng), Duration::from_secs(10));
        assert_eq!(b.delay(500, &mut rng), Duration::from_secs(10));
        let b = plain(BackoffKind::Fixed, 10, 5);
        assert_eq!(b.delay(1, &mut rng), Duration::from_secs(5));
    }

    #[test]
    fn jitter_stays_in_the_upper_half() {
        let mut b = plain(BackoffKind::Exponential, 10, 3600);
        b.jitter = true;
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..1000 {
            let d = b.delay(3, &mut rng);
            assert!(
                d >= Duration::from_secs(20) && d <= Duration::from_secs(40),
                "{d:?}"
            );
        }
        // One nanosecond cannot halve to zero.
        b.base = Duration::from_nanos(1);
        for _ in 0..100 {
            assert_eq!(b.delay(1, &mut rng), Duration::from_nanos(1));
        }
    }

    #[test]
    fn default_matches_the_documented_policy() {
        let b = Backoff::default();
        assert_eq!(b.kind, BackoffKind::Exponential);
        assert_eq!(b.base, Duration::from_secs(10));
        assert_eq!(b.max, Duration::from_secs(3600));
        assert!(b.jitter);
    }

    fn arb_backoff() -> impl Strategy<Value = Backoff> {
        (
            prop_oneof![Just(BackoffKind::Exponential), Just(BackoffKind::Fixed)],
            0u64..=u64::MAX / 4,
            0u64..=u64::MAX / 4,
            any::<bool>(),
            prop_oneof![0u32..10, Just(999_999_999u32)],
        )
            .prop_map(|(kind, a, b, jitter, nanos)| {
                let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
                // Mix tiny and huge durations: scale one side down for variety.
                let base = Duration::new(lo % 100_000, nanos);
                let max = Duration::new(hi, 0).max(base);
                Backoff {
                    kind,
                    base,
                    max,
                    jitter,
                }
            })
    }

    proptest! {
        #[test]
        fn never_above_max_never_zero(b in arb_backoff(), failed in any::<u32>(), seed in any::<u64>()) {
            let mut rng = StdRng::seed_from_u64(seed);
            let d = b.delay(failed, &mut rng);
            prop_assert!(d <= b.max);
            if !b.base.is_zero() {
                prop_assert!(!d.is_zero());
            }
        }

        #[test]
        fn non_decreasing_without_jitter(mut b in arb_backoff(), failed in 1u32..200) {
            b.jitter = false;
            let mut rng = StdRng::seed_from_u64(0);
            let now = b.delay(failed, &mut rng);
            let next = b.delay(failed + 1, &mut rng);
            prop_assert!(next >= now);
            if b.kind == BackoffKind::Exponential && now < b.max {
                prop_assert!(next == b.max || next == now * 2);
            }
        }

        #[test]
        fn no_panic_for_extreme_values(failed in any::<u32>(), secs in any::<u64>(), nanos in 0u32..1_000_000_000, jitter in any::<bool>()) {
            let b = Backoff { kind: BackoffKind::Exponential, base: Duration::new(secs, nanos), max: Duration::MAX, jitter };
            let mut rng = StdRng::seed_from_u64(u64::from(failed));
            let d = b.delay(failed, &mut rng);
            prop_assert!(!d.is_zero() || b.base.is_zero());
        }
    }
}
