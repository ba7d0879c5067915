//! The OpenAI-compatible embedder against the fake server of `support/openai_server.rs`:
//! how it cuts batches into requests, keeps order under concurrency, waits out 429s, retries
//! 5xx and timeouts, fails fast on other 4xx with the server's message, keeps the API key out
//! of every error, and checks vector sizes. The last test runs the whole pipeline (real
//! Postgres 18, the real host binary, the `embed-handler` plugin, pgvector) with
//! `--embedder openai` and checks the stored vectors are the server's.

use std::collections::BTreeMap;
use std::time::Duration;

use pgstream_e2e::{OpenAiServer, PgServer, PgVersion, TestDb, TestPipeline};
use pgstream_host::embed::{
    API_KEY_ENV, ApiKey, EmbedError, Embedder, OpenAiConfig, OpenAiEmbedder, OpenAiRetryPolicy,
};
use serde_json::Value as Json;

/// A configuration for `server` with the right key, fast retries and the given limits.
fn config(server: &OpenAiServer) -> OpenAiConfig {
    OpenAiConfig {
        api_key: ApiKey::new(OpenAiServer::API_KEY),
        retry: OpenAiRetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            ..OpenAiRetryPolicy::default()
        },
        ..OpenAiConfig::new(server.base_url(), OpenAiServer::MODEL)
    }
}

fn texts(count: usize) -> Vec<String> {
    (0..count)
        .map(|i| format!("text number {i} about topic {}", i % 7))
        .collect()
}

fn expected(texts: &[String], dimensions: usize) -> Vec<Vec<f32>> {
    texts
        .iter()
        .map(|text| OpenAiServer::vector(text, dimensions))
        .collect()
}

/// Everything a user could see of an error: its message, its causes and its Debug form.
fn everything_printed(error: &EmbedError) -> String {
    let mut text = format!("{error} | {error:?}");
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(&format!(" | {cause} | {cause:?}"));
        source = cause.source();
    }
    text
}

#[tokio::test]
async fn probes_the_size_once_and_cuts_batches_by_inputs() {
    let server = OpenAiServer::start().await;
    // The server refuses more than 3 inputs: a client that did not cut would fail.
    server.set_max_inputs(Some(3));
    let embedder = OpenAiEmbedder::connect(OpenAiConfig {
        max_inputs_per_request: 3,
        ..config(&server)
    })
    .await
    .expect("connect");
    assert_eq!(embedder.dimensions(), OpenAiServer::DIMENSIONS);
    let probe = server.requests();
    assert_eq!(probe.len(), 1, "one probe request at connect");
    assert_eq!(probe[0].dimensions, None);
    server.clear();

    let batch = texts(10);
    let vectors = embedder.embed(&batch).await.expect("embed");
    assert_eq!(vectors, expected(&batch, OpenAiServer::DIMENSIONS));
    let mut sizes: Vec<usize> = server.requests().iter().map(|r| r.inputs.len()).collect();
    sizes.sort_unstable();
    assert_eq!(sizes, vec![1, 3, 3, 3]);
    assert_eq!(server.input_count(), 10);
    for request in server.requests() {
        assert_eq!(request.status, 200);
        assert_eq!(request.model.as_deref(), Some(OpenAiServer::MODEL));
        assert_eq!(
            request.header("authorization"),
            Some(format!("Bearer {}", OpenAiServer::API_KEY).as_str())
        );
    }

    assert!(embedder.embed(&[]).await.unwrap().is_empty());
    assert_eq!(server.request_count(), 4, "no request for an empty batch");
}

#[tokio::test]
async fn cuts_batches_by_estimated_tokens() {
    let server = OpenAiServer::start().await;
    let embedder = OpenAiEmbedder::connect(OpenAiConfig {
        dimensions: Some(OpenAiServer::DIMENSIONS),
        max_tokens_per_request: 25,
        ..config(&server)
    })
    .await
    .expect("connect");
    assert_eq!(server.request_count(), 0, "no probe when the size is given");

    // 40 bytes = 10 estimated tokens each, so two per request; the 200-byte text (50 tokens)
    // is over the limit alone and goes by itself.
    let mut batch: Vec<String> = (0..5).map(|i| format!("{i:0>40}")).collect();
    batch.insert(2, "y".repeat(200));
    let vectors = embedder.embed(&batch).await.expect("embed");
    assert_eq!(vectors, expected(&batch, OpenAiServer::DIMENSIONS));
    let mut requests: Vec<Vec<String>> = server.requests().into_iter().map(|r| r.inputs).collect();
    requests.sort();
    let mut planned = vec![
        batch[0..2].to_vec(),
        batch[2..3].to_vec(),
        batch[3..5].to_vec(),
        batch[5..6].to_vec(),
    ];
    planned.sort();
    assert_eq!(requests, planned);
}

#[tokio::test]
async fn concurrent_requests_stay_within_the_limit_and_keep_order() {
    let server = OpenAiServer::start().await;
    server.set_delay(Duration::from_millis(150));
    let embedder = OpenAiEmbedder::connect(OpenAiConfig {
        dimensions: Some(8),
        max_inputs_per_request: 2,
        max_concurrent_requests: 3,
        ..config(&server)
    })
    .await
    .expect("connect");

    let batch = texts(12);
    let vectors = embedder.embed(&batch).await.expect("embed");
    // The fake answers each request with its data reversed and requests finish in any
    // order: only the `index` of each item puts a vector in the right place.
    assert_eq!(vectors, expected(&batch, 8));
    assert_eq!(server.request_count(), 6);
    let most = server.max_in_flight();
    assert!(
        (2..=3).contains(&most),
        "{most} requests in flight at once, expected up to the limit of 3"
    );
}

#[tokio::test]
async fn rate_limit_waits_for_retry_after() {
    let server = OpenAiServer::start().await;
    let embedder = OpenAiEmbedder::connect(OpenAiConfig {
        dimensions: Some(OpenAiServer::DIMENSIONS),
        // Without Retry-After the client would be back within milliseconds.
        retry: OpenAiRetryPolicy {
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(1),
            ..config(&server).retry
        },
        ..config(&server)
    })
    .await
    .expect("connect");
    server.fail_next(1, 429, Some("1"));

    let batch = texts(3);
    let vectors = embedder.embed(&batch).await.expect("embed after the 429");
    assert_eq!(vectors, expected(&batch, OpenAiServer::DIMENSIONS));
    let requests = server.requests();
    assert_eq!(
        requests.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![429, 200]
    );
    assert_eq!(
        requests[0].inputs, requests[1].inputs,
        "the same request again"
    );
    let gap = requests[1].received_at - requests[0].received_at;
    assert!(
        gap >= Duration::from_secs(1),
        "retried after {gap:?}, before the 1 s the server asked for"
    );
}

#[tokio::test]
async fn server_errors_are_retried_until_the_attempt_limit() {
    let server = OpenAiServer::start().await;
    let embedder = OpenAiEmbedder::connect(OpenAiConfig {
        dimensions: Some(OpenAiServer::DIMENSIONS),
        ..config(&server)
    })
    .await
    .expect("connect");
    let batch = texts(2);

    server.fail_next(2, 503, None);
    let vectors = embedder.embed(&batch).await.expect("embed after two 503s");
    assert_eq!(vectors, expected(&batch, OpenAiServer::DIMENSIONS));
    assert_eq!(server.request_count(), 3);

    server.clear();
    server.fail_next(10, 500, None);
    let error = embedder
        .embed(&batch)
        .await
        .expect_err("four 500s in a row");
    assert!(
        matches!(error, EmbedError::Unavailable { attempts: 4, .. }),
        "{error:?}"
    );
    assert!(error.is_retryable(), "the pipeline may try the batch later");
    assert!(
        error.to_string().contains("The server had an error"),
        "{error}"
    );
    assert_eq!(server.request_count(), 4, "max_attempts bounds the tries");
}

#[tokio::test]
async fn timeouts_are_retried_then_reported() {
    let server = OpenAiServer::start().await;
    server.set_delay(Duration::from_millis(500));
    let embedder = OpenAiEmbedder::connect(OpenAiConfig {
        dimensions: Some(OpenAiServer::DIMENSIONS),
        request_timeout: Duration::from_millis(100),
        retry: OpenAiRetryPolicy {
            max_attempts: 2,
            ..config(&server).retry
        },
        ..config(&server)
    })
    .await
    .expect("connect");
    let error = embedder.embed(&texts(1)).await.expect_err("too slow");
    assert!(error.is_retryable());
    assert!(
        error
            .to_string()
            .contains("no complete answer within 100 ms"),
        "{error}"
    );
    assert_eq!(server.request_count(), 2);
}

#[tokio::test]
async fn client_errors_fail_at_once_with_the_server_message() {
    let server = OpenAiServer::start().await;
    let embedder = OpenAiEmbedder::connect(OpenAiConfig {
        dimensions: Some(OpenAiServer::DIMENSIONS),
        ..OpenAiConfig {
            model: "no-such-model".into(),
            ..config(&server)
        }
    })
    .await
    .expect("no request at connect when the size is given");
    let error = embedder.embed(&texts(2)).await.expect_err("unknown model");
    match &error {
        EmbedError::Rejected {
            status, message, ..
        } => {
            assert_eq!(*status, 400);
            assert!(
                message.contains("The model `no-such-model` does not exist"),
                "{message}"
            );
            assert!(message.contains("model_not_found"), "{message}");
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert!(!error.is_retryable());
    assert_eq!(server.request_count(), 1, "a 400 is not retried");
}

#[tokio::test]
async fn wrong_key_is_a_clear_error_that_never_shows_the_key() {
    let server = OpenAiServer::start().await;
    let wrong = "sk-wrong-7d1e0c9b8a6f5e4d";
    let error = OpenAiEmbedder::connect(OpenAiConfig {
        api_key: ApiKey::new(wrong),
        ..config(&server)
    })
    .await
    .expect_err("the probe is refused");
    assert!(
        matches!(error, EmbedError::Rejected { status: 401, .. }),
        "{error:?}"
    );
    let printed = everything_printed(&error);
    assert!(printed.contains("Incorrect API key provided"), "{printed}");
    assert!(
        printed.contains(API_KEY_ENV),
        "says where the key comes from: {printed}"
    );
    // The fake echoed the whole key in its message; the client must have scrubbed it.
    assert_eq!(
        server.requests()[0].header("authorization"),
        Some(format!("Bearer {wrong}").as_str())
    );
    assert!(!printed.contains(wrong), "{printed}");
    assert_eq!(server.request_count(), 1, "a 401 is not retried");

    let missing = OpenAiEmbedder::connect(OpenAiConfig {
        api_key: None,
        ..config(&server)
    })
    .await
    .expect_err("no key at all");
    assert!(
        missing
            .to_string()
            .contains("You didn't provide an API key"),
        "{missing}"
    );

    // A working embedder, its config and its errors never print the right key either.
    let good = config(&server);
    assert!(!format!("{good:?}").contains(OpenAiServer::API_KEY));
    let embedder = OpenAiEmbedder::connect(good).await.expect("connect");
    assert!(!format!("{embedder:?}").contains(OpenAiServer::API_KEY));
    server.fail_next(10, 500, None);
    let error = embedder.embed(&texts(1)).await.expect_err("500s");
    assert!(!everything_printed(&error).contains(OpenAiServer::API_KEY));
}

#[tokio::test]
async fn shortened_vectors_and_a_size_mismatch() {
    let server = OpenAiServer::start().await;
    let embedder = OpenAiEmbedder::connect(OpenAiConfig {
        dimensions: Some(8),
        ..config(&server)
    })
    .await
    .expect("connect");
    let batch = texts(3);
    assert_eq!(embedder.embed(&batch).await.unwrap(), expected(&batch, 8));
    assert!(server.requests().iter().all(|r| r.dimensions == Some(8)));

    // A server that ignores `dimensions` answers with vectors the sink was not prepared for.
    server.ignore_dimensions_parameter();
    let error = embedder.embed(&batch).await.expect_err("24 floats, not 8");
    assert!(
        matches!(
            error,
            EmbedError::DimensionMismatch {
                expected: 8,
                actual: 24,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(!error.is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_stores_the_servers_vectors() {
    let server = OpenAiServer::start().await;
    let db = PgServer::shared(PgVersion::Pg18).create_database().await;
    db.create_vector_extension().await;
    db.exec("CREATE TABLE docs (id bigint PRIMARY KEY, title text, content text);")
        .await;
    let pipeline = openai_pipeline(&db, &server);
    pipeline.setup().await;
    db.exec(
        "INSERT INTO docs SELECT g, 'title ' || g, 'document ' || g || ' is about topic ' || g % 7
           FROM generate_series(1, 40) g;
         UPDATE docs SET content = 'rewritten document ' || id WHERE id <= 5;
         -- The server refuses empty input: the example handler gives blank text no point.
         UPDATE docs SET content = '' WHERE id IN (6, 7);
         UPDATE docs SET content = '  ' WHERE id = 8;
         DELETE FROM docs WHERE id BETWEEN 36 AND 40;",
    )
    .await;
    let log = pipeline.catch_up().await;
    assert!(
        !log.contains(OpenAiServer::API_KEY),
        "the API key leaked into the log:\n{log}"
    );
    assert!(
        log.contains("asked the embedding server once for the model's vector size"),
        "{log}"
    );

    let rows = db
        .client()
        .query(
            "SELECT id, content FROM docs WHERE trim(content) <> '' ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let points = stored_points(&db).await;
    assert_eq!(
        points.len(),
        32,
        "rows 36-40 were deleted, rows 6-8 have blank text"
    );
    for row in rows {
        let (id, content): (i64, String) = (row.get(0), row.get(1));
        let (payload, vector) = &points[&id];
        assert_eq!(
            vector,
            &OpenAiServer::vector(&content, OpenAiServer::DIMENSIONS),
            "vector of row {id} ({content:?})"
        );
        assert_eq!(payload["id"], id, "payload of row {id}: {payload}");
    }
    let requests = server.requests();
    assert!(requests.iter().all(|r| r.status == 200));
    assert!(
        requests.iter().all(|r| r.inputs.len() <= 16),
        "--openai-max-inputs 16 bounds every request"
    );
    assert!(
        requests.iter().any(|r| r.inputs.len() > 1),
        "texts were batched"
    );
}

/// A pgvector pipeline on `docs` of `db` embedding through the fake `server`, with its key.
fn openai_pipeline<'a>(db: &'a TestDb, server: &OpenAiServer) -> TestPipeline<'a> {
    TestPipeline::new(db, "docs", "embed-handler")
        .with_args(&[
            "--sink",
            "pgvector",
            "--embedder",
            "openai",
            "--openai-base-url",
            &server.base_url(),
            "--openai-model",
            OpenAiServer::MODEL,
            "--openai-max-inputs",
            "16",
        ])
        .with_env(API_KEY_ENV, OpenAiServer::API_KEY)
        .without_env("OPENAI_API_KEY")
}

async fn stored_points(db: &TestDb) -> BTreeMap<i64, (Json, Vec<f32>)> {
    let rows = db
        .client()
        .query(
            "SELECT source_key[1]::bigint, payload, embedding::real[] FROM docs_embeddings",
            &[],
        )
        .await
        .expect("read the vector table");
    rows.iter()
        .map(|row| (row.get(0), (row.get(1), row.get(2))))
        .collect()
}
