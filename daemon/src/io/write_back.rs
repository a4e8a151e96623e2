//! Failed syncs on a backing, remembered. Linux reports a write-back error
//! to one fsync per descriptor and marks the failed pages clean, so the
//! next fsync succeeds over data that never reached the disk (QEMU's
//! file-posix and PostgreSQL treat the page cache as untrustworthy after
//! such an error for the same reason). A remote backend may do the same
//! after a crash, or may lose acknowledged writes it had not flushed when
//! its connection was lost, or apply a timed-out write late
//! (`io/remote/client/mod.rs`): those count as failed syncs too
//! (`record_lost`). So once a sync fails:
//!
//! - a client's FLUSH or FUA fails from then on, until the volume is
//!   reopened (`check`): the writes it would vouch for may be gone, and
//!   nothing here holds them to write again;
//! - a writer that holds what it wrote (a header copy, the journal, a
//!   re-encryption window) may write it again and sync again; it compares
//!   `failures()` from before its write to after its sync to learn whether
//!   a failure touched its pages, even one another caller's sync saw first.
//!
//! What lives elsewhere: the syncs themselves (`backing.rs`), the status
//! and metrics that show the failure (`control/`).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct WriteBack {
    failures: AtomicU64,
    /// The first failure, for status and the errors clients get.
    first: Mutex<Option<String>>,
    /// Held across a sync and its recording (`serialize`).
    syncing: Mutex<()>,
}

impl WriteBack {
    /// Held by a sync until its outcome is recorded, so a second sync
    /// never succeeds while the failure the first saw is not yet counted.
    pub fn serialize(&self) -> std::sync::MutexGuard<'_, ()> {
        self.syncing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a failed sync: counted first, logged after.
    pub fn record(&self, error: &io::Error) {
        self.note(&error.to_string(), "a sync of the backing failed");
    }

    /// Records that acknowledged writes may be lost without a sync having
    /// failed (a remote backing's lost connection or timed-out write).
    pub fn record_lost(&self, why: &str) {
        self.note(why, "acknowledged writes on the backing may be lost");
    }

    fn note(&self, error: &str, what: &str) {
        self.failures.fetch_add(1, Ordering::SeqCst);
        let newly = {
            let mut first = self.first.lock().unwrap_or_else(|p| p.into_inner());
            first
                .is_none()
                .then(|| *first = Some(error.to_string()))
                .is_some()
        };
        if newly {
            tracing::error!(
                "{what} ({error}); writes since the last good sync may be lost, so every later FLUSH and FUA on this volume fails until it is reopened"
            );
        }
    }

    /// How many syncs have failed since the backing was opened.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::SeqCst)
    }

    /// The first failure, if a sync has failed.
    pub fn error(&self) -> Option<String> {
        self.first.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Fails once any sync has failed: what a client's FLUSH asks first.
    pub fn check(&self) -> io::Result<()> {
        // The counter, not the message, decides: it is one atomic load on
        // every FUA write, and it moves before the message is stored.
        if self.failures() == 0 {
            return Ok(());
        }
        let first = self
            .error()
            .unwrap_or_else(|| "a failure being recorded".into());
        Err(io::Error::other(format!(
            "an earlier sync of the backing failed or its writes were lost ({first}); acknowledged writes may be lost, so flushes fail until the volume is reopened"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_sticks_and_is_counted() {
        let wb = WriteBack::default();
        assert!(wb.check().is_ok());
        assert_eq!(wb.failures(), 0);
        wb.record(&io::Error::from_raw_os_error(libc::EIO));
        wb.record(&io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(wb.failures(), 2);
        let e = wb.check().unwrap_err().to_string();
        assert!(e.contains("Input/output error"), "{e}");
        assert!(wb.check().is_err(), "still failing");
    }
}
