//! Backfill: delivering the rows a table already holds, inside the pipeline's own stream,
//! so the sink equals the table from the first run without ever blocking writes.
//!
//! - [`store`]: the state of each table's backfill in the source database (what the
//!   `backfill` command reads and changes, and where a restarted host resumes);
//! - [`BackfillReader`]: reads chunks by key between watermarks;
//! - [`BackfillMerge`]: puts each chunk's rows into the stream at its high watermark, minus
//!   the rows live changes superseded;
//! - [`progress`]: bars for a person at a terminal.

mod copy_text;
mod merge;
pub mod progress;
mod reader;
pub mod store;

pub use copy_text::{CopyRows, CopyTextError};
pub use merge::{
    BackfillMerge, ChunkMessage, ChunkOutcome, ChunkRows, MAX_HELD_ITEMS, Mark, WATERMARK_PREFIX,
    Watermark,
};
pub use reader::{
    BackfillError, BackfillReader, MAX_CHUNK_ROWS, MIN_CHUNK_ROWS, ReaderSettings,
    check_backfillable,
};
pub use store::{BackfillState, BackfillStatus, StoreError};

/// Whether a pipeline's first start backfills the tables that already have rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackfillMode {
    /// Rows that predate the slot are read and delivered as `read` events (the default).
    #[default]
    Initial,
    /// Only changes from the slot's creation on are delivered; `backfill` can still be run.
    Skip,
}

/// Records a backfill of each of `tables` that has rows, for a slot about to be created (so
/// the rows that predate it are read once it exists); returns those tables. Called before the
/// slot is made, so a crash in between cannot leave a new slot whose older rows nobody reads.
/// Refused on a server without logical messages (before Postgres 14) when a table has rows.
pub async fn register_initial(
    client: &tokio_postgres::Client,
    slot: &str,
    tables: &[crate::replication::TableName],
) -> Result<Vec<crate::replication::TableName>, (crate::replication::TableName, BackfillError)> {
    let mut registered = Vec::new();
    for table in tables {
        let failed = |error: BackfillError| (table.clone(), error);
        let sql = format!("SELECT EXISTS (SELECT 1 FROM {})", table.quoted());
        let has_rows: bool = client
            .query_one(&sql, &[])
            .await
            .map_err(|error| failed(error.into()))?
            .get(0);
        if !has_rows {
            continue;
        }
        let version: i32 = client
            .query_one("SELECT current_setting('server_version_num')::int4", &[])
            .await
            .map_err(|error| failed(error.into()))?
            .get(0);
        if version < 140_000 {
            return Err(failed(BackfillError::ServerTooOld { version }));
        }
        store::request(client, slot, table, None, true)
            .await
            .map_err(|error| failed(error.into()))?;
        registered.push(table.clone());
    }
    Ok(registered)
}
