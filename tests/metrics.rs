//! The metrics endpoint of `serve --metrics-addr`: `/metrics` parsed by a real Prometheus text
//! parser shows each pipeline's handled events, batches, state and confirmed position; `/healthz`
//! answers while the process is up; `/readyz` passes while every pipeline streams and fails,
//! naming the pipeline and its reason, when one has failed.

use std::time::Duration;

use pgstream_e2e::metrics_endpoint::{free_port, get, sample};
use pgstream_e2e::tenants::{SOURCE_DSN_VAR, jsonl, jsonl_pipeline, write_config};
use pgstream_e2e::{HOST_RUN_TIMEOUT, HostProcess, PgServer, PgVersion, TestDb, wait_until};
use tempfile::TempDir;

fn start(config: &std::path::Path, port: u16, db: &TestDb) -> HostProcess {
    let mut host = HostProcess::command();
    host.args(["serve", "--config"])
        .arg(config)
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .env(SOURCE_DSN_VAR, db.dsn());
    HostProcess::spawn(host).expect("start the host")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_each_pipeline_handled_and_readyz_follows_their_states() {
    let db = PgServer::shared(PgVersion::Pg15).create_database().await;
    db.exec("CREATE TABLE docs (id int PRIMARY KEY, content text);")
        .await;
    let folder = TempDir::new().unwrap();
    let sink = folder.path().join("docs.jsonl");
    let config = write_config(
        folder.path(),
        "",
        &[jsonl_pipeline("docs", "docs", "trap-handler", &sink, "")],
    );
    let port = free_port();
    let mut host = start(&config, port, &db);
    wait_until(Duration::from_secs(120), || async {
        matches!(get(port, "/readyz").await, Some((200, _)))
    })
    .await
    .unwrap_or_else(|error| panic!("the pipeline becomes ready: {error}\n{}", host.log()));
    assert_eq!(get(port, "/healthz").await.map(|(code, _)| code), Some(200));

    db.exec("INSERT INTO docs SELECT g, 'document ' || g FROM generate_series(1, 25) g")
        .await;
    db.exec("UPDATE docs SET content = 'changed' WHERE id <= 5")
        .await;
    wait_until(Duration::from_secs(60), || async {
        jsonl(&sink)
            .iter()
            .filter(|line| line["op"] == "upsert")
            .count()
            == 30
    })
    .await
    .unwrap_or_else(|error| panic!("the rows arrive: {error}\n{}", host.log()));
    let (code, text) = get(port, "/metrics").await.expect("metrics answer");
    assert_eq!(code, 200);
    let events = |operation| {
        sample(
            &text,
            "pgstream_events_total",
            &[("pipeline", "docs"), ("operation", operation)],
        )
    };
    assert_eq!(events("insert"), Some(25.0), "{text}");
    assert_eq!(events("update"), Some(5.0), "{text}");
    assert_eq!(events("delete"), Some(0.0), "{text}");
    // Both transactions may share a batch.
    let batches = sample(&text, "pgstream_batches_total", &[("pipeline", "docs")]).unwrap();
    assert!((1.0..=30.0).contains(&batches), "{text}");
    assert_eq!(
        sample(
            &text,
            "pgstream_sink_items_total",
            &[("pipeline", "docs"), ("operation", "upsert")]
        ),
        Some(30.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "pgstream_pipeline_state",
            &[("pipeline", "docs"), ("state", "streaming")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "pgstream_pipeline_state",
            &[("pipeline", "docs"), ("state", "failed")]
        ),
        Some(0.0)
    );
    assert!(sample(&text, "pgstream_confirmed_lsn", &[("pipeline", "docs")]).unwrap() > 0.0);
    assert!(
        text.contains("pgstream_handler_call_seconds_bucket"),
        "{text}"
    );
    let status = host.terminate(HOST_RUN_TIMEOUT).await.unwrap();
    assert!(status.success(), "{}", host.log());

    // Beside it, a pipeline whose plugin is missing fails for good: the process is not ready,
    // and /readyz says which pipeline and why.
    let broken = write_config(
        folder.path(),
        "",
        &[
            jsonl_pipeline("docs", "docs", "trap-handler", &sink, ""),
            jsonl_pipeline(
                "broken",
                "docs",
                "trap-handler",
                &folder.path().join("broken.jsonl"),
                "",
            ),
        ],
    );
    let text = std::fs::read_to_string(&broken).unwrap();
    let last = text.rfind("trap-handler.wasm").unwrap();
    let text = format!(
        "{}no-such-handler.wasm{}",
        &text[..last],
        &text[last + 17..]
    );
    std::fs::write(&broken, text).unwrap();
    let port = free_port();
    let mut host = start(&broken, port, &db);
    wait_until(Duration::from_secs(60), || async {
        matches!(get(port, "/readyz").await, Some((503, text)) if text.contains("\"failed\""))
    })
    .await
    .unwrap_or_else(|error| panic!("/readyz reports the failure: {error}\n{}", host.log()));
    let (code, body) = get(port, "/readyz").await.expect("/readyz answers");
    assert_eq!(code, 503);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["ready"], false);
    assert_eq!(json["pipelines"][0]["name"], "docs");
    assert_eq!(json["pipelines"][1]["name"], "broken");
    assert_eq!(json["pipelines"][1]["state"], "failed");
    assert!(
        json["pipelines"][1]["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("no-such-handler")),
        "{body}"
    );
    host.terminate(HOST_RUN_TIMEOUT).await.unwrap();
}
