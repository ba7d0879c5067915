//! A loaded plugin ([`Plugin`]) and the store every instance of it lives in.
//!
//! A `Plugin` is a compiled component already linked against the host's imports (WASI p2 and
//! `pgstream:handler/host`); instantiating it only builds a store and runs the component's
//! start code. Each instance gets its own store: its own memory limit, its own WASI context
//! (no preopened directories, no environment variables, no arguments, no network, stdout and
//! stderr into the host log) and its own clock for the time limit.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::{ComponentExportIndex, InstancePre, ResourceTable};
use wasmtime::{Store, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::engine::{EPOCH_TICK, EngineShared};
use super::error::RuntimeError;
use super::event_records::{
    ContractVersion, HandleParams, HandleResults, OperationV0_1, OperationV0_2,
};
use super::guest_output::{GuestOutput, StreamKind};
use super::host_imports::{HostImports, HostState};
use super::instance::HandlerInstance;
use super::limits::{CallClock, GuestLimiter, Limits};
use super::log_budget::LogBudget;

/// Slack beyond the call timeout for instantiating a component (mapping its memories and
/// running its start code).
const INSTANTIATE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// A compiled handler component, ready to instantiate. Cheap to clone.
#[derive(Clone)]
pub struct Plugin {
    inner: Arc<PluginInner>,
}

struct PluginInner {
    /// Keeps the engine and its epoch ticker alive as long as any plugin is.
    engine: Arc<EngineShared>,
    path: PathBuf,
    digest: PluginDigest,
    instance_pre: InstancePre<StoreState>,
    handle_export: ComponentExportIndex,
    version: ContractVersion,
}

/// Epoch ticks (10 ms each) a handler call may compute at full speed. Handlers that do real
/// work per batch (decode, chunk, build points) take a few milliseconds; one still computing
/// after this long is most likely stuck, and shares the CPU with others from then on.
const CPU_BURST_TICKS: u32 = 10;

/// After its burst, a computing guest pauses this long after each tick it runs: at most a
/// fifth of a core. The pause counts against its time limit, which still stops it.
const CPU_THROTTLE_PAUSE: Duration = Duration::from_millis(4 * EPOCH_TICK.as_millis() as u64);

/// The SHA-256 of a component's bytes: tells two versions of a plugin file apart.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PluginDigest([u8; 32]);

impl PluginDigest {
    pub(crate) fn of(bytes: &[u8]) -> PluginDigest {
        use sha2::{Digest, Sha256};
        PluginDigest(Sha256::digest(bytes).into())
    }
}

/// The first 12 hex digits, enough to tell versions apart in logs and metrics.
impl std::fmt::Display for PluginDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0[..6]
            .iter()
            .try_for_each(|byte| write!(f, "{byte:02x}"))
    }
}

impl std::fmt::Debug for PluginDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PluginDigest({self})")
    }
}

/// The guest's time limit ran out; the error the epoch callback traps the guest with.
#[derive(Debug, thiserror::Error)]
#[error("handler exceeded its time limit of {0:?}")]
pub(crate) struct DeadlineExceeded(pub(crate) Duration);

/// Everything a store holds for one instance.
pub(crate) struct StoreState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) host: HostState,
    pub(crate) limiter: GuestLimiter,
    pub(crate) clock: Arc<CallClock>,
    pub(crate) call_timeout: Duration,
    /// Set by the epoch callback when it stops the guest for running out of time.
    pub(crate) timed_out: bool,
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl Plugin {
    pub(crate) fn new(
        engine: Arc<EngineShared>,
        path: PathBuf,
        digest: PluginDigest,
        instance_pre: InstancePre<StoreState>,
        handle_export: ComponentExportIndex,
        version: ContractVersion,
    ) -> Plugin {
        Plugin {
            inner: Arc::new(PluginInner {
                engine,
                path,
                digest,
                instance_pre,
                handle_export,
                version,
            }),
        }
    }

    /// The file the plugin was loaded from.
    pub fn path(&self) -> &std::path::Path {
        &self.inner.path
    }

    /// What the file held when it was loaded.
    pub fn digest(&self) -> PluginDigest {
        self.inner.digest
    }

    /// The version of the WIT contract the component was built against.
    pub fn contract_version(&self) -> ContractVersion {
        self.inner.version
    }

    /// Loads the plugin's file again, with the same engine (and compiled-component cache), as
    /// it is now: for a hot reload. Compiles when the file changed, so call it from a blocking
    /// context, like [`PluginEngine::load`](super::PluginEngine::load).
    pub fn load_again(&self) -> Result<Plugin, RuntimeError> {
        super::engine::PluginEngine::from_shared(self.inner.engine.clone()).load(&self.inner.path)
    }

    /// Creates a fresh instance: a new store with `limits`, whose host imports go to
    /// `imports` and whose log lines (the `log` import, stdout, stderr) carry `log_target`
    /// (by convention `pipeline/plugin`) in their `plugin` field.
    pub async fn instantiate(
        &self,
        imports: Arc<dyn HostImports>,
        limits: Limits,
        log_target: &str,
    ) -> Result<HandlerInstance, RuntimeError> {
        let log_target: Arc<str> = Arc::from(log_target);
        let budget = Arc::new(LogBudget::new());
        let stdout = GuestOutput::new(StreamKind::Stdout, log_target.clone(), budget.clone());
        let stderr = GuestOutput::new(StreamKind::Stderr, log_target.clone(), budget.clone());
        // `WasiCtxBuilder` starts with no preopens, no environment and no arguments; sockets
        // are switched off explicitly rather than relying on the address check alone.
        let wasi = WasiCtx::builder()
            .stdout(stdout)
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let clock = Arc::new(CallClock::new());
        let state = StoreState {
            wasi,
            table: ResourceTable::new(),
            host: HostState::new(imports, log_target.clone(), clock.clone(), budget),
            limiter: GuestLimiter::new(limits.memory_bytes),
            clock: clock.clone(),
            call_timeout: limits.call_timeout,
            timed_out: false,
        };
        let mut store = Store::new(&self.inner.engine.engine, state);
        store.limiter(|state| &mut state.limiter);
        store.epoch_deadline_callback(|mut context| {
            let state = context.data_mut();
            if state.clock.guest_elapsed() >= state.call_timeout {
                state.timed_out = true;
                return Err(DeadlineExceeded(state.call_timeout).into());
            }
            // Yielding at every tick lets other pipelines' tasks run on this worker thread
            // while a guest computes. A call that keeps computing past its burst (a loop, a
            // flood of log calls) is throttled to a share of a core, so on a host with few
            // cores it cannot take one away from its neighbours for the whole of its time limit.
            if state.clock.computed_tick(CPU_BURST_TICKS) {
                Ok(UpdateDeadline::YieldCustom(
                    1,
                    Box::pin(tokio::time::sleep(CPU_THROTTLE_PAUSE)),
                ))
            } else {
                Ok(UpdateDeadline::Yield(1))
            }
        });

        let instantiate_error = |e: wasmtime::Error| RuntimeError::Instantiate {
            log_target: log_target.to_string(),
            source: e.into(),
        };
        clock.start_instantiation();
        store.set_epoch_deadline(1);
        // Epoch ticks only stop running wasm code: start code blocked in a WASI poll or sleep
        // would hang here, so the whole instantiation is bounded too.
        let limit = limits.call_timeout + INSTANTIATE_GRACE;
        let instance =
            tokio::time::timeout(limit, self.inner.instance_pre.instantiate_async(&mut store))
                .await
                .map_err(|_| {
                    instantiate_error(wasmtime::format_err!(
                        "start code did not finish within {limit:?}"
                    ))
                })?
                .map_err(instantiate_error)?;

        let mismatch = |e: wasmtime::Error| RuntimeError::WorldMismatch {
            path: self.inner.path.clone(),
            source: e.into(),
        };
        let handle = instance
            .get_func(&mut store, self.inner.handle_export)
            .ok_or_else(|| mismatch(wasmtime::format_err!("no `handle` export")))?;
        // Checks, once, that `handle` has exactly the WIT type the borrowed records lower to.
        match self.inner.version {
            ContractVersion::V0_1 => handle
                .typed::<HandleParams<'_, OperationV0_1>, HandleResults>(&store)
                .map(drop),
            ContractVersion::V0_2 => handle
                .typed::<HandleParams<'_, OperationV0_2>, HandleResults>(&store)
                .map(drop),
        }
        .map_err(mismatch)?;
        Ok(HandlerInstance::new(
            self.inner.engine.clone(),
            store,
            (handle, self.inner.version),
            stderr,
            clock,
            limits,
            log_target,
        ))
    }
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("path", &self.inner.path)
            .field("version", &self.inner.version)
            .finish_non_exhaustive()
    }
}
