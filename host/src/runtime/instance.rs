//! One live handler instance and its `handle` call: lowering a batch into the guest, enforcing
//! the time limit, and telling a guest error from a trap, a timeout and a memory overrun.

use std::sync::Arc;
use std::time::Duration;

use wasmtime::Store;
use wasmtime::component::Func;

use super::engine::{EPOCH_TICK, EngineShared};
use super::error::{GUEST_STDERR_HEADING, HandleError};
use super::event_records::{
    BatchRecords, ContractVersion, HandleParams, HandleResults, OperationRecord, OperationV0_1,
    OperationV0_2,
};
use super::guest_output::GuestOutput;
use super::host_imports::ImportError;
use super::limits::{CallClock, Limits};
use super::plugin::StoreState;
use crate::event::ChangeEvent;

/// How much longer than its limit the watchdog lets a call run before abandoning it. The
/// epoch callback stops a guest running wasm code within a tick of its limit; the watchdog
/// only catches a guest blocked in a WASI call (a sleep, a poll), where no epoch check runs.
const WATCHDOG_GRACE: Duration = Duration::from_millis(5 * EPOCH_TICK.as_millis() as u64);

/// An instantiated handler with its own store. Not shared: one pipeline drives it, one batch
/// at a time.
pub struct HandlerInstance {
    /// Keeps the epoch ticker running while the instance lives, even if every engine and
    /// plugin handle is gone: without ticks a spinning guest would never be stopped.
    _engine: Arc<EngineShared>,
    store: Store<StoreState>,
    handle: Func,
    /// The contract version `handle` was checked against at instantiation.
    version: ContractVersion,
    stderr: GuestOutput,
    clock: Arc<CallClock>,
    limits: Limits,
    log_target: Arc<str>,
    poisoned: bool,
}

impl HandlerInstance {
    pub(crate) fn new(
        engine: Arc<EngineShared>,
        store: Store<StoreState>,
        (handle, version): (Func, ContractVersion),
        stderr: GuestOutput,
        clock: Arc<CallClock>,
        limits: Limits,
        log_target: Arc<str>,
    ) -> HandlerInstance {
        HandlerInstance {
            _engine: engine,
            store,
            handle,
            version,
            stderr,
            clock,
            limits,
            log_target,
            poisoned: false,
        }
    }

    /// The `pipeline/plugin` name this instance logs under.
    pub fn log_target(&self) -> &str {
        &self.log_target
    }

    /// Whether an earlier call left this instance unusable.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// The worst host import failure of the last [`handle`](Self::handle) call, if any: an
    /// [`ImportErrorKind::Unavailable`](super::ImportErrorKind::Unavailable) one says the
    /// call may succeed once the embedder or the sink is back, a refusal that it will not.
    pub fn last_import_failure(&self) -> Option<&ImportError> {
        self.store.data().host.failure()
    }

    /// Passes one batch to the guest's `handle` and waits for it to finish, including every
    /// host import it makes.
    ///
    /// The guest's time limit covers the time it runs, not the time it awaits `embed`,
    /// `upsert`, `delete` or `delete-table` (see [`Limits::call_timeout`]). A guest that
    /// returns `ok` after one of those failed gets [`HandleError::IgnoredHostFailure`]: the
    /// write it asked for did not happen. After an error for
    /// which [`HandleError::is_poisoned`] is true, every further call returns
    /// [`HandleError::Poisoned`].
    pub async fn handle(&mut self, events: &[ChangeEvent]) -> Result<(), HandleError> {
        if self.poisoned {
            return Err(HandleError::Poisoned);
        }
        match self.version {
            ContractVersion::V0_1 => self.call::<OperationV0_1>(events).await,
            ContractVersion::V0_2 => self.call::<OperationV0_2>(events).await,
        }
    }

    /// [`handle`](Self::handle) with the records of one contract version.
    async fn call<O: OperationRecord>(
        &mut self,
        events: &[ChangeEvent],
    ) -> Result<(), HandleError> {
        let batch = BatchRecords::new(events);
        let records = batch.events::<O>(events);
        let typed = match self
            .handle
            .typed::<HandleParams<'_, O>, HandleResults>(&self.store)
        {
            Ok(typed) => typed,
            // Checked at instantiation; cannot fail unless wasmtime changed underneath.
            Err(error) => return Err(self.poison_with_trap(&error)),
        };

        self.stderr.clear_tail();
        self.store.data_mut().host.clear_failure();
        self.clock.start_call();
        self.store.set_epoch_deadline(1);
        let clock = self.clock.clone();
        let limit = self.limits.call_timeout;
        let outcome = tokio::select! {
            biased;
            result = typed.call_async(&mut self.store, (&records,)) => Some(result),
            () = clock.expired(limit + WATCHDOG_GRACE) => None,
        };

        match outcome {
            Some(Ok((Ok(()),))) => match self.store.data().host.failure() {
                None => Ok(()),
                // The guest caught a failed write and went on: what it asked for was not
                // done, so the call did not succeed.
                Some(failure) => Err(HandleError::IgnoredHostFailure(failure.message.clone())),
            },
            Some(Ok((Err(error),))) => Err(HandleError::GuestError(error.message)),
            Some(Err(error)) => Err(self.classify_failure(&error)),
            // The call future was dropped mid-call; the store is not reusable.
            None => {
                self.poisoned = true;
                Err(HandleError::Timeout(limit))
            }
        }
    }

    fn classify_failure(&mut self, error: &wasmtime::Error) -> HandleError {
        let state = self.store.data();
        if state.limiter.exceeded() {
            self.poisoned = true;
            HandleError::MemoryLimit {
                limit: state.limiter.limit(),
            }
        } else if state.timed_out {
            self.poisoned = true;
            HandleError::Timeout(self.limits.call_timeout)
        } else {
            self.poison_with_trap(error)
        }
    }

    fn poison_with_trap(&mut self, error: &wasmtime::Error) -> HandleError {
        self.poisoned = true;
        // `{:#}` gives the trap and its causes (wasmtime attaches the wasm backtrace as one of
        // them) without the host's own native backtrace, which says nothing about the guest.
        let mut message = format!("{error:#}");
        let stderr = self.stderr.take_tail();
        let stderr = stderr.trim();
        if !stderr.is_empty() {
            message.push_str(GUEST_STDERR_HEADING);
            message.push_str(stderr);
        }
        HandleError::Trap { message }
    }
}

impl std::fmt::Debug for HandlerInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandlerInstance")
            .field("log_target", &self.log_target)
            .field("limits", &self.limits)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

/// Compares the borrowed records with the bindgen-generated owned types (which need a `String`
/// per column name and value) on the no-op guest. `make guests`, then
/// `cargo test --release -p pgstream-host --lib throughput -- --ignored --nocapture`.
#[cfg(test)]
mod throughput_tests {
    use std::time::Instant;

    use bytes::Bytes;

    use super::super::bindings::pgstream::handler0_2_0::types as wit;
    use super::super::{EngineOptions, HostImports, PluginEngine};
    use super::*;
    use crate::event::{Column, Operation, Relation, Value};
    use crate::lsn::Lsn;
    use crate::point::{Point, PointKey};

    struct NoImports;

    #[async_trait::async_trait]
    impl HostImports for NoImports {
        async fn embed(&self, _: Vec<String>) -> Result<Vec<Vec<f32>>, ImportError> {
            Err(ImportError::refused("unused"))
        }
        async fn upsert(&self, _: Vec<Point>) -> Result<(), ImportError> {
            Err(ImportError::refused("unused"))
        }
        async fn merge(&self, _: Vec<Point>) -> Result<(), ImportError> {
            Err(ImportError::refused("unused"))
        }
        async fn delete(&self, _: Vec<PointKey>) -> Result<(), ImportError> {
            Err(ImportError::refused("unused"))
        }
        async fn delete_table(&self, _: String, _: String) -> Result<(), ImportError> {
            Err(ImportError::refused("unused"))
        }
    }

    fn owned(event: &ChangeEvent) -> wit::ChangeEvent {
        let row = |values: &[Value]| {
            event
                .relation
                .columns
                .iter()
                .zip(values)
                .map(|(column, value)| wit::Column {
                    name: column.name.clone(),
                    type_oid: column.type_oid,
                    value: match value {
                        Value::Null => wit::Value::Null,
                        Value::Unchanged => wit::Value::Unchanged,
                        Value::Text(text) => wit::Value::Text(text.to_string()),
                    },
                })
                .collect()
        };
        wit::ChangeEvent {
            operation: match event.operation {
                Operation::Insert => wit::Operation::Insert,
                Operation::Update => wit::Operation::Update,
                Operation::Delete => wit::Operation::Delete,
                Operation::Truncate => wit::Operation::Truncate,
                Operation::Read => wit::Operation::Read,
            },
            schema: event.relation.schema.clone(),
            table: event.relation.table.clone(),
            row: row(&event.row),
            old_row: event.old_row.as_deref().map(row),
            key_columns: event.relation.key_columns.clone(),
            lsn: event.lsn.0,
            commit_time: event.commit_time_us,
            xid: event.xid,
        }
    }

    impl HandlerInstance {
        async fn handle_owned(&mut self, events: &[ChangeEvent]) -> wasmtime::Result<()> {
            let events: Vec<wit::ChangeEvent> = events.iter().map(owned).collect();
            let typed = self
                .handle
                .typed::<(&[wit::ChangeEvent],), (Result<(), wit::Error>,)>(&self.store)?;
            self.clock.start_call();
            self.store.set_epoch_deadline(1);
            let (result,) = typed.call_async(&mut self.store, (&events,)).await?;
            result.map_err(|error| wasmtime::format_err!("{}", error.message))
        }
    }

    #[tokio::test]
    #[ignore = "benchmark; needs `make guests`; prints events/s"]
    async fn throughput_borrowed_vs_generated_owned_types() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../target/wasm/noop-handler.wasm"
        );
        let engine = PluginEngine::new(EngineOptions::default()).unwrap();
        let plugin = engine.load(std::path::Path::new(path)).unwrap();
        let mut instance = plugin
            .instantiate(Arc::new(NoImports), Limits::default(), "bench/noop")
            .await
            .unwrap();
        let column = |name: &str, type_oid, is_key| Column {
            name: name.to_owned(),
            type_oid,
            is_key,
        };
        let relation = Arc::new(Relation::new(
            1,
            "public".into(),
            "documents".into(),
            vec![
                column("id", 23, true),
                column("content", 25, false),
                column("note", 25, false),
                column("meta", 3802, false),
            ],
        ));
        let content = Bytes::from("some text to embed ".repeat(10));
        let batch: Vec<ChangeEvent> = (0..1000)
            .map(|id| ChangeEvent {
                operation: Operation::Insert,
                relation: relation.clone(),
                row: vec![
                    Value::text(Bytes::from(format!("{id}"))).unwrap(),
                    Value::text(content.clone()).unwrap(),
                    Value::Null,
                    Value::text(Bytes::from_static(br#"{"tags": ["a"]}"#)).unwrap(),
                ],
                old_row: None,
                lsn: Lsn(1),
                commit_time_us: 0,
                xid: 1,
            })
            .collect();
        let rounds = 200;
        for owned in [false, true, false, true] {
            let started = Instant::now();
            for _ in 0..rounds {
                if owned {
                    instance.handle_owned(&batch).await.unwrap();
                } else {
                    instance.handle(&batch).await.unwrap();
                }
            }
            let rate = (rounds * batch.len()) as f64 / started.elapsed().as_secs_f64();
            let kind = if owned {
                "generated owned"
            } else {
                "borrowed records"
            };
            println!("noop-handler, {kind}: {rate:.0} events/s");
        }
    }
}
