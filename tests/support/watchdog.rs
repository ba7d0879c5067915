//! Cleanup that happens even when the test binary dies without running destructors.
//!
//! Statics are never dropped, and a test binary can abort or be killed. A [`Watchdog`] is a small
//! shell process holding the read end of a pipe whose write end only this process has (std opens
//! pipes close-on-exec, so no other child inherits it). When this process goes away for any
//! reason, the watchdog reads end of file and runs its cleanup. When the owner cleaned up itself,
//! [`Watchdog::disarm`] tells it so and it exits doing nothing.

use std::io::Write as _;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};

/// Stops the postmaster of the server folder `$1` (immediate shutdown, then SIGKILL after ten
/// seconds) and removes the folder.
pub(crate) const STOP_SERVER: &str = r#"
pidfile="$1/data/postmaster.pid"
if [ -f "$pidfile" ]; then
    pid=$(head -n 1 "$pidfile")
    if kill -QUIT "$pid" 2>/dev/null; then
        tries=0
        while kill -0 "$pid" 2>/dev/null && [ "$tries" -lt 100 ]; do
            sleep 0.1
            tries=$((tries + 1))
        done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    fi
fi
rm -rf "$1"
"#;

/// Kills process `$1` with SIGKILL and removes its log folder `$2`.
pub(crate) const KILL_PROCESS: &str = r#"
kill -KILL "$1" 2>/dev/null
rm -rf "$2"
"#;

/// A process that runs a cleanup script once this process is gone, unless disarmed.
pub(crate) struct Watchdog {
    child: Child,
}

impl Watchdog {
    /// Starts a watchdog that will run `cleanup` (a `sh` script) with `args` as `$1`, `$2`, ...
    ///
    /// It sits in a process group of its own, so a Ctrl-C aimed at the tests does not kill it
    /// before it has cleaned up.
    pub(crate) fn spawn(cleanup: &str, args: &[&std::ffi::OsStr]) -> Result<Watchdog> {
        let script = format!(
            "trap '' INT HUP\n\
             if read -r message && [ \"$message\" = disarm ]; then exit 0; fi\n\
             {cleanup}"
        );
        let child = Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .arg("pgstream-e2e-watchdog")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("starting a watchdog process")?;
        Ok(Watchdog { child })
    }

    /// Tells the watchdog its cleanup was done already and waits for it to exit. Must be called
    /// once whatever it watches is gone: a pid may be reused, and the cleanup must not hit the
    /// new owner.
    pub(crate) fn disarm(mut self) {
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.write_all(b"disarm\n");
        }
        let _ = self.child.wait();
    }
}
