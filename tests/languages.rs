//! Handlers written in languages other than Rust: what each language's toolchain and helper
//! must get right beyond the shared pipeline scenario (`in_every_language!` in `pipeline.rs`,
//! which runs it once per language), above all that a failure inside the guest reaches the
//! operator with the guest's own words and stack. One module per language.

use pgstream_e2e::{PgServer, PgVersion, TestPipeline};
use tempfile::TempDir;

/// Runs the error-raising handler `plugin` over the rows `insert` writes to a fresh table
/// `t (id int PRIMARY KEY, content text)`, with no embedder, a JSON-lines sink and the host
/// arguments `args` (the retry settings), until the host gives up; returns the host's log.
async fn run_failing_batch(plugin: &str, insert: &str, args: &[&str]) -> String {
    let db = PgServer::shared(PgVersion::Pg18).create_database().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, content text);")
        .await;
    let out = TempDir::new().unwrap();
    let sink = out.path().join("sink.jsonl");
    let pipeline = TestPipeline::new(&db, "t", plugin)
        .with_args(&["--embedder", "none", "--sink", "jsonl", "--collection"])
        .with_args(&[sink.display().to_string()])
        .with_args(args);
    pipeline.setup().await;
    db.exec(insert).await;
    let mut host = pipeline.run_to_current_lsn().await;
    let status = host.try_status().unwrap().expect("exited");
    let log = host.log();
    assert!(
        !status.success(),
        "the host must stop on the failing batch:\n{log}"
    );
    log
}

/// C handlers (`mk/c.mk`, helper `examples/c-handler/pgstream.h`).
mod c {
    /// Runs `c-error-handler` once (no retry) over the rows `insert` writes, until the host
    /// gives up, and returns the host's log.
    async fn run_failing_batch(insert: &str) -> String {
        super::run_failing_batch("c-error-handler", insert, &["--max-attempts", "1"]).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn error_reaches_the_log_with_message_and_source_locations() {
        let log = run_failing_batch("INSERT INTO t VALUES (1, 'boom');").await;
        assert!(
            log.contains("c-error-handler refuses content 'boom'"),
            "the guest's message reaches the operator:\n{log}"
        );
        // PGS_FAIL and each PGS_TRACE on the way up add "at file:line in function".
        let file = "tests/plugins/c-error-handler/error_handler.c:";
        for function in ["check_content", "check_batch", "exports_handler_handle"] {
            assert!(
                log.lines().any(|line| line.contains(file)
                    && line.trim_end().ends_with(&format!(" in {function}"))),
                "a location line for {function}:\n{log}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_assert_reaches_the_log_with_its_text() {
        let log = run_failing_batch("INSERT INTO t VALUES (1, 'assert');").await;
        assert!(log.contains("handler trapped"), "{log}");
        assert!(
            log.contains("c-error-handler was told to assert") && log.contains("error_handler.c"),
            "wasi-libc's assertion message (stderr) is in the trap report:\n{log}"
        );
        // The build keeps the name section, so the wasm backtrace names C functions.
        assert!(
            log.contains("c-error-handler.wasm!__assert_fail"),
            "the trap's backtrace names the functions:\n{log}"
        );
    }
}

/// JavaScript/TypeScript handlers (QuickJS, built by `mk/js.mk`).
mod js {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exception_reaches_the_host_log_with_message_and_stack() {
        let log = super::run_failing_batch(
            "js-error-handler",
            "INSERT INTO t VALUES (41, 'refused');",
            &["--max-attempts", "2", "--retry-backoff-ms", "10"],
        )
        .await;
        assert!(
            log.contains("handler returned an error: RangeError: js-error-handler refuses row 41"),
            "the exception's class and message reach the log as the handler's error:\n{log}"
        );
        // QuickJS stack lines: `    at <function> (<bundle>:<line>:<column>)`, innermost first.
        // The bundle's path depends on where the target folder is: match its file name only.
        let frame = |function: &str| {
            log.lines().position(|line| {
                line.contains(&format!("at {function} (")) && line.contains("js-error-handler.js:")
            })
        };
        let check_content = frame("checkContent");
        let visit = frame("visit");
        assert!(
            matches!((check_content, visit), (Some(inner), Some(outer)) if inner < outer),
            "the JS stack, innermost frame first, follows the message:\n{log}"
        );
        assert!(
            !log.contains("wasm trap"),
            "an exception is an error result, not a trap:\n{log}"
        );
        assert!(
            log.contains("failed 2 times"),
            "the batch is retried, then the host stops:\n{log}"
        );
    }
}

/// Python handlers (componentize-py, built by `mk/python.mk`).
mod python {
    /// A Python exception raised two calls deep becomes the handler's error result: the host
    /// log shows the exception's type and message and the traceback naming the function that
    /// raised it, retries, then stops without confirming the batch.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exception_reaches_the_host_log_with_its_traceback() {
        let log = super::run_failing_batch(
            "python-error-handler",
            "INSERT INTO t VALUES (1, 'fine'), (2, 'boom');",
            &["--max-attempts", "2", "--retry-backoff-ms", "20"],
        )
        .await;
        assert!(
            log.contains(
                "handler returned an error: ValueError: python-error-handler refuses content 'boom'"
            ),
            "the exception's type and message reach the log as the handler's error:\n{log}"
        );
        assert!(
            log.contains("Traceback (most recent call last):"),
            "the traceback reaches the log:\n{log}"
        );
        assert!(
            log.lines()
                .any(|line| line.contains("error_handler.py\", line") && line.contains("in refuse")),
            "the traceback names the file, line and function that raised:\n{log}"
        );
        assert!(log.contains("failed 2 times"), "{log}");
    }
}
