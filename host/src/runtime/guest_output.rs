//! The guest's stdout and stderr: each complete line becomes a `tracing` event tagged with the
//! pipeline/plugin name, and the tail of stderr is kept so a trap report can include the text a
//! Rust guest prints when it panics.
//!
//! A guest has no terminal and no files; whatever it prints is meant for the operator, so it
//! goes to the host log (stdout at `info`, stderr at `warn`). Writes are handled synchronously
//! under a short mutex: printing is rare and small next to the work of a batch.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use super::log_budget::{Admission, LogBudget, report_dropped};

/// A line longer than this is logged in pieces, so a guest printing without newlines cannot
/// make the host buffer without bound.
const MAX_LINE_BYTES: usize = 8 * 1024;

/// How much of the latest stderr output is kept for a trap report.
const STDERR_TAIL_BYTES: usize = 4 * 1024;

/// How many bytes the guest may write in one go (WASI `check-write`).
const WRITE_BUDGET: usize = 64 * 1024;

/// Which of the two streams this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamKind {
    Stdout,
    Stderr,
}

/// One guest output stream; clones share the same buffer.
#[derive(Clone)]
pub(crate) struct GuestOutput {
    state: Arc<Mutex<OutputState>>,
}

struct OutputState {
    kind: StreamKind,
    log_target: Arc<str>,
    /// Shared with the instance's other stream and its `log` import.
    budget: Arc<LogBudget>,
    /// The current, not yet terminated line.
    line: Vec<u8>,
    /// The last bytes written to stderr since the last [`GuestOutput::take_tail`].
    tail: VecDeque<u8>,
}

impl GuestOutput {
    pub(crate) fn new(
        kind: StreamKind,
        log_target: Arc<str>,
        budget: Arc<LogBudget>,
    ) -> GuestOutput {
        GuestOutput {
            state: Arc::new(Mutex::new(OutputState {
                kind,
                log_target,
                budget,
                line: Vec::new(),
                tail: VecDeque::new(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, OutputState> {
        // Logging never panics while holding the lock, but a poisoned lock must not take the
        // guest's output down with it either.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Returns what the guest wrote to this stream since the last call (at most the last
    /// few KiB, only recorded for stderr), logging any unterminated last line first.
    pub(crate) fn take_tail(&self) -> String {
        let mut state = self.lock();
        state.flush_line();
        let tail: Vec<u8> = state.tail.drain(..).collect();
        String::from_utf8_lossy(&tail).into_owned()
    }

    /// Forgets the recorded tail, at the start of a call.
    pub(crate) fn clear_tail(&self) {
        self.lock().tail.clear();
    }

    fn write_bytes(&self, bytes: &[u8]) {
        let mut state = self.lock();
        if state.kind == StreamKind::Stderr {
            state.tail.extend(bytes);
            let excess = state.tail.len().saturating_sub(STDERR_TAIL_BYTES);
            state.tail.drain(..excess);
        }
        let mut rest = bytes;
        while let Some(newline) = rest.iter().position(|&byte| byte == b'\n') {
            let (line, after) = rest.split_at(newline);
            state.line.extend_from_slice(line);
            state.flush_line();
            rest = &after[1..];
        }
        state.line.extend_from_slice(rest);
        if state.line.len() >= MAX_LINE_BYTES {
            state.flush_line();
        }
    }
}

impl OutputState {
    fn flush_line(&mut self) {
        if self.line.is_empty() {
            return;
        }
        let plugin = &*self.log_target;
        match self.budget.admit() {
            Admission::Drop => {
                self.line.clear();
                return;
            }
            Admission::Log { dropped } => report_dropped(plugin, dropped),
        }
        let text = String::from_utf8_lossy(&self.line);
        let text = text.trim_end_matches('\r');
        match self.kind {
            StreamKind::Stdout => {
                tracing::info!(target: "pgstream::plugin", plugin, stream = "stdout", "{text}")
            }
            StreamKind::Stderr => {
                tracing::warn!(target: "pgstream::plugin", plugin, stream = "stderr", "{text}")
            }
        }
        self.line.clear();
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.write_bytes(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_BUDGET)
    }
}

#[async_trait::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl AsyncWrite for GuestOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.write_bytes(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stderr_tail_keeps_the_latest_bytes_across_partial_writes() {
        let output = GuestOutput::new(
            StreamKind::Stderr,
            Arc::from("p/plugin"),
            Arc::new(LogBudget::new()),
        );
        output.write_bytes(b"thread panicked at src/lib.rs:\nbo");
        output.write_bytes(b"om\n");
        assert_eq!(output.take_tail(), "thread panicked at src/lib.rs:\nboom\n");
        assert_eq!(output.take_tail(), "");

        let long = vec![b'x'; STDERR_TAIL_BYTES + 10];
        output.write_bytes(&long);
        output.write_bytes(b"END");
        let tail = output.take_tail();
        assert_eq!(tail.len(), STDERR_TAIL_BYTES);
        assert!(tail.ends_with("xEND"));
    }

    #[test]
    fn stdout_keeps_no_tail() {
        let output = GuestOutput::new(
            StreamKind::Stdout,
            Arc::from("p/plugin"),
            Arc::new(LogBudget::new()),
        );
        output.write_bytes(b"hello\n");
        assert_eq!(output.take_tail(), "");
    }
}
