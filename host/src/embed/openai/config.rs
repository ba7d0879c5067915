//! What an [`OpenAiEmbedder`](super::OpenAiEmbedder) is told: where the server is, which model,
//! the API key (kept in a type that never prints it), and the limits that shape its requests.
//!
//! The defaults fit OpenAI's own API (2048 inputs and about 300,000 tokens per request); a
//! self-hosted server may need smaller ones (text-embeddings-inference accepts 32 inputs per
//! request unless started with a larger `--max-client-batch-size`).

use std::fmt;
use std::time::Duration;

use reqwest::Url;

use crate::embed::EmbedError;

/// Environment variable read first for the API key.
pub const API_KEY_ENV: &str = "PGSTREAM_OPENAI_API_KEY";

/// Environment variable read when [`API_KEY_ENV`] is unset or empty (the name OpenAI's own
/// clients use).
pub const FALLBACK_API_KEY_ENV: &str = "OPENAI_API_KEY";

/// OpenAI's API, the default server.
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com";

/// OpenAI's cheapest current embedding model (1536 dimensions, shortenable).
pub const DEFAULT_MODEL: &str = "text-embedding-3-small";

/// A bearer token. Its `Debug` shows `ApiKey(<redacted>)` and it has no `Display`, so it cannot
/// end up in a log line or an error message by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key; surrounding whitespace (a trailing newline from `$(cat keyfile)`) is
    /// dropped. `None` for an empty key.
    pub fn new(key: &str) -> Option<ApiKey> {
        let key = key.trim();
        (!key.is_empty()).then(|| ApiKey(key.to_owned()))
    }

    /// The key from [`API_KEY_ENV`], else from [`FALLBACK_API_KEY_ENV`]; `None` when neither
    /// holds one (fine for servers without authentication, such as a local Ollama).
    pub fn from_env() -> Option<ApiKey> {
        [API_KEY_ENV, FALLBACK_API_KEY_ENV]
            .into_iter()
            .find_map(|name| std::env::var(name).ok().and_then(|key| ApiKey::new(&key)))
    }

    /// The secret itself, for the `Authorization` header and for redaction.
    pub(super) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// How an [`OpenAiEmbedder`](super::OpenAiEmbedder) reaches its server and sizes its requests.
#[derive(Debug, Clone)]
pub struct OpenAiConfig {
    /// Server root: `https://api.openai.com`, `http://localhost:11434` (Ollama), ... Requests
    /// go to `{base_url}/v1/embeddings`; a base that already ends in `/v1` is not doubled.
    pub base_url: String,
    /// The `model` field of each request (for Azure OpenAI: the deployment name).
    pub model: String,
    /// Sent as `Authorization: Bearer <key>`; no header when `None`.
    pub api_key: Option<ApiKey>,
    /// The `dimensions` request field, for models that can shorten their vectors
    /// (`text-embedding-3-*`). `None`: the model's own size, learned by one probe request at
    /// [`connect`](super::OpenAiEmbedder::connect).
    pub dimensions: Option<usize>,
    /// Longest one HTTP request may take, from connecting to the last byte of the answer.
    pub request_timeout: Duration,
    /// Most texts in one request.
    pub max_inputs_per_request: usize,
    /// Most estimated tokens in one request; a text is estimated at one token per 4 bytes of
    /// UTF-8, rounded up (at least 1). A single text above the limit still goes, alone; the
    /// server decides whether it fits the model.
    pub max_tokens_per_request: usize,
    /// Most requests in flight at once, across every `embed` call sharing this embedder.
    pub max_concurrent_requests: usize,
    /// How failed requests are retried.
    pub retry: RetryPolicy,
}

impl OpenAiConfig {
    /// A configuration for `model` at `base_url` with the default limits and no API key.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> OpenAiConfig {
        OpenAiConfig {
            base_url: base_url.into(),
            model: model.into(),
            api_key: None,
            dimensions: None,
            request_timeout: Duration::from_secs(60),
            max_inputs_per_request: 2048,
            // OpenAI caps a request at 300,000 tokens. The bytes/4 estimate is close for
            // English but low for other scripts, so the default leaves a third of headroom.
            max_tokens_per_request: 200_000,
            max_concurrent_requests: 4,
            retry: RetryPolicy::default(),
        }
    }

    /// Checks the limits and derives the endpoint URL.
    pub(super) fn endpoint(&self) -> Result<Url, EmbedError> {
        let invalid = |reason: String| EmbedError::Config { reason };
        if self.model.trim().is_empty() {
            return Err(invalid("the model name is empty".into()));
        }
        for (name, value) in [
            ("max inputs per request", self.max_inputs_per_request),
            ("max tokens per request", self.max_tokens_per_request),
            ("max concurrent requests", self.max_concurrent_requests),
        ] {
            if value == 0 {
                return Err(invalid(format!("{name} must be at least 1")));
            }
        }
        if self.max_concurrent_requests > tokio::sync::Semaphore::MAX_PERMITS {
            return Err(invalid(format!(
                "max concurrent requests must be at most {}",
                tokio::sync::Semaphore::MAX_PERMITS
            )));
        }
        if self.dimensions == Some(0) {
            return Err(invalid("dimensions must be at least 1".into()));
        }
        if self.retry.max_attempts == 0 {
            return Err(invalid("max attempts must be at least 1".into()));
        }
        if self.request_timeout.is_zero() {
            return Err(invalid("the request timeout must be above zero".into()));
        }
        endpoint_url(&self.base_url)
    }
}

/// `{base}/v1/embeddings`, from a base URL with or without a trailing `/v1`.
fn endpoint_url(base_url: &str) -> Result<Url, EmbedError> {
    let invalid = |reason: String| EmbedError::Config { reason };
    let base = Url::parse(base_url.trim()).map_err(|error| {
        invalid(format!(
            "the base URL is not a URL ({error}); expected e.g. https://api.openai.com"
        ))
    })?;
    if !matches!(base.scheme(), "http" | "https") {
        return Err(invalid(format!(
            "the base URL must start with http:// or https://, not {}://",
            base.scheme()
        )));
    }
    // Credentials or a query in the URL would be printed wherever the endpoint is named; the
    // key belongs in the environment variable.
    if !base.username().is_empty() || base.password().is_some() {
        return Err(invalid(format!(
            "the base URL must not hold credentials; put the API key in {API_KEY_ENV}"
        )));
    }
    if base.query().is_some() || base.fragment().is_some() {
        return Err(invalid(
            "the base URL must not have a query or fragment; give the server root, e.g. \
             https://RESOURCE.openai.azure.com/openai/v1 for Azure OpenAI"
                .into(),
        ));
    }
    let path = base.path().trim_end_matches('/');
    let path = if path.ends_with("/v1") {
        format!("{path}/embeddings")
    } else {
        format!("{path}/v1/embeddings")
    };
    let mut endpoint = base;
    endpoint.set_path(&path);
    Ok(endpoint)
}

/// How a failed request is retried: 429 after the server's `Retry-After` (or the backoff when
/// it sends none), 408, 5xx, timeouts and connection errors after an exponential backoff with
/// jitter. Other 4xx answers are never retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries per request, the first included; at least 1.
    pub max_attempts: u32,
    /// Wait before the second try; doubles per failure.
    pub initial_backoff: Duration,
    /// Longest backoff.
    pub max_backoff: Duration,
    /// Longest `Retry-After` obeyed: a server asking for more fails the request instead (the
    /// pipeline retries the whole batch later), so one answer cannot park the host for hours.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// The wait after failed try number `attempt` (1-based), by the host's one backoff formula.
    pub(super) fn backoff(&self, attempt: u32) -> Duration {
        crate::backoff::jittered(attempt, self.initial_backoff, self.max_backoff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_is_appended_once() {
        for (base, expected) in [
            (
                "https://api.openai.com",
                "https://api.openai.com/v1/embeddings",
            ),
            (
                "https://api.openai.com/",
                "https://api.openai.com/v1/embeddings",
            ),
            (
                "https://api.openai.com/v1",
                "https://api.openai.com/v1/embeddings",
            ),
            (
                "http://localhost:11434/v1/",
                "http://localhost:11434/v1/embeddings",
            ),
            (
                "https://res.openai.azure.com/openai",
                "https://res.openai.azure.com/openai/v1/embeddings",
            ),
        ] {
            assert_eq!(endpoint_url(base).unwrap().as_str(), expected, "{base}");
        }
    }

    #[test]
    fn endpoint_refuses_what_would_leak_or_cannot_work() {
        for base in [
            "api.openai.com",
            "ftp://example.com",
            "https://user:secret@example.com",
            "https://example.com?api-version=1",
        ] {
            let error = endpoint_url(base).unwrap_err().to_string();
            assert!(!error.contains("secret"), "{error}");
        }
    }

    #[test]
    fn concurrency_beyond_what_a_semaphore_holds_is_refused() {
        let mut config = OpenAiConfig::new(DEFAULT_BASE_URL, DEFAULT_MODEL);
        config.max_concurrent_requests = usize::MAX;
        assert!(matches!(
            config.endpoint(),
            Err(EmbedError::Config { reason }) if reason.contains("at most")
        ));
    }

    #[test]
    fn api_key_is_trimmed_and_never_printed() {
        assert_eq!(ApiKey::new("  \n"), None);
        let key = ApiKey::new("sk-very-secret\n").unwrap();
        assert_eq!(key.expose(), "sk-very-secret");
        let mut config = OpenAiConfig::new(DEFAULT_BASE_URL, DEFAULT_MODEL);
        config.api_key = Some(key);
        let printed = format!("{config:?} {config:#?}");
        assert!(!printed.contains("sk-very-secret"), "{printed}");
        assert!(printed.contains("<redacted>"));
    }

    #[test]
    fn backoff_doubles_within_jitter_and_is_capped() {
        let policy = RetryPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
            ..RetryPolicy::default()
        };
        for (attempt, full) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1000),
            (60, 1000),
        ] {
            for _ in 0..50 {
                let wait = policy.backoff(attempt);
                assert!(
                    wait >= Duration::from_millis(full / 2) && wait <= Duration::from_millis(full),
                    "attempt {attempt}: {wait:?}"
                );
            }
        }
    }
}
