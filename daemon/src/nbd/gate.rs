//! What every new connection passes before the handshake: the connection
//! limits (in total and per peer), the TLS credentials a TCP listener offers
//! (swapped whole by a reload; open connections keep the ones they began
//! with), the handshake deadline, where transmission runs, and the
//! counters of everyone turned away.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;

use super::peer::PeerKey;
use super::tls::{TlsContext, TlsMode};

/// The settings that shape the gate (from `[server]`).
#[derive(Debug, Clone)]
pub struct GateSettings {
    pub tls_mode: TlsMode,
    pub max_connections: usize,
    pub max_connections_per_peer: usize,
    pub handshake_timeout: Duration,
    /// Plaintext connections live on io_uring rings (`ring_reader.rs`).
    pub ring_connections: bool,
}

impl Default for GateSettings {
    fn default() -> Self {
        GateSettings {
            tls_mode: TlsMode::Off,
            max_connections: 1024,
            max_connections_per_peer: 256,
            handshake_timeout: Duration::from_secs(30),
            ring_connections: true,
        }
    }
}

/// Why connections were turned away, for the metrics.
#[derive(Debug, Default)]
pub struct GateCounters {
    pub refused_limit: AtomicU64,
    pub tls_failures: AtomicU64,
    pub tls_required: AtomicU64,
    pub handshake_failures: AtomicU64,
}

#[derive(Debug)]
pub struct Gate {
    pub settings: GateSettings,
    tls: ArcSwapOption<TlsContext>,
    open: Mutex<OpenCount>,
    pub counters: GateCounters,
}

#[derive(Debug, Default)]
struct OpenCount {
    total: usize,
    per_peer: HashMap<PeerKey, usize>,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Total(usize),
    PerPeer(usize),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Total(n) => write!(f, "max_connections ({n}) reached"),
            Refusal::PerPeer(n) => write!(f, "max_connections_per_peer ({n}) reached"),
        }
    }
}

impl Gate {
    pub fn new(settings: GateSettings, tls: Option<TlsContext>) -> Arc<Self> {
        Arc::new(Gate {
            settings,
            tls: ArcSwapOption::from(tls.map(Arc::new)),
            open: Mutex::new(OpenCount::default()),
            counters: GateCounters::default(),
        })
    }

    /// The credentials new TLS sessions use now.
    pub fn tls(&self) -> Option<Arc<TlsContext>> {
        self.tls.load_full()
    }

    /// Swaps in reloaded credentials; sessions already up keep theirs.
    pub fn replace_tls(&self, tls: TlsContext) {
        self.tls.store(Some(Arc::new(tls)));
    }

    /// Admits one more connection from `peer`, or says which limit is hit.
    /// The slot is held until the returned guard drops.
    pub fn admit(self: &Arc<Self>, peer: PeerKey) -> Result<Admitted, Refusal> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.total >= self.settings.max_connections {
            return Err(Refusal::Total(self.settings.max_connections));
        }
        let mine = open.per_peer.entry(peer).or_default();
        if *mine >= self.settings.max_connections_per_peer {
            return Err(Refusal::PerPeer(self.settings.max_connections_per_peer));
        }
        *mine += 1;
        open.total += 1;
        Ok(Admitted {
            gate: self.clone(),
            peer,
        })
    }

    pub fn open_connections(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).total
    }

    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// One admitted connection's slot.
pub struct Admitted {
    gate: Arc<Gate>,
    peer: PeerKey,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.gate.open.lock().unwrap_or_else(|p| p.into_inner());
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                open.per_peer.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_total_and_per_peer_and_frees_on_drop() {
        let gate = Gate::new(
            GateSettings {
                max_connections: 3,
                max_connections_per_peer: 2,
                ..GateSettings::default()
            },
            None,
        );
        let a = PeerKey::Uid(1);
        let b = PeerKey::Uid(2);
        let a1 = gate.admit(a).unwrap();
        let _a2 = gate.admit(a).unwrap();
        assert_eq!(gate.admit(a).err(), Some(Refusal::PerPeer(2)));
        let _b1 = gate.admit(b).unwrap();
        assert_eq!(gate.admit(b).err(), Some(Refusal::Total(3)));
        drop(a1);
        assert_eq!(gate.open_connections(), 2);
        let _b2 = gate.admit(b).unwrap();
    }
}
