//! One wall-clock timer: a `timerfd` on `CLOCK_REALTIME`, armed at an absolute instant with
//! `TFD_TIMER_CANCEL_ON_SET`, so that it fires when the wall clock reads that instant (not
//! after a monotonic delay that a clock step would shift) and wakes at once when the clock
//! is set (`settimeofday`, an NTP step): the caller then looks at its slots again. Where no
//! `timerfd` can be made, a monotonic sleep to the instant, at most a minute at a time,
//! stands in.

use std::os::fd::AsRawFd;
use std::time::Duration;

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use tokio::io::unix::AsyncFd;

use crate::model::{now_ms, UnixMs};

/// Why a sleep ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Woke {
    /// The instant came.
    Expired,
    /// The wall clock was set (or, without a `timerfd`, a minute went by).
    ClockSet,
}

pub(super) struct WallTimer {
    fd: Option<AsyncFd<Fd>>,
}

/// A `TimerFd` as tokio's `AsyncFd` takes it.
struct Fd(TimerFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

impl WallTimer {
    pub(super) fn new() -> WallTimer {
        let fd = TimerFd::new(
            ClockId::CLOCK_REALTIME,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .map_err(|e| e.to_string())
        .and_then(|t| {
            // SAFETY: the AsyncFd owns the timerfd, which nothing else closes or replaces.
            unsafe { AsyncFd::register_with_interest(Fd(t), tokio::io::Interest::READABLE) }
                .map_err(|e| e.to_string())
        });
        match fd {
            Ok(fd) => WallTimer { fd: Some(fd) },
            Err(e) => {
                tracing::warn!(error = %e, "no wall-clock timer (timerfd): schedules wake at least once a minute to follow the clock");
                WallTimer { fd: None }
            }
        }
    }

    /// Sleep until the wall clock reads `at` (for ever with `None`, unless the clock is
    /// set). Cancel-safe: dropping it loses nothing.
    pub(super) async fn sleep_until(&self, at: Option<UnixMs>) -> Woke {
        let Some(fd) = &self.fd else {
            let wait = match at {
                Some(t) => Duration::from_millis((t - now_ms()).clamp(0, 60_000) as u64),
                None => Duration::from_secs(60),
            };
            tokio::time::sleep(wait).await;
            return match at {
                Some(t) if now_ms() >= t => Woke::Expired,
                _ => Woke::ClockSet,
            };
        };
        let Some(at) = at else {
            let _ = fd.get_ref().0.unset();
            return std::future::pending().await;
        };
        // An instant in the past (or at the epoch) would disarm the timer: at least 1 ns.
        let at = at.max(0);
        let spec = TimeSpec::new(
            at.div_euclid(1000),
            (at.rem_euclid(1000) * 1_000_000).max(1),
        );
        if let Err(e) = fd.get_ref().0.set(
            Expiration::OneShot(spec),
            TimerSetTimeFlags::TFD_TIMER_ABSTIME | TimerSetTimeFlags::TFD_TIMER_CANCEL_ON_SET,
        ) {
            tracing::warn!(error = %e, "failed to arm the schedules' timer; looking again in a second");
            tokio::time::sleep(Duration::from_secs(1)).await;
            return Woke::ClockSet;
        }
        loop {
            let mut ready = match fd.readable().await {
                Ok(r) => r,
                Err(_) => return Woke::ClockSet,
            };
            let mut buf = [0u8; 8];
            match nix::unistd::read(fd.get_ref().as_raw_fd(), &mut buf) {
                Ok(_) => return Woke::Expired,
                Err(nix::errno::Errno::ECANCELED) => return Woke::ClockSet,
                Err(nix::errno::Errno::EAGAIN) => ready.clear_ready(),
                Err(_) => return Woke::ClockSet,
            }
        }
    }
}
