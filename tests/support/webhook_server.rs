//! A webhook receiver for tests: `POST /` on `127.0.0.1:<free port>`, in this process. It
//! records every request (headers and body) and answers 200, or what a test told it to answer
//! next (a status and a `Retry-After`), so a test can check what the webhook sink sends and how
//! it takes failures.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value as Json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// One request as received.
#[derive(Debug, Clone)]
pub struct WebhookRequest {
    /// When it arrived.
    pub received_at: Instant,
    /// Headers, names lower-case.
    pub headers: Vec<(String, String)>,
    /// The raw body.
    pub body: Bytes,
    /// The status answered.
    pub status: u16,
}

impl WebhookRequest {
    /// The value of header `name`, if sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> Json {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

#[derive(Default)]
struct State {
    answers: Mutex<VecDeque<(u16, Option<String>)>>,
    requests: Mutex<Vec<WebhookRequest>>,
}

/// A running receiver; it stops accepting connections when dropped.
pub struct WebhookServer {
    address: SocketAddr,
    state: Arc<State>,
    accept_loop: JoinHandle<()>,
}

impl WebhookServer {
    /// Starts on a free port of `127.0.0.1`, on the current tokio runtime.
    pub async fn start() -> WebhookServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the webhook receiver");
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
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        WebhookServer {
            address,
            state,
            accept_loop,
        }
    }

    /// `http://127.0.0.1:<port>/hook`.
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.address)
    }

    /// Answers the next request with `status` (and `Retry-After: retry_after`), instead of 200.
    pub fn answer_next(&self, status: u16, retry_after: Option<&str>) {
        self.state
            .answers
            .lock()
            .unwrap()
            .push_back((status, retry_after.map(str::to_owned)));
    }

    /// Forgets the answers still queued: 200 from now on.
    pub fn answer_ok_from_now(&self) {
        self.state.answers.lock().unwrap().clear();
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<WebhookRequest> {
        self.state.requests.lock().unwrap().clone()
    }
}

impl Drop for WebhookServer {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

async fn handle(state: &State, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let received_at = Instant::now();
    let headers = request
        .headers()
        .iter()
        .filter_map(|(name, value)| {
            Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
        })
        .collect();
    let body = request
        .into_body()
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .unwrap_or_default();
    let (status, retry_after) = state
        .answers
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or((200, None));
    state.requests.lock().unwrap().push(WebhookRequest {
        received_at,
        headers,
        body,
        status,
    });
    let mut response = Response::builder().status(status);
    if let Some(retry_after) = retry_after {
        response = response.header("retry-after", retry_after);
    }
    response
        .body(Full::new(Bytes::from(if status == 200 {
            "ok"
        } else {
            "told to fail"
        })))
        .expect("a valid response")
}
