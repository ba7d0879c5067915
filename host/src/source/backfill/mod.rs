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
    let mut checked_version = false;
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
        if !checked_version {
            require_watermarks(client).await.map_err(failed)?;
            checked_version = true;
        }
        store::request(client, slot, table, None, true)
            .await
            .map_err(|error| failed(error.into()))?;
        registered.push(table.clone());
    }
    Ok(registered)
}

/// `server_version_num` of the server `client` is connected to (140000 for 14.0).
pub async fn server_version(client: &tokio_postgres::Client) -> Result<i32, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .await?
        .get(0))
}

/// The server's version, when it can carry the backfill's watermarks (logical messages in
/// pgoutput: Postgres 14 and later); else [`BackfillError::ServerTooOld`].
pub(crate) async fn require_watermarks(
    client: &tokio_postgres::Client,
) -> Result<i32, BackfillError> {
    let version = server_version(client).await?;
    if version < MIN_SERVER_VERSION {
        return Err(BackfillError::ServerTooOld { version });
    }
    Ok(version)
}

/// The first `server_version_num` whose pgoutput sends logical messages.
pub const MIN_SERVER_VERSION: i32 = 140_000;
