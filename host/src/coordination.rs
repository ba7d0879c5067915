//! Several hosts serving one config file, coordinated by Postgres itself: each pipeline runs
//! on exactly one of them at a time, and another takes over when that one dies.
//!
//! Nothing of our own decides who runs what. A host that wants to run a pipeline takes a
//! session advisory lock keyed by the pipeline's name on the pipeline's source database (its
//! *lease*), on a connection of its own. Postgres releases the lock the moment that connection
//! ends: when the process exits or is killed, its sockets close at once; when a machine is
//! lost, the session's TCP keepalives (set to a few seconds on the lease connection) end it
//! within about 20 s. The hosts that did not get the lock are standbys and try again every few
//! seconds. The logical slot is the second guard: Postgres streams a slot to one connection at
//! a time, so even a host that lost its lease without noticing cannot stream beside the new
//! one.
//!
//! The lease connection also publishes the pipeline's status (state, host, confirmed position,
//! last error) into a small table of the source database, `pgstream_pipelines`, which
//! `pgstream-host status` reads together with the slot's own figures. Creating that table
//! needs the CREATE privilege; without it a host coordinates all the same and `status` shows
//! the slot's figures only.

use std::time::Duration;

use tokio_postgres::Client;
use tracing::{debug, warn};

use crate::lsn::Lsn;
use crate::pipeline::PipelineStatus;
use crate::replication::{ReplicationError, SourceConfig};

/// The first key of every lease lock (`'pgst'`), so our locks never collide with an
/// application's single-key advisory locks of the same number.
const LEASE_CLASS: i32 = 0x7067_7374;
/// The table status is published into.
pub const STATUS_TABLE: &str = "pgstream_pipelines";
/// How often a standby tries to take a lease, and a holder publishes its status.
pub const LEASE_INTERVAL: Duration = Duration::from_secs(3);

/// A pipeline's lease: held while this value (and its connection) lives.
pub struct Lease {
    client: Client,
    pipeline: String,
    host: String,
    /// Whether the status table could be written; after one failure it is not tried again.
    publishing: bool,
}

impl Lease {
    /// Tries to take the lease of `pipeline` on `source`: `Ok(None)` when another host holds
    /// it.
    pub async fn try_acquire(
        source: &SourceConfig,
        pipeline: &str,
        host: &str,
    ) -> Result<Option<Lease>, ReplicationError> {
        let client = source.connect_sql().await?;
        // A lost machine sends no FIN: keepalives are what end its session, and with it the
        // lock. These are per-session settings any role may change.
        client
            .batch_execute(
                "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 3; \
                 SET tcp_keepalives_count = 3; SET application_name = 'pgstream-host lease'",
            )
            .await
            .map_err(ReplicationError::Sql)?;
        let row = client
            .query_one(
                "SELECT pg_try_advisory_lock($1, hashtext($2))",
                &[&LEASE_CLASS, &pipeline],
            )
            .await
            .map_err(ReplicationError::Sql)?;
        if !row.get::<_, bool>(0) {
            return Ok(None);
        }
        let mut lease = Lease {
            client,
            pipeline: pipeline.to_owned(),
            host: host.to_owned(),
            publishing: true,
        };
        if let Err(error) = lease
            .client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {STATUS_TABLE} (
                 name text PRIMARY KEY,
                 host text NOT NULL,
                 state text NOT NULL,
                 confirmed_lsn pg_lsn,
                 last_error text,
                 updated_at timestamptz NOT NULL DEFAULT now())"
            ))
            .await
            && !lease.status_table_exists().await
        {
            warn!(
                pipeline, %error,
                "cannot create the status table {STATUS_TABLE}; `status` will show the slot's \
                 figures only (grant CREATE on the database to publish more)"
            );
            lease.publishing = false;
        }
        Ok(Some(lease))
    }

    /// Whether the status table exists: after a failed `CREATE TABLE IF NOT EXISTS`, which
    /// two hosts (or two pipelines) racing to create it can get, the other one may have.
    async fn status_table_exists(&self) -> bool {
        self.client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&STATUS_TABLE])
            .await
            .is_ok_and(|row| row.get(0))
    }

    /// Whether the lease's connection is still up (and so the lock still held).
    pub fn is_held(&self) -> bool {
        !self.client.is_closed()
    }

    /// Ends the session of a connection that still streams the pipeline's slot: a host whose
    /// lease is gone (it was killed, or cut off) but whose walsender has not noticed yet.
    /// Holding the lease makes this safe: no live host streams that slot.
    pub async fn evict_stale_stream(&self, slot: &str) -> Result<(), ReplicationError> {
        let terminated = self
            .client
            .query(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
                 WHERE slot_name = $1 AND active AND active_pid IS NOT NULL",
                &[&slot],
            )
            .await
            .map_err(ReplicationError::Sql)?;
        if !terminated.is_empty() {
            warn!(pipeline = %self.pipeline, slot, "ended a stale stream of the slot left by a host that lost its lease");
        }
        Ok(())
    }

    /// Publishes a status snapshot (best effort: failures are logged once, at debug after).
    pub async fn publish(&mut self, status: &PipelineStatus) {
        if !self.publishing {
            return;
        }
        let confirmed = status.confirmed.to_string();
        let result = self
            .client
            .execute(
                &format!(
                    "INSERT INTO {STATUS_TABLE} AS s (name, host, state, confirmed_lsn, last_error, updated_at)
                     VALUES ($1, $2, $3, $4::text::pg_lsn, $5, now())
                     ON CONFLICT (name) DO UPDATE SET host = EXCLUDED.host,
                         state = EXCLUDED.state, confirmed_lsn = EXCLUDED.confirmed_lsn,
                         last_error = EXCLUDED.last_error, updated_at = now()"
                ),
                &[
                    &self.pipeline,
                    &self.host,
                    &status.state.to_string(),
                    &confirmed,
                    &status.last_error,
                ],
            )
            .await;
        if let Err(error) = result {
            debug!(pipeline = %self.pipeline, %error, "cannot publish the pipeline's status");
        }
    }
}

/// What `status` says of one pipeline, read from its source database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedStatus {
    /// Whether the slot exists.
    pub slot_exists: bool,
    /// Whether a connection streams the slot now.
    pub slot_active: bool,
    /// The slot's confirmed position.
    pub confirmed: Option<Lsn>,
    /// The server's WAL position minus the confirmed one, in bytes.
    pub lag_bytes: Option<i64>,
    /// The slot's `wal_status` (`reserved`, `extended`, `unreserved`, `lost`).
    pub wal_status: Option<String>,
    /// What the host running it last published, if any: host, state, last error, and how
    /// many seconds ago.
    pub published: Option<PublishedStatus>,
}

/// A host's last published status of a pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedStatus {
    /// The host that runs (or ran) it.
    pub host: String,
    /// Its state, as [`PipelineState`]'s `Display` writes it.
    pub state: String,
    /// Its last error.
    pub last_error: Option<String>,
    /// Seconds since it was published.
    pub age_secs: i64,
}

/// Reads what the source knows of `pipeline` and its `slot`.
pub async fn observe(
    source: &SourceConfig,
    pipeline: &str,
    slot: &str,
) -> Result<ObservedStatus, ReplicationError> {
    let client = source.connect_sql().await?;
    let slot_row = client
        .query_opt(
            "SELECT active, confirmed_flush_lsn::text,
                    (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint, wal_status
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(ReplicationError::Sql)?;
    let table_exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&STATUS_TABLE])
        .await
        .map_err(ReplicationError::Sql)?
        .get(0);
    let published = if table_exists {
        client
            .query_opt(
                &format!(
                    "SELECT host, state, last_error,
                            extract(epoch FROM now() - updated_at)::bigint
                     FROM {STATUS_TABLE} WHERE name = $1"
                ),
                &[&pipeline],
            )
            .await
            .map_err(ReplicationError::Sql)?
            .map(|row| PublishedStatus {
                host: row.get(0),
                state: row.get(1),
                last_error: row.get(2),
                age_secs: row.get(3),
            })
    } else {
        None
    };
    Ok(match slot_row {
        Some(row) => ObservedStatus {
            slot_exists: true,
            slot_active: row.get(0),
            confirmed: row
                .get::<_, Option<String>>(1)
                .and_then(|text| text.parse().ok()),
            lag_bytes: row.get(2),
            wal_status: row.get(3),
            published,
        },
        None => ObservedStatus {
            slot_exists: false,
            slot_active: false,
            confirmed: None,
            lag_bytes: None,
            wal_status: None,
            published,
        },
    })
}

/// This host's name for leases and status: `$PGSTREAM_HOST_ID`, else the machine's host
/// name, with the process id.
pub fn host_identity() -> String {
    if let Some(id) = std::env::var("PGSTREAM_HOST_ID")
        .ok()
        .filter(|id| !id.is_empty())
    {
        return id;
    }
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{name}:{}", std::process::id())
}
