//! The webhook sink: every write of a handler call is POSTed as one JSON document to a URL the
//! operator runs, signed, and named so the receiver can drop a repeat.
//!
//! Body (UTF-8 JSON, `Content-Type: application/json`):
//!
//! ```json
//! {"op": "upsert" | "merge" | "delete" | "delete_table",
//!  "slot": "pgstream", "pipeline": "docs",
//!  "batch": {"first_lsn": "0/16B3748", "last_lsn": "0/16B3900", "events": 3, "digest": "9f2c..."},
//!  "sequence": 0,
//!  "points": [{"schema": "public", "table": "docs", "key": ["1"], "vector": [0.1, ...] | null,
//!              "payload": {...}}],                       // upsert, merge
//!  "keys": [{"schema": "public", "table": "docs", "key": ["1"]}],   // delete
//!  "schema": "public", "table": "docs"}                  // delete_table
//! ```
//!
//! `merge` points merge their payload keys into the stored payload (see the WIT's `merge`);
//! an `upsert` point without a vector keeps its stored vector.
//!
//! Headers:
//! - `Idempotency-Key: <slot>:<first_lsn>-<last_lsn>:<digest>:<sequence>`: the slot, the WAL
//!   range and digest of the handler call's events ([`BatchIdentity`]), and the write's place in
//!   that call. A batch replayed after a crash or a retry sends the same keys, so a receiver
//!   that remembers them applies each write once.
//! - `X-Pgstream-Signature: sha256=<hex>`: HMAC-SHA256 of the exact body bytes with the secret
//!   from `PGSTREAM_WEBHOOK_SECRET` (`secret` in a config file), when one is set. To verify,
//!   compute the HMAC of the raw body with the same secret and compare in constant time
//!   ([`signature`] is that computation).
//!
//! Answers: 2xx is success. 5xx, 408, 429 (after its `Retry-After`, capped at a minute),
//! timeouts and connection errors are retried with backoff up to `max_attempts`, then reported
//! as an outage (the pipeline rides it out and replays the batch). Redirects are not followed,
//! and any other status is a refusal that stops the pipeline, with the status and the start of
//! the answer in the message.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderValue};
use serde_json::{Value as Json, json};

use super::merge_fold::fold_merges;
use super::{BatchIdentity, Sink, SinkError};
use crate::event::ChangeEvent;
use crate::point::{Point, PointKey};

/// The environment variable the signing secret is read from (never a flag: flags show up in
/// `ps`).
pub const SECRET_VAR: &str = "PGSTREAM_WEBHOOK_SECRET";

/// The signature header.
const SIGNATURE_HEADER: &str = "x-pgstream-signature";

/// Longest `Retry-After` obeyed; a longer one counts as the wait cap.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Bytes of an error answer quoted in a message.
const QUOTED_ANSWER_BYTES: usize = 300;

/// Where and how to POST.
#[derive(Clone)]
pub struct WebhookOptions {
    /// The URL; `https://` verifies the server against the system's and the bundled roots.
    pub url: reqwest::Url,
    /// The signing secret; `None`: no signature header.
    pub secret: Option<String>,
    /// Longest wait for one request.
    pub timeout: Duration,
    /// Tries per write when it fails transiently.
    pub max_attempts: u32,
    /// Wait before the second try; doubled after each.
    pub initial_backoff: Duration,
    /// The replication slot, the first part of every idempotency key.
    pub slot: String,
    /// The pipeline's name, in the body.
    pub pipeline: String,
}

impl std::fmt::Debug for WebhookOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookOptions")
            .field("url", &self.url.as_str())
            .field("secret", &self.secret.as_ref().map(|_| "<set>"))
            .field("timeout", &self.timeout)
            .field("max_attempts", &self.max_attempts)
            .finish_non_exhaustive()
    }
}

/// POSTs writes to a URL.
pub struct WebhookSink {
    client: reqwest::Client,
    options: WebhookOptions,
    signer: Option<ring::hmac::Key>,
    /// The handler call the writes belong to, and how many it made so far.
    batch: Mutex<(Option<BatchIdentity>, u64)>,
}

/// `sha256=<hex>`: the signature header's value for `body` under `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    signed(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret), body)
}

fn signed(key: &ring::hmac::Key, body: &[u8]) -> String {
    format!("sha256={}", hex(ring::hmac::sign(key, body).as_ref()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// How one try ended, when it did not succeed.
enum Failure {
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    Refused(String),
}

impl WebhookSink {
    /// A sink POSTing to `options.url`. Nothing is sent until the first write.
    pub fn new(options: WebhookOptions) -> Result<WebhookSink, SinkError> {
        let tls = crate::embed::openai::tls_config()
            .map_err(|error| SinkError::Rejected(format!("the webhook sink: {error}")))?;
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(options.timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("pgstream-host/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|error| {
                SinkError::Rejected(format!("cannot build the webhook's HTTP client: {error}"))
            })?;
        let signer = options
            .secret
            .as_ref()
            .map(|secret| ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes()));
        Ok(WebhookSink {
            client,
            options,
            signer,
            batch: Mutex::new((None, 0)),
        })
    }

    /// The batch fields of the next write and its idempotency key.
    fn next_write(&self, fields: &Json) -> (Json, u64, String) {
        let mut batch = self
            .batch
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let sequence = batch.1;
        batch.1 += 1;
        match &batch.0 {
            Some(identity) => (
                json!({
                    "first_lsn": identity.first_lsn.to_string(),
                    "last_lsn": identity.last_lsn.to_string(),
                    "events": identity.events,
                    "digest": identity.digest,
                }),
                sequence,
                format!(
                    "{}:{}-{}:{}:{sequence}",
                    self.options.slot, identity.first_lsn, identity.last_lsn, identity.digest
                ),
            ),
            // Writes outside a pipeline's handler call (none today): named by their content.
            None => {
                use sha2::{Digest, Sha256};
                let digest = hex(&Sha256::digest(fields.to_string().as_bytes())[..8]);
                (
                    Json::Null,
                    sequence,
                    format!("{}:body:{digest}", self.options.slot),
                )
            }
        }
    }

    /// POSTs one write, `fields` merged into the common ones.
    async fn post(&self, op: &str, fields: Json) -> Result<(), SinkError> {
        let (batch, sequence, key) = self.next_write(&fields);
        let mut body = json!({
            "op": op,
            "slot": self.options.slot,
            "pipeline": self.options.pipeline,
            "batch": batch,
            "sequence": sequence,
        });
        if let (Json::Object(body), Json::Object(fields)) = (&mut body, fields) {
            body.extend(fields);
        }
        let body = bytes::Bytes::from(body.to_string());
        let signature = self.signer.as_ref().map(|key| {
            let mut value =
                HeaderValue::from_str(&signed(key, &body)).expect("hex is a valid header value");
            value.set_sensitive(true);
            value
        });
        let idempotency = HeaderValue::from_str(&key).map_err(|_| {
            SinkError::Rejected(format!(
                "the slot name {:?} cannot go in an HTTP header",
                self.options.slot
            ))
        })?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (reason, retry_after) = match self
                .try_once(body.clone(), idempotency.clone(), signature.clone())
                .await
            {
                Ok(()) => return Ok(()),
                Err(Failure::Refused(message)) => return Err(SinkError::Rejected(message)),
                Err(Failure::Transient {
                    reason,
                    retry_after,
                }) => (reason, retry_after),
            };
            if attempt >= self.options.max_attempts {
                return Err(SinkError::Unavailable(
                    format!(
                        "webhook {} failed {attempt} times: {reason}",
                        self.options.url
                    )
                    .into(),
                ));
            }
            let wait = retry_after.map_or_else(
                || {
                    crate::backoff::jittered(
                        attempt,
                        self.options.initial_backoff,
                        self.options.initial_backoff * 32,
                    )
                },
                |wait| wait.min(MAX_RETRY_AFTER),
            );
            tracing::warn!(
                url = %self.options.url, attempt, max_attempts = self.options.max_attempts,
                wait_ms = wait.as_millis() as u64, %key,
                "webhook request failed, retrying: {reason}"
            );
            tokio::time::sleep(wait).await;
        }
    }

    async fn try_once(
        &self,
        body: bytes::Bytes,
        idempotency: HeaderValue,
        signature: Option<HeaderValue>,
    ) -> Result<(), Failure> {
        let mut request = self
            .client
            .post(self.options.url.clone())
            .timeout(self.options.timeout)
            .header(CONTENT_TYPE, "application/json")
            .header("idempotency-key", idempotency)
            .body(body);
        if let Some(signature) = signature {
            request = request.header(SIGNATURE_HEADER, signature);
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(error) => {
                return Err(Failure::Transient {
                    reason: crate::error_chain::one_line(&error),
                    retry_after: None,
                });
            }
        };
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let retry_after =
            crate::embed::openai::wire::retry_after(response.headers(), SystemTime::now());
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let answer = response.bytes().await.unwrap_or_default();
        let quoted = String::from_utf8_lossy(&answer[..answer.len().min(QUOTED_ANSWER_BYTES)])
            .trim()
            .to_owned();
        let reason = format!("HTTP {status}: {quoted}");
        if status.is_server_error()
            || status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT
        {
            return Err(Failure::Transient {
                reason,
                retry_after,
            });
        }
        if status.is_redirection() {
            return Err(Failure::Refused(format!(
                "webhook {} redirects to {}; set --webhook-url to the final address",
                self.options.url,
                location.as_deref().unwrap_or("elsewhere")
            )));
        }
        Err(Failure::Refused(format!(
            "webhook {} refused the write: {reason}",
            self.options.url
        )))
    }
}

fn key_json(key: &PointKey) -> Json {
    json!({"schema": key.schema, "table": key.table, "key": key.key})
}

fn point_json(point: &Point) -> Result<Json, SinkError> {
    let payload: Json = serde_json::from_str(&point.payload).map_err(|error| {
        SinkError::Rejected(format!(
            "the payload of the point for {}.{} key {:?} is not JSON: {error}",
            point.key.schema, point.key.table, point.key.key
        ))
    })?;
    Ok(json!({
        "schema": point.key.schema,
        "table": point.key.table,
        "key": point.key.key,
        "vector": point.vector,
        "payload": payload,
    }))
}

#[async_trait]
impl Sink for WebhookSink {
    async fn prepare(&self, _dimensions: usize) -> Result<(), SinkError> {
        Ok(())
    }

    async fn upsert(&self, points: &[Point]) -> Result<(), SinkError> {
        if points.is_empty() {
            return Ok(());
        }
        let points = points
            .iter()
            .map(point_json)
            .collect::<Result<Vec<_>, _>>()?;
        self.post("upsert", json!({ "points": points })).await
    }

    async fn merge(&self, points: &[Point]) -> Result<(), SinkError> {
        if points.is_empty() {
            return Ok(());
        }
        let points: Vec<Json> = fold_merges(points)?
            .into_iter()
            .map(|merged| {
                json!({
                    "schema": merged.key.schema,
                    "table": merged.key.table,
                    "key": merged.key.key,
                    "vector": merged.vector,
                    "payload": Json::Object(merged.payload),
                })
            })
            .collect();
        self.post("merge", json!({ "points": points })).await
    }

    async fn delete(&self, keys: &[PointKey]) -> Result<(), SinkError> {
        if keys.is_empty() {
            return Ok(());
        }
        let keys: Vec<Json> = keys.iter().map(key_json).collect();
        self.post("delete", json!({ "keys": keys })).await
    }

    async fn delete_table(&self, schema: &str, table: &str) -> Result<(), SinkError> {
        self.post("delete_table", json!({ "schema": schema, "table": table }))
            .await
    }

    fn begin_batch(&self, events: &[ChangeEvent]) {
        let identity = BatchIdentity::of(events);
        let mut current = self
            .batch
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *current = (Some(identity), 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_the_rfc_4231_hmac_sha256() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
