//! The logical replication stream: `START_REPLICATION ... LOGICAL` on a replication connection,
//! read by a background task that owns the socket.
//!
//! The task exists so the connection stays healthy whatever the consumer does. It reads CopyData
//! frames into a `BytesMut` and slices every XLogData payload out of it as `Bytes` (no copy),
//! forwards everything one read produced as one chunk over a bounded channel, answers keepalives
//! that request a reply, and sends standby status updates every `status_interval` and right after
//! [`ReplicationStream::confirm`] moves the confirmed position.
//!
//! Backpressure: when the channel is full the task collects what it reads into one pending chunk
//! (answering keepalives found in it) up to a few MiB, then stops reading the socket (so memory
//! stays bounded and the server's send buffer fills up, which is how Postgres throttles a
//! walsender) but keeps sending status updates on its timer. The walsender's `wal_sender_timeout` only
//! measures time since the last message *from* us, so those timed updates keep the connection
//! alive even while keepalives queue unread behind WAL data: `status_interval` must stay well
//! below the server's `wal_sender_timeout` (default 60 s; ours defaults to 10 s).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;

use super::config::SourceConfig;
use super::connection::{MAX_MESSAGE_LEN, ReplicationConnection, Transport};
use super::error::{ReplicationError, ServerError};
use crate::lsn::Lsn;

const COPY_DATA_TAG: u8 = b'd';
const COPY_DONE_TAG: u8 = b'c';
const COMMAND_COMPLETE_TAG: u8 = b'C';
const READY_FOR_QUERY_TAG: u8 = b'Z';
const ERROR_RESPONSE_TAG: u8 = b'E';
const NOTICE_RESPONSE_TAG: u8 = b'N';
const PARAMETER_STATUS_TAG: u8 = b'S';
/// CopyData sub-messages of the streaming replication protocol.
const XLOG_DATA_TAG: u8 = b'w';
const PRIMARY_KEEPALIVE_TAG: u8 = b'k';
const STANDBY_STATUS_UPDATE_TAG: u8 = b'r';

/// Frame header (tag + length) plus the XLogData header (tag, start, end, clock).
const XLOG_DATA_PAYLOAD_OFFSET: usize = 5 + 1 + 8 + 8 + 8;
/// Frame header plus the keepalive body (tag, end, clock, reply flag).
const KEEPALIVE_FRAME_LEN: usize = 5 + 1 + 8 + 8 + 1;
/// Seconds from the Unix epoch to the Postgres epoch, 2000-01-01.
const POSTGRES_EPOCH_UNIX_SECS: u64 = 946_684_800;
/// How long `shutdown` waits for the server to acknowledge the end of the stream.
const SHUTDOWN_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// One message of the replication stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalMessage {
    /// WAL data: one pgoutput message, a zero-copy slice of the socket read buffer.
    XLogData {
        /// WAL position where this message starts.
        wal_start: Lsn,
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// The pgoutput message bytes.
        data: Bytes,
    },
    /// A primary keepalive. Confirming its `wal_end` when no transaction is in flight lets the
    /// slot advance past WAL that contains nothing for this publication.
    KeepAlive {
        /// The server's current end of WAL.
        wal_end: Lsn,
    },
}

/// Tuning for [`ReplicationStream::start`].
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// Maximum time between standby status updates. Must be well below the server's
    /// `wal_sender_timeout`. Default 10 s.
    pub status_interval: Duration,
    /// How many chunks may wait in the channel before the reader stops reading the socket.
    /// Default 16.
    pub channel_capacity: usize,
    /// Ask pgoutput for logical decoding messages (`messages 'true'`, Postgres 14 and later),
    /// which the backfill's watermarks are. Default off.
    pub messages: bool,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            status_interval: Duration::from_secs(10),
            channel_capacity: 16,
            messages: false,
        }
    }
}

/// State shared between the consumer handle and the socket task.
struct Shared {
    /// Highest LSN the consumer confirmed (flush = apply position reported to the server).
    confirmed: AtomicU64,
    /// Woken when `confirmed` grows, so the task reports it promptly.
    confirmed_moved: Notify,
}

/// A running logical replication stream. Drop it or call [`ReplicationStream::shutdown`] to end
/// it; dropping also ends the stream cleanly, but in the background.
pub struct ReplicationStream {
    receiver: mpsc::Receiver<Result<Vec<WalMessage>, ReplicationError>>,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ReplicationError>>,
}

impl ReplicationStream {
    /// Connects, starts streaming `slot` from `start` (`Lsn::ZERO` = from the slot's
    /// `confirmed_flush_lsn`) with pgoutput protocol version 1 for `publication`, and spawns the
    /// socket task.
    pub async fn start(
        source: &SourceConfig,
        slot: &str,
        publication: &str,
        start: Lsn,
        options: StreamOptions,
    ) -> Result<ReplicationStream, ReplicationError> {
        let mut connection = ReplicationConnection::connect(source).await?;
        let status_interval = match connection.query_value("SHOW wal_sender_timeout").await? {
            Some(text) => safe_status_interval(options.status_interval, &text),
            None => options.status_interval,
        };
        connection
            .start_copy_both(&start_replication_command(
                slot,
                publication,
                start,
                options.messages,
            ))
            .await?;

        let shared = Arc::new(Shared {
            // Reporting `start` (rather than 0/0) as the initial flush position means a status
            // update sent before the first confirm never claims less than we asked to skip.
            confirmed: AtomicU64::new(start.0),
            confirmed_moved: Notify::new(),
        });
        let (sender, receiver) = mpsc::channel(options.channel_capacity.max(1));
        let (stop, stop_requested) = oneshot::channel();
        let ReplicationConnection {
            transport,
            read_buf,
            target,
        } = connection;
        let (reader, writer) = tokio::io::split(transport);
        let task = StreamTask {
            reader,
            writer,
            read_buf,
            write_buf: BytesMut::with_capacity(64),
            sender,
            shared: shared.clone(),
            target,
            received: start.0,
            reported_flush: 0,
        };
        let task = tokio::spawn(task.run(status_interval, stop_requested));
        Ok(ReplicationStream {
            receiver,
            shared,
            stop: Some(stop),
            task,
        })
    }

    /// Next chunk of messages (everything one socket read produced, so the consumer pays one
    /// channel hop per chunk, not per message). `None` = the stream ended cleanly. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Result<Vec<WalMessage>, ReplicationError>> {
        self.receiver.recv().await
    }

    /// Confirms everything up to `lsn` as processed (reported as the flush and apply position).
    /// Never moves backwards. Reported to the server promptly and at least every
    /// `status_interval`.
    pub fn confirm(&self, lsn: Lsn) {
        let previous = self.shared.confirmed.fetch_max(lsn.0, Ordering::AcqRel);
        if lsn.0 > previous {
            self.shared.confirmed_moved.notify_one();
        }
    }

    /// The highest position confirmed so far.
    pub fn confirmed(&self) -> Lsn {
        Lsn(self.shared.confirmed.load(Ordering::Acquire))
    }

    /// Sends a final status update with the confirmed LSN, ends the COPY (CopyDone) and closes
    /// the connection. An error the stream already delivered through `recv` is not repeated.
    pub async fn shutdown(mut self) -> Result<(), ReplicationError> {
        if let Some(stop) = self.stop.take() {
            // If the task already ended, there is nobody to tell.
            let _ = stop.send(());
        }
        // Unblock a task waiting for channel space so it sees the stop request.
        self.receiver.close();
        match (&mut self.task).await {
            Ok(result) => result,
            Err(_) => Err(ReplicationError::TaskFailed),
        }
    }
}

/// The status interval to use against a server whose `wal_sender_timeout` is `timeout_text`
/// (as `SHOW` prints it: `60s`, `1min`, `500ms`, `0` = disabled): at most a third of the timeout,
/// so a stalled consumer's timed updates always arrive in time.
fn safe_status_interval(requested: Duration, timeout_text: &str) -> Duration {
    let Some(timeout) = parse_postgres_duration(timeout_text) else {
        return requested;
    };
    if timeout.is_zero() {
        return requested;
    }
    let limit = timeout / 3;
    if requested > limit {
        tracing::warn!(
            requested = ?requested,
            wal_sender_timeout = timeout_text,
            using = ?limit,
            "status_interval too close to the server's wal_sender_timeout; lowering it"
        );
        limit
    } else {
        requested
    }
}

/// Parses a time setting as Postgres prints it: an integer and a unit (`ms`, `s`, `min`, `h`,
/// `d`; milliseconds without one).
fn parse_postgres_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let millis_per_unit = match unit.trim() {
        "" | "ms" => 1,
        "s" => 1_000,
        "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    Some(Duration::from_millis(number.checked_mul(millis_per_unit)?))
}

/// `START_REPLICATION SLOT "slot" LOGICAL X/Y (proto_version '1', publication_names '"pub"')`,
/// with `, messages 'true'` when logical messages are wanted.
fn start_replication_command(slot: &str, publication: &str, start: Lsn, messages: bool) -> String {
    format!(
        "START_REPLICATION SLOT {} LOGICAL {start} (proto_version '1', publication_names {}{})",
        quote_identifier(slot),
        // publication_names is a list of identifiers inside a string literal.
        quote_literal(&quote_identifier(publication)),
        if messages { ", messages 'true'" } else { "" },
    )
}

pub(crate) fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A frame of the CopyBoth phase, parsed out of the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum StreamFrame {
    Wal(WalMessage),
    KeepAlive {
        wal_end: Lsn,
        reply_requested: bool,
    },
    CopyDone,
    CommandComplete,
    ReadyForQuery,
    Error(ServerError),
    /// Notices and parameter changes, which need no action.
    Ignored,
}

fn read_u64(frame: &[u8], offset: usize) -> Option<u64> {
    Some(u64::from_be_bytes(
        frame.get(offset..offset + 8)?.try_into().ok()?,
    ))
}

/// Parses one frame off the front of `buf`; `Ok(None)` if it is not complete yet (and then
/// reserves room for it). XLogData payloads are split off the buffer without copying.
pub(crate) fn parse_frame(buf: &mut BytesMut) -> Result<Option<StreamFrame>, ReplicationError> {
    let Some(header) = buf.get(..5) else {
        return Ok(None);
    };
    let tag = header[0];
    let declared = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    let total = usize::try_from(declared)
        .ok()
        .filter(|len| (4..=MAX_MESSAGE_LEN).contains(len))
        .ok_or_else(|| {
            ReplicationError::Protocol(format!("frame length {declared} out of range"))
        })?
        + 1;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let frame = match tag {
        COPY_DATA_TAG => {
            let frame = buf.split_to(total).freeze();
            match frame.get(5) {
                Some(&XLOG_DATA_TAG) => {
                    let (Some(wal_start), Some(wal_end)) =
                        (read_u64(&frame, 6), read_u64(&frame, 14))
                    else {
                        return Err(ReplicationError::Protocol(
                            "truncated XLogData header".into(),
                        ));
                    };
                    if frame.len() < XLOG_DATA_PAYLOAD_OFFSET {
                        return Err(ReplicationError::Protocol(
                            "truncated XLogData header".into(),
                        ));
                    }
                    StreamFrame::Wal(WalMessage::XLogData {
                        wal_start: Lsn(wal_start),
                        wal_end: Lsn(wal_end),
                        data: frame.slice(XLOG_DATA_PAYLOAD_OFFSET..),
                    })
                }
                Some(&PRIMARY_KEEPALIVE_TAG) => {
                    if frame.len() != KEEPALIVE_FRAME_LEN {
                        return Err(ReplicationError::Protocol(format!(
                            "keepalive of {} bytes, expected {KEEPALIVE_FRAME_LEN}",
                            frame.len()
                        )));
                    }
                    StreamFrame::KeepAlive {
                        wal_end: Lsn(read_u64(&frame, 6).unwrap_or_default()),
                        reply_requested: frame.get(KEEPALIVE_FRAME_LEN - 1) == Some(&1),
                    }
                }
                Some(other) => {
                    return Err(ReplicationError::Protocol(format!(
                        "unknown CopyData message {:?}",
                        char::from(*other)
                    )));
                }
                None => return Err(ReplicationError::Protocol("empty CopyData".into())),
            }
        }
        ERROR_RESPONSE_TAG => match Message::parse(buf) {
            Ok(Some(Message::ErrorResponse(body))) => {
                StreamFrame::Error(ServerError::from_fields(body.fields())?)
            }
            _ => return Err(ReplicationError::Protocol("malformed ErrorResponse".into())),
        },
        other => {
            let _ = buf.split_to(total);
            match other {
                COPY_DONE_TAG => StreamFrame::CopyDone,
                COMMAND_COMPLETE_TAG => StreamFrame::CommandComplete,
                READY_FOR_QUERY_TAG => StreamFrame::ReadyForQuery,
                NOTICE_RESPONSE_TAG | PARAMETER_STATUS_TAG => StreamFrame::Ignored,
                other => {
                    return Err(ReplicationError::Protocol(format!(
                        "unexpected message {:?} during replication",
                        char::from(other)
                    )));
                }
            }
        }
    };
    Ok(Some(frame))
}

/// Appends a Standby Status Update (CopyData 'r') to `out`.
fn encode_status_update(out: &mut BytesMut, write: Lsn, flush: Lsn, reply_requested: bool) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let micros = now
        .as_micros()
        .saturating_sub(u128::from(POSTGRES_EPOCH_UNIX_SECS) * 1_000_000);
    let clock = i64::try_from(micros).unwrap_or(i64::MAX);
    out.put_u8(COPY_DATA_TAG);
    out.put_u32(4 + 1 + 8 + 8 + 8 + 8 + 1);
    out.put_u8(STANDBY_STATUS_UPDATE_TAG);
    out.put_u64(write.0);
    out.put_u64(flush.0);
    out.put_u64(flush.0); // apply: the consumer's confirmation is also its apply position
    out.put_i64(clock);
    out.put_u8(u8::from(reply_requested));
}

/// How many bytes of WAL frames the task keeps reading while the channel is full. Beyond it the
/// socket is left unread and TCP flow control throttles the walsender.
const MAX_PENDING_BYTES: usize = 4 << 20;

/// Messages read while the channel was full, delivered as one chunk when room frees up.
struct Pending {
    messages: Vec<WalMessage>,
    /// Wire bytes of the frames in `messages`.
    bytes: usize,
}

impl Pending {
    /// Appends `messages` (read from `bytes` wire bytes) to the pending chunk, creating it.
    fn stash(pending: &mut Option<Pending>, messages: Vec<WalMessage>, bytes: usize) {
        if messages.is_empty() {
            return;
        }
        match pending {
            Some(existing) => {
                existing.messages.extend(messages);
                existing.bytes += bytes;
            }
            None => *pending = Some(Pending { messages, bytes }),
        }
    }
}

/// What woke the socket loop.
enum Event {
    Stop,
    ConfirmMoved,
    Tick,
    Delivered,
    Read(std::io::Result<usize>),
}

/// What the socket loop should do after handling one read.
enum ReadOutcome {
    Continue,
    /// The server ended the stream (CopyDone) and the COPY is fully closed.
    Ended,
}

struct StreamTask {
    reader: ReadHalf<Transport>,
    writer: WriteHalf<Transport>,
    read_buf: BytesMut,
    write_buf: BytesMut,
    sender: mpsc::Sender<Result<Vec<WalMessage>, ReplicationError>>,
    shared: Arc<Shared>,
    target: String,
    /// Highest WAL end seen from the server (reported as the write position).
    received: u64,
    /// Flush position in the last status update sent.
    reported_flush: u64,
}

impl StreamTask {
    async fn run(
        mut self,
        status_interval: Duration,
        mut stop_requested: oneshot::Receiver<()>,
    ) -> Result<(), ReplicationError> {
        let mut ticker = tokio::time::interval(status_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let shared = self.shared.clone();
        // Messages the channel had no room for. They grow up to MAX_PENDING_BYTES (so
        // keepalives in that data are still answered), then the socket is left unread.
        let mut pending: Option<Pending> = None;
        let result = loop {
            let event = tokio::select! {
                biased;
                // Dropping the handle closes this too: end the stream cleanly either way.
                _ = &mut stop_requested => Event::Stop,
                _ = shared.confirmed_moved.notified() => Event::ConfirmMoved,
                _ = ticker.tick() => Event::Tick,
                permit = self.sender.reserve(), if pending.is_some() => match permit {
                    Ok(permit) => {
                        let messages = pending.take().map(|p| p.messages).unwrap_or_default();
                        permit.send(Ok(messages));
                        Event::Delivered
                    }
                    // The consumer is gone; say goodbye to the server.
                    Err(_) => Event::Stop,
                },
                read = self.reader.read_buf(&mut self.read_buf),
                    if pending.as_ref().is_none_or(|p| p.bytes < MAX_PENDING_BYTES) => Event::Read(read),
            };
            let step = match event {
                Event::Stop => return self.finish().await,
                Event::ConfirmMoved => self.send_status(false).await.map(|_| ReadOutcome::Continue),
                Event::Tick => self.send_status(true).await.map(|_| ReadOutcome::Continue),
                Event::Delivered => Ok(ReadOutcome::Continue),
                Event::Read(Ok(0)) => Err(ReplicationError::Closed {
                    target: self.target.clone(),
                }),
                Event::Read(Ok(_)) => self.process_buffer(&mut pending).await,
                Event::Read(Err(source)) => Err(ReplicationError::Io {
                    target: self.target.clone(),
                    source,
                }),
            };
            match step {
                Ok(ReadOutcome::Continue) => {
                    if self.read_buf.capacity() - self.read_buf.len() < 4096 {
                        self.read_buf.reserve(64 * 1024);
                    }
                }
                Ok(ReadOutcome::Ended) => break Ok(()),
                Err(error) => break Err(error),
            }
        };
        // Deliver what was read before the end, then the error; the consumer may be gone.
        if let Some(pending) = pending.take() {
            let _ = self.sender.send(Ok(pending.messages)).await;
        }
        if let Err(error) = result {
            let _ = self.sender.send(Err(error)).await;
        }
        Ok(())
    }

    /// Parses every complete frame in the read buffer into one chunk and forwards it.
    async fn process_buffer(
        &mut self,
        pending: &mut Option<Pending>,
    ) -> Result<ReadOutcome, ReplicationError> {
        let mut chunk = Vec::new();
        let buffered = self.read_buf.len();
        let mut outcome = ReadOutcome::Continue;
        while let Some(frame) = parse_frame(&mut self.read_buf)? {
            match frame {
                StreamFrame::Wal(message) => {
                    if let WalMessage::XLogData { wal_end, .. } = &message {
                        self.received = self.received.max(wal_end.0);
                    }
                    chunk.push(message);
                }
                StreamFrame::KeepAlive {
                    wal_end,
                    reply_requested,
                } => {
                    self.received = self.received.max(wal_end.0);
                    if reply_requested {
                        self.send_status(true).await?;
                    }
                    chunk.push(WalMessage::KeepAlive { wal_end });
                }
                StreamFrame::Error(error) => {
                    Pending::stash(pending, chunk, 0);
                    return Err(ReplicationError::Server(error));
                }
                StreamFrame::CopyDone => {
                    // The server ended the stream: close our side and wait for the end of the
                    // command.
                    self.write_buf.clear();
                    frontend::copy_done(&mut self.write_buf);
                    self.flush_write_buf().await?;
                    self.drain_until_ready().await?;
                    outcome = ReadOutcome::Ended;
                    break;
                }
                StreamFrame::CommandComplete
                | StreamFrame::ReadyForQuery
                | StreamFrame::Ignored => {}
            }
        }
        let consumed = buffered.saturating_sub(self.read_buf.len());
        if !chunk.is_empty() {
            if pending.is_some() {
                Pending::stash(pending, chunk, consumed);
            } else {
                match self.sender.try_send(Ok(chunk)) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(Ok(chunk))) => {
                        Pending::stash(pending, chunk, consumed)
                    }
                    // Consumer gone: nothing more to deliver; the stop path closes up.
                    Err(_) => {}
                }
            }
        }
        Ok(outcome)
    }

    /// Sends a status update when forced (timer, reply request) or when the confirmed position
    /// moved since the last one.
    async fn send_status(&mut self, force: bool) -> Result<(), ReplicationError> {
        let flush = self.shared.confirmed.load(Ordering::Acquire);
        if !force && flush <= self.reported_flush {
            return Ok(());
        }
        self.write_buf.clear();
        // Written = flushed: reporting the received WAL end as written would tell a server
        // that counted us as a synchronous standby that data is safe which we have not handled.
        encode_status_update(&mut self.write_buf, Lsn(flush), Lsn(flush), false);
        self.flush_write_buf().await?;
        self.reported_flush = flush;
        Ok(())
    }

    async fn flush_write_buf(&mut self) -> Result<(), ReplicationError> {
        let target = &self.target;
        let io = |source| ReplicationError::Io {
            target: target.clone(),
            source,
        };
        self.writer.write_all(&self.write_buf).await.map_err(io)?;
        self.writer.flush().await.map_err(io)
    }

    /// Reads and discards frames until ReadyForQuery ends the START_REPLICATION command.
    async fn drain_until_ready(&mut self) -> Result<(), ReplicationError> {
        loop {
            while let Some(frame) = parse_frame(&mut self.read_buf)? {
                match frame {
                    StreamFrame::ReadyForQuery => return Ok(()),
                    StreamFrame::Error(error) => return Err(ReplicationError::Server(error)),
                    _ => {}
                }
            }
            if self.read_buf.capacity() - self.read_buf.len() < 4096 {
                self.read_buf.reserve(64 * 1024);
            }
            let read = self
                .reader
                .read_buf(&mut self.read_buf)
                .await
                .map_err(|source| ReplicationError::Io {
                    target: self.target.clone(),
                    source,
                })?;
            if read == 0 {
                return Err(ReplicationError::Closed {
                    target: self.target.clone(),
                });
            }
        }
    }

    /// Clean end: final status with the confirmed position, CopyDone, wait for the server to
    /// finish the command, Terminate.
    async fn finish(mut self) -> Result<(), ReplicationError> {
        self.send_status(true).await?;
        self.write_buf.clear();
        frontend::copy_done(&mut self.write_buf);
        self.flush_write_buf().await?;
        // WAL the server sent before it saw CopyDone is discarded: it was never confirmed, so it
        // will be sent again on the next start.
        match tokio::time::timeout(SHUTDOWN_DRAIN_TIMEOUT, self.drain_until_ready()).await {
            Ok(result) => result?,
            Err(_) => {
                tracing::warn!(target = %self.target, "server did not end the replication stream in time")
            }
        }
        self.write_buf.clear();
        frontend::terminate(&mut self.write_buf);
        // The server may already have closed its side after Terminate; that is fine.
        let _ = self.flush_write_buf().await;
        let _ = self.writer.shutdown().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy_data(body: &[u8]) -> Vec<u8> {
        let mut frame = vec![COPY_DATA_TAG];
        frame.extend_from_slice(&u32::try_from(body.len() + 4).unwrap().to_be_bytes());
        frame.extend_from_slice(body);
        frame
    }

    fn xlog_data(start: u64, end: u64, payload: &[u8]) -> Vec<u8> {
        let mut body = vec![XLOG_DATA_TAG];
        body.extend_from_slice(&start.to_be_bytes());
        body.extend_from_slice(&end.to_be_bytes());
        body.extend_from_slice(&42i64.to_be_bytes());
        body.extend_from_slice(payload);
        copy_data(&body)
    }

    fn keepalive(end: u64, reply: bool) -> Vec<u8> {
        let mut body = vec![PRIMARY_KEEPALIVE_TAG];
        body.extend_from_slice(&end.to_be_bytes());
        body.extend_from_slice(&7i64.to_be_bytes());
        body.push(u8::from(reply));
        copy_data(&body)
    }

    #[test]
    fn parses_xlog_data_and_keepalives_without_copying() {
        let mut wire = xlog_data(0x10, 0x20, b"BEGIN-payload");
        wire.extend(keepalive(0x30, true));
        wire.extend(xlog_data(0x40, 0x50, b""));
        let mut buf = BytesMut::from(&wire[..]);
        let base = buf.as_ptr() as usize;

        let Some(StreamFrame::Wal(WalMessage::XLogData {
            wal_start,
            wal_end,
            data,
        })) = parse_frame(&mut buf).unwrap()
        else {
            panic!("expected XLogData");
        };
        assert_eq!((wal_start, wal_end), (Lsn(0x10), Lsn(0x20)));
        assert_eq!(&data[..], b"BEGIN-payload");
        // The payload points into the original buffer: it was sliced, not copied.
        assert_eq!(data.as_ptr() as usize, base + XLOG_DATA_PAYLOAD_OFFSET);

        assert_eq!(
            parse_frame(&mut buf).unwrap(),
            Some(StreamFrame::KeepAlive {
                wal_end: Lsn(0x30),
                reply_requested: true
            })
        );
        assert_eq!(
            parse_frame(&mut buf).unwrap(),
            Some(StreamFrame::Wal(WalMessage::XLogData {
                wal_start: Lsn(0x40),
                wal_end: Lsn(0x50),
                data: Bytes::new()
            }))
        );
        assert_eq!(parse_frame(&mut buf).unwrap(), None);
        assert!(buf.is_empty());
    }

    #[test]
    fn waits_for_incomplete_frames() {
        let wire = xlog_data(1, 2, b"abcdef");
        for cut in 0..wire.len() {
            let mut buf = BytesMut::from(&wire[..cut]);
            assert_eq!(parse_frame(&mut buf).unwrap(), None, "cut at {cut}");
            assert_eq!(buf.len(), cut);
        }
    }

    #[test]
    fn rejects_malformed_frames() {
        let malformed: Vec<Vec<u8>> = vec![
            // length below the 4 bytes of the length field itself
            vec![COPY_DATA_TAG, 0, 0, 0, 3],
            // length beyond any real message
            vec![COPY_DATA_TAG, 0xff, 0xff, 0xff, 0xff],
            // empty CopyData
            copy_data(&[]),
            // XLogData with a header cut short
            copy_data(&[XLOG_DATA_TAG, 0, 0, 0, 0, 0, 0, 0, 1, 0]),
            // keepalive without its reply flag
            copy_data(&[
                PRIMARY_KEEPALIVE_TAG,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                1,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
            ]),
            // unknown CopyData kind
            copy_data(b"x123"),
            // a message that cannot occur during replication
            vec![b'D', 0, 0, 0, 4],
        ];
        for wire in malformed {
            let mut buf = BytesMut::from(&wire[..]);
            assert!(
                matches!(parse_frame(&mut buf), Err(ReplicationError::Protocol(_))),
                "{wire:?} was accepted"
            );
        }
    }

    #[test]
    fn encodes_standby_status_update() {
        let mut out = BytesMut::new();
        encode_status_update(&mut out, Lsn(0x1_0000_0002), Lsn(0x1_0000_0001), true);
        assert_eq!(out.len(), 1 + 4 + 1 + 8 * 4 + 1);
        assert_eq!(
            &out[..6],
            &[COPY_DATA_TAG, 0, 0, 0, 38, STANDBY_STATUS_UPDATE_TAG]
        );
        assert_eq!(read_u64(&out, 6), Some(0x1_0000_0002));
        assert_eq!(read_u64(&out, 14), Some(0x1_0000_0001));
        assert_eq!(read_u64(&out, 22), Some(0x1_0000_0001));
        assert_eq!(out[out.len() - 1], 1);
    }

    #[test]
    fn status_interval_stays_below_wal_sender_timeout() {
        let ten = Duration::from_secs(10);
        assert_eq!(safe_status_interval(ten, "1min"), ten);
        assert_eq!(safe_status_interval(ten, "60s"), ten);
        assert_eq!(safe_status_interval(ten, "15s"), Duration::from_secs(5));
        assert_eq!(
            safe_status_interval(ten, "1500ms"),
            Duration::from_millis(500)
        );
        assert_eq!(safe_status_interval(ten, "0"), ten);
        assert_eq!(safe_status_interval(ten, "garbage"), ten);
        assert_eq!(
            parse_postgres_duration("2h"),
            Some(Duration::from_secs(7200))
        );
        assert_eq!(parse_postgres_duration("99999999999999999999d"), None);
    }

    #[test]
    fn start_command_quotes_names() {
        assert_eq!(
            start_replication_command("my\"slot", "Pub's", Lsn(0x16_B374_D848), false),
            "START_REPLICATION SLOT \"my\"\"slot\" LOGICAL 16/B374D848 (proto_version '1', publication_names '\"Pub''s\"')"
        );
        assert_eq!(
            start_replication_command("s", "p", Lsn(1), true),
            "START_REPLICATION SLOT \"s\" LOGICAL 0/1 (proto_version '1', publication_names '\"p\"', messages 'true')"
        );
    }
}
