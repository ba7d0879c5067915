//! Handlers written in languages other than Rust: what each language's toolchain and helper
//! must get right beyond the shared pipeline scenario (`in_every_language!` in `pipeline.rs`,
//! which runs it once per language), above all that a failure inside the guest reaches the
//! operator with the guest's own words and stack. One module per language.

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

/// JavaScript/TypeScript handlers (QuickJS, built by `mk/js.mk`).
mod js {
    use std::time::Duration;

    use pgstream_e2e::{HostProcess, PgServer, PgVersion, TestDb, plugin_path, workspace_root};
    use tempfile::TempDir;

    /// How long a host run may take (the first run compiles the component).
    const RUN_TIMEOUT: Duration = Duration::from_secs(180);

    async fn exec(db: &TestDb, sql: &str) {
        db.client()
            .batch_execute(sql)
            .await
            .unwrap_or_else(|error| panic!("{sql}: {error}"));
    }

    /// Host arguments naming the database, table, plugin and a jsonl sink in `out`.
    fn host_args(db: &TestDb, plugin: &str, out: &TempDir) -> Vec<String> {
        let cache = workspace_root().join("target/plugin-cache");
        [
            "--dsn",
            db.dsn(),
            "--table",
            "t",
            "--name",
            &db.unique_name("pipe"),
            "--plugin",
            &plugin_path(plugin).display().to_string(),
            "--cache-dir",
            &cache.display().to_string(),
            "--embedder",
            "none",
            "--sink",
            "jsonl",
            "--collection",
            &out.path().join("sink.jsonl").display().to_string(),
            "--batch-wait-ms",
            "20",
        ]
        .iter()
        .map(|arg| arg.to_string())
        .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exception_reaches_the_host_log_with_message_and_stack() {
        let db = PgServer::shared(PgVersion::Pg18).create_database().await;
        let out = TempDir::new().unwrap();
        exec(&db, "CREATE TABLE t (id int PRIMARY KEY, content text);").await;
        let args = host_args(&db, "js-error-handler", &out);

        let mut setup = HostProcess::start(std::iter::once("setup".to_owned()).chain(args.clone()))
            .expect("start host setup");
        let status = setup.wait_timeout(RUN_TIMEOUT).await.expect("setup exits");
        assert!(status.success(), "setup failed:\n{}", setup.log());
        exec(&db, "INSERT INTO t VALUES (41, 'refused');").await;
        let lsn: String = db
            .client()
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .expect("current LSN")
            .get(0);

        let mut run_args = args;
        run_args.extend(
            [
                "--max-attempts",
                "2",
                "--retry-backoff-ms",
                "10",
                "--stop-at-lsn",
                &lsn,
            ]
            .map(str::to_owned),
        );
        let mut host = HostProcess::start(&run_args).expect("start host");
        let status = host.wait_timeout(RUN_TIMEOUT).await.expect("host exits");
        let log = host.log();
        assert!(!status.success(), "the batch must fail:\n{log}");
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
    use std::time::Duration;

    use pgstream_e2e::{HostProcess, PgServer, PgVersion, plugin_path};
    use tempfile::TempDir;

    /// How long one host run may take (the first run compiles the ~20 MB component).
    const RUN_TIMEOUT: Duration = Duration::from_secs(180);

    /// A Python exception raised two calls deep becomes the handler's error result: the host
    /// log shows the exception's type and message and the traceback naming the function that
    /// raised it, retries, then stops without confirming the batch.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exception_reaches_the_host_log_with_its_traceback() {
        let db = PgServer::shared(PgVersion::Pg18).create_database().await;
        db.client()
            .batch_execute("CREATE TABLE t (id int PRIMARY KEY, content text);")
            .await
            .unwrap();
        let out = TempDir::new().unwrap();
        let args: Vec<String> = [
            "--dsn",
            db.dsn(),
            "--table",
            "t",
            "--plugin",
            &plugin_path("python-error-handler").display().to_string(),
            "--name",
            &db.unique_name("pipe"),
            "--cache-dir",
            &out.path().join("plugin-cache").display().to_string(),
            "--embedder",
            "none",
            "--sink",
            "jsonl",
            "--collection",
            &out.path().join("sink.jsonl").display().to_string(),
            "--max-attempts",
            "2",
            "--retry-backoff-ms",
            "20",
        ]
        .iter()
        .map(|arg| arg.to_string())
        .collect();

        let mut setup = HostProcess::start(["setup".to_owned()].iter().chain(&args)).unwrap();
        let status = setup.wait_timeout(RUN_TIMEOUT).await.unwrap();
        assert!(status.success(), "setup failed:\n{}", setup.log());
        db.client()
            .batch_execute("INSERT INTO t VALUES (1, 'fine'), (2, 'boom');")
            .await
            .unwrap();
        let lsn: String = db
            .client()
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);

        let mut host =
            HostProcess::start(args.iter().chain(&["--stop-at-lsn".to_owned(), lsn])).unwrap();
        let status = host.wait_timeout(RUN_TIMEOUT).await.unwrap();
        let log = host.log();
        assert!(!status.success(), "the host must fail:\n{log}");
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
