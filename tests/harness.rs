//! Checks of the harness itself: both PostgreSQL installations start with logical decoding,
//! pgvector is where it should be, password authentication is real, servers are cleaned up
//! even when the test binary dies, and host processes can be watched, stopped and killed.

use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::Duration;

use pgstream_e2e::{HostProcess, PgServer, PgVersion, TestDb, model_dir, wait_until};
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test]
async fn pg18_is_postgres_18_configured_for_logical_replication() {
    check_configuration(PgVersion::Pg18).await;
}

#[tokio::test]
async fn pg15_is_postgres_15_configured_for_logical_replication() {
    check_configuration(PgVersion::Pg15).await;
}

async fn check_configuration(version: PgVersion) {
    let server = PgServer::shared(version);
    assert_eq!(server.version_num().await / 10000, version.major());
    let db = server.create_database().await;
    for (setting, expected) in [
        ("wal_level", "logical"),
        ("wal_sender_timeout", "10s"),
        ("max_replication_slots", "80"),
        ("listen_addresses", "127.0.0.1"),
        ("server_encoding", "UTF8"),
    ] {
        let row = db
            .client()
            .query_one(&format!("SHOW {setting}"), &[])
            .await
            .unwrap();
        let value: String = row.get(0);
        assert_eq!(
            value,
            expected,
            "{setting} on PostgreSQL {}",
            version.major()
        );
    }
}

#[tokio::test]
async fn pg18_decodes_an_insert_with_pgoutput() {
    check_logical_decoding(PgVersion::Pg18).await;
}

#[tokio::test]
async fn pg15_decodes_an_insert_with_pgoutput() {
    check_logical_decoding(PgVersion::Pg15).await;
}

/// A pgoutput slot sees an insert as Begin, Relation, Insert, Commit; peeking leaves the
/// changes in the slot, getting consumes them.
async fn check_logical_decoding(version: PgVersion) {
    let db = PgServer::shared(version).create_database().await;
    let client = db.client();
    client
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, body text NOT NULL);
             CREATE PUBLICATION items_pub FOR TABLE items;",
        )
        .await
        .unwrap();
    let slot = db.unique_name("slot");
    client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO items VALUES (1, 'hello from the harness')",
            &[],
        )
        .await
        .unwrap();

    let peek = "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL, \
                'proto_version', '1', 'publication_names', 'items_pub')";
    let messages: Vec<Vec<u8>> = client
        .query(peek, &[&slot])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let tags: Vec<u8> = messages.iter().filter_map(|m| m.first().copied()).collect();
    assert_eq!(tags, b"BRIC", "pgoutput message tags");
    let insert = &messages[2];
    assert!(
        insert
            .windows(b"hello from the harness".len())
            .any(|w| w == b"hello from the harness"),
        "the Insert message carries the row: {insert:?}"
    );

    // Peeking did not consume; getting does.
    let again = client.query(peek, &[&slot]).await.unwrap();
    assert_eq!(again.len(), messages.len());
    let get = peek.replace("peek", "get");
    assert_eq!(client.query(&get, &[&slot]).await.unwrap().len(), 4);
    assert!(client.query(peek, &[&slot]).await.unwrap().is_empty());
}

#[tokio::test]
async fn pg18_has_pgvector_and_pg15_does_not() {
    let pg18 = PgServer::shared(PgVersion::Pg18);
    assert!(pg18.has_pgvector().await);
    let db = pg18.create_database().await;
    db.create_vector_extension().await;
    db.client()
        .batch_execute(
            "CREATE TABLE docs (id int PRIMARY KEY, embedding vector(3));
             INSERT INTO docs VALUES (1, '[1,2,3]'), (2, '[10,10,10]');",
        )
        .await
        .unwrap();
    let row = db
        .client()
        .query_one(
            "SELECT id, (embedding <-> '[1,2,4]')::float8 FROM docs ORDER BY embedding <-> '[1,2,4]' LIMIT 1",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);
    assert_eq!(row.get::<_, f64>(1), 1.0);

    assert!(!PgServer::shared(PgVersion::Pg15).has_pgvector().await);
}

#[tokio::test]
async fn pg18_ships_pg_recvlogical() {
    let bin = PgServer::shared(PgVersion::Pg18)
        .bin_dir()
        .join("pg_recvlogical");
    let output = std::process::Command::new(&bin)
        .arg("--version")
        .output()
        .unwrap();
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("18."));
}

#[tokio::test]
async fn roles_log_in_with_scram_and_need_replication_for_slots() {
    for version in [PgVersion::Pg18, PgVersion::Pg15] {
        let db = PgServer::shared(version).create_database().await;
        check_password_roles(&db).await;
    }
}

async fn check_password_roles(db: &TestDb) {
    let replicator = db.create_role("correct horse", true).await;
    let plain = db.create_role("battery staple", false).await;

    let stored: String = db
        .client()
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&replicator],
        )
        .await
        .unwrap()
        .get(0);
    assert!(stored.starts_with("SCRAM-SHA-256$"), "{stored}");

    let wrong = tokio_postgres::connect(
        &db.dsn_as(&replicator, "wrong password"),
        tokio_postgres::NoTls,
    )
    .await;
    let error = wrong.err().expect("a wrong password is refused");
    assert_eq!(
        error.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD)
    );

    let (client, connection) = tokio_postgres::connect(
        &db.dsn_as(&replicator, "correct horse"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let user: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, replicator);
    client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&db.unique_name("role_slot")],
        )
        .await
        .expect("a REPLICATION role may create a slot");
    client
        .batch_execute("CREATE TABLE owned_by_role (id int)")
        .await
        .expect("the role may create tables in public");

    let (client, connection) =
        tokio_postgres::connect(&db.dsn_as(&plain, "battery staple"), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    let refused = client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&db.unique_name("plain_slot")],
        )
        .await
        .expect_err("a role without REPLICATION may not create a slot");
    assert_eq!(
        refused.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    );
}

#[tokio::test]
async fn an_own_server_survives_a_crash_and_is_removed_on_drop() {
    let server = PgServer::start(PgVersion::Pg18).unwrap();
    let folder = server.folder().to_path_buf();
    let db = server.create_database().await;
    db.client()
        .batch_execute("CREATE TABLE kept (id int); INSERT INTO kept VALUES (7);")
        .await
        .unwrap();

    server.crash().unwrap();
    assert!(db.client().query_one("SELECT 1", &[]).await.is_err());
    server.start_again().unwrap();
    let client = db.connect().await;
    let kept: i32 = client
        .query_one("SELECT id FROM kept", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 7, "a committed row survives an immediate shutdown");

    drop(client);
    drop(db);
    let pid = server.postmaster_pid().expect("the server runs");
    drop(server);
    assert!(!folder.exists(), "{} is removed", folder.display());
    // pg_ctl returns once the pid file is gone, a moment before the process has exited.
    wait_until(Duration::from_secs(5), || async { !process_exists(pid) })
        .await
        .expect("the postmaster exits");
}

/// Set for the child process of [`a_killed_test_binary_leaves_no_process_behind`].
const WATCHDOG_CHILD_VAR: &str = "PGSTREAM_E2E_WATCHDOG_CHILD";

#[tokio::test]
async fn a_killed_test_binary_leaves_no_process_behind() {
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "harness::start_a_server_and_abort",
            "--ignored",
            "--nocapture",
        ])
        .env(WATCHDOG_CHILD_VAR, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut server = None;
    let mut host = None;
    while let Some(line) = lines.next_line().await.unwrap() {
        if let Some(rest) = line.strip_prefix("SERVER ") {
            let (pid, folder) = rest.split_once(' ').unwrap();
            server = Some((
                pid.parse::<u32>().unwrap(),
                std::path::PathBuf::from(folder),
            ));
        } else if let Some(rest) = line.strip_prefix("HOST ") {
            let (pid, log) = rest.split_once(' ').unwrap();
            host = Some((pid.parse::<u32>().unwrap(), std::path::PathBuf::from(log)));
        }
    }
    let status = child.wait().await.unwrap();
    assert!(!status.success(), "the child aborted");
    let (postmaster, folder) = server.expect("the child started a server");
    let (host, host_log) = host.expect("the child started a host process");

    wait_until(Duration::from_secs(20), || async {
        !process_exists(postmaster)
            && !folder.exists()
            && !process_exists(host)
            && !host_log.exists()
    })
    .await
    .expect("the watchdogs stop the postmaster, remove its folder and kill the host");
}

/// Run only by [`a_killed_test_binary_leaves_no_process_behind`], in a child process: starts a
/// server and a long-running process, reports them and dies without running any destructor.
#[tokio::test]
#[ignore = "a helper run in a child process by a_killed_test_binary_leaves_no_process_behind"]
async fn start_a_server_and_abort() {
    if std::env::var_os(WATCHDOG_CHILD_VAR).is_none() {
        return;
    }
    let server = PgServer::shared(PgVersion::Pg15);
    let pid = server.postmaster_pid().unwrap();
    println!("SERVER {pid} {}", server.folder().display());
    let mut command = tokio::process::Command::new("/bin/sh");
    command.args(["-c", "exec sleep 600"]);
    let process = HostProcess::spawn(command).unwrap();
    println!("HOST {} {}", process.pid(), process.log_path().display());
    std::process::abort();
}

/// Whether `pid` is a live process (a zombie waiting to be reaped counts as gone).
fn process_exists(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may contain spaces.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    state != Some('Z')
}

#[test]
fn setup_installed_the_embedding_model() {
    let dir = model_dir();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["hidden_size"], 384,
        "all-MiniLM-L6-v2 embeds into 384 dimensions"
    );
    assert!(dir.join("tokenizer.json").is_file());
    let weights = std::fs::metadata(dir.join("model.safetensors")).unwrap();
    assert!(
        weights.len() > 80_000_000,
        "the weights are the real file, not an LFS pointer"
    );
}

#[tokio::test]
async fn host_process_captures_output_and_can_be_killed() {
    let mut command = tokio::process::Command::new("/bin/sh");
    command.args(["-c", "echo ready; echo 'to stderr' >&2; exec sleep 60"]);
    let mut process = HostProcess::spawn(command).unwrap();
    process
        .wait_for_log("to stderr", Duration::from_secs(10))
        .await
        .unwrap();
    assert!(process.log().contains("ready\n"));
    assert!(process.try_status().unwrap().is_none(), "still running");
    let status = process.kill().await.unwrap();
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL");
}

#[tokio::test]
async fn host_process_terminate_sends_sigterm() {
    let mut command = tokio::process::Command::new("/bin/sh");
    command.args([
        "-c",
        "trap 'echo got TERM; exit 3' TERM; echo waiting; while :; do sleep 0.05; done",
    ]);
    let mut process = HostProcess::spawn(command).unwrap();
    process
        .wait_for_log("waiting", Duration::from_secs(10))
        .await
        .unwrap();
    let status = process.terminate(Duration::from_secs(10)).await.unwrap();
    assert_eq!(status.code(), Some(3));
    assert!(process.log().contains("got TERM"));
}

#[tokio::test]
async fn the_built_host_binary_runs() {
    let mut host = HostProcess::start(["--version"]).unwrap();
    let status = host.wait_timeout(Duration::from_secs(30)).await.unwrap();
    assert!(status.success(), "{}", host.log());
    assert!(host.log().contains("pgstream-host"), "{}", host.log());
}
