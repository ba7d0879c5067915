//! End-to-end pipeline tests: rows written to a real Postgres reach the real `pgstream-host`
//! binary, go through real guest components, and land in pgvector (Postgres 18) or in the
//! JSON-lines sink (both versions; Postgres 15 has no pgvector). Every test asserts what a
//! user would check: what the store holds, what the handler saw, where the slot stands.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use pgstream_e2e::tenants::jsonl;
use pgstream_e2e::{HostProcess, PgServer, PgVersion, TestDb, TestPipeline, model_dir, wait_until};
use pgstream_host::embed::{Embedder, MiniLmEmbedder, MiniLmOptions};
use serde_json::Value as Json;
use tempfile::TempDir;

/// Generates one test per Postgres version for a scenario `async fn name(PgVersion)`.
macro_rules! on_both_versions {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn pg18() {
                super::$scenario(pgstream_e2e::PgVersion::Pg18).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn pg15() {
                super::$scenario(pgstream_e2e::PgVersion::Pg15).await;
            }
        }
    )*};
}

on_both_versions!(
    toasted_column_left_alone_is_reported_unchanged,
    replica_identity_full_gives_old_rows,
    truncate_reaches_the_handler,
    nulls_non_ascii_and_quoted_names_arrive_intact,
    quiet_watched_table_lets_the_slot_advance,
    trapping_plugin_is_retried_then_stops_without_confirming,
);

/// Where the sink writes.
enum Sink {
    /// The pgvector table `<table>_embeddings` in the source database.
    Pgvector,
    /// A JSON-lines file.
    Jsonl(PathBuf),
}

/// A pipeline on `table` of `db` handled by `plugin`, writing to `sink`.
fn pipeline<'a>(db: &'a TestDb, table: &str, plugin: &str, sink: Sink) -> TestPipeline<'a> {
    let pipeline = TestPipeline::new(db, table, plugin);
    match sink {
        Sink::Pgvector => pipeline.with_args(&["--sink", "pgvector"]),
        Sink::Jsonl(path) => pipeline.with_args(&[
            "--sink".to_owned(),
            "jsonl".to_owned(),
            "--collection".to_owned(),
            path.display().to_string(),
        ]),
    }
}

/// The events the echo handler reported, in order: each upsert's payload.
fn echoed_events(path: &Path) -> Vec<Json> {
    jsonl(path)
        .into_iter()
        .filter(|line| line["op"] == "upsert")
        .map(|line| line["payload"].clone())
        .collect()
}

/// The value of a column in an echoed row, as `{"text": ..}`, `{"null": true}` or
/// `{"unchanged": true}`.
fn column<'a>(row: &'a Json, name: &str) -> &'a Json {
    row.as_array()
        .expect("row is a list")
        .iter()
        .find(|column| column["name"] == name)
        .map(|column| &column["value"])
        .unwrap_or_else(|| panic!("no column {name} in {row}"))
}

fn embedder() -> MiniLmEmbedder {
    MiniLmEmbedder::load(&model_dir(), MiniLmOptions::default()).expect("model loads")
}

async fn toasted_column_left_alone_is_reported_unchanged(version: PgVersion) {
    let db = PgServer::shared(version).create_database().await;
    let out = TempDir::new().unwrap();
    let sink = out.path().join("events.jsonl");
    db.exec(
        "CREATE TABLE notes (id int PRIMARY KEY, title text, content text);
         ALTER TABLE notes ALTER COLUMN content SET STORAGE EXTERNAL;",
    )
    .await;
    let pipeline = pipeline(&db, "notes", "echo-handler", Sink::Jsonl(sink.clone()));
    pipeline.setup().await;
    // 12 kB stored uncompressed out of line: an UPDATE that leaves it alone does not send it.
    db.exec(
        "INSERT INTO notes VALUES (1, 'first', repeat('lorem ipsum ', 1000));
         UPDATE notes SET title = 'second' WHERE id = 1;
         UPDATE notes SET content = 'short now' WHERE id = 1;",
    )
    .await;
    pipeline.catch_up().await;

    let events = echoed_events(&sink);
    assert_eq!(events.len(), 3, "{events:#?}");
    let insert = &events[0]["row"];
    assert_eq!(
        column(insert, "content")["text"].as_str().map(str::len),
        Some(12_000)
    );
    let untouched = &events[1];
    assert_eq!(untouched["operation"], "update");
    assert_eq!(column(&untouched["row"], "title")["text"], "second");
    assert_eq!(
        column(&untouched["row"], "content"),
        &serde_json::json!({"unchanged": true}),
        "an UPDATE that left the TOASTed value alone must say unchanged, not null or empty"
    );
    assert_eq!(column(&events[2]["row"], "content")["text"], "short now");
}

async fn replica_identity_full_gives_old_rows(version: PgVersion) {
    let db = PgServer::shared(version).create_database().await;
    let out = TempDir::new().unwrap();
    let sink = out.path().join("events.jsonl");
    db.exec(
        "CREATE TABLE people (id int PRIMARY KEY, name text, city text);
         ALTER TABLE people REPLICA IDENTITY FULL;
         CREATE TABLE keyed (id int PRIMARY KEY, name text);",
    )
    .await;
    let pipeline = pipeline(
        &db,
        "people,keyed",
        "echo-handler",
        Sink::Jsonl(sink.clone()),
    )
    .with_args(&["--embedder", "none"]);
    pipeline.setup().await;
    db.exec(
        "INSERT INTO people VALUES (1, 'Ada', 'London');
         UPDATE people SET city = 'Paris' WHERE id = 1;
         DELETE FROM people WHERE id = 1;
         INSERT INTO keyed VALUES (1, 'k');
         UPDATE keyed SET id = 2 WHERE id = 1;
         UPDATE keyed SET name = 'l' WHERE id = 2;",
    )
    .await;
    pipeline.catch_up().await;

    let events = echoed_events(&sink);
    assert_eq!(events.len(), 6, "{events:#?}");
    let update = &events[1];
    assert_eq!(update["key_columns"], serde_json::json!(["id"]));
    let old = &update["old_row"];
    assert_eq!(column(old, "city")["text"], "London");
    assert_eq!(column(old, "name")["text"], "Ada");
    assert_eq!(column(&update["row"], "city")["text"], "Paris");
    let delete = &events[2];
    assert_eq!(delete["operation"], "delete");
    assert_eq!(
        column(&delete["row"], "name")["text"],
        "Ada",
        "with REPLICA IDENTITY FULL a delete carries the whole old row"
    );
    // Default identity: a key change sends the old key, a plain update sends no old row.
    let key_change = &events[4];
    assert_eq!(column(&key_change["old_row"], "id")["text"], "1");
    assert_eq!(column(&key_change["row"], "id")["text"], "2");
    assert_eq!(events[5]["old_row"], Json::Null);
}

async fn truncate_reaches_the_handler(version: PgVersion) {
    let db = PgServer::shared(version).create_database().await;
    let out = TempDir::new().unwrap();
    let sink = out.path().join("events.jsonl");
    db.exec("CREATE TABLE items (id int PRIMARY KEY, content text);")
        .await;
    let pipeline = pipeline(&db, "items", "embed-handler", Sink::Jsonl(sink.clone()))
        .with_args(&["--embedder", "none"]);
    pipeline.setup().await;
    db.exec(
        "INSERT INTO items VALUES (1, NULL), (2, NULL);
         TRUNCATE items;",
    )
    .await;
    pipeline.catch_up().await;
    let lines = jsonl(&sink);
    let truncates: Vec<&Json> = lines
        .iter()
        .filter(|line| line["op"] == "delete_table")
        .collect();
    assert_eq!(truncates.len(), 1, "{lines:#?}");
    assert_eq!(truncates[0]["schema"], "public");
    assert_eq!(truncates[0]["table"], "items");
}

async fn nulls_non_ascii_and_quoted_names_arrive_intact(version: PgVersion) {
    let db = PgServer::shared(version).create_database().await;
    let out = TempDir::new().unwrap();
    let sink = out.path().join("events.jsonl");
    db.exec(
        r#"CREATE SCHEMA "Mixed Schema";
           CREATE TABLE "Mixed Schema"."Docs Ünï" (
               "Id" int PRIMARY KEY, "Body" text, note text, amount numeric, meta jsonb,
               flag bool, at timestamptz);"#,
    )
    .await;
    let pipeline = pipeline(
        &db,
        r#""Mixed Schema"."Docs Ünï""#,
        "echo-handler",
        Sink::Jsonl(sink.clone()),
    )
    .with_args(&["--embedder", "none"]);
    pipeline.setup().await;
    db.exec(
        r#"INSERT INTO "Mixed Schema"."Docs Ünï" VALUES
           (1, '日本語のテキスト ✓ émoji 🎉', NULL, 12.50, '{"k": [1, 2]}', true,
            '2024-02-29 12:34:56.789+00');"#,
    )
    .await;
    pipeline.catch_up().await;

    let events = echoed_events(&sink);
    assert_eq!(events.len(), 1, "{events:#?}");
    let event = &events[0];
    assert_eq!(event["schema"], "Mixed Schema");
    assert_eq!(event["table"], "Docs Ünï");
    assert_eq!(event["key_columns"], serde_json::json!(["Id"]));
    let row = &event["row"];
    assert_eq!(column(row, "Body")["text"], "日本語のテキスト ✓ émoji 🎉");
    assert_eq!(column(row, "note"), &serde_json::json!({"null": true}));
    assert_eq!(column(row, "amount")["text"], "12.50");
    assert_eq!(column(row, "meta")["text"], r#"{"k": [1, 2]}"#);
    assert_eq!(column(row, "flag")["text"], "t");
    let oids: BTreeMap<String, u64> = row
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                c["type_oid"].as_u64().unwrap(),
            )
        })
        .collect();
    let expected: BTreeMap<String, u64> = [
        ("Id", 23),
        ("Body", 25),
        ("note", 25),
        ("amount", 1700),
        ("meta", 3802),
        ("flag", 16),
        ("at", 1184),
    ]
    .into_iter()
    .map(|(name, oid)| (name.to_owned(), oid))
    .collect();
    assert_eq!(oids, expected);
    // commit_time is microseconds since the Unix epoch: within a minute of now.
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    let commit_time = event["commit_time"].as_i64().unwrap();
    assert!(
        (now_us - commit_time).abs() < 60_000_000,
        "commit_time {commit_time}"
    );
}

async fn quiet_watched_table_lets_the_slot_advance(version: PgVersion) {
    let db = PgServer::shared(version).create_database().await;
    let out = TempDir::new().unwrap();
    db.exec(
        "CREATE TABLE quiet (id int PRIMARY KEY, content text);
         CREATE TABLE busy (id serial PRIMARY KEY, filler text);",
    )
    .await;
    let pipeline = pipeline(
        &db,
        "quiet",
        "noop-handler",
        Sink::Jsonl(out.path().join("sink.jsonl")),
    )
    .with_args(&["--embedder", "none"]);
    pipeline.setup().await;
    let mut host = pipeline.start_streaming().await;
    let before = pipeline.confirmed_flush_lsn().await;
    for _ in 0..20 {
        db.exec("INSERT INTO busy (filler) SELECT repeat('x', 500) FROM generate_series(1, 500);")
            .await;
    }
    let target = db.current_lsn_bytes().await;
    assert!(target > before + 1_000_000, "the busy table wrote WAL");
    let advanced = wait_until(Duration::from_secs(60), || async {
        pipeline.confirmed_flush_lsn().await >= target
    })
    .await;
    let after = pipeline.confirmed_flush_lsn().await;
    let stopped = host.terminate(Duration::from_secs(30)).await.unwrap();
    assert!(
        stopped.success(),
        "SIGTERM is a clean stop:\n{}",
        host.log()
    );
    assert!(
        advanced.is_ok(),
        "confirmed_flush_lsn stayed at {after:X} (< {target:X}) while only unwatched tables \
         wrote: WAL would pile up. Host log:\n{}",
        host.log()
    );
}

async fn trapping_plugin_is_retried_then_stops_without_confirming(version: PgVersion) {
    let db = PgServer::shared(version).create_database().await;
    let out = TempDir::new().unwrap();
    let sink = out.path().join("sink.jsonl");
    db.exec("CREATE TABLE t (id int PRIMARY KEY, content text);")
        .await;
    let pipeline = pipeline(&db, "t", "trap-handler", Sink::Jsonl(sink.clone())).with_args(&[
        "--embedder",
        "none",
        "--max-attempts",
        "3",
        "--retry-backoff-ms",
        "20",
    ]);
    pipeline.setup().await;
    db.exec("INSERT INTO t VALUES (1, 'fine');").await;
    let before_boom = db.current_lsn_bytes().await;
    db.exec("INSERT INTO t VALUES (2, 'boom');").await;
    db.exec("INSERT INTO t VALUES (3, 'after');").await;

    let mut host = pipeline.run_to_current_lsn().await;
    let status = host.try_status().unwrap().expect("exited");
    let log = host.log();
    assert!(!status.success(), "the host must fail:\n{log}");
    assert!(
        log.contains("trap-handler refuses content 'boom'"),
        "the guest's panic text reaches the operator:\n{log}"
    );
    assert!(log.contains("failed 3 times"), "{log}");
    assert_eq!(log.matches("retrying the batch").count(), 2, "{log}");
    let confirmed = pipeline.confirmed_flush_lsn().await;
    assert!(
        confirmed <= before_boom,
        "confirmed {confirmed:X} past the failing transaction (starts after {before_boom:X})"
    );
    let written: BTreeSet<String> = jsonl(&sink)
        .iter()
        .filter_map(|line| line["key"][0].as_str().map(str::to_owned))
        .collect();
    assert!(
        !written.contains("3"),
        "nothing after the failing event may be handled: {written:?}"
    );
}

/// Reads the pgvector table as id -> (payload, vector).
async fn stored_points(db: &TestDb, table: &str) -> BTreeMap<i64, (Json, Vec<f32>)> {
    let rows = db
        .client()
        .query(
            &format!(
                "SELECT source_key[1]::bigint, payload, embedding::real[] FROM {table}_embeddings"
            ),
            &[],
        )
        .await
        .expect("read the vector table");
    rows.iter()
        .map(|row| (row.get(0), (row.get(1), row.get(2))))
        .collect()
}

fn assert_close(stored: &[f32], expected: &[f32], what: &str) {
    assert_eq!(stored.len(), expected.len(), "{what}: dimensions");
    let worst = stored
        .iter()
        .zip(expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-5, "{what}: max difference {worst}");
}

/// Generates one test per handler language for a scenario `async fn name(plugin: &str)`: the
/// example handlers do the same thing in each language, so each must pass the same checks.
macro_rules! in_every_language {
    ($scenario:ident: $($language:ident => $plugin:literal),* $(,)?) => {
        mod $scenario {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $language() {
                    super::$scenario($plugin).await;
                }
            )*
        }
    };
}

in_every_language!(pgvector_follows_inserts_updates_deletes_and_truncate:
    rust => "embed-handler",
    python => "python-handler",
    js => "js-handler",
    c => "c-handler",
);

in_every_language!(ends_in_the_state_the_rust_handler_ends_in:
    python => "python-handler",
    js => "js-handler",
    c => "c-handler",
);

/// The example handlers promise one behaviour in every language. Two databases get the same
/// changes, mixing every case a handler must get right (typed payload values, quotes, control
/// characters and non-ASCII text, NaN, jsonb, timestamps, an UPDATE that leaves a TOASTed
/// `content` alone, a key change, `content` NULL, empty or blank, a delete, a truncate); the
/// Rust example handles one, `plugin` the other, each into a JSON-lines sink. Replaying both
/// sinks' writes must give the same points: same keys, same payloads, same vectors.
async fn ends_in_the_state_the_rust_handler_ends_in(plugin: &'static str) {
    let out = TempDir::new().unwrap();
    let mut states = Vec::new();
    for (handler, file) in [("embed-handler", "rust.jsonl"), (plugin, "other.jsonl")] {
        let db = PgServer::shared(PgVersion::Pg15).create_database().await;
        db.exec(
            "CREATE TABLE docs (id int PRIMARY KEY, title text, price numeric, score float8,
                                in_stock bool, meta jsonb, at timestamptz, content text);
             ALTER TABLE docs ALTER COLUMN content SET STORAGE EXTERNAL;
             CREATE TABLE scratch (id int PRIMARY KEY, content text);",
        )
        .await;
        let sink = out.path().join(file);
        let pipeline = pipeline(&db, "docs,scratch", handler, Sink::Jsonl(sink.clone()));
        pipeline.setup().await;
        db.exec(
            r#"INSERT INTO docs VALUES
                 (1, 'Tea "green" ✓ 日本', 4.50, 0.25, true, '{"tags": ["hot", "leaf"]}',
                  '2024-02-29 12:34:56.789+00', 'Steep green tea for two minutes.'),
                 (2, E'line\nbreak\ttab', NULL, 'NaN', false, 'null', NULL,
                  repeat('long toasted text ', 800)),
                 (3, 'gone', 1, 1, true, '{}', '2020-01-01 00:00:00+00', 'Deleted soon.'),
                 (4, 'nulled', -2.5e3, -1.5, NULL, '[1, "two"]', '1999-12-31 23:59:59+00',
                  'Content set to NULL.'),
                 (6, 'empty', NULL, NULL, NULL, NULL, NULL, ''),
                 (7, 'blank', NULL, NULL, NULL, NULL, NULL, E' \t\r\n\f '),
                 (8, 'vertical tab', NULL, NULL, NULL, NULL, NULL, E'\x0B'),
                 (9, 'blanked', NULL, NULL, NULL, NULL, NULL, 'Text that goes away.');
               UPDATE docs SET title = 'renamed' WHERE id = 2;
               UPDATE docs SET id = 5 WHERE id = 1;
               UPDATE docs SET content = NULL WHERE id = 4;
               UPDATE docs SET content = '' WHERE id = 9;
               DELETE FROM docs WHERE id = 3;
               INSERT INTO scratch VALUES (1, 'temporary');
               TRUNCATE scratch;"#,
        )
        .await;
        pipeline.catch_up().await;
        states.push(replayed_state(&sink));
    }
    let (rust, other) = (&states[0], &states[1]);
    assert_eq!(
        rust.keys().collect::<Vec<_>>(),
        other.keys().collect::<Vec<_>>(),
        "{plugin} left other points than the Rust handler"
    );
    assert_eq!(
        rust.keys()
            .map(|(table, key)| format!("{table} {key}"))
            .collect::<Vec<_>>(),
        // Blank means empty or only ASCII whitespace; a vertical tab is not in that set.
        ["docs [\"2\"]", "docs [\"5\"]", "docs [\"8\"]"],
        "the Rust handler's own result"
    );
    for (point, (payload, vector)) in rust {
        let (other_payload, other_vector) = &other[point];
        assert_eq!(other_payload, payload, "{plugin}: payload of {point:?}");
        assert_close(
            other_vector,
            vector,
            &format!("{plugin}: vector of {point:?}"),
        );
    }
}

/// The points a store would hold after applying a JSON-lines sink's writes in order:
/// (table, key) -> (payload, vector). An upsert without a vector keeps the stored vector (and
/// is skipped when there is none, as the pgvector and Qdrant sinks do); a merge merges its
/// payload's keys into the stored payload, likewise.
fn replayed_state(path: &Path) -> BTreeMap<(String, String), (Json, Vec<f32>)> {
    let mut points: BTreeMap<(String, String), (Json, Vec<f32>)> = BTreeMap::new();
    for line in jsonl(path) {
        let table = line["table"].as_str().unwrap_or_default().to_owned();
        let point = (table.clone(), line["key"].to_string());
        match line["op"].as_str() {
            Some("upsert") => match line["vector"].as_array() {
                Some(vector) => {
                    let vector = vector.iter().map(|x| x.as_f64().unwrap() as f32).collect();
                    points.insert(point, (line["payload"].clone(), vector));
                }
                None => {
                    if let Some(stored) = points.get_mut(&point) {
                        stored.0 = line["payload"].clone();
                    }
                }
            },
            Some("merge") => {
                let Json::Object(keys) = line["payload"].clone() else {
                    panic!("a merge payload must be an object: {line}");
                };
                let vector: Option<Vec<f32>> = line["vector"]
                    .as_array()
                    .map(|vector| vector.iter().map(|x| x.as_f64().unwrap() as f32).collect());
                match (points.get_mut(&point), vector) {
                    (Some(stored), vector) => {
                        stored.0.as_object_mut().unwrap().extend(keys);
                        if let Some(vector) = vector {
                            stored.1 = vector;
                        }
                    }
                    (None, Some(vector)) => {
                        points.insert(point, (Json::Object(keys), vector));
                    }
                    (None, None) => {}
                }
            }
            Some("delete") => {
                points.remove(&point);
            }
            Some("delete_table") => points.retain(|(stored_table, _), _| *stored_table != table),
            _ => panic!("unexpected write in {}: {line}", path.display()),
        }
    }
    points
}

async fn pgvector_follows_inserts_updates_deletes_and_truncate(plugin: &'static str) {
    let db = PgServer::shared(PgVersion::Pg18).create_database().await;
    db.create_vector_extension().await;
    db.exec(
        "CREATE TABLE docs (id bigint PRIMARY KEY, title text, content text);
         ALTER TABLE docs ALTER COLUMN content SET STORAGE EXTERNAL;
         -- Written before the slot exists, and this pipeline skips the backfill: never
         -- delivered.
         INSERT INTO docs VALUES (100, 'old', repeat('long text ', 500));",
    )
    .await;
    let pipeline = pipeline(&db, "docs", plugin, Sink::Pgvector).with_args(&["--backfill", "skip"]);
    pipeline.setup().await;
    db.exec(
        "INSERT INTO docs VALUES
           (1, 'bread', 'Bake sourdough bread with a lively starter.'),
           (2, 'coffee', 'Pull an espresso shot at nine bars.'),
           (3, 'running', 'Build mileage slowly for a marathon.'),
           (4, 'garden', 'Tomatoes want full sun.'),
           (5, 'empty', NULL),
           (6, 'blank', E' \n\t '),
           (7, 'emptied', 'Soon an empty string.'),
           (8, 'toasted', repeat('Long toasted text. ', 800));
         UPDATE docs SET content = '' WHERE id = 7;
         UPDATE docs SET content = 'Steep green tea for two minutes.' WHERE id = 2;
         UPDATE docs SET title = 'long runs' WHERE id = 3;
         DELETE FROM docs WHERE id = 4;
         -- Its TOASTed content is not resent: the handler has nothing to embed and the store
         -- no vector to keep, which must not stop the pipeline.
         UPDATE docs SET title = 'old, renamed' WHERE id = 100;",
    )
    .await;
    pipeline.catch_up().await;

    let points = stored_points(&db, "docs").await;
    assert_eq!(
        points.keys().copied().collect::<Vec<_>>(),
        vec![1, 2, 3, 8],
        "deleted rows and rows with NULL or blank content have no point"
    );
    let model = embedder();
    let toasted = "Long toasted text. ".repeat(800);
    let texts = vec![
        "Bake sourdough bread with a lively starter.".to_owned(),
        "Steep green tea for two minutes.".to_owned(),
        "Build mileage slowly for a marathon.".to_owned(),
        toasted.clone(),
    ];
    let expected = model.embed(&texts).await.unwrap();
    for (index, id) in [1i64, 2, 3, 8].iter().enumerate() {
        let (payload, vector) = &points[id];
        assert_close(vector, &expected[index], &format!("vector of row {id}"));
        assert_eq!(payload["id"], *id, "payload of row {id}: {payload}");
        assert_eq!(
            payload["content"], texts[index],
            "the text is kept in the payload"
        );
    }
    assert_eq!(points[&3].0["title"], "long runs");

    // An update in a later batch that leaves the TOASTed text alone: Postgres does not send
    // it, the handler merges the other columns, and the stored text and vector survive.
    db.exec("UPDATE docs SET title = 'toasted, renamed' WHERE id = 8;")
        .await;
    pipeline.catch_up().await;
    let points = stored_points(&db, "docs").await;
    let (payload, vector) = &points[&8];
    assert_eq!(payload["title"], "toasted, renamed");
    assert_eq!(
        payload["content"],
        toasted.as_str(),
        "the full text is still there"
    );
    assert_close(vector, &expected[3], "vector of the renamed toasted row");

    db.exec(
        "TRUNCATE docs; INSERT INTO docs VALUES (9, 'after', 'A row written after the truncate.');",
    )
    .await;
    pipeline.catch_up().await;
    let points = stored_points(&db, "docs").await;
    assert_eq!(points.keys().copied().collect::<Vec<_>>(), vec![9]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_then_restart_loses_nothing() {
    let db = PgServer::shared(PgVersion::Pg18).create_database().await;
    db.create_vector_extension().await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, content text);")
        .await;
    let pipeline =
        pipeline(&db, "items", "embed-handler", Sink::Pgvector).with_args(&["--batch-size", "200"]);
    pipeline.setup().await;
    let mut host = pipeline.start_streaming().await;

    // 20,000 changes in transactions of 100: 12,000 inserts, 5,000 updates, 3,000 deletes.
    let workload = [
        (
            1..=12_000,
            "INSERT INTO items SELECT g, 'item ' || g || ' is about topic ' || (g % 97) \
             FROM generate_series({start}, {end}) g",
        ),
        (
            1..=5_000,
            "UPDATE items SET content = 'revised item ' || id WHERE id BETWEEN {start} AND {end}",
        ),
        (
            9_001..=12_000,
            "DELETE FROM items WHERE id BETWEEN {start} AND {end}",
        ),
    ];
    for (ids, template) in workload {
        for start in ids.step_by(100) {
            let sql = template
                .replace("{start}", &start.to_string())
                .replace("{end}", &(start + 99).to_string());
            db.exec(&sql).await;
        }
    }
    let end = db.current_lsn().await;

    // Kill it while it is part-way through, as a crash or OOM kill would.
    wait_until(Duration::from_secs(120), || async {
        db.client()
            .query_one("SELECT count(*) FROM items_embeddings", &[])
            .await
            .map(|row| row.get::<_, i64>(0) >= 1_000)
            .unwrap_or(false)
    })
    .await
    .unwrap_or_else(|error| panic!("no progress: {error}\n{}", host.log()));
    host.kill().await.unwrap();
    let confirmed_at_kill = pipeline.confirmed_flush_lsn().await;

    let mut restarted =
        HostProcess::spawn(pipeline.command(None, &["--stop-at-lsn", &end])).unwrap();
    let status = restarted
        .wait_timeout(Duration::from_secs(600))
        .await
        .unwrap();
    assert!(status.success(), "restart failed:\n{}", restarted.log());
    assert!(pipeline.confirmed_flush_lsn().await > confirmed_at_kill);

    let source: BTreeMap<i64, String> = db
        .client()
        .query("SELECT id::bigint, content FROM items", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let points = stored_points(&db, "items").await;
    assert_eq!(source.len(), 9_000);
    assert_eq!(
        points.keys().collect::<Vec<_>>(),
        source.keys().collect::<Vec<_>>(),
        "the vector table holds exactly the source rows"
    );
    // The vectors follow the latest content: check a spread of rows against the model.
    let sample: Vec<i64> = source.keys().copied().step_by(450).collect();
    let texts: Vec<String> = sample.iter().map(|id| source[id].clone()).collect();
    let expected = embedder().embed(&texts).await.unwrap();
    for (id, vector) in sample.iter().zip(&expected) {
        assert_close(&points[id].1, vector, &format!("vector of item {id}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_reconnects_after_postgres_crashes_and_loses_nothing() {
    // A server of its own: this test crashes it.
    let server = PgServer::start(PgVersion::Pg15).expect("start a private server");
    let db = server.create_database().await;
    let out = TempDir::new().unwrap();
    let sink = out.path().join("sink.jsonl");
    db.exec("CREATE TABLE t (id int PRIMARY KEY, note text);")
        .await;
    let pipeline = pipeline(&db, "t", "echo-handler", Sink::Jsonl(sink.clone())).with_args(&[
        "--embedder",
        "none",
        "--retry-backoff-ms",
        "100",
    ]);
    pipeline.setup().await;
    let mut host = pipeline.start_streaming().await;

    let ids_seen = || {
        echoed_events(&sink)
            .iter()
            .map(|event| {
                column(&event["row"], "id")["text"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect::<BTreeSet<String>>()
    };
    db.exec("INSERT INTO t SELECT g, 'before' FROM generate_series(1, 50) g;")
        .await;
    wait_until(Duration::from_secs(60), || async { ids_seen().len() == 50 })
        .await
        .unwrap_or_else(|error| panic!("{error}\n{}", host.log()));

    server.crash().expect("crash the server");
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.start_again().expect("start the server again");
    let client = db.connect().await;
    client
        .batch_execute("INSERT INTO t SELECT g, 'after' FROM generate_series(51, 100) g;")
        .await
        .unwrap();
    wait_until(Duration::from_secs(90), || async {
        ids_seen().len() == 100
    })
    .await
    .unwrap_or_else(|error| panic!("{error}\n{}", host.log()));
    let status = host.terminate(Duration::from_secs(30)).await.unwrap();
    assert!(status.success(), "{}", host.log());
    assert!(host.log().contains("reconnecting"), "{}", host.log());
}

/// A handler that never returns or that eats memory is stopped by the limits, retried, and
/// then stops the host with an error that names the limit; nothing is confirmed.
async fn runaway_plugin_is_stopped_by_its_limit(plugin: &'static str, expected: &str) {
    let db = PgServer::shared(PgVersion::Pg15).create_database().await;
    let out = TempDir::new().unwrap();
    db.exec("CREATE TABLE t (id int PRIMARY KEY, content text);")
        .await;
    let pipeline =
        pipeline(&db, "t", plugin, Sink::Jsonl(out.path().join("s.jsonl"))).with_args(&[
            "--embedder",
            "none",
            "--call-timeout-ms",
            "300",
            "--memory-limit-mb",
            "32",
            "--max-attempts",
            "2",
            "--retry-backoff-ms",
            "10",
        ]);
    pipeline.setup().await;
    let before = db.current_lsn_bytes().await;
    db.exec("INSERT INTO t VALUES (1, 'x');").await;
    let mut host = pipeline.run_to_current_lsn().await;
    let status = host.try_status().unwrap().expect("exited");
    let log = host.log();
    assert!(!status.success(), "{log}");
    assert!(log.contains(expected), "the error names the limit:\n{log}");
    assert!(log.contains("failed 2 times"), "{log}");
    assert!(pipeline.confirmed_flush_lsn().await <= before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_plugin_hits_its_time_limit() {
    runaway_plugin_is_stopped_by_its_limit("loop-handler", "exceeded its time limit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_hungry_plugin_hits_its_memory_limit() {
    runaway_plugin_is_stopped_by_its_limit("memory-hog", "exceeded its memory limit").await;
}

/// The pgvector sink's `merge` on its own, against Postgres 18 with pgvector: jsonb `||` keeps
/// the stored keys, a vector replaces the stored one or creates the point, a point without
/// one is skipped when missing, later writes of a point win, and a payload that is not a JSON
/// object is refused before anything is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgvector_merge_keeps_stored_keys_and_creates_only_points_it_can_embed() {
    use pgstream_host::point::{Point, PointKey};
    use pgstream_host::replication::SourceConfig;
    use pgstream_host::sink::{PgVectorSink, Sink};

    let db = PgServer::shared(PgVersion::Pg18).create_database().await;
    db.create_vector_extension().await;
    let pool = SourceConfig::from_dsn(db.dsn())
        .unwrap()
        .pool(2, Duration::from_secs(30))
        .unwrap();
    let sink = PgVectorSink::new(pool, "public", "docs_embeddings");
    sink.prepare(2).await.unwrap();
    let point = |id: &str, vector: Option<[f32; 2]>, payload: Json| Point {
        key: PointKey {
            schema: "public".into(),
            table: "docs".into(),
            key: vec![id.into()],
        },
        vector: vector.map(Vec::from),
        payload: payload.to_string(),
    };
    sink.upsert(&[
        point(
            "1",
            Some([1.0, 0.0]),
            serde_json::json!({"id": 1, "content": "long", "title": "a"}),
        ),
        point(
            "2",
            Some([0.0, 1.0]),
            serde_json::json!({"id": 2, "content": "text", "title": "b"}),
        ),
    ])
    .await
    .unwrap();

    sink.merge(&[
        point("1", None, serde_json::json!({"title": "a2"})),
        point("2", Some([1.0, 1.0]), serde_json::json!({"content": "new"})),
        point(
            "3",
            Some([0.5, 0.5]),
            serde_json::json!({"id": 3, "title": "c"}),
        ),
        point("4", None, serde_json::json!({"id": 4})),
        point("1", None, serde_json::json!({"extra": true, "title": "a3"})),
    ])
    .await
    .expect("a missing point without a vector does not fail the merge");

    let points = stored_points(&db, "docs").await;
    assert_eq!(points.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(
        points[&1].0,
        serde_json::json!({"id": 1, "content": "long", "title": "a3", "extra": true})
    );
    assert_eq!(
        points[&1].1,
        vec![1.0, 0.0],
        "no vector: the stored one stays"
    );
    assert_eq!(
        points[&2].0,
        serde_json::json!({"id": 2, "content": "new", "title": "b"})
    );
    assert_eq!(points[&2].1, vec![1.0, 1.0]);
    assert_eq!(points[&3].0, serde_json::json!({"id": 3, "title": "c"}));

    let error = sink
        .merge(&[
            point("1", None, serde_json::json!({"title": "never"})),
            point("2", None, serde_json::json!("a string")),
        ])
        .await
        .unwrap_err();
    assert!(!error.is_retryable(), "{error}");
    assert!(error.to_string().contains("JSON object"), "{error}");
    assert_eq!(stored_points(&db, "docs").await[&1].0["title"], "a3");
}
