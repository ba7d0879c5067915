//! The pipeline's loop in-process: a scripted change source, an in-memory sink and real guest
//! components (built by `make guests` into `target/wasm/`). These pin the rules the loop
//! rests on without a database: nothing is confirmed before the handler wrote it, a failing
//! batch is retried and never confirmed, an outage is ridden out, a refusal stops at once, a
//! lost source restarts from the last confirmed position, a stop during an outage leaves the
//! batch for the next start, a plugin that cannot start fails before the source is used, and a
//! handler cannot write points of a table its pipeline does not watch.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use pgstream_host::embed::NoEmbedder;
use pgstream_host::event::{ChangeEvent, Column, Operation, Relation, Value};
use pgstream_host::lsn::Lsn;
use pgstream_host::pipeline::{
    BatchOptions, Pipeline, PipelineConfig, PipelineError, PipelineState, RetryPolicy,
};
use pgstream_host::point::{Point, PointKey};
use pgstream_host::replication::{ReplicationError, TableName};
use pgstream_host::runtime::{EngineOptions, HandleError, Limits, PluginEngine};
use pgstream_host::sink::{Sink, SinkError};
use pgstream_host::source::{ChangeSource, SourceError, SourceItem};

mod components;
use components::wasm;

/// What happened, in order, across the source and the sink.
#[derive(Debug, Clone, PartialEq)]
enum Happened {
    Prepared,
    Started(Lsn),
    /// The ids of the rows written.
    Upserted(Vec<String>),
    Confirmed(Lsn),
    Stopped,
}

type Journal = Arc<Mutex<Vec<Happened>>>;

/// One session's worth of script: what `recv` returns, in turn.
enum Scripted {
    Items(Vec<SourceItem>),
    /// The connection drops (a retryable error).
    Lose,
    /// Nothing arrives for this long (the batch before it is flushed meanwhile).
    Pause(Duration),
}

/// A source that plays one script per session, then waits forever.
struct ScriptedSource {
    sessions: VecDeque<Vec<Scripted>>,
    current: VecDeque<Scripted>,
    /// The end of a pause under way; kept across cancelled `recv` calls.
    paused_until: Option<tokio::time::Instant>,
    journal: Journal,
}

impl ScriptedSource {
    fn new(sessions: Vec<Vec<Scripted>>, journal: Journal) -> ScriptedSource {
        ScriptedSource {
            sessions: sessions.into(),
            current: VecDeque::new(),
            paused_until: None,
            journal,
        }
    }
}

#[async_trait]
impl ChangeSource for ScriptedSource {
    fn describe(&self) -> String {
        "scripted source".into()
    }

    async fn prepare(&mut self) -> Result<Lsn, SourceError> {
        self.journal.lock().unwrap().push(Happened::Prepared);
        Ok(Lsn::ZERO)
    }

    async fn start(&mut self, from: Lsn) -> Result<(), SourceError> {
        self.journal.lock().unwrap().push(Happened::Started(from));
        self.current = self.sessions.pop_front().unwrap_or_default().into();
        Ok(())
    }

    async fn recv(&mut self, items: &mut Vec<SourceItem>) -> Result<(), SourceError> {
        if let Some(until) = self.paused_until {
            tokio::time::sleep_until(until).await;
            self.paused_until = None;
        }
        while let Some(Scripted::Pause(pause)) = self.current.front() {
            let until = tokio::time::Instant::now() + *pause;
            self.current.pop_front();
            self.paused_until = Some(until);
            tokio::time::sleep_until(until).await;
            self.paused_until = None;
        }
        match self.current.pop_front() {
            Some(Scripted::Items(next)) => {
                items.extend(next);
                Ok(())
            }
            Some(Scripted::Lose) => Err(ReplicationError::Closed {
                target: "scripted".into(),
            }
            .into()),
            Some(Scripted::Pause(_)) => unreachable!("pauses are taken above"),
            None => std::future::pending().await,
        }
    }

    fn confirm(&mut self, lsn: Lsn) {
        self.journal.lock().unwrap().push(Happened::Confirmed(lsn));
    }

    async fn stop(&mut self) {
        self.journal.lock().unwrap().push(Happened::Stopped);
    }
}

/// How the sink answers writes.
#[derive(Debug, Clone, Copy)]
enum SinkMood {
    Fine,
    /// Unavailable for this many writes, then fine.
    DownFor(u32),
    /// Refuses every write.
    Refusing,
}

struct MemorySink {
    mood: Mutex<SinkMood>,
    journal: Journal,
}

#[async_trait]
impl Sink for MemorySink {
    async fn prepare(&self, _dimensions: usize) -> Result<(), SinkError> {
        Ok(())
    }

    async fn upsert(&self, points: &[Point]) -> Result<(), SinkError> {
        let mut mood = self.mood.lock().unwrap();
        match *mood {
            SinkMood::Fine => {}
            SinkMood::DownFor(0) => *mood = SinkMood::Fine,
            SinkMood::DownFor(left) => {
                *mood = SinkMood::DownFor(left - 1);
                return Err(SinkError::Unavailable("the memory sink is down".into()));
            }
            SinkMood::Refusing => {
                return Err(SinkError::Rejected("the memory sink refuses".into()));
            }
        }
        let ids = points.iter().map(|point| point.key.key.join(",")).collect();
        self.journal.lock().unwrap().push(Happened::Upserted(ids));
        Ok(())
    }

    async fn merge(&self, _points: &[Point]) -> Result<(), SinkError> {
        Ok(())
    }

    async fn delete(&self, _keys: &[PointKey]) -> Result<(), SinkError> {
        Ok(())
    }

    async fn delete_table(&self, _schema: &str, _table: &str) -> Result<(), SinkError> {
        Ok(())
    }
}

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
        vec![column("id", 23, true), column("content", 25, false)],
    ))
}

fn text(value: &str) -> Value {
    Value::text(Bytes::copy_from_slice(value.as_bytes())).unwrap()
}

/// A committed transaction of inserts `(id, content)` at `lsn`, ending at `lsn + 0x40`.
fn transaction(lsn: u64, rows: &[(&str, &str)]) -> Vec<SourceItem> {
    let relation = documents();
    let mut items: Vec<SourceItem> = rows
        .iter()
        .map(|(id, content)| {
            SourceItem::Change(ChangeEvent {
                operation: Operation::Insert,
                relation: relation.clone(),
                row: vec![text(id), text(content)],
                old_row: None,
                lsn: Lsn(lsn),
                commit_time_us: 0,
                xid: 1,
            })
        })
        .collect();
    items.push(SourceItem::Commit {
        end_lsn: Lsn(lsn + 0x40),
    });
    items
}

fn changes_only(mut items: Vec<SourceItem>) -> Vec<SourceItem> {
    items.pop();
    items
}

/// Longer than the batch wait: the batch before a pause is handled before what follows it.
const PAUSE: Duration = Duration::from_millis(200);

struct Harness {
    journal: Journal,
    pipeline: Pipeline,
}

fn harness(
    plugin: &str,
    sessions: Vec<Vec<Scripted>>,
    mood: SinkMood,
    configure: impl FnOnce(&mut PipelineConfig),
) -> Harness {
    let journal: Journal = Arc::default();
    let engine = PluginEngine::new(EngineOptions::default()).unwrap();
    let path = wasm(plugin);
    let plugin = engine.load(&path).unwrap();
    let mut config = PipelineConfig {
        name: "scripted".into(),
        slot: "scripted".into(),
        plugin: path,
        tables: vec![TableName {
            schema: "public".into(),
            name: "documents".into(),
        }],
        limits: Limits::default(),
        batch: BatchOptions {
            max_events: 100,
            max_wait: Duration::from_millis(20),
        },
        retry: RetryPolicy {
            max_attempts: 2,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            outage_limit: Duration::from_secs(30),
            outage_max_wait: Duration::from_millis(20),
        },
        stop_at: None,
        progress_interval: Duration::from_secs(60),
        on_failure: pgstream_host::dead_letter::OnFailure::Stop,
    };
    configure(&mut config);
    let sink = Arc::new(MemorySink {
        mood: Mutex::new(mood),
        journal: journal.clone(),
    });
    let source = ScriptedSource::new(sessions, journal.clone());
    let pipeline = Pipeline::new(
        config,
        plugin,
        Arc::new(NoEmbedder::new(4)),
        sink,
        Box::new(source),
    );
    Harness { journal, pipeline }
}

fn stop_at(lsn: u64) -> impl FnOnce(&mut PipelineConfig) {
    move |config| config.stop_at = Some(Lsn(lsn))
}

fn journal(journal: &Journal) -> Vec<Happened> {
    journal.lock().unwrap().clone()
}

fn confirmed(journal: &[Happened]) -> Vec<Lsn> {
    journal
        .iter()
        .filter_map(|happened| match happened {
            Happened::Confirmed(lsn) => Some(*lsn),
            _ => None,
        })
        .collect()
}

fn upserted(journal: &[Happened]) -> Vec<String> {
    journal
        .iter()
        .filter_map(|happened| match happened {
            Happened::Upserted(ids) => Some(ids.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

/// Runs with a watchdog: a loop that hangs fails the test instead of the suite.
async fn run(pipeline: Pipeline) -> Result<pgstream_host::pipeline::RunSummary, PipelineError> {
    tokio::time::timeout(
        Duration::from_secs(60),
        pipeline.run(std::future::pending()),
    )
    .await
    .expect("the pipeline did not finish within 60 s")
}

#[tokio::test]
async fn changes_are_confirmed_only_after_the_handler_wrote_them() {
    let first = transaction(0x100, &[("1", "a"), ("2", "b")]);
    let second = transaction(0x200, &[("3", "c")]);
    let Harness {
        journal: log,
        pipeline,
    } = harness(
        "trap-handler",
        vec![vec![Scripted::Items(first), Scripted::Items(second)]],
        SinkMood::Fine,
        stop_at(0x240),
    );
    let summary = run(pipeline).await.unwrap();
    assert_eq!(summary.events, 3);
    assert_eq!(summary.confirmed, Lsn(0x240));
    let log = journal(&log);
    assert_eq!(upserted(&log), ["1", "2", "3"]);
    // Every confirmation comes after the write of what it covers.
    for (index, happened) in log.iter().enumerate() {
        if let Happened::Confirmed(lsn) = happened {
            let written = upserted(&log[..index]).len();
            let needed = if *lsn >= Lsn(0x240) { 3 } else { 2 };
            assert!(
                written >= needed,
                "{lsn} confirmed before its rows: {log:?}"
            );
        }
    }
    assert_eq!(log.first(), Some(&Happened::Prepared));
    assert_eq!(log.last(), Some(&Happened::Stopped));
}

#[tokio::test]
async fn a_batch_that_keeps_trapping_stops_the_pipeline_with_nothing_of_it_confirmed() {
    let first = transaction(0x100, &[("1", "a")]);
    let poisoned = transaction(0x200, &[("2", "fine"), ("3", "boom")]);
    let Harness {
        journal: log,
        pipeline,
    } = harness(
        "trap-handler",
        vec![vec![
            Scripted::Items(first),
            Scripted::Pause(PAUSE),
            Scripted::Items(poisoned),
        ]],
        SinkMood::Fine,
        |_| {},
    );
    let error = run(pipeline).await.unwrap_err();
    let PipelineError::HandlerFailed {
        attempts, error, ..
    } = &error
    else {
        panic!("expected HandlerFailed, got {error:?}");
    };
    assert_eq!(*attempts, 2);
    assert!(matches!(error, HandleError::Trap { message } if message.contains("boom")));
    let log = journal(&log);
    assert_eq!(confirmed(&log), [Lsn(0x140)], "{log:?}");
    assert!(!upserted(&log).contains(&"2".to_owned()));
}

#[tokio::test]
async fn an_outage_of_the_sink_is_ridden_out_without_using_up_tries() {
    let rows = transaction(0x100, &[("1", "a")]);
    let Harness {
        journal: log,
        pipeline,
    } = harness(
        "trap-handler",
        vec![vec![Scripted::Items(rows)]],
        // More failures than max_attempts: an outage must not count against them.
        SinkMood::DownFor(5),
        stop_at(0x140),
    );
    let status = pipeline.status();
    let summary = run(pipeline).await.unwrap();
    assert_eq!(summary.confirmed, Lsn(0x140));
    let log = journal(&log);
    assert_eq!(upserted(&log), ["1"]);
    assert_eq!(confirmed(&log), [Lsn(0x140)]);
    let status = status.snapshot();
    assert_eq!(status.state, PipelineState::Stopped);
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|error| error.contains("unavailable")),
        "{status:?}"
    );
}

#[tokio::test]
async fn a_refused_write_stops_the_pipeline_at_once() {
    let rows = transaction(0x100, &[("1", "a")]);
    let Harness {
        journal: log,
        pipeline,
    } = harness(
        "trap-handler",
        vec![vec![Scripted::Items(rows)]],
        SinkMood::Refusing,
        |_| {},
    );
    let error = run(pipeline).await.unwrap_err();
    assert!(
        matches!(error, PipelineError::HandlerFailed { attempts: 1, .. }),
        "{error:?}"
    );
    assert!(!error.is_retryable());
    assert!(confirmed(&journal(&log)).is_empty());
}

#[tokio::test]
async fn a_lost_source_restarts_from_the_last_confirmed_position_and_replays() {
    let first = transaction(0x100, &[("1", "a")]);
    let second = transaction(0x200, &[("2", "b"), ("3", "c")]);
    let sessions = vec![
        // The connection drops in the middle of the second transaction.
        vec![
            Scripted::Items(first),
            Scripted::Pause(PAUSE),
            Scripted::Items(changes_only(second.clone())),
            Scripted::Lose,
        ],
        vec![Scripted::Items(second)],
    ];
    let Harness {
        journal: log,
        pipeline,
    } = harness("trap-handler", sessions, SinkMood::Fine, stop_at(0x240));
    let summary = run(pipeline).await.unwrap();
    assert_eq!(summary.reconnects, 1);
    let log = journal(&log);
    let starts: Vec<&Happened> = log
        .iter()
        .filter(|happened| matches!(happened, Happened::Started(_)))
        .collect();
    assert_eq!(
        starts,
        [
            &Happened::Started(Lsn::ZERO),
            &Happened::Started(Lsn(0x140))
        ]
    );
    let ids = upserted(&log);
    assert!(ids.ends_with(&["2".to_owned(), "3".to_owned()]), "{log:?}");
    assert_eq!(confirmed(&log).last(), Some(&Lsn(0x240)));
}

#[tokio::test]
async fn a_stop_during_an_outage_leaves_the_batch_unconfirmed_for_the_next_start() {
    let rows = transaction(0x100, &[("1", "a")]);
    let Harness {
        journal: log,
        pipeline,
    } = harness(
        "trap-handler",
        vec![vec![Scripted::Items(rows)]],
        SinkMood::DownFor(u32::MAX),
        |_| {},
    );
    let stop = tokio::time::sleep(Duration::from_millis(300));
    let summary = tokio::time::timeout(Duration::from_secs(10), pipeline.run(stop))
        .await
        .expect("a stop during an outage must not wait it out")
        .unwrap();
    assert_eq!(summary.events, 0);
    let log = journal(&log);
    assert!(confirmed(&log).is_empty(), "{log:?}");
    assert!(upserted(&log).is_empty());
}

#[tokio::test]
async fn a_plugin_that_cannot_start_fails_before_the_source_is_touched() {
    let Harness {
        journal: log,
        pipeline,
    } = harness(
        "trap-handler",
        vec![],
        SinkMood::Fine,
        // Far too little memory for any component to instantiate.
        |config| config.limits.memory_bytes = 1024,
    );
    let error = run(pipeline).await.unwrap_err();
    assert!(matches!(error, PipelineError::Plugin { .. }), "{error:?}");
    assert!(
        journal(&log).is_empty(),
        "the source was used: {:?}",
        journal(&log)
    );
}

#[tokio::test]
async fn a_handler_cannot_write_points_of_a_table_its_pipeline_does_not_watch() {
    for trespass in ["other-table", "delete-other", "truncate-other"] {
        let rows = transaction(0x100, &[("1", "fine"), ("2", trespass)]);
        let Harness {
            journal: log,
            pipeline,
        } = harness(
            "trespass-handler",
            vec![vec![Scripted::Items(rows)]],
            SinkMood::Fine,
            |_| {},
        );
        let error = run(pipeline).await.unwrap_err();
        let PipelineError::HandlerFailed {
            attempts, error, ..
        } = &error
        else {
            panic!("{trespass}: expected HandlerFailed, got {error:?}");
        };
        // Refused, not retried: the same call would be refused again.
        assert_eq!(*attempts, 1, "{trespass}");
        let message = error.to_string();
        assert!(
            message.contains("public.documents") && message.contains("other.documents"),
            "{trespass}: {message}"
        );
        let log = journal(&log);
        assert!(upserted(&log).is_empty(), "{trespass}: {log:?}");
        assert!(confirmed(&log).is_empty(), "{trespass}: {log:?}");
    }
}
