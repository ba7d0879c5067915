//! Watches a replication slot's hold on WAL while its pipeline streams, so an operator hears
//! about a slot in danger before Postgres invalidates it.
//!
//! A slot keeps every WAL segment from its `restart_lsn` on. When a pipeline stops confirming
//! (a stuck handler, a long outage) the server's disk fills, or, with
//! `max_slot_wal_keep_size` set, the slot is invalidated at a checkpoint and its changes are
//! gone. Every [`CHECK_INTERVAL`] the guard reads the slot's `wal_status`, retained bytes and
//! `safe_wal_size` on a connection of its own, and logs once per change of level: a warning
//! when the slot is at risk ([`SlotWal::is_at_risk`]), a note when it is safe again, an error
//! when it is lost. Each reading also goes to the pipeline's status, where the metrics read
//! the lag and the retained WAL. Stopping the pipeline for a lost slot is the source's job
//! (its next start fails with [`SourceError::SlotLost`](super::SourceError::SlotLost)); the
//! guard only reports.

use std::time::Duration;

use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::pipeline::StatusHandle;
use crate::replication::{self, SlotWal, SourceConfig};

/// How often the slot is read.
pub(crate) const CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// How worried the guard is about the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Safe,
    AtRisk,
    Lost,
}

impl Level {
    fn of(wal: &SlotWal) -> Level {
        if wal.is_lost() {
            Level::Lost
        } else if wal.is_at_risk() {
            Level::AtRisk
        } else {
            Level::Safe
        }
    }
}

/// The running guard of one slot; dropping it stops the guard.
pub(crate) struct SlotGuard {
    task: JoinHandle<()>,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SlotGuard {
    /// Starts watching `slot` on `config`'s database for `pipeline`; each reading also goes to
    /// `status` (for metrics) when there is one.
    pub(crate) fn start(
        pipeline: &str,
        config: &SourceConfig,
        slot: &str,
        status: Option<StatusHandle>,
    ) -> SlotGuard {
        let (pipeline, config, slot) = (pipeline.to_owned(), config.clone(), slot.to_owned());
        SlotGuard {
            task: tokio::spawn(async move { watch(&pipeline, &config, &slot, status).await }),
        }
    }
}

async fn watch(pipeline: &str, config: &SourceConfig, slot: &str, status: Option<StatusHandle>) {
    let mut level = Level::Safe;
    let mut client = None;
    let mut ticker = tokio::time::interval(CHECK_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if client.is_none() {
            // A failed connection is tried again at the next tick; the stream reports outages.
            client = config.connect_sql().await.ok();
        }
        let Some(connected) = &client else { continue };
        let wal = match replication::slot_wal(connected, slot).await {
            Ok(Some(wal)) => wal,
            Ok(None) => continue,
            Err(_) => {
                client = None;
                continue;
            }
        };
        if let Some(status) = &status {
            status.set_slot(wal.clone());
        }
        let now = Level::of(&wal);
        if now == level {
            continue;
        }
        let status = wal.wal_status.as_deref().unwrap_or("unknown");
        let retained_mib = wal.retained_bytes.unwrap_or(0) / (1024 * 1024);
        let safe_mib = wal.safe_wal_size.map(|bytes| bytes / (1024 * 1024));
        match now {
            Level::AtRisk => warn!(
                pipeline,
                slot,
                wal_status = status,
                retained_mib,
                safe_mib,
                "the replication slot holds back WAL close to max_slot_wal_keep_size; if the \
                 pipeline does not confirm soon, Postgres will invalidate the slot and its \
                 changes will be lost"
            ),
            Level::Safe => info!(
                pipeline,
                slot,
                wal_status = status,
                retained_mib,
                safe_mib,
                "the replication slot's WAL is within its budget again"
            ),
            Level::Lost => error!(
                pipeline,
                slot,
                "Postgres invalidated the replication slot (wal_status = lost); the pipeline \
                 stops at its next reconnect"
            ),
        }
        level = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wal(status: &str, retained: i64, safe: Option<i64>) -> SlotWal {
        SlotWal {
            wal_status: Some(status.to_owned()),
            retained_bytes: Some(retained),
            safe_wal_size: safe,
            lag_bytes: None,
        }
    }

    #[test]
    fn levels_follow_wal_status_and_the_half_budget() {
        assert_eq!(Level::of(&wal("reserved", 10, None)), Level::Safe);
        assert_eq!(Level::of(&wal("reserved", 10, Some(100))), Level::Safe);
        // Retained as much as can still be written: half of the budget is used.
        assert_eq!(Level::of(&wal("extended", 100, Some(100))), Level::AtRisk);
        assert_eq!(Level::of(&wal("unreserved", 10, None)), Level::AtRisk);
        assert_eq!(Level::of(&wal("lost", 0, None)), Level::Lost);
    }
}
