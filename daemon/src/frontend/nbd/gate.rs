//! What every new connection passes before the handshake: the connection
//! limits, the TLS credentials a TCP listener offers (swapped whole by a
//! reload; open connections keep the ones they began with), the handshake
//! deadline, where transmission runs, and the counters of everyone turned
//! away.
//!
//! The limits are shaped so that nobody who has not authenticated can lock
//! out somebody who can:
//! - `max_connections` in total, and `max_connections_per_peer` per peer
//!   (a uid, an IPv4 address, an IPv6 /64: one host holds a whole /64);
//! - a reserve per transport: TCP peers never take the last
//!   `reserve(max_connections)` slots, nor Unix peers the TCP ones' share,
//!   so a TCP flood leaves room for a local client and the other way round;
//! - a smaller pool per transport for connections still in the handshake
//!   (`max_handshakes`): a peer that connects and says nothing holds one of
//!   these only until the handshake deadline, and cannot fill the rest.
//!
//! The gate also holds the daemon-wide budget of read and BLOCK_STATUS
//! replies not yet sent (`reply_memory`, `budget.rs`), which every connection shares.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;

use super::budget::ReplyMemory;
use crate::export::peer::PeerKey;
use crate::frontend::tls::{TlsContext, TlsMode};

/// The settings that shape the gate (from `[nbd]`).
#[derive(Debug, Clone)]
pub struct GateSettings {
    pub tls_mode: TlsMode,
    pub max_connections: usize,
    pub max_connections_per_peer: usize,
    /// Connections that may be in the handshake (not authenticated) at once.
    pub max_handshakes: usize,
    /// Both a Unix and a TCP listener exist: each keeps a reserve the
    /// other cannot take.
    pub reserve_per_transport: bool,
    pub handshake_timeout: Duration,
    /// How long a reply may wait for a client that does not read it before
    /// the connection is closed (`replies.rs`).
    pub reply_timeout: Duration,
    /// Bytes that read and BLOCK_STATUS replies not yet sent may hold,
    /// over all connections (`budget.rs`).
    pub reply_memory: u64,
    /// Plaintext connections live on io_uring rings (`ring_reader.rs`).
    pub ring_connections: bool,
}

impl Default for GateSettings {
    fn default() -> Self {
        GateSettings {
            tls_mode: TlsMode::Off,
            max_connections: 1024,
            max_connections_per_peer: 256,
            max_handshakes: 64,
            reserve_per_transport: false,
            handshake_timeout: Duration::from_secs(30),
            reply_timeout: Duration::from_secs(60),
            reply_memory: super::budget::DEFAULT_REPLY_MEMORY,
            ring_connections: true,
        }
    }
}

/// Slots held back from the other transport: an eighth, at least one.
pub fn reserve(max_connections: usize) -> usize {
    (max_connections / 8).max(1).min(max_connections / 2)
}

/// Which kind of listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Unix,
    Tcp,
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
    /// The daemon-wide budget of read and BLOCK_STATUS replies not yet sent.
    pub replies: Arc<ReplyMemory>,
}

#[derive(Debug, Default)]
struct OpenCount {
    total: usize,
    /// Per transport: a TCP flood in the handshake leaves the Unix
    /// listener's pool alone.
    handshaking: HashMap<Transport, usize>,
    per_transport: HashMap<Transport, usize>,
    per_peer: HashMap<PeerKey, usize>,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Total(usize),
    PerPeer(usize),
    /// The other transport's reserve is all that is left.
    Reserved(usize),
    Handshakes(usize),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Total(n) => write!(f, "max_connections ({n}) reached"),
            Refusal::PerPeer(n) => write!(f, "max_connections_per_peer ({n}) reached"),
            Refusal::Reserved(n) => write!(
                f,
                "the last {n} connection slots are kept for the other kind of listener"
            ),
            Refusal::Handshakes(n) => {
                write!(
                    f,
                    "max_handshakes ({n}) connections are already in the handshake"
                )
            }
        }
    }
}

impl Gate {
    pub fn new(settings: GateSettings, tls: Option<TlsContext>) -> Arc<Self> {
        Arc::new(Gate {
            replies: ReplyMemory::new(settings.reply_memory),
            settings,
            tls: ArcSwapOption::from(tls.map(Arc::new)),
            open: Mutex::new(OpenCount::default()),
            counters: GateCounters::default(),
        })
    }

    /// How a connection's replies leave (`direct`: its plaintext socket).
    pub fn reply_route(&self, direct: Option<std::os::fd::RawFd>) -> super::ReplyRoute {
        super::ReplyRoute {
            direct,
            timeout: self.settings.reply_timeout,
            memory: self.replies.clone(),
        }
    }

    /// The credentials new TLS sessions use now.
    pub fn tls(&self) -> Option<Arc<TlsContext>> {
        self.tls.load_full()
    }

    /// Swaps in reloaded credentials; sessions already up keep theirs.
    pub fn replace_tls(&self, tls: TlsContext) {
        self.tls.store(Some(Arc::new(tls)));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OpenCount> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits one more connection from `peer` on `transport`, in the
    /// handshake, or says which limit is hit. The slot is held until the
    /// returned guard drops; its handshake slot until `authenticated`.
    pub fn admit(
        self: &Arc<Self>,
        peer: PeerKey,
        transport: Transport,
    ) -> Result<Admitted, Refusal> {
        // The kernel's connections to devices the daemon attached are not
        // clients: no limit refuses them (a refused resume after a restart
        // fails a mounted filesystem's I/O), and they count in none.
        if peer == PeerKey::Kernel {
            return Ok(Admitted {
                gate: self.clone(),
                peer,
                transport,
                handshaking: false,
            });
        }
        let max = self.settings.max_connections;
        let mut open = self.lock();
        if open.total >= max {
            return Err(Refusal::Total(max));
        }
        if self.settings.reserve_per_transport {
            let held_back = reserve(max);
            let others: usize = open
                .per_transport
                .iter()
                .filter(|(t, _)| **t != transport)
                .map(|(_, n)| *n)
                .sum();
            let room_for_others = held_back.saturating_sub(others);
            if open.total + room_for_others >= max {
                return Err(Refusal::Reserved(held_back));
            }
        }
        if open.handshaking.get(&transport).copied().unwrap_or(0) >= self.settings.max_handshakes {
            return Err(Refusal::Handshakes(self.settings.max_handshakes));
        }
        let mine = open.per_peer.entry(peer).or_default();
        if *mine >= self.settings.max_connections_per_peer {
            return Err(Refusal::PerPeer(self.settings.max_connections_per_peer));
        }
        *mine += 1;
        open.total += 1;
        *open.handshaking.entry(transport).or_default() += 1;
        *open.per_transport.entry(transport).or_default() += 1;
        Ok(Admitted {
            gate: self.clone(),
            peer,
            transport,
            handshaking: true,
        })
    }

    pub fn open_connections(&self) -> usize {
        self.lock().total
    }

    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// One admitted connection's slot.
pub struct Admitted {
    gate: Arc<Gate>,
    peer: PeerKey,
    transport: Transport,
    handshaking: bool,
}

impl Admitted {
    /// The handshake is over: the connection leaves the handshake pool
    /// (it keeps its connection slot).
    pub fn authenticated(&mut self) {
        if std::mem::replace(&mut self.handshaking, false) {
            let mut open = self.gate.lock();
            if let Some(n) = open.handshaking.get_mut(&self.transport) {
                *n = n.saturating_sub(1);
            }
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if self.peer == PeerKey::Kernel {
            return; // never counted (`admit`)
        }
        let mut open = self.gate.lock();
        open.total = open.total.saturating_sub(1);
        if self.handshaking {
            if let Some(n) = open.handshaking.get_mut(&self.transport) {
                *n = n.saturating_sub(1);
            }
        }
        if let Some(n) = open.per_transport.get_mut(&self.transport) {
            *n = n.saturating_sub(1);
        }
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

    fn gate(max: usize, per_peer: usize, handshakes: usize) -> Arc<Gate> {
        Gate::new(
            GateSettings {
                max_connections: max,
                max_connections_per_peer: per_peer,
                max_handshakes: handshakes,
                reserve_per_transport: true,
                ..GateSettings::default()
            },
            None,
        )
    }

    #[test]
    fn limits_total_and_per_peer_and_frees_on_drop() {
        let gate = gate(3, 2, 8);
        let (a, b, t) = (PeerKey::Uid(1), PeerKey::Uid(2), Transport::Tcp);
        let a1 = gate.admit(a, Transport::Unix).unwrap();
        let _a2 = gate.admit(a, Transport::Unix).unwrap();
        assert_eq!(gate.admit(a, t).err(), Some(Refusal::PerPeer(2)));
        let _b1 = gate.admit(b, t).unwrap();
        assert_eq!(gate.admit(b, t).err(), Some(Refusal::Total(3)));
        drop(a1);
        assert_eq!(gate.open_connections(), 2);
        let _b2 = gate.admit(b, t).unwrap();
    }

    /// The lockout the audit found: with max_connections = 4, four idle TCP
    /// sockets used to lock out a Unix client.
    #[test]
    fn a_tcp_flood_leaves_room_for_a_unix_client() {
        let gate = gate(4, 4, 8);
        let mut held = Vec::new();
        for i in 1..=3u8 {
            let ip = std::net::IpAddr::from([127, 0, 0, i]);
            held.push(gate.admit(PeerKey::Ip(ip), Transport::Tcp).unwrap());
        }
        let ip = std::net::IpAddr::from([127, 0, 0, 9]);
        assert_eq!(
            gate.admit(PeerKey::Ip(ip), Transport::Tcp).err(),
            Some(Refusal::Reserved(1))
        );
        let _local = gate.admit(PeerKey::Uid(0), Transport::Unix).unwrap();
    }

    #[test]
    fn the_handshake_pool_is_smaller_and_freed_by_authentication() {
        let gate = gate(16, 16, 2);
        let mut a = gate.admit(PeerKey::Uid(1), Transport::Unix).unwrap();
        let _b = gate.admit(PeerKey::Uid(2), Transport::Unix).unwrap();
        assert_eq!(
            gate.admit(PeerKey::Uid(3), Transport::Unix).err(),
            Some(Refusal::Handshakes(2))
        );
        a.authenticated();
        let _c = gate.admit(PeerKey::Uid(3), Transport::Unix).unwrap();
        assert_eq!(gate.open_connections(), 3);
    }
}
