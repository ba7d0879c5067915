//! One pipeline under test: the host's arguments for a test database, its watched tables and
//! a plugin, and the ways the tests run the host with them (setup, a run up to the current
//! WAL position, a long-running process to stop or kill).
//!
//! Every test file used to assemble these arguments and runs by hand; they differ only in the
//! sink, the embedder and a few flags, which [`TestPipeline::with_args`] adds.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use tokio::process::Command;

use crate::{HostProcess, TestDb, model_dir, plugin_path, workspace_root};

/// How long one host run may take: the first run of a plugin compiles it, and CI machines are
/// slow.
pub const HOST_RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// The host's arguments for one pipeline on a [`TestDb`], and runs of the host with them.
#[derive(Clone)]
pub struct TestPipeline<'a> {
    db: &'a TestDb,
    plugin: PathBuf,
    slot: String,
    args: Vec<String>,
    env: Vec<(OsString, Option<OsString>)>,
}

impl<'a> TestPipeline<'a> {
    /// A pipeline on `tables` (comma-separated) of `db`, handled by the built plugin named
    /// `plugin`. The pipeline and its slot are named after the database, compiled plugins are
    /// cached where every test shares them, the local model is the embedder, batches wait
    /// 20 ms and progress is logged every second. The sink is the host's default (pgvector)
    /// unless [`with_args`](Self::with_args) names another.
    pub fn new(db: &'a TestDb, tables: &str, plugin: &str) -> TestPipeline<'a> {
        let plugin_cache = workspace_root().join("target/plugin-cache");
        let args = [
            "--dsn",
            db.dsn(),
            "--table",
            tables,
            "--name",
            &db.unique_name("pipe"),
            "--cache-dir",
            &plugin_cache.display().to_string(),
            "--model-dir",
            &model_dir().display().to_string(),
            "--batch-wait-ms",
            "20",
            "--progress-secs",
            "1",
        ]
        .iter()
        .map(|arg| arg.to_string())
        .collect();
        TestPipeline {
            db,
            plugin: plugin_path(plugin),
            slot: db.unique_name("slot"),
            args,
            env: Vec::new(),
        }
    }

    /// Adds host arguments, which must not repeat one the pipeline has (the host refuses a
    /// flag given twice); [`with_slot`](Self::with_slot) and
    /// [`with_plugin_file`](Self::with_plugin_file) replace those two.
    pub fn with_args<S: AsRef<str>>(mut self, args: &[S]) -> Self {
        self.args
            .extend(args.iter().map(|arg| arg.as_ref().to_owned()));
        self
    }

    /// Runs the component at `path` instead of a built plugin.
    pub fn with_plugin_file(mut self, path: &Path) -> Self {
        path.clone_into(&mut self.plugin);
        self
    }

    /// Reads from replication slot `slot` instead of `slot_<database>`.
    pub fn with_slot(mut self, slot: &str) -> Self {
        slot.clone_into(&mut self.slot);
        self
    }

    /// Sets an environment variable for every run of the host.
    pub fn with_env(mut self, name: &str, value: impl Into<OsString>) -> Self {
        self.env.push((name.into(), Some(value.into())));
        self
    }

    /// Removes an environment variable from every run of the host.
    pub fn without_env(mut self, name: &str) -> Self {
        self.env.push((name.into(), None));
        self
    }

    /// `pgstream-host [subcommand] <args> [extra]` with the pipeline's environment.
    pub fn command(&self, subcommand: Option<&str>, extra: &[&str]) -> Command {
        let mut command = HostProcess::command();
        command
            .args(subcommand)
            .args(&self.args)
            .arg("--plugin")
            .arg(&self.plugin)
            .args(["--slot", &self.slot])
            .args(extra);
        for (name, value) in &self.env {
            match value {
                Some(value) => command.env(name, value),
                None => command.env_remove(name),
            };
        }
        command
    }

    /// Starts `pgstream-host run`, to be stopped by the test.
    pub fn start(&self) -> HostProcess {
        HostProcess::spawn(self.command(None, &[])).expect("start the host")
    }

    /// Starts `pgstream-host run` and waits until it streams: from then on, changes reach
    /// the handler.
    pub async fn start_streaming(&self) -> HostProcess {
        let mut host = self.start();
        host.wait_for_log("streaming", HOST_RUN_TIMEOUT)
            .await
            .expect("the host starts streaming");
        host
    }

    /// Runs `pgstream-host setup` (from then on changes are kept for the slot) and asserts
    /// it exited 0.
    pub async fn setup(&self) {
        self.run_to_exit(Some("setup"), &[]).await;
    }

    /// Runs the host with `--stop-at-lsn` at the current WAL position and returns it exited,
    /// successfully or not.
    pub async fn run_to_current_lsn(&self) -> HostProcess {
        let lsn = self.db.current_lsn().await;
        let mut host = HostProcess::spawn(self.command(None, &["--stop-at-lsn", &lsn]))
            .expect("start the host");
        host.wait_timeout(HOST_RUN_TIMEOUT)
            .await
            .expect("the host exits");
        host
    }

    /// Runs the host up to the current WAL position, asserts it exited 0 and returns its log.
    pub async fn catch_up(&self) -> String {
        let mut host = self.run_to_current_lsn().await;
        let status = exit_status(&mut host);
        assert!(status.success(), "host failed ({status}):\n{}", host.log());
        host.log()
    }

    /// Runs `pgstream-host <subcommand> <args> [extra]` to its exit, asserts it exited 0 and
    /// returns its log.
    pub async fn run_to_exit(&self, subcommand: Option<&str>, extra: &[&str]) -> String {
        let mut host = HostProcess::spawn(self.command(subcommand, extra)).expect("start the host");
        let status = host
            .wait_timeout(HOST_RUN_TIMEOUT)
            .await
            .expect("the host exits");
        let name = subcommand.unwrap_or("run");
        assert!(
            status.success(),
            "host {name} failed ({status}):\n{}",
            host.log()
        );
        host.log()
    }

    /// The position the pipeline's slot has confirmed, in bytes.
    pub async fn confirmed_flush_lsn(&self) -> u64 {
        self.db.confirmed_flush_lsn(&self.slot).await
    }
}

fn exit_status(host: &mut HostProcess) -> ExitStatus {
    host.try_status()
        .expect("polling the host")
        .expect("the host exited")
}
