//! A connection pool for the same DSN and TLS rules as [`SourceConfig::connect_sql`], for the
//! parts that write back to Postgres (the pgvector sink) and must never share the replication
//! connection.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};

use super::{ReplicationError, SourceConfig};

impl SourceConfig {
    /// A pool of at most `max_size` regular connections. Connections are opened lazily, so a
    /// server that is down is reported by the first use, not here.
    ///
    /// Every statement runs under `statement_timeout` and getting a connection waits at most
    /// `timeout`: a write stuck behind a lock fails (and its batch is retried) instead of
    /// holding the pipeline, and its WAL confirmations, forever.
    pub fn pool(&self, max_size: usize, timeout: Duration) -> Result<Pool, ReplicationError> {
        let mut sql = self.sql.clone();
        let statement_timeout = format!("-c statement_timeout={}", timeout.as_millis());
        let options = match sql.get_options() {
            Some(existing) => format!("{existing} {statement_timeout}"),
            None => statement_timeout,
        };
        sql.options(options);
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match &self.tls {
            Some(tls) => Manager::from_config(
                sql,
                tokio_postgres_rustls::MakeRustlsConnect::new((**tls).clone()),
                manager_config,
            ),
            None => Manager::from_config(sql, tokio_postgres::NoTls, manager_config),
        };
        Pool::builder(manager)
            .max_size(max_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .build()
            .map_err(|error| {
                ReplicationError::Protocol(format!("cannot build a connection pool: {error}"))
            })
    }
}
