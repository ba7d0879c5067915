//! Merges the chunks a backfill reads into the change stream, at their high watermarks (the
//! watermark method of Netflix's DBLog, as Debezium's incremental snapshots also use it).
//!
//! For each chunk the reader emits a low watermark, selects the chunk, hands its rows here and
//! emits a high watermark; both watermarks are transactional logical messages, so they take
//! their place in the commit order. Between the two, the stream carries changes that
//! committed while the chunk was being read: for any key they touch, the live event is at
//! least as new as the chunk's row, so that row is dropped. At the high watermark the rows
//! left go out as [`Operation::Read`] events, in the high watermark's transaction, so
//! confirming that transaction confirms the chunk.
//!
//! The items between the two watermarks are held back until the high one arrives (one short
//! query's worth of changes), because an update in that window that left a TOASTed column
//! `unchanged` must get the column's text from the chunk: the stored point may not exist yet
//! when the row predates the slot, and a payload-only update of it would write nothing. Holding
//! them loses nothing: none of them is confirmed until it was handled.
//!
//! Pure and synchronous: the reader's messages arrive on a channel that is only polled, so
//! every case is unit-tested without a server.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytestring::ByteString;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::event::{ChangeEvent, Operation, Relation, Value};
use crate::lsn::Lsn;
use crate::source::{LogicalMessage, SourceItem};

/// The prefix of the backfill's logical messages.
pub const WATERMARK_PREFIX: &str = "pgstream-backfill";

/// Most items held back while a chunk is open. A window that sees more (a very large
/// transaction committed while the chunk was read) is given up: its items go on unchanged
/// and the reader reads the chunk again, smaller.
pub const MAX_HELD_ITEMS: usize = 100_000;

/// The content of a watermark message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermark {
    /// The slot of the pipeline whose backfill emitted it: every slot of the database sees
    /// every message, so each pipeline keeps only its own.
    pub slot: String,
    /// The chunk, unique per reader session.
    pub chunk: u64,
    /// `low` or `high`.
    pub mark: Mark,
}

/// Which side of a chunk a watermark is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mark {
    /// Emitted before the chunk is selected.
    Low,
    /// Emitted after.
    High,
}

/// The rows of one chunk, as the reader selected them.
pub struct ChunkRows {
    /// The table, with every published column in table order; `rows` are aligned with it.
    pub relation: Arc<Relation>,
    /// The rows.
    pub rows: Vec<Vec<Value>>,
    /// Told once the high watermark's transaction is confirmed, which is when the reader may
    /// move its cursor past the chunk. Dropped unsent when the chunk was not delivered (the
    /// stream restarted, the window was given up): the reader reads the chunk again.
    pub confirmed: oneshot::Sender<ChunkOutcome>,
}

/// What became of a delivered chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkOutcome {
    /// Rows delivered as reads (the others were superseded by live changes).
    pub delivered: usize,
}

/// What the reader tells the merge, in order.
pub enum ChunkMessage {
    /// A chunk's low watermark is about to be emitted.
    Begin {
        /// The chunk.
        chunk: u64,
    },
    /// The chunk was selected; its high watermark is about to be emitted.
    Rows {
        /// The chunk.
        chunk: u64,
        /// What was read.
        rows: ChunkRows,
    },
    /// The chunk failed after its low watermark; its window must not wait for a high one.
    Abandon {
        /// The chunk.
        chunk: u64,
    },
}

/// A chunk between its watermarks.
struct Window {
    chunk: u64,
    held: Vec<SourceItem>,
}

/// The merge of one pipeline's backfill into its stream.
pub struct BackfillMerge {
    slot: String,
    control: mpsc::UnboundedReceiver<ChunkMessage>,
    /// The chunk the reader announced last: only its low watermark opens a window.
    announced: Option<u64>,
    /// Rows of announced chunks, waiting for their high watermark.
    ready: HashMap<u64, ChunkRows>,
    window: Option<Window>,
    /// A chunk delivered at a high watermark whose transaction has not committed yet.
    awaiting_commit: Option<(oneshot::Sender<ChunkOutcome>, ChunkOutcome)>,
    /// Delivered chunks by the end LSN of their high watermark's transaction.
    unconfirmed: VecDeque<(Lsn, oneshot::Sender<ChunkOutcome>, ChunkOutcome)>,
}

impl BackfillMerge {
    /// A merge for `slot`'s backfill, fed by the reader through `control`.
    pub fn new(slot: &str, control: mpsc::UnboundedReceiver<ChunkMessage>) -> BackfillMerge {
        BackfillMerge {
            slot: slot.to_owned(),
            control,
            announced: None,
            ready: HashMap::new(),
            window: None,
            awaiting_commit: None,
            unconfirmed: VecDeque::new(),
        }
    }

    /// Forgets everything in flight, for a new replication session: it replays from the last
    /// confirmed position, and the reader reads every unconfirmed chunk again.
    pub fn reset(&mut self) {
        while self.control.try_recv().is_ok() {}
        self.announced = None;
        self.ready.clear();
        self.window = None;
        self.awaiting_commit = None;
        self.unconfirmed.clear();
    }

    /// Whether `decoded` items need a pass through [`process`](Self::process): a chunk is in
    /// flight, or they hold a logical message.
    pub fn wants(&self, decoded: &[SourceItem]) -> bool {
        self.window.is_some()
            || self.awaiting_commit.is_some()
            || !self.control.is_empty()
            || decoded
                .iter()
                .any(|item| matches!(item, SourceItem::Message(_)))
    }

    /// Whether items are being held back for an open chunk.
    pub fn is_holding(&self) -> bool {
        self.window.is_some()
    }

    /// Passes `input` (drained) on to `out`, holding back what falls in an open chunk and
    /// adding each chunk's rows at its high watermark.
    pub fn process(&mut self, input: &mut Vec<SourceItem>, out: &mut Vec<SourceItem>) {
        self.poll_control(out);
        for item in input.drain(..) {
            match item {
                SourceItem::Message(message) => self.message(message, out),
                SourceItem::Commit { end_lsn } if self.window.is_none() => {
                    out.push(SourceItem::Commit { end_lsn });
                    if let Some((confirmed, outcome)) = self.awaiting_commit.take() {
                        self.unconfirmed.push_back((end_lsn, confirmed, outcome));
                    }
                }
                item => match &mut self.window {
                    Some(window) => {
                        window.held.push(item);
                        if window.held.len() > MAX_HELD_ITEMS {
                            warn!(
                                slot = %self.slot,
                                "over {MAX_HELD_ITEMS} changes committed while a backfill chunk \
                                 was read; reading the chunk again, smaller"
                            );
                            self.give_up_window(out);
                        }
                    }
                    None => out.push(item),
                },
            }
        }
    }

    /// Everything up to `lsn` was handled: tells the reader which chunks are confirmed.
    pub fn confirm(&mut self, lsn: Lsn) {
        while let Some((end_lsn, _, _)) = self.unconfirmed.front() {
            if *end_lsn > lsn {
                break;
            }
            let (_, confirmed, outcome) = self.unconfirmed.pop_front().expect("front exists");
            // The reader may be gone (shutting down); nothing to tell then.
            let _ = confirmed.send(outcome);
        }
    }

    fn poll_control(&mut self, out: &mut Vec<SourceItem>) {
        while let Ok(message) = self.control.try_recv() {
            match message {
                ChunkMessage::Begin { chunk } => self.announced = Some(chunk),
                ChunkMessage::Rows { chunk, rows } => {
                    self.ready.insert(chunk, rows);
                }
                ChunkMessage::Abandon { chunk } => {
                    self.ready.remove(&chunk);
                    if self.announced == Some(chunk) {
                        self.announced = None;
                    }
                    if self
                        .window
                        .as_ref()
                        .is_some_and(|window| window.chunk == chunk)
                    {
                        self.give_up_window(out);
                    }
                }
            }
        }
    }

    fn give_up_window(&mut self, out: &mut Vec<SourceItem>) {
        if let Some(window) = self.window.take() {
            self.ready.remove(&window.chunk);
            if self.announced == Some(window.chunk) {
                self.announced = None;
            }
            out.extend(window.held);
        }
    }

    fn message(&mut self, message: LogicalMessage, out: &mut Vec<SourceItem>) {
        if message.prefix != WATERMARK_PREFIX {
            return;
        }
        let Ok(watermark) = serde_json::from_slice::<Watermark>(&message.content) else {
            return;
        };
        if watermark.slot != self.slot {
            return;
        }
        // The reader sends a chunk's rows before it emits the high watermark, and its Begin
        // before the low one, so by the time a watermark is decoded they are on the channel.
        self.poll_control(out);
        match watermark.mark {
            Mark::Low => {
                if self.announced == Some(watermark.chunk) {
                    // A window left open by a reader that then failed is closed first.
                    self.give_up_window(out);
                    self.announced = Some(watermark.chunk);
                    self.window = Some(Window {
                        chunk: watermark.chunk,
                        held: Vec::new(),
                    });
                }
            }
            Mark::High => {
                let Some(window) = self
                    .window
                    .take_if(|window| window.chunk == watermark.chunk)
                else {
                    // A stale watermark (replayed from an earlier session): its chunk is
                    // read again by the reader, which was never told it was confirmed.
                    self.ready.remove(&watermark.chunk);
                    return;
                };
                let Some(chunk) = self.ready.remove(&watermark.chunk) else {
                    out.extend(window.held);
                    return;
                };
                let mut held = window.held;
                let reads = merge_chunk(&mut held, chunk.relation, chunk.rows, &message);
                out.extend(held);
                let outcome = ChunkOutcome {
                    delivered: reads.len(),
                };
                out.extend(reads.into_iter().map(SourceItem::Change));
                self.awaiting_commit = Some((chunk.confirmed, outcome));
            }
        }
    }
}

/// A row's key: the text of its key columns, in key order.
type Key = Vec<ByteString>;

fn key_of(relation: &Relation, row: &[Value]) -> Option<Key> {
    relation
        .columns
        .iter()
        .zip(row)
        .filter(|(column, _)| column.is_key)
        .map(|(_, value)| match value {
            Value::Text(text) => Some(text.clone()),
            Value::Null | Value::Unchanged => None,
        })
        .collect()
}

/// Drops the chunk rows that changes in `held` superseded, fills `unchanged` columns of the
/// held updates from what is known of their row, and returns the surviving rows as reads in
/// the high watermark's transaction.
fn merge_chunk(
    held: &mut [SourceItem],
    relation: Arc<Relation>,
    rows: Vec<Vec<Value>>,
    high: &LogicalMessage,
) -> Vec<ChangeEvent> {
    let same_table =
        |other: &Relation| other.schema == relation.schema && other.table == relation.table;
    // The latest full version known of each chunk key: the chunk's row, then each held change
    // of it. `None` once deleted.
    let mut latest: HashMap<Key, Option<Vec<Value>>> = HashMap::with_capacity(rows.len());
    let mut order = Vec::with_capacity(rows.len());
    for row in rows {
        if let Some(key) = key_of(&relation, &row) {
            order.push(key.clone());
            latest.insert(key, Some(row));
        }
    }
    let mut superseded: std::collections::HashSet<Key> = std::collections::HashSet::new();
    let mut truncated = false;
    for item in held.iter_mut() {
        let SourceItem::Change(event) = item else {
            continue;
        };
        if !same_table(&event.relation) {
            continue;
        }
        if event.operation == Operation::Truncate {
            truncated = true;
            latest.clear();
            continue;
        }
        let Some(key) = key_of(&event.relation, &event.row) else {
            continue;
        };
        if let Some(old_row) = &event.old_row
            && let Some(old_key) = key_of(&event.relation, old_row)
            && old_key != key
        {
            superseded.insert(old_key.clone());
            latest.insert(old_key, None);
        }
        if event.operation == Operation::Update
            && event.row.contains(&Value::Unchanged)
            && let Some(Some(known)) = latest.get(&key)
        {
            fill_unchanged(&event.relation, &mut event.row, &relation, known);
        }
        let after = match event.operation {
            Operation::Delete => None,
            _ => Some(event.row.clone()),
        };
        superseded.insert(key.clone());
        // Only chunk keys need tracking; a change of a key outside the chunk is left alone.
        if let Some(entry) = latest.get_mut(&key) {
            *entry = after;
        }
    }
    if truncated {
        return Vec::new();
    }
    order
        .into_iter()
        .filter(|key| !superseded.contains(key))
        .filter_map(|key| latest.remove(&key).flatten())
        .map(|row| ChangeEvent {
            operation: Operation::Read,
            relation: relation.clone(),
            row,
            old_row: None,
            lsn: high.commit_lsn,
            commit_time_us: high.commit_time_us,
            xid: high.xid,
        })
        .collect()
}

/// Replaces each `unchanged` value of `row` (laid out as `row_relation`) with the value of the
/// same column in `known` (laid out as `known_relation`).
fn fill_unchanged(
    row_relation: &Relation,
    row: &mut [Value],
    known_relation: &Relation,
    known: &[Value],
) {
    for (column, value) in row_relation.columns.iter().zip(row.iter_mut()) {
        if *value != Value::Unchanged {
            continue;
        }
        let position = known_relation
            .columns
            .iter()
            .position(|known_column| known_column.name == column.name);
        if let Some(known_value) = position.and_then(|at| known.get(at))
            && *known_value != Value::Unchanged
        {
            *value = known_value.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::event::Column;

    fn relation() -> Arc<Relation> {
        let column = |name: &str, is_key| Column {
            name: name.into(),
            type_oid: 25,
            is_key,
        };
        Arc::new(Relation::new(
            1,
            "public".into(),
            "docs".into(),
            vec![column("id", true), column("body", false)],
        ))
    }

    fn text(value: &str) -> Value {
        Value::Text(ByteString::from(value.to_owned()))
    }

    fn row(id: &str, body: &str) -> Vec<Value> {
        vec![text(id), text(body)]
    }

    fn change(operation: Operation, row: Vec<Value>, lsn: u64) -> SourceItem {
        SourceItem::Change(ChangeEvent {
            operation,
            relation: relation(),
            row,
            old_row: None,
            lsn: Lsn(lsn),
            commit_time_us: 0,
            xid: 7,
        })
    }

    fn watermark(chunk: u64, mark: Mark, lsn: u64) -> SourceItem {
        let content = serde_json::to_vec(&Watermark {
            slot: "s".into(),
            chunk,
            mark,
        })
        .unwrap();
        SourceItem::Message(LogicalMessage {
            prefix: WATERMARK_PREFIX.into(),
            content: Bytes::from(content),
            commit_lsn: Lsn(lsn),
            commit_time_us: 0,
            xid: 9,
        })
    }

    fn commit(lsn: u64) -> SourceItem {
        SourceItem::Commit { end_lsn: Lsn(lsn) }
    }

    /// What the pipeline would see: (operation, id, body) of each change, commits as "commit".
    fn seen(items: &[SourceItem]) -> Vec<String> {
        items
            .iter()
            .map(|item| match item {
                SourceItem::Change(event) => match event.row.as_slice() {
                    [id, body] => format!(
                        "{:?} {} {}",
                        event.operation,
                        id.as_str().unwrap_or("?"),
                        match body {
                            Value::Text(text) => text.to_string(),
                            other => format!("{other:?}"),
                        }
                    ),
                    _ => format!("{:?}", event.operation),
                },
                SourceItem::Commit { end_lsn } => format!("commit {}", end_lsn.0),
                SourceItem::Idle { position } => format!("idle {}", position.0),
                SourceItem::Message(_) => "message".into(),
            })
            .collect()
    }

    struct Harness {
        merge: BackfillMerge,
        control: mpsc::UnboundedSender<ChunkMessage>,
    }

    impl Harness {
        fn new() -> Harness {
            let (control, receiver) = mpsc::unbounded_channel();
            Harness {
                merge: BackfillMerge::new("s", receiver),
                control,
            }
        }

        fn feed(&mut self, items: Vec<SourceItem>) -> Vec<String> {
            let mut input = items;
            let mut out = Vec::new();
            self.merge.process(&mut input, &mut out);
            seen(&out)
        }

        fn rows(&self, chunk: u64, rows: Vec<Vec<Value>>) -> oneshot::Receiver<ChunkOutcome> {
            let (confirmed, receiver) = oneshot::channel();
            self.control
                .send(ChunkMessage::Rows {
                    chunk,
                    rows: ChunkRows {
                        relation: relation(),
                        rows,
                        confirmed,
                    },
                })
                .ok();
            receiver
        }
    }

    #[test]
    fn chunk_rows_come_at_the_high_watermark_minus_the_keys_changed_meanwhile() {
        let mut h = Harness::new();
        h.control.send(ChunkMessage::Begin { chunk: 1 }).ok();
        assert_eq!(
            h.feed(vec![watermark(1, Mark::Low, 10), commit(11)]),
            Vec::<String>::new()
        );
        let mut confirmed = h.rows(1, vec![row("1", "a"), row("2", "b"), row("3", "c")]);
        let out = h.feed(vec![
            change(Operation::Update, row("2", "b2"), 12),
            commit(13),
            change(Operation::Delete, vec![text("3"), Value::Null], 14),
            commit(15),
            watermark(1, Mark::High, 20),
            commit(21),
        ]);
        assert_eq!(
            out,
            [
                "commit 11",
                "Update 2 b2",
                "commit 13",
                "Delete 3 Null",
                "commit 15",
                "Read 1 a",
                "commit 21"
            ]
        );
        assert!(
            confirmed.try_recv().is_err(),
            "not confirmed before the commit is"
        );
        h.merge.confirm(Lsn(20));
        assert!(confirmed.try_recv().is_err());
        h.merge.confirm(Lsn(21));
        assert_eq!(confirmed.try_recv().unwrap(), ChunkOutcome { delivered: 1 });
    }

    #[test]
    fn an_unchanged_toasted_column_in_the_window_takes_the_chunk_text() {
        let mut h = Harness::new();
        h.control.send(ChunkMessage::Begin { chunk: 1 }).ok();
        h.feed(vec![watermark(1, Mark::Low, 10), commit(11)]);
        let _confirmed = h.rows(1, vec![row("1", "long text")]);
        let unchanged = vec![text("1"), Value::Unchanged];
        let out = h.feed(vec![
            change(Operation::Update, unchanged.clone(), 12),
            commit(13),
            change(Operation::Update, row("1", "newer"), 14),
            change(Operation::Update, unchanged, 14),
            commit(15),
            watermark(1, Mark::High, 20),
            commit(21),
        ]);
        assert_eq!(
            out,
            [
                "commit 11",
                "Update 1 long text",
                "commit 13",
                "Update 1 newer",
                "Update 1 newer",
                "commit 15",
                "commit 21"
            ]
        );
    }

    #[test]
    fn stale_and_foreign_watermarks_are_ignored() {
        let mut h = Harness::new();
        // A watermark of another slot's backfill, and one replayed from an earlier session.
        let foreign = SourceItem::Message(LogicalMessage {
            prefix: WATERMARK_PREFIX.into(),
            content: Bytes::from_static(br#"{"slot":"other","chunk":5,"mark":"low"}"#),
            commit_lsn: Lsn(1),
            commit_time_us: 0,
            xid: 1,
        });
        let out = h.feed(vec![
            foreign,
            commit(2),
            watermark(4, Mark::Low, 3),
            commit(4),
            change(Operation::Insert, row("9", "x"), 5),
            commit(6),
            watermark(4, Mark::High, 7),
            commit(8),
        ]);
        assert_eq!(
            out,
            ["commit 2", "commit 4", "Insert 9 x", "commit 6", "commit 8"]
        );
        assert!(!h.merge.is_holding());
    }

    #[test]
    fn a_restart_drops_chunks_in_flight_so_the_reader_reads_them_again() {
        let mut h = Harness::new();
        h.control.send(ChunkMessage::Begin { chunk: 1 }).ok();
        h.feed(vec![watermark(1, Mark::Low, 10), commit(11)]);
        let mut confirmed = h.rows(1, vec![row("1", "a")]);
        h.feed(vec![watermark(1, Mark::High, 20), commit(21)]);
        h.merge.reset();
        h.merge.confirm(Lsn(100));
        assert!(matches!(
            confirmed.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
    }

    #[test]
    fn an_abandoned_chunk_releases_what_its_window_held() {
        let mut h = Harness::new();
        h.control.send(ChunkMessage::Begin { chunk: 1 }).ok();
        h.feed(vec![watermark(1, Mark::Low, 10), commit(11)]);
        assert!(h.merge.is_holding());
        h.control.send(ChunkMessage::Abandon { chunk: 1 }).ok();
        let out = h.feed(vec![
            change(Operation::Insert, row("5", "e"), 12),
            commit(13),
        ]);
        assert_eq!(out, ["commit 11", "Insert 5 e", "commit 13"]);
    }

    #[test]
    fn a_truncate_in_the_window_drops_the_whole_chunk() {
        let mut h = Harness::new();
        h.control.send(ChunkMessage::Begin { chunk: 1 }).ok();
        h.feed(vec![watermark(1, Mark::Low, 10), commit(11)]);
        let mut confirmed = h.rows(1, vec![row("1", "a"), row("2", "b")]);
        let truncate = SourceItem::Change(ChangeEvent {
            operation: Operation::Truncate,
            relation: relation(),
            row: Vec::new(),
            old_row: None,
            lsn: Lsn(12),
            commit_time_us: 0,
            xid: 8,
        });
        let out = h.feed(vec![
            truncate,
            commit(13),
            watermark(1, Mark::High, 20),
            commit(21),
        ]);
        assert_eq!(out.last().unwrap(), "commit 21");
        assert_eq!(
            out.iter().filter(|line| line.starts_with("Read")).count(),
            0
        );
        h.merge.confirm(Lsn(21));
        assert_eq!(confirmed.try_recv().unwrap(), ChunkOutcome { delivered: 0 });
    }
}
