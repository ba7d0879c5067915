//! The source database's connection settings, parsed once from a libpq-style DSN and used for
//! both connections the pipeline opens: the replication connection (our own client, see
//! `connection.rs`) and a regular SQL connection (tokio-postgres).
//!
//! `tokio_postgres::Config` parses the DSN (URL and `key=value` forms) but only knows
//! `sslmode=disable|prefer|require` and no `sslrootcert`, so those two keys are cut out of the
//! DSN first and interpreted here with libpq's meaning.
//!
//! A DSN holds a password, and a DSN that fails to parse is one whose parts may have landed in
//! the wrong place (an unquoted space in a password, a mistyped URL scheme), so no message
//! about a malformed DSN quotes a piece of it beyond a known parameter name: the rest is
//! pointed at by position. As a last line of defence every such message is also scrubbed of
//! anything that looks like the DSN's password.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::config::{ChannelBinding as ChannelBindingPolicy, Host};

use super::error::ReplicationError;
use super::tls;

/// libpq's `sslmode`, all five levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP only.
    Disable,
    /// Try TLS, continue in plain text if the server refuses it (libpq's default).
    Prefer,
    /// TLS, but the server certificate is not verified.
    Require,
    /// TLS, the certificate must chain to a trusted root; the host name is not checked.
    VerifyCa,
    /// TLS, trusted chain and the certificate must name the host.
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = ReplicationError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            // libpq also has `allow` (plain first, TLS if refused); plain first is what we'd do.
            "allow" => SslMode::Prefer,
            other => {
                // Quoted only when it is a plain word: a mangled value may run into the
                // password (`sslmode=x\ password=...`).
                let shown = if is_plain_word(other) {
                    format!("sslmode {other:?}")
                } else {
                    "the sslmode value".to_owned()
                };
                return Err(ReplicationError::InvalidDsn {
                    reason: format!(
                        "{shown} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                    ),
                });
            }
        })
    }
}

/// One server to try, in DSN order.
#[derive(Debug, Clone)]
pub(crate) enum Endpoint {
    /// A TCP host name (used for TLS) and port, connected through `address` when the DSN has
    /// a `hostaddr`.
    Tcp {
        host: String,
        address: Option<std::net::IpAddr>,
        port: u16,
    },
    /// A Unix-domain socket `<dir>/.s.PGSQL.<port>`.
    Unix { dir: PathBuf, port: u16 },
}

impl Endpoint {
    /// `host:port` or the socket path, for messages.
    pub(crate) fn target(&self) -> String {
        match self {
            Endpoint::Tcp { host, port, .. } if host.contains(':') => format!("[{host}]:{port}"),
            Endpoint::Tcp { host, port, .. } => format!("{host}:{port}"),
            Endpoint::Unix { dir, port } => format!("{}/.s.PGSQL.{port}", dir.display()),
        }
    }
}

/// Where and how to connect to the source database. Cheap to clone; the password stays inside.
#[derive(Clone)]
pub struct SourceConfig {
    pub(crate) sql: tokio_postgres::Config,
    pub(crate) endpoints: Vec<Endpoint>,
    pub(crate) user: String,
    pub(crate) dbname: String,
    pub(crate) ssl_mode: SslMode,
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
    pub(crate) channel_binding: ChannelBindingPolicy,
}

impl std::fmt::Debug for SourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display())
    }
}

impl SourceConfig {
    /// Parses a libpq connection string, either a URL
    /// (`postgres://user:pw@host:5432/db?sslmode=verify-full&sslrootcert=/ca.pem`) or
    /// `key=value` pairs (`host=h user=u password='p w' sslmode=require`).
    ///
    /// `sslmode` accepts all libpq levels; as in libpq, `require` with an explicit
    /// `sslrootcert` behaves like `verify-ca`. `sslrootcert=system` (or no `sslrootcert`) trusts
    /// the bundled Mozilla roots.
    ///
    /// No error quotes the password, however malformed the DSN.
    pub fn from_dsn(dsn: &str) -> Result<SourceConfig, ReplicationError> {
        SourceConfig::parse(dsn).map_err(|error| without_password(error, dsn))
    }

    fn parse(dsn: &str) -> Result<SourceConfig, ReplicationError> {
        let split = split_tls_options(dsn)?;
        let mut sql = tokio_postgres::Config::from_str(&split.rest).map_err(|error| {
            ReplicationError::InvalidDsn {
                // Its own message is only "invalid connection string"; the detail is in the
                // source. The detail can quote an unknown parameter name, but the split above
                // already refused those.
                reason: std::error::Error::source(&error)
                    .map_or_else(|| error.to_string(), |cause| cause.to_string()),
            }
        })?;
        let mut ssl_mode = match split.sslmode.as_deref() {
            Some(mode) => mode.parse()?,
            None => SslMode::Prefer,
        };
        if ssl_mode == SslMode::Require
            && split.sslrootcert.as_deref().is_some_and(|c| c != "system")
        {
            ssl_mode = SslMode::VerifyCa;
        }
        let user = sql
            .get_user()
            .filter(|user| !user.is_empty())
            .ok_or_else(|| ReplicationError::InvalidDsn {
                reason: "no user given (add user=<role> or postgres://<role>@host/...)".into(),
            })?
            .to_owned();
        let dbname = sql.get_dbname().unwrap_or(&user).to_owned();

        // libpq: `hostaddr` is where to connect, `host` (if given) the name TLS verifies.
        let addresses = sql.get_hostaddrs();
        let hosts: Vec<Host> = if sql.get_hosts().is_empty() {
            addresses
                .iter()
                .map(|address| Host::Tcp(address.to_string()))
                .collect()
        } else {
            sql.get_hosts().to_vec()
        };
        let ports = sql.get_ports();
        if hosts.is_empty() {
            return Err(ReplicationError::InvalidDsn {
                reason: "no host given (add host=<server> or postgres://user@host/...)".into(),
            });
        }
        for (index, host) in hosts.iter().enumerate() {
            if let Host::Tcp(name) = host
                && !is_host_name(name)
            {
                // Typically a URL password with an unencoded `@` (`user:p@ss@host`), or
                // parameters separated by commas, which put the password into the host list.
                return Err(ReplicationError::InvalidDsn {
                    reason: format!(
                        "host {} of {} is not a host name or IP address (not shown, as it may \
                         hold a piece of the password); in a URL, percent-encode @ : / ? in the \
                         password (@ is %40), and separate key=value pairs with spaces",
                        index + 1,
                        hosts.len()
                    ),
                });
            }
        }
        for (parameter, value) in [
            ("user", Some(user.as_str())),
            ("dbname", Some(dbname.as_str())),
            ("options", sql.get_options()),
            ("application_name", sql.get_application_name()),
        ] {
            if value.is_some_and(|value| value.contains("password=")) {
                return Err(ReplicationError::InvalidDsn {
                    reason: format!(
                        "the {parameter} value contains \"password=\" (not shown); separate \
                         key=value pairs with spaces"
                    ),
                });
            }
        }
        if ports.len() > 1 && ports.len() != hosts.len() {
            return Err(ReplicationError::InvalidDsn {
                reason: format!("{} hosts but {} ports", hosts.len(), ports.len()),
            });
        }
        let endpoints = hosts
            .iter()
            .enumerate()
            .map(|(index, host)| {
                let port = ports.get(index).or(ports.first()).copied().unwrap_or(5432);
                match host {
                    Host::Tcp(name) => Endpoint::Tcp {
                        host: name.clone(),
                        address: addresses.get(index).copied(),
                        port,
                    },
                    Host::Unix(dir) => Endpoint::Unix {
                        dir: dir.clone(),
                        port,
                    },
                }
            })
            .collect();

        let tls = match ssl_mode {
            SslMode::Disable => None,
            mode => Some(Arc::new(tls::client_config(
                mode,
                split.sslrootcert.as_deref(),
            )?)),
        };
        // tokio-postgres only needs to know whether TLS is optional; certificate checks live in
        // our rustls config.
        sql.ssl_mode(match ssl_mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        if sql.get_application_name().is_none() {
            sql.application_name("pgstream");
        }
        let channel_binding = sql.get_channel_binding();
        Ok(SourceConfig {
            sql,
            endpoints,
            user,
            dbname,
            ssl_mode,
            tls,
            channel_binding,
        })
    }

    /// The effective `sslmode`.
    pub fn ssl_mode(&self) -> SslMode {
        self.ssl_mode
    }

    /// `user@host:port/dbname`, safe to log: never contains the password.
    pub fn display(&self) -> String {
        let targets: Vec<String> = self.endpoints.iter().map(Endpoint::target).collect();
        format!("{}@{}/{}", self.user, targets.join(","), self.dbname)
    }

    pub(crate) fn password(&self) -> Option<&[u8]> {
        self.sql.get_password()
    }

    pub(crate) fn options(&self) -> Option<&str> {
        self.sql.get_options()
    }

    pub(crate) fn application_name(&self) -> Option<&str> {
        self.sql.get_application_name()
    }

    pub(crate) fn connect_timeout(&self) -> Option<Duration> {
        self.sql.get_connect_timeout().copied()
    }

    /// Opens a regular (non-replication) SQL connection with the same TLS rules and spawns the
    /// task that drives it; the task ends when the returned client is dropped.
    pub async fn connect_sql(&self) -> Result<tokio_postgres::Client, ReplicationError> {
        let target = self.display();
        let (result, handshake_started) =
            match &self.tls {
                Some(tls) => {
                    let connector = tls::WatchedTlsConnect::new((**tls).clone());
                    let result =
                        self.sql
                            .connect(connector.clone())
                            .await
                            .map(|(client, connection)| {
                                tokio::spawn(drive_sql_connection(connection, target.clone()));
                                client
                            });
                    (result, connector.handshake_started())
                }
                None => {
                    let result = self.sql.connect(tokio_postgres::NoTls).await.map(
                        |(client, connection)| {
                            tokio::spawn(drive_sql_connection(connection, target.clone()));
                            client
                        },
                    );
                    (result, false)
                }
            };
        result.map_err(|error| self.classify_connect_error(error, handshake_started))
    }

    /// Turns a tokio-postgres connect failure into the same variants the replication connection
    /// reports, so callers see one vocabulary.
    fn classify_connect_error(
        &self,
        error: tokio_postgres::Error,
        handshake_started: bool,
    ) -> ReplicationError {
        let target = self
            .endpoints
            .iter()
            .map(Endpoint::target)
            .collect::<Vec<_>>()
            .join(",");
        if let Some(db) = error.as_db_error() {
            if db.code().code().starts_with("28") {
                return ReplicationError::Auth {
                    target,
                    user: self.user.clone(),
                    reason: db.message().to_owned(),
                };
            }
            return ReplicationError::Sql(error);
        }
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            if let Some(io) = cause.downcast_ref::<std::io::Error>() {
                // tokio-rustls reports handshake and certificate failures as I/O errors
                // wrapping the rustls error; those are configuration problems, not outages.
                if io
                    .get_ref()
                    .is_some_and(|inner| inner.is::<rustls::Error>())
                {
                    return ReplicationError::Tls {
                        target,
                        source: std::io::Error::new(io.kind(), io.to_string()),
                    };
                }
                return ReplicationError::Connect {
                    target,
                    source: std::io::Error::new(io.kind(), io.to_string()),
                };
            }
            source = cause.source();
        }
        // Neither the server nor the socket failed, TLS is required and no handshake began:
        // the server said no to the SSLRequest. (sslnegotiation=direct sends no SSLRequest.)
        let tls_required = !matches!(self.ssl_mode, SslMode::Disable | SslMode::Prefer);
        if tls_required
            && !handshake_started
            && self.sql.get_ssl_negotiation() == tokio_postgres::config::SslNegotiation::Postgres
        {
            return ReplicationError::TlsRefused { target };
        }
        ReplicationError::Sql(error)
    }
}

async fn drive_sql_connection<S, T>(connection: tokio_postgres::Connection<S, T>, target: String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if let Err(error) = connection.await {
        tracing::warn!(%target, %error, "SQL connection to the source database ended");
    }
}

/// `error` with every piece of `dsn` that may be its password masked out of the message: the
/// last line of defence behind messages that already quote no more than parameter names.
fn without_password(error: ReplicationError, dsn: &str) -> ReplicationError {
    let mask = |reason: String| {
        let mut candidates = password_candidates(dsn);
        // Longest first, so a password is not left half-masked by a piece of it.
        candidates.sort_by_key(|candidate| std::cmp::Reverse(candidate.len()));
        candidates.iter().fold(reason, |reason, candidate| {
            reason.replace(candidate.as_str(), "****")
        })
    };
    match error {
        ReplicationError::InvalidDsn { reason } => ReplicationError::InvalidDsn {
            reason: mask(reason),
        },
        ReplicationError::TlsConfig { reason } => ReplicationError::TlsConfig {
            reason: mask(reason),
        },
        other => other,
    }
}

/// Everything in `dsn` that may be the password, found leniently, so that also a DSN that
/// does not parse gives up its password: the value after any `password=` (up to a space, `&`
/// or, quoted, the closing quote), and the text between a `:` and the last `@` of the word
/// holding an `@` (URL user info, whatever the prefix). Raw and percent-decoded.
fn password_candidates(dsn: &str) -> Vec<String> {
    let mut candidates = Vec::new();
    let mut rest = dsn;
    while let Some(at) = rest.find("password") {
        let after = rest[at + "password".len()..].trim_start();
        rest = &rest[at + "password".len()..];
        let Some(value) = after.strip_prefix('=') else {
            continue;
        };
        let value = value.trim_start();
        let value = match value.strip_prefix('\'') {
            Some(quoted) => quoted.split('\'').next().unwrap_or(quoted),
            None => value
                .split(|c: char| c.is_whitespace() || c == '&')
                .next()
                .unwrap_or(value),
        };
        candidates.push(value.to_owned());
        // The quoted form keeps its escapes in the DSN but not in a parsed value.
        candidates.push(value.replace('\\', ""));
    }
    for word in dsn.split_whitespace() {
        let Some(last_at) = word.rfind('@') else {
            continue;
        };
        let user_info = &word[..last_at];
        let user_info = user_info
            .rfind("//")
            .map_or(user_info, |slashes| &user_info[slashes + 2..]);
        if let Some((_, password)) = user_info.split_once(':') {
            candidates.push(password.to_owned());
        }
        if let Some((_, password)) = user_info.rsplit_once(':') {
            candidates.push(password.to_owned());
        }
    }
    let decoded: Vec<String> = candidates
        .iter()
        .filter_map(|candidate| percent_decode(candidate).ok())
        .collect();
    candidates.extend(decoded);
    candidates.retain(|candidate| !candidate.is_empty());
    candidates
}

/// The DSN with `sslmode` and `sslrootcert` cut out, and their values.
#[derive(Debug, PartialEq, Eq)]
struct SplitDsn {
    rest: String,
    sslmode: Option<String>,
    sslrootcert: Option<String>,
}

/// The URL prefixes libpq (and tokio-postgres) accept, case-sensitively.
const URL_PREFIXES: [&str; 2] = ["postgresql://", "postgres://"];

/// libpq's connection parameter names, and tokio-postgres's `keepalives_retries`. A message
/// about a malformed DSN names a parameter only when it is one of these.
const PARAMETER_NAMES: &[&str] = &[
    "application_name",
    "channel_binding",
    "client_encoding",
    "connect_timeout",
    "dbname",
    "fallback_application_name",
    "gssdelegation",
    "gssencmode",
    "gsslib",
    "host",
    "hostaddr",
    "keepalives",
    "keepalives_count",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_retries",
    "krbsrvname",
    "load_balance_hosts",
    "options",
    "passfile",
    "password",
    "port",
    "replication",
    "require_auth",
    "requirepeer",
    "service",
    "ssl_max_protocol_version",
    "ssl_min_protocol_version",
    "sslcert",
    "sslcertmode",
    "sslcompression",
    "sslcrl",
    "sslcrldir",
    "sslkey",
    "sslmode",
    "sslnegotiation",
    "sslpassword",
    "sslrootcert",
    "sslsni",
    "target_session_attrs",
    "tcp_user_timeout",
    "user",
];

fn split_tls_options(dsn: &str) -> Result<SplitDsn, ReplicationError> {
    let trimmed = dsn.trim();
    if let Some(prefix) = URL_PREFIXES
        .iter()
        .find(|prefix| trimmed.starts_with(**prefix))
    {
        return split_url(trimmed, prefix.len());
    }
    // `scheme://...` before any `=`: meant as a URL, but of another kind (mysql://,
    // jdbc:postgresql://, postgresql+psycopg2://, Postgres://).
    if let Some((scheme, _)) = trimmed.split_once("://")
        && !scheme.contains(|c: char| c == '=' || c.is_whitespace())
    {
        let shown = if scheme.len() <= 32
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.' | ':'))
        {
            format!(", not {scheme}://")
        } else {
            String::new()
        };
        return Err(ReplicationError::InvalidDsn {
            reason: format!("a connection URL must start with postgresql:// or postgres://{shown}"),
        });
    }
    split_key_values(trimmed)
}

/// `url` starts with a prefix of `prefix_len` bytes.
fn split_url(url: &str, prefix_len: usize) -> Result<SplitDsn, ReplicationError> {
    let mut split = SplitDsn {
        rest: String::new(),
        sslmode: None,
        sslrootcert: None,
    };
    // The query starts at the first `?` after the user info, which tokio-postgres (which
    // parses the rest) ends at the first `@`: a `?` in a password is not a query.
    let after_prefix = url.get(prefix_len..).unwrap_or_default();
    let query_search_start = prefix_len + after_prefix.find('@').map_or(0, |at| at + 1);
    let Some(query_start) = url
        .get(query_search_start..)
        .and_then(|tail| tail.find('?'))
        .map(|offset| query_search_start + offset)
    else {
        split.rest = url.to_owned();
        return Ok(split);
    };
    let (base, query) = (&url[..query_start], &url[query_start + 1..]);
    let mut kept = Vec::new();
    let mut pair_start = query_start + 1;
    for pair in query.split('&') {
        let position = character_position(url, pair_start);
        pair_start += pair.len() + 1;
        if pair.is_empty() {
            continue;
        }
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match percent_decode(key)?.as_str() {
            "sslmode" => split.sslmode = Some(percent_decode(value)?),
            "sslrootcert" => split.sslrootcert = Some(percent_decode(value)?),
            name if PARAMETER_NAMES.contains(&name) => kept.push(pair),
            _ => {
                return Err(ReplicationError::InvalidDsn {
                    reason: format!(
                        "unknown URL parameter at character {position} (not shown, as it may \
                         hold a piece of the password)"
                    ),
                });
            }
        }
    }
    split.rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok(split)
}

/// The 1-based character number of byte offset `byte` in `text`, for messages.
fn character_position(text: &str, byte: usize) -> usize {
    text.get(..byte).map_or(0, |head| head.chars().count()) + 1
}

/// A short word of letters, digits and dashes: safe to quote in a message.
fn is_plain_word(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 16
        && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// Whether `name` can be a DNS name or an IP address (IPv6 with an optional `%zone`).
fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '%'))
}

fn percent_decode(text: &str) -> Result<String, ReplicationError> {
    let invalid = || ReplicationError::InvalidDsn {
        reason: "malformed percent-encoding in a URL parameter".into(),
    };
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while let Some(&byte) = bytes.get(index) {
        if byte == b'%' {
            let hex = bytes.get(index + 1..index + 3).ok_or_else(invalid)?;
            let hex = std::str::from_utf8(hex).map_err(|_| invalid())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| invalid())?);
            index += 3;
        } else {
            out.push(byte);
            index += 1;
        }
    }
    String::from_utf8(out).map_err(|_| invalid())
}

/// Walks libpq `key = value` pairs (values optionally single-quoted, backslash escapes) and
/// keeps every pair except the two TLS keys verbatim, so tokio-postgres sees the rest unchanged.
fn split_key_values(dsn: &str) -> Result<SplitDsn, ReplicationError> {
    let mut split = SplitDsn {
        rest: String::new(),
        sslmode: None,
        sslrootcert: None,
    };
    let mut kept: Vec<&str> = Vec::new();
    let mut chars = dsn.char_indices().peekable();
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = chars.peek() else {
            break;
        };
        let mut key_end = start;
        while let Some((index, c)) = chars.next_if(|(_, c)| *c != '=' && !c.is_whitespace()) {
            key_end = index + c.len_utf8();
        }
        let key = &dsn[start..key_end];
        let known = PARAMETER_NAMES.contains(&key);
        let position = character_position(dsn, start);
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        if chars.next_if(|(_, c)| *c == '=').is_none() {
            // A word that is no parameter name may be a piece of the password (one with an
            // unquoted space) or a URL with a mistyped prefix: point at it, do not quote it.
            let reason = if known {
                format!("missing \"=\" after {key}")
            } else {
                format!(
                    "the word at character {position} is not a key=value pair (not shown, as \
                     it may hold a piece of the password); expected key=value pairs separated \
                     by spaces, or a URL starting with postgresql://"
                )
            };
            return Err(ReplicationError::InvalidDsn { reason });
        }
        if !known {
            return Err(ReplicationError::InvalidDsn {
                reason: format!(
                    "unknown parameter name at character {position} (not shown, as it may hold \
                     a piece of the password)"
                ),
            });
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        let mut end = dsn.len();
        if chars.next_if(|(_, c)| *c == '\'').is_some() {
            let mut closed = false;
            while let Some((index, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, escaped)) = chars.next() {
                            value.push(escaped);
                        }
                    }
                    '\'' => {
                        end = index + 1;
                        closed = true;
                        break;
                    }
                    c => value.push(c),
                }
            }
            if !closed {
                return Err(ReplicationError::InvalidDsn {
                    reason: format!("unterminated quoted value for {key}"),
                });
            }
        } else {
            while let Some((index, c)) = chars.next_if(|(_, c)| !c.is_whitespace()) {
                end = index + c.len_utf8();
                if c == '\\' {
                    if let Some((index, escaped)) = chars.next() {
                        end = index + escaped.len_utf8();
                        value.push(escaped);
                    }
                } else {
                    value.push(c);
                }
            }
            if value.is_empty() {
                end = chars.peek().map_or(dsn.len(), |(index, _)| *index);
            }
        }
        match key {
            "sslmode" => split.sslmode = Some(value),
            "sslrootcert" => split.sslrootcert = Some(value),
            _ => kept.push(&dsn[start..end]),
        }
    }
    split.rest = kept.join(" ");
    Ok(split)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_value_dsn_keeps_other_pairs_verbatim() {
        let split = split_tls_options(
            "host=db.example port = 6432 password='a \\'b' sslmode=verify-full sslrootcert='/etc/ca dir/ca.pem' user=app",
        )
        .unwrap();
        assert_eq!(split.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(split.sslrootcert.as_deref(), Some("/etc/ca dir/ca.pem"));
        assert_eq!(
            split.rest,
            "host=db.example port = 6432 password='a \\'b' user=app"
        );
    }

    #[test]
    fn url_dsn_extracts_percent_encoded_tls_keys() {
        let split = split_tls_options(
            "postgres://app:secret@db:5433/orders?sslmode=require&application_name=x&sslrootcert=%2Ftmp%2Fca.pem",
        )
        .unwrap();
        assert_eq!(split.sslmode.as_deref(), Some("require"));
        assert_eq!(split.sslrootcert.as_deref(), Some("/tmp/ca.pem"));
        assert_eq!(
            split.rest,
            "postgres://app:secret@db:5433/orders?application_name=x"
        );
        let split = split_tls_options("postgresql://app@db/orders?sslmode=disable").unwrap();
        assert_eq!(split.rest, "postgresql://app@db/orders");
    }

    #[test]
    fn parses_every_sslmode() {
        for (text, mode) in [
            ("disable", SslMode::Disable),
            ("prefer", SslMode::Prefer),
            ("require", SslMode::Require),
            ("verify-ca", SslMode::VerifyCa),
            ("verify-full", SslMode::VerifyFull),
        ] {
            let config =
                SourceConfig::from_dsn(&format!("host=localhost user=u sslmode={text}")).unwrap();
            assert_eq!(config.ssl_mode(), mode, "{text}");
            assert_eq!(config.tls.is_none(), mode == SslMode::Disable);
        }
        assert!(SourceConfig::from_dsn("host=localhost user=u sslmode=sometimes").is_err());
        let default = SourceConfig::from_dsn("host=localhost user=u").unwrap();
        assert_eq!(default.ssl_mode(), SslMode::Prefer);
    }

    #[test]
    fn require_with_root_cert_verifies_the_chain_like_libpq() {
        let error =
            SourceConfig::from_dsn("host=h user=u sslmode=require sslrootcert=/nonexistent/ca.pem")
                .unwrap_err();
        // The file is read, which proves the mode was upgraded to certificate verification.
        assert!(
            matches!(error, ReplicationError::TlsConfig { .. }),
            "{error}"
        );
    }

    #[test]
    fn display_never_shows_the_password() {
        let config =
            SourceConfig::from_dsn("postgres://app:hunter2@db1:5433,db2:5434/orders").unwrap();
        assert_eq!(config.display(), "app@db1:5433,db2:5434/orders");
        assert!(!format!("{config:?}").contains("hunter2"));
        let config =
            SourceConfig::from_dsn("host=/var/run/postgresql user=app password=hunter2").unwrap();
        assert_eq!(
            config.display(),
            "app@/var/run/postgresql/.s.PGSQL.5432/app"
        );
        let error = SourceConfig::from_dsn("postgres://app:hunter2@db:notaport/x").unwrap_err();
        assert!(!error.to_string().contains("hunter2"), "{error}");
    }

    #[test]
    fn malformed_dsns_point_at_the_problem_without_quoting_it() {
        let reason = |dsn: &str| match SourceConfig::from_dsn(dsn) {
            Err(ReplicationError::InvalidDsn { reason }) => reason,
            other => panic!("{dsn}: {other:?}"),
        };
        assert!(
            reason("mysql://app:hunter2@db/x").ends_with("not mysql://"),
            "the scheme is named"
        );
        assert!(reason("jdbc:postgresql://db/x?password=hunter2").contains("jdbc:postgresql://"));
        // An unquoted space in a password: the second half is pointed at, not shown.
        let split = reason("host=db user=app password=hunt er2");
        assert!(
            split.contains("character 32") && !split.contains("er2"),
            "{split}"
        );
        let unknown = reason("host=db user=app hunter2=x");
        assert!(unknown.contains("character 18") && !unknown.contains("hunter2"));
        let query = reason("postgres://app:hunter2@db/x?hunter2");
        assert!(query.contains("character 29") && !query.contains("hunter2"));
        // Known parameter names are named.
        assert_eq!(reason("host=db user"), "missing \"=\" after user");
        // An unencoded @ in a URL password, and pairs separated by commas.
        assert!(reason("postgres://app:hun@ter2@db/x").contains("host 1 of 1"));
        assert!(reason("host=db,password=hunter2 user=app").contains("host 2 of 2"));
        assert!(reason("host=db user=app,password=hunter2").contains("user value"));
        assert!(reason("host=db user=app sslmode=x\\ hunter2").starts_with("the sslmode value"));
        // A `?` in a URL password does not start the query.
        let config =
            SourceConfig::from_dsn("postgres://app:hun?ter2@db/x?sslmode=disable").unwrap();
        assert_eq!(config.ssl_mode(), SslMode::Disable);
        assert_eq!(config.password(), Some(&b"hun?ter2"[..]));
    }

    #[test]
    fn every_dsn_error_is_scrubbed_of_anything_like_the_password() {
        let leaky = |reason: &str| ReplicationError::InvalidDsn {
            reason: reason.to_owned(),
        };
        for (dsn, secret) in [
            ("host=db password=hunter2 user=app", "hunter2"),
            ("host=db password = 'hunt er2' user=app", "hunt er2"),
            ("postgres://app:hunter2@db/x", "hunter2"),
            ("postgres://app:hun@ter2@db/x", "hun@ter2"),
            ("postgres://app:hun%20ter2@db/x", "hun ter2"),
            ("postgresql:/app:hunter2@db/x", "hunter2"),
            (
                "jdbc:postgresql://db/x?user=app&password=hunter2&ssl=true",
                "hunter2",
            ),
        ] {
            let masked = without_password(leaky(&format!("... {secret} ...")), dsn).to_string();
            assert!(!masked.contains(secret), "{dsn}: {masked}");
            assert!(masked.contains("****"), "{dsn}: {masked}");
        }
    }

    #[test]
    fn missing_user_or_host_is_a_dsn_error() {
        assert!(matches!(
            SourceConfig::from_dsn("host=localhost"),
            Err(ReplicationError::InvalidDsn { .. })
        ));
        let by_address = SourceConfig::from_dsn("hostaddr=10.1.2.3 user=u").unwrap();
        assert_eq!(by_address.display(), "u@10.1.2.3:5432/u");
        assert!(matches!(
            SourceConfig::from_dsn("user=u"),
            Err(ReplicationError::InvalidDsn { .. })
        ));
    }
}
