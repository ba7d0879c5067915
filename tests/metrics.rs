//! The metrics endpoint of `serve --metrics-addr`: `/metrics` parsed by a real Prometheus text
//! parser shows each pipeline's handled events, batches, state and confirmed position; `/healthz`
//! answers while the process is up; `/readyz` passes while every pipeline streams and fails,
//! naming the pipeline and its reason, when one has failed. On a server of its own, the lag
//! grows while the pipeline rides out an embedder outage and comes back to exactly 0 once it
//! has caught up, the embedding cache's misses and hits are counted, and `--log-format json`
//! writes every line as JSON with the pipeline, slot and positions as fields.

use std::time::Duration;

use pgstream_e2e::metrics_endpoint::{free_port, get, sample};
use pgstream_e2e::tenants::{SOURCE_DSN_VAR, jsonl, jsonl_pipeline, write_config};
use pgstream_e2e::{
    HOST_RUN_TIMEOUT, HostProcess, OpenAiServer, PgServer, PgVersion, TestDb, TestPipeline,
    wait_until, workspace_root,
};
use pgstream_host::embed::API_KEY_ENV;
use serde_json::Value as Json;
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

async fn lag(port: u16) -> Option<f64> {
    let (_, text) = get(port, "/metrics").await?;
    sample(&text, "pgstream_replication_lag_bytes", &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_grows_in_an_outage_and_returns_to_zero_and_json_logs_carry_the_fields() {
    // A server of its own: no other test's WAL keeps the lag above 0.
    let server = PgServer::start(PgVersion::Pg15).expect("start a server");
    let db = server.create_database().await;
    db.exec("CREATE TABLE docs (id int PRIMARY KEY, content text); CREATE TABLE filler (x text);")
        .await;
    let embedder = OpenAiServer::start().await;
    let folder = TempDir::new().unwrap();
    let sink = folder.path().join("sink.jsonl");
    let port = free_port();
    let pipeline = TestPipeline::new(&db, "docs", "embed-handler")
        .with_args(&[
            "--sink".to_owned(),
            "jsonl".to_owned(),
            "--collection".to_owned(),
            sink.display().to_string(),
            "--embedder".to_owned(),
            "openai".to_owned(),
            "--openai-base-url".to_owned(),
            embedder.base_url(),
            "--openai-model".to_owned(),
            OpenAiServer::MODEL.to_owned(),
            "--embed-cache".to_owned(),
            folder.path().join("cache.redb").display().to_string(),
            "--metrics-addr".to_owned(),
            format!("127.0.0.1:{port}"),
            "--log-format".to_owned(),
            "json".to_owned(),
        ])
        .with_env(API_KEY_ENV, OpenAiServer::API_KEY)
        .without_env("OPENAI_API_KEY");
    let mut host = pipeline.start_streaming().await;

    // The embedder goes down: nothing is confirmed while the writes go on.
    embedder.fail_next(1_000_000, 503, None);
    db.exec("INSERT INTO docs SELECT g, 'text ' || g FROM generate_series(1, 40) g")
        .await;
    host.wait_for_log("unavailable; retrying the batch", Duration::from_secs(60))
        .await
        .unwrap_or_else(|error| panic!("the outage is ridden out: {error}\n{}", host.log()));
    db.exec("INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 2000)")
        .await;
    wait_until(Duration::from_secs(30), || async {
        lag(port).await.is_some_and(|lag| lag >= 1_000_000.0)
    })
    .await
    .unwrap_or_else(|error| panic!("the lag shows: {error}\n{}", host.log()));
    let first = lag(port).await.unwrap();
    db.exec("INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 2000)")
        .await;
    wait_until(Duration::from_secs(30), || async {
        lag(port)
            .await
            .is_some_and(|now| now >= first + 1_000_000.0)
    })
    .await
    .unwrap_or_else(|error| panic!("the lag grows: {error}\n{}", host.log()));

    // Back up: the pipeline catches up, and on this quiet server the lag is exactly 0.
    embedder.stop_failing();
    wait_until(Duration::from_secs(90), || async {
        lag(port).await == Some(0.0)
    })
    .await
    .unwrap_or_else(|error| panic!("the lag returns to 0: {error}\n{}", host.log()));
    let (_, text) = get(port, "/metrics").await.unwrap();
    let since = sample(&text, "pgstream_last_change_seconds", &[]).unwrap();
    assert!((0.0..90.0).contains(&since), "{text}");
    // Every metric the Grafana dashboard plots is one the host serves.
    let dashboard =
        std::fs::read_to_string(workspace_root().join("docs/grafana-dashboard.json")).unwrap();
    // Samples, and the families described (one without a value now, such as the safe WAL
    // size on a server without max_slot_wal_keep_size, is still described).
    let served: std::collections::BTreeSet<&str> = text
        .lines()
        .filter_map(|line| match line.strip_prefix("# TYPE ") {
            Some(described) => described.split(' ').next(),
            None if line.starts_with('#') => None,
            None => line.split(['{', ' ']).next(),
        })
        .collect();
    let plotted = dashboard
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("pgstream_"));
    for name in plotted {
        assert!(
            served.contains(name),
            "the dashboard plots {name}, which /metrics lacks:\n{text}"
        );
    }
    // Each try during the outage looked the texts up too: at least one miss per text.
    let misses = sample(&text, "pgstream_embed_cache_misses_total", &[]).unwrap();
    assert!(misses >= 40.0, "{text}");
    assert_eq!(
        sample(&text, "pgstream_embed_cache_hits_total", &[]),
        Some(0.0),
        "{text}"
    );
    assert_eq!(jsonl(&sink).len(), 40);
    assert!(
        host.terminate(HOST_RUN_TIMEOUT).await.unwrap().success(),
        "{}",
        host.log()
    );

    // Every line is one JSON object; the lines that tell positions name the pipeline and slot.
    let log = host.log();
    let lines: Vec<Json> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|error| panic!("{error}: {line}")))
        .collect();
    let line = |message: &str| {
        lines
            .iter()
            .find(|line| line["message"] == message)
            .unwrap_or_else(|| panic!("a {message:?} line in\n{log}"))
    };
    let streaming = line("streaming");
    let slot = db.unique_name("slot");
    assert_eq!(streaming["slot"], slot.as_str(), "{streaming}");
    assert_eq!(streaming["level"], "INFO");
    assert!(
        streaming["pipeline"].is_string() && streaming["from"].is_string(),
        "{streaming}"
    );
    let stopped = line("stopped");
    assert_eq!(stopped["slot"], slot.as_str(), "{stopped}");
    assert!(
        stopped["confirmed"]
            .as_str()
            .is_some_and(|lsn| lsn.contains('/')),
        "{stopped}"
    );
}
