//! A minimal Postgres client for the replication protocol: connect (TCP or Unix socket),
//! negotiate TLS, start up with `replication=database`, authenticate, and send the one command
//! that turns the connection into a CopyBoth stream.
//!
//! It is built on `postgres-protocol`'s message codecs rather than tokio-postgres because
//! tokio-postgres cannot speak this protocol: it has no way to set the `replication` startup
//! parameter and no CopyBoth sub-protocol (its `copy_out`/`copy_in` are one-directional, while
//! logical replication needs to read WAL frames and write standby status updates on the same
//! connection at the same time). Owning the socket also lets the stream slice WAL payloads out of
//! its read buffer without copying.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::{Header, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_postgres::config::ChannelBinding as ChannelBindingPolicy;

use super::config::{Endpoint, SourceConfig, SslMode};
use super::error::{ReplicationError, ServerError};
use super::tls::server_end_point_hash;

/// The largest backend message accepted. Postgres never allocates more than 1 GiB for a single
/// value, so a longer length is a corrupt stream, not data to buffer.
pub(crate) const MAX_MESSAGE_LEN: usize = (1 << 30) + (1 << 20);

/// Tag of `CopyBothResponse`, which `postgres-protocol`'s parser does not know.
const COPY_BOTH_RESPONSE_TAG: u8 = b'W';

/// The byte stream under a connection.
pub(crate) enum Transport {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Unix(UnixStream),
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Transport::Tls(stream) => Pin::new(stream).poll_read(cx, buf),
            Transport::Unix(stream) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Transport::Tls(stream) => Pin::new(stream).poll_write(cx, buf),
            Transport::Unix(stream) => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Transport::Tls(stream) => Pin::new(stream).poll_flush(cx),
            Transport::Unix(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Transport::Tls(stream) => Pin::new(stream).poll_shutdown(cx),
            Transport::Unix(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }
}

/// What `read_message` returns: a parsed message, or the CopyBothResponse the parser lacks.
pub(crate) enum Incoming {
    Message(Message),
    CopyBoth,
}

/// An authenticated replication connection, idle (ready for a command).
pub(crate) struct ReplicationConnection {
    pub(crate) transport: Transport,
    pub(crate) read_buf: BytesMut,
    pub(crate) target: String,
}

impl ReplicationConnection {
    /// Tries each endpoint in DSN order and returns the first that accepts us; otherwise the
    /// last endpoint's error.
    pub(crate) async fn connect(source: &SourceConfig) -> Result<Self, ReplicationError> {
        let mut last_error = None;
        for endpoint in &source.endpoints {
            let attempt = Self::connect_endpoint(source, endpoint);
            let result = match source.connect_timeout() {
                Some(limit) => tokio::time::timeout(limit, attempt)
                    .await
                    .unwrap_or_else(|_| {
                        Err(ReplicationError::ConnectTimeout {
                            target: endpoint.target(),
                        })
                    }),
                None => attempt.await,
            };
            match result {
                Ok(connection) => return Ok(connection),
                Err(error) => {
                    tracing::debug!(target = %endpoint.target(), %error, "replication connect attempt failed");
                    last_error = Some(error);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| ReplicationError::InvalidDsn {
            reason: "no host".into(),
        }))
    }

    async fn connect_endpoint(
        source: &SourceConfig,
        endpoint: &Endpoint,
    ) -> Result<Self, ReplicationError> {
        let target = endpoint.target();
        let connect_error = |source| ReplicationError::Connect {
            target: target.clone(),
            source,
        };
        let (transport, channel_binding) = match endpoint {
            // Like libpq, TLS is not negotiated over Unix sockets: the kernel is the transport.
            Endpoint::Unix { dir, port } => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                let stream = UnixStream::connect(&path).await.map_err(connect_error)?;
                (Transport::Unix(stream), None)
            }
            Endpoint::Tcp {
                host,
                address,
                port,
            } => {
                let stream = match address {
                    Some(address) => TcpStream::connect((*address, *port)).await,
                    None => TcpStream::connect((host.as_str(), *port)).await,
                }
                .map_err(connect_error)?;
                stream.set_nodelay(true).map_err(connect_error)?;
                detect_dead_peers(&stream).map_err(connect_error)?;
                match (&source.tls, source.ssl_mode) {
                    (Some(tls), mode) if mode != SslMode::Disable => {
                        negotiate_tls(stream, host, tls.clone(), mode, &target).await?
                    }
                    _ => (Transport::Plain(stream), None),
                }
            }
        };
        let mut connection = ReplicationConnection {
            transport,
            read_buf: BytesMut::with_capacity(64 * 1024),
            target,
        };
        connection.startup(source, channel_binding).await?;
        Ok(connection)
    }

    async fn startup(
        &mut self,
        source: &SourceConfig,
        end_point_hash: Option<Vec<u8>>,
    ) -> Result<(), ReplicationError> {
        let mut params = vec![
            ("user", source.user.as_str()),
            ("database", source.dbname.as_str()),
            ("replication", "database"),
            ("client_encoding", "UTF8"),
        ];
        if let Some(name) = source.application_name() {
            params.push(("application_name", name));
        }
        if let Some(options) = source.options() {
            params.push(("options", options));
        }
        let mut out = BytesMut::new();
        frontend::startup_message(params, &mut out).map_err(|error| self.io_error(error))?;
        self.write(&out).await?;

        let target = self.target.clone();
        let auth_error = |target: &str, reason: String| ReplicationError::Auth {
            target: target.to_owned(),
            user: source.user.clone(),
            reason,
        };
        let password = || {
            source.password().ok_or_else(|| {
                auth_error(
                    &target,
                    "the server asks for a password but the DSN has none".into(),
                )
            })
        };
        loop {
            let message = match self.read_message().await? {
                Incoming::Message(message) => message,
                Incoming::CopyBoth => {
                    return Err(ReplicationError::Protocol(
                        "CopyBothResponse during startup".into(),
                    ));
                }
            };
            match message {
                Message::AuthenticationOk => break,
                Message::AuthenticationCleartextPassword => {
                    let mut out = BytesMut::new();
                    frontend::password_message(password()?, &mut out)
                        .map_err(|error| self.io_error(error))?;
                    self.write(&out).await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let hash = md5_hash(source.user.as_bytes(), password()?, body.salt());
                    let mut out = BytesMut::new();
                    frontend::password_message(hash.as_bytes(), &mut out)
                        .map_err(|error| self.io_error(error))?;
                    self.write(&out).await?;
                }
                Message::AuthenticationSasl(body) => {
                    let password = password()?.to_vec();
                    self.authenticate_scram(source, &body, &password, end_point_hash.as_deref())
                        .await?;
                }
                Message::ErrorResponse(body) => {
                    let error = ServerError::from_fields(body.fields())?;
                    return Err(if error.code.starts_with("28") {
                        auth_error(&self.target, error.to_string())
                    } else {
                        ReplicationError::Server(error)
                    });
                }
                Message::NoticeResponse(_) => {}
                _ => {
                    return Err(auth_error(
                        &self.target,
                        "the server asks for an authentication method this client does not support (GSSAPI/SSPI/Kerberos)".into(),
                    ));
                }
            }
        }
        // After AuthenticationOk the server reports parameters and its key, then ReadyForQuery.
        loop {
            match self.read_message().await? {
                Incoming::Message(Message::ReadyForQuery(_)) => return Ok(()),
                Incoming::Message(Message::ErrorResponse(body)) => {
                    return Err(ReplicationError::Server(ServerError::from_fields(
                        body.fields(),
                    )?));
                }
                Incoming::Message(
                    Message::ParameterStatus(_)
                    | Message::BackendKeyData(_)
                    | Message::NoticeResponse(_),
                ) => {}
                _ => {
                    return Err(ReplicationError::Protocol(
                        "unexpected message during startup".into(),
                    ));
                }
            }
        }
    }

    async fn authenticate_scram(
        &mut self,
        source: &SourceConfig,
        body: &postgres_protocol::message::backend::AuthenticationSaslBody,
        password: &[u8],
        end_point_hash: Option<&[u8]>,
    ) -> Result<(), ReplicationError> {
        use fallible_iterator::FallibleIterator;

        let target = self.target.clone();
        let auth_error = |reason: String| ReplicationError::Auth {
            target: target.clone(),
            user: source.user.clone(),
            reason,
        };
        let mut plain = false;
        let mut plus = false;
        let mut mechanisms = body.mechanisms();
        while let Some(mechanism) = mechanisms.next().map_err(|error| {
            ReplicationError::Protocol(format!("malformed SASL mechanisms: {error}"))
        })? {
            plain |= mechanism == sasl::SCRAM_SHA_256;
            plus |= mechanism == sasl::SCRAM_SHA_256_PLUS;
        }
        let wants_binding = source.channel_binding != ChannelBindingPolicy::Disable;
        let (mechanism, binding) = match end_point_hash {
            Some(hash) if plus && wants_binding => (
                sasl::SCRAM_SHA_256_PLUS,
                ChannelBinding::tls_server_end_point(hash.to_vec()),
            ),
            // Over TLS we could bind but the server did not offer it: say so ("y"), which lets
            // the server detect a downgrade attack.
            Some(_) if plain && wants_binding => {
                (sasl::SCRAM_SHA_256, ChannelBinding::unrequested())
            }
            _ if plain => (sasl::SCRAM_SHA_256, ChannelBinding::unsupported()),
            _ => {
                return Err(auth_error(
                    "the server offers no SCRAM-SHA-256 mechanism".into(),
                ));
            }
        };
        if source.channel_binding == ChannelBindingPolicy::Require
            && mechanism != sasl::SCRAM_SHA_256_PLUS
        {
            return Err(auth_error(
                "channel_binding=require but channel binding is not possible (needs TLS and a server offering SCRAM-SHA-256-PLUS)".into(),
            ));
        }
        let mut scram = ScramSha256::new(password, binding);
        let mut out = BytesMut::new();
        frontend::sasl_initial_response(mechanism, scram.message(), &mut out)
            .map_err(|error| self.io_error(error))?;
        self.write(&out).await?;

        let bad_proof = |error: io::Error| auth_error(format!("SCRAM exchange failed: {error}"));
        match self.read_auth_step(&source.user).await? {
            Message::AuthenticationSaslContinue(body) => {
                scram.update(body.data()).map_err(bad_proof)?
            }
            _ => {
                return Err(ReplicationError::Protocol(
                    "expected AuthenticationSASLContinue".into(),
                ));
            }
        }
        out.clear();
        frontend::sasl_response(scram.message(), &mut out).map_err(|error| self.io_error(error))?;
        self.write(&out).await?;
        match self.read_auth_step(&source.user).await? {
            Message::AuthenticationSaslFinal(body) => scram.finish(body.data()).map_err(bad_proof),
            _ => Err(ReplicationError::Protocol(
                "expected AuthenticationSASLFinal".into(),
            )),
        }
    }

    /// Reads the next authentication message, turning an ErrorResponse into an auth error.
    async fn read_auth_step(&mut self, user: &str) -> Result<Message, ReplicationError> {
        match self.read_message().await? {
            Incoming::Message(Message::ErrorResponse(body)) => {
                let error = ServerError::from_fields(body.fields())?;
                Err(ReplicationError::Auth {
                    target: self.target.clone(),
                    user: user.to_owned(),
                    reason: error.to_string(),
                })
            }
            Incoming::Message(message) => Ok(message),
            Incoming::CopyBoth => Err(ReplicationError::Protocol(
                "unexpected CopyBothResponse".into(),
            )),
        }
    }

    /// Sends `query` (a replication command such as START_REPLICATION) and waits for the server
    /// to switch to CopyBoth mode.
    pub(crate) async fn start_copy_both(&mut self, query: &str) -> Result<(), ReplicationError> {
        let mut out = BytesMut::new();
        frontend::query(query, &mut out).map_err(|error| self.io_error(error))?;
        self.write(&out).await?;
        loop {
            match self.read_message().await? {
                Incoming::CopyBoth => return Ok(()),
                Incoming::Message(Message::ErrorResponse(body)) => {
                    return Err(ReplicationError::Server(ServerError::from_fields(
                        body.fields(),
                    )?));
                }
                Incoming::Message(Message::NoticeResponse(_) | Message::ParameterStatus(_)) => {}
                Incoming::Message(_) => {
                    return Err(ReplicationError::Protocol(
                        "unexpected reply to START_REPLICATION".into(),
                    ));
                }
            }
        }
    }

    /// Runs a command that returns one value (e.g. `SHOW wal_sender_timeout`, which the
    /// walsender supports) and returns the first column of the first row.
    pub(crate) async fn query_value(
        &mut self,
        query: &str,
    ) -> Result<Option<String>, ReplicationError> {
        use fallible_iterator::FallibleIterator;

        let mut out = BytesMut::new();
        frontend::query(query, &mut out).map_err(|error| self.io_error(error))?;
        self.write(&out).await?;
        let mut value = None;
        let mut failure = None;
        // Read through ReadyForQuery even after an error so the connection stays usable.
        loop {
            match self.read_message().await? {
                Incoming::Message(Message::DataRow(row)) if value.is_none() => {
                    let first = row.ranges().next().map_err(|error| {
                        ReplicationError::Protocol(format!("malformed DataRow: {error}"))
                    })?;
                    if let Some(Some(range)) = first {
                        let bytes = row.buffer().get(range).ok_or_else(|| {
                            ReplicationError::Protocol("DataRow column out of bounds".into())
                        })?;
                        value = Some(String::from_utf8_lossy(bytes).into_owned());
                    }
                }
                Incoming::Message(Message::ErrorResponse(body)) => {
                    failure = Some(ServerError::from_fields(body.fields())?);
                }
                Incoming::Message(Message::ReadyForQuery(_)) => break,
                Incoming::Message(_) => {}
                Incoming::CopyBoth => {
                    return Err(ReplicationError::Protocol(format!(
                        "unexpected CopyBothResponse to {query}"
                    )));
                }
            }
        }
        match failure {
            Some(error) => Err(ReplicationError::Server(error)),
            None => Ok(value),
        }
    }

    /// Reads one whole backend message, after checking its declared length against
    /// [`MAX_MESSAGE_LEN`].
    async fn read_message(&mut self) -> Result<Incoming, ReplicationError> {
        loop {
            if let Some(header) = Header::parse(&self.read_buf)
                .map_err(|error| ReplicationError::Protocol(error.to_string()))?
            {
                let total = usize::try_from(header.len())
                    .ok()
                    .filter(|len| *len <= MAX_MESSAGE_LEN)
                    .ok_or_else(|| {
                        ReplicationError::Protocol(format!(
                            "message length {} out of range",
                            header.len()
                        ))
                    })?
                    + 1;
                if self.read_buf.len() >= total {
                    if header.tag() == COPY_BOTH_RESPONSE_TAG {
                        // The column formats that follow are meaningless for replication.
                        let _ = self.read_buf.split_to(total);
                        return Ok(Incoming::CopyBoth);
                    }
                    return match Message::parse(&mut self.read_buf) {
                        Ok(Some(message)) => Ok(Incoming::Message(message)),
                        Ok(None) => Err(ReplicationError::Protocol("incomplete message".into())),
                        Err(error) => Err(ReplicationError::Protocol(error.to_string())),
                    };
                }
                self.read_buf.reserve(total - self.read_buf.len());
            }
            self.read_more().await?;
        }
    }

    async fn read_more(&mut self) -> Result<(), ReplicationError> {
        if self.read_buf.capacity() - self.read_buf.len() < 4096 {
            self.read_buf.reserve(64 * 1024);
        }
        let read = self
            .transport
            .read_buf(&mut self.read_buf)
            .await
            .map_err(|error| self.io_error(error))?;
        if read == 0 {
            return Err(ReplicationError::Closed {
                target: self.target.clone(),
            });
        }
        Ok(())
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), ReplicationError> {
        self.transport
            .write_all(bytes)
            .await
            .map_err(|error| self.io_error(error))?;
        self.transport
            .flush()
            .await
            .map_err(|error| self.io_error(error))
    }

    fn io_error(&self, source: io::Error) -> ReplicationError {
        ReplicationError::Io {
            target: self.target.clone(),
            source,
        }
    }
}

/// Sends SSLRequest and, if the server agrees, performs the TLS handshake. Returns the transport
/// and, for TLS, the channel-binding hash of the server certificate.
async fn negotiate_tls(
    mut stream: TcpStream,
    host: &str,
    tls: std::sync::Arc<rustls::ClientConfig>,
    mode: SslMode,
    target: &str,
) -> Result<(Transport, Option<Vec<u8>>), ReplicationError> {
    let io_error = |source| ReplicationError::Io {
        target: target.to_owned(),
        source,
    };
    let mut out = BytesMut::new();
    frontend::ssl_request(&mut out);
    stream.write_all(&out).await.map_err(io_error)?;
    let answer = stream.read_u8().await.map_err(io_error)?;
    match answer {
        b'S' => {}
        b'N' if mode == SslMode::Prefer => return Ok((Transport::Plain(stream), None)),
        b'N' => {
            return Err(ReplicationError::TlsRefused {
                target: target.to_owned(),
            });
        }
        other => {
            return Err(ReplicationError::Protocol(format!(
                "unexpected answer {other:#x} to SSLRequest"
            )));
        }
    }
    let server_name = rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|_| {
        ReplicationError::InvalidDsn {
            reason: format!("{host:?} is not a valid TLS server name"),
        }
    })?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(server_name, stream)
        .await
        .map_err(|source| ReplicationError::Tls {
            target: target.to_owned(),
            source,
        })?;
    let end_point_hash = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|cert| server_end_point_hash(cert));
    Ok((Transport::Tls(Box::new(stream)), end_point_hash))
}

/// A replication connection is mostly idle in one direction: our status updates reset the
/// server's keepalive timer, so after a silent network partition (no RST) nothing would notice
/// the dead peer until the kernel gave up retransmitting, some 15 minutes later. TCP keepalives
/// and a user timeout bound that to about a minute, after which the pipeline reconnects.
fn detect_dead_peers(stream: &TcpStream) -> std::io::Result<()> {
    let socket = socket2::SockRef::from(stream);
    socket.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(std::time::Duration::from_secs(30))
            .with_interval(std::time::Duration::from_secs(10))
            .with_retries(3),
    )?;
    socket.set_tcp_user_timeout(Some(std::time::Duration::from_secs(60)))
}
