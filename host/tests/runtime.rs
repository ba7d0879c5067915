//! The plugin runtime against real guest components (built by `make guests` into
//! `target/wasm/`): events arrive intact, batches collapse to one embed and one upsert, and
//! every failure mode (guest error, trap, timeout, memory) is reported as itself.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use pgstream_host::event::{ChangeEvent, Column, Operation, Relation, Value};
use pgstream_host::lsn::Lsn;
use pgstream_host::point::{Point, PointKey};
use pgstream_host::runtime::{
    ContractVersion, EngineOptions, HandleError, HandlerInstance, HostImports, ImportError, Limits,
    PluginEngine, RuntimeError,
};
use serde_json::{Value as Json, json};

mod components;
use components::{fixture, wasm};

/// One host import call as the guest made it.
#[derive(Debug, Clone, PartialEq)]
enum Call {
    Embed(Vec<String>),
    Upsert(Vec<Point>),
    Merge(Vec<Point>),
    Delete(Vec<PointKey>),
    DeleteTable(String, String),
}

/// Records every call; `embed` answers `[text length in chars, 1.0]` per text after
/// `embed_delay`.
#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<Call>>,
    embed_delay: Duration,
}

impl Recorder {
    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    fn upserted(&self) -> Vec<Point> {
        self.calls()
            .into_iter()
            .filter_map(|call| match call {
                Call::Upsert(points) => Some(points),
                _ => None,
            })
            .flatten()
            .collect()
    }
}

#[async_trait]
impl HostImports for Recorder {
    async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, ImportError> {
        tokio::time::sleep(self.embed_delay).await;
        let vectors = texts
            .iter()
            .map(|text| vec![text.chars().count() as f32, 1.0])
            .collect();
        self.calls.lock().unwrap().push(Call::Embed(texts));
        Ok(vectors)
    }

    async fn upsert(&self, points: Vec<Point>) -> Result<(), ImportError> {
        self.calls.lock().unwrap().push(Call::Upsert(points));
        Ok(())
    }

    async fn merge(&self, points: Vec<Point>) -> Result<(), ImportError> {
        self.calls.lock().unwrap().push(Call::Merge(points));
        Ok(())
    }

    async fn delete(&self, keys: Vec<PointKey>) -> Result<(), ImportError> {
        self.calls.lock().unwrap().push(Call::Delete(keys));
        Ok(())
    }

    async fn delete_table(&self, schema: String, table: String) -> Result<(), ImportError> {
        self.calls
            .lock()
            .unwrap()
            .push(Call::DeleteTable(schema, table));
        Ok(())
    }
}

const INT4: u32 = 23;
const TEXT: u32 = 25;
const JSONB: u32 = 3802;

/// `public.documents (id int4 key, content text, note text, meta jsonb)`.
fn documents() -> Arc<Relation> {
    let column = |name: &str, type_oid, is_key| Column {
        name: name.to_owned(),
        type_oid,
        is_key,
    };
    Arc::new(Relation::new(
        16_384,
        "public".to_owned(),
        "documents".to_owned(),
        vec![
            column("id", INT4, true),
            column("content", TEXT, false),
            column("note", TEXT, false),
            column("meta", JSONB, false),
        ],
    ))
}

fn text(value: &str) -> Value {
    Value::text(Bytes::copy_from_slice(value.as_bytes())).unwrap()
}

fn event(operation: Operation, relation: &Arc<Relation>, row: Vec<Value>) -> ChangeEvent {
    ChangeEvent {
        operation,
        relation: relation.clone(),
        row,
        old_row: None,
        lsn: Lsn(0x16_B374_D848),
        commit_time_us: 1_714_559_400_250_000,
        xid: 771,
    }
}

fn insert(relation: &Arc<Relation>, id: i32, content: &str) -> ChangeEvent {
    event(
        Operation::Insert,
        relation,
        vec![
            text(&id.to_string()),
            text(content),
            Value::Null,
            text(r#"{"tags": ["a"]}"#),
        ],
    )
}

async fn instantiate(name: &str, imports: Arc<Recorder>, limits: Limits) -> HandlerInstance {
    instantiate_file(&wasm(name), imports, limits).await
}

async fn instantiate_file(
    path: &std::path::Path,
    imports: Arc<Recorder>,
    limits: Limits,
) -> HandlerInstance {
    let engine = PluginEngine::new(EngineOptions::default()).unwrap();
    let plugin = engine.load(path).unwrap();
    plugin
        .instantiate(imports, limits, "test/plugin")
        .await
        .unwrap()
}

fn column_json(column: &Column, value: &Value) -> Json {
    let value = match value {
        Value::Null => json!({ "null": true }),
        Value::Unchanged => json!({ "unchanged": true }),
        Value::Text(_) => json!({ "text": value.as_str().unwrap() }),
    };
    json!({ "name": column.name, "type_oid": column.type_oid, "value": value })
}

/// What echo-handler reports for `event` (see its docs).
fn expected_echo(event: &ChangeEvent) -> Json {
    let row = |values: &[Value]| {
        event
            .relation
            .columns
            .iter()
            .zip(values)
            .map(|(column, value)| column_json(column, value))
            .collect::<Vec<_>>()
    };
    let operation = match event.operation {
        Operation::Insert => "insert",
        Operation::Update => "update",
        Operation::Delete => "delete",
        Operation::Truncate => "truncate",
        Operation::Read => "read",
    };
    json!({
        "operation": operation,
        "schema": event.relation.schema,
        "table": event.relation.table,
        "lsn": event.lsn.0,
        "commit_time": event.commit_time_us,
        "xid": event.xid,
        "key_columns": event.relation.key_columns,
        "row": row(&event.row),
        "old_row": event.old_row.as_deref().map(row),
    })
}

fn key(id: &str) -> PointKey {
    PointKey {
        schema: "public".to_owned(),
        table: "documents".to_owned(),
        key: vec![id.to_owned()],
    }
}

#[tokio::test]
async fn events_reach_the_guest_intact() {
    let documents = documents();
    let mut update = event(
        Operation::Update,
        &documents,
        vec![text("2"), Value::Unchanged, text(""), Value::Null],
    );
    update.old_row = Some(vec![
        text("2"),
        text("old content"),
        text("old note"),
        Value::Null,
    ]);
    let content = "héllo \"wörld\"\nline two \u{1F600}";
    let events = vec![
        insert(&documents, 1, content),
        update,
        event(
            Operation::Delete,
            &documents,
            vec![text("3"), Value::Null, Value::Null, Value::Null],
        ),
        event(Operation::Truncate, &documents, vec![]),
        event(
            Operation::Read,
            &documents,
            vec![text("4"), Value::Null, text("read"), Value::Null],
        ),
    ];

    let recorder = Arc::new(Recorder::default());
    let mut instance = instantiate("echo-handler", recorder.clone(), Limits::default()).await;
    instance.handle(&events).await.unwrap();

    assert_eq!(
        recorder.calls()[0],
        Call::Embed(vec![content.to_owned()]),
        "one embed call with the only text content"
    );
    let points = recorder.upserted();
    assert_eq!(points.len(), events.len());
    for (index, (point, event)) in points.iter().zip(&events).enumerate() {
        let payload: Json = serde_json::from_str(&point.payload).unwrap();
        assert_eq!(payload, expected_echo(event), "event {index}");
        assert_eq!(point.key.key, vec![index.to_string()]);
    }
    assert_eq!(
        points[0].vector,
        Some(vec![content.chars().count() as f32, 1.0])
    );
    assert_eq!(points[1].vector, None);

    // The instance stays usable for the next batch.
    instance.handle(&events[..1]).await.unwrap();
    assert_eq!(recorder.upserted().len(), events.len() + 1);
}

#[tokio::test]
async fn embed_handler_collapses_a_batch_into_one_embed_and_one_upsert() {
    let documents = documents();
    let events = vec![
        insert(&documents, 1, "first"),
        insert(&documents, 2, "second"),
        event(
            Operation::Update,
            &documents,
            vec![text("2"), Value::Unchanged, text("edited"), Value::Null],
        ),
        insert(&documents, 3, "short-lived"),
        event(
            Operation::Delete,
            &documents,
            vec![text("3"), Value::Null, Value::Null, Value::Null],
        ),
    ];
    let recorder = Arc::new(Recorder::default());
    let mut instance = instantiate("embed-handler", recorder.clone(), Limits::default()).await;
    instance.handle(&events).await.unwrap();

    assert_eq!(
        recorder.calls(),
        vec![
            Call::Delete(vec![key("3")]),
            Call::Embed(vec!["first".to_owned(), "second".to_owned()]),
            Call::Upsert(vec![
                Point {
                    key: key("1"),
                    vector: Some(vec![5.0, 1.0]),
                    payload: r#"{"id":1,"content":"first","note":null,"meta":{"tags": ["a"]}}"#
                        .to_owned(),
                },
                Point {
                    key: key("2"),
                    vector: Some(vec![6.0, 1.0]),
                    payload: r#"{"id":2,"content":"second","note":null,"meta":{"tags": ["a"]}}"#
                        .to_owned(),
                },
            ]),
            // Then updated without touching content: its payload lacks content, so it is
            // merged into the one just written, which keeps the text.
            Call::Merge(vec![Point {
                key: key("2"),
                vector: None,
                payload: r#"{"id":2,"note":"edited","meta":null}"#.to_owned(),
            }]),
        ]
    );
}

#[tokio::test]
async fn embed_handler_updates_only_the_payload_when_content_is_unchanged() {
    let documents = documents();
    let unchanged = event(
        Operation::Update,
        &documents,
        vec![text("1"), Value::Unchanged, text("n"), Value::Null],
    );
    let truncate = event(Operation::Truncate, &documents, vec![]);
    let recorder = Arc::new(Recorder::default());
    let mut instance = instantiate("embed-handler", recorder.clone(), Limits::default()).await;
    instance.handle(&[truncate, unchanged]).await.unwrap();
    assert_eq!(
        recorder.calls(),
        vec![
            Call::DeleteTable("public".to_owned(), "documents".to_owned()),
            Call::Merge(vec![Point {
                key: key("1"),
                vector: None,
                payload: r#"{"id":1,"note":"n","meta":null}"#.to_owned(),
            }]),
        ]
    );
}

#[tokio::test]
async fn embed_handler_treats_a_read_row_as_an_upsert() {
    let documents = documents();
    let mut read = insert(&documents, 4, "backfilled");
    read.operation = Operation::Read;
    let recorder = Arc::new(Recorder::default());
    let mut instance = instantiate("embed-handler", recorder.clone(), Limits::default()).await;
    instance.handle(&[read]).await.unwrap();
    assert_eq!(
        recorder.calls(),
        vec![
            Call::Embed(vec!["backfilled".to_owned()]),
            Call::Upsert(vec![Point {
                key: key("4"),
                vector: Some(vec![10.0, 1.0]),
                payload: r#"{"id":4,"content":"backfilled","note":null,"meta":{"tags": ["a"]}}"#
                    .to_owned(),
            }]),
        ]
    );
}

#[test]
fn the_contract_version_is_read_from_the_component() {
    let engine = PluginEngine::new(EngineOptions::default()).unwrap();
    for (path, version) in [
        (wasm("embed-handler"), ContractVersion::V0_2),
        (wasm("echo-handler"), ContractVersion::V0_2),
        (
            fixture("handler-0.1.0/embed-handler.wasm"),
            ContractVersion::V0_1,
        ),
        (
            fixture("handler-0.1.0/echo-handler.wasm"),
            ContractVersion::V0_1,
        ),
    ] {
        let plugin = engine.load(&path).unwrap();
        assert_eq!(plugin.contract_version(), version, "{}", path.display());
    }
}

/// The 0.1.0 embed handler, built before 0.2.0 existed and kept as it was: it runs unmodified,
/// gets a backfilled row as an insert, and writes with the calls 0.1.0 has.
#[tokio::test]
async fn a_component_built_against_0_1_0_runs_unmodified_and_gets_reads_as_inserts() {
    let documents = documents();
    let mut read = insert(&documents, 1, "backfilled");
    read.operation = Operation::Read;
    let unchanged = event(
        Operation::Update,
        &documents,
        vec![text("2"), Value::Unchanged, text("n"), Value::Null],
    );
    let recorder = Arc::new(Recorder::default());
    let mut instance = instantiate_file(
        &fixture("handler-0.1.0/embed-handler.wasm"),
        recorder.clone(),
        Limits::default(),
    )
    .await;
    instance.handle(&[read.clone(), unchanged]).await.unwrap();
    assert_eq!(
        recorder.calls(),
        vec![
            Call::Embed(vec!["backfilled".to_owned()]),
            Call::Upsert(vec![
                // The 0.1.0 example left the text out of the payload.
                Point {
                    key: key("1"),
                    vector: Some(vec![10.0, 1.0]),
                    payload: r#"{"id":1,"note":null,"meta":{"tags": ["a"]}}"#.to_owned(),
                },
                Point {
                    key: key("2"),
                    vector: None,
                    payload: r#"{"id":2,"note":"n","meta":null}"#.to_owned(),
                },
            ]),
        ]
    );

    let recorder = Arc::new(Recorder::default());
    let mut echo = instantiate_file(
        &fixture("handler-0.1.0/echo-handler.wasm"),
        recorder.clone(),
        Limits::default(),
    )
    .await;
    echo.handle(&[read]).await.unwrap();
    let payload: Json = serde_json::from_str(&recorder.upserted()[0].payload).unwrap();
    assert_eq!(payload["operation"], "insert");
}

#[tokio::test]
async fn a_guest_error_is_reported_and_leaves_the_instance_usable() {
    let documents = documents();
    let mut instance = instantiate(
        "error-handler",
        Arc::new(Recorder::default()),
        Limits::default(),
    )
    .await;
    for _ in 0..2 {
        let error = instance
            .handle(&[insert(&documents, 1, "x")])
            .await
            .unwrap_err();
        assert!(!error.is_poisoned());
        match error {
            HandleError::GuestError(message) => {
                assert_eq!(message, "error-handler rejects a batch of 1 events")
            }
            other => panic!("expected a guest error, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_panic_is_a_trap_carrying_the_panic_text_and_poisons_the_instance() {
    let documents = documents();
    let recorder = Arc::new(Recorder::default());
    let mut instance = instantiate("trap-handler", recorder.clone(), Limits::default()).await;
    instance
        .handle(&[insert(&documents, 1, "fine")])
        .await
        .unwrap();

    let error = instance
        .handle(&[insert(&documents, 2, "boom")])
        .await
        .unwrap_err();
    assert!(error.is_poisoned());
    let HandleError::Trap { message } = &error else {
        panic!("expected a trap, got {error:?}");
    };
    assert!(
        message.contains("trap-handler refuses content 'boom' (table public.documents)"),
        "{message}"
    );
    assert!(message.contains("wasm backtrace"), "{message}");
    // The one line a status display shows is the guest's own panic message.
    assert_eq!(
        error.summary(),
        "handler trapped: trap-handler refuses content 'boom' (table public.documents)"
    );
    assert!(instance.is_poisoned());
    assert!(matches!(
        instance.handle(&[insert(&documents, 3, "fine")]).await,
        Err(HandleError::Poisoned)
    ));
    assert_eq!(recorder.upserted().len(), 1);
}

#[tokio::test]
async fn a_spinning_guest_times_out() {
    let limits = Limits {
        call_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let mut instance = instantiate("loop-handler", Arc::new(Recorder::default()), limits).await;
    let started = Instant::now();
    let error = instance
        .handle(&[insert(&documents(), 1, "spin")])
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    assert!(
        matches!(error, HandleError::Timeout(limit) if limit == limits.call_timeout),
        "{error:?}"
    );
    assert!(elapsed >= limits.call_timeout, "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    assert!(instance.is_poisoned());
}

#[tokio::test]
async fn a_guest_blocked_in_a_wasi_sleep_times_out() {
    let limits = Limits {
        call_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let mut instance = instantiate("loop-handler", Arc::new(Recorder::default()), limits).await;
    let started = Instant::now();
    let error = instance
        .handle(&[insert(&documents(), 1, "sleep")])
        .await
        .unwrap_err();
    assert!(matches!(error, HandleError::Timeout(_)), "{error:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(instance.is_poisoned());
}

#[tokio::test]
async fn time_spent_in_host_imports_does_not_count_against_the_guest() {
    let recorder = Arc::new(Recorder {
        embed_delay: Duration::from_millis(600),
        ..Recorder::default()
    });
    let limits = Limits {
        call_timeout: Duration::from_millis(200),
        ..Limits::default()
    };
    let mut instance = instantiate("echo-handler", recorder.clone(), limits).await;
    instance
        .handle(&[insert(&documents(), 1, "slow to embed")])
        .await
        .unwrap();
    assert_eq!(recorder.upserted().len(), 1);
}

#[tokio::test]
async fn memory_growth_beyond_the_limit_is_a_memory_limit_error() {
    let limits = Limits {
        memory_bytes: 32 * 1024 * 1024,
        ..Limits::default()
    };
    let mut instance = instantiate("memory-hog", Arc::new(Recorder::default()), limits).await;
    let error = instance
        .handle(&[insert(&documents(), 1, "x")])
        .await
        .unwrap_err();
    assert!(
        matches!(error, HandleError::MemoryLimit { limit } if limit == 32 * 1024 * 1024),
        "{error:?}"
    );
    assert!(error.is_poisoned());
}

#[tokio::test]
async fn the_guest_sees_no_files_environment_arguments_or_network() {
    // The host process has variables; none may leak into the guest.
    assert!(std::env::vars_os().count() > 0);
    let recorder = Arc::new(Recorder::default());
    let mut instance = instantiate("sandbox-probe", recorder.clone(), Limits::default()).await;
    instance
        .handle(&[insert(&documents(), 1, "x")])
        .await
        .unwrap();
    let points = recorder.upserted();
    let report: Json = serde_json::from_str(&points[0].payload).unwrap();
    assert_eq!(report["env"], 0, "{report}");
    assert_eq!(report["args"], 0, "{report}");
    for probe in ["read_dir", "read_file", "create_file", "tcp_connect"] {
        let outcome = report[probe].as_str().unwrap();
        assert!(outcome.starts_with("error: "), "{probe}: {outcome}");
    }
}

#[tokio::test]
async fn compiled_components_are_cached_and_a_corrupt_entry_is_recompiled() {
    let cache = tempfile::tempdir().unwrap();
    let options = EngineOptions {
        cache_dir: Some(cache.path().to_owned()),
    };
    let component = wasm("echo-handler");

    let engine = PluginEngine::new(options.clone()).unwrap();
    assert_eq!(engine.cached_artifact(&component), None);
    let started = Instant::now();
    engine.load(&component).unwrap();
    let compile_time = started.elapsed();
    let artifact = engine
        .cached_artifact(&component)
        .expect("the compiled component is cached");
    let cached = std::fs::read(&artifact).unwrap();

    // A fresh engine (a restart) loads from the cache.
    let engine = PluginEngine::new(options.clone()).unwrap();
    let started = Instant::now();
    engine.load(&component).unwrap();
    let cached_time = started.elapsed();
    assert!(
        cached_time < compile_time,
        "cached load {cached_time:?} vs compile {compile_time:?}"
    );

    // A flipped byte, a truncated file and garbage are all recompiled and rewritten.
    let mut flipped = cached.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0xff;
    for corrupt in [
        flipped,
        cached[..cached.len() / 3].to_vec(),
        b"garbage".to_vec(),
    ] {
        std::fs::write(&artifact, &corrupt).unwrap();
        let engine = PluginEngine::new(options.clone()).unwrap();
        let plugin = engine.load(&component).unwrap();
        assert_eq!(std::fs::read(&artifact).unwrap(), cached);
        let recorder = Arc::new(Recorder::default());
        let mut instance = plugin
            .instantiate(recorder.clone(), Limits::default(), "test/cache")
            .await
            .unwrap();
        instance
            .handle(&[insert(&documents(), 1, "x")])
            .await
            .unwrap();
        assert_eq!(recorder.upserted().len(), 1);
    }
    // No temporary files are left behind.
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 1);
}

#[tokio::test]
async fn a_file_that_is_not_a_component_is_rejected_at_load() {
    let engine = PluginEngine::new(EngineOptions::default()).unwrap();
    let not_wasm = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(not_wasm.path(), b"not wasm").unwrap();
    assert!(matches!(
        engine.load(not_wasm.path()),
        Err(RuntimeError::Compile { .. })
    ));
}

/// Events per second through the no-op guest, batches of 1000 events of 4 columns.
/// `cargo test --release -p pgstream-host --test runtime noop_throughput -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark; prints events/s"]
async fn noop_throughput() {
    let documents = documents();
    let content = "some text to embed ".repeat(10);
    let batch: Vec<ChangeEvent> = (0..1000)
        .map(|id| insert(&documents, id, &content))
        .collect();
    let mut instance = instantiate(
        "noop-handler",
        Arc::new(Recorder::default()),
        Limits::default(),
    )
    .await;
    for _ in 0..10 {
        instance.handle(&batch).await.unwrap();
    }
    let rounds = 200;
    let started = Instant::now();
    for _ in 0..rounds {
        instance.handle(&batch).await.unwrap();
    }
    let elapsed = started.elapsed();
    let events = (rounds * batch.len()) as f64;
    println!(
        "noop-handler, borrowed records: {:.0} events/s ({rounds} batches of {} events in {elapsed:?})",
        events / elapsed.as_secs_f64(),
        batch.len()
    );
}
