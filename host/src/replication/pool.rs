//! A connection pool for the same DSN and TLS rules as [`SourceConfig::connect_sql`], for the
//! parts that write back to Postgres (the pgvector sink) and must never share the replication
//! connection.

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};

use super::{ReplicationError, SourceConfig};

impl SourceConfig {
    /// A pool of at most `max_size` regular connections. Connections are opened lazily, so a
    /// server that is down is reported by the first use, not here.
    pub fn pool(&self, max_size: usize) -> Result<Pool, ReplicationError> {
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match &self.tls {
            Some(tls) => Manager::from_config(
                self.sql.clone(),
                tokio_postgres_rustls::MakeRustlsConnect::new((**tls).clone()),
                manager_config,
            ),
            None => Manager::from_config(self.sql.clone(), tokio_postgres::NoTls, manager_config),
        };
        Pool::builder(manager)
            .max_size(max_size.max(1))
            .build()
            .map_err(|error| {
                ReplicationError::Protocol(format!("cannot build a connection pool: {error}"))
            })
    }
}
