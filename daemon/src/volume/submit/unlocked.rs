//! The starts and ends shared by the requests an engine completes on its
//! own thread (ring reads and writes, remote reads and writes): checks,
//! keys and locks before, decryption and the re-read on a moved
//! checkpoint after. What does not fit (partial sectors, a held range, a
//! re-encryption under way) goes to the thread pool here.

use std::io;
use std::sync::Arc;

use super::SealedRead;
use crate::io::IoBuf;
use crate::volume::data::{decrypt_sectors, trim_to, DataKeys};
use crate::volume::{DataArea, WriteData};

impl DataArea {
    /// An unlocked read's sectors from `start`, decrypted with the current
    /// key (the caller checked they are still in place) and trimmed to the
    /// `len` bytes at `offset` the client asked for.
    pub(in crate::volume) fn plaintext(
        &self,
        keys: &DataKeys,
        mut buf: IoBuf,
        start: u64,
        (offset, len): (u64, usize),
    ) -> IoBuf {
        self.timed(|| decrypt_sectors(&keys.current, self.sector, &mut buf, start));
        trim_to(buf, (offset - start) as usize, len)
    }

    /// The start shared by the reads that go out without the range lock
    /// (`read_on_ring`, `read_remote`): `target` says whether (and where)
    /// the engine takes `[at, at + len)` as one request. Reads it does not
    /// take, and reads during a re-encryption, go to the thread pool (and
    /// `None` is returned, as on an error, with `done` called).
    pub(in crate::volume) fn begin_unlocked_read<T, F>(
        self: &Arc<Self>,
        offset: u64,
        len: usize,
        target: impl FnOnce(u64, u64) -> Option<T>,
        done: F,
    ) -> Option<UnlockedRead<T, F>>
    where
        F: FnOnce(io::Result<SealedRead>) + Send + 'static,
    {
        let keys = match self
            .check_range(offset, len as u64)
            .and_then(|()| self.cipher())
        {
            Ok(keys) => keys,
            Err(e) => {
                done(Err(e));
                return None;
            }
        };
        let (start, end) = self.aligned(offset, len as u64);
        let target = match target(self.data_offset + start, end - start) {
            Some(target) if keys.target.is_none() => target,
            _ => {
                let area = self.clone();
                crate::io::workers::spawn(move || {
                    done(area.read(offset, len).map(SealedRead::open))
                });
                return None;
            }
        };
        Some(UnlockedRead {
            keys,
            start,
            end,
            target,
            done,
        })
    }

    /// Completes an unlocked read on the thread its data arrived on:
    /// decrypted here, or with `seal` handed back still encrypted with
    /// the key to open it (`SealedRead`).
    pub(in crate::volume) fn finish_unlocked_read<F>(
        self: Arc<Self>,
        keys: &Arc<DataKeys>,
        (offset, len, start): (u64, usize, u64),
        result: io::Result<IoBuf>,
        seal: bool,
        done: F,
    ) where
        F: FnOnce(io::Result<SealedRead>) + Send + 'static,
    {
        // A re-encryption that began while this read was in flight may
        // have rewritten these sectors: read again, locked.
        if !self.still_in_place(keys) {
            crate::io::workers::spawn(move || done(self.read(offset, len).map(SealedRead::open)));
            return;
        }
        let read = result.map(|buf| {
            if seal {
                let cipher = keys.current.clone();
                SealedRead::sealed(self.clone(), cipher, buf, start, (offset, len))
            } else {
                SealedRead::open(self.plaintext(keys, buf, start, (offset, len)))
            }
        });
        done(read)
    }

    /// The start shared by the writes an engine submits itself
    /// (`write_on_ring`, `write_remote`): whole sectors on a free range
    /// that `target` says the engine takes as one request are encrypted
    /// here (`seal`) and returned with their sectors locked (the caller
    /// releases them when the write completes). Partial sectors
    /// (read-modify-write) and ranges another writer holds must wait,
    /// which an engine's thread never does, so they go to the thread pool
    /// instead (a plain `write`, then a flush for FUA); `None` is returned
    /// then, as on an error, with `done` called.
    pub(in crate::volume) fn begin_async_write<T, F>(
        self: &Arc<Self>,
        offset: u64,
        data: WriteData,
        fua: bool,
        target: impl FnOnce(u64, u64) -> Option<T>,
        done: F,
    ) -> Option<AsyncWrite<T, F>>
    where
        F: FnOnce(io::Result<()>) + Send + 'static,
    {
        let len = data.len() as u64;
        // A FUA write vouches for durability like a FLUSH: not after a
        // failed sync (a remote backend may do FUA itself, unasked).
        let checked = self.check_range(offset, len).and_then(|()| {
            if fua {
                self.backing.check_write_back()
            } else {
                Ok(())
            }
        });
        if let Err(e) = checked {
            done(Err(e));
            return None;
        }
        let (start, end) = self.aligned(offset, len);
        let whole = start == offset && end == offset + len;
        let target = whole
            .then(|| target(self.data_offset + start, len))
            .flatten()
            .filter(|_| self.writers.try_acquire(start, end));
        let Some(target) = target else {
            let area = self.clone();
            crate::io::workers::spawn(move || {
                let result =
                    area.write_data(offset, data)
                        .and_then(|()| if fua { area.flush() } else { Ok(()) });
                done(result)
            });
            return None;
        };
        // Loaded with the range held, so a re-encryption window cannot move
        // the checkpoint across these sectors while they are written.
        let keys = match self.cipher() {
            Ok(keys) => keys,
            Err(e) => {
                self.writers.release(start, end);
                done(Err(e));
                return None;
            }
        };
        let data = match self.seal(&keys, data, start) {
            Ok(data) => data,
            Err(e) => {
                self.writers.release(start, end);
                done(Err(e));
                return None;
            }
        };
        Some(AsyncWrite {
            data,
            start,
            end,
            target,
            done,
        })
    }
}

/// A read going out without the range lock: the key snapshot it will
/// decrypt with, its sector range, and where the engine sends it.
pub(in crate::volume) struct UnlockedRead<T, F> {
    pub(super) keys: Arc<DataKeys>,
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) target: T,
    pub(super) done: F,
}

/// An encrypted write whose sectors `[start, end)` stay locked until it
/// completes.
pub(in crate::volume) struct AsyncWrite<T, F> {
    pub(super) data: IoBuf,
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) target: T,
    pub(super) done: F,
}
