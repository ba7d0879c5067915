//! Handlers written in languages other than Rust: what each language's toolchain and helper
//! must get right beyond the shared pipeline scenario (which `tests/pipeline.rs` runs once per
//! language), above all that a failure inside the guest reaches the operator with the guest's
//! own words. One module per language.

/// C handlers (`mk/c.mk`, helper `examples/c-handler/pgstream.h`).
mod c {
    use std::time::Duration;

    use pgstream_e2e::{HostProcess, PgServer, PgVersion, TestDb, plugin_path};
    use tempfile::TempDir;

    /// Runs `c-error-handler` once (no retry) over the rows `insert` writes, until the host
    /// gives up, and returns the host's log.
    async fn run_failing_batch(insert: &str) -> String {
        let db: TestDb = PgServer::shared(PgVersion::Pg18).create_database().await;
        let out = TempDir::new().unwrap();
        db.client()
            .batch_execute("CREATE TABLE t (id int PRIMARY KEY, content text);")
            .await
            .unwrap();
        let plugin = plugin_path("c-error-handler").display().to_string();
        let sink = out.path().join("sink.jsonl").display().to_string();
        let cache = pgstream_e2e::workspace_root().join("target/plugin-cache");
        let args = |extra: &[&str]| -> Vec<String> {
            let mut args: Vec<String> = extra.iter().map(|arg| arg.to_string()).collect();
            args.extend(
                [
                    "--dsn",
                    db.dsn(),
                    "--table",
                    "t",
                    "--plugin",
                    &plugin,
                    "--name",
                    &db.unique_name("pipe"),
                    "--cache-dir",
                    &cache.display().to_string(),
                    "--embedder",
                    "none",
                    "--sink",
                    "jsonl",
                    "--collection",
                    &sink,
                    "--batch-wait-ms",
                    "20",
                    "--max-attempts",
                    "1",
                ]
                .iter()
                .map(|arg| arg.to_string()),
            );
            args
        };
        let mut setup = HostProcess::start(args(&["setup"])).expect("start host setup");
        let status = setup.wait_timeout(Duration::from_secs(180)).await.unwrap();
        assert!(status.success(), "setup failed:\n{}", setup.log());

        db.client().batch_execute(insert).await.unwrap();
        let lsn: String = db
            .client()
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        let mut host = HostProcess::start(args(&["--stop-at-lsn", &lsn])).expect("start host");
        let status = host.wait_timeout(Duration::from_secs(180)).await.unwrap();
        let log = host.log();
        assert!(
            !status.success(),
            "the host must stop on the failing batch:\n{log}"
        );
        log
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
