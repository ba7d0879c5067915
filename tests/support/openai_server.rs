//! A fake OpenAI embeddings server for tests and benchmarks: `POST /v1/embeddings` on
//! `127.0.0.1:<free port>`, in this process, speaking the real JSON.
//!
//! It behaves like OpenAI where a client can tell: it checks `Authorization: Bearer` (401 with
//! OpenAI's error shape on a wrong or missing key), the model (400 `model_not_found` for any
//! other), the input (a string or a non-empty array of non-empty strings), `encoding_format`
//! (`float` or absent) and `dimensions` (1 to [`OpenAiServer::DIMENSIONS`]), and answers
//! `{"object": "list", "data": [{"object": "embedding", "index", "embedding"}], "model",
//! "usage"}`. Two deliberate differences make client bugs visible: `data` comes in *reverse*
//! order (a client that ignores `index` mixes vectors up), and the 401 message echoes the whole
//! key it was sent (OpenAI masks it), so a test can check the client scrubs it.
//!
//! Vectors are computed from the text: [`OpenAiServer::vector`] gives the vector any text gets,
//! so a test can check a stored vector without a model. `dimensions` shortens them the way
//! `text-embedding-3-*` does: the first N components, rescaled to unit length.
//!
//! Every request is recorded ([`OpenAiServer::requests`]) with its arrival time, headers and
//! inputs, and counted. A test can make it fail the next N requests with a status (and a
//! `Retry-After`), answer slowly, refuse requests above a number of inputs, or ignore the
//! `dimensions` field as some servers do.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value as Json, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Largest request body read (OpenAI's own limit is in this range).
const MAX_REQUEST_BYTES: usize = 64 * 1024 * 1024;

/// One request as the server received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// When its headers arrived.
    pub received_at: Instant,
    /// Every header, names lower-case, values as text (non-text values are skipped).
    pub headers: Vec<(String, String)>,
    /// The `model` field, if the body had one.
    pub model: Option<String>,
    /// The texts to embed (empty if the body was unusable).
    pub inputs: Vec<String>,
    /// The `dimensions` field, if present.
    pub dimensions: Option<u64>,
    /// The HTTP status the server answered with.
    pub status: u16,
}

impl RecordedRequest {
    /// The value of header `name` (case-insensitive), if it was sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// A failure the server was told to answer with.
#[derive(Debug, Clone)]
struct InjectedFailure {
    status: u16,
    retry_after: Option<String>,
}

#[derive(Default)]
struct Behaviour {
    failures: VecDeque<InjectedFailure>,
    delay: Duration,
    max_inputs: Option<usize>,
    ignore_dimensions: bool,
}

#[derive(Default)]
struct State {
    behaviour: Mutex<Behaviour>,
    requests: Mutex<Vec<RecordedRequest>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// A running fake server; it stops accepting connections when dropped.
pub struct OpenAiServer {
    address: SocketAddr,
    state: Arc<State>,
    accept_loop: JoinHandle<()>,
}

impl OpenAiServer {
    /// The only API key the server accepts (send it as `Authorization: Bearer <key>`).
    pub const API_KEY: &'static str = "sk-fake-3f9c2a7e1b5d4c8f";
    /// The only model it serves.
    pub const MODEL: &'static str = "fake-embedding-3";
    /// The length of its vectors when the request has no `dimensions`.
    pub const DIMENSIONS: usize = 24;

    /// Starts a server on `127.0.0.1` at a free port, on the current tokio runtime.
    pub async fn start() -> OpenAiServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake OpenAI server");
        let address = listener.local_addr().expect("its address");
        let state = Arc::new(State::default());
        let shared = Arc::clone(&state);
        let accept_loop = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = Arc::clone(&shared);
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, Infallible>(handle(&state, request).await) }
                    });
                    // A client hanging up mid-request is not the server's problem.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        OpenAiServer {
            address,
            state,
            accept_loop,
        }
    }

    /// `http://127.0.0.1:<port>`: the base URL to give a client (it posts to
    /// `<base>/v1/embeddings`).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The vector the server returns for `text` at `dimensions` (1 to [`Self::DIMENSIONS`]):
    /// deterministic, unit length.
    pub fn vector(text: &str, dimensions: usize) -> Vec<f32> {
        // FNV-1a of the text seeds a SplitMix64 stream; each draw becomes a component in
        // [-1, 1). Shortening keeps the first components and rescales, like OpenAI's models.
        let mut seed = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
        let full: Vec<f64> = (0..Self::DIMENSIONS)
            .map(|_| {
                seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = seed;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
            })
            .collect();
        let kept = &full[..dimensions.clamp(1, Self::DIMENSIONS)];
        let norm = kept
            .iter()
            .map(|x| x * x)
            .sum::<f64>()
            .sqrt()
            .max(f64::MIN_POSITIVE);
        kept.iter().map(|x| (x / norm) as f32).collect()
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.state.requests).clone()
    }

    /// How many requests arrived (answered or not, any status).
    pub fn request_count(&self) -> usize {
        lock(&self.state.requests).len()
    }

    /// How many texts all requests so far carried (failed ones included).
    pub fn input_count(&self) -> usize {
        lock(&self.state.requests)
            .iter()
            .map(|request| request.inputs.len())
            .sum()
    }

    /// The most requests that were being handled at the same time.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// Forgets the recorded requests and the in-flight high-water mark.
    pub fn clear(&self) {
        lock(&self.state.requests).clear();
        self.state.max_in_flight.store(0, Ordering::SeqCst);
    }

    /// Answers the next `count` requests with `status` and an OpenAI-shaped error body, plus a
    /// `Retry-After: <retry_after>` header when given (seconds or an HTTP date). These come
    /// before any check, key included.
    pub fn fail_next(&self, count: usize, status: u16, retry_after: Option<&str>) {
        let mut behaviour = lock(&self.state.behaviour);
        for _ in 0..count {
            behaviour.failures.push_back(InjectedFailure {
                status,
                retry_after: retry_after.map(str::to_owned),
            });
        }
    }

    /// Drops the failures still queued by [`fail_next`](Self::fail_next): the server answers
    /// normally again.
    pub fn stop_failing(&self) {
        lock(&self.state.behaviour).failures.clear();
    }

    /// Waits `delay` before answering each request from now on.
    pub fn set_delay(&self, delay: Duration) {
        lock(&self.state.behaviour).delay = delay;
    }

    /// Answers 400 to requests with more than `max` inputs (`None`: no limit, the default).
    pub fn set_max_inputs(&self, max: Option<usize>) {
        lock(&self.state.behaviour).max_inputs = max;
    }

    /// Ignores the `dimensions` field and always returns [`Self::DIMENSIONS`] floats, as
    /// servers for models that cannot shorten vectors do.
    pub fn ignore_dimensions_parameter(&self) {
        lock(&self.state.behaviour).ignore_dimensions = true;
    }
}

impl Drop for OpenAiServer {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked while holding it does not make the recorded data unreadable.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Counts a request in flight for as long as it lives.
struct InFlight<'a>(&'a State);

impl<'a> InFlight<'a> {
    fn enter(state: &'a State) -> InFlight<'a> {
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(state)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn handle(state: &State, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let _in_flight = InFlight::enter(state);
    let received_at = Instant::now();
    let headers: Vec<(String, String)> = request
        .headers()
        .iter()
        .filter_map(|(name, value)| {
            Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
        })
        .collect();
    let route_ok = request.method() == Method::POST && request.uri().path() == "/v1/embeddings";
    let route = format!("{} {}", request.method(), request.uri().path());
    let body = Limited::new(request.into_body(), MAX_REQUEST_BYTES)
        .collect()
        .await
        .map(|body| body.to_bytes())
        .unwrap_or_default();
    let json: Option<Json> = serde_json::from_slice(&body).ok();
    let field = |name: &str| json.as_ref().and_then(|json| json.get(name));
    let mut record = RecordedRequest {
        received_at,
        model: field("model").and_then(Json::as_str).map(str::to_owned),
        inputs: inputs(field("input")).unwrap_or_default(),
        dimensions: field("dimensions").and_then(Json::as_u64),
        headers,
        status: 0,
    };

    let (failure, delay, max_inputs, ignore_dimensions) = {
        let mut behaviour = lock(&state.behaviour);
        (
            behaviour.failures.pop_front(),
            behaviour.delay,
            behaviour.max_inputs,
            behaviour.ignore_dimensions,
        )
    };
    let response = if let Some(failure) = failure {
        injected(&failure)
    } else if !route_ok {
        error(
            404,
            &format!("Invalid URL ({route})"),
            "invalid_request_error",
            None,
        )
    } else {
        answer(&record, json.as_ref(), max_inputs, ignore_dimensions)
    };
    record.status = response.status().as_u16();
    lock(&state.requests).push(record);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    response
}

/// The texts of an `input` field: a string, or an array of strings.
fn inputs(input: Option<&Json>) -> Option<Vec<String>> {
    match input? {
        Json::String(text) => Some(vec![text.clone()]),
        Json::Array(items) => items
            .iter()
            .map(|item| item.as_str().map(str::to_owned))
            .collect(),
        _ => None,
    }
}

/// What OpenAI would answer to a request that reached the embeddings route.
fn answer(
    record: &RecordedRequest,
    json: Option<&Json>,
    max_inputs: Option<usize>,
    ignore_dimensions: bool,
) -> Response<Full<Bytes>> {
    let invalid = |message: &str| error(400, message, "invalid_request_error", None);
    match record.header("authorization") {
        None => {
            return error(
                401,
                "You didn't provide an API key. You need to provide your API key in an \
                 Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                "invalid_request_error",
                None,
            );
        }
        Some(value) if value != format!("Bearer {}", OpenAiServer::API_KEY) => {
            let sent = value.strip_prefix("Bearer ").unwrap_or(value);
            return error(
                401,
                &format!("Incorrect API key provided: {sent}."),
                "invalid_request_error",
                Some("invalid_api_key"),
            );
        }
        Some(_) => {}
    }
    let Some(json) = json else {
        return invalid("We could not parse the JSON body of your request.");
    };
    match &record.model {
        Some(model) if model == OpenAiServer::MODEL => {}
        Some(model) => {
            return error(
                400,
                &format!("The model `{model}` does not exist or you do not have access to it."),
                "invalid_request_error",
                Some("model_not_found"),
            );
        }
        None => return invalid("you must provide a model parameter"),
    }
    let input = json.get("input");
    if inputs(input).is_none() || record.inputs.is_empty() {
        return invalid("'$.input' is invalid. Please check the API reference.");
    }
    if record.inputs.iter().any(String::is_empty) {
        return invalid("'$.input' is invalid: empty strings are not allowed.");
    }
    if let Some(max) = max_inputs
        && record.inputs.len() > max
    {
        return invalid(&format!(
            "'$.input' is invalid: {} inputs, at most {max} per request.",
            record.inputs.len()
        ));
    }
    match json.get("encoding_format") {
        None => {}
        Some(Json::String(format)) if format == "float" => {}
        Some(other) => {
            return invalid(&format!("this fake sends floats only, not {other}"));
        }
    }
    let dimensions = match json.get("dimensions") {
        None => OpenAiServer::DIMENSIONS,
        Some(_) if ignore_dimensions => OpenAiServer::DIMENSIONS,
        Some(value) => match value.as_u64().and_then(|n| usize::try_from(n).ok()) {
            Some(n) if (1..=OpenAiServer::DIMENSIONS).contains(&n) => n,
            _ => {
                return invalid(&format!(
                    "Invalid value for 'dimensions': {value}; it must be between 1 and {}.",
                    OpenAiServer::DIMENSIONS
                ));
            }
        },
    };
    let data: Vec<Json> = record
        .inputs
        .iter()
        .enumerate()
        .rev()
        .map(|(index, text)| {
            json!({
                "object": "embedding",
                "index": index,
                "embedding": OpenAiServer::vector(text, dimensions),
            })
        })
        .collect();
    let tokens: usize = record
        .inputs
        .iter()
        .map(|text| text.len().div_ceil(4))
        .sum();
    respond(
        StatusCode::OK,
        &json!({
            "object": "list",
            "data": data,
            "model": OpenAiServer::MODEL,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }),
    )
}

fn injected(failure: &InjectedFailure) -> Response<Full<Bytes>> {
    let (message, kind, code) = match failure.status {
        429 => (
            "Rate limit reached for requests. Please try again later.",
            "requests",
            Some("rate_limit_exceeded"),
        ),
        500..=599 => (
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            None,
        ),
        _ => ("The request was refused.", "invalid_request_error", None),
    };
    let mut response = error(failure.status, message, kind, code);
    if let Some(retry_after) = &failure.retry_after {
        response.headers_mut().insert(
            "retry-after",
            HeaderValue::from_str(retry_after).expect("a header-safe Retry-After"),
        );
    }
    response
}

/// An answer with OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`.
fn error(status: u16, message: &str, kind: &str, code: Option<&str>) -> Response<Full<Bytes>> {
    respond(
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &json!({"error": {"message": message, "type": kind, "param": null, "code": code}}),
    )
}

fn respond(status: StatusCode, body: &Json) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
