//! What every frontend serves: an [`Export`] is an open volume under its
//! name, with the rules for who may open it (`access.rs`, deciding on a
//! peer's identity from `peer.rs`) and its request metrics, counted by
//! the kind of `volume::Op` (`metrics.rs`); [`Exports`] is the set a
//! reload swaps. Beside them, the configured volumes that are not open
//! (yet): listed, and refused with their state, so a client learns why
//! instead of "no such export".
//!
//! An empty export name selects the volume when exactly one is configured,
//! so `nbd+unix:///?socket=...` works without knowing names; with more, it
//! selects none: which volume is "first" changes when a reload removes one,
//! and a client that reconnects with an empty name (qemu's reconnect-delay,
//! `nbd-client -persist`) must not land on, and write to, another volume.
//!
//! What lives elsewhere: how a frontend turns its wire requests into
//! `volume::Op`s and its flags (`frontend/`); opening volumes and building
//! exports from the config (`service/`). Nothing here knows a protocol.

pub mod access;
pub mod clients;
pub mod metrics;
pub mod peer;

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::volume::Volume;
use access::AllowList;
use metrics::ExportMetrics;

#[derive(Debug)]
pub struct Export {
    pub volume: Volume,
    pub description: String,
    /// Whether clients may discard (TRIM, or WRITE_ZEROES that punches
    /// holes): discards reveal which blocks are unused, as with
    /// dm-crypt's `allow_discards`.
    pub allow_discards: bool,
    /// Who may open it; a reload swaps the list in place.
    pub allow: ArcSwap<AllowList>,
    pub metrics: ExportMetrics,
    /// Who is connected now (`status`).
    pub clients: clients::Clients,
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
    /// The one way to make an export: fresh metrics, not retired.
    pub fn new(
        volume: Volume,
        description: String,
        allow_discards: bool,
        allow: AllowList,
    ) -> Self {
        Export {
            volume,
            description,
            allow_discards,
            allow: ArcSwap::from_pointee(allow),
            metrics: ExportMetrics::default(),
            clients: clients::Clients::default(),
            retirement: Retirement::default(),
        }
    }

    pub fn name(&self) -> &str {
        &self.volume.name
    }

    pub fn size(&self) -> u64 {
        self.volume.data.size()
    }
}

/// A configured volume that is not served now (its key cannot be
/// unwrapped yet, say): clients see it in OPT_LIST and get `reason` on GO.
#[derive(Debug, Clone)]
pub struct Unavailable {
    pub name: String,
    pub state: UnavailableState,
    pub reason: String,
    pub allow: AllowList,
    /// Seconds since the epoch of the first failure.
    pub since: u64,
}

/// Why a configured volume is not served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnavailableState {
    /// A remote volume not tried yet (it opens off the start-up path).
    Connecting,
    /// Its key cannot be unwrapped (yet).
    WaitingForKey,
    /// Anything else; retried.
    OpenFailed,
}

impl UnavailableState {
    /// The name `status`, the metrics and the log use.
    pub fn as_str(self) -> &'static str {
        match self {
            UnavailableState::Connecting => "connecting",
            UnavailableState::WaitingForKey => "waiting-for-key",
            UnavailableState::OpenFailed => "open-failed",
        }
    }
}

impl std::fmt::Display for UnavailableState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
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
