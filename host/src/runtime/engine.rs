//! The process-wide wasmtime engine: configured once, shared by every pipeline, with the epoch
//! ticker that drives every instance's time limit.
//!
//! The engine enables the component model and epoch interruption (async support is always on
//! in wasmtime 48). A background thread increments the engine's epoch every [`EPOCH_TICK`];
//! each store turns ticks into its own deadline (see `instance.rs`). The thread stops when the
//! last handle to the engine (including [`Plugin`]s and instances made from it) is dropped.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine};

use super::bindings::EveryVersion;
use super::cache::ComponentCache;
use super::error::RuntimeError;
use super::event_records::ContractVersion;
use super::host_imports::HostState;
use super::plugin::{Plugin, PluginDigest, StoreState};

/// How often the engine's epoch advances: the granularity of time limits.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Options for [`PluginEngine::new`].
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    /// Where compiled components are kept between runs. `None` compiles every component on
    /// every load. The directory must be writable only by the host's user: its files are
    /// loaded as native code.
    pub cache_dir: Option<PathBuf>,
}

/// The wasmtime engine of the process. Cheap to clone; all clones share one engine and one
/// epoch ticker.
#[derive(Clone)]
pub struct PluginEngine {
    shared: Arc<EngineShared>,
}

pub(crate) struct EngineShared {
    pub(crate) engine: Engine,
    cache: Option<ComponentCache>,
    /// Dropping this sender (with the last `EngineShared`) stops the ticker thread.
    _stop_ticker: mpsc::Sender<()>,
}

/// Marker type for linking the `host` interface against [`HostState`] inside [`StoreState`].
struct HostData;

impl wasmtime::component::HasData for HostData {
    type Data<'a> = &'a mut HostState;
}

impl PluginEngine {
    /// Configures the engine and starts the epoch ticker.
    pub fn new(options: EngineOptions) -> Result<PluginEngine, RuntimeError> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        let engine = Engine::new(&config).map_err(|e| RuntimeError::Engine(e.into()))?;

        let (stop_ticker, stopped) = mpsc::channel::<()>();
        let ticking = engine.clone();
        std::thread::Builder::new()
            .name("wasm-epoch-ticker".into())
            .spawn(move || {
                // Only a disconnect (the engine's last handle dropped) ends the loop; nothing
                // is ever sent.
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(EPOCH_TICK) {
                    ticking.increment_epoch();
                }
            })
            .map_err(RuntimeError::Ticker)?;

        let cache = options
            .cache_dir
            .map(|dir| ComponentCache::new(dir, &engine));
        Ok(PluginEngine {
            shared: Arc::new(EngineShared {
                engine,
                cache,
                _stop_ticker: stop_ticker,
            }),
        })
    }

    /// The engine `shared` belongs to.
    pub(crate) fn from_shared(shared: Arc<EngineShared>) -> PluginEngine {
        PluginEngine { shared }
    }

    /// Loads the component at `path`: from the compiled-component cache when it holds this
    /// exact component for this engine, otherwise by compiling it (and then caching it).
    /// Checks that the component's imports are ones the host offers.
    ///
    /// Compiling takes from milliseconds to seconds of CPU; call this from a blocking context
    /// (`tokio::task::spawn_blocking`) when on an async runtime.
    pub fn load(&self, path: &Path) -> Result<Plugin, RuntimeError> {
        let engine = &self.shared.engine;
        let bytes = std::fs::read(path).map_err(|source| RuntimeError::Read {
            path: path.to_owned(),
            source,
        })?;
        let compile_error = |e: wasmtime::Error| RuntimeError::Compile {
            path: path.to_owned(),
            source: e.into(),
        };
        let component = match &self.shared.cache {
            Some(cache) => cache
                .load_or_compile(engine, &bytes)
                .map_err(compile_error)?,
            None => Component::from_binary(engine, &bytes).map_err(compile_error)?,
        };

        let mismatch = |e: wasmtime::Error| RuntimeError::WorldMismatch {
            path: path.to_owned(),
            source: e.into(),
        };
        let mut linker = Linker::<StoreState>::new(engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(mismatch)?;
        EveryVersion::add_to_linker::<StoreState, HostData>(&mut linker, |state| &mut state.host)
            .map_err(mismatch)?;
        let instance_pre = linker.instantiate_pre(&component).map_err(mismatch)?;
        let handle_export = component
            .get_export_index(None, "handle")
            .ok_or_else(|| mismatch(wasmtime::format_err!("no `handle` export")))?;
        let version = ContractVersion::of_component(engine, &component).ok_or_else(|| {
            mismatch(wasmtime::format_err!(
                "its `handle` export matches no version of pgstream:handler this host runs \
                 (0.1.0, 0.2.0); build it against wit/handler.wit"
            ))
        })?;
        Ok(Plugin::new(
            self.shared.clone(),
            path.to_owned(),
            PluginDigest::of(&bytes),
            instance_pre,
            handle_export,
            version,
        ))
    }

    /// Whether the compiled form of `path` is in the cache (for tests and diagnostics).
    pub fn cached_artifact(&self, path: &Path) -> Option<PathBuf> {
        let cache = self.shared.cache.as_ref()?;
        let bytes = std::fs::read(path).ok()?;
        let artifact = cache.artifact_path(&bytes);
        artifact.is_file().then_some(artifact)
    }
}

impl std::fmt::Debug for PluginEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginEngine")
            .field(
                "cache",
                &self.shared.cache.as_ref().map(ComponentCache::dir),
            )
            .finish_non_exhaustive()
    }
}
