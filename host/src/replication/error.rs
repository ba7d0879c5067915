//! The errors of the replication module, classified in one place: [`ReplicationError::is_retryable`]
//! is what the pipeline's reconnect loop asks, so no caller matches on message strings.

use std::fmt;
use std::io;

/// An `ErrorResponse` sent by the server, with the fields an operator needs to act on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    /// `ERROR`, `FATAL` or `PANIC`.
    pub severity: String,
    /// The five-character SQLSTATE, e.g. `42704`.
    pub code: String,
    /// The primary message.
    pub message: String,
    /// Optional secondary detail.
    pub detail: Option<String>,
    /// Optional suggestion on how to fix the problem.
    pub hint: Option<String>,
}

impl ServerError {
    /// Builds a `ServerError` out of a wire `ErrorResponse`/`NoticeResponse` field list.
    pub(crate) fn from_fields(
        mut fields: postgres_protocol::message::backend::ErrorFields<'_>,
    ) -> Result<ServerError, ReplicationError> {
        use fallible_iterator::FallibleIterator;

        let mut error = ServerError {
            severity: String::new(),
            code: String::new(),
            message: String::new(),
            detail: None,
            hint: None,
        };
        while let Some(field) = fields.next().map_err(|source| {
            ReplicationError::Protocol(format!("malformed ErrorResponse: {source}"))
        })? {
            let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
            match field.type_() {
                // 'V' is the non-localised severity; prefer it over the localised 'S'.
                b'V' => error.severity = value,
                b'S' if error.severity.is_empty() => error.severity = value,
                b'C' => error.code = value,
                b'M' => error.message = value,
                b'D' => error.detail = Some(value),
                b'H' => error.hint = Some(value),
                _ => {}
            }
        }
        Ok(error)
    }

    pub(crate) fn from_db_error(error: &tokio_postgres::error::DbError) -> ServerError {
        ServerError {
            severity: error.severity().to_owned(),
            code: error.code().code().to_owned(),
            message: error.message().to_owned(),
            detail: error.detail().map(str::to_owned),
            hint: error.hint().map(str::to_owned),
        }
    }

    /// Whether retrying later can succeed: the connection was lost or the server is shutting
    /// down / restarting, or a resource is momentarily busy.
    pub fn is_retryable(&self) -> bool {
        self.code.starts_with("08")
            || matches!(
                self.code.as_str(),
                // admin_shutdown, crash_shutdown, cannot_connect_now (server starting up)
                "57P01" | "57P02" | "57P03"
                // too_many_connections: another client may disconnect.
                | "53300"
                // object_in_use: the slot is still held by our previous walsender, which
                // exits within wal_sender_timeout.
                | "55006"
            )
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} (SQLSTATE {})",
            self.severity, self.message, self.code
        )?;
        if let Some(detail) = &self.detail {
            write!(f, "; detail: {detail}")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "; hint: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ServerError {}

/// Everything that can go wrong talking to the source database. Messages name the server
/// (`host:port`) and user but never the password.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicationError {
    /// The connection string could not be parsed or lacks something required.
    #[error("invalid connection string: {reason}")]
    InvalidDsn {
        /// What is wrong with it.
        reason: String,
    },
    /// No TCP (or Unix socket) connection could be opened.
    #[error("cannot connect to {target}")]
    Connect {
        /// `host:port` (or the socket path).
        target: String,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },
    /// Connecting took longer than `connect_timeout`.
    #[error("timed out connecting to {target}")]
    ConnectTimeout {
        /// `host:port`.
        target: String,
    },
    /// `sslmode` requires TLS but the server does not offer it.
    #[error("{target} does not accept TLS connections, but sslmode requires TLS")]
    TlsRefused {
        /// `host:port`.
        target: String,
    },
    /// The TLS handshake failed (including certificate verification).
    #[error("TLS handshake with {target} failed")]
    Tls {
        /// `host:port`.
        target: String,
        /// The handshake error.
        #[source]
        source: io::Error,
    },
    /// The TLS configuration (e.g. the `sslrootcert` file) is unusable.
    #[error("TLS configuration: {reason}")]
    TlsConfig {
        /// What is wrong.
        reason: String,
    },
    /// The server rejected the credentials or the client cannot perform the requested method.
    #[error("authentication of user {user:?} at {target} failed: {reason}")]
    Auth {
        /// `host:port`.
        target: String,
        /// The role name.
        user: String,
        /// The server's message or why the client gave up.
        reason: String,
    },
    /// The server answered with an `ErrorResponse`.
    #[error(transparent)]
    Server(ServerError),
    /// The server sent something this client does not understand.
    #[error("replication protocol violation: {0}")]
    Protocol(String),
    /// Reading from or writing to an established connection failed.
    #[error("connection to {target} lost")]
    Io {
        /// `host:port`.
        target: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The server closed the connection without ending the stream.
    #[error("{target} closed the connection unexpectedly")]
    Closed {
        /// `host:port`.
        target: String,
    },
    /// An error on the regular SQL connection.
    #[error("SQL error")]
    Sql(#[source] tokio_postgres::Error),
    /// The logical slot exists but was created for another output plugin.
    #[error(
        "replication slot {slot:?} uses output plugin {plugin:?}, expected pgoutput; drop it (pgstream teardown) or choose another slot name"
    )]
    SlotPluginMismatch {
        /// The slot name.
        slot: String,
        /// Its plugin.
        plugin: String,
    },
    /// Teardown refused because a consumer is still attached to the slot.
    #[error(
        "replication slot {slot:?} is in use by backend PID {pid}; stop that consumer first (or SELECT pg_terminate_backend({pid})) and retry"
    )]
    SlotActive {
        /// The slot name.
        slot: String,
        /// The walsender PID holding it.
        pid: i32,
    },
    /// A slot or publication name that Postgres would refuse or cut short.
    #[error(transparent)]
    InvalidName(#[from] super::setup::InvalidNameError),
    /// No free replication slot.
    #[error(
        "all max_replication_slots slots are in use; drop unused ones (SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE NOT active) or raise max_replication_slots and restart Postgres"
    )]
    SlotsExhausted(#[source] ServerError),
    /// The streaming task ended without reporting why (it panicked).
    #[error("the replication task stopped unexpectedly")]
    TaskFailed,
}

impl ReplicationError {
    /// Whether the connection string itself could not be parsed.
    pub fn is_invalid_dsn(&self) -> bool {
        matches!(self, ReplicationError::InvalidDsn { .. })
    }

    /// Whether reconnecting later can succeed: connection refused/reset/lost, timeouts, SQLSTATE
    /// class 08, server shutdown/startup (57P01..57P03). Authentication failures, bad
    /// connection strings, TLS verification failures, missing slots and other SQL errors are
    /// permanent until someone changes the configuration.
    pub fn is_retryable(&self) -> bool {
        match self {
            ReplicationError::Connect { .. }
            | ReplicationError::ConnectTimeout { .. }
            | ReplicationError::Io { .. }
            | ReplicationError::Closed { .. } => true,
            ReplicationError::Server(error) => error.is_retryable(),
            ReplicationError::Sql(error) => match error.as_db_error() {
                Some(db) => ServerError::from_db_error(db).is_retryable(),
                // No server error: the socket failed or closed.
                None => {
                    error.is_closed()
                        || std::error::Error::source(error).is_some_and(|s| s.is::<io::Error>())
                }
            },
            ReplicationError::InvalidDsn { .. }
            | ReplicationError::TlsRefused { .. }
            | ReplicationError::Tls { .. }
            | ReplicationError::TlsConfig { .. }
            | ReplicationError::Auth { .. }
            | ReplicationError::Protocol(_)
            | ReplicationError::SlotPluginMismatch { .. }
            | ReplicationError::SlotActive { .. }
            | ReplicationError::InvalidName(_)
            | ReplicationError::SlotsExhausted(_)
            | ReplicationError::TaskFailed => false,
        }
    }

    /// The server error behind this error, if the server sent one.
    pub fn server_error(&self) -> Option<ServerError> {
        match self {
            ReplicationError::Server(error) | ReplicationError::SlotsExhausted(error) => {
                Some(error.clone())
            }
            ReplicationError::Sql(error) => error.as_db_error().map(ServerError::from_db_error),
            _ => None,
        }
    }
}

impl From<tokio_postgres::Error> for ReplicationError {
    fn from(error: tokio_postgres::Error) -> Self {
        ReplicationError::Sql(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str) -> ReplicationError {
        ReplicationError::Server(ServerError {
            severity: "FATAL".into(),
            code: code.into(),
            message: "m".into(),
            detail: None,
            hint: None,
        })
    }

    #[test]
    fn classifies_sqlstates() {
        for code in ["08006", "08P01", "57P01", "57P02", "57P03", "55006"] {
            assert!(server(code).is_retryable(), "{code}");
        }
        for code in ["28P01", "42704", "42501", "57014", "XX000"] {
            assert!(!server(code).is_retryable(), "{code}");
        }
        let reset = ReplicationError::Io {
            target: "h:1".into(),
            source: io::ErrorKind::ConnectionReset.into(),
        };
        assert!(reset.is_retryable());
        let auth = ReplicationError::Auth {
            target: "h:1".into(),
            user: "u".into(),
            reason: "bad".into(),
        };
        assert!(!auth.is_retryable());
    }
}
