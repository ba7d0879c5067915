//! Errors of the plugin runtime: loading and instantiating a component ([`RuntimeError`]) and
//! running one batch through it ([`HandleError`]).

use std::path::PathBuf;
use std::time::Duration;

/// A boxed cause, so wasmtime's own error type (which does not implement
/// `std::error::Error`) can sit in a `#[source]` field.
pub(crate) type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Loading, compiling or instantiating a plugin failed. None of these is retryable without
/// an operator fixing the component or the configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// The wasmtime engine could not be configured.
    #[error("cannot configure the wasmtime engine")]
    Engine(#[source] Cause),
    /// The epoch ticker thread could not be started.
    #[error("cannot start the epoch ticker thread")]
    Ticker(#[source] std::io::Error),
    /// The component file could not be read.
    #[error("cannot read plugin {path}")]
    Read {
        /// The component file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid component, or it does not compile.
    #[error("cannot compile plugin {path}")]
    Compile {
        /// The component file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Cause,
    },
    /// The component does not fit the `pgstream:handler/handler` world: an import the host
    /// does not offer, or a `handle` export of another type.
    #[error("plugin {path} does not implement the pgstream:handler/handler world")]
    WorldMismatch {
        /// The component file.
        path: PathBuf,
        /// What does not match.
        #[source]
        source: Cause,
    },
    /// Instantiating the component failed (its start code trapped, ran out of time, or
    /// exceeded the memory limit).
    #[error("cannot instantiate plugin {log_target}")]
    Instantiate {
        /// The pipeline/plugin name the instance was created for.
        log_target: String,
        /// Why.
        #[source]
        source: Cause,
    },
}

/// Where a trap report's guest stderr starts.
pub(crate) const GUEST_STDERR_HEADING: &str = "\nguest stderr:\n";

/// One `handle` call failed.
///
/// After [`HandleError::GuestError`] the instance may be called again; after any other
/// variant it is poisoned (see [`HandleError::is_poisoned`]) and must be dropped and replaced
/// by a fresh instance, since the guest's memory may be in any state.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandleError {
    /// The guest's `handle` returned an error value.
    #[error("handler returned an error: {0}")]
    GuestError(String),
    /// The guest trapped (a panic, an invalid instruction, an out-of-bounds access, a bad
    /// value passed to the host).
    #[error("handler trapped: {message}")]
    Trap {
        /// The trap, the guest's stderr output just before it (a Rust guest's panic message
        /// lands there) and the wasm backtrace when available.
        message: String,
    },
    /// The guest ran longer than [`Limits::call_timeout`](super::Limits::call_timeout).
    #[error("handler exceeded its time limit of {0:?}")]
    Timeout(Duration),
    /// The guest tried to grow its memory beyond
    /// [`Limits::memory_bytes`](super::Limits::memory_bytes).
    #[error("handler exceeded its memory limit of {limit} bytes")]
    MemoryLimit {
        /// The limit in bytes.
        limit: usize,
    },
    /// The instance was poisoned by an earlier failure and must be replaced.
    #[error("handler instance is poisoned by an earlier failure; instantiate a new one")]
    Poisoned,
    /// The guest returned `ok`, but a host call it made during the call failed and it went
    /// on: what it asked for was not done. The failure itself is
    /// [`HandlerInstance::last_import_failure`](super::HandlerInstance::last_import_failure).
    #[error(
        "the handler returned ok, but a host call failed during it and the handler went on: {0}"
    )]
    IgnoredHostFailure(String),
}

impl HandleError {
    /// The failure in one short line, for a status display: for a trap, the guest's panic
    /// message when it printed one (a Rust guest's `panicked at ...:` line is followed by it),
    /// else wasmtime's `wasm trap:` line; the full text stays in the log.
    pub fn summary(&self) -> String {
        let HandleError::Trap { message } = self else {
            return self
                .to_string()
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned();
        };
        let (trap, stderr) = message
            .split_once(GUEST_STDERR_HEADING)
            .unwrap_or((message, ""));
        let mut stderr_lines = stderr.lines().map(str::trim);
        let panic = stderr_lines
            .by_ref()
            .find(|line| line.contains("panicked at"))
            .and_then(|_| stderr_lines.find(|line| !line.is_empty()));
        let cause = || {
            trap.lines()
                .map(str::trim)
                .find(|line| line.starts_with("wasm trap:"))
                .or_else(|| trap.lines().next())
                .unwrap_or_default()
        };
        format!("handler trapped: {}", panic.unwrap_or_else(cause))
    }

    /// Whether the instance that returned this error must be dropped: true for everything but
    /// [`HandleError::GuestError`] and [`HandleError::IgnoredHostFailure`].
    pub fn is_poisoned(&self) -> bool {
        !matches!(
            self,
            HandleError::GuestError(_) | HandleError::IgnoredHostFailure(_)
        )
    }
}
