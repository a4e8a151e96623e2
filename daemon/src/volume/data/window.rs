//! The re-encryption window: the only part of the data area that
//! `reencrypt.rs` drives. A window is read and re-encrypted in memory
//! under the writers' range lock (`prepare_window`), written in place
//! (`write_window`), and committed once durable (`commit_window`); a
//! window that saw any write or sync error is written again from the
//! buffer it holds before its checkpoint commits.

use std::io;

use super::{for_nonzero_runs, is_zero, DataArea};
use crate::io::{IoBuf, RangeGuard};

impl DataArea {
    /// First half of re-encrypting `[checkpoint, checkpoint + len)`: takes
    /// the window's range lock, reads the old ciphertext, lets `record`
    /// derive what the journal will keep of it, and turns each written
    /// sector into the target generation's ciphertext, in memory only.
    /// Nothing on disk changes, so this may run while the previous window
    /// is still being synced and committed (the re-encryption worker
    /// overlaps the two; see `reencrypt.rs`). Dropping the result releases
    /// the window.
    pub fn prepare_window<T>(
        &self,
        checkpoint: u64,
        len: u64,
        record: impl FnOnce(&[u8]) -> T,
    ) -> io::Result<PreparedWindow<'_, T>> {
        let guard = self.writers.lock(checkpoint, checkpoint + len);
        let keys = self.cipher()?;
        let target = keys
            .target
            .clone()
            .ok_or_else(|| io::Error::other("no re-encryption in progress"))?;
        let mut buf = IoBuf::new(len as usize);
        self.backing
            .read_data(&mut buf, self.data_offset + checkpoint)?;
        let record = record(&buf);
        let first = checkpoint / self.sector;
        self.timed(|| {
            for (i, sector) in buf.chunks_exact_mut(self.sector as usize).enumerate() {
                // Never-written sectors stay holes/zeros: they read as zeros
                // under any key.
                if !is_zero(sector) {
                    keys.current.decrypt(sector, first + i as u64);
                    target.encrypt(sector, first + i as u64);
                }
            }
        });
        Ok(PreparedWindow {
            _writers: guard,
            rewriting: None,
            checkpoint,
            buf,
            record,
            sync_failures_at_write: 0,
        })
    }

    /// Second half: hands the record to `journal` (which must make it
    /// durable), writes the window in place and syncs. The caller then
    /// records the new checkpoint in the header and only after that drops
    /// the window (and with it the lock).
    ///
    /// If the journal cannot be written nothing in place has changed: the
    /// record is cleared (`clear_journal`) and the error returned, so a
    /// later replay can never overwrite writes clients make once the window
    /// is released. Once the in-place write has begun, failures are retried
    /// with the window held (I/O into it waits) until they succeed or
    /// `stop` says the daemon is going down; the journal then stays valid
    /// for the replay at the next open.
    pub fn write_window<'a, T>(
        &'a self,
        window: &mut PreparedWindow<'a, T>,
        journal: impl FnOnce(&T) -> io::Result<()>,
        clear_journal: impl Fn() -> io::Result<()>,
        stop: &impl Fn() -> bool,
    ) -> io::Result<()> {
        if let Err(e) = journal(&window.record) {
            retry_until(stop, &clear_journal)?;
            return Err(e);
        }
        let end = window.end();
        window.rewriting = Some(self.rewriting.lock(window.checkpoint, end));
        window.sync_failures_at_write = self.backing.write_back_failures();
        retry_until(stop, || self.write_window_in_place(window))
    }

    pub(in crate::volume) fn write_window_in_place<T>(
        &self,
        window: &PreparedWindow<'_, T>,
    ) -> io::Result<()> {
        for_nonzero_runs(&window.buf, self.sector as usize, |run, at| {
            self.backing
                .write_data(run, self.data_offset + window.checkpoint + at)
        })
    }

    /// Makes a written window durable, lets `commit` record its end as the
    /// new checkpoint, then releases it; both steps retried like
    /// `write_window`'s in-place write. A sync that fails, or any failed
    /// sync on the backing since the window was written (another caller
    /// may have been told of it first), may have lost some of the window's
    /// pages: the window is written again from the buffer it holds and
    /// synced again before the checkpoint moves past it.
    pub fn commit_window<T>(
        &self,
        window: PreparedWindow<'_, T>,
        commit: impl Fn(u64) -> io::Result<()>,
        stop: &impl Fn() -> bool,
    ) -> io::Result<()> {
        let written_at = window.sync_failures_at_write;
        retry_until(stop, || match self.backing.sync_rewritten() {
            Ok(()) if self.backing.write_back_failures() == written_at => Ok(()),
            _ => {
                tracing::warn!(
                    checkpoint = window.checkpoint,
                    "a sync failed since this re-encryption window was written; writing it again from memory"
                );
                self.backing
                    .write_durably(|| self.write_window_in_place(&window))
            }
        })?;
        retry_until(stop, || commit(window.end()))
    }
}

/// Runs `step` until it succeeds; between failures waits (1 s, growing to
/// 30 s) unless `stop` is true, in which case the last error is returned.
/// A window of the data area re-encrypted in memory and still locked
/// against client writes (see [`DataArea::prepare_window`]).
pub struct PreparedWindow<'a, T> {
    _writers: RangeGuard<'a>,
    /// Taken once the in-place write begins.
    rewriting: Option<RangeGuard<'a>>,
    checkpoint: u64,
    buf: IoBuf,
    record: T,
    /// The backing's failed-sync count when the in-place write began.
    sync_failures_at_write: u64,
}

impl<T> PreparedWindow<'_, T> {
    pub fn start(&self) -> u64 {
        self.checkpoint
    }

    /// The byte just past the window: the checkpoint once it is committed.
    pub fn end(&self) -> u64 {
        self.checkpoint + self.buf.len() as u64
    }
}

pub(in crate::volume) fn retry_until(
    stop: &impl Fn() -> bool,
    step: impl Fn() -> io::Result<()>,
) -> io::Result<()> {
    let mut pause = std::time::Duration::from_secs(1);
    loop {
        match step() {
            Ok(()) => return Ok(()),
            Err(e) if stop() => return Err(e),
            Err(e) => {
                tracing::error!(
                    "re-encryption window: {e}; retrying in {pause:?} (I/O into this window waits)"
                );
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_secs(30));
            }
        }
    }
}
