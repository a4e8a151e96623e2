//! Reads and writes to a remote backing without a thread per request:
//! they go out on the backend's NBD connection at once and complete on
//! its reader thread.

use std::io;
use std::sync::Arc;

use super::unlocked::UnlockedRead;
use crate::volume::{DataArea, SealedRead, WriteData};

impl DataArea {
    /// `read` from a remote backing without a thread per request: the
    /// read goes out at once and is decrypted on the NBD connection's
    /// thread when its reply arrives (with `seal`, wherever the caller
    /// opens the `SealedRead`). Anything else (a re-encryption under way,
    /// a read the backend needs split or aligned) takes the thread pool.
    pub fn read_remote<F>(self: Arc<Self>, (offset, len): (u64, usize), seal: bool, done: F)
    where
        F: FnOnce(io::Result<SealedRead>) + Send + 'static,
    {
        let direct = |at, len| self.backing.remote().filter(|r| r.reads_directly(at, len));
        let Some(read) = self.begin_unlocked_read(offset, len, direct, done) else {
            return;
        };
        let UnlockedRead {
            keys,
            start,
            end,
            target: remote,
            done,
        } = read;
        let area = self.clone();
        remote.submit_read(
            self.data_offset + start,
            (end - start) as usize,
            Box::new(move |result| {
                area.finish_unlocked_read(&keys, (offset, len, start), result, seal, done)
            }),
        );
    }

    /// `write` (plus FUA) to a remote backing, never blocking the caller:
    /// encrypted on the calling thread, then sent; the reply completes it
    /// (see `begin_async_write` for what goes to the thread pool instead,
    /// which here includes writes the backend needs merged).
    pub fn write_remote<F>(self: Arc<Self>, offset: u64, data: WriteData, fua: bool, done: F)
    where
        F: FnOnce(io::Result<()>) + Send + 'static,
    {
        let direct = |at, len| self.backing.remote().filter(|r| r.writes_directly(at, len));
        let Some(w) = self.begin_async_write(offset, data, fua, direct, done) else {
            return;
        };
        let (start, end, done) = (w.start, w.end, w.done);
        let area = self.clone();
        w.target.submit_write(
            w.data,
            self.data_offset + start,
            fua,
            Box::new(move |result| {
                area.writers.release(start, end);
                match result {
                    // A durability loss while this FUA write was in flight
                    // (the backing records it before re-sending anything).
                    Ok(()) if fua => done(area.backing.check_write_back()),
                    other => done(other),
                }
            }),
        );
    }
}
