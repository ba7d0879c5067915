//! The webhook sink against a receiver in this process: what it POSTs (signed JSON, named by
//! an idempotency key), how it takes 5xx, 429 and 400, and that the key of a batch stays the
//! same when the batch is replayed after a SIGKILL.

use std::time::Duration;

use pgstream_e2e::webhook_server::{WebhookRequest, WebhookServer};
use pgstream_e2e::{PgServer, PgVersion, TestDb, TestPipeline, wait_until};
use pgstream_host::sink::signature;

const SECRET: &str = "a webhook secret";

fn webhook_pipeline<'a>(db: &'a TestDb, server: &WebhookServer, slot: &str) -> TestPipeline<'a> {
    // The poison handler writes each row as a point without a vector; no row here is poison.
    TestPipeline::new(db, "items", "poison-handler")
        .with_slot(slot)
        .with_env("PGSTREAM_WEBHOOK_SECRET", SECRET)
        .with_args(&[
            "--embedder".to_owned(),
            "none".to_owned(),
            "--sink".to_owned(),
            "webhook".to_owned(),
            "--webhook-url".to_owned(),
            server.url(),
            "--webhook-max-attempts".to_owned(),
            "3".to_owned(),
            "--retry-backoff-ms".to_owned(),
            "50".to_owned(),
            "--backfill".to_owned(),
            "skip".to_owned(),
        ])
}

fn ids(request: &WebhookRequest) -> Vec<i64> {
    request.json()["points"]
        .as_array()
        .map(|points| {
            points
                .iter()
                .map(|point| point["payload"]["id"].as_i64().unwrap())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_signed_named_retried_on_5xx_and_429_and_stable_across_a_sigkill() {
    let server = WebhookServer::start().await;
    let db = PgServer::shared(PgVersion::Pg18).create_database().await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, body text)")
        .await;
    let slot = db.unique_name("hook");
    let pipeline = webhook_pipeline(&db, &server, &slot);
    pipeline.setup().await;

    // A 503, then a 429 asking for a second, then 200: three tries of one write.
    server.answer_next(503, None);
    server.answer_next(429, Some("1"));
    db.exec("INSERT INTO items VALUES (1, 'one'), (2, 'two'), (3, 'three')")
        .await;
    pipeline.catch_up().await;
    let requests = server.requests();
    assert_eq!(
        requests.iter().map(|r| r.status).collect::<Vec<_>>(),
        [503, 429, 200]
    );
    assert!(
        requests[2].received_at - requests[1].received_at >= Duration::from_millis(900),
        "Retry-After: 1 is honoured"
    );
    let key = requests[0].header("idempotency-key").unwrap().to_owned();
    for request in &requests {
        assert_eq!(request.header("idempotency-key"), Some(key.as_str()));
        assert_eq!(
            request.body, requests[0].body,
            "a retry sends the same body"
        );
        assert_eq!(
            request.header("x-pgstream-signature"),
            Some(signature(SECRET.as_bytes(), &request.body).as_str()),
            "the signature is the HMAC-SHA256 of the body"
        );
    }
    assert!(key.starts_with(&format!("{slot}:")), "{key}");
    let body = requests[2].json();
    assert_eq!(body["op"], "upsert");
    assert_eq!(body["slot"], slot.as_str());
    assert_eq!(ids(&requests[2]), [1, 2, 3]);
    assert_eq!(body["points"][0]["payload"]["body"], "one");
    assert_eq!(body["batch"]["events"], 3);

    // The receiver keeps failing: the host rides it out, retrying the batch. Killed then, and
    // started again once the receiver is back, it replays the batch with the same key.
    for _ in 0..100 {
        server.answer_next(503, None);
    }
    db.exec("INSERT INTO items VALUES (4, 'four')").await;
    let before = server.requests().len();
    let mut host = pipeline.start();
    wait_until(Duration::from_secs(60), || async {
        server.requests().len() >= before + 4
    })
    .await
    .unwrap_or_else(|error| panic!("{error}\n{}", host.log()));
    host.kill().await.unwrap();
    let killed_at = server.requests().len();
    server.answer_ok_from_now();
    pipeline.catch_up().await;
    let replay = &server.requests()[before..];
    assert!(
        replay.len() > killed_at - before,
        "sent again after the restart"
    );
    let keys: Vec<&str> = replay
        .iter()
        .map(|request| request.header("idempotency-key").unwrap())
        .collect();
    assert!(
        keys.iter().all(|k| *k == keys[0]),
        "one key across the kill: {keys:?}"
    );
    assert_ne!(keys[0], key, "another batch, another key");
    assert_eq!(replay.last().unwrap().status, 200);
    assert_eq!(ids(replay.last().unwrap()), [4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_is_a_refusal_that_stops_the_pipeline_with_nothing_confirmed() {
    let server = WebhookServer::start().await;
    let db = PgServer::shared(PgVersion::Pg18).create_database().await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, body text)")
        .await;
    let slot = db.unique_name("hook");
    let pipeline = webhook_pipeline(&db, &server, &slot);
    pipeline.setup().await;
    let confirmed = pipeline.confirmed_flush_lsn().await;
    server.answer_next(400, None);
    db.exec("INSERT INTO items VALUES (1, 'one')").await;
    let mut host = pipeline.run_to_current_lsn().await;
    let status = host.wait_timeout(Duration::from_secs(10)).await.unwrap();
    assert!(!status.success(), "{}", host.log());
    let log = host.log();
    assert!(log.contains("refused the write: HTTP 400"), "{log}");
    assert_eq!(server.requests().len(), 1, "a 400 is not retried");
    assert_eq!(pipeline.confirmed_flush_lsn().await, confirmed);
}
