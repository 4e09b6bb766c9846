//! The systemd notification protocol (`sd_notify`), for `Type=notify` units.
//!
//! A datagram of `KEY=VALUE` lines to the socket named by `$NOTIFY_SOCKET` (a path, or an
//! abstract name when it starts with `@`). Without that variable every call does nothing,
//! so the daemon behaves the same outside systemd. Failures are logged once, never fatal:
//! the service manager's view is informative, the tasks are what matter.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    warned: AtomicBool,
    /// Half of `$WATCHDOG_USEC`, when the unit sets `WatchdogSec=` for this process.
    pub watchdog: Option<Duration>,
}

impl Notifier {
    /// Read `$NOTIFY_SOCKET` and `$WATCHDOG_USEC`/`$WATCHDOG_PID`.
    pub fn from_env() -> Notifier {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|p| {
            let bytes = p.as_encoded_bytes();
            let addr = match bytes.first() {
                Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..]).ok()?,
                Some(b'/') => SocketAddr::from_pathname(std::path::Path::new(&p)).ok()?,
                _ => return None,
            };
            Some((UnixDatagram::unbound().ok()?, addr))
        });
        let for_us = std::env::var("WATCHDOG_PID")
            .map(|p| p.trim() == std::process::id().to_string())
            .unwrap_or(true);
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|u| *u > 0 && for_us)
            .map(|u| Duration::from_micros(u / 2));
        Notifier {
            target,
            warned: AtomicBool::new(false),
            watchdog,
        }
    }

    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Send one message (`READY=1\nSTATUS=…`).
    pub fn send(&self, msg: &str) {
        let Some((sock, addr)) = &self.target else {
            return;
        };
        if let Err(e) = sock.send_to_addr(msg.as_bytes(), addr) {
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(error = %e, "failed to notify systemd (NOTIFY_SOCKET)");
            }
        }
    }

    /// `RELOADING=1` with the monotonic timestamp systemd wants alongside it.
    pub fn reloading(&self) {
        // CLOCK_MONOTONIC cannot fail on Linux; a zero would only make systemd ignore it.
        let usec = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |ts| {
            ts.tv_sec() as u64 * 1_000_000 + ts.tv_nsec() as u64 / 1_000
        });
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_a_path_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).expect("bind");
        let n = Notifier {
            target: Some((
                UnixDatagram::unbound().expect("socket"),
                SocketAddr::from_pathname(&path).expect("addr"),
            )),
            warned: AtomicBool::new(false),
            watchdog: None,
        };
        n.send("READY=1\nSTATUS=ok");
        let mut buf = [0u8; 64];
        let len = listener.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=ok");
        n.reloading();
        let len = listener.recv(&mut buf).expect("recv");
        let text = std::str::from_utf8(&buf[..len]).expect("utf8");
        assert!(text.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{text}");
    }
}
