//! Live output: what running attempts write, for followers (`taskd logs --follow`, `taskd
//! tail`, the API's output streams).
//!
//! Each running attempt has a [`LiveOutput`]: a ring of its last [`RING_BYTES`] bytes,
//! stdout and stderr interleaved in the order they were read, every byte at a known offset of
//! its stream. The attempt's `Capture`s push into it; followers pull from it at their own
//! [`Cursor`]. The writer never waits for a follower: a push copies into the ring under a
//! short lock and rings the queue's doorbell; a follower that fell behind what the ring holds
//! is told how many bytes it missed ([`Read::Skipped`]) and goes on from the oldest byte
//! still held.
//!
//! The [`Live`] hub holds the rings of the attempts running on this daemon, and those that
//! ended in the last [`LINGER`] (at most [`LINGER_MAX`]), so that a follower that reconnects
//! resumes where it was, and none sees a gap between the end of an attempt here and its
//! result in the broker.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::model::{AttemptReason, QueueName, TaskId, TaskState, UnixMs};

/// The most bytes a ring holds (stdout and stderr together).
pub const RING_BYTES: usize = 256 * 1024;
/// The most pieces a ring holds: output that alternates streams byte by byte is dropped at
/// this many pieces rather than at [`RING_BYTES`], so that the ring's bookkeeping stays
/// bounded too.
const RING_PIECES: usize = 8 * 1024;
/// How long an ended attempt's ring stays in the hub.
pub const LINGER: Duration = Duration::from_secs(60);
/// The most ended rings the hub keeps.
pub const LINGER_MAX: usize = 64;

/// One of a task's two output streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A follower's place in an attempt's output: the bytes of each stream it has had.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    pub out: u64,
    pub err: u64,
}

impl Cursor {
    pub fn get(&self, stream: Stream) -> u64 {
        match stream {
            Stream::Stdout => self.out,
            Stream::Stderr => self.err,
        }
    }

    fn add(&mut self, stream: Stream, bytes: u64) {
        match stream {
            Stream::Stdout => self.out += bytes,
            Stream::Stderr => self.err += bytes,
        }
    }
}

/// How an attempt ended and what became of its task, set once its result is in the broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndInfo {
    /// False when nothing ran after all (no long-lived worker took the task, or it was
    /// given back before it started): the task went back to its queue, and its history has
    /// no record of this.
    pub ran: bool,
    pub reason: Option<AttemptReason>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub error: Option<String>,
    pub started_at: UnixMs,
    pub ended_at: UnixMs,
    /// The task's state after this attempt.
    pub state: TaskState,
    /// When it runs again (a retry).
    pub run_at: Option<UnixMs>,
}

/// What a read from a ring gives.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    /// The next bytes of one stream; the cursor has moved past them.
    Data(Stream, Vec<u8>),
    /// The cursor was behind what the ring holds: these many bytes of each stream are gone
    /// for this follower, and the cursor now points at the oldest byte held.
    Skipped { out: u64, err: u64 },
    /// Nothing new. `end` is set once the attempt has ended (no more bytes will come).
    Idle { end: Option<EndInfo> },
}

/// A run of bytes of one stream, contiguous in the ring.
#[derive(Debug)]
struct Piece {
    stream: Stream,
    /// The stream offset of its first byte.
    off: u64,
    len: usize,
}

#[derive(Debug, Default)]
struct Ring {
    buf: VecDeque<u8>,
    pieces: VecDeque<Piece>,
    /// Everything written so far, per stream.
    total: Cursor,
    /// The stream offsets of the oldest byte held (what the ring dropped before it).
    start: Cursor,
    end: Option<EndInfo>,
}

impl Ring {
    fn push(&mut self, stream: Stream, data: &[u8]) {
        let off = self.total.get(stream);
        match self.pieces.back_mut() {
            Some(p) if p.stream == stream => p.len += data.len(),
            _ => self.pieces.push_back(Piece {
                stream,
                off,
                len: data.len(),
            }),
        }
        self.buf.extend(data);
        self.total.add(stream, data.len() as u64);
        let mut excess = self.buf.len().saturating_sub(RING_BYTES);
        while excess > 0 || self.pieces.len() > RING_PIECES {
            let Some(first) = self.pieces.front_mut() else {
                break;
            };
            let n = if excess > 0 {
                excess.min(first.len)
            } else {
                first.len
            };
            first.off += n as u64;
            first.len -= n;
            let s = first.stream;
            if first.len == 0 {
                self.pieces.pop_front();
            }
            self.buf.drain(..n);
            self.start.add(s, n as u64);
            excess = excess.saturating_sub(n);
        }
    }

    fn read(&self, cur: &mut Cursor, max: usize) -> Read {
        if cur.out < self.start.out || cur.err < self.start.err {
            let skipped = Read::Skipped {
                out: self.start.out.saturating_sub(cur.out),
                err: self.start.err.saturating_sub(cur.err),
            };
            cur.out = cur.out.max(self.start.out);
            cur.err = cur.err.max(self.start.err);
            return skipped;
        }
        let mut at = 0usize;
        for p in &self.pieces {
            let have = cur.get(p.stream);
            let end = p.off + p.len as u64;
            if have < end {
                let from = have.max(p.off);
                let n = ((end - from) as usize).min(max);
                let i = at + (from - p.off) as usize;
                let bytes = copy_range(&self.buf, i, n);
                // A cursor inside this piece only if it had everything before it.
                let skipped = from - have;
                if skipped > 0 {
                    cur.add(p.stream, skipped);
                }
                cur.add(p.stream, n as u64);
                return Read::Data(p.stream, bytes);
            }
            at += p.len;
        }
        Read::Idle {
            end: self.end.clone(),
        }
    }
}

/// `n` bytes of `buf` from `i`, copied slice by slice (the ring's two halves).
fn copy_range(buf: &VecDeque<u8>, start: usize, len: usize) -> Vec<u8> {
    let (a, b) = buf.as_slices();
    let mut out = Vec::with_capacity(len);
    if start < a.len() {
        let end = (start + len).min(a.len());
        out.extend_from_slice(&a[start..end]);
        out.extend_from_slice(&b[..len - (end - start)]);
    } else {
        let j = start - a.len();
        out.extend_from_slice(&b[j..j + len]);
    }
    out
}

/// The live output of one attempt.
pub struct LiveOutput {
    pub task: TaskId,
    pub queue: QueueName,
    /// `TASKD_ATTEMPT` of the run.
    pub attempt: u32,
    pub started_at: UnixMs,
    /// The node running it.
    pub node: String,
    /// Its place among the queue's registrations (see [`Live::queue_since`]).
    seq: u64,
    ring: Mutex<Ring>,
    bell: Arc<watch::Sender<()>>,
    ended_at: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for LiveOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveOutput")
            .field("task", &self.task)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

impl LiveOutput {
    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Append what the task wrote on `stream`. Never waits for a follower.
    pub fn push(&self, stream: Stream, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.ring().push(stream, data);
        self.bell.send_replace(());
    }

    /// The next piece for a follower at `cur` (at most `max` bytes).
    pub fn read(&self, cur: &mut Cursor, max: usize) -> Read {
        self.ring().read(cur, max)
    }

    /// Everything written so far: a cursor there sees only what comes next.
    pub fn total(&self) -> Cursor {
        self.ring().total
    }

    pub fn end(&self) -> Option<EndInfo> {
        self.ring().end.clone()
    }

    /// Woken by every push, start and end of an attempt of this queue.
    pub fn doorbell(&self) -> watch::Receiver<()> {
        self.bell.subscribe()
    }
}

#[derive(Default)]
struct QueueBell {
    bell: Arc<watch::Sender<()>>,
    /// Attempts of the queue registered so far.
    registered: u64,
}

#[derive(Default)]
struct Hub {
    running: HashMap<TaskId, Arc<LiveOutput>>,
    /// Ended, oldest first.
    ended: VecDeque<Arc<LiveOutput>>,
    queues: HashMap<QueueName, QueueBell>,
}

/// The live output of the attempts this daemon runs (and of those that just ended).
#[derive(Default)]
pub struct Live {
    hub: Mutex<Hub>,
}

impl Live {
    pub fn new() -> Arc<Live> {
        Arc::new(Live::default())
    }

    fn hub(&self) -> std::sync::MutexGuard<'_, Hub> {
        self.hub.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Register an attempt about to start; its output is pushed into what this returns.
    pub fn start(
        &self,
        task: TaskId,
        queue: &QueueName,
        attempt: u32,
        node: &str,
    ) -> Arc<LiveOutput> {
        let mut hub = self.hub();
        let q = hub.queues.entry(queue.clone()).or_default();
        q.registered += 1;
        let out = Arc::new(LiveOutput {
            task,
            queue: queue.clone(),
            attempt,
            started_at: crate::model::now_ms(),
            node: node.to_string(),
            seq: q.registered,
            ring: Mutex::new(Ring::default()),
            bell: q.bell.clone(),
            ended_at: Mutex::new(None),
        });
        let bell = q.bell.clone();
        // A previous attempt still registered (it cannot be: its end came first) lingers.
        if let Some(old) = hub.running.insert(task, out.clone()) {
            hub.ended.push_back(old);
        }
        drop(hub);
        bell.send_replace(());
        out
    }

    /// The attempt ended and its result is in the broker: say how, keep its ring a while.
    pub fn end(&self, out: &Arc<LiveOutput>, info: EndInfo) {
        out.ring().end = Some(info);
        *out.ended_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        let mut hub = self.hub();
        if hub
            .running
            .get(&out.task)
            .is_some_and(|r| Arc::ptr_eq(r, out))
        {
            hub.running.remove(&out.task);
        }
        hub.ended.push_back(out.clone());
        Self::prune(&mut hub, Instant::now());
        drop(hub);
        out.bell.send_replace(());
    }

    fn prune(hub: &mut Hub, now: Instant) {
        while hub.ended.len() > LINGER_MAX
            || hub.ended.front().is_some_and(|o| {
                o.ended_at
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_some_and(|t| now.duration_since(t) > LINGER)
            })
        {
            hub.ended.pop_front();
        }
    }

    /// The attempt of `task` running here now.
    pub fn current(&self, task: TaskId) -> Option<Arc<LiveOutput>> {
        self.hub().running.get(&task).cloned()
    }

    /// The ended attempts of `task` still held, oldest first.
    pub fn ended(&self, task: TaskId) -> Vec<Arc<LiveOutput>> {
        let mut hub = self.hub();
        Self::prune(&mut hub, Instant::now());
        hub.ended
            .iter()
            .filter(|o| o.task == task)
            .cloned()
            .collect()
    }

    /// A doorbell for `queue`: woken by every push, start and end of its attempts here.
    pub fn doorbell(&self, queue: &QueueName) -> watch::Receiver<()> {
        self.hub()
            .queues
            .entry(queue.clone())
            .or_default()
            .bell
            .subscribe()
    }

    /// How many attempts of `queue` were registered so far.
    pub fn registered(&self, queue: &QueueName) -> u64 {
        self.hub().queues.get(queue).map_or(0, |q| q.registered)
    }

    /// The attempts of `queue` registered after the `seen`-th, running or ended and still
    /// held, in order; and how many such attempts are no longer held (they started and
    /// ended, and were dropped, before the caller looked).
    pub fn queue_since(&self, queue: &QueueName, seen: u64) -> (Vec<Arc<LiveOutput>>, u64, u64) {
        let mut hub = self.hub();
        Self::prune(&mut hub, Instant::now());
        let registered = hub.queues.get(queue).map_or(0, |q| q.registered);
        let mut found: Vec<Arc<LiveOutput>> = hub
            .running
            .values()
            .chain(hub.ended.iter())
            .filter(|o| &o.queue == queue && o.seq > seen)
            .cloned()
            .collect();
        found.sort_by_key(|o| o.seq);
        found.dedup_by_key(|o| o.seq);
        let missed = registered.saturating_sub(seen) - found.len() as u64;
        (found, missed, registered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q() -> QueueName {
        "q".parse().expect("a queue name")
    }

    fn drain(out: &LiveOutput, cur: &mut Cursor) -> Vec<(Stream, Vec<u8>)> {
        let mut got = Vec::new();
        loop {
            match out.read(cur, 4) {
                Read::Data(s, b) => got.push((s, b)),
                Read::Skipped { .. } => panic!("nothing was dropped"),
                Read::Idle { .. } => return got,
            }
        }
    }

    #[test]
    fn a_follower_reads_both_streams_in_the_order_they_were_written() {
        let live = Live::new();
        let out = live.start(TaskId::new(), &q(), 1, "n");
        out.push(Stream::Stdout, b"one\n");
        out.push(Stream::Stderr, b"warn\n");
        out.push(Stream::Stdout, b"two\n");
        let mut cur = Cursor::default();
        let got: Vec<(Stream, String)> = drain(&out, &mut cur)
            .into_iter()
            .map(|(s, b)| (s, String::from_utf8(b).expect("text")))
            .collect();
        let joined: Vec<(Stream, &str)> = got.iter().map(|(s, t)| (*s, t.as_str())).collect();
        assert_eq!(
            joined,
            [
                (Stream::Stdout, "one\n"),
                (Stream::Stderr, "warn"),
                (Stream::Stderr, "\n"),
                (Stream::Stdout, "two\n")
            ]
        );
        assert_eq!(cur, Cursor { out: 8, err: 5 });
        // A cursor in the middle resumes exactly there.
        let mut mid = Cursor { out: 4, err: 2 };
        let rest: Vec<u8> = drain(&out, &mut mid)
            .into_iter()
            .flat_map(|(_, b)| b)
            .collect();
        assert_eq!(rest, b"rn\ntwo\n");
    }

    #[test]
    fn a_follower_behind_the_ring_is_told_what_it_missed() {
        let live = Live::new();
        let out = live.start(TaskId::new(), &q(), 1, "n");
        let chunk = vec![b'x'; 1000];
        for _ in 0..(RING_BYTES / 1000 + 10) {
            out.push(Stream::Stdout, &chunk);
        }
        out.push(Stream::Stderr, b"e");
        let mut cur = Cursor::default();
        let total = out.total();
        match out.read(&mut cur, 64) {
            Read::Skipped { out: o, err: 0 } => {
                assert_eq!(o, total.out + 1 - RING_BYTES as u64);
            }
            other => panic!("{other:?}"),
        }
        let mut bytes = 0u64;
        loop {
            match out.read(&mut cur, 64 * 1024) {
                Read::Data(_, b) => bytes += b.len() as u64,
                Read::Skipped { .. } => panic!("skipped twice"),
                Read::Idle { end } => {
                    assert!(end.is_none());
                    break;
                }
            }
        }
        assert_eq!(bytes, RING_BYTES as u64);
        assert_eq!(cur, out.total());
    }

    #[test]
    fn a_range_is_copied_across_the_two_halves_of_the_ring() {
        let mut buf: VecDeque<u8> = VecDeque::with_capacity(8);
        buf.extend(b"xxxxxx");
        buf.drain(..4);
        buf.extend(b"abcdef"); // wraps around
        let want: Vec<u8> = buf.iter().copied().collect();
        for i in 0..want.len() {
            for n in 0..=(want.len() - i) {
                assert_eq!(copy_range(&buf, i, n), want[i..i + n], "{i}+{n}");
            }
        }
    }

    #[test]
    fn bytes_alternating_streams_are_bounded_by_pieces() {
        let live = Live::new();
        let out = live.start(TaskId::new(), &q(), 1, "n");
        for i in 0..(RING_PIECES * 2) {
            let s = if i % 2 == 0 {
                Stream::Stdout
            } else {
                Stream::Stderr
            };
            out.push(s, b"x");
        }
        let ring = out.ring();
        assert!(ring.pieces.len() <= RING_PIECES);
        assert_eq!(
            ring.buf.len(),
            ring.pieces.iter().map(|p| p.len).sum::<usize>()
        );
    }

    #[test]
    fn the_hub_keeps_ended_attempts_a_while_and_counts_what_it_dropped() {
        let live = Live::new();
        let first = live.start(TaskId::new(), &q(), 1, "n");
        assert!(live.current(first.task).is_some());
        live.end(
            &first,
            EndInfo {
                ran: true,
                reason: Some(AttemptReason::Exit),
                exit_code: Some(0),
                signal: None,
                error: None,
                started_at: 0,
                ended_at: 0,
                state: TaskState::Succeeded,
                run_at: None,
            },
        );
        assert!(live.current(first.task).is_none());
        assert_eq!(live.ended(first.task).len(), 1);
        for _ in 0..(LINGER_MAX + 5) {
            let o = live.start(TaskId::new(), &q(), 1, "n");
            live.end(&o, first.end().expect("ended"));
        }
        let (found, missed, registered) = live.queue_since(&q(), 0);
        assert_eq!(registered, LINGER_MAX as u64 + 6);
        assert_eq!(found.len(), LINGER_MAX);
        assert_eq!(missed, 6);
    }
}
