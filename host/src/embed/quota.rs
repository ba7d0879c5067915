//! A pipeline's own limits on what its handler may ask of the embedder.
//!
//! Pipelines that share one in-process model already take turns on it ([`FairShare`]), so a
//! tenant with a huge call cannot hold the model for long. That still lets one tenant fill the
//! model's whole day with its work, or hand the host 100,000 texts (and their copies) in one
//! call. [`EmbedQuota`] bounds both per pipeline, in front of everything else the pipeline's
//! embedder does (cache included, since a cached text still costs hashing and a lookup):
//!
//! - texts per call and bytes per call: a call over either is refused, not cut, because a
//!   handler that sends more than its pipeline allows has a bug its author must see, and
//!   refusing costs nothing;
//! - texts per second (optional): calls wait their turn, a token bucket holding one second's
//!   worth, so a steady tenant is slowed, never failed. Time spent waiting is a host call's, so
//!   it does not count against the handler's call timeout.
//!
//! [`FairShare`]: super::FairShare

use std::num::NonZeroU32;

use async_trait::async_trait;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use super::{EmbedCacheStats, EmbedError, Embedder};

/// What one pipeline's handler may ask of its embedder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbedLimits {
    /// Most texts in one `embed` call.
    pub max_texts_per_call: usize,
    /// Most bytes (of UTF-8 text, summed) in one `embed` call.
    pub max_bytes_per_call: usize,
    /// Most texts embedded per second, on average over a second; `None`: no limit.
    pub texts_per_second: Option<NonZeroU32>,
}

impl Default for EmbedLimits {
    /// Room for any batch the default settings make (1,000 events, each with several KiB of
    /// text), with no rate limit.
    fn default() -> Self {
        EmbedLimits {
            max_texts_per_call: DEFAULT_MAX_TEXTS_PER_CALL,
            max_bytes_per_call: DEFAULT_MAX_BYTES_PER_CALL,
            texts_per_second: None,
        }
    }
}

/// Texts per call a pipeline may send unless configured otherwise.
pub const DEFAULT_MAX_TEXTS_PER_CALL: usize = 10_000;

/// Bytes per call a pipeline may send unless configured otherwise: 16 MiB.
pub const DEFAULT_MAX_BYTES_PER_CALL: usize = 16 * 1024 * 1024;

/// An embedder seen through one pipeline's [`EmbedLimits`].
pub struct EmbedQuota {
    inner: std::sync::Arc<dyn Embedder>,
    limits: EmbedLimits,
    rate: Option<DefaultDirectRateLimiter>,
}

impl EmbedQuota {
    /// `inner`, limited by `limits`.
    pub fn new(inner: std::sync::Arc<dyn Embedder>, limits: EmbedLimits) -> EmbedQuota {
        let rate = limits
            .texts_per_second
            .map(|per_second| RateLimiter::direct(Quota::per_second(per_second)));
        EmbedQuota {
            inner,
            limits,
            rate,
        }
    }

    /// Waits until the rate limit lets `texts` texts through. The bucket holds one second of
    /// texts, so a larger call is let through in slices of that size, one after the other.
    async fn wait_for_rate(&self, texts: usize) {
        let (Some(rate), Some(per_second)) = (&self.rate, self.limits.texts_per_second) else {
            return;
        };
        let mut left = texts;
        while left > 0 {
            let slice = left.min(per_second.get() as usize);
            let cells = NonZeroU32::new(slice as u32).expect("a slice has at least one text");
            // `slice` is at most the bucket's capacity, so this only ever waits.
            let _ = rate.until_n_ready(cells).await;
            left -= slice;
        }
    }
}

#[async_trait]
impl Embedder for EmbedQuota {
    fn model_id(&self) -> &str {
        self.inner.model_id()
    }

    fn dimensions(&self) -> usize {
        self.inner.dimensions()
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.len() > self.limits.max_texts_per_call {
            return Err(EmbedError::OverLimit {
                asked: format!("{} texts", texts.len()),
                limit: format!("{} texts per call", self.limits.max_texts_per_call),
            });
        }
        let bytes: usize = texts.iter().map(String::len).sum();
        if bytes > self.limits.max_bytes_per_call {
            return Err(EmbedError::OverLimit {
                asked: format!("{bytes} bytes of text"),
                limit: format!("{} bytes per call", self.limits.max_bytes_per_call),
            });
        }
        self.wait_for_rate(texts.len()).await;
        self.inner.embed(texts).await
    }

    fn cache_stats(&self) -> Option<EmbedCacheStats> {
        self.inner.cache_stats()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use super::*;

    /// Returns a one-float vector per text and counts the texts it was given.
    #[derive(Default)]
    struct CountingModel {
        texts: AtomicUsize,
    }

    #[async_trait]
    impl Embedder for CountingModel {
        fn model_id(&self) -> &str {
            "counting"
        }
        fn dimensions(&self) -> usize {
            1
        }
        async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
            self.texts.fetch_add(texts.len(), Ordering::SeqCst);
            Ok(texts.iter().map(|text| vec![text.len() as f32]).collect())
        }
    }

    fn texts(count: usize, each: &str) -> Vec<String> {
        vec![each.to_owned(); count]
    }

    fn limits(max_texts: usize, max_bytes: usize, per_second: Option<u32>) -> EmbedLimits {
        EmbedLimits {
            max_texts_per_call: max_texts,
            max_bytes_per_call: max_bytes,
            texts_per_second: per_second.and_then(NonZeroU32::new),
        }
    }

    #[tokio::test]
    async fn calls_within_the_limits_reach_the_model() {
        let model = Arc::new(CountingModel::default());
        let quota = EmbedQuota::new(model.clone(), limits(3, 9, None));
        let vectors = quota.embed(&texts(3, "abc")).await.unwrap();
        assert_eq!(vectors, vec![vec![3.0]; 3]);
        assert_eq!(model.texts.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn too_many_texts_are_refused_before_the_model() {
        let model = Arc::new(CountingModel::default());
        let quota = EmbedQuota::new(model.clone(), limits(3, 1000, None));
        let error = quota.embed(&texts(4, "a")).await.unwrap_err();
        assert!(!error.is_retryable());
        assert_eq!(
            error.to_string(),
            "the handler asked to embed 4 texts in one call, over its pipeline's limit of 3 \
             texts per call; send smaller calls or raise the limit"
        );
        assert_eq!(model.texts.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn too_many_bytes_are_refused_before_the_model() {
        let model = Arc::new(CountingModel::default());
        let quota = EmbedQuota::new(model.clone(), limits(100, 9, None));
        let error = quota.embed(&texts(2, "hello")).await.unwrap_err();
        assert!(error.to_string().contains("10 bytes of text"), "{error}");
        assert!(error.to_string().contains("9 bytes per call"), "{error}");
        assert_eq!(model.texts.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn the_rate_limit_slows_calls_down_to_the_rate() {
        let model = Arc::new(CountingModel::default());
        // 20 texts/s: the first 20 pass at once (a full bucket), the next 10 need half a second.
        let quota = EmbedQuota::new(model.clone(), limits(100, 1000, Some(20)));
        let started = Instant::now();
        quota.embed(&texts(20, "a")).await.unwrap();
        quota.embed(&texts(10, "a")).await.unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(450),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(model.texts.load(Ordering::SeqCst), 30);
    }

    #[tokio::test]
    async fn a_call_larger_than_the_bucket_waits_for_it_in_slices() {
        let model = Arc::new(CountingModel::default());
        let quota = EmbedQuota::new(model.clone(), limits(100, 1000, Some(10)));
        let started = Instant::now();
        // 10 at once, then 10 more a second later, then 5 half a second after.
        quota.embed(&texts(25, "a")).await.unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(1400),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(model.texts.load(Ordering::SeqCst), 25);
    }
}
