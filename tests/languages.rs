//! End-to-end tests of what is particular to handlers written in languages other than Rust
//! (the shared behaviour runs per language in `pipeline.rs`, `in_every_language!`): mainly that
//! a failure inside the guest reaches the operator with the language's own message and stack.
//! One module per language.

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
