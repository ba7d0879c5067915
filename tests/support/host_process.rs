//! Runs the real `pgstream-host` binary as a child process, the way a user would.
//!
//! Its stdout and stderr go, interleaved as written, to one log file in a temporary folder, so a
//! test can wait for a line to appear, and a failing test shows what the host said. A test can
//! stop it politely (SIGTERM, SIGINT) or kill it outright (SIGKILL) to check what survives a
//! crash. Should the test binary die first, a [`Watchdog`] kills the host.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rustix::process::{Pid, Signal};
use tempfile::TempDir;
use tokio::process::{Child, Command};

use crate::artifacts::host_binary;
use crate::watchdog::{KILL_PROCESS, Watchdog};

/// How much of the end of the host log a failing test prints.
const LOG_TAIL_BYTES: usize = 64 * 1024;

/// A running (or finished) `pgstream-host` process.
///
/// Dropping it kills the process if it still runs; when dropped during a panic it prints the
/// host's log first.
pub struct HostProcess {
    child: Child,
    pid: u32,
    folder: TempDir,
    status: Option<ExitStatus>,
    /// Disarmed as soon as the process has been reaped.
    watchdog: Option<Watchdog>,
}

impl HostProcess {
    /// A command for the host binary built for these tests (see [`host_binary`]), with
    /// `RUST_LOG=info` unless the caller's environment sets it. Add arguments and variables,
    /// then hand it to [`spawn`](Self::spawn).
    pub fn command() -> Command {
        let mut command = Command::new(host_binary());
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        command
    }

    /// Starts the host binary with `args`.
    pub fn start<I, S>(args: I) -> Result<HostProcess>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = Self::command();
        command.args(args);
        Self::spawn(command)
    }

    /// Starts `command` (normally from [`command`](Self::command)) with its output captured.
    /// It is killed if the test drops it while it runs.
    pub fn spawn(mut command: Command) -> Result<HostProcess> {
        let folder = tempfile::Builder::new()
            .prefix("pgstream-host-")
            .tempdir()
            .context("creating the host log folder")?;
        let log = std::fs::File::create(folder.path().join("host.log"))
            .context("creating the host log")?;
        let log_for_stderr = log.try_clone().context("sharing the host log")?;
        command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_for_stderr)
            .kill_on_drop(true);
        let child = command
            .spawn()
            .with_context(|| format!("starting {:?}", command.as_std().get_program()))?;
        let pid = child.id().context("a just-started child has a pid")?;
        let watchdog = Watchdog::spawn(
            KILL_PROCESS,
            &[pid.to_string().as_ref(), folder.path().as_os_str()],
        )?;
        Ok(HostProcess {
            child,
            pid,
            folder,
            status: None,
            watchdog: Some(watchdog),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The path of the file the host's stdout and stderr go to.
    pub fn log_path(&self) -> PathBuf {
        self.folder.path().join("host.log")
    }

    /// Everything the host printed so far, stdout and stderr interleaved.
    pub fn log(&self) -> String {
        read_lossy(&self.log_path())
    }

    /// Waits until the host's output contains `needle`; fails early if the host exits first.
    pub async fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.try_status()? {
                bail!(
                    "the host exited ({status}) before printing {needle:?}; its log:\n{}",
                    self.log()
                );
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "the host did not print {needle:?} within {timeout:?}; its log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The exit status if the host has exited, without waiting.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none()
            && let Some(status) = self.child.try_wait().context("polling the host")?
        {
            self.exited(status);
        }
        Ok(self.status)
    }

    /// Records that the process was reaped; its pid may be reused from now on.
    fn exited(&mut self, status: ExitStatus) {
        self.status = Some(status);
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.disarm();
        }
    }

    /// Waits for the host to exit by itself, failing after `timeout` (the host keeps running
    /// then; drop or [`kill`](Self::kill) it).
    pub async fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => {
                let status = status.context("waiting for the host")?;
                self.exited(status);
                Ok(status)
            }
            Err(_) => bail!(
                "the host did not exit within {timeout:?}; its log:\n{}",
                self.log()
            ),
        }
    }

    /// Sends SIGTERM (a polite shutdown request) and waits up to `timeout` for the exit.
    pub async fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.signal(Signal::TERM)?;
        self.wait_timeout(timeout).await
    }

    /// Sends SIGINT (as Ctrl-C would) and waits up to `timeout` for the exit.
    pub async fn interrupt(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.signal(Signal::INT)?;
        self.wait_timeout(timeout).await
    }

    /// Sends SIGHUP: the host reloads its plugin (or, under `serve`, its config file).
    pub fn hang_up(&mut self) -> Result<()> {
        self.signal(Signal::HUP)
    }

    /// Sends SIGTERM without waiting for the exit.
    pub fn send_terminate(&mut self) -> Result<()> {
        self.signal(Signal::TERM)
    }

    /// Kills the host with SIGKILL, as a crash or an OOM kill would: it gets no chance to
    /// flush or acknowledge anything. Returns once the process is gone.
    pub async fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        self.child.start_kill().context("killing the host")?;
        self.wait_timeout(Duration::from_secs(10)).await
    }

    fn signal(&mut self, signal: Signal) -> Result<()> {
        if let Some(status) = self.try_status()? {
            bail!(
                "the host already exited ({status}); its log:\n{}",
                self.log()
            );
        }
        let raw = i32::try_from(self.pid).context("pid fits an i32")?;
        let pid = Pid::from_raw(raw).context("a child's pid is positive")?;
        rustix::process::kill_process(pid, signal).context("signalling the host")
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let start = log.len().saturating_sub(LOG_TAIL_BYTES);
            // Start printing at a character boundary at or after `start`.
            let start = (start..=log.len())
                .find(|&index| log.is_char_boundary(index))
                .unwrap_or(log.len());
            eprintln!(
                "---- pgstream-host log ({}) ----\n{}\n---- end of host log ----",
                self.log_path().display(),
                &log[start..]
            );
        }
        if self.status.is_none() {
            // kill_on_drop would send SIGKILL too, but only after this body: the signal must be
            // on its way before the watchdog is disarmed.
            let _ = self.child.start_kill();
        }
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.disarm();
        }
    }
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}
