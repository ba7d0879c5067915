//! The wait before a retry: exponential backoff with jitter, the one formula every retry loop
//! of the host uses (the pipeline's batch retries and reconnects, the Qdrant sink, the
//! OpenAI-compatible embedder).
//!
//! The wait doubles per failure so a struggling service gets room, is capped so recovery is
//! noticed soon, and is drawn from the upper half of that so that clients which failed
//! together (many pipelines on one vector store) do not retry together.

use std::time::Duration;

/// The wait after failed try number `attempt` (1-based): `initial * 2^(attempt-1)` capped at
/// `max`, then a random point in its upper half.
pub(crate) fn jittered(attempt: u32, initial: Duration, max: Duration) -> Duration {
    let doublings = attempt.saturating_sub(1).min(31);
    let full = initial.saturating_mul(1u32 << doublings).min(max);
    let half = full / 2;
    half.saturating_add(half.mul_f64(fastrand::f64()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::jittered;

    #[test]
    fn doubles_within_jitter_and_caps() {
        let initial = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        for attempt in 1..=200 {
            let full = (initial * 2u32.saturating_pow(attempt.min(31) - 1)).min(max);
            let wait = jittered(attempt, initial, max);
            assert!(
                wait >= full / 2 && wait <= full,
                "attempt {attempt}: {wait:?}"
            );
        }
        assert!(
            jittered(u32::MAX, Duration::MAX, Duration::MAX) >= Duration::MAX / 2,
            "huge settings saturate instead of overflowing"
        );
    }
}
