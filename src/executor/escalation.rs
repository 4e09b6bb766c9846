//! SIGTERM → grace → SIGKILL against one process group (and SIGKILL to its whole cgroup
//! when it has one): the one escalation behind a task's
//! timeout, an operator's cancel and the daemon's shutdown, for a task's own process and
//! for a long-lived worker alike.

use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::time::Instant;

use super::{procs, Stop};

/// Why taskd began stopping a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopWhy {
    /// The task ran past its timeout.
    Timeout,
    /// An operator cancelled the task.
    Cancel,
    /// The daemon is stopping (or stopping this long-lived worker).
    Shutdown,
}

/// The state of stopping one group: not begun, SIGTERM sent (SIGKILL due at `kill_at`), or
/// SIGKILL sent.
#[derive(Debug)]
pub struct Escalation {
    pgid: i32,
    why: Option<StopWhy>,
    last_signal: Option<Signal>,
    /// When to send SIGKILL; `None` once sent (or for an unrepresentably long grace).
    kill_at: Option<Instant>,
    /// The group's cgroup: SIGKILL goes to all of it (what left the group included).
    cgroup: Option<super::cgroup::Cgroup>,
}

impl Escalation {
    pub fn new(pgid: i32) -> Escalation {
        Escalation {
            pgid,
            why: None,
            last_signal: None,
            kill_at: None,
            cgroup: None,
        }
    }

    /// Also kill every process of `cgroup` when SIGKILL is due.
    pub fn with_cgroup(mut self, cgroup: Option<super::cgroup::Cgroup>) -> Escalation {
        self.cgroup = cgroup;
        self
    }

    /// Why the stop began; `None` while it has not.
    pub fn why(&self) -> Option<StopWhy> {
        self.why
    }

    /// The last signal sent to the group, if any (SIGTERM or SIGKILL).
    pub fn last_signal(&self) -> Option<Signal> {
        self.last_signal
    }

    /// SIGTERM (and SIGCONT) to the group now; SIGKILL once `grace` has passed.
    pub fn begin(&mut self, why: StopWhy, grace: Duration) {
        self.why = Some(why);
        procs::signal_group(self.pgid, Signal::SIGTERM);
        // A stopped member would keep SIGTERM pending until continued.
        procs::signal_group(self.pgid, Signal::SIGCONT);
        self.last_signal = Some(Signal::SIGTERM);
        self.kill_at = Instant::now().checked_add(grace);
    }

    /// SIGKILL to the group now.
    pub fn kill(&mut self) {
        procs::signal_group(self.pgid, Signal::SIGKILL);
        if let Some(cg) = &self.cgroup {
            cg.kill();
        }
        self.last_signal = Some(Signal::SIGKILL);
        self.kill_at = None;
    }

    /// Waits for the next step and takes it: the `deadline`, a cancel or a shutdown begins
    /// the stop (SIGTERM, then SIGKILL after `grace`); the grace running out or the daemon's
    /// kill (a second signal, which also counts as a shutdown) sends SIGKILL. Pending forever
    /// once SIGKILL was sent.
    ///
    /// Cancel-safe: nothing is sent until a step is due, so it can sit in a `select!` beside
    /// the group's pipes and exit.
    pub async fn step(&mut self, stop: &Stop, deadline: Option<Instant>, grace: Duration) {
        let begun = self.why.is_some();
        let killed = self.last_signal == Some(Signal::SIGKILL);
        tokio::select! {
            biased;
            _ = stop.cancel.cancelled(), if !begun => self.begin(StopWhy::Cancel, grace),
            _ = sleep_until_opt(deadline), if !begun => self.begin(StopWhy::Timeout, grace),
            _ = stop.shutdown.cancelled(), if !begun => self.begin(StopWhy::Shutdown, grace),
            _ = sleep_until_opt(self.kill_at), if self.kill_at.is_some() => self.kill(),
            _ = stop.kill.cancelled(), if !killed => {
                if self.why.is_none() {
                    self.why = Some(StopWhy::Shutdown);
                }
                self.kill();
            }
            else => std::future::pending().await,
        }
    }
}

/// Sleeps until `at`; forever when there is no `at`.
pub async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
