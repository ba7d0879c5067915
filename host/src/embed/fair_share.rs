//! Fair sharing of one in-process model between pipelines.
//!
//! Every pipeline of a process that embeds with the same model folder shares one model, which
//! computes one batch at a time on all its threads. Without care, a tenant whose handler sends
//! 100,000 texts in one call would hold it for minutes while every other tenant's batch waits.
//! [`FairShare`] cuts each call into turns of at most [`FairShare::turn_texts`] texts and makes
//! every turn wait in one first-in, first-out line (tokio's mutex queues its waiters in order):
//! a caller that finished a turn goes to the back, behind everyone who arrived meanwhile, so
//! the pipelines with work take turns round-robin and a small batch waits at most one turn of
//! each other pipeline. A lone pipeline only pays an uncontended lock per turn.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::Mutex;

use super::{EmbedCacheStats, EmbedError, Embedder};

/// Texts per turn by default: large enough that the model still sorts and packs a turn's texts
/// well, small enough that a turn lasts well under a second on two cores.
pub const DEFAULT_TURN_TEXTS: usize = 256;

/// One model shared by several pipelines, taken in turns.
pub struct FairShare {
    inner: Arc<dyn Embedder>,
    turn_texts: usize,
    line: Mutex<()>,
}

impl FairShare {
    /// Shares `inner`, `turn_texts` texts (at least 1) per turn.
    pub fn new(inner: Arc<dyn Embedder>, turn_texts: usize) -> FairShare {
        FairShare {
            inner,
            turn_texts: turn_texts.max(1),
            line: Mutex::new(()),
        }
    }

    /// Most texts one turn embeds.
    pub fn turn_texts(&self) -> usize {
        self.turn_texts
    }
}

#[async_trait]
impl Embedder for FairShare {
    fn model_id(&self) -> &str {
        self.inner.model_id()
    }

    fn dimensions(&self) -> usize {
        self.inner.dimensions()
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut vectors = Vec::with_capacity(texts.len());
        for turn in texts.chunks(self.turn_texts) {
            let _turn = self.line.lock().await;
            vectors.extend(self.inner.embed(turn).await?);
        }
        Ok(vectors)
    }

    fn cache_stats(&self) -> Option<EmbedCacheStats> {
        self.inner.cache_stats()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;
    use std::time::Duration;

    use super::*;

    /// Takes 10 ms per call, records which caller each call served (the first text names it).
    struct SlowModel {
        served: StdMutex<Vec<String>>,
    }

    #[async_trait]
    impl Embedder for SlowModel {
        fn model_id(&self) -> &str {
            "slow"
        }

        fn dimensions(&self) -> usize {
            1
        }

        async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
            tokio::time::sleep(Duration::from_millis(10)).await;
            self.served.lock().unwrap().push(texts[0].clone());
            Ok(texts.iter().map(|text| vec![text.len() as f32]).collect())
        }
    }

    fn texts(caller: &str, count: usize) -> Vec<String> {
        (0..count).map(|_| caller.to_owned()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_small_batch_waits_one_turn_not_a_whole_large_call() {
        let model = Arc::new(SlowModel {
            served: StdMutex::new(Vec::new()),
        });
        let shared = Arc::new(FairShare::new(model.clone(), 100));
        let flood = {
            let shared = shared.clone();
            tokio::spawn(async move { shared.embed(&texts("flood", 5000)).await })
        };
        // The flood has started its first turn.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let small = shared.embed(&texts("small", 3)).await.unwrap();
        assert_eq!(small.len(), 3);
        let vectors = flood.await.unwrap().unwrap();
        assert_eq!(
            vectors.len(),
            5000,
            "every text of the flood is embedded, in order"
        );
        let served = model.served.lock().unwrap().clone();
        assert_eq!(served.len(), 51);
        let position = served.iter().position(|caller| caller == "small").unwrap();
        assert!(
            position <= 1,
            "the small batch was served after {position} turns of the flood: {served:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn pipelines_with_work_take_turns() {
        let model = Arc::new(SlowModel {
            served: StdMutex::new(Vec::new()),
        });
        let shared = Arc::new(FairShare::new(model.clone(), 10));
        let callers: Vec<_> = ["a", "b", "c"]
            .into_iter()
            .map(|caller| {
                let shared = shared.clone();
                tokio::spawn(async move { shared.embed(&texts(caller, 50)).await })
            })
            .collect();
        for caller in callers {
            assert_eq!(caller.await.unwrap().unwrap().len(), 50);
        }
        let served = model.served.lock().unwrap().clone();
        // After the first round, the order repeats: no caller gets two turns in a row while
        // another waits.
        for window in served.windows(2).take(12) {
            assert_ne!(window[0], window[1], "{served:?}");
        }
    }
}
