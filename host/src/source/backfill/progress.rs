//! Progress bars for a person watching `pgstream-host run` at a terminal: one per backfill of
//! the pipeline's slot, with rows done of the estimated total, rows per second and the time
//! left, redrawn every second from `pgstream_backfills` (the same figures `backfill --status`
//! prints and the reader logs). Without a terminal nothing is drawn; the reader's progress
//! log lines say the same every few seconds.
//!
//! Log lines and bars share stderr: [`BarsAwareStderr`] writes each log line with the bars
//! lifted, so neither garbles the other.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tokio::task::JoinHandle;

use super::store::{self, BackfillState};
use crate::replication::{SourceConfig, TableName};

/// How often the bars are redrawn from the state table.
const REFRESH: Duration = Duration::from_secs(1);

/// A `tracing_subscriber` writer to stderr that hides `bars` while a line is written.
#[derive(Clone)]
pub struct BarsAwareStderr {
    bars: MultiProgress,
}

impl BarsAwareStderr {
    /// A writer that shares stderr with `bars`.
    pub fn new(bars: MultiProgress) -> BarsAwareStderr {
        BarsAwareStderr { bars }
    }
}

impl Write for BarsAwareStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.bars.suspend(|| std::io::stderr().write_all(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BarsAwareStderr {
    type Writer = BarsAwareStderr;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// The task drawing the bars; dropping it stops it and leaves finished bars on screen.
pub struct BackfillBars {
    task: JoinHandle<()>,
}

impl Drop for BackfillBars {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl BackfillBars {
    /// Draws the backfills of `slot` on `source` into `bars` until dropped.
    pub fn start(bars: MultiProgress, source: SourceConfig, slot: String) -> BackfillBars {
        BackfillBars {
            task: tokio::spawn(draw(bars, source, slot)),
        }
    }
}

async fn draw(bars: MultiProgress, source: SourceConfig, slot: String) {
    let style = ProgressStyle::with_template(
        "{prefix} [{bar:30}] {pos}/{len} rows ({percent}%), {per_sec}, ETA {eta} {msg}",
    )
    .expect("a valid template")
    .progress_chars("=> ");
    let mut shown: HashMap<TableName, ProgressBar> = HashMap::new();
    let mut client = None;
    loop {
        tokio::time::sleep(REFRESH).await;
        if client.is_none() {
            client = source.connect_sql().await.ok();
        }
        let Some(connected) = &client else { continue };
        let Ok(backfills) = store::list(connected, &slot).await else {
            client = None;
            continue;
        };
        for backfill in backfills {
            let bar = match shown.get(&backfill.table) {
                Some(bar) => bar,
                // Backfills that ended before this process started are not news.
                None if !backfill.state.is_active() => continue,
                None => shown
                    .entry(backfill.table.clone())
                    .or_insert_with(|| new_bar(&bars, &style, &backfill.table)),
            };
            if bar.is_finished() {
                if !backfill.state.is_active() {
                    continue;
                }
                // Requested again: a new bar, the old one stays as it ended.
                shown.insert(
                    backfill.table.clone(),
                    new_bar(&bars, &style, &backfill.table),
                );
                continue;
            }
            let total = backfill
                .rows_total
                .unwrap_or(0)
                .max(backfill.rows_done)
                .max(0);
            bar.set_length(total as u64);
            bar.set_position(backfill.rows_done.max(0) as u64);
            match backfill.state {
                BackfillState::Done => {
                    bar.set_length(backfill.rows_done.max(0) as u64);
                    bar.finish_with_message("done");
                }
                BackfillState::Cancelled | BackfillState::Failed => {
                    bar.abandon_with_message(backfill.state.as_str());
                }
                BackfillState::Paused => bar.set_message("paused"),
                BackfillState::Pending | BackfillState::Running => bar.set_message(""),
            }
        }
    }
}

fn new_bar(bars: &MultiProgress, style: &ProgressStyle, table: &TableName) -> ProgressBar {
    let bar = bars.add(ProgressBar::new(0).with_style(style.clone()));
    bar.set_prefix(format!("backfill {table}"));
    bar
}
