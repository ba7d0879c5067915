//! The plugin runtime: loads handler components and runs batches of change events through them,
//! sandboxed by the wasmtime component model.
//!
//! - [`PluginEngine`]: one per process. Configures wasmtime once (component model, async,
//!   epoch interruption), drives time limits with an epoch ticker thread, and keeps compiled
//!   components in an on-disk cache.
//! - [`Plugin`]: a compiled component linked against the host imports; cheap to clone.
//! - [`HandlerInstance`]: one instance of a plugin in its own store with [`Limits`] on time and
//!   memory; the pipeline calls [`HandlerInstance::handle`] with each batch and replaces the
//!   instance when an error says it is poisoned.
//! - [`HostImports`]: what the pipeline gives the guest (embedding and vector-store writes).
//!
//! Events are lowered into guest memory from borrowed records, so column values are copied
//! once, from the replication frames straight into the guest.

mod bindings;
mod cache;
mod engine;
mod error;
mod event_records;
mod guest_output;
mod host_imports;
mod instance;
mod limits;
mod log_budget;
mod plugin;

pub use engine::{EngineOptions, PluginEngine};
pub use error::{HandleError, RuntimeError};
pub use event_records::ContractVersion;
pub use host_imports::{HostImports, ImportError, ImportErrorKind};
pub use instance::HandlerInstance;
pub use limits::Limits;
pub use plugin::{Plugin, PluginDigest};
