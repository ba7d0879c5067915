//! What one handler instance may consume: time per `handle` call and memory.
//!
//! Memory is enforced by [`GuestLimiter`], a wasmtime `ResourceLimiter` that counts the bytes
//! of every linear memory of the instance together and traps the guest the moment it asks for
//! more than its limit. Trapping (rather than letting `memory.grow` return -1) is deliberate: a
//! Rust guest aborts on allocation failure anyway, and the limiter records the denial so the
//! failure is reported as [`HandleError::MemoryLimit`](super::HandleError::MemoryLimit) rather
//! than as an anonymous `unreachable` trap.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Limits of one handler instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// How long one `handle` call may run in the guest, measured as wall time minus the time
    /// spent awaiting host imports (`embed`, `upsert`, `delete`, `delete-table`): a slow
    /// embedder does not count against the guest, a spinning guest does. Checked every epoch
    /// tick (10 ms), so the effective limit is up to one tick longer. Also applies to
    /// instantiation. Default 30 s.
    pub call_timeout: Duration,
    /// How many bytes of linear memory the instance may have in total. Default 256 MiB.
    pub memory_bytes: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            call_timeout: Duration::from_secs(30),
            memory_bytes: 256 * 1024 * 1024,
        }
    }
}

/// Measures how long the guest has run in the current call: wall time since the call began,
/// minus the time spent awaiting the `host` interface's imports. Shared by the store's epoch
/// callback (which traps a guest running wasm code past its limit), the host imports (which
/// mark their start and end) and the watchdog of `HandlerInstance::handle` (which catches a
/// guest blocked in a WASI call such as a sleep, where no epoch check runs).
#[derive(Debug)]
pub(crate) struct CallClock {
    state: Mutex<ClockState>,
}

#[derive(Debug, Clone, Copy)]
struct ClockState {
    started: Instant,
    host_time: Duration,
    in_host_since: Option<Instant>,
    /// Epoch ticks that found the guest running wasm code in this call.
    ticks: u32,
    /// Whether this call is throttled after its burst: `handle` calls are, instantiation
    /// (an interpreter's start, once per instance) is not.
    throttled: bool,
}

impl CallClock {
    pub(crate) fn new() -> CallClock {
        CallClock {
            state: Mutex::new(ClockState {
                started: Instant::now(),
                host_time: Duration::ZERO,
                in_host_since: None,
                ticks: 0,
                throttled: false,
            }),
        }
    }

    fn update<R>(&self, change: impl FnOnce(&mut ClockState) -> R) -> R {
        change(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Starts measuring a new `handle` call.
    pub(crate) fn start_call(&self) {
        self.start(true);
    }

    /// Starts measuring an instantiation: never throttled.
    pub(crate) fn start_instantiation(&self) {
        self.start(false);
    }

    fn start(&self, throttled: bool) {
        self.update(|state| {
            *state = ClockState {
                started: Instant::now(),
                host_time: Duration::ZERO,
                in_host_since: None,
                ticks: 0,
                throttled,
            }
        });
    }

    /// The guest called a host import; time stops counting against it.
    pub(crate) fn enter_host(&self) {
        self.update(|state| state.in_host_since = Some(Instant::now()));
    }

    /// The host import returned; time counts again.
    pub(crate) fn leave_host(&self) {
        self.update(|state| {
            if let Some(since) = state.in_host_since.take() {
                state.host_time += since.elapsed();
            }
        });
    }

    /// How long the guest has run in the current call.
    pub(crate) fn guest_elapsed(&self) -> Duration {
        self.update(|state| {
            let now = Instant::now();
            let in_host = state
                .in_host_since
                .map_or(Duration::ZERO, |since| now.saturating_duration_since(since));
            now.saturating_duration_since(state.started)
                .saturating_sub(state.host_time)
                .saturating_sub(in_host)
        })
    }

    /// Counts an epoch tick that found the guest computing; true once the call has computed
    /// for more than `burst` ticks and is throttled.
    pub(crate) fn computed_tick(&self, burst: u32) -> bool {
        self.update(|state| {
            state.ticks = state.ticks.saturating_add(1);
            state.throttled && state.ticks > burst
        })
    }

    /// Completes once the guest has run for `limit` in the current call.
    pub(crate) async fn expired(&self, limit: Duration) {
        loop {
            let elapsed = self.guest_elapsed();
            if elapsed >= limit {
                return;
            }
            tokio::time::sleep(limit - elapsed).await;
        }
    }
}

/// Table elements an instance may have (function tables of Rust guests hold a few hundred).
const MAX_TABLE_ELEMENTS: usize = 1_000_000;
/// Instances, memories and tables a component may create; a handler component needs a handful.
const MAX_INSTANCES: usize = 100;
const MAX_MEMORIES: usize = 100;
const MAX_TABLES: usize = 100;

/// The guest asked for more memory than its limit; the error that traps it.
#[derive(Debug, thiserror::Error)]
#[error("memory limit of {limit} bytes exceeded: {requested} bytes requested")]
pub(crate) struct MemoryLimitExceeded {
    limit: usize,
    requested: usize,
}

/// Enforces [`Limits::memory_bytes`] on one store.
pub(crate) struct GuestLimiter {
    limit: usize,
    /// Bytes of all linear memories of the store. Memories never shrink, so growth deltas
    /// add up to the current total.
    used: usize,
    exceeded: bool,
}

impl GuestLimiter {
    pub(crate) fn new(limit: usize) -> GuestLimiter {
        GuestLimiter {
            limit,
            used: 0,
            exceeded: false,
        }
    }

    /// Whether a memory growth was denied (the instance is poisoned from then on).
    pub(crate) fn exceeded(&self) -> bool {
        self.exceeded
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit
    }
}

impl wasmtime::ResourceLimiter for GuestLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let requested = self.used.saturating_sub(current).saturating_add(desired);
        if requested > self.limit {
            self.exceeded = true;
            return Err(MemoryLimitExceeded {
                limit: self.limit,
                requested,
            }
            .into());
        }
        self.used = requested;
        Ok(true)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        // The growth was permitted but the OS could not provide it; `memory.grow` returns -1
        // and the guest decides. Our count must not include memory that never arrived, but
        // the delta is not passed here; over-counting only makes the limit stricter.
        Ok(())
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }
}

#[cfg(test)]
mod tests {
    use wasmtime::ResourceLimiter;

    use super::*;

    const PAGE: usize = 64 * 1024;

    #[test]
    fn growth_within_the_limit_is_allowed_and_counted_across_memories() {
        let mut limiter = GuestLimiter::new(10 * PAGE);
        assert!(limiter.memory_growing(0, 4 * PAGE, None).unwrap());
        assert!(limiter.memory_growing(0, 4 * PAGE, None).unwrap());
        // 8 pages used; a second memory growing by 3 pages would make 11.
        assert!(limiter.memory_growing(4 * PAGE, 7 * PAGE, None).is_err());
        assert!(limiter.exceeded());
    }

    #[test]
    fn growth_to_exactly_the_limit_is_allowed() {
        let mut limiter = GuestLimiter::new(10 * PAGE);
        assert!(limiter.memory_growing(0, 10 * PAGE, None).unwrap());
        assert!(!limiter.exceeded());
        let error = limiter
            .memory_growing(10 * PAGE, 11 * PAGE, None)
            .unwrap_err();
        assert!(error.is::<MemoryLimitExceeded>());
    }
}

#[cfg(test)]
mod clock_tests {
    use super::*;

    #[test]
    fn time_in_host_imports_does_not_count() {
        let clock = CallClock::new();
        clock.start_call();
        std::thread::sleep(Duration::from_millis(20));
        clock.enter_host();
        std::thread::sleep(Duration::from_millis(100));
        let during_import = clock.guest_elapsed();
        clock.leave_host();
        let after_import = clock.guest_elapsed();
        assert!(during_import >= Duration::from_millis(20));
        assert!(
            during_import < Duration::from_millis(100),
            "{during_import:?}"
        );
        assert!(
            after_import < Duration::from_millis(100),
            "{after_import:?}"
        );
        clock.start_call();
        assert!(clock.guest_elapsed() < Duration::from_millis(20));
    }

    #[test]
    fn handle_calls_are_throttled_after_their_burst_and_instantiation_never() {
        let clock = CallClock::new();
        clock.start_call();
        let throttled: Vec<bool> = (0..5).map(|_| clock.computed_tick(3)).collect();
        assert_eq!(throttled, [false, false, false, true, true]);
        // A new call gets its burst again.
        clock.start_call();
        assert!(!clock.computed_tick(3));
        clock.start_instantiation();
        assert!((0..100).all(|_| !clock.computed_tick(3)));
    }
}
