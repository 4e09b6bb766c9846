//! The one exponential backoff of the loops that wait and try again: a broker that does not
//! answer, a lost subscription, a spawn out of descriptors, a poll for a task's end, a
//! worker that keeps dying. Each delay is twice the one before, up to a cap.
//!
//! It owns the arithmetic only: the loops do their own waiting (each has its own reasons to
//! stop early) and their own logging. A task's retry policy, which users configure and
//! which adds jitter, is `config::Backoff`, not this.

use std::time::Duration;

/// Delays that double from `first` up to `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Doubling {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Doubling {
    /// Starts at `first` (at most `max`).
    pub const fn new(first: Duration, max: Duration) -> Doubling {
        let first = if first.as_nanos() > max.as_nanos() {
            max
        } else {
            first
        };
        Doubling {
            first,
            max,
            next: first,
        }
    }

    /// The delay to wait now; the following one is twice as long, up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let now = self.next;
        self.next = now.saturating_mul(2).min(self.max);
        now
    }

    /// Back to the first delay, after a success.
    pub fn reset(&mut self) {
        self.next = self.first;
    }

    /// The delay after `failures` failures in a row without keeping state: `first` for the first
    /// (and for 0), then doubled for each one more, up to the cap.
    pub fn nth(&self, failures: u32) -> Duration {
        let mut d = self.first;
        // At most ~100 rounds: a non-zero delay reaches any cap by doubling well before.
        for _ in 1..failures {
            if d.is_zero() || d >= self.max {
                break;
            }
            d = d.saturating_mul(2);
        }
        d.min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn delays_double_up_to_the_cap_and_reset() {
        let mut b = Doubling::new(100 * MS, 500 * MS);
        let got: Vec<Duration> = (0..5).map(|_| b.next_delay()).collect();
        assert_eq!(got, [100 * MS, 200 * MS, 400 * MS, 500 * MS, 500 * MS]);
        b.reset();
        assert_eq!(b.next_delay(), 100 * MS);
    }

    #[test]
    fn a_first_delay_over_the_cap_is_the_cap() {
        let mut b = Doubling::new(Duration::from_secs(5), Duration::from_secs(1));
        assert_eq!(b.next_delay(), Duration::from_secs(1));
    }

    #[test]
    fn nth_matches_the_sequence_and_never_overflows() {
        let b = Doubling::new(500 * MS, Duration::from_secs(60));
        let mut seq = b;
        for n in 1..=10 {
            assert_eq!(b.nth(n), seq.next_delay(), "failure {n}");
        }
        assert_eq!(b.nth(0), 500 * MS);
        assert_eq!(b.nth(40), Duration::from_secs(60));
        assert_eq!(b.nth(u32::MAX), Duration::from_secs(60));
        let huge = Doubling::new(Duration::MAX, Duration::MAX);
        assert_eq!(huge.nth(3), Duration::MAX);
        let tiny = Doubling::new(Duration::from_nanos(1), Duration::MAX);
        assert_eq!(tiny.nth(41), Duration::from_nanos(1 << 40));
        assert_eq!(
            Doubling::new(Duration::ZERO, MS).nth(u32::MAX),
            Duration::ZERO
        );
    }
}
