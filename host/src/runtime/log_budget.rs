//! How much one handler instance may write to the host log: a token bucket shared by its
//! `log` import and its stdout and stderr, so a guest that floods the log cannot fill the disk
//! or bury the lines of every other pipeline.
//!
//! A guest gets [`BURST_LINES`] lines at once and [`LINES_PER_SEC`] a second after that. Lines
//! over the budget are dropped and counted; the next line let through is preceded by one
//! warning saying how many were dropped.

use std::sync::{Mutex, PoisonError};
use std::time::Instant;

/// Lines a second a guest may log, on average.
pub(crate) const LINES_PER_SEC: f64 = 100.0;
/// Lines a guest may log at once after a quiet spell.
pub(crate) const BURST_LINES: f64 = 1000.0;

/// The budget of one instance.
#[derive(Debug)]
pub(crate) struct LogBudget {
    state: Mutex<BudgetState>,
}

#[derive(Debug)]
struct BudgetState {
    tokens: f64,
    refilled: Instant,
    dropped: u64,
}

/// Whether a line may be logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Log it; `dropped` lines were dropped since the last line let through (report them).
    Log { dropped: u64 },
    /// Over budget: drop it.
    Drop,
}

impl LogBudget {
    pub(crate) fn new() -> LogBudget {
        LogBudget {
            state: Mutex::new(BudgetState {
                tokens: BURST_LINES,
                refilled: Instant::now(),
                dropped: 0,
            }),
        }
    }

    /// Takes one line from the budget.
    pub(crate) fn admit(&self) -> Admission {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Admission {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let elapsed = now.saturating_duration_since(state.refilled).as_secs_f64();
        state.tokens = (state.tokens + elapsed * LINES_PER_SEC).min(BURST_LINES);
        state.refilled = now;
        if state.tokens < 1.0 {
            state.dropped += 1;
            return Admission::Drop;
        }
        state.tokens -= 1.0;
        Admission::Log {
            dropped: std::mem::take(&mut state.dropped),
        }
    }
}

/// Logs the warning about dropped lines, if any were.
pub(crate) fn report_dropped(plugin: &str, dropped: u64) {
    if dropped > 0 {
        tracing::warn!(
            target: "pgstream::plugin",
            plugin,
            dropped,
            "the plugin logged more than {LINES_PER_SEC} lines a second; {dropped} lines were dropped"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_flood_is_cut_to_the_burst_then_the_rate_and_the_drops_are_counted() {
        let budget = LogBudget::new();
        let start = Instant::now();
        let admitted = (0..5000)
            .filter(|_| budget.admit_at(start) != Admission::Drop)
            .count();
        assert_eq!(admitted, BURST_LINES as usize);
        // One second later: the rate's worth again, and the first line reports the drops.
        let later = start + Duration::from_secs(1);
        assert_eq!(budget.admit_at(later), Admission::Log { dropped: 4000 });
        let more = (0..500)
            .filter(|_| budget.admit_at(later) != Admission::Drop)
            .count();
        assert_eq!(more, LINES_PER_SEC as usize - 1);
        // A long quiet spell refills the burst, not more.
        let much_later = later + Duration::from_secs(3600);
        let refilled = (0..5000)
            .filter(|_| budget.admit_at(much_later) != Admission::Drop)
            .count();
        assert_eq!(refilled, BURST_LINES as usize);
    }
}
