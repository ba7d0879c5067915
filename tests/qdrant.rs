//! The Qdrant sink: first on its own against the in-process fake Qdrant (ids, payloads,
//! payload-only writes, deletes, retries, refusals, collection checks), then end to end: rows
//! written to a real Postgres reach the real host binary with `--sink qdrant`, go through the
//! `embed-handler` component and the real model, and land in the fake (or in a real Qdrant
//! when `QDRANT_URL` is set).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use pgstream_e2e::{
    FakeQdrant, HOST_RUN_TIMEOUT, PgServer, PgVersion, TestDb, TestPipeline, model_dir, wait_until,
};
use pgstream_host::embed::{Embedder, MiniLmEmbedder, MiniLmOptions};
use pgstream_host::point::{Point, PointKey};
use pgstream_host::sink::{QdrantOptions, QdrantSink, Sink, SinkError};
use qdrant_client::qdrant as proto;
use serde_json::{Value as Json, json};
use tonic::Code;
use uuid::Uuid;

/// The namespace the documentation gives for point ids.
const NAMESPACE: &str = "26fe3006-94de-4025-b555-0ee0bace9f92";

/// The id the documentation says a row's point gets, computed here from the documented recipe
/// rather than by the sink's own function.
fn documented_id(schema: &str, table: &str, key: &[&str]) -> String {
    let name = json!([schema, table, key]).to_string();
    Uuid::new_v5(&Uuid::parse_str(NAMESPACE).unwrap(), name.as_bytes()).to_string()
}

fn options(server: &FakeQdrant, collection: &str) -> QdrantOptions {
    let mut options = QdrantOptions::new(&server.url(), collection);
    options.timeout = Duration::from_secs(5);
    options.initial_backoff = Duration::from_millis(10);
    options.max_backoff = Duration::from_millis(50);
    options
}

async fn prepared_sink(server: &FakeQdrant, dimensions: usize) -> QdrantSink {
    let sink = QdrantSink::new(options(server, "docs")).unwrap();
    sink.prepare(dimensions).await.expect("prepare");
    sink
}

fn key(table: &str, key: &[&str]) -> PointKey {
    PointKey {
        schema: "public".into(),
        table: table.into(),
        key: key.iter().map(|part| part.to_string()).collect(),
    }
}

fn point(table: &str, id: &str, vector: Option<[f32; 3]>, payload: Json) -> Point {
    Point {
        key: key(table, &[id]),
        vector: vector.map(Vec::from),
        payload: payload.to_string(),
    }
}

/// The fake's points of `collection` by id.
fn by_id(server: &FakeQdrant, collection: &str) -> BTreeMap<String, (Vec<f32>, Json)> {
    server
        .points(collection)
        .into_iter()
        .map(|point| (point.id, (point.vector, point.payload)))
        .collect()
}

fn unit(vector: [f32; 3]) -> Vec<f32> {
    let norm = vector.iter().map(|v| v * v).sum::<f32>().sqrt();
    vector.iter().map(|v| v / norm).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_creates_a_cosine_collection_indexed_by_source() {
    let server = FakeQdrant::start().await.unwrap();
    prepared_sink(&server, 3).await;
    let collection = server.collection("docs").expect("collection created");
    assert_eq!(collection.size, 3);
    assert_eq!(collection.distance, proto::Distance::Cosine);
    assert_eq!(
        collection.indexed_fields,
        BTreeSet::from(["_schema".to_owned(), "_table".to_owned()])
    );
    // A second start finds it and checks it.
    prepared_sink(&server, 3).await;
}

/// The collection was created but the answer lost: the retry meets "already exists", and
/// the collection must still get the indexes truncates filter by.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_whose_creation_answer_was_lost_still_gets_its_indexes() {
    let server = FakeQdrant::start().await.unwrap();
    server.lose_next_create_answer();
    prepared_sink(&server, 3).await;
    assert_eq!(server.requests_by_method()["Collections/Create"], 2);
    assert_eq!(
        server
            .collection("docs")
            .expect("collection created")
            .indexed_fields,
        BTreeSet::from(["_schema".to_owned(), "_table".to_owned()])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_names_both_sizes_when_the_collection_does_not_fit() {
    let server = FakeQdrant::start().await.unwrap();
    server.create_collection("docs", 768);
    let sink = QdrantSink::new(options(&server, "docs")).unwrap();
    match sink.prepare(384).await {
        Err(SinkError::Rejected(message)) => {
            for part in ["docs", "768", "384"] {
                assert!(message.contains(part), "{part} missing from: {message}");
            }
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_create_collection_a_missing_collection_is_an_error() {
    let server = FakeQdrant::start().await.unwrap();
    let mut options = options(&server, "docs");
    options.create_collection = false;
    let sink = QdrantSink::new(options).unwrap();
    match sink.prepare(3).await {
        Err(SinkError::Rejected(message)) => {
            assert!(
                message.contains("docs") && message.contains("does not exist"),
                "{message}"
            );
            assert!(message.contains("--create-collection"), "{message}");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert!(server.collection("docs").is_none(), "nothing was created");
    server.create_collection("docs", 3);
    sink.prepare(3)
        .await
        .expect("an existing collection is used");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_get_documented_ids_and_carry_their_source() {
    let server = FakeQdrant::start().await.unwrap();
    let sink = prepared_sink(&server, 3).await;
    let composite = Point {
        key: PointKey {
            schema: "sales".into(),
            table: "order lines".into(),
            key: vec!["42".into(), "é\"\\".into()],
        },
        vector: Some(vec![0.0, 0.0, 2.0]),
        payload: r#"["not", "an", "object"]"#.into(),
    };
    sink.upsert(&[
        point("docs", "1", Some([1.0, 0.0, 0.0]), json!({"title": "a"})),
        point("notes", "1", Some([0.0, 1.0, 0.0]), json!({"title": "b"})),
        composite,
    ])
    .await
    .unwrap();

    let points = by_id(&server, "docs");
    assert_eq!(points.len(), 3, "{points:?}");
    let docs = &points[&documented_id("public", "docs", &["1"])];
    assert_eq!(docs.0, vec![1.0, 0.0, 0.0]);
    assert_eq!(
        docs.1,
        json!({"title": "a", "_schema": "public", "_table": "docs", "_key": ["1"]})
    );
    let notes = &points[&documented_id("public", "notes", &["1"])];
    assert_eq!(notes.1["_table"], "notes");
    let composite = &points[&documented_id("sales", "order lines", &["42", "é\"\\"])];
    assert_eq!(
        composite.1,
        json!({"_value": ["not", "an", "object"], "_schema": "sales",
               "_table": "order lines", "_key": ["42", "é\"\\"]})
    );
    assert_eq!(server.unwaited_writes(), 0, "every write waits for Qdrant");
    assert_eq!(
        server.requests_by_method().get("Points/UpdateBatch"),
        Some(&1),
        "one request for the batch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_point_without_vector_replaces_only_the_payload_of_an_existing_point() {
    let server = FakeQdrant::start().await.unwrap();
    let sink = prepared_sink(&server, 3).await;
    sink.upsert(&[point("docs", "1", Some([1.0, 1.0, 0.0]), json!({"v": 1}))])
        .await
        .unwrap();

    sink.upsert(&[
        // Exists: keeps its vector, gets the new payload.
        point("docs", "1", None, json!({"v": 2})),
        // Missing and nothing to embed: skipped, and the batch still succeeds.
        point("docs", "2", None, json!({"v": 2})),
        // Twice in one call: the later payload-only write keeps the earlier vector.
        point("docs", "3", Some([0.0, 0.0, 1.0]), json!({"v": 3})),
        point("docs", "3", None, json!({"v": 4})),
        // Twice the other way round: the later write with a vector wins whole.
        point("docs", "4", None, json!({"v": 5})),
        point("docs", "4", Some([0.0, 1.0, 0.0]), json!({"v": 6})),
    ])
    .await
    .expect("a missing point without a vector does not fail the batch");

    let points = by_id(&server, "docs");
    let stored = |id: &str| points.get(&documented_id("public", "docs", &[id]));
    let one = stored("1").expect("point 1");
    assert_eq!(one.0, unit([1.0, 1.0, 0.0]), "vector kept");
    assert_eq!(one.1["v"], 2);
    assert_eq!(one.1["_key"], json!(["1"]));
    assert!(stored("2").is_none(), "no point without a vector");
    assert_eq!(stored("3").unwrap().0, vec![0.0, 0.0, 1.0]);
    assert_eq!(stored("3").unwrap().1["v"], 4);
    assert_eq!(stored("4").unwrap().0, vec![0.0, 1.0, 0.0]);
    assert_eq!(stored("4").unwrap().1["v"], 6);
    assert_eq!(server.unwaited_writes(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_keeps_the_stored_keys_and_creates_only_points_it_can_embed() {
    let server = FakeQdrant::start().await.unwrap();
    let sink = prepared_sink(&server, 3).await;
    sink.upsert(&[
        point(
            "docs",
            "1",
            Some([1.0, 0.0, 0.0]),
            json!({"content": "long", "title": "a"}),
        ),
        point(
            "docs",
            "2",
            Some([0.0, 1.0, 0.0]),
            json!({"content": "text", "title": "b"}),
        ),
    ])
    .await
    .unwrap();

    sink.merge(&[
        // Stored, no vector: the title changes, the content and the vector stay.
        point("docs", "1", None, json!({"title": "a2"})),
        // Stored, with a vector: both change, the other keys stay.
        point(
            "docs",
            "2",
            Some([0.0, 0.0, 1.0]),
            json!({"content": "new"}),
        ),
        // Missing, with a vector: created with just these keys.
        point("docs", "3", Some([1.0, 1.0, 0.0]), json!({"title": "c"})),
        // Missing, no vector: skipped, and the call still succeeds.
        point("docs", "4", None, json!({"title": "d"})),
        // A merge cannot move a point to another row.
        point("docs", "1", None, json!({"_key": ["9"], "extra": true})),
    ])
    .await
    .expect("a missing point without a vector does not fail the merge");

    let points = by_id(&server, "docs");
    let stored = |id: &str| points.get(&documented_id("public", "docs", &[id])).cloned();
    let (vector, payload) = stored("1").expect("point 1");
    assert_eq!(vector, vec![1.0, 0.0, 0.0]);
    assert_eq!(payload["content"], "long");
    assert_eq!(payload["title"], "a2");
    assert_eq!(payload["extra"], true);
    assert_eq!(payload["_key"], json!(["1"]));
    let (vector, payload) = stored("2").expect("point 2");
    assert_eq!(vector, vec![0.0, 0.0, 1.0]);
    assert_eq!(
        (&payload["content"], &payload["title"]),
        (&json!("new"), &json!("b"))
    );
    let (vector, payload) = stored("3").expect("point 3");
    assert_eq!(vector, unit([1.0, 1.0, 0.0]));
    assert_eq!(payload["title"], "c");
    assert_eq!(
        payload["_key"],
        json!(["3"]),
        "a created point carries its source"
    );
    assert!(stored("4").is_none());
    assert_eq!(server.unwaited_writes(), 0);

    let error = sink
        .merge(&[point("docs", "1", None, json!(["not", "an", "object"]))])
        .await
        .unwrap_err();
    assert!(!error.is_retryable(), "{error}");
    assert!(error.to_string().contains("JSON object"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_by_key_and_truncates_one_table_by_filter() {
    let server = FakeQdrant::start().await.unwrap();
    let sink = prepared_sink(&server, 3).await;
    sink.upsert(&[
        point("docs", "1", Some([1.0, 0.0, 0.0]), json!({})),
        point("docs", "2", Some([1.0, 0.0, 0.0]), json!({})),
        point("docs", "3", Some([1.0, 0.0, 0.0]), json!({})),
        point("notes", "1", Some([1.0, 0.0, 0.0]), json!({})),
    ])
    .await
    .unwrap();

    sink.delete(&[key("docs", &["2"]), key("docs", &["404"])])
        .await
        .expect("deleting a missing point is not an error");
    let ids: BTreeSet<String> = by_id(&server, "docs").into_keys().collect();
    let expected: BTreeSet<String> = [("docs", "1"), ("docs", "3"), ("notes", "1")]
        .iter()
        .map(|(table, id)| documented_id("public", table, &[id]))
        .collect();
    assert_eq!(ids, expected);

    sink.delete_table("public", "docs").await.unwrap();
    let ids: Vec<String> = by_id(&server, "docs").into_keys().collect();
    assert_eq!(ids, vec![documented_id("public", "notes", &["1"])]);
    assert_eq!(server.unwaited_writes(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_until_the_write_lands() {
    let server = FakeQdrant::start().await.unwrap();
    let sink = prepared_sink(&server, 3).await;
    let before = server.requests();
    server.fail_next(3, Code::Unavailable);
    sink.upsert(&[point("docs", "1", Some([1.0, 0.0, 0.0]), json!({}))])
        .await
        .expect("retried past three failures");
    assert_eq!(server.points("docs").len(), 1);
    assert_eq!(
        server.requests() - before,
        4,
        "three failures, then the write"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_bounded_then_the_store_is_reported_unavailable() {
    let server = FakeQdrant::start().await.unwrap();
    let mut options = options(&server, "docs");
    options.max_attempts = 3;
    let sink = QdrantSink::new(options).unwrap();
    sink.prepare(3).await.unwrap();
    let before = server.requests();
    server.fail_next(100, Code::ResourceExhausted);
    let error = sink
        .upsert(&[point("docs", "1", Some([1.0, 0.0, 0.0]), json!({}))])
        .await
        .expect_err("the server never recovers");
    assert!(error.is_retryable(), "{error:?}");
    let chain = format!("{:?}", anyhow::Error::from(error));
    assert!(chain.contains("failed 3 times"), "{chain}");
    assert_eq!(server.requests() - before, 3);
    assert!(server.points("docs").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_server_times_out_and_a_later_try_succeeds() {
    let server = FakeQdrant::start().await.unwrap();
    let mut options = options(&server, "docs");
    options.timeout = Duration::from_millis(200);
    options.max_attempts = 2;
    let sink = QdrantSink::new(options).unwrap();
    sink.prepare(3).await.unwrap();
    server.set_delay(Duration::from_secs(2));
    let error = sink
        .upsert(&[point("docs", "1", Some([1.0, 0.0, 0.0]), json!({}))])
        .await
        .expect_err("every try times out");
    assert!(error.is_retryable(), "{error:?}");
    server.set_delay(Duration::ZERO);
    sink.upsert(&[point("docs", "2", Some([1.0, 0.0, 0.0]), json!({}))])
        .await
        .expect("a responsive server takes the write");
    assert!(
        by_id(&server, "docs").contains_key(&documented_id("public", "docs", &["2"])),
        "the later write landed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failures_are_rejected_at_once_with_qdrants_message() {
    let server = FakeQdrant::start().await.unwrap();
    let sink = prepared_sink(&server, 3).await;

    let before = server.requests();
    let wrong_size = Point {
        vector: Some(vec![1.0, 2.0]),
        ..point("docs", "1", None, json!({}))
    };
    match sink.upsert(&[wrong_size]).await {
        Err(SinkError::Rejected(message)) => assert!(
            message.contains("Vector dimension error: expected dim: 3, got 2"),
            "{message}"
        ),
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(server.requests() - before, 1, "not retried");

    server.fail_next(1, Code::FailedPrecondition);
    match sink.delete_table("public", "docs").await {
        Err(SinkError::Rejected(message)) => {
            assert!(message.contains("injected failure"), "{message}")
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_ranks_by_cosine_and_returns_the_source_key() {
    let server = FakeQdrant::start().await.unwrap();
    let sink = prepared_sink(&server, 3).await;
    sink.upsert(&[
        point("docs", "1", Some([1.0, 0.0, 0.0]), json!({"title": "x"})),
        point("docs", "2", Some([0.0, 1.0, 0.0]), json!({"title": "y"})),
    ])
    .await
    .unwrap();
    let hits = sink.search(vec![0.1, 0.9, 0.0], 5).await.unwrap();
    assert_eq!(hits.len(), 2);
    assert_eq!(hits[0].key, key("docs", &["2"]));
    assert_eq!(hits[0].payload, json!({"title": "y"}));
    assert!(hits[0].similarity > hits[1].similarity);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fake_refuses_what_qdrant_refuses() {
    let server = FakeQdrant::start().await.unwrap();
    server.create_collection("docs", 3);
    let client = qdrant_client::Qdrant::from_url(&server.url())
        .skip_compatibility_check()
        .build()
        .unwrap();
    let upsert =
        |collection: &str, id: proto::PointId, vector: Vec<f32>| proto::UpdateBatchPoints {
            collection_name: collection.to_owned(),
            wait: Some(true),
            operations: vec![proto::PointsUpdateOperation {
                operation: Some(proto::points_update_operation::Operation::Upsert(
                    proto::points_update_operation::PointStructList {
                        points: vec![proto::PointStruct {
                            id: Some(id),
                            payload: Default::default(),
                            vectors: Some(vector.into()),
                        }],
                        ..Default::default()
                    },
                )),
            }],
            ..Default::default()
        };
    let refusal =
        |result: Result<proto::UpdateBatchResponse, qdrant_client::QdrantError>| match result {
            Err(qdrant_client::QdrantError::ResponseError { status }) => {
                (status.code(), status.message().to_owned())
            }
            other => panic!("expected a refusal, got {other:?}"),
        };

    let (code, message) = refusal(
        client
            .update_points_batch(upsert("docs", "row-1".to_owned().into(), vec![1.0; 3]))
            .await,
    );
    assert_eq!(
        (code, message.as_str()),
        (Code::InvalidArgument, "Unable to parse UUID: row-1")
    );
    let (code, message) = refusal(
        client
            .update_points_batch(upsert("docs", 7.into(), vec![1.0; 4]))
            .await,
    );
    assert_eq!(code, Code::InvalidArgument);
    assert!(message.contains("expected dim: 3, got 4"), "{message}");
    let (code, message) = refusal(
        client
            .update_points_batch(upsert("nope", 7.into(), vec![1.0; 3]))
            .await,
    );
    assert_eq!(code, Code::NotFound);
    assert!(
        message.contains("Collection `nope` doesn't exist"),
        "{message}"
    );

    client
        .update_points_batch(upsert("docs", 7.into(), vec![1.0; 3]))
        .await
        .expect("an integer id is fine");
    let mut unwaited = upsert("docs", Uuid::nil().to_string().into(), vec![1.0; 3]);
    unwaited.wait = Some(false);
    client.update_points_batch(unwaited).await.unwrap();
    assert_eq!(
        server.points("docs").len(),
        1,
        "an unwaited write is not applied yet"
    );
    assert_eq!(server.unwaited_writes(), 1);
    wait_until(Duration::from_secs(5), || async {
        server.points("docs").len() == 2
    })
    .await
    .expect("applied later");
}

/// Where the end-to-end scenarios read the collection from.
enum Store<'a> {
    Fake(&'a FakeQdrant),
    Real(qdrant_client::Qdrant),
}

/// A stored point as the scenarios check it: payload and vector by source row id.
type Points = BTreeMap<i64, (Json, Vec<f32>)>;

impl Store<'_> {
    /// Drops what an earlier run left in a real Qdrant (database names, and so collection
    /// names, repeat from run to run).
    async fn reset(&self, collection: &str) {
        if let Store::Real(client) = self
            && client
                .collection_exists(collection)
                .await
                .expect("reach Qdrant")
        {
            client
                .delete_collection(collection)
                .await
                .expect("drop the old collection");
        }
    }

    /// The collection's points keyed by the first key column, each checked to sit at the id
    /// the documentation promises.
    async fn points(&self, collection: &str, table: &str) -> Points {
        let raw: Vec<(String, Json, Vec<f32>)> = match self {
            Store::Fake(server) => server
                .points(collection)
                .into_iter()
                .map(|point| (point.id, point.payload, point.vector))
                .collect(),
            Store::Real(client) => {
                let response = client
                    .scroll(proto::ScrollPoints {
                        collection_name: collection.to_owned(),
                        limit: Some(10_000),
                        with_payload: Some(true.into()),
                        with_vectors: Some(true.into()),
                        ..Default::default()
                    })
                    .await
                    .expect("scroll the collection");
                response
                    .result
                    .into_iter()
                    .map(|point| {
                        let id = match point.id.and_then(|id| id.point_id_options) {
                            Some(proto::point_id::PointIdOptions::Uuid(uuid)) => uuid,
                            other => panic!("unexpected id {other:?}"),
                        };
                        let payload = Json::Object(
                            point
                                .payload
                                .into_iter()
                                .map(|(k, v)| (k, v.into_json()))
                                .collect(),
                        );
                        let vector = match point.vectors.and_then(|v| v.vectors_options) {
                            Some(proto::vectors_output::VectorsOptions::Vector(vector)) => {
                                match vector.into_vector() {
                                    proto::vector_output::Vector::Dense(dense) => dense.data,
                                    other => panic!("not a dense vector: {other:?}"),
                                }
                            }
                            other => panic!("unexpected vectors {other:?}"),
                        };
                        (id, payload, vector)
                    })
                    .collect()
            }
        };
        raw.into_iter()
            .map(|(id, payload, vector)| {
                let key = payload["_key"][0].as_str().expect("a key").to_owned();
                assert_eq!(payload["_schema"], "public", "{payload}");
                assert_eq!(payload["_table"], table, "{payload}");
                assert_eq!(id, documented_id("public", table, &[&key]), "{payload}");
                (key.parse().expect("integer key"), (payload, vector))
            })
            .collect()
    }
}

/// A pipeline on `table` of `db` that writes to the Qdrant server at `url`, in the collection
/// [`collection`] names.
fn qdrant_pipeline<'a>(db: &'a TestDb, table: &str, url: &str) -> TestPipeline<'a> {
    qdrant_pipeline_with(db, table, "embed-handler", url)
}

/// [`qdrant_pipeline`] with another plugin.
fn qdrant_pipeline_with<'a>(
    db: &'a TestDb,
    table: &str,
    plugin: &str,
    url: &str,
) -> TestPipeline<'a> {
    TestPipeline::new(db, table, plugin).with_args(&[
        "--sink",
        "qdrant",
        "--qdrant-url",
        url,
        "--collection",
        &collection(db),
    ])
}

/// The Qdrant collection of `db`'s pipeline.
fn collection(db: &TestDb) -> String {
    db.unique_name("points")
}

fn embedder() -> MiniLmEmbedder {
    MiniLmEmbedder::load(&model_dir(), MiniLmOptions::default()).expect("model loads")
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

/// The pgvector scenario, against Qdrant: inserts, an update of the embedded text, an update
/// that leaves the TOASTed text alone, deletes, a row without text, a row from before the
/// slot, a truncate; and `search` finds the right row.
async fn qdrant_follows_inserts_updates_deletes_and_truncate(url: String, store: Store<'_>) {
    let db = PgServer::shared(PgVersion::Pg18).create_database().await;
    db.exec(
        "CREATE TABLE docs (id bigint PRIMARY KEY, title text, content text);
         ALTER TABLE docs ALTER COLUMN content SET STORAGE EXTERNAL;
         -- Written before the slot exists, and this pipeline skips the backfill: never
         -- delivered.
         INSERT INTO docs VALUES (100, 'old', repeat('long text ', 500));",
    )
    .await;
    let pipeline = qdrant_pipeline(&db, "docs", &url).with_args(&["--backfill", "skip"]);
    let collection = collection(&db);
    store.reset(&collection).await;
    pipeline.setup().await;
    db.exec(
        "INSERT INTO docs VALUES
           (1, 'bread', 'Bake sourdough bread with a lively starter.'),
           (2, 'coffee', 'Pull an espresso shot at nine bars.'),
           (3, 'running', 'Build mileage slowly for a marathon.'),
           (4, 'garden', 'Tomatoes want full sun.'),
           (5, 'empty', NULL),
           (6, 'toast', repeat('Slow toasted text. ', 400));
         UPDATE docs SET content = 'Steep green tea for two minutes.' WHERE id = 2;
         UPDATE docs SET title = 'long runs' WHERE id = 3;
         DELETE FROM docs WHERE id = 4;",
    )
    .await;
    pipeline.catch_up().await;
    db.exec(
        "-- The TOASTed content is not resent: the point keeps its vector and its stored text,
         -- the other payload keys change.
         UPDATE docs SET title = 'toast, renamed' WHERE id = 6;
         -- Same, for a row with no point: nothing to store, and the pipeline goes on.
         UPDATE docs SET title = 'old, renamed' WHERE id = 100;",
    )
    .await;
    pipeline.catch_up().await;

    let points = store.points(&collection, "docs").await;
    assert_eq!(
        points.keys().copied().collect::<Vec<_>>(),
        vec![1, 2, 3, 6],
        "deleted, NULL-content and pre-slot rows have no point"
    );
    let texts = vec![
        "Bake sourdough bread with a lively starter.".to_owned(),
        "Steep green tea for two minutes.".to_owned(),
        "Build mileage slowly for a marathon.".to_owned(),
        "Slow toasted text. ".repeat(400),
    ];
    let expected = embedder().embed(&texts).await.unwrap();
    for (index, id) in [1i64, 2, 3, 6].iter().enumerate() {
        let (payload, vector) = &points[id];
        assert_close(vector, &expected[index], &format!("vector of row {id}"));
        assert_eq!(payload["id"], *id, "payload of row {id}: {payload}");
        assert_eq!(
            payload["content"], texts[index],
            "the text is kept in the payload"
        );
    }
    assert_eq!(points[&3].0["title"], "long runs");
    assert_eq!(points[&6].0["title"], "toast, renamed");

    let found = pipeline
        .run_to_exit(Some("search"), &["a hot drink made from leaves"])
        .await;
    let first_hit = found
        .lines()
        .skip_while(|line| !line.starts_with("nearest to"))
        .nth(1)
        .unwrap_or_default();
    assert!(first_hit.contains("\"coffee\""), "search output:\n{found}");

    db.exec(
        "TRUNCATE docs; INSERT INTO docs VALUES (9, 'after', 'A row written after the truncate.');",
    )
    .await;
    pipeline.catch_up().await;
    let points = store.points(&collection, "docs").await;
    assert_eq!(points.keys().copied().collect::<Vec<_>>(), vec![9]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_into_fake_qdrant_follows_inserts_updates_deletes_and_truncate() {
    let server = FakeQdrant::start().await.unwrap();
    qdrant_follows_inserts_updates_deletes_and_truncate(server.url(), Store::Fake(&server)).await;
    assert_eq!(server.unwaited_writes(), 0, "every write waited for Qdrant");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(non_snake_case)]
async fn pipeline_into_real_qdrant_runs_only_when_QDRANT_URL_is_set() {
    let Some(url) = std::env::var("QDRANT_URL")
        .ok()
        .filter(|url| !url.is_empty())
    else {
        eprintln!(
            "SKIPPED: set QDRANT_URL (e.g. http://localhost:6334, the gRPC port) and \
             PGSTREAM_QDRANT_API_KEY if needed to run this scenario against a real Qdrant"
        );
        return;
    };
    let client = qdrant_client::Qdrant::from_url(&url)
        .api_key(std::env::var("PGSTREAM_QDRANT_API_KEY").ok())
        .skip_compatibility_check()
        .build()
        .expect("a Qdrant client");
    qdrant_follows_inserts_updates_deletes_and_truncate(url, Store::Real(client)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qdrant_outage_mid_run_is_ridden_out_and_loses_nothing() {
    let server = FakeQdrant::start().await.unwrap();
    let db = PgServer::shared(PgVersion::Pg18).create_database().await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, content text);")
        .await;
    // Two tries per batch: an outage must not use them up, or this pipeline would stop.
    let pipeline = qdrant_pipeline(&db, "items", &server.url()).with_args(&[
        "--qdrant-max-attempts",
        "2",
        "--max-attempts",
        "2",
        "--retry-backoff-ms",
        "100",
    ]);
    let collection = collection(&db);
    pipeline.setup().await;
    let mut host = pipeline.start_streaming().await;

    db.exec("INSERT INTO items SELECT g, 'first wave item ' || g FROM generate_series(1, 50) g;")
        .await;
    wait_until(HOST_RUN_TIMEOUT, || async {
        server.points(&collection).len() == 50
    })
    .await
    .unwrap_or_else(|error| panic!("first wave: {error}\n{}", host.log()));

    // Enough failures to exhaust the sink's own two tries three times over, so the pipeline
    // retries the batch more often than --max-attempts allows for a failing handler.
    server.fail_next(6, Code::Unavailable);
    db.exec(
        "INSERT INTO items SELECT g, 'second wave item ' || g FROM generate_series(51, 120) g;
         UPDATE items SET content = 'revised item ' || id WHERE id <= 10;
         DELETE FROM items WHERE id BETWEEN 41 AND 50;",
    )
    .await;
    let end = db.current_lsn_bytes().await;
    wait_until(HOST_RUN_TIMEOUT, || async {
        pipeline.confirmed_flush_lsn().await >= end
    })
    .await
    .unwrap_or_else(|error| panic!("never confirmed the second wave: {error}\n{}", host.log()));
    let status = host.terminate(Duration::from_secs(30)).await.unwrap();
    assert!(status.success(), "host failed ({status}):\n{}", host.log());
    assert!(
        host.log()
            .contains("the embedder or the sink is unavailable; retrying the batch"),
        "the outage was seen:\n{}",
        host.log()
    );

    let source: BTreeMap<i64, String> = db
        .client()
        .query("SELECT id::bigint, content FROM items", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let points = Store::Fake(&server).points(&collection, "items").await;
    assert_eq!(
        points.keys().collect::<Vec<_>>(),
        source.keys().collect::<Vec<_>>(),
        "the collection holds exactly the source rows"
    );
    let sample: Vec<i64> = [1, 10, 11, 40, 51, 120].into();
    let texts: Vec<String> = sample.iter().map(|id| source[id].clone()).collect();
    let expected = embedder().embed(&texts).await.unwrap();
    for (id, vector) in sample.iter().zip(&expected) {
        assert_close(&points[id].1, vector, &format!("vector of item {id}"));
    }
    assert_eq!(server.unwaited_writes(), 0);
}

/// `https://` speaks TLS and verifies the server against the system's roots, which
/// `SSL_CERT_FILE` extends with a private certificate: without it the host refuses the server
/// and says why, with it the pipeline writes over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_verifies_the_server_against_the_trusted_certificates() {
    let certificates = tempfile::TempDir::new().unwrap();
    let (certificate, key) = self_signed_localhost_certificate(certificates.path());
    let server = FakeQdrant::start_tls(&std::fs::read(&certificate).unwrap(), &key)
        .await
        .unwrap();
    assert!(server.url().starts_with("https://localhost:"));
    let db = PgServer::shared(PgVersion::Pg18).create_database().await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, content text);")
        .await;
    let untrusted = qdrant_pipeline(&db, "items", &server.url())
        .without_env("SSL_CERT_FILE")
        .without_env("SSL_CERT_DIR");
    untrusted.setup().await;
    db.exec("INSERT INTO items VALUES (1, 'sent over TLS'), (2, 'verified by its certificate');")
        .await;

    let mut host = untrusted.run_to_current_lsn().await;
    let status = host.try_status().unwrap().expect("exited");
    let log = host.log();
    assert!(!status.success(), "an untrusted server is refused:\n{log}");
    assert!(
        log.contains(&format!(
            "the TLS certificate of the Qdrant server at {}",
            server.url()
        )) && log.contains("InvalidCertificate(")
            && log.contains("SSL_CERT_FILE"),
        "the error names the server, the cause and the way out:\n{log}"
    );
    assert!(
        !log.contains("retrying"),
        "a rejected certificate is not retried:\n{log}"
    );
    assert_eq!(server.requests(), 0, "nothing was sent to it");

    let trusted = untrusted.with_env("SSL_CERT_FILE", &certificate);
    trusted.catch_up().await;
    let points = Store::Fake(&server).points(&collection(&db), "items").await;
    assert_eq!(points.keys().copied().collect::<Vec<i64>>(), [1, 2]);
}

/// Writes a self-signed certificate for `localhost` (not a CA, so it can serve as its own
/// trust anchor) and its key; returns the certificate's path and the key's PEM.
fn self_signed_localhost_certificate(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u8>) {
    let output = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-keyout",
            "key.pem",
            "-out",
            "certificate.pem",
        ])
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        output.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let key = std::fs::read(dir.join("key.pem")).unwrap();
    (dir.join("certificate.pem"), key)
}

/// A stop asked for while the pipeline waits out an outage ends the process at once, not at
/// the outage limit: the failed batch stays unconfirmed, and the next start delivers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_an_outage_exits_at_once_and_the_next_start_delivers_the_batch() {
    let server = FakeQdrant::start().await.unwrap();
    let db = PgServer::shared(PgVersion::Pg18).create_database().await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, content text);")
        .await;

    let pipeline = qdrant_pipeline(&db, "items", &server.url()).with_args(&[
        "--qdrant-max-attempts",
        "1",
        "--retry-backoff-ms",
        "200",
    ]);
    let collection = collection(&db);
    pipeline.setup().await;
    let mut host = pipeline.start_streaming().await;
    server.fail_next(u32::MAX, Code::Unavailable);
    let before_insert = db.current_lsn_bytes().await;
    db.exec("INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 20) g;")
        .await;
    // Three failed tries: the host is waiting to retry, and the outage limit is ten minutes
    // away; the stop must not wait for either.
    wait_until(HOST_RUN_TIMEOUT, || async {
        host.log()
            .matches("the embedder or the sink is unavailable")
            .count()
            >= 3
    })
    .await
    .unwrap_or_else(|error| panic!("the outage was not seen: {error}\n{}", host.log()));

    let status = host
        .terminate(Duration::from_secs(10))
        .await
        .expect("a stop is not held up by the outage");
    let log = host.log();
    assert!(status.success(), "host failed ({status}):\n{log}");
    assert!(
        log.contains("stopping with a failed batch not confirmed; the next start replays it"),
        "{log}"
    );
    assert!(
        pipeline.confirmed_flush_lsn().await <= before_insert,
        "nothing of the failed batch was confirmed"
    );
    assert!(server.points(&collection).is_empty());

    server.fail_next(0, Code::Unavailable);
    pipeline.catch_up().await;
    assert_eq!(
        Store::Fake(&server)
            .points(&collection, "items")
            .await
            .keys()
            .copied()
            .collect::<Vec<i64>>(),
        (1..=20).collect::<Vec<i64>>()
    );
}

/// A SIGTERM while the host is still starting (here: waiting for Qdrant in `prepare`) is not
/// fatal: the host finishes starting, confirms nothing new and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_during_start_up_stops_the_host_cleanly() {
    let server = FakeQdrant::start().await.unwrap();
    let db = PgServer::shared(PgVersion::Pg18).create_database().await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, content text);")
        .await;
    let pipeline = qdrant_pipeline(&db, "items", &server.url());
    pipeline.setup().await;
    server.set_delay(Duration::from_secs(2));
    let mut host = pipeline.start();
    wait_until(HOST_RUN_TIMEOUT, || async { server.requests() > 0 })
        .await
        .unwrap_or_else(|error| panic!("the host never reached Qdrant: {error}\n{}", host.log()));
    host.send_terminate().unwrap();
    host.wait_for_log("SIGTERM received", HOST_RUN_TIMEOUT)
        .await
        .unwrap();
    server.set_delay(Duration::ZERO);
    let status = host
        .wait_timeout(HOST_RUN_TIMEOUT)
        .await
        .expect("the host stops");
    let log = host.log();
    assert!(status.success(), "host failed ({status}):\n{log}");
    assert!(log.contains("shutting down"), "{log}");
}

/// A first SIGTERM lets the batch in flight finish; a second ends the process at once with
/// 128 + 15, confirming nothing that was not written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_without_waiting_for_the_batch_in_flight() {
    let server = FakeQdrant::start().await.unwrap();
    let db = PgServer::shared(PgVersion::Pg18).create_database().await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, content text);")
        .await;

    let pipeline =
        qdrant_pipeline(&db, "items", &server.url()).with_args(&["--qdrant-timeout-ms", "600000"]);
    let collection = collection(&db);
    pipeline.setup().await;
    let mut host = pipeline.start_streaming().await;
    let writes_before = server
        .requests_by_method()
        .get("Points/UpdateBatch")
        .copied();
    server.set_delay(Duration::from_secs(600));
    let before_insert = db.current_lsn_bytes().await;
    db.exec("INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 20) g;")
        .await;
    wait_until(HOST_RUN_TIMEOUT, || async {
        server
            .requests_by_method()
            .get("Points/UpdateBatch")
            .copied()
            != writes_before
    })
    .await
    .unwrap_or_else(|error| panic!("the write never started: {error}\n{}", host.log()));

    host.send_terminate().unwrap();
    host.wait_for_log("SIGTERM received", HOST_RUN_TIMEOUT)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        host.try_status().unwrap().is_none(),
        "the first signal waits for the batch in flight:\n{}",
        host.log()
    );
    let status = host
        .terminate(Duration::from_secs(10))
        .await
        .expect("a second signal ends the process");
    let log = host.log();
    assert_eq!(status.code(), Some(128 + 15), "{log}");
    assert!(log.contains("second signal received"), "{log}");
    assert!(pipeline.confirmed_flush_lsn().await <= before_insert);
    assert!(server.points(&collection).is_empty());
}

/// A handler that catches a failed write and returns `ok` does not get its batch confirmed:
/// an outage is retried until the points are written, a refusal stops the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_the_handler_ignores_is_not_confirmed() {
    let server = FakeQdrant::start().await.unwrap();
    let db = PgServer::shared(PgVersion::Pg18).create_database().await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, content text);")
        .await;
    let pipeline = qdrant_pipeline_with(&db, "items", "careless-handler", &server.url())
        .with_args(&["--qdrant-max-attempts", "1", "--retry-backoff-ms", "100"]);
    pipeline.setup().await;
    let mut host = pipeline.start_streaming().await;

    server.fail_next(2, Code::Unavailable);
    db.exec("INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 10) g;")
        .await;
    let end = db.current_lsn_bytes().await;
    wait_until(HOST_RUN_TIMEOUT, || async {
        pipeline.confirmed_flush_lsn().await >= end
    })
    .await
    .unwrap_or_else(|error| panic!("never confirmed: {error}\n{}", host.log()));
    assert_eq!(
        server.points(&collection(&db)).len(),
        10,
        "confirmed only once written:\n{}",
        host.log()
    );
    let log = host.log();
    assert!(
        log.contains("careless-handler ignores a failed write"),
        "{log}"
    );
    assert!(
        log.contains("the handler returned ok, but a host call failed during it"),
        "{log}"
    );

    server.fail_next(1, Code::InvalidArgument);
    let before_insert = db.current_lsn_bytes().await;
    db.exec("INSERT INTO items VALUES (11, 'refused');").await;
    let status = host
        .wait_timeout(HOST_RUN_TIMEOUT)
        .await
        .expect("host exits");
    assert!(
        !status.success(),
        "a refused write stops the host:\n{}",
        host.log()
    );
    assert!(pipeline.confirmed_flush_lsn().await <= before_insert);
    assert_eq!(server.points(&collection(&db)).len(), 10);
}

/// A write Qdrant refuses fails the same way every time: the pipeline stops after the first
/// try, however many --max-attempts allows, with Qdrant's message, and confirms nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_write_stops_the_pipeline_at_once() {
    let server = FakeQdrant::start().await.unwrap();
    let db = PgServer::shared(PgVersion::Pg18).create_database().await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, content text);")
        .await;

    let pipeline = qdrant_pipeline(&db, "items", &server.url()).with_args(&[
        "--max-attempts",
        "5",
        "--retry-backoff-ms",
        "2000",
    ]);
    pipeline.setup().await;
    let mut host = pipeline.start_streaming().await;
    // The collection is prepared: the next request is the batch's write.
    server.fail_next(1, Code::InvalidArgument);
    let before_insert = db.current_lsn_bytes().await;
    db.exec("INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 20) g;")
        .await;
    let status = host
        .wait_timeout(HOST_RUN_TIMEOUT)
        .await
        .expect("host exits");
    let log = host.log();
    assert!(
        !status.success(),
        "a refused write must stop the host:\n{log}"
    );
    assert!(
        log.contains("failed 1 times"),
        "no retry of a refusal:\n{log}"
    );
    assert!(log.contains("refused a request"), "{log}");
    assert!(
        !log.contains("retrying the batch"),
        "a refusal is not retried:\n{log}"
    );
    // Idle keepalives may confirm WAL written before the insert (other tests share the
    // server), never the insert itself.
    assert!(
        pipeline.confirmed_flush_lsn().await <= before_insert,
        "nothing of the refused batch was confirmed"
    );
}
