//! The command line as an operator meets it: maintenance commands, and the errors for the
//! mistakes people make first (wrong DSN, missing table, table without a key, zero limits,
//! names Postgres refuses), which must name the flag at fault and never show a password.

use std::time::Duration;

use pgstream_e2e::{HostProcess, PgServer, PgVersion, TestDb};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the host with `args` to completion: (succeeded, everything it printed).
async fn run(args: &[&str]) -> (bool, String) {
    run_with_env(args, &[]).await
}

/// [`run`] with environment variables set.
async fn run_with_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut command = HostProcess::command();
    command.args(args).envs(env.iter().copied());
    let mut host = HostProcess::spawn(command).expect("start the host");
    let status = host.wait_timeout(TIMEOUT).await.expect("the host exits");
    (status.success(), host.log())
}

/// A database of its own on the shared Postgres 15, with `sql` run in it.
async fn database_with(sql: &str) -> TestDb {
    let db = PgServer::shared(PgVersion::Pg15).create_database().await;
    db.client().batch_execute(sql).await.unwrap();
    db
}

/// The password in [`malformed_dsns`], and the second half of it where an unquoted space cuts
/// it in two.
const PASSWORD: &str = "S3cr3tPW";
const PASSWORD_TAIL: &str = "Tail4711";

/// Every way of getting a DSN wrong that came to mind, each with the password in it.
fn malformed_dsns() -> Vec<String> {
    let url = "postgres:S3cr3tPW@127.0.0.1:1/postgres";
    let pairs = "host=127.0.0.1 port=1 user=postgres";
    let mut dsns: Vec<String> = [
        // Another scheme, a mistyped or missing prefix.
        "mysql://",
        "MySQL://",
        "Postgresql://",
        "POSTGRES://",
        "postgresql+psycopg2://",
        "postgresql//",
        "postgresql:/",
        "postgresql:",
        "postgres//",
        "//",
        "",
    ]
    .iter()
    .map(|prefix| format!("{prefix}{url}"))
    .collect();
    dsns.extend(
        [
            "jdbc:postgresql://127.0.0.1:1/postgres?user=postgres&password=S3cr3tPW",
            "jdbc:postgresql://postgres:S3cr3tPW@127.0.0.1:1/postgres",
            // URLs that go wrong after the password.
            "postgresql://postgres:S3cr3tPW@127.0.0.1:notaport/postgres",
            "postgresql://postgres:S3cr3tPW@[::1/postgres",
            "postgresql://postgres:S3cr3tPW@127.0.0.1:1/postgres?sslmode=sometimes",
            "postgresql://postgres:S3cr3tPW@127.0.0.1:1/postgres?no_such_option=1",
            "postgresql://postgres:S3cr3tPW@127.0.0.1:1/postgres?S3cr3tPW",
            "postgresql://postgres:S3cr3tPW@127.0.0.1:1/postgres?password",
            "postgresql://postgres:S3cr3tPW@127.0.0.1:1/postgres?application_name=%FF",
            "postgresql://postgres:S3cr3tPW@127.0.0.1:1/postgres?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
            "postgresql://postgres:S3cr3tPW@/postgres",
            "postgresql://:S3cr3tPW@127.0.0.1:1/postgres",
            "postgresql://postgres:S3cr3tPW%ZZ@127.0.0.1:1/postgres",
            "postgresql://postgres:S3cr3tPW@127.0.0.1:1,127.0.0.2:1:1/postgres",
            // Characters that should have been percent-encoded in the password.
            "postgresql://postgres:p@S3cr3tPW@127.0.0.1:1/postgres",
            "postgresql://postgres:S3cr3tPW@@127.0.0.1:1/postgres",
            "postgresql://postgres:p/S3cr3tPW@127.0.0.1:1/postgres",
            "postgresql://postgres:p?S3cr3tPW@127.0.0.1:1/postgres",
            "postgresql://postgres:p#S3cr3tPW@127.0.0.1:1/postgres",
            "postgresql://postgres:S3cr3tPW Tail4711@127.0.0.1:1/postgres",
            // A well-formed DSN for a server that is not there.
            "postgresql://postgres:S3cr3tPW@127.0.0.1:1/postgres",
            // Just the password.
            "S3cr3tPW",
            "password=S3cr3tPW",
        ]
        .map(str::to_owned),
    );
    dsns.extend(
        [
            "password=S3cr3tPW sslmode=sometimes",
            "password=S3cr3tPW no_such_option=1",
            "password=S3cr3tPW Tail4711",
            "password=S3cr3tPW Tail4711 dbname=postgres",
            "password='S3cr3tPW",
            "password='S3cr3tPW Tail4711",
            "password=\"S3cr3tPW Tail4711\"",
            "password S3cr3tPW",
            "password: S3cr3tPW",
            "password=S3cr3tPW port=x",
            "password=S3cr3tPW connect_timeout=soon",
            "password=S3cr3tPW sslmode=x\\ Tail4711",
            "password=S3cr3tPW sslmode=verify-full sslrootcert=/nonexistent/ca.pem",
            "password=S3cr3tPW dbname='x password=Tail4711'",
            ",password=S3cr3tPW",
        ]
        .map(|rest| format!("{pairs} {rest}")),
    );
    dsns.extend([
        "host=127.0.0.1,port=1,user=postgres,password=S3cr3tPW".to_owned(),
        "host=127.0.0.1;port=1;user=postgres;password=S3cr3tPW".to_owned(),
        "user=postgres password=S3cr3tPW".to_owned(),
        "host=127.0.0.1 password=S3cr3tPW".to_owned(),
        format!("  {url}  "),
    ]);
    dsns
}

#[tokio::test]
async fn no_error_shows_a_password_however_malformed_the_dsn() {
    let assert_hidden = |dsn: &str, way: &str, log: &str| {
        for secret in [PASSWORD, PASSWORD_TAIL] {
            assert!(
                !log.contains(secret),
                "the password leaked with {way} {dsn:?}:\n{log}"
            );
        }
    };
    let unreachable_source = "postgresql://postgres@127.0.0.1:1/postgres";
    for dsn in malformed_dsns() {
        let (ok, log) = run(&["check", "--dsn", &dsn, "--table", "docs"]).await;
        assert!(!ok, "--dsn {dsn:?} worked:\n{log}");
        assert_hidden(&dsn, "--dsn", &log);

        let (ok, log) =
            run_with_env(&["check", "--table", "docs"], &[("PGSTREAM_DSN", &dsn)]).await;
        assert!(!ok, "PGSTREAM_DSN={dsn:?} worked:\n{log}");
        assert_hidden(&dsn, "PGSTREAM_DSN", &log);

        let (ok, log) = run(&[
            "--dsn",
            unreachable_source,
            "--sink-dsn",
            &dsn,
            "--table",
            "docs",
            "--embedder",
            "none",
            "--plugin",
            "/nonexistent/handler.wasm",
        ])
        .await;
        assert!(!ok, "--sink-dsn {dsn:?} worked:\n{log}");
        assert_hidden(&dsn, "--sink-dsn", &log);
    }
    // The sink DSN was looked at, not skipped for an earlier error.
    let (_, log) = run(&[
        "--dsn",
        unreachable_source,
        "--sink-dsn",
        "mysql://postgres:S3cr3tPW@127.0.0.1:1/postgres",
        "--table",
        "docs",
        "--embedder",
        "none",
        "--plugin",
        "/nonexistent/handler.wasm",
    ])
    .await;
    assert!(
        log.contains("--sink-dsn") && log.contains("mysql://"),
        "{log}"
    );
}

#[tokio::test]
async fn limits_that_cannot_work_are_refused_naming_the_flag() {
    for (flag, value) in [
        ("--batch-size", "0"),
        ("--call-timeout-ms", "0"),
        ("--memory-limit-mb", "0"),
        ("--max-attempts", "0"),
        ("--retry-backoff-ms", "0"),
        ("--progress-secs", "0"),
        ("--qdrant-timeout-ms", "0"),
        ("--qdrant-max-attempts", "0"),
        ("--embed-threads", "0"),
        ("--embed-cache-max-mb", "8"),
        ("--dimensions", "0"),
        ("--openai-max-inputs", "0"),
        ("--openai-max-tokens", "0"),
        ("--openai-concurrency", "0"),
        ("--openai-timeout-ms", "0"),
        ("--batch-size", "-1"),
    ] {
        let setting = format!("{flag}={value}");
        let (ok, log) = run(&["check", &setting, "--table", "docs"]).await;
        assert!(!ok, "{setting} was accepted:\n{log}");
        assert!(
            log.contains(&format!("'{flag} <")),
            "the error names {flag}:\n{log}"
        );
    }
    let (ok, log) = run(&["search", "--limit=0", "query"]).await;
    assert!(!ok && log.contains("'--limit <"), "{log}");
    let (ok, log) = run_with_env(&["check"], &[("PGSTREAM_BATCH_SIZE", "0")]).await;
    assert!(!ok && log.contains("'--batch-size <"), "{log}");
    // Zero makes sense for these: hand over what arrived, and do not wait out outages.
    for setting in ["--batch-wait-ms=0", "--outage-limit-secs=0"] {
        let (ok, log) = run(&["check", setting, "--table", "docs"]).await;
        assert!(
            !ok && log.contains("no source database"),
            "{setting}:\n{log}"
        );
    }
}

#[tokio::test]
async fn an_invalid_collection_or_table_is_named_by_its_flag() {
    let pipeline = [
        "--dsn",
        "postgresql://postgres@127.0.0.1:1/postgres",
        "--embedder",
        "none",
        "--plugin",
        "/nonexistent/handler.wasm",
    ];
    let (ok, log) =
        run(&[&pipeline[..], &["--table", "docs", "--collection", "a.b.c"]].concat()).await;
    assert!(!ok && log.contains("--collection"), "{log}");
    let (ok, log) = run(&[&pipeline[..], &["--table", "a.b.c"]].concat()).await;
    assert!(!ok && log.contains("--table"), "{log}");
}

#[tokio::test]
async fn verify_full_against_a_server_without_tls_says_it_has_no_tls() {
    let db = PgServer::shared(PgVersion::Pg15).create_database().await;
    let dsn = format!("{}?sslmode=verify-full", db.dsn());
    let (ok, log) = run(&["check", "--dsn", &dsn, "--table", "docs"]).await;
    assert!(!ok, "{log}");
    assert!(log.contains("does not accept TLS"), "{log}");
}

#[tokio::test]
async fn setup_with_a_name_postgres_refuses_leaves_nothing_behind() {
    let db = database_with("CREATE TABLE docs (id int PRIMARY KEY);").await;
    let (ok, log) = run(&[
        "setup",
        "--dsn",
        db.dsn(),
        "--table",
        "docs",
        "--name",
        "My-Pipeline",
    ])
    .await;
    assert!(!ok, "{log}");
    assert!(
        log.contains("--name") && log.contains("my_pipeline"),
        "the error names the flag and a name that works:\n{log}"
    );
    let publications: i64 = db
        .client()
        .query_one("SELECT count(*) FROM pg_publication", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(publications, 0, "setup left a publication behind");

    let (ok, log) = run(&[
        "setup",
        "--dsn",
        db.dsn(),
        "--table",
        "docs",
        "--slot",
        &"s".repeat(64),
    ])
    .await;
    assert!(!ok && log.contains("--slot"), "{log}");
}

#[tokio::test]
async fn help_documents_every_flag_with_its_environment_variable() {
    let (ok, help) = run(&["--help"]).await;
    assert!(ok, "{help}");
    for needle in [
        "PGSTREAM_DSN",
        "PGSTREAM_TABLES",
        "PGSTREAM_PLUGIN",
        "PGSTREAM_SINK",
        "--stop-at-lsn",
        "setup",
        "check",
        "teardown",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
    }
}

#[tokio::test]
async fn an_unreachable_server_is_named_in_the_error() {
    let (ok, log) = run(&[
        "check",
        "--dsn",
        "postgresql://postgres:secret-password@127.0.0.1:1/app",
        "--table",
        "docs",
    ])
    .await;
    assert!(!ok, "{log}");
    assert!(
        log.contains("127.0.0.1:1"),
        "the error names the server:\n{log}"
    );
    assert!(
        !log.contains("secret-password"),
        "the password leaked:\n{log}"
    );
}

#[tokio::test]
async fn a_malformed_dsn_is_rejected_before_connecting() {
    let (ok, log) = run(&["check", "--dsn", "postgresql://[bad", "--table", "docs"]).await;
    assert!(!ok, "{log}");
    assert!(log.to_lowercase().contains("dsn"), "{log}");
}

#[tokio::test]
async fn check_explains_missing_tables_and_tables_without_a_key() {
    let db = database_with("CREATE TABLE keyless (a int, b text);").await;

    let (ok, log) = run(&["check", "--dsn", db.dsn(), "--table", "missing_table"]).await;
    assert!(!ok, "{log}");
    assert!(log.contains("missing_table"), "{log}");

    let (ok, log) = run(&["check", "--dsn", db.dsn(), "--table", "keyless"]).await;
    assert!(!ok, "{log}");
    assert!(
        log.contains("REPLICA IDENTITY"),
        "the error says how to fix it:\n{log}"
    );

    db.client()
        .batch_execute("ALTER TABLE keyless REPLICA IDENTITY FULL;")
        .await
        .unwrap();
    let (ok, log) = run(&["check", "--dsn", db.dsn(), "--table", "keyless"]).await;
    assert!(ok, "{log}");
}

#[tokio::test]
async fn a_role_without_replication_is_told_how_to_fix_it() {
    let db = database_with("CREATE TABLE docs (id int PRIMARY KEY);").await;
    let role = db.create_role("pw", false).await;
    let dsn = db.dsn_as(&role, "pw");
    let (ok, log) = run(&["check", "--dsn", &dsn, "--table", "docs"]).await;
    assert!(!ok, "{log}");
    assert!(log.contains("REPLICATION"), "{log}");
}

#[tokio::test]
async fn setup_is_idempotent_and_teardown_removes_the_slot() {
    let db = database_with("CREATE TABLE docs (id int PRIMARY KEY, content text);").await;
    let name = db.unique_name("cli");
    let args = ["--dsn", db.dsn(), "--table", "docs", "--name", &name];
    let slots = || async {
        db.client()
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
                &[&name],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };

    let (ok, first) = run(&[&["setup"], &args[..]].concat()).await;
    assert!(ok && first.contains("created"), "{first}");
    let (ok, second) = run(&[&["setup"], &args[..]].concat()).await;
    assert!(ok && second.contains("exists"), "{second}");
    assert_eq!(slots().await, 1);

    let (ok, log) = run(&[&["teardown"], &args[..]].concat()).await;
    assert!(ok, "{log}");
    assert!(
        log.contains(&format!("dropped slot {name}"))
            && log.contains(&format!("dropped publication {name}")),
        "{log}"
    );
    assert_eq!(slots().await, 0);

    // Nothing is left to drop, and teardown says so rather than claim it dropped something.
    let (ok, log) = run(&[&["teardown"], &args[..]].concat()).await;
    assert!(ok, "{log}");
    assert!(
        log.contains(&format!("no slot {name} to drop"))
            && log.contains(&format!("no publication {name} to drop")),
        "{log}"
    );
}
