//! Integration tests of `pgstream_host::replication` against real Postgres servers started by
//! the tests themselves (binaries from `PGSTREAM_PG_BIN`).
//!
//! Most tests share one cluster (`wal_level=logical`, `wal_sender_timeout=2s` so keepalives and
//! timeouts happen within seconds) and each uses its own database and slot names; tests that
//! need a different server configuration (wal_level=replica, TLS) start their own.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use pgstream_host::lsn::Lsn;
use pgstream_host::replication::{
    PreflightError, ReplicationError, ReplicationStream, SourceConfig, StreamOptions, TableName,
    TeardownReport, WalMessage, preflight, setup, slot_confirmed_flush_lsn, teardown,
};

// ---------------------------------------------------------------------------------------------
// The test Postgres
// ---------------------------------------------------------------------------------------------

/// A throwaway Postgres cluster in a temporary directory, stopped on drop.
struct TestPostgres {
    bin: PathBuf,
    root: PathBuf,
    data: PathBuf,
    port: u16,
}

const NOBODY: u32 = 65534;

impl TestPostgres {
    /// `initdb` + `pg_ctl start` with `settings` appended to postgresql.conf and `hba` as the
    /// whole pg_hba.conf; `prepare` can drop files (certificates) into the data directory
    /// first. `None` (after a loud message) when `PGSTREAM_PG_BIN` is unset.
    fn start(settings: &[(&str, &str)], hba: &str, prepare: impl FnOnce(&Path)) -> Option<Self> {
        let bin = postgres_bin()?;
        let root = tempfile::Builder::new()
            .prefix("pgstream-repl-")
            .tempdir()
            .expect("temp dir")
            .keep();
        let data = root.join("data");
        let port = free_port();
        let cluster = TestPostgres {
            bin,
            root,
            data,
            port,
        };
        if is_root() {
            std::os::unix::fs::chown(&cluster.root, Some(NOBODY), Some(NOBODY)).expect("chown");
        }
        cluster.run(
            "initdb",
            &[
                "-D",
                path_str(&cluster.data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        let mut conf = format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nfsync = off\nmax_connections = 60\n",
            path_str(&cluster.root)
        );
        for (key, value) in settings {
            conf.push_str(&format!("{key} = '{value}'\n"));
        }
        append(&cluster.data.join("postgresql.conf"), &conf);
        std::fs::write(cluster.data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        prepare(&cluster.data);
        if is_root() {
            chown_tree(&cluster.data);
        }
        let log = cluster.root.join("postgres.log");
        cluster.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&cluster.data),
                "-l",
                path_str(&log),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
        Some(cluster)
    }

    /// Runs a Postgres binary as `nobody` when we are root (Postgres refuses to run as root).
    fn command(&self, program: &str) -> Command {
        let binary = self.bin.join(program);
        if is_root() {
            let mut command = Command::new("setpriv");
            command
                .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(binary);
            command
        } else {
            Command::new(binary)
        }
    }

    fn run(&self, program: &str, args: &[&str]) {
        let output = self
            .command(program)
            .args(args)
            .output()
            .expect("run Postgres binary");
        assert!(
            output.status.success(),
            "{program} {args:?} failed: {}{}\nserver log:\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            std::fs::read_to_string(self.root.join("postgres.log")).unwrap_or_default()
        );
    }

    /// A TCP DSN in key=value form.
    fn dsn(&self, user: &str, dbname: &str, extra: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} dbname={dbname} {extra}",
            self.port
        )
    }

    /// A superuser SQL connection over the Unix socket (trust), for test setup.
    async fn admin(&self, dbname: &str) -> tokio_postgres::Client {
        let dsn = format!(
            "host={} port={} user=postgres dbname={dbname}",
            path_str(&self.root),
            self.port
        );
        SourceConfig::from_dsn(&dsn)
            .unwrap()
            .connect_sql()
            .await
            .expect("admin connection")
    }

    /// Creates a fresh database and returns its name.
    async fn create_database(&self, name: &str) -> String {
        let admin = self.admin("postgres").await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        name.to_owned()
    }

    /// Stops the server when this process exits, for the never-dropped shared cluster.
    fn stop_when_process_exits(&self) {
        let pg_ctl = self.bin.join("pg_ctl");
        let stop = if is_root() {
            format!(
                "setpriv --reuid=65534 --regid=65534 --clear-groups {}",
                pg_ctl.display()
            )
        } else {
            pg_ctl.display().to_string()
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop} -D '{data}' -m immediate stop >/dev/null 2>&1; rm -rf '{root}'",
            pid = std::process::id(),
            data = self.data.display(),
            root = self.root.display(),
        );
        // Deliberately not waited for: the watchdog must outlive this process.
        #[allow(clippy::zombie_processes)]
        Command::new("sh")
            .args(["-c", &script])
            .spawn()
            .expect("spawn cleanup watchdog");
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args(["-D", path_str(&self.data), "-m", "immediate", "-w", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

const SHARED_HBA: &str = "\
local all all trust
host all md5_user 127.0.0.1/32 md5
host all scram_user 127.0.0.1/32 scram-sha-256
host all clear_user 127.0.0.1/32 password
host all all 127.0.0.1/32 trust
";

/// `PGSTREAM_PG_BIN`, or `None` after a loud message that the calling test is skipped.
fn postgres_bin() -> Option<PathBuf> {
    let bin = std::env::var_os("PGSTREAM_PG_BIN").map(PathBuf::from);
    if bin.is_none() {
        skip("set PGSTREAM_PG_BIN to a directory with initdb/pg_ctl/postgres");
    }
    bin
}

/// Says loudly that a test cannot run here, and fails it in CI (`CI=true`), where `make setup`
/// installs everything the tests need: a skipped test there would pass without testing.
fn skip(reason: &str) {
    if std::env::var("CI").is_ok_and(|value| value == "true") {
        panic!("CI=true, but this test cannot run: {reason}");
    }
    eprintln!("\n!!!!! SKIPPING Postgres integration test: {reason} !!!!!\n");
}

/// The cluster most tests share, started on first use.
fn shared() -> Option<&'static TestPostgres> {
    postgres_bin()?;
    static SHARED: OnceLock<Option<TestPostgres>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            let cluster = TestPostgres::start(
                &[
                    ("wal_level", "logical"),
                    ("max_wal_senders", "30"),
                    ("max_replication_slots", "30"),
                    ("wal_sender_timeout", "2s"),
                ],
                SHARED_HBA,
                |_| {},
            )?;
            cluster.stop_when_process_exits();
            Some(cluster)
        })
        .as_ref()
}

fn is_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        Command::new("id")
            .arg("-u")
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
            .unwrap_or(false)
    })
}

fn free_port() -> u16 {
    // Ports handed out by the kernel, plus a process-wide counter in case two clusters ask at
    // the same moment and the kernel repeats itself.
    static TAKEN: AtomicU32 = AtomicU32::new(0);
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if TAKEN.swap(u32::from(port), Ordering::SeqCst) != u32::from(port) {
            return port;
        }
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .expect("open");
    file.write_all(text.as_bytes()).expect("append");
}

fn chown_tree(path: &Path) {
    std::os::unix::fs::chown(path, Some(NOBODY), Some(NOBODY)).expect("chown");
    if path.is_dir() {
        for entry in std::fs::read_dir(path).expect("read_dir") {
            chown_tree(&entry.expect("entry").path());
        }
    }
}

fn table(text: &str) -> TableName {
    text.parse().expect("table name")
}

/// Receives chunks until `done` says so, returning every message seen; fails after `limit`.
async fn receive_until(
    stream: &mut ReplicationStream,
    limit: Duration,
    mut done: impl FnMut(&[WalMessage]) -> bool,
) -> Result<Vec<WalMessage>> {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    while !done(&seen) {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(remaining, stream.recv())
            .await
            .with_context(|| format!("timed out; saw {} messages", seen.len()))?
            .context("stream ended")??;
        seen.extend(chunk);
    }
    Ok(seen)
}

fn pgoutput_tags(messages: &[WalMessage]) -> Vec<u8> {
    messages
        .iter()
        .filter_map(|message| match message {
            WalMessage::XLogData { data, .. } => data.first().copied(),
            WalMessage::KeepAlive { .. } => None,
        })
        .collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

fn fast_status() -> StreamOptions {
    StreamOptions {
        status_interval: Duration::from_millis(500),
        channel_capacity: 16,
        ..StreamOptions::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_inserts_and_confirm_advances_the_slot() -> Result<()> {
    let Some(pg) = shared() else { return Ok(()) };
    let db = pg.create_database("stream_insert").await;
    let admin = pg.admin(&db).await;
    admin
        .batch_execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
        .await?;
    let source = SourceConfig::from_dsn(&pg.dsn("postgres", &db, "sslmode=disable"))?;
    let client = source.connect_sql().await?;
    let tables = [table("docs")];
    preflight(&client, &tables).await?;
    let report = setup(&client, "stream_insert_slot", "stream_insert_pub", &tables).await?;
    assert!(report.slot_created && report.publication_created);
    let initial = slot_confirmed_flush_lsn(&client, "stream_insert_slot")
        .await?
        .context("slot")?;

    admin
        .batch_execute("INSERT INTO docs VALUES (1, 'before-start-marker')")
        .await?;
    let mut stream = ReplicationStream::start(
        &source,
        "stream_insert_slot",
        "stream_insert_pub",
        Lsn::ZERO,
        fast_status(),
    )
    .await?;
    let first = receive_until(&mut stream, Duration::from_secs(20), |seen| {
        pgoutput_tags(seen).contains(&b'C')
    })
    .await?;
    assert_eq!(
        pgoutput_tags(&first),
        b"BRIC",
        "begin, relation, insert, commit"
    );
    assert!(first.iter().any(
        |m| matches!(m, WalMessage::XLogData { data, .. } if contains(data, b"before-start-marker"))
    ));

    // A row inserted while streaming arrives live.
    admin
        .batch_execute("INSERT INTO docs VALUES (2, 'live-marker')")
        .await?;
    let live = receive_until(&mut stream, Duration::from_secs(20), |seen| {
        pgoutput_tags(seen).contains(&b'C')
    })
    .await?;
    assert!(
        live.iter().any(
            |m| matches!(m, WalMessage::XLogData { data, .. } if contains(data, b"live-marker"))
        )
    );
    let commit_end = live
        .iter()
        .filter_map(|m| match m {
            WalMessage::XLogData { wal_end, .. } => Some(*wal_end),
            WalMessage::KeepAlive { .. } => None,
        })
        .max()
        .context("no XLogData")?;

    // With wal_sender_timeout=2s an idle walsender sends keepalives about every second.
    let idle = receive_until(&mut stream, Duration::from_secs(10), |seen| {
        seen.iter()
            .any(|m| matches!(m, WalMessage::KeepAlive { .. }))
    })
    .await?;
    assert!(
        idle.iter()
            .any(|m| matches!(m, WalMessage::KeepAlive { wal_end } if *wal_end >= commit_end))
    );

    stream.confirm(commit_end);
    stream.confirm(initial); // never moves backwards
    assert_eq!(stream.confirmed(), commit_end);
    stream.shutdown().await?;

    let confirmed = slot_confirmed_flush_lsn(&client, "stream_insert_slot")
        .await?
        .context("slot")?;
    assert!(
        confirmed > initial,
        "slot did not advance: {confirmed} <= {initial}"
    );
    assert!(
        confirmed >= commit_end,
        "slot at {confirmed}, confirmed {commit_end}"
    );

    // Restarting from the slot does not replay the confirmed transactions.
    admin
        .batch_execute("INSERT INTO docs VALUES (3, 'after-restart-marker')")
        .await?;
    let mut stream = ReplicationStream::start(
        &source,
        "stream_insert_slot",
        "stream_insert_pub",
        Lsn::ZERO,
        fast_status(),
    )
    .await?;
    let replay = receive_until(&mut stream, Duration::from_secs(20), |seen| {
        pgoutput_tags(seen).contains(&b'C')
    })
    .await?;
    let payloads: Vec<&[u8]> = replay
        .iter()
        .filter_map(|m| match m {
            WalMessage::XLogData { data, .. } => Some(&data[..]),
            WalMessage::KeepAlive { .. } => None,
        })
        .collect();
    assert!(
        payloads
            .iter()
            .any(|data| contains(data, b"after-restart-marker"))
    );
    assert!(
        !payloads.iter().any(|data| contains(data, b"live-marker")),
        "confirmed data replayed"
    );
    stream.shutdown().await?;
    teardown(&client, "stream_insert_slot", "stream_insert_pub").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_unwatched_table_lets_the_slot_advance_through_keepalives() -> Result<()> {
    let Some(pg) = shared() else { return Ok(()) };
    let db = pg.create_database("busy_unwatched").await;
    let admin = pg.admin(&db).await;
    admin.batch_execute("CREATE TABLE watched (id int PRIMARY KEY); CREATE TABLE noisy (id serial PRIMARY KEY, pad text)").await?;
    let source = SourceConfig::from_dsn(&pg.dsn("postgres", &db, ""))?;
    let client = source.connect_sql().await?;
    setup(&client, "busy_slot", "busy_pub", &[table("watched")]).await?;
    let initial = slot_confirmed_flush_lsn(&client, "busy_slot")
        .await?
        .context("slot")?;

    let mut stream =
        ReplicationStream::start(&source, "busy_slot", "busy_pub", Lsn::ZERO, fast_status())
            .await?;
    let writer = tokio::spawn(async move {
        for _ in 0..40 {
            admin
                .batch_execute(
                    "INSERT INTO noisy (pad) SELECT repeat('x', 200) FROM generate_series(1, 500)",
                )
                .await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::Ok(())
    });

    // The consumer sees no data for `noisy`, only keepalives; confirming their positions (no
    // transaction is open on our side) must let the server recycle that WAL.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut advanced = None;
    while Instant::now() < deadline {
        let chunk = tokio::time::timeout(Duration::from_secs(5), stream.recv())
            .await?
            .context("stream ended")??;
        for message in chunk {
            match message {
                WalMessage::KeepAlive { wal_end } => stream.confirm(wal_end),
                WalMessage::XLogData { data, .. } => {
                    // pgoutput skips empty transactions, so nothing of `noisy` may show up
                    // except possibly BEGIN/COMMIT pairs on old servers.
                    assert!(
                        matches!(data.first(), Some(b'B' | b'C')),
                        "unexpected data {:?}",
                        data.first()
                    );
                }
            }
        }
        let now = slot_confirmed_flush_lsn(&client, "busy_slot")
            .await?
            .context("slot")?;
        if now.0 > initial.0 + 1024 * 1024 {
            advanced = Some(now);
            break;
        }
    }
    let advanced =
        advanced.context("confirmed_flush_lsn never advanced while the stream was running")?;
    writer.await??;
    stream.shutdown().await?;
    let after = slot_confirmed_flush_lsn(&client, "busy_slot")
        .await?
        .context("slot")?;
    assert!(after >= advanced);
    teardown(&client, "busy_slot", "busy_pub").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_consumer_keeps_the_connection_alive() -> Result<()> {
    let Some(pg) = shared() else { return Ok(()) };
    let db = pg.create_database("stalled").await;
    let admin = pg.admin(&db).await;
    admin
        .batch_execute("CREATE TABLE items (id int PRIMARY KEY, pad text)")
        .await?;
    let source = SourceConfig::from_dsn(&pg.dsn("postgres", &db, ""))?;
    let client = source.connect_sql().await?;
    setup(&client, "stalled_slot", "stalled_pub", &[table("items")]).await?;
    let options = StreamOptions {
        status_interval: Duration::from_millis(500),
        channel_capacity: 1,
        ..StreamOptions::default()
    };
    let mut stream =
        ReplicationStream::start(&source, "stalled_slot", "stalled_pub", Lsn::ZERO, options)
            .await?;

    // Far more WAL than one chunk and the socket buffers hold, then a consumer that sleeps for
    // three times wal_sender_timeout (2 s): only the task's timed status updates keep the
    // walsender from dropping us.
    admin
        .batch_execute(
            "INSERT INTO items SELECT g, repeat('y', 500) FROM generate_series(1, 20000) g",
        )
        .await?;
    tokio::time::sleep(Duration::from_secs(6)).await;

    let mut inserts = 0;
    let messages = receive_until(&mut stream, Duration::from_secs(60), |seen| {
        pgoutput_tags(seen).contains(&b'C')
    })
    .await?;
    inserts += pgoutput_tags(&messages)
        .iter()
        .filter(|tag| **tag == b'I')
        .count();
    assert_eq!(inserts, 20000);
    stream.shutdown().await?;
    teardown(&client, "stalled_slot", "stalled_pub").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_is_idempotent_and_teardown_refuses_an_active_slot() -> Result<()> {
    let Some(pg) = shared() else { return Ok(()) };
    let db = pg.create_database("idempotent").await;
    let admin = pg.admin(&db).await;
    admin
        .batch_execute(
            "CREATE SCHEMA \"My Schema\"; CREATE TABLE \"My Schema\".\"Docs\" (id int PRIMARY KEY); \
             INSERT INTO \"My Schema\".\"Docs\" VALUES (1); CREATE TABLE empty (id int PRIMARY KEY); \
             CREATE TABLE later (id int PRIMARY KEY)",
        )
        .await?;
    let source = SourceConfig::from_dsn(&pg.dsn("postgres", &db, ""))?;
    let client = source.connect_sql().await?;
    let tables = [table("\"My Schema\".\"Docs\""), table("empty")];

    let first = setup(&client, "idem_slot", "idem_pub", &tables).await?;
    assert!(first.slot_created && first.publication_created);
    assert_eq!(
        first.tables_with_rows,
        vec![table("\"My Schema\".\"Docs\"")]
    );

    let again = setup(&client, "idem_slot", "idem_pub", &tables).await?;
    assert!(!again.slot_created && !again.publication_created);
    assert!(again.tables_with_rows.is_empty());

    // A table added to the configuration is added to the existing publication.
    let more = [
        table("\"My Schema\".\"Docs\""),
        table("empty"),
        table("later"),
    ];
    setup(&client, "idem_slot", "idem_pub", &more).await?;
    let published: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_publication_tables WHERE pubname = 'idem_pub'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(published, 3);

    // The replication connection also works over the Unix socket.
    let socket = SourceConfig::from_dsn(&format!(
        "host={} port={} user=postgres dbname={db}",
        path_str(&pg.root),
        pg.port
    ))?;
    let mut stream =
        ReplicationStream::start(&socket, "idem_slot", "idem_pub", Lsn::ZERO, fast_status())
            .await?;
    receive_until(&mut stream, Duration::from_secs(10), |seen| {
        seen.iter()
            .any(|m| matches!(m, WalMessage::KeepAlive { .. }))
    })
    .await?;
    match teardown(&client, "idem_slot", "idem_pub").await {
        Err(error @ ReplicationError::SlotActive { .. }) => {
            assert!(
                error.to_string().contains("pg_terminate_backend"),
                "{error}"
            )
        }
        other => bail!("teardown of an active slot: {other:?}"),
    }
    stream.shutdown().await?;
    // The walsender releases the slot right after the clean shutdown.
    let deadline = Instant::now() + Duration::from_secs(10);
    let dropped = loop {
        match teardown(&client, "idem_slot", "idem_pub").await {
            Ok(report) => break report,
            Err(ReplicationError::SlotActive { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(error) => return Err(error.into()),
        }
    };
    let everything = TeardownReport {
        slot_dropped: true,
        publication_dropped: true,
    };
    assert_eq!(dropped, everything);
    // Again: there is nothing left, and the report says so.
    let nothing = TeardownReport {
        slot_dropped: false,
        publication_dropped: false,
    };
    assert_eq!(teardown(&client, "idem_slot", "idem_pub").await?, nothing);
    assert_eq!(slot_confirmed_flush_lsn(&client, "idem_slot").await?, None);
    let publications: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_publication WHERE pubname = 'idem_pub'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(publications, 0);
    Ok(())
}

/// The tables `publication` covers, by name.
async fn published_tables(
    client: &tokio_postgres::Client,
    publication: &str,
) -> Result<Vec<String>> {
    Ok(client
        .query(
            "SELECT tablename::text FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1",
            &[&publication],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect())
}

async fn publication_exists(client: &tokio_postgres::Client, publication: &str) -> Result<bool> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)",
            &[&publication],
        )
        .await?
        .get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_refuses_unusable_names_before_creating_anything() -> Result<()> {
    let Some(pg) = shared() else { return Ok(()) };
    let db = pg.create_database("bad_names").await;
    let admin = pg.admin(&db).await;
    admin
        .batch_execute("CREATE TABLE docs (id int PRIMARY KEY)")
        .await?;
    let too_long = "a".repeat(64);
    for (slot, publication) in [
        ("My-Pipeline", "bad_names_pub"),
        ("", "bad_names_pub"),
        (too_long.as_str(), "bad_names_pub"),
        ("bad_names_slot", too_long.as_str()),
        ("bad_names_slot", ""),
    ] {
        let error = setup(&admin, slot, publication, &[table("docs")])
            .await
            .err()
            .with_context(|| {
                format!("setup accepted slot {slot:?}, publication {publication:?}")
            })?;
        assert!(
            matches!(error, ReplicationError::InvalidName(_)),
            "{slot:?}/{publication:?}: {error:?}"
        );
        // (Postgres refuses to even look up a name longer than it keeps.)
        if (1..=63).contains(&publication.len()) {
            assert!(
                !publication_exists(&admin, publication).await?,
                "setup with slot {slot:?} left publication {publication:?} behind"
            );
        }
        let error = teardown(&admin, slot, publication).await.err();
        assert!(
            matches!(error, Some(ReplicationError::InvalidName(_))),
            "teardown: {error:?}"
        );
    }
    let error = setup(&admin, "My-Pipeline", "bad_names_pub", &[table("docs")])
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("lower-case") && error.contains("\"my_pipeline\""),
        "{error}"
    );
    // The longest names Postgres keeps are fine.
    let longest = "b".repeat(63);
    let report = setup(&admin, &longest, &longest, &[table("docs")]).await?;
    assert!(report.slot_created && report.publication_created);
    assert!(teardown(&admin, &longest, &longest).await?.slot_dropped);
    Ok(())
}

/// A role that owns its tables and may create publications, but lacks REPLICATION: creating
/// the slot, the last step of setup, fails. Setup must take back what it did before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_that_cannot_create_the_slot_leaves_nothing_behind() -> Result<()> {
    let Some(pg) = shared() else { return Ok(()) };
    let db = pg.create_database("setup_undo").await;
    let admin = pg.admin(&db).await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE undo_owner LOGIN NOREPLICATION; \
             GRANT CREATE ON DATABASE {db} TO undo_owner; \
             GRANT CREATE ON SCHEMA public TO undo_owner"
        ))
        .await?;
    let owner = SourceConfig::from_dsn(&pg.dsn("undo_owner", &db, ""))?
        .connect_sql()
        .await?;
    owner
        .batch_execute(
            "CREATE TABLE docs (id int PRIMARY KEY); CREATE TABLE later (id int PRIMARY KEY)",
        )
        .await?;

    // A new publication is dropped again.
    let error = setup(&owner, "undo_slot", "undo_pub", &[table("docs")])
        .await
        .err()
        .context("setup created a slot without REPLICATION")?;
    assert!(error.server_error().is_some(), "{error:?}");
    assert!(!publication_exists(&admin, "undo_pub").await?);

    // An existing publication gets back the tables it had.
    owner
        .batch_execute("CREATE PUBLICATION undo_pub FOR TABLE docs")
        .await?;
    setup(
        &owner,
        "undo_slot",
        "undo_pub",
        &[table("docs"), table("later")],
    )
    .await
    .err()
    .context("setup created a slot without REPLICATION")?;
    assert!(publication_exists(&admin, "undo_pub").await?);
    assert_eq!(published_tables(&admin, "undo_pub").await?, ["docs"]);
    let slots: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'undo_slot'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(slots, 0);
    Ok(())
}

/// `sslmode=require` and stricter against a server without TLS say that the server does not
/// do TLS, on the SQL connection (tokio-postgres) as on the replication connection (ours).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_tls_is_named_as_such() -> Result<()> {
    let Some(pg) = shared() else { return Ok(()) };
    for mode in ["require", "verify-ca", "verify-full"] {
        let source =
            SourceConfig::from_dsn(&pg.dsn("postgres", "postgres", &format!("sslmode={mode}")))?;
        let sql = source
            .connect_sql()
            .await
            .err()
            .with_context(|| format!("sslmode={mode}: SQL connected without TLS"))?;
        let stream = ReplicationStream::start(
            &source,
            "no_tls_slot",
            "no_tls_pub",
            Lsn::ZERO,
            fast_status(),
        )
        .await
        .err()
        .with_context(|| format!("sslmode={mode}: stream started without TLS"))?;
        for error in [sql, stream] {
            assert!(
                matches!(error, ReplicationError::TlsRefused { .. }),
                "sslmode={mode}: {error:?}"
            );
            assert!(
                error.to_string().contains("does not accept TLS"),
                "sslmode={mode}: {error}"
            );
            assert!(!error.is_retryable(), "sslmode={mode}");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_explains_missing_privilege_primary_key_and_table() -> Result<()> {
    let Some(pg) = shared() else { return Ok(()) };
    let db = pg.create_database("preflight_checks").await;
    let admin = pg.admin(&db).await;
    admin
        .batch_execute(
            "CREATE ROLE plain_user LOGIN; CREATE TABLE keyed (id int PRIMARY KEY); \
             CREATE TABLE keyless (body text); GRANT SELECT ON keyed, keyless TO plain_user",
        )
        .await?;

    let plain = SourceConfig::from_dsn(&pg.dsn("plain_user", &db, ""))?
        .connect_sql()
        .await?;
    match preflight(&plain, &[table("keyed")]).await {
        Err(error @ PreflightError::MissingReplicationRole { .. }) => {
            assert!(
                error
                    .to_string()
                    .contains("ALTER ROLE \"plain_user\" REPLICATION"),
                "{error}"
            )
        }
        other => bail!("expected MissingReplicationRole, got {other:?}"),
    }

    let superuser = pg.admin(&db).await;
    preflight(&superuser, &[table("keyed")]).await?;
    match preflight(&superuser, &[table("keyed"), table("keyless")]).await {
        Err(error @ PreflightError::NoReplicaIdentity { .. }) => {
            assert!(
                error.to_string().contains("REPLICA IDENTITY FULL"),
                "{error}"
            )
        }
        other => bail!("expected NoReplicaIdentity, got {other:?}"),
    }
    admin
        .batch_execute("ALTER TABLE keyless REPLICA IDENTITY FULL")
        .await?;
    preflight(&superuser, &[table("keyed"), table("keyless")]).await?;
    match preflight(&superuser, &[table("other.missing")]).await {
        Err(PreflightError::TableMissing { table: missing }) => {
            assert_eq!(missing, table("other.missing"))
        }
        other => bail!("expected TableMissing, got {other:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_authentication_cleartext_md5_and_scram() -> Result<()> {
    let Some(pg) = shared() else { return Ok(()) };
    let db = pg.create_database("auth_methods").await;
    let admin = pg.admin(&db).await;
    admin
        .batch_execute(
            "SET password_encryption = 'md5'; \
             CREATE ROLE md5_user LOGIN REPLICATION PASSWORD 'md5 secret'; \
             SET password_encryption = 'scram-sha-256'; \
             CREATE ROLE scram_user LOGIN REPLICATION PASSWORD 'scram secret'; \
             CREATE ROLE clear_user LOGIN REPLICATION PASSWORD 'clear secret'; \
             CREATE TABLE t (id int PRIMARY KEY)",
        )
        .await?;
    let stored: String = admin
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = 'md5_user'",
            &[],
        )
        .await?
        .get(0);
    ensure!(
        stored.starts_with("md5"),
        "md5 password was stored as {stored}"
    );
    setup(&admin, "auth_slot", "auth_pub", &[table("t")]).await?;

    for (user, password) in [
        ("md5_user", "md5 secret"),
        ("scram_user", "scram secret"),
        ("clear_user", "clear secret"),
    ] {
        // Right password: both connection kinds work, and the stream starts.
        let url = format!(
            "postgres://{user}:{}@127.0.0.1:{}/{db}?sslmode=disable",
            password.replace(' ', "%20"),
            pg.port
        );
        let source = SourceConfig::from_dsn(&url)?;
        let client = source.connect_sql().await?;
        let me: String = client
            .query_one("SELECT current_user::text", &[])
            .await?
            .get(0);
        assert_eq!(me, user);
        let stream =
            ReplicationStream::start(&source, "auth_slot", "auth_pub", Lsn::ZERO, fast_status())
                .await?;
        stream.shutdown().await?;
        wait_until_slot_released(&admin, "auth_slot").await?;

        // Wrong password: a non-retryable error naming user and server, never the password.
        let wrong =
            SourceConfig::from_dsn(&pg.dsn(user, &db, "password='not-it-42' sslmode=disable"))?;
        for error in [
            ReplicationStream::start(&wrong, "auth_slot", "auth_pub", Lsn::ZERO, fast_status())
                .await
                .err()
                .context("replication login with a wrong password succeeded")?,
            wrong
                .connect_sql()
                .await
                .err()
                .context("SQL login with a wrong password succeeded")?,
        ] {
            assert!(matches!(error, ReplicationError::Auth { .. }), "{error:?}");
            let text = error.to_string();
            assert!(
                text.contains(user) && text.contains(&format!("127.0.0.1:{}", pg.port)),
                "{text}"
            );
            assert!(!text.contains("not-it-42"), "{text}");
            assert!(!error.is_retryable());
        }

        // No password at all.
        let missing = SourceConfig::from_dsn(&pg.dsn(user, &db, "sslmode=disable"))?;
        let error =
            ReplicationStream::start(&missing, "auth_slot", "auth_pub", Lsn::ZERO, fast_status())
                .await
                .err()
                .context("login without password succeeded")?;
        assert!(matches!(error, ReplicationError::Auth { .. }), "{error:?}");
    }

    // A missing slot is a server error that retrying cannot fix.
    let trust = SourceConfig::from_dsn(&pg.dsn("postgres", &db, ""))?;
    let error =
        ReplicationStream::start(&trust, "no_such_slot", "auth_pub", Lsn::ZERO, fast_status())
            .await
            .err()
            .context("started a missing slot")?;
    assert_eq!(
        error.server_error().map(|e| e.code),
        Some("42704".to_owned()),
        "{error}"
    );
    assert!(!error.is_retryable());

    // Nobody listening: retryable, names the address.
    let closed_port = free_port();
    let nowhere = SourceConfig::from_dsn(&format!(
        "host=127.0.0.1 port={closed_port} user=u password=hunter2"
    ))?;
    let error = ReplicationStream::start(&nowhere, "s", "p", Lsn::ZERO, fast_status())
        .await
        .err()
        .context("connected to nothing")?;
    assert!(
        matches!(error, ReplicationError::Connect { .. }),
        "{error:?}"
    );
    assert!(
        error
            .to_string()
            .contains(&format!("127.0.0.1:{closed_port}"))
    );
    assert!(error.is_retryable());
    let error = nowhere
        .connect_sql()
        .await
        .err()
        .context("SQL connected to nothing")?;
    assert!(error.is_retryable(), "{error:?}");
    assert!(!format!("{error} {error:?}").contains("hunter2"));

    teardown(&admin, "auth_slot", "auth_pub").await?;
    Ok(())
}

async fn wait_until_slot_released(client: &tokio_postgres::Client, slot: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let active: bool = client
            .query_one(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await?
            .get(0);
        if !active {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("slot {slot} still active")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_rejects_wal_level_replica() -> Result<()> {
    let Some(pg) = TestPostgres::start(
        &[("wal_level", "replica")],
        "local all all trust\nhost all all 127.0.0.1/32 trust\n",
        |_| {},
    ) else {
        return Ok(());
    };
    let client = SourceConfig::from_dsn(&pg.dsn("postgres", "postgres", ""))?
        .connect_sql()
        .await?;
    match preflight(&client, &[]).await {
        Err(error @ PreflightError::WalLevel { .. }) => {
            let text = error.to_string();
            assert!(
                text.contains("\"replica\"")
                    && text.contains("ALTER SYSTEM SET wal_level = logical"),
                "{text}"
            );
        }
        other => bail!("expected WalLevel, got {other:?}"),
    }
    Ok(())
}

/// Writes a CA and a server certificate for `localhost` (DNS name only) signed by it.
fn make_certificates(dir: &Path) -> Result<()> {
    let run = |args: &[&str]| -> Result<()> {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()?;
        ensure!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=pgstream test CA",
    ])?;
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ])?;
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName = DNS:localhost\nbasicConstraints = CA:FALSE\n",
    )?;
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ])?;
    std::fs::set_permissions(
        dir.join("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_modes_and_scram_channel_binding() -> Result<()> {
    if Command::new("openssl")
        .arg("version")
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        skip("the TLS test makes its certificates with the openssl command, which is missing");
        return Ok(());
    }
    let Some(bin) = postgres_bin() else {
        return Ok(());
    };
    let configure = Command::new(bin.join("pg_config"))
        .arg("--configure")
        .output()?;
    if !String::from_utf8_lossy(&configure.stdout).contains("ssl") {
        skip(&format!(
            "the Postgres in {} was built without SSL, so the TLS test cannot run (Debian's \
             build in /usr/lib/postgresql/15/bin has it)",
            bin.display()
        ));
        return Ok(());
    }
    let certs = tempfile::tempdir()?;
    make_certificates(certs.path())?;
    let hba = "local all all trust\nhostssl all scram_user 127.0.0.1/32 scram-sha-256\nhostssl all all 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 reject\n";
    let cert_dir = certs.path().to_owned();
    let Some(pg) = TestPostgres::start(
        &[
            ("wal_level", "logical"),
            ("ssl", "on"),
            ("ssl_cert_file", "server.crt"),
            ("ssl_key_file", "server.key"),
            ("wal_sender_timeout", "2s"),
        ],
        hba,
        |data| {
            for file in ["server.crt", "server.key"] {
                std::fs::copy(cert_dir.join(file), data.join(file)).expect("copy certificate");
            }
        },
    ) else {
        return Ok(());
    };
    let admin = pg.admin("postgres").await;
    admin
        .batch_execute("CREATE ROLE scram_user LOGIN REPLICATION PASSWORD 'tls secret'; CREATE TABLE t (id int PRIMARY KEY)")
        .await?;
    setup(&admin, "tls_slot", "tls_pub", &[table("t")]).await?;
    let ca = certs.path().join("ca.crt");
    let ca = ca.to_str().context("path")?;

    // Plain text is refused by pg_hba (hostssl only), so success below means TLS was used;
    // pg_stat_ssl confirms it for the walsender too.
    let plain = SourceConfig::from_dsn(&pg.dsn("postgres", "postgres", "sslmode=disable"))?;
    assert!(plain.connect_sql().await.is_err());
    assert!(
        ReplicationStream::start(&plain, "tls_slot", "tls_pub", Lsn::ZERO, fast_status())
            .await
            .is_err()
    );

    let cases = [
        (
            format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=require",
                pg.port
            ),
            true,
        ),
        (
            format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=prefer",
                pg.port
            ),
            true,
        ),
        (
            format!(
                "host=localhost port={} user=postgres dbname=postgres sslmode=verify-full sslrootcert={ca}",
                pg.port
            ),
            true,
        ),
        // verify-ca ignores the name: the certificate does not name 127.0.0.1.
        (
            format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=verify-ca sslrootcert={ca}",
                pg.port
            ),
            true,
        ),
        (
            format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=verify-full sslrootcert={ca}",
                pg.port
            ),
            false,
        ),
        // Public roots do not trust our test CA.
        (
            format!(
                "host=localhost port={} user=postgres dbname=postgres sslmode=verify-full",
                pg.port
            ),
            false,
        ),
        // SCRAM with channel binding (require fails unless SCRAM-SHA-256-PLUS was used).
        (
            format!(
                "postgres://scram_user:tls%20secret@localhost:{}/postgres?sslmode=verify-full&sslrootcert={ca}&channel_binding=require",
                pg.port
            ),
            true,
        ),
        (
            format!(
                "host=127.0.0.1 port={} user=scram_user password='tls secret' dbname=postgres sslmode=require channel_binding=disable",
                pg.port
            ),
            true,
        ),
    ];
    for (dsn, should_work) in cases {
        let source = SourceConfig::from_dsn(&dsn)?;
        let sql = source.connect_sql().await;
        let stream =
            ReplicationStream::start(&source, "tls_slot", "tls_pub", Lsn::ZERO, fast_status())
                .await;
        if !should_work {
            let sql_error = sql.err().with_context(|| format!("SQL connected: {dsn}"))?;
            let stream_error = stream
                .err()
                .with_context(|| format!("stream connected: {dsn}"))?;
            assert!(
                matches!(stream_error, ReplicationError::Tls { .. }),
                "{dsn}: {stream_error:?}"
            );
            assert!(
                matches!(sql_error, ReplicationError::Tls { .. }),
                "{dsn}: {sql_error:?}"
            );
            assert!(
                !stream_error.is_retryable() && !sql_error.is_retryable(),
                "{dsn}"
            );
            continue;
        }
        let client = sql.with_context(|| format!("SQL connect: {dsn}"))?;
        let ssl: bool = client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await?
            .get(0);
        assert!(ssl, "{dsn}");
        let stream = stream.with_context(|| format!("stream start: {dsn}"))?;
        let walsender_ssl: bool = admin
            .query_one(
                "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_replication_slots r ON r.active_pid = s.pid WHERE r.slot_name = 'tls_slot'",
                &[],
            )
            .await?
            .get(0);
        assert!(walsender_ssl, "{dsn}");
        stream.shutdown().await?;
        wait_until_slot_released(&admin, "tls_slot").await?;
    }
    Ok(())
}

/// Throughput of the stream alone (no decoding): run with `--ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, prints numbers"]
async fn measure_stream_throughput() -> Result<()> {
    let Some(pg) = shared() else { return Ok(()) };
    let db = pg.create_database("throughput").await;
    let admin = pg.admin(&db).await;
    admin
        .batch_execute("CREATE TABLE rows (id int PRIMARY KEY, body text)")
        .await?;
    let source = SourceConfig::from_dsn(&pg.dsn("postgres", &db, ""))?;
    setup(
        &admin,
        "throughput_slot",
        "throughput_pub",
        &[table("rows")],
    )
    .await?;
    const ROWS: usize = 500_000;
    admin
        .batch_execute(&format!(
            "INSERT INTO rows SELECT g, md5(g::text) || md5((g + 1)::text) FROM generate_series(1, {ROWS}) g"
        ))
        .await?;
    let started = Instant::now();
    let mut stream = ReplicationStream::start(
        &source,
        "throughput_slot",
        "throughput_pub",
        Lsn::ZERO,
        StreamOptions::default(),
    )
    .await?;
    let (mut inserts, mut bytes, mut chunks) = (0usize, 0usize, 0usize);
    while inserts < ROWS {
        let chunk = tokio::time::timeout(Duration::from_secs(60), stream.recv())
            .await?
            .context("stream ended")??;
        chunks += 1;
        for message in &chunk {
            if let WalMessage::XLogData { data, .. } = message {
                bytes += data.len();
                inserts += usize::from(data.first() == Some(&b'I'));
            }
        }
    }
    let elapsed = started.elapsed();
    eprintln!(
        "streamed {inserts} inserts, {:.1} MB of pgoutput in {chunks} chunks in {elapsed:?}: {:.0} msgs/s, {:.1} MB/s",
        bytes as f64 / 1e6,
        inserts as f64 / elapsed.as_secs_f64(),
        bytes as f64 / 1e6 / elapsed.as_secs_f64()
    );
    assert_eq!(inserts, ROWS);
    stream.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_connections_carry_the_statement_timeout_and_keep_dsn_options() -> Result<()> {
    let Some(pg) = shared() else { return Ok(()) };
    let db = pg.create_database("pool").await;
    let source = SourceConfig::from_dsn(&pg.dsn("postgres", &db, "options='-c work_mem=7MB'"))?;
    let pool = source.pool(2, Duration::from_millis(1500))?;
    let client = pool.get().await?;
    let timeout: String = client
        .query_one("SHOW statement_timeout", &[])
        .await?
        .get(0);
    assert_eq!(timeout, "1500ms");
    let work_mem: String = client.query_one("SHOW work_mem", &[]).await?.get(0);
    assert_eq!(work_mem, "7MB", "options from the DSN are kept");
    let slow = client.execute("SELECT pg_sleep(5)", &[]).await;
    let error = slow.expect_err("the statement timeout stops a stuck write");
    assert_eq!(
        error.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED)
    );
    Ok(())
}
