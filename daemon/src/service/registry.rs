//! The volumes the daemon serves, owned by the service layer: each open
//! volume's NBD export beside its key lifecycle (`VolumeKeys`), and the
//! configured volumes that are not open yet.
//!
//! The NBD layer sees only `nbd::Exports` (names, sizes, allow lists, data
//! areas); key state lives here, read by the control socket, the metrics,
//! the key monitor and reloads. What does not live here: opening volumes
//! (`service/mod.rs`) and retrying the ones that failed (`waiting.rs`).

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::nbd::{Export, Exports, Unavailable};
use crate::volume::VolumeKeys;

/// One open volume: what NBD serves, and its keys (`None` for temp
/// volumes, whose key lives only in memory).
#[derive(Debug, Clone)]
pub struct Served {
    pub export: Arc<Export>,
    pub keys: Option<Arc<VolumeKeys>>,
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
}

impl Registry {
    pub fn new(served: Vec<Served>) -> Self {
        let exports = Exports::new(served.iter().map(|s| s.export.clone()).collect());
        Registry {
            served: Arc::new(ArcSwap::from_pointee(served)),
            exports,
        }
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
