//! The write lease: when this client may send writes at all, for a
//! backing whose owner record (`volume/claim.rs`) says who may write it.
//!
//! Without a lease (the default, and `hostcrypt` commands) writes go out
//! as soon as a connection is up. With one, writes, write-zeroes and
//! trims go out only until the lease's deadline: the owner renews it each
//! time a read of the header, *issued* before the new deadline minus the
//! lease length, showed the record is still its own. A write submitted
//! while the lease has run out is held, not failed (a slow backend is not
//! an error), and is sent when the lease is renewed, or failed by the
//! watchdog like any request that waited too long. Re-sends after a
//! reconnect obey the same rule. Once revoked (the record names another
//! owner), every write not yet on a live connection fails at once and no
//! write is sent again.
//!
//! The lease is checked again when a queued write is about to be written
//! to the socket (`link.rs`): one that waited behind a write blocked on a
//! full socket past the lease goes back to the table, held. So a daemon
//! that was taken over hands no write to the kernel more than one lease
//! after the taker's record was written; what it handed over before (in
//! the socket's buffer, or the server's queue) may still land later
//! (`fence.rs` has the same limit), which only fencing the old host at
//! the storage can stop.
//! Reads and FLUSH are never held: a FLUSH covers writes already sent.

use std::time::Instant;

use super::*;

/// Whether writes may go out now.
#[derive(Debug, Clone, Default)]
pub(super) enum WriteLease {
    /// No owner record to keep: writes go out.
    #[default]
    Unrestricted,
    /// Writes go out until this instant.
    Until(Instant),
    /// The backing belongs to someone else now: no write is sent again.
    Revoked(String),
}

impl WriteLease {
    /// `Ok(true)`: send; `Ok(false)`: hold until renewed; `Err`: fail.
    pub(super) fn allows(&self, now: Instant) -> Result<bool, String> {
        match self {
            WriteLease::Unrestricted => Ok(true),
            WriteLease::Until(deadline) => Ok(now < *deadline),
            WriteLease::Revoked(reason) => Err(reason.clone()),
        }
    }
}

impl NbdClient {
    /// Holds writes from now on until `renew_write_lease` allows them.
    pub fn require_write_lease(&self) {
        let mut state = self.shared.lock();
        if matches!(state.lease, WriteLease::Unrestricted) {
            state.lease = WriteLease::Until(Instant::now());
        }
    }

    /// Lets writes go out until `deadline`, and sends the writes held
    /// meanwhile. A revoked lease stays revoked.
    pub fn renew_write_lease(&self, deadline: Instant) {
        if self.shared.extend_lease(deadline) {
            // Sent from a thread of its own: a full socket must not stop
            // the caller (the owner-record check) from checking.
            let shared = self.shared.clone();
            let _ = std::thread::Builder::new()
                .name("lease-resend".into())
                .spawn(move || shared.redispatch(None));
        }
    }

    /// Ends writing for good: every write not yet on a live connection
    /// fails with `reason`, and none is sent again.
    pub fn revoke_writes(&self, reason: String) {
        self.shared.revoke_lease(reason);
    }
}

impl Shared {
    /// Takes the writes out of `batch` (about to be written to a socket)
    /// when the lease does not allow them now: each goes back to the table
    /// unassigned, to be sent at the next renewal, or, after a revocation,
    /// is returned to be failed (by the caller, outside its locks). Only an
    /// entry that is still its request's current send is touched: one left
    /// in the queue of a connection that died was re-sent elsewhere, and
    /// is skipped by the writer anyway (its generation is gone).
    pub(super) fn hold_unleased(&self, batch: &mut Vec<link::Outgoing>) -> Vec<(Pending, String)> {
        let mut refused = Vec::new();
        let mut state = self.lock();
        let revoked = match state.lease.allows(Instant::now()) {
            Ok(true) => return refused,
            Ok(false) => None,
            Err(reason) => Some(reason),
        };
        batch.retain(|out| {
            let Some(w) = out.write() else {
                return true;
            };
            let current = state
                .pending
                .get(&w.cookie)
                .is_some_and(|p| p.sent_on == Some((w.slot, out.generation())));
            if !current {
                return true;
            }
            match &revoked {
                Some(reason) => {
                    refused.extend(state.pending.remove(&w.cookie).map(|p| (p, reason.clone())));
                }
                None => {
                    if let Some(p) = state.pending.get_mut(&w.cookie) {
                        p.sent_on = None;
                        // Never reached the kernel: nothing of it can
                        // land late (`fence.rs`, `watchdog.rs`).
                        if w.first_send {
                            p.ever_sent = false;
                        }
                    }
                }
            }
            false
        });
        refused
    }

    /// Sets the lease to last until `deadline` (never shortens it, never
    /// undoes a revocation); whether writes are held that may now go.
    fn extend_lease(&self, deadline: Instant) -> bool {
        let mut state = self.lock();
        match state.lease {
            WriteLease::Revoked(_) => return false,
            WriteLease::Until(old) if old >= deadline => return false,
            _ => state.lease = WriteLease::Until(deadline),
        }
        state
            .pending
            .values()
            .any(|p| p.writes() && p.sent_on.is_none())
    }

    #[cfg(test)]
    pub(super) fn renew_lease(&self, deadline: Instant) {
        if self.extend_lease(deadline) {
            self.redispatch(None);
        }
    }

    pub(super) fn revoke_lease(&self, reason: String) {
        let held: Vec<Pending> = {
            let mut state = self.lock();
            state.lease = WriteLease::Revoked(reason.clone());
            let cookies: Vec<u64> = state
                .pending
                .iter()
                .filter(|(_, p)| p.writes() && p.sent_on.is_none())
                .map(|(c, _)| *c)
                .collect();
            cookies
                .iter()
                .filter_map(|c| state.pending.remove(c))
                .collect()
        };
        for p in held {
            fail(p, io::Error::other(reason.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_lease_allows_until_its_deadline_and_a_revoked_one_never() {
        let now = Instant::now();
        assert_eq!(WriteLease::Unrestricted.allows(now), Ok(true));
        let lease = WriteLease::Until(now + Duration::from_secs(1));
        assert_eq!(lease.allows(now), Ok(true));
        assert_eq!(lease.allows(now + Duration::from_secs(1)), Ok(false));
        let revoked = WriteLease::Revoked("taken over".into());
        assert_eq!(revoked.allows(now), Err("taken over".into()));
    }
}
