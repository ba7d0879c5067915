//! One live handler instance and its `handle` call: lowering a batch into the guest, enforcing
//! the time limit, and telling a guest error from a trap, a timeout and a memory overrun.

use std::sync::Arc;
use std::time::Duration;

use wasmtime::Store;
use wasmtime::component::Func;

use super::engine::EPOCH_TICK;
use super::error::HandleError;
use super::event_records::{BatchRecords, HandleParams, HandleResults};
use super::guest_output::GuestOutput;
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
    store: Store<StoreState>,
    handle: Func,
    stderr: GuestOutput,
    clock: Arc<CallClock>,
    limits: Limits,
    log_target: Arc<str>,
    poisoned: bool,
}

impl HandlerInstance {
    pub(crate) fn new(
        store: Store<StoreState>,
        handle: Func,
        stderr: GuestOutput,
        clock: Arc<CallClock>,
        limits: Limits,
        log_target: Arc<str>,
    ) -> HandlerInstance {
        HandlerInstance {
            store,
            handle,
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

    /// Passes one batch to the guest's `handle` and waits for it to finish, including every
    /// host import it makes.
    ///
    /// The guest's time limit covers the time it runs, not the time it awaits `embed`,
    /// `upsert`, `delete` or `delete-table` (see [`Limits::call_timeout`]). After an error for
    /// which [`HandleError::is_poisoned`] is true, every further call returns
    /// [`HandleError::Poisoned`].
    pub async fn handle(&mut self, events: &[ChangeEvent]) -> Result<(), HandleError> {
        if self.poisoned {
            return Err(HandleError::Poisoned);
        }
        let batch = BatchRecords::new(events).map_err(HandleError::InvalidEvent)?;
        let records = batch.events(events);
        let typed = match self
            .handle
            .typed::<HandleParams<'_>, HandleResults>(&self.store)
        {
            Ok(typed) => typed,
            // Checked at instantiation; cannot fail unless wasmtime changed underneath.
            Err(error) => return Err(self.poison_with_trap(&error)),
        };

        self.stderr.clear_tail();
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
            Some(Ok((Ok(()),))) => Ok(()),
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
        let stderr = self.stderr.take_tail();
        let stderr = stderr.trim_end();
        // `{:?}` of a wasmtime error prints the trap, its causes and the wasm backtrace.
        let message = if stderr.is_empty() {
            format!("{error:?}")
        } else {
            format!("{error:?}\nguest stderr:\n{stderr}")
        };
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
