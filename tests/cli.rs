//! The command line as an operator meets it: maintenance commands, and the errors for the
//! mistakes people make first (wrong DSN, missing table, table without a key).

use std::time::Duration;

use pgstream_e2e::{HostProcess, PgServer, PgVersion};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the host with `args` to completion: (succeeded, everything it printed).
async fn run(args: &[&str]) -> (bool, String) {
    let mut host = HostProcess::start(args).expect("start the host");
    let status = host.wait_timeout(TIMEOUT).await.expect("the host exits");
    (status.success(), host.log())
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
    let db = PgServer::shared(PgVersion::Pg15).create_database().await;
    db.client()
        .batch_execute("CREATE TABLE keyless (a int, b text);")
        .await
        .unwrap();

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
    let db = PgServer::shared(PgVersion::Pg15).create_database().await;
    db.client()
        .batch_execute("CREATE TABLE docs (id int PRIMARY KEY);")
        .await
        .unwrap();
    let role = db.create_role("pw", false).await;
    let dsn = db.dsn_as(&role, "pw");
    let (ok, log) = run(&["check", "--dsn", &dsn, "--table", "docs"]).await;
    assert!(!ok, "{log}");
    assert!(log.contains("REPLICATION"), "{log}");
}

#[tokio::test]
async fn setup_is_idempotent_and_teardown_removes_the_slot() {
    let db = PgServer::shared(PgVersion::Pg15).create_database().await;
    db.client()
        .batch_execute("CREATE TABLE docs (id int PRIMARY KEY, content text);")
        .await
        .unwrap();
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
    assert_eq!(slots().await, 0);
}
