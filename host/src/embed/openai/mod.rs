//! The remote embedder: `POST {base}/v1/embeddings`, the protocol of OpenAI and of the servers
//! that copy it (Azure OpenAI, Ollama, vLLM, text-embeddings-inference, LM Studio), so a
//! pipeline can embed with a hosted model or a GPU box instead of the in-process MiniLM.
//!
//! One `embed` call (all the texts of a handler call) becomes as few requests as the limits
//! allow: texts are taken in order and a request is closed when it reaches the most inputs or
//! the most estimated tokens per request. Tokens are estimated as UTF-8 bytes / 4, rounded up:
//! free to compute, close for English, low by up to about 1.5x for other scripts, which the
//! default limit leaves room for. The requests run concurrently, up to a limit shared by every
//! call on the embedder, and the vectors are put back in input order by each answer's `index`.
//!
//! Failures are sorted once, per answer: 429 waits for the server's `Retry-After` (or
//! `retry-after-ms`), 408, 5xx, timeouts and connection errors back off exponentially with
//! jitter, and either is retried a bounded number of times before the call fails with
//! [`EmbedError::Unavailable`] (retryable: the pipeline tries the batch again later). Any other
//! 4xx fails at once with the server's own message as [`EmbedError::Rejected`]. Redirects are
//! not followed: they would turn the POST into a GET or send the key to another host.
//!
//! The API key lives in an [`ApiKey`] (whose `Debug` is redacted) and in a header value marked
//! sensitive; server messages are scrubbed of it before they become errors, because some
//! servers echo the key they were sent.
//!
//! TLS is rustls with the ring provider (no C toolchain needed), trusting the system's
//! certificate store (so `SSL_CERT_FILE` and private CAs installed on the machine work) plus
//! the bundled Mozilla roots (so a container without a CA bundle still reaches OpenAI).

mod config;
pub(crate) mod wire;

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use reqwest::{StatusCode, Url};
use tokio::sync::Semaphore;
use tracing::{info, warn};

use super::{EmbedError, Embedder, ModelError};
use wire::{EmbeddingRequest, EmbeddingResponse};

pub use config::{
    API_KEY_ENV, ApiKey, DEFAULT_BASE_URL, DEFAULT_MODEL, FALLBACK_API_KEY_ENV, OpenAiConfig,
    RetryPolicy,
};

/// The text of the request that learns a model's vector size when none is configured.
const PROBE_TEXT: &str = "dimension probe";

/// Vector size assumed when bounding the answer to the probe, whose size is not known yet.
const PROBE_MAX_DIMENSIONS: usize = 16_384;

/// Bytes allowed per vector element in an answer: a float printed as JSON takes at most about
/// 25 (`-1.2345678901234567e-10,`), and pretty-printing servers add indentation.
const MAX_BYTES_PER_ELEMENT: usize = 48;

/// Bytes allowed in an answer beyond its vectors (envelope, `usage`, whitespace).
const RESPONSE_OVERHEAD_BYTES: usize = 64 * 1024;

/// Most bytes of an error answer read; the message is at the start.
const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// Longest wait to open a connection, if the request timeout is not shorter.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// An embedder that calls an OpenAI-compatible `/v1/embeddings` endpoint. Share it with an
/// `Arc`: its connection pool and request limit are per embedder.
pub struct OpenAiEmbedder {
    client: reqwest::Client,
    endpoint: Url,
    /// `Bearer <key>`, marked sensitive so no `Debug` of a request shows it.
    authorization: Option<HeaderValue>,
    /// Kept to scrub it from server messages.
    api_key: Option<ApiKey>,
    model: String,
    model_id: String,
    /// The `dimensions` field sent, if configured.
    requested_dimensions: Option<usize>,
    dimensions: usize,
    max_inputs: usize,
    max_tokens: usize,
    max_concurrent: usize,
    in_flight: Semaphore,
    timeout: Duration,
    retry: RetryPolicy,
}

impl fmt::Debug for OpenAiEmbedder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiEmbedder")
            .field("endpoint", &self.endpoint.as_str())
            .field("model", &self.model)
            .field("dimensions", &self.dimensions)
            .field("api_key", &self.api_key)
            .field("max_inputs", &self.max_inputs)
            .field("max_tokens", &self.max_tokens)
            .field("max_concurrent", &self.max_concurrent)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// How one try of a request ended, when it did not return vectors.
enum Failure {
    /// Trying again may work; `retry_after` is the server's requested wait.
    Transient {
        reason: String,
        source: Option<ModelError>,
        retry_after: Option<Duration>,
    },
    /// Trying again will not help.
    Permanent(EmbedError),
}

impl OpenAiEmbedder {
    /// Checks the configuration, builds the HTTP client and, when `config.dimensions` is
    /// `None`, sends one short request to learn the model's vector size (the sink needs it
    /// before the first batch). Fails if the server cannot be used.
    pub async fn connect(config: OpenAiConfig) -> Result<OpenAiEmbedder, EmbedError> {
        let endpoint = config.endpoint()?;
        if config.api_key.is_none() && endpoint.host_str() == Some("api.openai.com") {
            return Err(EmbedError::Config {
                reason: format!(
                    "no API key for {endpoint}: set {API_KEY_ENV} (or {FALLBACK_API_KEY_ENV})"
                ),
            });
        }
        let authorization = config
            .api_key
            .as_ref()
            .map(|key| {
                let mut value = HeaderValue::from_str(&format!("Bearer {}", key.expose()))
                    .map_err(|_| EmbedError::Config {
                        reason: format!(
                            "the API key in {API_KEY_ENV} (or {FALLBACK_API_KEY_ENV}) holds \
                             characters an HTTP header cannot carry"
                        ),
                    })?;
                value.set_sensitive(true);
                Ok::<_, EmbedError>(value)
            })
            .transpose()?;
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls_config()?)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT.min(config.request_timeout))
            .user_agent(concat!("pgstream-host/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|error| EmbedError::Config {
                reason: format!("cannot build the HTTP client: {error}"),
            })?;

        let mut embedder = OpenAiEmbedder {
            client,
            endpoint,
            authorization,
            api_key: config.api_key,
            model: config.model,
            model_id: String::new(),
            requested_dimensions: config.dimensions,
            dimensions: config.dimensions.unwrap_or(0),
            max_inputs: config.max_inputs_per_request,
            max_tokens: config.max_tokens_per_request,
            max_concurrent: config.max_concurrent_requests,
            in_flight: Semaphore::new(config.max_concurrent_requests),
            timeout: config.request_timeout,
            retry: config.retry,
        };
        if embedder.requested_dimensions.is_none() {
            let probe = [PROBE_TEXT.to_owned()];
            let vectors = embedder.request(&probe, None).await?;
            embedder.dimensions = vectors.first().map_or(0, Vec::len);
            info!(
                endpoint = %embedder.endpoint,
                model = %embedder.model,
                dimensions = embedder.dimensions,
                "asked the embedding server once for the model's vector size \
                 (pass --dimensions to skip this request)"
            );
        }
        embedder.model_id = format!(
            "openai:{}:{}@{}",
            embedder.model, embedder.dimensions, embedder.endpoint
        );
        Ok(embedder)
    }

    /// Sends one request of `texts`, retrying as the policy allows, and returns one vector
    /// per text in order. `expected` is the vector size every answer must have (`None` only
    /// for the probe).
    async fn request(
        &self,
        texts: &[String],
        expected: Option<usize>,
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        let body = serde_json::to_vec(&EmbeddingRequest {
            model: &self.model,
            input: texts,
            encoding_format: "float",
            dimensions: self.requested_dimensions,
        })
        .map(Bytes::from)
        .map_err(|error| self.invalid(format!("cannot encode the request: {error}")))?;
        let max_response_bytes = texts
            .len()
            .saturating_mul(expected.unwrap_or(PROBE_MAX_DIMENSIONS))
            .saturating_mul(MAX_BYTES_PER_ELEMENT)
            .saturating_add(RESPONSE_OVERHEAD_BYTES);

        let mut attempt = 0;
        loop {
            attempt += 1;
            let outcome = {
                // The permit covers the HTTP exchange only, not the waits between tries, so a
                // request backing off does not hold back the others.
                let _permit = self.in_flight.acquire().await.ok();
                self.try_once(body.clone(), max_response_bytes).await
            };
            let (reason, source, retry_after) = match outcome {
                Ok(answer) => return self.vectors(&answer, texts.len(), expected),
                Err(Failure::Permanent(error)) => return Err(error),
                Err(Failure::Transient {
                    reason,
                    source,
                    retry_after,
                }) => (reason, source, retry_after),
            };
            let unavailable =
                |reason: String, source: Option<ModelError>| EmbedError::Unavailable {
                    endpoint: self.endpoint.to_string(),
                    attempts: attempt,
                    reason,
                    source,
                };
            if attempt >= self.retry.max_attempts {
                return Err(unavailable(reason, source));
            }
            let wait = match retry_after {
                Some(wait) if wait > self.retry.max_retry_after => {
                    return Err(unavailable(
                        format!(
                            "{reason}; the server asked to wait {} s, longer than the {} s this \
                             host waits",
                            wait.as_secs(),
                            self.retry.max_retry_after.as_secs()
                        ),
                        source,
                    ));
                }
                Some(wait) => wait,
                None => self.retry.backoff(attempt),
            };
            warn!(
                endpoint = %self.endpoint,
                attempt,
                max_attempts = self.retry.max_attempts,
                wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                texts = texts.len(),
                "embedding request failed, retrying: {reason}"
            );
            tokio::time::sleep(wait).await;
        }
    }

    /// One HTTP exchange: the answer's body on 2xx, else the failure sorted for retrying.
    async fn try_once(&self, body: Bytes, max_response_bytes: usize) -> Result<Vec<u8>, Failure> {
        let mut request = self
            .client
            .post(self.endpoint.clone())
            .timeout(self.timeout)
            .header(CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(authorization) = &self.authorization {
            request = request.header(AUTHORIZATION, authorization.clone());
        }
        let response = request
            .send()
            .await
            .map_err(|error| self.transport_failure(error))?;
        let status = response.status();
        let retry_after = wire::retry_after(response.headers(), SystemTime::now());

        if status.is_success() {
            return match read_body(response, max_response_bytes).await {
                Ok((body, false)) => Ok(body),
                Ok((_, true)) => Err(Failure::Permanent(self.invalid(format!(
                    "the answer is larger than the {max_response_bytes} bytes expected for \
                     this request"
                )))),
                Err(error) => Err(self.transport_failure(error)),
            };
        }
        if status.is_redirection() {
            let target = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|value| value.to_str().ok())
                .unwrap_or("elsewhere")
                .to_owned();
            return Err(Failure::Permanent(self.rejected(
                status,
                format!("the server redirects to {target}; set the base URL to the final address"),
            )));
        }
        // A body cut short is still worth quoting; the status alone decides what happens next.
        let body = match read_body(response, MAX_ERROR_BODY_BYTES).await {
            Ok((body, _)) => body,
            Err(_) => Vec::new(),
        };
        let message = server_message(&body, self.api_key.as_ref());
        match status {
            StatusCode::TOO_MANY_REQUESTS if wire::is_quota_exhausted(&body) => {
                Err(Failure::Permanent(self.rejected(status, message)))
            }
            StatusCode::TOO_MANY_REQUESTS | StatusCode::REQUEST_TIMEOUT => {
                Err(Failure::Transient {
                    reason: format!("HTTP {status}: {message}"),
                    source: None,
                    retry_after,
                })
            }
            status if status.is_server_error() => Err(Failure::Transient {
                reason: format!("HTTP {status}: {message}"),
                source: None,
                retry_after,
            }),
            status => {
                let hint = match status {
                    StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                        format!("; check the API key in {API_KEY_ENV} (or {FALLBACK_API_KEY_ENV})")
                    }
                    StatusCode::NOT_FOUND => {
                        "; check --openai-base-url and --openai-model".to_owned()
                    }
                    _ => String::new(),
                };
                Err(Failure::Permanent(
                    self.rejected(status, format!("{message}{hint}")),
                ))
            }
        }
    }

    /// The vectors of a 2xx answer, in request order, each checked for size.
    fn vectors(
        &self,
        answer: &[u8],
        count: usize,
        expected: Option<usize>,
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        let response: EmbeddingResponse = serde_json::from_slice(answer).map_err(|error| {
            self.invalid(format!(
                "not an embeddings response ({error}); is the base URL an OpenAI-compatible \
                 server?"
            ))
        })?;
        if response.data.len() != count {
            return Err(self.invalid(format!("{} vectors for {count} texts", response.data.len())));
        }
        let mut slots: Vec<Option<Vec<f32>>> = vec![None; count];
        for item in response.data {
            let actual = item.embedding.len();
            match expected {
                Some(expected) if actual != expected => {
                    return Err(EmbedError::DimensionMismatch {
                        model: self.model.clone(),
                        expected,
                        actual,
                    });
                }
                None if actual == 0 => return Err(self.invalid("an empty vector".into())),
                _ => {}
            }
            match slots.get_mut(item.index) {
                Some(slot @ None) => *slot = Some(item.embedding),
                Some(Some(_)) => {
                    return Err(self.invalid(format!("index {} appears twice", item.index)));
                }
                None => {
                    return Err(self.invalid(format!(
                        "index {} for a request of {count} texts",
                        item.index
                    )));
                }
            }
        }
        // Every slot is filled: `count` distinct in-range indexes were seen.
        Ok(slots.into_iter().flatten().collect())
    }

    fn transport_failure(&self, error: reqwest::Error) -> Failure {
        if let Some(problem) = certificate_problem(&error) {
            return Failure::Permanent(EmbedError::Config {
                reason: format!(
                    "the TLS certificate of the embedding server {} is not trusted ({problem}); \
                     the system's and Mozilla's root certificates are trusted, and a server \
                     whose certificate comes from a private CA is trusted once SSL_CERT_FILE \
                     names a PEM file holding that CA's certificate",
                    self.endpoint
                ),
            });
        }
        let reason = if error.is_timeout() {
            format!("no complete answer within {} ms", self.timeout.as_millis())
        } else if error.is_connect() {
            "cannot connect".to_owned()
        } else {
            "the connection failed".to_owned()
        };
        Failure::Transient {
            reason,
            // The URL is already in the error's endpoint field.
            source: Some(Box::new(error.without_url())),
            retry_after: None,
        }
    }

    fn rejected(&self, status: StatusCode, message: String) -> EmbedError {
        EmbedError::Rejected {
            endpoint: self.endpoint.to_string(),
            status: status.as_u16(),
            message,
        }
    }

    fn invalid(&self, reason: String) -> EmbedError {
        EmbedError::InvalidResponse {
            endpoint: self.endpoint.to_string(),
            reason,
        }
    }
}

#[async_trait]
impl Embedder for OpenAiEmbedder {
    fn model_id(&self) -> &str {
        &self.model_id
    }

    fn dimensions(&self) -> usize {
        self.dimensions
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut vectors: Vec<Vec<f32>> = vec![Vec::new(); texts.len()];
        let requests = plan_requests(texts, self.max_inputs, self.max_tokens);
        let mut answers = futures::stream::iter(requests.into_iter().map(|range| async move {
            let answer = self
                .request(&texts[range.clone()], Some(self.dimensions))
                .await;
            answer.map(|answer| (range, answer))
        }))
        .buffer_unordered(self.max_concurrent);
        // The first failure returns and drops the stream, which cancels the requests still in
        // flight: the batch fails as a whole and is retried as a whole.
        while let Some(answer) = answers.next().await {
            let (range, answer) = answer?;
            for (slot, vector) in vectors[range].iter_mut().zip(answer) {
                *slot = vector;
            }
        }
        Ok(vectors)
    }
}

/// A text's estimated token count: its UTF-8 bytes / 4, rounded up, at least 1.
fn estimated_tokens(text: &str) -> usize {
    text.len().div_ceil(4).max(1)
}

/// Cuts `texts` into consecutive ranges of at most `max_inputs` texts and `max_tokens`
/// estimated tokens; a text over `max_tokens` by itself gets a range of its own.
fn plan_requests(texts: &[String], max_inputs: usize, max_tokens: usize) -> Vec<Range<usize>> {
    let mut ranges = Vec::new();
    let mut start = 0;
    let mut tokens = 0usize;
    for (index, text) in texts.iter().enumerate() {
        let cost = estimated_tokens(text);
        if index > start
            && (index - start >= max_inputs || tokens.saturating_add(cost) > max_tokens)
        {
            ranges.push(start..index);
            start = index;
            tokens = 0;
        }
        tokens = tokens.saturating_add(cost);
    }
    if start < texts.len() {
        ranges.push(start..texts.len());
    }
    ranges
}

/// Reads at most `limit` bytes of the body; the flag says whether there was more.
async fn read_body(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let declared = response
        .content_length()
        .and_then(|length| usize::try_from(length).ok());
    if declared.is_some_and(|length| length > limit) {
        return Ok((Vec::new(), true));
    }
    let mut body = Vec::with_capacity(declared.unwrap_or(0));
    while let Some(chunk) = response.chunk().await? {
        let room = limit - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok((body, true));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, false))
}

/// The server's error message in `body`, with the API key removed first: a key the server
/// echoes could be cut in two by the quote's length limit, and half a key would no longer
/// match.
fn server_message(body: &[u8], key: Option<&ApiKey>) -> String {
    let text = String::from_utf8_lossy(body);
    match key {
        Some(key) if text.contains(key.expose()) => {
            wire::error_message(text.replace(key.expose(), "<redacted>").as_bytes())
        }
        _ => wire::error_message(body),
    }
}

/// The rustls certificate error somewhere in `error`'s chain of causes, if any: a server the
/// client does not trust is refused the same way on every try.
fn certificate_problem(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cause = Some(error);
    while let Some(current) = cause {
        if let Some(rustls::Error::InvalidCertificate(problem)) =
            current.downcast_ref::<rustls::Error>()
        {
            return Some(format!("{problem:?}"));
        }
        // An I/O error's `source` skips the error it wraps, which is where the TLS layer
        // puts its own.
        cause = match current.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => current.source(),
        };
    }
    None
}

/// rustls with ring, trusting the system store and the bundled Mozilla roots.
/// The TLS settings of every HTTPS client of the host: the bundled and the system's roots,
/// the ring provider.
pub(crate) fn tls_config() -> Result<rustls::ClientConfig, EmbedError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // Unreadable or malformed system certificates are skipped: the bundled roots remain.
    let system = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(system.certs);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| EmbedError::Config {
            reason: format!("cannot set up TLS: {error}"),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_removed_before_a_long_body_is_cut_short() {
        let key = ApiKey::new("sk-proj-0123456789abcdefghijklmnopqrstuvwxyz").unwrap();
        // Not JSON, so the body itself is quoted, and the cut falls inside the key.
        let body = format!("{}{} and more", "x".repeat(290), key.expose());
        let message = server_message(body.as_bytes(), Some(&key));
        assert!(!message.contains("sk-proj-01"), "{message}");
        assert!(
            server_message(body.as_bytes(), None).contains("sk-proj-01"),
            "the cut does fall inside the key"
        );
    }

    #[test]
    fn an_untrusted_certificate_is_found_behind_the_io_error_that_carries_it() {
        #[derive(Debug, thiserror::Error)]
        #[error("error sending request")]
        struct Transport(#[source] std::io::Error);
        let refused = Transport(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        ));
        assert_eq!(
            certificate_problem(&refused).as_deref(),
            Some("UnknownIssuer")
        );
        let down = Transport(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(certificate_problem(&down), None);
    }

    fn texts(lengths: &[usize]) -> Vec<String> {
        lengths.iter().map(|&n| "x".repeat(n)).collect()
    }

    #[test]
    fn tokens_are_bytes_over_four_rounded_up() {
        assert_eq!(estimated_tokens(""), 1);
        assert_eq!(estimated_tokens("abcd"), 1);
        assert_eq!(estimated_tokens("abcde"), 2);
        // Four bytes each in UTF-8.
        assert_eq!(estimated_tokens("😀😀"), 2);
    }

    #[test]
    fn requests_are_cut_by_inputs() {
        let batch = texts(&[4; 7]);
        assert_eq!(plan_requests(&batch, 3, 1000), vec![0..3, 3..6, 6..7]);
        assert_eq!(plan_requests(&batch, 7, 1000), vec![0..7]);
        assert!(plan_requests(&[], 3, 1000).is_empty());
    }

    #[test]
    fn requests_are_cut_by_tokens_and_an_oversized_text_goes_alone() {
        // Estimated tokens: 1, 2, 3, 10, 1, 1.
        let batch = texts(&[4, 8, 12, 40, 1, 1]);
        assert_eq!(plan_requests(&batch, 100, 5), vec![0..2, 2..3, 3..4, 4..6]);
        assert_eq!(plan_requests(&batch, 2, 5), vec![0..2, 2..3, 3..4, 4..6]);
        assert_eq!(plan_requests(&batch, 1, 1000).len(), 6);
    }
}
