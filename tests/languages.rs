//! Handlers written in other languages than Rust: what each language adds beyond the shared
//! pipeline scenarios (`in_every_language!` in `pipeline.rs`), such as how a guest exception
//! reaches the operator. One module per language.

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
        let check_content = log.find("at checkContent (/js-error-handler.js:");
        let visit = log.find("at visit (/js-error-handler.js:");
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
