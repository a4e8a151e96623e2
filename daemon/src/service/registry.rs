//! The volumes the daemon serves, owned by the service layer: each open
//! volume's NBD export beside its key lifecycle (`VolumeKeys`), and the
//! configured volumes that are not open yet.
//!
//! Frontends see only `export::Exports` (names, sizes, allow lists, data
//! areas); key state lives here, read by the control socket, the metrics,
//! the key monitor and reloads. What does not live here: opening volumes
//! (`service/mod.rs`) and retrying the ones that failed (`waiting.rs`).

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::export::{Export, Exports, Unavailable};
use crate::volume::VolumeKeys;

/// One open volume: what NBD serves, and its keys (`None` for temp
/// volumes, whose key lives only in memory).
#[derive(Debug, Clone)]
pub struct Served {
    pub export: Arc<Export>,
    pub keys: Option<Arc<VolumeKeys>>,
}

/// How long a retired volume's connections get to close before its flush
/// goes ahead without them.
const RETIRE_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Checks every served volume's backing is still the one it opened
/// (deleted, replaced or truncated under the daemon fails the volume; a
/// remote backing's owner record has a thread of its own, `volume/claim.rs`);
/// called every second with the retries of waiting volumes.
pub fn check_backings(registry: &Registry) {
    for served in registry.live() {
        let _ = served.volume.data.check_backing();
    }
}

impl Served {
    /// Starts what runs beside a registered volume: a re-encryption that
    /// was in progress resumes. Called only once the volume is in the
    /// registry, so an instance that is opened and then dropped (a reload
    /// changed its config meanwhile) never leaves a worker behind.
    pub fn start(&self) {
        if let Some(keys) = &self.keys {
            keys.resume_reencrypt();
        }
    }

    /// Takes a volume out of service after a reload removed it from the
    /// registry: stops its re-encryption between windows, closes its
    /// connections (waiting for them up to `RETIRE_DRAIN`), then flushes
    /// and releases a remote backing's owner record.
    /// The backing's claim goes with the last reference, so a re-added
    /// instance opens only once this one is gone.
    pub fn retire(&self) -> std::io::Result<()> {
        if let Some(keys) = &self.keys {
            keys.stop_reencrypt();
        }
        self.export.retirement.retire();
        let deadline = std::time::Instant::now() + RETIRE_DRAIN;
        while self.export.metrics.connections() > 0 {
            if std::time::Instant::now() >= deadline {
                tracing::warn!(
                    volume = self.name(),
                    connections = self.export.metrics.connections(),
                    "removed volume: connections still open after {RETIRE_DRAIN:?}; flushing anyway, and its backing stays claimed until they end"
                );
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // Connections that outlived the drain may still write: the record
        // stays, as the local claim does.
        if self.export.metrics.connections() == 0 {
            super::flush_and_release(self);
            return Ok(());
        }
        self.export.volume.data.flush()
    }
}

/// A served volume reads as its export (name, data area, metrics).
impl std::ops::Deref for Served {
    type Target = Export;

    fn deref(&self) -> &Export {
        &self.export
    }
}

/// Clones share one list. Every change goes through here, so the NBD
/// export list and the key list never disagree.
#[derive(Debug, Default, Clone)]
pub struct Registry {
    served: Arc<ArcSwap<Vec<Served>>>,
    exports: Exports,
    /// Instances a reload removed, while anything still holds them (a
    /// connection that outlived the drain): still key- and backing-checked.
    retired: Arc<std::sync::Mutex<Vec<RetiredRef>>>,
}

type RetiredRef = (std::sync::Weak<Export>, Option<std::sync::Weak<VolumeKeys>>);

impl Registry {
    pub fn new(served: Vec<Served>) -> Self {
        let exports = Exports::new(served.iter().map(|s| s.export.clone()).collect());
        Registry {
            served: Arc::new(ArcSwap::from_pointee(served)),
            exports,
            retired: Arc::default(),
        }
    }

    /// Keeps checking `removed` instances for as long as they live
    /// (`live`).
    pub fn watch_retired(&self, removed: &[Served]) {
        let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        retired.retain(|(export, _)| export.strong_count() > 0);
        retired.extend(removed.iter().map(|s| {
            (
                Arc::downgrade(&s.export),
                s.keys.as_ref().map(Arc::downgrade),
            )
        }));
    }

    /// The open volumes and the removed instances still alive: what key
    /// and backing checks cover.
    pub fn live(&self) -> Vec<Served> {
        let mut live: Vec<Served> = self.iter().collect();
        let retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        for (export, keys) in retired.iter() {
            if let Some(export) = export.upgrade() {
                live.push(Served {
                    export,
                    keys: keys.as_ref().and_then(std::sync::Weak::upgrade),
                });
            }
        }
        live
    }

    /// What the NBD server offers.
    pub fn exports(&self) -> &Exports {
        &self.exports
    }

    /// A snapshot of the open volumes.
    pub fn iter(&self) -> std::vec::IntoIter<Served> {
        self.served.load_full().as_ref().clone().into_iter()
    }

    pub fn find(&self, name: &str) -> Option<Served> {
        self.served
            .load()
            .iter()
            .find(|s| s.name() == name)
            .cloned()
    }

    /// The configured volumes not open now.
    pub fn unavailable(&self) -> Arc<Vec<Unavailable>> {
        self.exports.unavailable()
    }

    pub fn set_unavailable(&self, list: Vec<Unavailable>) {
        self.exports.set_unavailable(list);
    }

    /// Adds one volume (a waiting volume that opened).
    pub fn add(&self, served: Served) {
        self.served.rcu(|list| {
            let mut list = list.as_ref().clone();
            list.push(served.clone());
            list
        });
        self.exports.add(served.export);
    }

    /// Replaces the list (reload).
    pub fn replace(&self, list: Vec<Served>) {
        self.exports
            .replace(list.iter().map(|s| s.export.clone()).collect());
        self.served.store(Arc::new(list));
    }
}
