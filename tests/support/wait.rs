//! Polling for states that become true eventually: a row replicated, a slot advanced, a vector
//! written. Tests assert the end state within a deadline instead of sleeping for a guessed time.

use std::future::Future;
use std::time::Duration;

use anyhow::{Result, bail};
use tokio::time::Instant;

/// The first pause between two checks; pauses double up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(20);
const MAX_PAUSE: Duration = Duration::from_millis(250);

/// Calls `check` until it returns true, failing once `timeout` has passed.
///
/// ```no_run
/// # async fn example(client: tokio_postgres::Client) -> anyhow::Result<()> {
/// use std::time::Duration;
/// pgstream_e2e::wait_until(Duration::from_secs(10), || async {
///     let row = client.query_one("SELECT count(*) FROM items", &[]).await.unwrap();
///     row.get::<_, i64>(0) == 3
/// })
/// .await?;
/// # Ok(())
/// # }
/// ```
pub async fn wait_until<F, Fut>(timeout: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(timeout, || {
        let outcome = check();
        async move { outcome.await.then_some(()) }
    })
    .await
}

/// Calls `probe` until it returns `Some(value)` and returns that value, failing once `timeout`
/// has passed. The last probe runs at or after the deadline, so a slow probe is not cut short.
pub async fn wait_for<T, F, Fut>(timeout: Duration, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    let deadline = started + timeout;
    let mut pause = FIRST_PAUSE;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        if let Some(value) = probe().await {
            return Ok(value);
        }
        let now = Instant::now();
        if now >= deadline {
            bail!(
                "condition still false after {:?} ({attempts} checks)",
                now - started
            );
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(MAX_PAUSE);
    }
}
