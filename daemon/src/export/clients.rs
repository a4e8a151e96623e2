//! Who is connected to an export right now, for `status`: one entry per
//! client (NBD connection or vhost-user session) with its frontend, its
//! peer as the frontend identified it, and when it connected. A frontend
//! registers a client once it is admitted and keeps the guard for the
//! connection's life. Counting and timing live in `metrics.rs`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// One connected client, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientStatus {
    /// `nbd` or `vhost-user`.
    pub frontend: String,
    /// The peer: `unix uid=... gid=... pid=...`, an address, a certificate.
    pub peer: String,
    /// Seconds since the epoch when it connected.
    pub since: u64,
    /// Virtqueues (vhost-user) or connections' worth of queues; absent
    /// where it means nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queues: Option<u16>,
}

/// The clients of one export.
#[derive(Debug, Default)]
pub struct Clients {
    next: AtomicU64,
    list: Mutex<Vec<(u64, ClientStatus)>>,
}

impl Clients {
    /// Lists a client until the guard drops.
    pub fn register(&self, frontend: &str, peer: &str, queues: Option<u16>) -> ClientGuard<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let entry = ClientStatus {
            frontend: frontend.to_owned(),
            peer: peer.to_owned(),
            since,
            queues,
        };
        self.lock().push((id, entry));
        ClientGuard { clients: self, id }
    }

    /// The clients now, oldest first.
    pub fn list(&self) -> Vec<ClientStatus> {
        self.lock().iter().map(|(_, c)| c.clone()).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u64, ClientStatus)>> {
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Keeps a client listed.
pub struct ClientGuard<'a> {
    clients: &'a Clients,
    id: u64,
}

impl Drop for ClientGuard<'_> {
    fn drop(&mut self) {
        self.clients.lock().retain(|(id, _)| *id != self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_is_listed_while_its_guard_lives() {
        let clients = Clients::default();
        let a = clients.register("nbd", "unix uid=0", None);
        let b = clients.register("vhost-user", "unix uid=1", Some(2));
        let listed = clients.list();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[1].frontend, "vhost-user");
        assert_eq!(listed[1].queues, Some(2));
        drop(a);
        assert_eq!(clients.list().len(), 1);
        assert_eq!(clients.list()[0].peer, "unix uid=1");
        drop(b);
        assert!(clients.list().is_empty());
    }
}
