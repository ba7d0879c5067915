//! Runs many pipelines in one process and keeps each one's failure inside it.
//!
//! Every pipeline is a task of its own, built from its spec by [`crate::assembly`] and run
//! until the stop request. When one fails, the others do not notice: it is started again
//! after a wait that doubles while it keeps failing (so a crash-looping pipeline does not
//! spin) and resets once it has run healthily for a while. A pipeline whose spec or plugin
//! cannot work (a bad setting, a component that does not compile or start) is marked failed
//! and left alone, since only an operator can fix it. A panic in a pipeline's task is caught
//! like any other failure. With [`Supervisor::coordinated`], a pipeline runs only while this
//! host holds its lease, so several hosts can share one config file.
//!
//! While it runs, a supervisor takes [`Command`]s (the binary sends them on SIGHUP and, with
//! `--watch`, when a watched file changes): reload the plugins, or apply a new set of specs.
//! Applying adds the new pipelines, stops the removed ones, and restarts only those whose spec
//! changed (the old run stops cleanly, confirming its batch in flight, before the new one
//! starts on the same slot); the pipelines whose spec is unchanged reload their plugin file.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use crate::assembly::{self, AssemblyError, SharedResources, assemble_with_fallback};
use crate::config::PipelineSpec;
use crate::coordination::{LEASE_INTERVAL, Lease};
use crate::pipeline::{PipelineError, PipelineState, RunSummary, RunningPlugin, StatusHandle};
use crate::reload::ReloadTrigger;
use crate::replication::SourceConfig;

/// Whether and how failed pipelines are started again.
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    /// Start a failed pipeline again; when false its first failure is its outcome.
    pub restart: bool,
    /// Wait before the first restart; doubled per failure in a row, with jitter.
    pub initial_backoff: Duration,
    /// Longest wait between restarts.
    pub max_backoff: Duration,
    /// A pipeline that ran this long before failing counts as healthy: its next restart
    /// waits `initial_backoff` again.
    pub healthy_after: Duration,
}

impl RestartPolicy {
    /// Never restart: what the single-pipeline command line does (it exits with the error).
    pub fn never() -> RestartPolicy {
        RestartPolicy {
            restart: false,
            ..RestartPolicy::default()
        }
    }
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            restart: true,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            healthy_after: Duration::from_secs(60),
        }
    }
}

/// Why a supervised pipeline stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum PipelineFailure {
    /// It could not be built.
    #[error(transparent)]
    Assembly(#[from] AssemblyError),
    /// It failed while running.
    #[error(transparent)]
    Run(#[from] PipelineError),
    /// Its task panicked.
    #[error("the pipeline's task panicked: {0}")]
    Panicked(String),
}

impl PipelineFailure {
    /// The failure in one short line, for a status display (the log has it whole).
    pub fn summary(&self) -> String {
        match self {
            PipelineFailure::Run(error) => error.summary(),
            other => crate::error_chain::one_line(other),
        }
    }

    /// Whether only a change of its spec or plugin can fix it, so restarting is pointless.
    pub fn needs_operator(&self) -> bool {
        match self {
            PipelineFailure::Assembly(error) => matches!(
                error,
                AssemblyError::Spec(_) | AssemblyError::Plugin { .. } | AssemblyError::Engine(_)
            ),
            PipelineFailure::Run(error) => matches!(
                error,
                PipelineError::Plugin { .. }
                    | PipelineError::Source(crate::source::SourceError::SlotLost { .. })
            ),
            PipelineFailure::Panicked(_) => false,
        }
    }
}

/// How one supervised pipeline ended.
#[derive(Debug)]
pub struct PipelineOutcome {
    /// The pipeline's name.
    pub name: String,
    /// Its last run's summary, or why it stopped for good.
    pub result: Result<RunSummary, PipelineFailure>,
}

/// What an operator asks of a running supervisor.
#[derive(Debug)]
pub enum Command {
    /// Every pipeline whose plugin file is one of `files` (every pipeline when `None`) loads
    /// its plugin file again and swaps the new version in if it changed.
    ReloadPlugins {
        /// The plugin files that changed, or `None` for all.
        files: Option<Vec<PathBuf>>,
        /// When the request was made.
        at: Instant,
    },
    /// Runs `specs` from now on: new names are started, missing names stopped, changed specs
    /// restarted, and unchanged pipelines reload their plugin.
    Apply {
        /// The new set, in the order outcomes are reported.
        specs: Vec<PipelineSpec>,
        /// When the request was made.
        at: Instant,
    },
}

/// Runs a set of pipelines side by side.
pub struct Supervisor {
    shared: Arc<SharedResources>,
    policy: RestartPolicy,
    pipelines: Vec<(PipelineSpec, StatusHandle)>,
    /// This host's identity when pipelines are leased through their sources.
    coordination: Option<String>,
    commands: Option<mpsc::UnboundedReceiver<Command>>,
}

/// One pipeline under supervision.
struct Supervised {
    spec: PipelineSpec,
    status: StatusHandle,
    stop: watch::Sender<bool>,
    reload: ReloadTrigger,
    /// Tells this run's task from an earlier one of the same name.
    run: u64,
    /// Set while its task runs.
    running: bool,
    /// The spec to start once the current run has stopped (its spec changed).
    replacement: Option<PipelineSpec>,
    /// Removed from the set: forgotten once its run has stopped.
    removed: bool,
    outcome: Option<PipelineOutcome>,
}

impl Supervised {
    /// A pipeline not started yet.
    fn new(spec: PipelineSpec, status: StatusHandle) -> Supervised {
        Supervised {
            spec,
            status,
            stop: watch::channel(false).0,
            reload: ReloadTrigger::new(),
            run: 0,
            running: false,
            replacement: None,
            removed: false,
            outcome: None,
        }
    }
}

impl Supervisor {
    /// A supervisor for `specs`, sharing `shared` between them.
    pub fn new(
        shared: Arc<SharedResources>,
        specs: Vec<PipelineSpec>,
        policy: RestartPolicy,
    ) -> Supervisor {
        let pipelines = specs
            .into_iter()
            .map(|spec| {
                let status = StatusHandle::new(&spec.name);
                // Reported from the start, so /readyz sees a pipeline that never assembles.
                shared.metrics().watch(&status);
                (spec, status)
            })
            .collect();
        Supervisor {
            shared,
            policy,
            pipelines,
            coordination: None,
            commands: None,
        }
    }

    /// Takes [`Command`]s from `commands` while running.
    pub fn with_commands(mut self, commands: mpsc::UnboundedReceiver<Command>) -> Supervisor {
        self.commands = Some(commands);
        self
    }

    /// Runs each pipeline only while this host, named `host`, holds its lease on the
    /// pipeline's source (see [`crate::coordination`]), so that several hosts can serve the
    /// same pipelines and each runs on one of them.
    pub fn coordinated(mut self, host: &str) -> Supervisor {
        self.coordination = Some(host.to_owned());
        self
    }

    /// A handle on each pipeline's status, in spec order; valid while and after it runs.
    pub fn statuses(&self) -> Vec<StatusHandle> {
        self.pipelines
            .iter()
            .map(|(_, status)| status.clone())
            .collect()
    }

    /// Runs every pipeline until `shutdown` resolves (each finishes its batch in flight and
    /// confirms it) or until each has stopped on its own; returns the outcomes of the
    /// pipelines of the last set applied, in its order.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Vec<PipelineOutcome> {
        let Supervisor {
            shared,
            policy,
            pipelines,
            coordination,
            mut commands,
        } = self;
        let mut runs = 0u64;
        let mut tasks = JoinSet::new();
        let mut start =
            |entry: &mut Supervised, tasks: &mut JoinSet<(String, u64, PipelineOutcome)>| {
                runs += 1;
                entry.run = runs;
                entry.running = true;
                entry.outcome = None;
                let (stop, stopping) = watch::channel(false);
                entry.stop = stop;
                let task = supervise(
                    entry.spec.clone(),
                    shared.clone(),
                    entry.status.clone(),
                    policy,
                    coordination.clone(),
                    stopping,
                    entry.reload.clone(),
                );
                let (name, run) = (entry.spec.name.clone(), entry.run);
                tasks.spawn(async move { (name, run, task.await) });
            };
        let mut set: Vec<Supervised> = Vec::new();
        for (spec, status) in pipelines {
            let mut entry = Supervised::new(spec, status);
            start(&mut entry, &mut tasks);
            set.push(entry);
        }
        let mut shutdown = std::pin::pin!(shutdown);
        let mut stopping = false;
        loop {
            let joined = tokio::select! {
                _ = &mut shutdown, if !stopping => {
                    stopping = true;
                    for entry in &set {
                        let _ = entry.stop.send(true);
                    }
                    continue;
                }
                command = next_command(&mut commands), if !stopping => {
                    match command {
                        Some(command) => {
                            apply(command, &mut set, shared.metrics());
                            for entry in set.iter_mut().filter(|entry| !entry.running && !entry.removed) {
                                if entry.outcome.is_none() {
                                    start(entry, &mut tasks);
                                }
                            }
                        }
                        None => commands = None,
                    }
                    continue;
                }
                joined = tasks.join_next() => joined,
            };
            let (name, run, outcome) = match joined {
                None => break,
                Some(Ok(done)) => done,
                // `supervise` catches its pipeline's panics itself; this is a panic in the
                // supervision code, which leaves that pipeline without an outcome.
                Some(Err(error)) => {
                    error!(%error, "a supervision task failed");
                    continue;
                }
            };
            let Some(index) = set
                .iter()
                .position(|entry| entry.spec.name == name && entry.run == run)
            else {
                continue;
            };
            let entry = &mut set[index];
            entry.running = false;
            if entry.removed {
                shared.metrics().forget(&name);
                info!(pipeline = %name, "pipeline removed from the configuration; stopped");
                set.remove(index);
            } else if let Some(spec) = entry.replacement.take().filter(|_| !stopping) {
                info!(pipeline = %name, "starting the pipeline with its new settings");
                entry.spec = spec;
                entry.status.set_state(PipelineState::Starting);
                start(entry, &mut tasks);
            } else {
                entry.outcome = Some(outcome);
            }
        }
        set.into_iter().filter_map(|entry| entry.outcome).collect()
    }
}

/// The next command, never when there is no channel.
async fn next_command(commands: &mut Option<mpsc::UnboundedReceiver<Command>>) -> Option<Command> {
    match commands {
        Some(receiver) => receiver.recv().await,
        None => std::future::pending().await,
    }
}

/// Carries out `command` on `set`: asks for reloads and stops, marks what to start. Entries
/// left neither running nor with an outcome are started by the caller.
fn apply(command: Command, set: &mut Vec<Supervised>, metrics: &crate::metrics::Metrics) {
    match command {
        Command::ReloadPlugins { files, at } => {
            for entry in set.iter().filter(|entry| entry.running) {
                let wanted = files
                    .as_ref()
                    .is_none_or(|files| files.contains(&entry.spec.plugin));
                if wanted {
                    entry.reload.request(at);
                }
            }
        }
        Command::Apply { specs, at } => {
            let (mut added, mut changed, mut removed) = (0, 0, 0);
            for entry in set.iter_mut() {
                if specs.iter().all(|spec| spec.name != entry.spec.name) && !entry.removed {
                    removed += 1;
                    entry.removed = true;
                    entry.replacement = None;
                    let _ = entry.stop.send(true);
                }
            }
            set.retain(|entry| {
                let keep = entry.running || !entry.removed;
                if !keep {
                    metrics.forget(&entry.spec.name);
                }
                keep
            });
            let mut ordered = Vec::with_capacity(specs.len());
            for spec in specs {
                let position = set.iter().position(|entry| entry.spec.name == spec.name);
                let Some(position) = position else {
                    added += 1;
                    info!(pipeline = %spec.name, "pipeline added to the configuration; starting it");
                    let status = StatusHandle::new(&spec.name);
                    metrics.watch(&status);
                    ordered.push(Supervised::new(spec, status));
                    continue;
                };
                let mut entry = set.remove(position);
                let current = entry.replacement.as_ref().unwrap_or(&entry.spec);
                if entry.removed {
                    // Removed by an earlier reload and still stopping: it comes back once stopped.
                    entry.removed = false;
                    entry.replacement = Some(spec);
                } else if *current == spec {
                    if entry.running {
                        entry.reload.request(at);
                    }
                } else if entry.running {
                    changed += 1;
                    info!(pipeline = %spec.name, "pipeline settings changed; restarting it once its batch in flight is confirmed");
                    entry.replacement = Some(spec);
                    let _ = entry.stop.send(true);
                } else {
                    // It had stopped (failed, most likely): the new settings get a new start.
                    changed += 1;
                    info!(pipeline = %spec.name, "pipeline settings changed; starting it again");
                    entry.spec = spec;
                    entry.outcome = None;
                    entry.status.set_state(PipelineState::Starting);
                }
                ordered.push(entry);
            }
            // Removed ones still stopping stay at the end until their run ends.
            ordered.append(set);
            *set = ordered;
            info!(added, changed, removed, "configuration applied");
        }
    }
}

/// Builds and runs one pipeline, again and again while the policy says so. With
/// coordination, only while this host holds the pipeline's lease.
async fn supervise(
    spec: PipelineSpec,
    shared: Arc<SharedResources>,
    status: StatusHandle,
    policy: RestartPolicy,
    coordination: Option<String>,
    mut stopping: watch::Receiver<bool>,
    reload: ReloadTrigger,
) -> PipelineOutcome {
    let name = spec.name.clone();
    let source = match assembly::parse_dsn("source.dsn", spec.source.dsn.expose()) {
        Ok(source) => source,
        Err(error) => {
            let failure = PipelineFailure::Assembly(error);
            status.set_state(PipelineState::Failed {
                reason: failure.summary(),
            });
            return PipelineOutcome {
                name,
                result: Err(failure),
            };
        }
    };
    let mut failures_in_a_row = 0u32;
    // The version that ran last: a restart falls back on it when the file no longer loads.
    let running_plugin = RunningPlugin::default();
    let outcome = 'supervising: loop {
        let mut lease = match &coordination {
            None => None,
            Some(host) => match acquire_lease(&spec, &source, host, &status, &mut stopping).await {
                Some(lease) => Some(lease),
                None => {
                    status.set_state(PipelineState::Stopped);
                    break Ok(RunSummary::default());
                }
            },
        };
        loop {
            let started = Instant::now();
            // Stopped by the supervisor's stop request, or by losing the lease.
            let (lease_lost, on_lease_lost) = watch::channel(false);
            let stop = stop_future(stopping.clone(), on_lease_lost);
            let mut attempt = {
                let spec = spec.clone();
                let shared = shared.clone();
                let status = status.clone();
                // Listening before the plugin is loaded: a request during assembly is not
                // lost (at worst the file is read twice).
                let reloads = reload.listen();
                let running_plugin = running_plugin.clone();
                // Its own task, so a panic anywhere in the pipeline ends only this attempt.
                tokio::spawn(async move {
                    let pipeline =
                        assemble_with_fallback(&spec, &shared, running_plugin.get()).await?;
                    let metrics = shared.metrics().pipeline(&status);
                    Ok::<_, PipelineFailure>(
                        pipeline
                            .with_status(status)
                            .with_metrics(metrics)
                            .with_reloads(reloads)
                            .with_running_plugin(running_plugin)
                            .run(stop)
                            .await?,
                    )
                })
            };
            let mut publish = tokio::time::interval(LEASE_INTERVAL);
            let joined = loop {
                tokio::select! {
                    joined = &mut attempt => break joined,
                    _ = publish.tick(), if lease.is_some() => {
                        if let Some(held) = &mut lease {
                            held.publish(&status.snapshot()).await;
                            if !held.is_held() {
                                warn!(pipeline = %name, "lost the pipeline's lease (its connection to the source ended); stopping it here");
                                let _ = lease_lost.send(true);
                            }
                        }
                    }
                }
            };
            let lease_was_lost = *lease_lost.borrow();
            let failure = match joined {
                // Stopped cleanly because the lease went: try to take it again.
                Ok(Ok(_)) if lease_was_lost && !*stopping.borrow() => continue 'supervising,
                Ok(Ok(summary)) => {
                    status.set_state(PipelineState::Stopped);
                    if let Some(held) = &mut lease {
                        held.publish(&status.snapshot()).await;
                    }
                    break 'supervising Ok(summary);
                }
                Ok(Err(failure)) => failure,
                Err(join_error) => PipelineFailure::Panicked(join_error.to_string()),
            };
            let reason = failure.summary();
            if !policy.restart || failure.needs_operator() {
                status.set_state(PipelineState::Failed {
                    reason: reason.clone(),
                });
                if let Some(held) = &mut lease {
                    held.publish(&status.snapshot()).await;
                }
                if policy.restart {
                    let error = crate::error_chain::one_line(&failure);
                    error!(pipeline = %name, %error, "pipeline failed; fix its settings or plugin and restart the host");
                }
                break 'supervising Err(failure);
            }
            if started.elapsed() >= policy.healthy_after {
                failures_in_a_row = 0;
            }
            failures_in_a_row += 1;
            let wait = crate::backoff::jittered(
                failures_in_a_row,
                policy.initial_backoff,
                policy.max_backoff,
            );
            let error = crate::error_chain::one_line(&failure);
            warn!(pipeline = %name, %error, ?wait, failures_in_a_row, "pipeline failed; restarting it after a wait");
            status.set_state(PipelineState::Restarting { reason });
            if let Some(held) = &mut lease {
                held.publish(&status.snapshot()).await;
            }
            if *stopping.borrow() {
                status.set_state(PipelineState::Stopped);
                break 'supervising Err(failure);
            }
            tokio::select! {
                _ = stopping.wait_for(|stop| *stop) => {
                    status.set_state(PipelineState::Stopped);
                    break 'supervising Err(failure);
                }
                _ = tokio::time::sleep(wait) => {
                    info!(pipeline = %name, "restarting");
                }
            }
            if lease.as_ref().is_some_and(|held| !held.is_held()) {
                continue 'supervising;
            }
        }
    };
    PipelineOutcome {
        name,
        result: outcome,
    }
}

/// Waits until this host holds the pipeline's lease (a standby meanwhile), or `None` when a
/// stop is requested first.
async fn acquire_lease(
    spec: &PipelineSpec,
    source: &SourceConfig,
    host: &str,
    status: &StatusHandle,
    stopping: &mut watch::Receiver<bool>,
) -> Option<Lease> {
    let mut announced = false;
    loop {
        match Lease::try_acquire(source, &spec.name, host).await {
            Ok(Some(lease)) => {
                if let Err(error) = lease.evict_stale_stream(spec.slot_name()).await {
                    warn!(pipeline = %spec.name, %error, "cannot check the slot for a stale stream");
                }
                info!(pipeline = %spec.name, host, "took the pipeline's lease; running it here");
                return Some(lease);
            }
            Ok(None) => {
                if !announced {
                    info!(pipeline = %spec.name, "another host runs this pipeline; standing by");
                    announced = true;
                }
                status.set_state(PipelineState::Standby);
            }
            Err(error) => {
                status.set_state(PipelineState::Retrying {
                    reason: format!("cannot reach the source to take the lease: {error}"),
                });
            }
        }
        tokio::select! {
            _ = stopping.wait_for(|stop| *stop) => return None,
            _ = tokio::time::sleep(LEASE_INTERVAL) => {}
        }
    }
}

/// Resolves once the stop is requested (or the supervisor is gone), or the lease is lost.
async fn stop_future(mut stopping: watch::Receiver<bool>, mut lease_lost: watch::Receiver<bool>) {
    tokio::select! {
        _ = stopping.wait_for(|stop| *stop) => {}
        _ = lease_lost.wait_for(|lost| *lost) => {}
    }
}
