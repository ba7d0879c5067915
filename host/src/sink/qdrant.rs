//! The Qdrant sink: points go into a Qdrant collection over gRPC (`qdrant-client`), one
//! unnamed dense vector per point, cosine distance.
//!
//! Qdrant accepts only unsigned integers and UUIDs as point ids, so a point's id is a UUID v5
//! derived from where its row came from (see [`point_id`]): ids of different tables never
//! collide in one collection, and a replayed batch overwrites the points it wrote before
//! instead of adding copies. The payload is the handler's JSON object plus `_schema`, `_table`
//! and `_key`, so a truncate can delete a table's points by filter and a reader can find the
//! source row.
//!
//! Every write is sent with `wait=true`: Qdrant answers only once the change is applied, and
//! the pipeline confirms the WAL position to Postgres only after that answer. Failures are
//! sorted once, in [`classify`]: transient ones (unreachable, timeouts, overload, server
//! errors) are retried here with exponential backoff and jitter, then reported as
//! [`SinkError::Unavailable`]; the rest become [`SinkError::Rejected`] with Qdrant's message.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use qdrant_client::qdrant::{
    Condition, CreateCollection, CreateFieldIndexCollection, DeletePoints, Distance, FieldType,
    Filter, GetPoints, PointId, PointStruct, PointVectors, PointsIdsList, PointsSelector,
    PointsUpdateOperation, Query, QueryPoints, UpdateBatchPoints, UpdateResult, UpdateStatus,
    Value, VectorInput, VectorParams, VectorsConfig, WithPayloadSelector, WithVectorsSelector,
    point_id, points_selector, points_update_operation, vectors_config,
};
use qdrant_client::{Qdrant, QdrantError};
use serde_json::Value as Json;
use tonic::Code;
use uuid::Uuid;

use super::merge_fold::fold_merges;
use crate::point::{Point, PointKey};
use crate::sink::{SearchHit, Sink, SinkError};

/// The namespace of every point id this sink makes (see [`point_id`]). Fixed forever: changing
/// it would orphan every point already written.
pub const POINT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x26fe3006_94de_4025_b555_0ee0bace9f92);

/// Payload field holding the source row's schema.
const SCHEMA_FIELD: &str = "_schema";
/// Payload field holding the source row's table.
const TABLE_FIELD: &str = "_table";
/// Payload field holding the source row's key values (strings, in key order).
const KEY_FIELD: &str = "_key";
/// Payload field holding a handler payload that is not a JSON object.
const VALUE_FIELD: &str = "_value";

/// The environment variable the API key is read from (never a flag: flags show up in `ps`).
pub const API_KEY_VAR: &str = "PGSTREAM_QDRANT_API_KEY";

/// Ids per delete request. An id is about 40 bytes on the wire, so this stays far below any
/// message size limit while keeping a big delete to few round trips.
const IDS_PER_REQUEST: usize = 10_000;

/// How to reach Qdrant and where to write.
#[derive(Clone)]
pub struct QdrantOptions {
    /// gRPC endpoint, `http://host:6334` or `https://host:6334` (TLS with the system's roots).
    pub url: String,
    /// API key sent with every request, if the server wants one.
    pub api_key: Option<String>,
    /// The collection.
    pub collection: String,
    /// Create the collection when it is missing; when false a missing collection is an error.
    pub create_collection: bool,
    /// Longest wait for one request (and for connecting).
    pub timeout: Duration,
    /// Tries per operation before a transient failure is reported as
    /// [`SinkError::Unavailable`] (at least 1).
    pub max_attempts: u32,
    /// Wait before the first retry; doubles per failure up to `max_backoff`, with jitter.
    pub initial_backoff: Duration,
    /// Longest wait between two tries.
    pub max_backoff: Duration,
    /// Approximate encoded size above which an upsert is split into several requests.
    pub max_request_bytes: usize,
}

impl QdrantOptions {
    /// Defaults for `collection` at `url`: create when missing, 30 s timeout, 5 tries from
    /// 200 ms backoff, 8 MiB requests (Qdrant accepts 32 MiB by default).
    pub fn new(url: &str, collection: &str) -> QdrantOptions {
        QdrantOptions {
            url: url.to_owned(),
            api_key: None,
            collection: collection.to_owned(),
            create_collection: true,
            timeout: Duration::from_secs(30),
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            max_request_bytes: 8 * 1024 * 1024,
        }
    }
}

// Written by hand so the API key never reaches a log line.
impl std::fmt::Debug for QdrantOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QdrantOptions")
            .field("url", &self.url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("collection", &self.collection)
            .field("create_collection", &self.create_collection)
            .field("timeout", &self.timeout)
            .field("max_attempts", &self.max_attempts)
            .field("initial_backoff", &self.initial_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("max_request_bytes", &self.max_request_bytes)
            .finish()
    }
}

/// Writes points to a Qdrant collection.
pub struct QdrantSink {
    client: Qdrant,
    options: QdrantOptions,
}

/// A transient failure that outlived its retries.
#[derive(Debug, thiserror::Error)]
#[error("Qdrant {operation} on collection {collection} failed {attempts} times")]
pub struct QdrantUnavailable {
    operation: &'static str,
    collection: String,
    attempts: u32,
    #[source]
    last: QdrantError,
}

impl QdrantSink {
    /// A sink for `options.collection`. Connects lazily: nothing is sent until
    /// [`Sink::prepare`]. Fails only on a URL that cannot work.
    pub fn new(mut options: QdrantOptions) -> Result<QdrantSink, SinkError> {
        // Keys read from secret files often end in a line break. A key that is still no valid
        // header value would make qdrant-client fail with an error quoting it; say so here,
        // without the key.
        if let Some(key) = options.api_key.take() {
            let key = key.trim();
            if tonic::metadata::AsciiMetadataValue::try_from(key).is_err() {
                return Err(SinkError::Rejected(format!(
                    "{API_KEY_VAR} holds a character an API key cannot contain (a control \
                     character or a non-ASCII one); check the value (it is not shown here)"
                )));
            }
            options.api_key = (!key.is_empty()).then(|| key.to_owned());
        }
        let uri: tonic::transport::Uri = options.url.parse().map_err(|error| {
            SinkError::Rejected(format!(
                "--qdrant-url {:?} is not a URL ({error}); expected http://host:6334 or \
                 https://host:6334",
                options.url
            ))
        })?;
        match uri.scheme_str() {
            Some("http") | Some("https") => {}
            _ => {
                return Err(SinkError::Rejected(format!(
                    "--qdrant-url {:?} must start with http:// or https:// (Qdrant's gRPC port, \
                     6334 by default)",
                    options.url
                )));
            }
        }
        if options.api_key.is_some() && uri.scheme_str() == Some("http") {
            let local = matches!(
                uri.host(),
                Some("localhost" | "127.0.0.1" | "::1" | "[::1]")
            );
            if !local {
                tracing::warn!(
                    url = %options.url,
                    "{API_KEY_VAR} is set but --qdrant-url is plain http: the key crosses the \
                     network unencrypted; use https://"
                );
            }
        }
        let mut config = Qdrant::from_url(&options.url)
            .timeout(options.timeout)
            .connect_timeout(options.timeout)
            // The compatibility check blocks on a health check and prints to stdout; prepare()
            // asks for the version itself and logs it.
            .skip_compatibility_check();
        if let Some(key) = &options.api_key {
            config.set_api_key(key);
        }
        let client = config.build().map_err(|error| {
            SinkError::Rejected(format!("cannot set up the Qdrant client: {error}"))
        })?;
        Ok(QdrantSink { client, options })
    }

    /// The `limit` points nearest to `vector` by the collection's distance (cosine when this
    /// sink created it). The similarity is Qdrant's score.
    pub async fn search(&self, vector: Vec<f32>, limit: u64) -> Result<Vec<SearchHit>, SinkError> {
        let request = QueryPoints {
            collection_name: self.options.collection.clone(),
            query: Some(Query::new_nearest(VectorInput::new_dense(vector))),
            limit: Some(limit),
            with_payload: Some(WithPayloadSelector::from(true)),
            ..QueryPoints::default()
        };
        let response = self
            .with_retries("query", || self.client.query(request.clone()))
            .await?;
        Ok(response
            .result
            .into_iter()
            .map(|point| {
                let (key, payload) = split_payload(point.payload);
                SearchHit {
                    similarity: f64::from(point.score),
                    key,
                    payload,
                }
            })
            .collect())
    }

    /// `text` with the API key, should a server or the client quote it, replaced.
    fn without_api_key(&self, text: &str) -> String {
        match &self.options.api_key {
            Some(key) => text.replace(key.as_str(), "<redacted>"),
            None => text.to_owned(),
        }
    }

    /// Runs `request` until it succeeds, fails permanently, or used up its tries.
    async fn with_retries<T, F, Fut>(
        &self,
        operation: &'static str,
        mut request: F,
    ) -> Result<T, SinkError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, QdrantError>>,
    {
        let max_attempts = self.options.max_attempts.max(1);
        let mut attempt = 1;
        loop {
            // tonic's own request timeout starts only once a connection is ready, so a server
            // that accepts the TCP connection and never completes the HTTP/2 handshake would
            // hold the call forever: the whole try gets the same deadline here.
            let error = match tokio::time::timeout(self.options.timeout, request()).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(error)) => error,
                Err(_) => QdrantError::ResponseError {
                    status: tonic::Status::deadline_exceeded(format!(
                        "no answer from {} within {:?}",
                        self.options.url, self.options.timeout
                    )),
                },
            };
            match classify(&error) {
                Failure::Permanent(message) => {
                    return Err(SinkError::Rejected(format!(
                        "Qdrant refused {operation} on collection {}: {}",
                        self.options.collection,
                        self.without_api_key(&message)
                    )));
                }
                Failure::UntrustedCertificate(reason) => {
                    return Err(SinkError::Rejected(format!(
                        "the TLS certificate of the Qdrant server at {} is not trusted \
                         ({reason}); the system's root certificates are trusted, and a server \
                         whose certificate comes from a private CA is trusted once \
                         SSL_CERT_FILE names a PEM file holding that CA's certificate",
                        self.options.url
                    )));
                }
                Failure::Transient { retry_after } => {
                    if attempt >= max_attempts {
                        return Err(SinkError::Unavailable(Box::new(QdrantUnavailable {
                            operation,
                            collection: self.options.collection.clone(),
                            attempts: attempt,
                            last: error,
                        })));
                    }
                    let delay = crate::backoff::jittered(
                        attempt,
                        self.options.initial_backoff,
                        self.options.max_backoff,
                    )
                    .max(
                        retry_after
                            .unwrap_or_default()
                            .min(self.options.max_backoff),
                    );
                    tracing::warn!(
                        operation,
                        collection = %self.options.collection,
                        attempt,
                        max_attempts,
                        delay_ms = delay.as_millis() as u64,
                        "Qdrant request failed, retrying: {error}"
                    );
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
            }
        }
    }

    /// The ids among `ids` that the collection holds.
    async fn existing_ids(&self, ids: &[PointId]) -> Result<HashSet<PointId>, SinkError> {
        let mut found = HashSet::with_capacity(ids.len());
        for chunk in ids.chunks(IDS_PER_REQUEST) {
            let request = GetPoints {
                collection_name: self.options.collection.clone(),
                ids: chunk.to_vec(),
                with_payload: Some(WithPayloadSelector::from(false)),
                with_vectors: Some(WithVectorsSelector::from(false)),
                ..GetPoints::default()
            };
            let response = self
                .with_retries("get points", || self.client.get_points(request.clone()))
                .await?;
            found.extend(response.result.into_iter().filter_map(|point| point.id));
        }
        Ok(found)
    }

    /// Sends `operations` in one `update_batch` request with `wait=true`.
    async fn update_batch(&self, operations: Vec<PointsUpdateOperation>) -> Result<(), SinkError> {
        if operations.is_empty() {
            return Ok(());
        }
        let request = UpdateBatchPoints {
            collection_name: self.options.collection.clone(),
            wait: Some(true),
            operations,
            ..UpdateBatchPoints::default()
        };
        self.with_retries("update batch", || async {
            let response = self.client.update_points_batch(request.clone()).await?;
            response
                .result
                .iter()
                .try_for_each(check_applied)
                .map_err(QdrantError::from)
        })
        .await
    }

    /// Deletes the points `selector` picks, with `wait=true`.
    async fn delete_points(
        &self,
        operation: &'static str,
        selector: points_selector::PointsSelectorOneOf,
    ) -> Result<(), SinkError> {
        let request = DeletePoints {
            collection_name: self.options.collection.clone(),
            wait: Some(true),
            points: Some(PointsSelector {
                points_selector_one_of: Some(selector),
            }),
            ..DeletePoints::default()
        };
        self.with_retries(operation, || async {
            let response = self.client.delete_points(request.clone()).await?;
            match &response.result {
                Some(result) => check_applied(result).map_err(QdrantError::from),
                None => Ok(()),
            }
        })
        .await
    }

    /// Creates the collection for `dimensions`-float cosine vectors, with keyword indexes on
    /// the fields a truncate filters by.
    async fn create(&self, dimensions: usize) -> Result<(), SinkError> {
        let request = CreateCollection {
            collection_name: self.options.collection.clone(),
            vectors_config: Some(VectorsConfig {
                config: Some(vectors_config::Config::Params(VectorParams {
                    size: dimensions as u64,
                    distance: Distance::Cosine as i32,
                    ..VectorParams::default()
                })),
            }),
            ..CreateCollection::default()
        };
        let created = self
            .with_retries("create collection", || async {
                match self.client.create_collection(request.clone()).await {
                    Ok(_) => Ok(true),
                    // Another pipeline created it between our check and now: the size check
                    // that follows decides whether it fits.
                    Err(QdrantError::ResponseError { status })
                        if status.code() == Code::AlreadyExists
                            || status.message().contains("already exists") =>
                    {
                        Ok(false)
                    }
                    Err(error) => Err(error),
                }
            })
            .await?;
        if created {
            tracing::info!(
                collection = %self.options.collection,
                dimensions,
                "created the Qdrant collection (cosine distance)"
            );
        }
        // Also when the collection already existed: a create whose answer was lost (a
        // timeout, then "already exists" on the retry) must not leave it without indexes.
        for field in [SCHEMA_FIELD, TABLE_FIELD] {
            let request = CreateFieldIndexCollection {
                collection_name: self.options.collection.clone(),
                wait: Some(true),
                field_name: field.to_owned(),
                field_type: Some(FieldType::Keyword as i32),
                ..CreateFieldIndexCollection::default()
            };
            self.with_retries("create payload index", || async {
                match self.client.create_field_index(request.clone()).await {
                    Ok(_) => Ok(()),
                    Err(QdrantError::ResponseError { status })
                        if status.code() == Code::AlreadyExists
                            || status.message().contains("already exists") =>
                    {
                        Ok(())
                    }
                    Err(error) => Err(error),
                }
            })
            .await?;
        }
        Ok(())
    }

    /// Fails unless the collection holds one unnamed vector of `dimensions` floats.
    async fn check_vector_size(&self, dimensions: usize) -> Result<(), SinkError> {
        let collection = &self.options.collection;
        let info = self
            .with_retries("get collection info", || {
                self.client.collection_info(collection.as_str())
            })
            .await?;
        let config = info
            .result
            .and_then(|info| info.config)
            .and_then(|config| config.params)
            .and_then(|params| params.vectors_config)
            .and_then(|vectors| vectors.config);
        match config {
            Some(vectors_config::Config::Params(params)) => {
                if params.size != dimensions as u64 {
                    return Err(SinkError::Rejected(format!(
                        "Qdrant collection {collection} holds vectors of {} floats, but the \
                         embedder makes {dimensions}; use another --collection or recreate it",
                        params.size
                    )));
                }
                if params.distance != Distance::Cosine as i32 {
                    tracing::warn!(
                        collection = %collection,
                        distance = ?Distance::try_from(params.distance).unwrap_or(Distance::UnknownDistance),
                        "the Qdrant collection does not use cosine distance; searches rank by \
                         its own distance"
                    );
                }
                Ok(())
            }
            Some(vectors_config::Config::ParamsMap(_)) => Err(SinkError::Rejected(format!(
                "Qdrant collection {collection} uses named vectors; pgstream-host writes one \
                 unnamed vector per point: use another --collection"
            ))),
            None => Err(SinkError::Rejected(format!(
                "Qdrant did not report the vector size of collection {collection}"
            ))),
        }
    }
}

/// The id of the point made from a row: a UUID v5 in [`POINT_ID_NAMESPACE`] whose name is the
/// compact JSON array `["<schema>","<table>",["<key 1>","<key 2>",...]]` in UTF-8, key values
/// in key-column order as Postgres prints them. JSON escaping is the standard one (`"` and
/// `\` escaped, control characters as `\n`, `\t`, ... or `\u00XX`, everything else literal),
/// which is what Python's `json.dumps(..., separators=(",", ":"), ensure_ascii=False)` makes.
pub fn point_id(key: &PointKey) -> Uuid {
    let name = serde_json::to_string(&(&key.schema, &key.table, &key.key))
        .expect("strings always serialise to JSON");
    Uuid::new_v5(&POINT_ID_NAMESPACE, name.as_bytes())
}

fn grpc_id(key: &PointKey) -> PointId {
    PointId {
        point_id_options: Some(point_id::PointIdOptions::Uuid(point_id(key).to_string())),
    }
}

/// The stored payload of a point: the handler's object (or its other JSON under
/// [`VALUE_FIELD`]) plus the source fields, which win over handler fields of the same name.
fn payload(point: &Point) -> Result<HashMap<String, Value>, SinkError> {
    let parsed: Json = serde_json::from_str(&point.payload).map_err(|error| {
        SinkError::Rejected(format!(
            "the payload of the point for {}.{} key {:?} is not JSON: {error}",
            point.key.schema, point.key.table, point.key.key
        ))
    })?;
    let mut fields: HashMap<String, Value> = match parsed {
        Json::Object(object) => object.into_iter().map(|(k, v)| (k, v.into())).collect(),
        other => HashMap::from([(VALUE_FIELD.to_owned(), other.into())]),
    };
    fields.insert(SCHEMA_FIELD.to_owned(), point.key.schema.clone().into());
    fields.insert(TABLE_FIELD.to_owned(), point.key.table.clone().into());
    fields.insert(KEY_FIELD.to_owned(), point.key.key.clone().into());
    Ok(fields)
}

/// Takes the source fields out of a stored payload.
fn split_payload(payload: HashMap<String, Value>) -> (PointKey, Json) {
    let mut object: serde_json::Map<String, Json> = payload
        .into_iter()
        .map(|(k, v)| (k, v.into_json()))
        .collect();
    let mut text = |field: &str| match object.remove(field) {
        Some(Json::String(text)) => text,
        _ => String::new(),
    };
    let schema = text(SCHEMA_FIELD);
    let table = text(TABLE_FIELD);
    let key = match object.remove(KEY_FIELD) {
        Some(Json::Array(values)) => values
            .into_iter()
            .map(|value| match value {
                Json::String(text) => text,
                other => other.to_string(),
            })
            .collect(),
        _ => Vec::new(),
    };
    (PointKey { schema, table, key }, Json::Object(object))
}

/// For each key of `points`, the index of its last write and of the write whose vector it
/// keeps: a payload-only write keeps the vector of an earlier write in the same batch, a write
/// with a vector replaces everything. Keys keep the order of their first appearance.
fn last_write_per_key(points: &[Point]) -> Vec<(usize, Option<usize>)> {
    let mut position: HashMap<&PointKey, usize> = HashMap::with_capacity(points.len());
    let mut folded: Vec<(usize, Option<usize>)> = Vec::with_capacity(points.len());
    for (index, point) in points.iter().enumerate() {
        let vector = point.vector.as_ref().map(|_| index);
        match position.get(&point.key) {
            Some(&slot) => {
                let earlier_vector = folded[slot].1;
                folded[slot] = (index, vector.or(earlier_vector));
            }
            None => {
                position.insert(&point.key, folded.len());
                folded.push((index, vector));
            }
        }
    }
    folded
}

/// Rough encoded size of a point, to keep requests below the server's message limit.
fn approximate_size(dimensions: usize, payload: &str) -> usize {
    dimensions * 4 + payload.len() + 128
}

/// The operations of one `update_batch` request being assembled, kept below a size.
struct BatchRequest {
    limit: usize,
    bytes: usize,
    operations: Vec<PointsUpdateOperation>,
    /// Points of the upsert operation being filled.
    points: Vec<PointStruct>,
}

impl BatchRequest {
    fn new(limit: usize) -> BatchRequest {
        BatchRequest {
            limit,
            bytes: 0,
            operations: Vec::new(),
            points: Vec::new(),
        }
    }

    /// Accounts for an item of `size` bytes; returns the request so far when the item does
    /// not fit beside it (a request always takes at least one item).
    fn make_room(&mut self, size: usize) -> Option<Vec<PointsUpdateOperation>> {
        let full = if self.bytes > 0 && self.bytes + size > self.limit {
            Some(self.take())
        } else {
            None
        };
        self.bytes += size;
        full
    }

    /// Closes the upsert operation being filled, if any.
    fn finish_upsert(&mut self) {
        if !self.points.is_empty() {
            self.operations
                .push(upsert_operation(std::mem::take(&mut self.points)));
        }
    }

    /// The operations so far; the request starts over empty.
    fn take(&mut self) -> Vec<PointsUpdateOperation> {
        self.finish_upsert();
        self.bytes = 0;
        std::mem::take(&mut self.operations)
    }
}

/// Checks the status of an applied write sent with `wait=true`.
fn check_applied(result: &UpdateResult) -> Result<(), tonic::Status> {
    match UpdateStatus::try_from(result.status) {
        Ok(UpdateStatus::Completed) => Ok(()),
        // The server gave up waiting: the write may or may not be applied; sending it again is
        // safe (idempotent) and the only way to know.
        Ok(UpdateStatus::WaitTimeout) => Err(tonic::Status::deadline_exceeded(
            "Qdrant accepted the write but timed out waiting for it to be applied",
        )),
        Ok(UpdateStatus::ClockRejected) => Err(tonic::Status::aborted(
            "Qdrant rejected the write because of an outdated clock",
        )),
        Ok(other) => Err(tonic::Status::unavailable(format!(
            "Qdrant answered {} to a write sent with wait=true",
            other.as_str_name()
        ))),
        Err(_) => Err(tonic::Status::unavailable(format!(
            "Qdrant answered an unknown update status {}",
            result.status
        ))),
    }
}

/// How a failed request should be handled.
#[derive(Debug, PartialEq)]
enum Failure {
    /// May work if sent again; `retry_after` is the server's hint.
    Transient { retry_after: Option<Duration> },
    /// Will fail the same way again; the message says why.
    Permanent(String),
    /// The server's TLS certificate is not trusted: no request reached it.
    UntrustedCertificate(String),
}

/// Sorts a Qdrant client error into transient or permanent: the one place that knows which
/// gRPC codes are worth another try.
fn classify(error: &QdrantError) -> Failure {
    let status = match error {
        QdrantError::ResponseError { status } => status,
        QdrantError::ResourceExhaustedError {
            retry_after_seconds,
            ..
        } => {
            return Failure::Transient {
                retry_after: Some(Duration::from_secs(*retry_after_seconds)),
            };
        }
        QdrantError::Io(_) => return Failure::Transient { retry_after: None },
        other => return Failure::Permanent(other.to_string()),
    };
    if status.code() == Code::Internal
        && let Some(reason) = certificate_problem(status.message())
    {
        return Failure::UntrustedCertificate(reason.to_owned());
    }
    match status.code() {
        // `Cancelled` is what tonic reports when the request timeout expires; `Internal` what
        // qdrant-client reports when it cannot connect; `Unknown` covers broken HTTP/2
        // streams. All are worth another try.
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Internal
        | Code::Unknown
        | Code::Cancelled => Failure::Transient { retry_after: None },
        Code::Unauthenticated | Code::PermissionDenied => Failure::Permanent(format!(
            "{} ({:?}); check {API_KEY_VAR}",
            status.message(),
            status.code()
        )),
        code => Failure::Permanent(format!("{} ({code:?})", status.message())),
    }
}

/// The certificate error in the text of a failed TLS connection, e.g.
/// `InvalidCertificate(UnknownIssuer)`. qdrant-client reports a connection failure only as an
/// `Internal` status whose message is the transport error's debug text, so the text is all
/// there is to go by; a certificate the client rejects is rejected again on every try.
fn certificate_problem(message: &str) -> Option<&str> {
    let start = message.find("InvalidCertificate(")?;
    let mut depth = 0usize;
    for (offset, character) in message[start..].char_indices() {
        match character {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&message[start..=start + offset]);
                }
            }
            _ => {}
        }
    }
    Some(&message[start..])
}

#[async_trait]
impl Sink for QdrantSink {
    async fn prepare(&self, dimensions: usize) -> Result<(), SinkError> {
        let health = self
            .with_retries("health check", || self.client.health_check())
            .await?;
        tracing::info!(
            url = %self.options.url,
            version = %health.version,
            collection = %self.options.collection,
            "connected to Qdrant"
        );
        let collection = &self.options.collection;
        let exists = self
            .with_retries("check collection", || {
                self.client.collection_exists(collection.as_str())
            })
            .await?;
        if !exists {
            if !self.options.create_collection {
                return Err(SinkError::Rejected(format!(
                    "Qdrant collection {collection} does not exist and --create-collection is \
                     false; create it with {dimensions}-float vectors (cosine distance) or pass \
                     --create-collection true"
                )));
            }
            self.create(dimensions).await?;
        }
        self.check_vector_size(dimensions).await
    }

    async fn upsert(&self, points: &[Point]) -> Result<(), SinkError> {
        if points.is_empty() {
            return Ok(());
        }
        let mut upserts: Vec<(PointStruct, usize)> = Vec::new();
        let mut payload_only: Vec<(PointId, HashMap<String, Value>, usize)> = Vec::new();
        for (last, vector_from) in last_write_per_key(points) {
            let point = &points[last];
            let id = grpc_id(&point.key);
            let fields = payload(point)?;
            match vector_from.and_then(|index| points[index].vector.as_ref()) {
                Some(vector) => upserts.push((
                    PointStruct {
                        id: Some(id),
                        payload: fields,
                        vectors: Some(vector.clone().into()),
                    },
                    approximate_size(vector.len(), &point.payload),
                )),
                None => payload_only.push((id, fields, approximate_size(0, &point.payload))),
            }
        }
        if !payload_only.is_empty() {
            // Qdrant fails a payload write to a missing point ("No point with id .. found"),
            // and there is no vector to create one with: such points are skipped, as the
            // pgvector sink does, and get a point when their embedded text next changes.
            let ids: Vec<PointId> = payload_only.iter().map(|(id, ..)| id.clone()).collect();
            let existing = self.existing_ids(&ids).await?;
            let before = payload_only.len();
            payload_only.retain(|(id, ..)| existing.contains(id));
            if payload_only.len() < before {
                tracing::warn!(
                    collection = %self.options.collection,
                    skipped = before - payload_only.len(),
                    "payload-only upserts for points that have no stored vector were skipped; \
                     those rows get a point when their embedded text next changes"
                );
            }
        }
        // Each key appears once, so the operations commute: grouping them into requests of
        // bounded size changes nothing but the number of round trips (one for a usual batch).
        let mut request = BatchRequest::new(self.options.max_request_bytes);
        for (point, size) in upserts {
            if let Some(full) = request.make_room(size) {
                self.update_batch(full).await?;
            }
            request.points.push(point);
        }
        for (id, fields, size) in payload_only {
            if let Some(full) = request.make_room(size) {
                self.update_batch(full).await?;
            }
            request.finish_upsert();
            request.operations.push(PointsUpdateOperation {
                operation: Some(points_update_operation::Operation::OverwritePayload(
                    points_update_operation::OverwritePayload {
                        payload: fields,
                        points_selector: Some(id_selector(vec![id])),
                        ..Default::default()
                    },
                )),
            });
        }
        self.update_batch(request.take()).await
    }

    async fn merge(&self, points: &[Point]) -> Result<(), SinkError> {
        if points.is_empty() {
            return Ok(());
        }
        let merged = fold_merges(points)?;
        // Qdrant fails a payload or vector write to a missing point ("No point with id ..
        // found"), so the stored points are looked up first: those get `set_payload` (and
        // `update_vectors`), missing ones with a vector are created, missing ones without are
        // skipped, as a payload-only upsert is.
        let ids: Vec<PointId> = merged.iter().map(|point| grpc_id(point.key)).collect();
        let existing = self.existing_ids(&ids).await?;
        let mut request = BatchRequest::new(self.options.max_request_bytes);
        let mut skipped = 0;
        // Each key appears once, so the operations of different points commute.
        for (point, id) in merged.into_iter().zip(ids) {
            let text = serde_json::to_string(&point.payload).unwrap_or_default();
            let size = approximate_size(point.vector.map_or(0, <[f32]>::len), &text);
            let stored = existing.contains(&id);
            if !stored && point.vector.is_none() {
                skipped += 1;
                continue;
            }
            if let Some(full) = request.make_room(size) {
                self.update_batch(full).await?;
            }
            let mut fields: HashMap<String, Value> = point
                .payload
                .into_iter()
                // The source fields say which row the point is; a payload cannot move it.
                .filter(|(name, _)| {
                    ![SCHEMA_FIELD, TABLE_FIELD, KEY_FIELD].contains(&name.as_str())
                })
                .map(|(name, value)| (name, value.into()))
                .collect();
            match point.vector {
                // Only a stored point gets here without a vector (see above).
                Some(vector) if !stored => {
                    fields.insert(SCHEMA_FIELD.to_owned(), point.key.schema.clone().into());
                    fields.insert(TABLE_FIELD.to_owned(), point.key.table.clone().into());
                    fields.insert(KEY_FIELD.to_owned(), point.key.key.clone().into());
                    request.points.push(PointStruct {
                        id: Some(id),
                        payload: fields,
                        vectors: Some(vector.to_vec().into()),
                    });
                }
                vector => {
                    request.finish_upsert();
                    if let Some(vector) = vector {
                        request.operations.push(PointsUpdateOperation {
                            operation: Some(points_update_operation::Operation::UpdateVectors(
                                points_update_operation::UpdateVectors {
                                    points: vec![PointVectors {
                                        id: Some(id.clone()),
                                        vectors: Some(vector.to_vec().into()),
                                    }],
                                    ..Default::default()
                                },
                            )),
                        });
                    }
                    request.operations.push(PointsUpdateOperation {
                        operation: Some(points_update_operation::Operation::SetPayload(
                            points_update_operation::SetPayload {
                                payload: fields,
                                points_selector: Some(id_selector(vec![id])),
                                ..Default::default()
                            },
                        )),
                    });
                }
            }
        }
        if skipped > 0 {
            tracing::warn!(
                collection = %self.options.collection,
                skipped,
                "payload merges for points that have no stored vector were skipped; those \
                 rows get a point when their embedded text next changes"
            );
        }
        self.update_batch(request.take()).await
    }

    async fn delete(&self, keys: &[PointKey]) -> Result<(), SinkError> {
        let ids: Vec<PointId> = keys.iter().map(grpc_id).collect();
        for chunk in ids.chunks(IDS_PER_REQUEST) {
            self.delete_points(
                "delete points",
                points_selector::PointsSelectorOneOf::Points(PointsIdsList {
                    ids: chunk.to_vec(),
                }),
            )
            .await?;
        }
        Ok(())
    }

    async fn delete_table(&self, schema: &str, table: &str) -> Result<(), SinkError> {
        let filter = Filter::must([
            Condition::matches(SCHEMA_FIELD, schema.to_owned()),
            Condition::matches(TABLE_FIELD, table.to_owned()),
        ]);
        self.delete_points(
            "delete table points",
            points_selector::PointsSelectorOneOf::Filter(filter),
        )
        .await
    }
}

fn upsert_operation(points: Vec<PointStruct>) -> PointsUpdateOperation {
    PointsUpdateOperation {
        operation: Some(points_update_operation::Operation::Upsert(
            points_update_operation::PointStructList {
                points,
                ..Default::default()
            },
        )),
    }
}

fn id_selector(ids: Vec<PointId>) -> PointsSelector {
    PointsSelector {
        points_selector_one_of: Some(points_selector::PointsSelectorOneOf::Points(
            PointsIdsList { ids },
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(schema: &str, table: &str, key: &[&str]) -> PointKey {
        PointKey {
            schema: schema.into(),
            table: table.into(),
            key: key.iter().map(|part| part.to_string()).collect(),
        }
    }

    fn point(id: &str, vector: Option<f32>, payload: &str) -> Point {
        Point {
            key: key("public", "docs", &[id]),
            vector: vector.map(|v| vec![v; 3]),
            payload: payload.into(),
        }
    }

    #[test]
    fn point_ids_match_the_documented_python_recipe() {
        // Computed with the recipe in docs/qdrant.md:
        //   uuid.uuid5(NS, json.dumps([s, t, k], separators=(",", ":"), ensure_ascii=False))
        let cases = [
            (
                key("public", "docs", &["1"]),
                "efbd8617-9f92-5eff-8fb3-b09351ec6186",
            ),
            (
                key("sales", "order lines", &["42", "é\"\\\n\u{1}"]),
                "2a5ecaac-1211-5840-a44b-dcdbc327d929",
            ),
        ];
        for (key, expected) in cases {
            assert_eq!(point_id(&key).to_string(), expected, "{key:?}");
        }
    }

    #[test]
    fn ids_of_different_tables_and_key_splits_differ() {
        let ids = [
            point_id(&key("public", "docs", &["1"])),
            point_id(&key("public", "notes", &["1"])),
            point_id(&key("other", "docs", &["1"])),
            point_id(&key("public", "docs", &["1", "2"])),
            point_id(&key("public", "docs", &["1,2"])),
            point_id(&key("public", "docs\",\"1", &[])),
        ];
        let distinct: HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
    }

    #[test]
    fn folding_keeps_the_last_write_and_an_earlier_vector() {
        let points = [
            point("1", Some(1.0), "a"),
            point("2", Some(2.0), "b"),
            point("1", None, "c"),
            point("2", Some(3.0), "d"),
            point("3", None, "e"),
            point("3", Some(4.0), "f"),
            point("4", Some(5.0), "g"),
            point("4", None, "h"),
            point("4", None, "i"),
        ];
        assert_eq!(
            last_write_per_key(&points),
            vec![(2, Some(0)), (3, Some(3)), (5, Some(5)), (8, Some(6))]
        );
    }

    #[test]
    fn payloads_carry_the_source_and_wrap_non_objects() {
        let mut stored = payload(&point("7", None, r#"{"title":"x","_table":"spoof"}"#)).unwrap();
        let (key, rest) = split_payload(std::mem::take(&mut stored));
        assert_eq!(key, self::key("public", "docs", &["7"]));
        assert_eq!(rest, serde_json::json!({"title": "x"}));

        let wrapped = payload(&point("7", None, "[1,2]")).unwrap();
        assert_eq!(
            wrapped[VALUE_FIELD].clone().into_json(),
            serde_json::json!([1, 2])
        );
        assert!(matches!(
            payload(&point("7", None, "{oops")),
            Err(SinkError::Rejected(message)) if message.contains("not JSON")
        ));
    }

    #[test]
    fn codes_are_sorted_into_transient_and_permanent() {
        let status = |code| QdrantError::ResponseError {
            status: tonic::Status::new(code, "boom"),
        };
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Aborted,
            Code::Internal,
            Code::Unknown,
            Code::Cancelled,
        ] {
            assert_eq!(
                classify(&status(code)),
                Failure::Transient { retry_after: None },
                "{code:?}"
            );
        }
        for code in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::FailedPrecondition,
            Code::AlreadyExists,
            Code::Unimplemented,
            Code::Unauthenticated,
        ] {
            match classify(&status(code)) {
                Failure::Permanent(message) => assert!(message.contains("boom"), "{message}"),
                other => panic!("{code:?} classified as {other:?}"),
            }
        }
        let throttled = QdrantError::ResourceExhaustedError {
            status: tonic::Status::resource_exhausted("slow down"),
            retry_after_seconds: 3,
        };
        assert_eq!(
            classify(&throttled),
            Failure::Transient {
                retry_after: Some(Duration::from_secs(3))
            }
        );
    }

    #[test]
    fn a_rejected_certificate_is_not_retried_and_says_why() {
        let connect_failure = QdrantError::ResponseError {
            status: tonic::Status::internal(
                "Failed to connect to https://localhost:6334/: tonic::transport::Error(\
                 Transport, ConnectError(Custom { kind: InvalidData, error: \
                 InvalidCertificate(Other(OtherError(UnknownIssuer))) }))",
            ),
        };
        assert_eq!(
            classify(&connect_failure),
            Failure::UntrustedCertificate(
                "InvalidCertificate(Other(OtherError(UnknownIssuer)))".into()
            )
        );
        let refused = QdrantError::ResponseError {
            status: tonic::Status::internal(
                "Failed to connect to http://localhost:6334/: tonic::transport::Error(\
                 Transport, ConnectError(ConnectError(\"tcp connect error\", Os { code: 111 })))",
            ),
        };
        assert_eq!(classify(&refused), Failure::Transient { retry_after: None });
    }

    #[test]
    fn an_api_key_with_a_line_break_is_trimmed_and_a_broken_one_is_not_quoted() {
        let with_key = |key: &str| {
            let mut options = QdrantOptions::new("https://q.example:6334", "docs");
            options.api_key = Some(key.to_owned());
            QdrantSink::new(options)
        };
        let sink = with_key("secret-key\n").expect("a trailing line break is trimmed");
        assert_eq!(sink.options.api_key.as_deref(), Some("secret-key"));
        assert_eq!(
            sink.without_api_key("Malformed API key or token: secret-key"),
            "Malformed API key or token: <redacted>"
        );
        match with_key("secret\nkey") {
            Err(SinkError::Rejected(message)) => {
                assert!(message.contains(API_KEY_VAR), "{message}");
                assert!(!message.contains("secret"), "{message}");
            }
            Err(other) => panic!("{other:?}"),
            Ok(_) => panic!("a key with a line break inside is refused"),
        }
        assert_eq!(with_key("  ").unwrap().options.api_key, None);
    }

    #[test]
    fn the_api_key_stays_out_of_debug_output() {
        let mut options = QdrantOptions::new("https://q.example:6334", "docs");
        options.api_key = Some("very-secret".into());
        let shown = format!("{options:?}");
        assert!(!shown.contains("very-secret"), "{shown}");
        assert!(shown.contains("redacted"));
    }
}
