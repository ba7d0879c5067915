//! Hot reload: how a request to take a new plugin version (or a new config file) reaches the
//! pipelines, and the file watcher behind `--watch`.
//!
//! A [`ReloadTrigger`] is the sending side: the binary pulls it on SIGHUP, the watcher on a
//! change of a watched file. Each pipeline holds a [`ReloadListener`]; when it fires, the
//! pipeline loads and instantiates its plugin file off the hot path and swaps the new
//! instance in at the next batch boundary (see [`crate::pipeline`]). Requests that come while
//! one is being loaded fold into one: only the newest matters, since the file is read when the
//! load starts.
//!
//! The watcher uses the `notify` crate (inotify on Linux). It watches the files' folders, not
//! the files, because editors and deploy tools replace a file by renaming a new one over it,
//! which a watch on the old inode would never see. Events come in bursts (a copy writes in
//! pieces), so the watcher waits for a short quiet spell before it reports a change.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tracing::warn;

/// A change is reported once the watched files have been quiet this long: a plugin copied in
/// pieces is loaded whole, not half-written.
pub const SETTLE_TIME: Duration = Duration::from_millis(300);

/// The sending side of reload requests for one or more pipelines. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ReloadTrigger {
    sender: watch::Sender<Option<Instant>>,
}

/// A pipeline's side: resolves each time a reload is requested.
#[derive(Clone, Debug)]
pub struct ReloadListener {
    receiver: watch::Receiver<Option<Instant>>,
}

impl ReloadTrigger {
    /// A trigger that no one listens to yet.
    pub fn new() -> ReloadTrigger {
        ReloadTrigger {
            sender: watch::channel(None).0,
        }
    }

    /// A new listener; it fires only for requests made after this call.
    pub fn listen(&self) -> ReloadListener {
        ReloadListener {
            receiver: self.sender.subscribe(),
        }
    }

    /// Asks every listener to reload; `at` is when the request was made (the signal's arrival),
    /// from which the swap latency is measured.
    pub fn request(&self, at: Instant) {
        self.sender.send_replace(Some(at));
    }
}

impl Default for ReloadTrigger {
    fn default() -> ReloadTrigger {
        ReloadTrigger::new()
    }
}

impl ReloadListener {
    /// Waits for the next request and returns when it was made; `None` once the trigger is
    /// gone (no request can come any more).
    pub async fn requested(&mut self) -> Option<Instant> {
        self.receiver.changed().await.ok()?;
        *self.receiver.borrow_and_update()
    }
}

/// Watches files for changes while it lives.
pub struct FileWatcher {
    _watcher: notify::RecommendedWatcher,
}

/// The watcher could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot watch {path} for changes: {source}")]
pub struct WatchError {
    path: PathBuf,
    #[source]
    source: notify::Error,
}

impl FileWatcher {
    /// Watches `files`; after each burst of changes to any of them, sends the set of those that
    /// changed (as given in `files`) on `changes`, with the time the burst began.
    pub fn start(
        files: &[PathBuf],
        changes: mpsc::UnboundedSender<(Instant, Vec<PathBuf>)>,
    ) -> Result<FileWatcher, WatchError> {
        use notify::Watcher;

        let watched: Vec<(PathBuf, PathBuf)> = files
            .iter()
            .map(|file| (absolute(file), file.clone()))
            .collect();
        let (raw_sender, raw_events) = mpsc::unbounded_channel::<Vec<PathBuf>>();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
                Ok(event) if event.kind.is_create() || event.kind.is_modify() => {
                    let _ = raw_sender.send(event.paths);
                }
                Ok(_) => {}
                Err(error) => warn!(%error, "file watcher error"),
            })
            .map_err(|source| WatchError {
                path: PathBuf::new(),
                source,
            })?;
        let folders: HashSet<PathBuf> = watched
            .iter()
            .map(|(absolute, _)| absolute.parent().unwrap_or(Path::new("/")).to_owned())
            .collect();
        for folder in folders {
            watcher
                .watch(&folder, notify::RecursiveMode::NonRecursive)
                .map_err(|source| WatchError {
                    path: folder.clone(),
                    source,
                })?;
        }
        tokio::spawn(settle(watched, raw_events, changes));
        Ok(FileWatcher { _watcher: watcher })
    }
}

/// Groups raw events into bursts and reports the watched files each burst touched.
async fn settle(
    watched: Vec<(PathBuf, PathBuf)>,
    mut raw_events: mpsc::UnboundedReceiver<Vec<PathBuf>>,
    changes: mpsc::UnboundedSender<(Instant, Vec<PathBuf>)>,
) {
    while let Some(paths) = raw_events.recv().await {
        let began = Instant::now();
        let mut touched: Vec<PathBuf> = Vec::new();
        let mut note = |paths: Vec<PathBuf>| {
            for path in paths {
                for (absolute, given) in &watched {
                    if *absolute == path && !touched.contains(given) {
                        touched.push(given.clone());
                    }
                }
            }
        };
        note(paths);
        loop {
            match tokio::time::timeout(SETTLE_TIME, raw_events.recv()).await {
                Ok(Some(paths)) => note(paths),
                Ok(None) => return,
                Err(_quiet) => break,
            }
        }
        if !touched.is_empty() && changes.send((began, touched)).is_err() {
            return;
        }
    }
}

/// `path` made absolute against the working folder, as notify reports paths.
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_listener_sees_the_newest_request_once() {
        let trigger = ReloadTrigger::new();
        let mut listener = trigger.listen();
        let first = Instant::now();
        trigger.request(first);
        let second = Instant::now();
        trigger.request(second);
        assert_eq!(listener.requested().await, Some(second));
        let pending = tokio::time::timeout(Duration::from_millis(50), listener.requested()).await;
        assert!(pending.is_err(), "no second request was made");
        drop(trigger);
        assert_eq!(listener.requested().await, None);
    }

    #[tokio::test]
    async fn the_watcher_reports_a_file_replaced_by_rename() {
        let folder = tempfile::tempdir().unwrap();
        let plugin = folder.path().join("handler.wasm");
        let other = folder.path().join("other.wasm");
        std::fs::write(&plugin, b"one").unwrap();
        let (sender, mut changes) = mpsc::unbounded_channel();
        let _watcher = FileWatcher::start(std::slice::from_ref(&plugin), sender).unwrap();
        // A file beside it is not reported.
        std::fs::write(&other, b"x").unwrap();
        let staged = folder.path().join("handler.wasm.new");
        std::fs::write(&staged, b"two").unwrap();
        std::fs::rename(&staged, &plugin).unwrap();
        let (_, touched) = tokio::time::timeout(Duration::from_secs(10), changes.recv())
            .await
            .expect("a change is reported")
            .unwrap();
        assert_eq!(touched, vec![plugin]);
    }
}
