//! The byte budgets a request takes before its reply exists, and gives
//! back once the reply is written (or dropped with its connection).
//!
//! Two budgets, both semaphores in 4 KiB units:
//! - per connection ([`CONNECTION_UNITS`], 64 MiB): what one client can pin,
//!   for every command (one without a payload or a large reply costs one
//!   unit);
//! - daemon-wide, for the replies that can be large ([`ReplyMemory`],
//!   `reply_memory` in `[nbd]`): reads, and BLOCK_STATUS (up to 16 KiB
//!   of descriptors). The data buffer of a read is allocated and filled
//!   only after its units are reserved, so replies that clients do not
//!   read can pin at most `reply_memory` in all, however many connections
//!   there are.
//!
//! A reader that cannot get its units stops taking requests (back-pressure
//! on its socket) until they are free. Waits are first come, first served
//! (tokio's semaphore is fair), so a large read is never starved by small
//! ones; `reply_memory` is at least the per-connection budget, so any one
//! request fits in the whole budget. A reader waiting for units gives up
//! when its connection broke (a reply timed out) or the server stops, so
//! no wait outlives what it waits for. Budget held by a client that never
//! reads is freed when `reply_timeout` closes its connection.
//!
//! What lives elsewhere: which request takes how many units
//! (`transmission::admit`), the readers that wait (`transmission.rs`,
//! `ring_reader.rs`), writing replies and the timeout (`replies.rs`).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The unit of both budgets.
pub const UNIT: u64 = 4096;
/// Per-connection budget: 64 MiB in 4 KiB units.
pub const CONNECTION_UNITS: u32 = 16 * 1024;
/// The smallest `reply_memory`: the per-connection budget, so that any
/// one request (at most 32 MiB) fits.
pub const MIN_REPLY_MEMORY: u64 = CONNECTION_UNITS as u64 * UNIT;
/// The largest `reply_memory` accepted (1 TiB).
pub const MAX_REPLY_MEMORY: u64 = 1 << 40;
/// The default `reply_memory`.
pub const DEFAULT_REPLY_MEMORY: u64 = 512 << 20;

/// The daemon-wide budget for read and BLOCK_STATUS replies not yet sent.
#[derive(Debug)]
pub struct ReplyMemory {
    units: Arc<Semaphore>,
    total: u32,
}

impl ReplyMemory {
    /// A budget of `bytes` (rounded down to whole units, at least one
    /// connection's budget).
    pub fn new(bytes: u64) -> Arc<Self> {
        let total = (bytes / UNIT).clamp(u64::from(CONNECTION_UNITS), MAX_REPLY_MEMORY / UNIT);
        let total = u32::try_from(total).unwrap_or(u32::MAX);
        Arc::new(ReplyMemory {
            units: Arc::new(Semaphore::new(total as usize)),
            total,
        })
    }

    /// Bytes reserved by read and BLOCK_STATUS replies not yet written.
    pub fn pending_bytes(&self) -> u64 {
        let free = self.units.available_permits() as u64;
        (u64::from(self.total) - free.min(u64::from(self.total))) * UNIT
    }

    /// The whole budget in bytes.
    pub fn limit_bytes(&self) -> u64 {
        u64::from(self.total) * UNIT
    }
}

/// How many units a request takes of each budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Units {
    pub connection: u32,
    /// Of the daemon-wide budget: a read's length, a BLOCK_STATUS reply's
    /// largest size, else zero.
    pub replies: u32,
}

impl Units {
    /// One unit of the connection's budget only (an error reply, a
    /// command without data).
    pub const ONE: Units = Units {
        connection: 1,
        replies: 0,
    };
}

/// A request's share of both budgets, given back when dropped.
#[derive(Debug)]
pub struct Permit {
    _connection: OwnedSemaphorePermit,
    _replies: Option<OwnedSemaphorePermit>,
}

/// One connection's view of the budgets.
#[derive(Debug, Clone)]
pub struct Budget {
    connection: Arc<Semaphore>,
    replies: Arc<ReplyMemory>,
}

impl Budget {
    pub fn new(replies: Arc<ReplyMemory>) -> Self {
        Budget {
            connection: Arc::new(Semaphore::new(CONNECTION_UNITS as usize)),
            replies,
        }
    }

    /// The units at once, or `None` (and nothing held) when either budget
    /// lacks them or someone waits before us.
    pub fn try_take(&self, units: Units) -> Option<Permit> {
        let connection = self
            .connection
            .clone()
            .try_acquire_many_owned(units.connection)
            .ok()?;
        let replies = match units.replies {
            0 => None,
            n => Some(self.replies.units.clone().try_acquire_many_owned(n).ok()?),
        };
        Some(Permit {
            _connection: connection,
            _replies: replies,
        })
    }

    /// Waits for the units: the connection's first, then the daemon's.
    /// `None` once the budgets are closed (never, today).
    pub async fn take(&self, units: Units) -> Option<Permit> {
        let connection = self
            .connection
            .clone()
            .acquire_many_owned(units.connection)
            .await
            .ok()?;
        let replies = match units.replies {
            0 => None,
            n => Some(
                self.replies
                    .units
                    .clone()
                    .acquire_many_owned(n)
                    .await
                    .ok()?,
            ),
        };
        Some(Permit {
            _connection: connection,
            _replies: replies,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u32 = 256;

    #[test]
    fn reads_take_both_budgets_and_give_them_back() {
        let memory = ReplyMemory::new(MIN_REPLY_MEMORY);
        let a = Budget::new(memory.clone());
        let b = Budget::new(memory.clone());
        let read = |mib: u32| Units {
            connection: mib * MIB,
            replies: mib * MIB,
        };
        let held = a.try_take(read(40)).unwrap();
        assert_eq!(memory.pending_bytes(), 40 << 20);
        // The other connection has its own 64 MiB, but the daemon only 24.
        assert!(b.try_take(read(32)).is_none());
        // Nothing is held after a refusal.
        assert_eq!(memory.pending_bytes(), 40 << 20);
        let small = b.try_take(read(16)).unwrap();
        // Writes and other commands take the connection's budget only.
        let write = b.try_take(Units {
            connection: 32 * MIB,
            replies: 0,
        });
        assert!(write.is_some());
        drop((held, small, write));
        assert_eq!(memory.pending_bytes(), 0);
    }

    #[tokio::test]
    async fn a_waiting_read_gets_the_budget_when_it_frees() {
        let memory = ReplyMemory::new(MIN_REPLY_MEMORY);
        let (a, b) = (Budget::new(memory.clone()), Budget::new(memory.clone()));
        let whole = Units {
            connection: CONNECTION_UNITS,
            replies: CONNECTION_UNITS,
        };
        let held = a.take(whole).await.unwrap();
        let waiter = tokio::spawn(async move { b.take(whole).await.is_some() });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(held);
        assert!(waiter.await.unwrap());
    }

    #[test]
    fn the_budget_is_bounded() {
        assert_eq!(ReplyMemory::new(0).limit_bytes(), MIN_REPLY_MEMORY);
        assert_eq!(ReplyMemory::new(u64::MAX).limit_bytes(), MAX_REPLY_MEMORY);
        assert_eq!(
            ReplyMemory::new(DEFAULT_REPLY_MEMORY).limit_bytes(),
            512 << 20
        );
    }
}
