//! The set of exports a server offers: each is an open volume under its NBD
//! name. An empty export name selects the volume when exactly one is
//! configured, so `nbd+unix:///?socket=...` works without knowing names;
//! with more, it selects none: which volume is "first" changes when a
//! reload removes one, and a client that reconnects with an empty name
//! (qemu's reconnect-delay, `nbd-client -persist`) must not land on, and
//! write to, another volume. Beside them, the configured volumes that are
//! not open (yet): listed, and refused with their state, so a client learns
//! why instead of "no such export".

use std::sync::Arc;

use arc_swap::ArcSwap;

use super::access::AllowList;
use super::metrics::ExportMetrics;
use crate::volume::Volume;
use crate::wire::nbd::*;

#[derive(Debug)]
pub struct Export {
    pub volume: Volume,
    pub description: String,
    pub allow_discards: bool,
    /// Who may open it; a reload swaps the list in place.
    pub allow: ArcSwap<AllowList>,
    pub metrics: ExportMetrics,
    /// Set when a reload removes the volume: its connections close.
    pub retirement: Retirement,
}

/// Whether an export has been retired (removed by a reload). Connections
/// watch it and close, so the old instance of a volume is gone, and its
/// backing released, before a re-added one can claim the backing.
#[derive(Debug)]
pub struct Retirement(tokio::sync::watch::Sender<bool>);

impl Default for Retirement {
    fn default() -> Self {
        Retirement(tokio::sync::watch::Sender::new(false))
    }
}

impl Retirement {
    /// Tells every connection on the export to close.
    pub fn retire(&self) {
        self.0.send_replace(true);
    }

    pub fn is_retired(&self) -> bool {
        *self.0.borrow()
    }

    pub fn watch(&self) -> tokio::sync::watch::Receiver<bool> {
        self.0.subscribe()
    }
}

impl Export {
    pub fn name(&self) -> &str {
        &self.volume.name
    }

    pub fn size(&self) -> u64 {
        self.volume.data.size()
    }

    /// Transmission flags: flush and FUA always (writes go to a page cache),
    /// multi-conn because every connection shares one backing file, so a
    /// flush on any connection persists writes completed on all of them.
    /// TRIM only when the volume opts in: discards reveal which blocks are
    /// unused, as with dm-crypt's `allow_discards`.
    pub fn transmission_flags(&self) -> u16 {
        let mut flags = TFLAG_HAS_FLAGS
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_SEND_WRITE_ZEROES
            | TFLAG_CAN_MULTI_CONN
            | TFLAG_SEND_CACHE
            | TFLAG_SEND_FAST_ZERO;
        if self.allow_discards {
            flags |= TFLAG_SEND_TRIM;
        }
        flags
    }

    /// Minimum, preferred and maximum block size. Any byte alignment works
    /// (partial sectors are read-modify-written), but whole encryption
    /// sectors avoid that cost, so the sector size is preferred.
    pub fn block_sizes(&self) -> (u32, u32, u32) {
        (1, self.volume.data.sector_size() as u32, MAX_PAYLOAD)
    }
}

/// A configured volume that is not served now (its key cannot be
/// unwrapped yet, say): clients see it in OPT_LIST and get `reason` on GO.
#[derive(Debug, Clone)]
pub struct Unavailable {
    pub name: String,
    /// `waiting-for-key` or `open-failed`.
    pub state: &'static str,
    pub reason: String,
    pub allow: AllowList,
    /// Seconds since the epoch of the first failure.
    pub since: u64,
}

/// The served exports. Clones share one list, which `hostcrypt reload`
/// replaces as a whole: a connection keeps the export it opened, new
/// connections see the new list.
#[derive(Debug, Default, Clone)]
pub struct Exports {
    list: Arc<ArcSwap<Vec<Arc<Export>>>>,
    unavailable: Arc<ArcSwap<Vec<Unavailable>>>,
}

impl Exports {
    pub fn new(list: Vec<Arc<Export>>) -> Self {
        Exports {
            list: Arc::new(ArcSwap::from_pointee(list)),
            unavailable: Default::default(),
        }
    }

    /// The configured volumes not served now.
    pub fn unavailable(&self) -> Arc<Vec<Unavailable>> {
        self.unavailable.load_full()
    }

    pub fn find_unavailable(&self, name: &str) -> Option<Unavailable> {
        self.unavailable
            .load()
            .iter()
            .find(|u| u.name == name)
            .cloned()
    }

    pub fn set_unavailable(&self, list: Vec<Unavailable>) {
        self.unavailable.store(Arc::new(list));
    }

    pub fn find(&self, name: &str) -> Option<Arc<Export>> {
        let list = self.list.load();
        if name.is_empty() {
            let only_one = list.len() == 1 && self.unavailable.load().is_empty();
            return list.first().filter(|_| only_one).cloned();
        }
        list.iter().find(|e| e.name() == name).cloned()
    }

    /// A snapshot of the current exports.
    pub fn iter(&self) -> std::vec::IntoIter<Arc<Export>> {
        self.list.load_full().as_ref().clone().into_iter()
    }

    /// Adds one export (a waiting volume that opened).
    pub fn add(&self, export: Arc<Export>) {
        self.list.rcu(|list| {
            let mut list = list.as_ref().clone();
            list.push(export.clone());
            list
        });
    }

    /// Replaces the list (reload).
    pub fn replace(&self, list: Vec<Arc<Export>>) {
        self.list.store(Arc::new(list));
    }
}
