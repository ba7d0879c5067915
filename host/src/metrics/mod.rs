//! Prometheus metrics of every pipeline in the process, and the HTTP endpoint that serves them
//! with the health checks (see [`server`]).
//!
//! One [`Metrics`] per process holds the registry. Each pipeline gets a [`PipelineMetrics`]:
//! its own labelled counters and histograms, resolved once, so the hot path only adds to
//! atomics (once per batch or host call, never per column). What a pipeline's status already
//! knows (state, confirmed position, events) is read from its [`StatusHandle`] when
//! Prometheus scrapes, not copied as it changes.

pub mod server;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::embed::EmbedCacheStats;
use crate::event::Operation;
use crate::pipeline::{PipelineState, StatusHandle};
use crate::replication::SlotWal;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PipelineLabel {
    pipeline: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    pipeline: String,
    operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabels {
    pipeline: String,
    cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WalStatusLabels {
    pipeline: String,
    wal_status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginLabels {
    pipeline: String,
    digest: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    pipeline: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    pipeline: String,
    state: String,
}

/// Seconds, from 1 ms to about 30 s.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Events per batch, from 1 to about 30,000.
fn batch_size_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 16))
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// The families every pipeline's metrics are drawn from.
#[derive(Debug)]
struct Families {
    events: Family<OperationLabels, Counter>,
    batches: Family<PipelineLabel, Counter>,
    batch_events: HistogramFamily<PipelineLabel>,
    handler_seconds: HistogramFamily<PipelineLabel>,
    handler_failures: Family<CauseLabels, Counter>,
    embed_texts: Family<PipelineLabel, Counter>,
    embed_seconds: HistogramFamily<PipelineLabel>,
    sink_items: Family<OperationLabels, Counter>,
    sink_seconds: HistogramFamily<OperationLabels>,
    reloads: Family<ResultLabels, Counter>,
    reload_seconds: HistogramFamily<PipelineLabel>,
    dead_letters: Family<PipelineLabel, Counter>,
}

/// The metrics of one process: a registry, and the pipelines whose status it reports.
pub struct Metrics {
    registry: Registry,
    families: Families,
    statuses: Arc<Mutex<Vec<StatusHandle>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// An empty registry with every pgstream metric described.
    pub fn new() -> Metrics {
        let families = Families {
            events: Family::default(),
            batches: Family::default(),
            batch_events: Family::new_with_constructor(batch_size_histogram),
            handler_seconds: Family::new_with_constructor(seconds_histogram),
            handler_failures: Family::default(),
            embed_texts: Family::default(),
            embed_seconds: Family::new_with_constructor(seconds_histogram),
            sink_items: Family::default(),
            sink_seconds: Family::new_with_constructor(seconds_histogram),
            reloads: Family::default(),
            reload_seconds: Family::new_with_constructor(seconds_histogram),
            dead_letters: Family::default(),
        };
        let mut registry = Registry::with_prefix("pgstream");
        registry.register(
            "events",
            "Change events handled (their handler call returned ok), by operation",
            families.events.clone(),
        );
        registry.register(
            "batches",
            "Handler calls that returned ok",
            families.batches.clone(),
        );
        registry.register(
            "batch_events",
            "Events per handled batch",
            families.batch_events.clone(),
        );
        registry.register(
            "handler_call_seconds",
            "Duration of handler calls, failed ones included",
            families.handler_seconds.clone(),
        );
        registry.register(
            "handler_failures",
            "Failed handler calls, by cause: refused (the embedder or sink refused a request), \
             unavailable (an outage of either), handler (a trap, a limit, the handler's error)",
            families.handler_failures.clone(),
        );
        registry.register(
            "embed_texts",
            "Texts the handler asked to embed",
            families.embed_texts.clone(),
        );
        registry.register(
            "embed_call_seconds",
            "Duration of embed calls",
            families.embed_seconds.clone(),
        );
        registry.register(
            "sink_items",
            "Points upserted and keys deleted in the sink, by operation",
            families.sink_items.clone(),
        );
        registry.register(
            "sink_write_seconds",
            "Duration of sink writes, by operation",
            families.sink_seconds.clone(),
        );
        registry.register(
            "plugin_reloads",
            "Hot reloads of a pipeline's plugin, by result: applied (the new version runs), \
             unchanged (the file had not changed), rejected (it failed to load or start; the \
             old version runs on)",
            families.reloads.clone(),
        );
        registry.register(
            "plugin_reload_seconds",
            "From a reload request to the first batch handled by the new version",
            families.reload_seconds.clone(),
        );
        registry.register(
            "dead_letters",
            "Events recorded in the dead-letter table because they failed on their own",
            families.dead_letters.clone(),
        );
        let statuses = Arc::new(Mutex::new(Vec::new()));
        registry.register_collector(Box::new(StatusCollector {
            statuses: statuses.clone(),
        }));
        Metrics {
            registry,
            families,
            statuses,
        }
    }

    /// Reports `status` at each scrape and in `/readyz`; a second handle with the same
    /// pipeline name is ignored.
    pub fn watch(&self, status: &StatusHandle) {
        let name = status.snapshot().name;
        let mut statuses = self.statuses.lock().unwrap_or_else(PoisonError::into_inner);
        if !statuses.iter().any(|known| known.snapshot().name == name) {
            statuses.push(status.clone());
        }
    }

    /// Stops reporting the pipeline named `name` (removed from the configuration): its
    /// status leaves the scrapes and `/readyz`.
    pub fn forget(&self, name: &str) {
        self.statuses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|known| known.snapshot().name != name);
    }

    /// The metrics of the pipeline whose status is `status` (which is watched too).
    pub fn pipeline(&self, status: &StatusHandle) -> PipelineMetrics {
        self.watch(status);
        let name = status.snapshot().name;
        let label = PipelineLabel {
            pipeline: name.clone(),
        };
        let operation = |operation: &str| OperationLabels {
            pipeline: name.clone(),
            operation: operation.to_owned(),
        };
        let cause = |cause: &str| CauseLabels {
            pipeline: name.clone(),
            cause: cause.to_owned(),
        };
        let families = &self.families;
        PipelineMetrics {
            inner: Arc::new(PipelineMetricsInner {
                events: OPERATIONS.map(|op| labelled(&families.events, &operation(op_name(op)))),
                batches: labelled(&families.batches, &label),
                batch_events: labelled(&families.batch_events, &label),
                handler_seconds: labelled(&families.handler_seconds, &label),
                failures: [REFUSED, UNAVAILABLE, HANDLER]
                    .map(|name| labelled(&families.handler_failures, &cause(name))),
                embed_texts: labelled(&families.embed_texts, &label),
                embed_seconds: labelled(&families.embed_seconds, &label),
                upserted: labelled(&families.sink_items, &operation("upsert")),
                merged: labelled(&families.sink_items, &operation("merge")),
                deleted: labelled(&families.sink_items, &operation("delete")),
                upsert_seconds: labelled(&families.sink_seconds, &operation("upsert")),
                merge_seconds: labelled(&families.sink_seconds, &operation("merge")),
                delete_seconds: labelled(&families.sink_seconds, &operation("delete")),
                reloads: ReloadOutcome::ALL.map(|outcome| {
                    let labels = ResultLabels {
                        pipeline: name.clone(),
                        result: outcome.name().to_owned(),
                    };
                    labelled(&families.reloads, &labels)
                }),
                reload_seconds: labelled(&families.reload_seconds, &label),
                dead_letters: labelled(&families.dead_letters, &label),
            }),
        }
    }

    /// The statuses of the pipelines reported, in the order they were added.
    pub fn statuses(&self) -> Vec<StatusHandle> {
        self.statuses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Everything in Prometheus' text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail; a collector's error would be a bug of ours.
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(%error, "cannot encode the metrics");
        }
        text
    }
}

/// The metric of `family` for `labels`, created if new. A function, so the family's lock guard
/// ends here: two guards alive in one expression would deadlock when the second creates.
fn labelled<L, M, C>(family: &Family<L, M, C>, labels: &L) -> M
where
    L: Clone + std::hash::Hash + Eq,
    M: Clone,
    C: prometheus_client::metrics::family::MetricConstructor<M>,
{
    family.get_or_create(labels).clone()
}

const REFUSED: &str = "refused";
const UNAVAILABLE: &str = "unavailable";
const HANDLER: &str = "handler";

/// The operations counted, in the order of [`op_index`].
const OPERATIONS: [Operation; 5] = [
    Operation::Insert,
    Operation::Update,
    Operation::Delete,
    Operation::Truncate,
    Operation::Read,
];

fn op_index(op: Operation) -> usize {
    match op {
        Operation::Insert => 0,
        Operation::Update => 1,
        Operation::Delete => 2,
        Operation::Truncate => 3,
        Operation::Read => 4,
    }
}

fn op_name(op: Operation) -> &'static str {
    match op {
        Operation::Insert => "insert",
        Operation::Update => "update",
        Operation::Delete => "delete",
        Operation::Truncate => "truncate",
        Operation::Read => "read",
    }
}

/// Why a handler call failed, as counted.
#[derive(Debug, Clone, Copy)]
pub enum FailureCause {
    /// The embedder or the sink refused a request.
    Refused,
    /// The embedder or the sink was unavailable.
    Unavailable,
    /// The handler trapped, ran out of time or memory, or returned an error.
    Handler,
}

/// What became of a hot-reload request.
#[derive(Debug, Clone, Copy)]
pub enum ReloadOutcome {
    /// The new version was swapped in.
    Applied,
    /// The file held the running version.
    Unchanged,
    /// The new version failed to load or instantiate; the old one runs on.
    Rejected,
}

impl ReloadOutcome {
    const ALL: [ReloadOutcome; 3] = [
        ReloadOutcome::Applied,
        ReloadOutcome::Unchanged,
        ReloadOutcome::Rejected,
    ];

    fn name(self) -> &'static str {
        match self {
            ReloadOutcome::Applied => "applied",
            ReloadOutcome::Unchanged => "unchanged",
            ReloadOutcome::Rejected => "rejected",
        }
    }
}

/// One pipeline's metrics; cheap to clone. [`PipelineMetrics::default`] is registered nowhere
/// (a pipeline built without a process's [`Metrics`] counts into it for nothing).
#[derive(Clone, Default)]
pub struct PipelineMetrics {
    inner: Arc<PipelineMetricsInner>,
}

struct PipelineMetricsInner {
    events: [Counter; OPERATIONS.len()],
    batches: Counter,
    batch_events: Histogram,
    handler_seconds: Histogram,
    failures: [Counter; 3],
    embed_texts: Counter,
    embed_seconds: Histogram,
    upserted: Counter,
    merged: Counter,
    deleted: Counter,
    upsert_seconds: Histogram,
    merge_seconds: Histogram,
    delete_seconds: Histogram,
    reloads: [Counter; 3],
    reload_seconds: Histogram,
    dead_letters: Counter,
}

impl Default for PipelineMetricsInner {
    fn default() -> Self {
        PipelineMetricsInner {
            events: Default::default(),
            batches: Counter::default(),
            batch_events: batch_size_histogram(),
            handler_seconds: seconds_histogram(),
            failures: Default::default(),
            embed_texts: Counter::default(),
            embed_seconds: seconds_histogram(),
            upserted: Counter::default(),
            merged: Counter::default(),
            deleted: Counter::default(),
            upsert_seconds: seconds_histogram(),
            merge_seconds: seconds_histogram(),
            delete_seconds: seconds_histogram(),
            reloads: Default::default(),
            reload_seconds: seconds_histogram(),
            dead_letters: Counter::default(),
        }
    }
}

impl PipelineMetrics {
    /// A handler call that returned ok for `events`, after `took`.
    pub fn batch_handled(&self, events: &[crate::event::ChangeEvent], took: Duration) {
        let inner = &self.inner;
        let mut counts = [0u64; OPERATIONS.len()];
        for event in events {
            counts[op_index(event.operation)] += 1;
        }
        for (counter, count) in inner.events.iter().zip(counts) {
            if count > 0 {
                counter.inc_by(count);
            }
        }
        inner.batches.inc();
        inner.batch_events.observe(events.len() as f64);
        inner.handler_seconds.observe(took.as_secs_f64());
    }

    /// A handler call that failed for `cause`, after `took`.
    pub fn batch_failed(&self, cause: FailureCause, took: Duration) {
        self.inner.failures[cause as usize].inc();
        self.inner.handler_seconds.observe(took.as_secs_f64());
    }

    /// An embed call of `texts` texts that took `took`.
    pub fn embedded(&self, texts: usize, took: Duration) {
        self.inner.embed_texts.inc_by(texts as u64);
        self.inner.embed_seconds.observe(took.as_secs_f64());
    }

    /// A sink upsert of `points` points that took `took`.
    pub fn upserted(&self, points: usize, took: Duration) {
        self.inner.upserted.inc_by(points as u64);
        self.inner.upsert_seconds.observe(took.as_secs_f64());
    }

    /// A sink merge of `points` points that took `took`.
    pub fn merged(&self, points: usize, took: Duration) {
        self.inner.merged.inc_by(points as u64);
        self.inner.merge_seconds.observe(took.as_secs_f64());
    }

    /// `events` events recorded as dead letters.
    pub fn dead_lettered(&self, events: usize) {
        self.inner.dead_letters.inc_by(events as u64);
    }

    /// A sink delete of `keys` keys (or of a table's points: 0) that took `took`.
    pub fn deleted(&self, keys: usize, took: Duration) {
        self.inner.deleted.inc_by(keys as u64);
        self.inner.delete_seconds.observe(took.as_secs_f64());
    }

    /// A hot-reload request that ended as `outcome`.
    pub fn reloaded(&self, outcome: ReloadOutcome) {
        self.inner.reloads[outcome as usize].inc();
    }

    /// The first batch on a reloaded version was handled `latency` after the request.
    pub fn reload_latency(&self, latency: Duration) {
        self.inner.reload_seconds.observe(latency.as_secs_f64());
    }
}

/// Reads each pipeline's status at scrape time.
#[derive(Debug)]
struct StatusCollector {
    statuses: Arc<Mutex<Vec<StatusHandle>>>,
}

impl Collector for StatusCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let handles: Vec<StatusHandle> = self
            .statuses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let snapshots: Vec<_> = handles.iter().map(StatusHandle::snapshot).collect();
        let mut state = encoder.encode_descriptor(
            "pipeline_state",
            "1 for the state each pipeline is in, 0 for the others",
            None,
            MetricType::Gauge,
        )?;
        // Every state gets its series (0 or 1), so an alert on one never lacks data.
        for status in &snapshots {
            for name in PipelineState::NAMES {
                let labels = StateLabels {
                    pipeline: status.name.clone(),
                    state: name.to_owned(),
                };
                let value = i64::from(status.state.name() == name);
                ConstGauge::new(value).encode(state.encode_family(&labels)?)?;
            }
        }
        let mut confirmed = encoder.encode_descriptor(
            "confirmed_lsn",
            "The last WAL position confirmed to Postgres, as a byte offset",
            None,
            MetricType::Gauge,
        )?;
        for status in &snapshots {
            let labels = PipelineLabel {
                pipeline: status.name.clone(),
            };
            // An LSN fits an i64 for the first 8 EiB of WAL.
            let value = i64::try_from(status.confirmed.0).unwrap_or(i64::MAX);
            ConstGauge::new(value).encode(confirmed.encode_family(&labels)?)?;
        }
        let mut since = encoder.encode_descriptor(
            "state_seconds",
            "Seconds each pipeline has been in its current state",
            None,
            MetricType::Gauge,
        )?;
        for status in &snapshots {
            let labels = PipelineLabel {
                pipeline: status.name.clone(),
            };
            let seconds = SystemTime::now()
                .duration_since(status.since)
                .unwrap_or_default()
                .as_secs_f64();
            ConstGauge::new(seconds).encode(since.encode_family(&labels)?)?;
        }
        let mut last_change = encoder.encode_descriptor(
            "last_change_seconds",
            "Seconds since the handler last took a batch of changes (absent before the first)",
            None,
            MetricType::Gauge,
        )?;
        for status in &snapshots {
            let Some(at) = status.last_change else {
                continue;
            };
            let labels = PipelineLabel {
                pipeline: status.name.clone(),
            };
            let seconds = SystemTime::now()
                .duration_since(at)
                .unwrap_or_default()
                .as_secs_f64();
            ConstGauge::new(seconds).encode(last_change.encode_family(&labels)?)?;
        }
        type SlotFigure = fn(&SlotWal) -> Option<i64>;
        let slot_figures: [(&str, &str, SlotFigure); 3] = [
            (
                "replication_lag_bytes",
                "The server's WAL position minus the slot's confirmed position (read every 5 s)",
                |slot| slot.lag_bytes,
            ),
            (
                "slot_retained_wal_bytes",
                "WAL the server keeps for the slot: its position minus the slot's restart_lsn",
                |slot| slot.retained_bytes,
            ),
            (
                "slot_safe_wal_bytes",
                "WAL that can still be written before the slot risks invalidation \
                 (absent when max_slot_wal_keep_size is unlimited)",
                |slot| slot.safe_wal_size,
            ),
        ];
        for (name, help, figure) in slot_figures {
            let mut gauge = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for status in &snapshots {
                let Some(value) = status.slot.as_ref().and_then(figure) else {
                    continue;
                };
                let labels = PipelineLabel {
                    pipeline: status.name.clone(),
                };
                ConstGauge::new(value).encode(gauge.encode_family(&labels)?)?;
            }
        }
        let mut wal_status = encoder.encode_descriptor(
            "slot_wal_status",
            "1 for the slot's wal_status (reserved, extended, unreserved, lost)",
            None,
            MetricType::Gauge,
        )?;
        for status in &snapshots {
            let Some(current) = status
                .slot
                .as_ref()
                .and_then(|slot| slot.wal_status.clone())
            else {
                continue;
            };
            let labels = WalStatusLabels {
                pipeline: status.name.clone(),
                wal_status: current,
            };
            ConstGauge::new(1).encode(wal_status.encode_family(&labels)?)?;
        }
        let mut plugin = encoder.encode_descriptor(
            "plugin_info",
            "1, labelled with the digest (SHA-256, first 12 hex digits) of the plugin version \
             each pipeline runs",
            None,
            MetricType::Gauge,
        )?;
        for status in &snapshots {
            let Some(digest) = status.plugin else {
                continue;
            };
            let labels = PluginLabels {
                pipeline: status.name.clone(),
                digest: digest.to_string(),
            };
            ConstGauge::new(1).encode(plugin.encode_family(&labels)?)?;
        }
        let caches: Vec<_> = handles
            .iter()
            .zip(&snapshots)
            .filter_map(|(handle, status)| Some((&status.name, handle.embed_cache_stats()?)))
            .collect();
        type CacheFigure = fn(&EmbedCacheStats) -> u64;
        let cache_figures: [(&str, &str, CacheFigure); 2] = [
            (
                "embed_cache_hits",
                "Texts whose vector came from the embedding cache (since the pipeline started)",
                |cache| cache.hits,
            ),
            (
                "embed_cache_misses",
                "Texts the embedding cache did not hold (since the pipeline started)",
                |cache| cache.misses,
            ),
        ];
        for (name, help, figure) in cache_figures {
            let mut counter = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (pipeline, cache) in &caches {
                let labels = PipelineLabel {
                    pipeline: (*pipeline).clone(),
                };
                ConstCounter::new(figure(cache)).encode(counter.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// Whether every pipeline is doing its job: streaming, or waiting as a standby for its lease.
pub fn is_ready(state: &PipelineState) -> bool {
    matches!(state, PipelineState::Streaming | PipelineState::Standby)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pipeline_counts_into_the_registry_under_its_name() {
        let metrics = Metrics::new();
        let status = StatusHandle::new("tenant_a");
        let pipeline = metrics.pipeline(&status);
        pipeline.upserted(3, Duration::from_millis(2));
        pipeline.deleted(1, Duration::from_millis(1));
        pipeline.batch_failed(FailureCause::Unavailable, Duration::from_millis(5));
        // A second handle for the same pipeline (a restart) counts into the same series.
        metrics
            .pipeline(&status)
            .upserted(2, Duration::from_millis(2));
        let text = metrics.encode();
        assert!(
            text.contains(
                "pgstream_sink_items_total{pipeline=\"tenant_a\",operation=\"upsert\"} 5"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "pgstream_handler_failures_total{pipeline=\"tenant_a\",cause=\"unavailable\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("pgstream_pipeline_state{pipeline=\"tenant_a\",state=\"starting\"} 1"),
            "{text}"
        );
        assert_eq!(metrics.statuses().len(), 1);
    }
}
