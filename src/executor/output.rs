//! What a task writes: a bounded tail of each stream, byte counts, and an optional capped log
//! file; and what it reads: the stdin payload.
//!
//! Memory stays O(tail_bytes) however much the child writes: every read goes through one
//! fixed 64 KiB buffer and only the last `tail_bytes` are kept.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The size of the one buffer each stream is read through.
pub(crate) const READ_CHUNK: usize = 64 * 1024;
/// The size a stream's buffer starts at.
const FIRST_READ_CHUNK: usize = 4 * 1024;

/// The last `cap` bytes of everything pushed into it.
#[derive(Debug)]
pub(crate) struct Tail {
    cap: usize,
    buf: VecDeque<u8>,
}

impl Tail {
    pub(crate) fn new(cap: usize) -> Self {
        // Grows on demand up to `cap`: most tasks print far less than their tail allows.
        Tail {
            cap,
            buf: VecDeque::new(),
        }
    }

    pub(crate) fn push(&mut self, data: &[u8]) {
        if self.cap == 0 || data.is_empty() {
            return;
        }
        if data.len() >= self.cap {
            self.buf.clear();
            self.buf.extend(&data[data.len() - self.cap..]);
            return;
        }
        let overflow = (self.buf.len() + data.len()).saturating_sub(self.cap);
        self.buf.drain(..overflow);
        self.buf.extend(data);
    }

    pub(crate) fn into_vec(self) -> Vec<u8> {
        Vec::from(self.buf)
    }
}

/// A full-output file that stops growing at `max` bytes.
#[derive(Debug)]
pub(crate) struct LogFile {
    path: PathBuf,
    file: File,
    max: u64,
    written: u64,
    ends_with_newline: bool,
    /// Capped or failed: nothing more is written, the pipe is still drained.
    closed: bool,
}

impl LogFile {
    pub(crate) fn open(path: &Path, max: u64) -> io::Result<LogFile> {
        let open = || {
            OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o640)
                // std opens close-on-exec anyway; said here because a log file of one task
                // must never leak into the next.
                .custom_flags(libc::O_CLOEXEC)
                .open(path)
        };
        let file = match open() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                open()?
            }
            other => other?,
        };
        // The cap is per file: a run that reuses the file (an attempt put back after a
        // shutdown or a crash keeps its number) counts what is already there.
        let written = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(LogFile {
            path: path.to_path_buf(),
            file,
            max,
            written,
            ends_with_newline: true,
            closed: false,
        })
    }

    /// Appends `data` up to the cap; past it, writes the truncation marker once.
    ///
    /// The writes are plain blocking `write(2)`s on purpose: appending to a local file lands
    /// in the page cache, and handing each 64 KiB chunk to the blocking pool would cost more
    /// than the write itself.
    pub(crate) fn write(&mut self, data: &[u8]) {
        if self.closed || data.is_empty() {
            return;
        }
        let room = self.max.saturating_sub(self.written);
        let take = data.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        if take > 0 {
            if let Err(e) = self.file.write_all(&data[..take]) {
                self.fail(e);
                return;
            }
            self.written += take as u64;
            self.ends_with_newline = data[take - 1] == b'\n';
        }
        if take < data.len() {
            let mut marker = Vec::with_capacity(64);
            if !self.ends_with_newline {
                marker.push(b'\n');
            }
            marker.extend_from_slice(
                format!("[taskd: output truncated at {} bytes]\n", self.max).as_bytes(),
            );
            if let Err(e) = self.file.write_all(&marker) {
                self.fail(e);
                return;
            }
            self.closed = true;
        }
    }

    fn fail(&mut self, error: io::Error) {
        tracing::warn!(path = %self.path.display(), error = %error, "failed to write task output log; not writing it any more");
        self.closed = true;
    }
}

/// Everything kept of one output stream.
#[derive(Debug)]
pub(crate) struct Capture {
    pub(crate) tail: Tail,
    pub(crate) total: u64,
    pub(crate) log: Option<LogFile>,
    pub(crate) lines: Option<Lines>,
    /// The attempt's live ring, for followers (`taskd logs --follow`), and which stream this is.
    pub(crate) live: Option<(std::sync::Arc<super::live::LiveOutput>, super::live::Stream)>,
}

impl Capture {
    pub(crate) fn new(tail_bytes: usize, log: Option<LogFile>) -> Self {
        Capture {
            tail: Tail::new(tail_bytes),
            total: 0,
            log,
            lines: None,
            live: None,
        }
    }

    /// Also push everything into `live`, as `stream`.
    pub(crate) fn follow(
        &mut self,
        live: Option<&std::sync::Arc<super::live::LiveOutput>>,
        stream: super::live::Stream,
    ) {
        self.live = live.map(|l| (l.clone(), stream));
    }

    pub(crate) fn push(&mut self, data: &[u8]) {
        self.total += data.len() as u64;
        self.tail.push(data);
        if let Some(log) = &mut self.log {
            log.write(data);
        }
        if let Some(lines) = &mut self.lines {
            lines.push(data);
        }
        if let Some((live, stream)) = &self.live {
            live.push(*stream, data);
        }
    }

    /// The stream ended: emit a last line that had no newline.
    pub(crate) fn finish(&mut self) {
        if let Some(lines) = &mut self.lines {
            lines.flush();
        }
    }
}

/// Splits output into lines and emits each as a log event (`taskd::output`). A line longer
/// than [`MAX_LINE`] is emitted in pieces, so memory stays bounded.
#[derive(Debug)]
pub(crate) struct Lines {
    stream: &'static str,
    partial: Vec<u8>,
}

const MAX_LINE: usize = 8 * 1024;

impl Lines {
    pub(crate) fn new(stream: &'static str) -> Self {
        Lines {
            stream,
            partial: Vec::new(),
        }
    }

    fn emit(&self, line: &[u8]) {
        let line = String::from_utf8_lossy(line);
        let line = line.trim_end_matches('\r');
        tracing::info!(target: "taskd::output", stream = self.stream, "{line}");
    }

    pub(crate) fn push(&mut self, mut data: &[u8]) {
        while let Some(i) = data.iter().position(|b| *b == b'\n') {
            if self.partial.is_empty() {
                self.emit(&data[..i]);
            } else {
                self.partial.extend_from_slice(&data[..i]);
                let line = std::mem::take(&mut self.partial);
                self.emit(&line);
            }
            data = &data[i + 1..];
        }
        self.partial.extend_from_slice(data);
        while self.partial.len() >= MAX_LINE {
            let rest = self.partial.split_off(MAX_LINE);
            let piece = std::mem::replace(&mut self.partial, rest);
            self.emit(&piece);
        }
    }

    pub(crate) fn flush(&mut self) {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.emit(&line);
        }
    }
}

/// Reads `pipe` to EOF into `cap`.
///
/// Cancel-safe: whatever was read before the future is dropped is already in `cap`.
pub(crate) async fn pump<R: AsyncRead + Unpin>(pipe: Option<R>, cap: &mut Capture) {
    let Some(mut pipe) = pipe else { return };
    // Start small and grow only for a task that fills the buffer: most tasks print little,
    // and a fresh 64 KiB buffer per stream per task costs more (zeroing, brk/munmap churn)
    // than reading their output.
    let mut buf = vec![0u8; FIRST_READ_CHUNK];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) => {
                cap.finish();
                return;
            }
            Ok(n) => {
                cap.push(&buf[..n]);
                if n == buf.len() && buf.len() < READ_CHUNK {
                    buf.resize(READ_CHUNK, 0);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::debug!(error = %e, "reading task output failed; treating it as EOF");
                cap.finish();
                return;
            }
        }
    }
}

/// Writes `data` to the child's stdin, then closes it.
///
/// A child that exits without reading gives EPIPE, which is its business, not an error of
/// taskd. The caller polls this alongside everything else and drops it when the task ends,
/// so a child that never reads cannot hold us up.
pub(crate) async fn feed<W: AsyncWrite + Unpin>(stdin: Option<W>, data: &[u8]) {
    if let Some(mut stdin) = stdin {
        if let Err(e) = stdin.write_all(data).await {
            tracing::trace!(error = %e, "task did not read all of its stdin");
        }
        // Dropping `stdin` closes the pipe: the child sees EOF.
    }
}
