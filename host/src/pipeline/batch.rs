//! Groups a source's items into batches of [`ChangeEvent`]s and keeps the books on which
//! positions a batch makes safe to confirm.
//!
//! The rule the whole pipeline rests on: a commit's end LSN may be confirmed only once every
//! event of that transaction has been handled. A batch can end in the middle of a transaction
//! (large transactions are cut so memory stays flat); such a batch confirms only the
//! transactions it completed, and the rest is confirmed by the batch that holds their commit.
//! This type is synchronous and owns no I/O, so the rule is unit-tested here directly.

use crate::event::ChangeEvent;
use crate::lsn::Lsn;
use crate::source::SourceItem;

/// What the caller should do after feeding an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do.
    Continue,
    /// Nothing is pending: confirm this position right away.
    Confirm(Lsn),
    /// The batch reached its size limit: hand it to the handler now.
    BatchFull,
}

/// Builds batches of events from a source's items.
pub struct BatchBuilder {
    max_events: usize,
    events: Vec<ChangeEvent>,
    /// Whether a change arrived after the last commit: a transaction is being received.
    open: bool,
    /// End LSN of the last commit whose events are all in `events` (or were handled).
    completes: Option<Lsn>,
    /// Highest position known to be fully received: the last commit's end LSN, or an idle
    /// position.
    position: Lsn,
}

impl BatchBuilder {
    /// A builder cutting batches at `max_events` (at least 1).
    pub fn new(max_events: usize) -> BatchBuilder {
        BatchBuilder {
            max_events: max_events.max(1),
            events: Vec::with_capacity(max_events.max(1)),
            open: false,
            completes: None,
            position: Lsn::ZERO,
        }
    }

    /// Whether no event is waiting for the handler.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Whether everything up to `lsn` has been received and no transaction is open.
    pub fn reached(&self, lsn: Lsn) -> bool {
        !self.open && self.position >= lsn
    }

    /// Takes the pending events and the position that handling them completes.
    pub fn take(&mut self) -> (Vec<ChangeEvent>, Option<Lsn>) {
        let events = std::mem::take(&mut self.events);
        (events, self.completes.take())
    }

    /// Gives back a handled batch's vector so its allocation serves the next batch.
    pub fn recycle(&mut self, mut events: Vec<ChangeEvent>) {
        if self.events.is_empty() {
            events.clear();
            self.events = events;
        }
    }

    /// Feeds one item.
    pub fn push(&mut self, item: SourceItem) -> Step {
        match item {
            SourceItem::Change(event) => {
                self.open = true;
                self.events.push(event);
                if self.events.len() >= self.max_events {
                    Step::BatchFull
                } else {
                    Step::Continue
                }
            }
            SourceItem::Commit { end_lsn } => {
                self.open = false;
                self.position = self.position.max(end_lsn);
                if self.events.is_empty() {
                    // Every event of this transaction was handled already (or it had none).
                    self.completes = None;
                    Step::Confirm(end_lsn)
                } else {
                    self.completes = Some(end_lsn);
                    Step::Continue
                }
            }
            // Logical messages mean something to the source (backfill watermarks), never to
            // the handler.
            SourceItem::Message(_) => Step::Continue,
            // Confirming an idle position is what lets the slot advance while the watched
            // tables are quiet; it must wait while anything received is unhandled.
            SourceItem::Idle { position } => {
                if !self.open && self.events.is_empty() && self.completes.is_none() {
                    self.position = self.position.max(position);
                    Step::Confirm(position)
                } else {
                    Step::Continue
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::event::{Column, Operation, Relation, Value};

    fn change(lsn: u64, id: &str) -> SourceItem {
        let relation = Arc::new(Relation::new(
            1,
            "public".into(),
            "docs".into(),
            vec![Column {
                name: "id".into(),
                type_oid: 23,
                is_key: true,
            }],
        ));
        SourceItem::Change(ChangeEvent {
            operation: Operation::Insert,
            relation,
            row: vec![Value::text(id.to_owned().into()).unwrap()],
            old_row: None,
            lsn: Lsn(lsn),
            commit_time_us: 0,
            xid: 1,
        })
    }

    fn commit(end_lsn: u64) -> SourceItem {
        SourceItem::Commit {
            end_lsn: Lsn(end_lsn),
        }
    }

    fn idle(position: u64) -> SourceItem {
        SourceItem::Idle {
            position: Lsn(position),
        }
    }

    #[test]
    fn a_committed_transaction_completes_its_end_lsn() {
        let mut builder = BatchBuilder::new(100);
        assert_eq!(builder.push(change(0x100, "1")), Step::Continue);
        assert_eq!(builder.push(change(0x100, "2")), Step::Continue);
        assert_eq!(builder.push(commit(0x140)), Step::Continue);
        let (events, completes) = builder.take();
        assert_eq!(completes, Some(Lsn(0x140)));
        assert_eq!(events.len(), 2);
        assert!(builder.is_empty());
    }

    #[test]
    fn idle_positions_confirm_only_when_nothing_is_pending() {
        let mut builder = BatchBuilder::new(100);
        assert_eq!(builder.push(idle(0x50)), Step::Confirm(Lsn(0x50)));
        builder.push(change(0x100, "1"));
        assert_eq!(builder.push(idle(0x90)), Step::Continue);
        builder.push(commit(0x140));
        // The commit is received but its event is not handled yet.
        assert_eq!(builder.push(idle(0x200)), Step::Continue);
        assert!(!builder.reached(Lsn(0x200)));
        assert!(builder.reached(Lsn(0x140)));
        builder.take();
        assert_eq!(builder.push(idle(0x200)), Step::Confirm(Lsn(0x200)));
        assert!(builder.reached(Lsn(0x200)));
    }

    #[test]
    fn an_empty_transaction_is_confirmed_at_once() {
        let mut builder = BatchBuilder::new(100);
        assert_eq!(builder.push(commit(0x140)), Step::Confirm(Lsn(0x140)));
        assert!(builder.reached(Lsn(0x140)));
    }

    #[test]
    fn a_large_transaction_is_cut_and_confirmed_only_by_its_commit() {
        let mut builder = BatchBuilder::new(2);
        assert_eq!(builder.push(change(0x100, "1")), Step::Continue);
        assert_eq!(builder.push(change(0x100, "2")), Step::BatchFull);
        let (events, completes) = builder.take();
        assert_eq!((events.len(), completes), (2, None));
        builder.recycle(events);
        assert!(!builder.reached(Lsn(0)), "a transaction is open");
        assert_eq!(builder.push(change(0x100, "3")), Step::Continue);
        assert_eq!(builder.push(change(0x100, "4")), Step::BatchFull);
        let (events, completes) = builder.take();
        assert_eq!((events.len(), completes), (2, None));
        // Every event was handled before the commit arrived: confirm at once.
        assert_eq!(builder.push(commit(0x140)), Step::Confirm(Lsn(0x140)));
    }

    #[test]
    fn a_batch_ending_inside_a_transaction_confirms_only_the_ones_it_completed() {
        let mut builder = BatchBuilder::new(3);
        builder.push(change(0x100, "1"));
        builder.push(commit(0x140));
        builder.push(change(0x200, "2"));
        assert_eq!(builder.push(change(0x200, "3")), Step::BatchFull);
        let (events, completes) = builder.take();
        assert_eq!(events.len(), 3);
        assert_eq!(completes, Some(Lsn(0x140)));
        assert_eq!(builder.push(commit(0x240)), Step::Confirm(Lsn(0x240)));
    }
}
