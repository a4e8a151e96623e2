//! Reads and writes on an io_uring ring: submitted from the ring's own
//! thread, decrypted (reads) where they complete.

use std::io;
use std::sync::Arc;

use super::unlocked::UnlockedRead;
use crate::io::uring::Ring;
use crate::volume::{DataArea, SealedRead, WriteData};

impl DataArea {
    /// `read` through an io_uring worker: the read is submitted to `ring`,
    /// and decryption runs on the ring's thread when it completes (with
    /// `seal`, wherever the caller opens the `SealedRead`).
    pub fn read_on_ring<F>(
        self: Arc<Self>,
        ring: &mut Ring,
        (offset, len): (u64, usize),
        seal: bool,
        done: F,
    ) where
        F: FnOnce(io::Result<SealedRead>) + Send + 'static,
    {
        let fd = self.backing.data_fd();
        let Some(read) = self.begin_unlocked_read(offset, len, |_, _| fd, done) else {
            return;
        };
        let UnlockedRead {
            keys,
            start,
            end,
            target: fd,
            done,
        } = read;
        let buf = ring.buffer((end - start) as usize);
        ring.read(
            fd,
            buf,
            self.data_offset + start,
            Box::new(move |_, result| {
                self.finish_unlocked_read(&keys, (offset, len, start), result, seal, done)
            }),
        );
    }

    /// `write` (plus a flush when `fua`) through an io_uring worker: the
    /// encrypted sectors are written by the ring (see `begin_async_write`
    /// for what goes to the thread pool instead).
    pub fn write_on_ring<F>(
        self: Arc<Self>,
        ring: &mut Ring,
        offset: u64,
        data: WriteData,
        fua: bool,
        done: F,
    ) where
        F: FnOnce(io::Result<()>) + Send + 'static,
    {
        let fd = self.backing.data_fd();
        let Some(w) = self.begin_async_write(offset, data, fua, |_, _| fd, done) else {
            return;
        };
        let (fd, start, end, done) = (w.target, w.start, w.end, w.done);
        let data = ring.fixed_copy(&w.data).unwrap_or(w.data);
        ring.write(
            fd,
            data,
            self.data_offset + start,
            Box::new(move |ring, result| {
                self.writers.release(start, end);
                match result {
                    // The inner continuation keeps the volume (and so `fd`) alive.
                    Ok(_) if fua => match self.backing.check_write_back() {
                        // A sync failed while this write was in flight.
                        Err(e) => done(Err(e)),
                        Ok(()) => ring.fsync(
                            fd,
                            Box::new(move |_, r| {
                                if let Err(e) = &r {
                                    self.backing.record_sync_failure(e);
                                }
                                // A failure another sync recorded meanwhile
                                // may cover this write too.
                                done(r.and_then(|_| self.backing.check_write_back()))
                            }),
                        ),
                    },
                    other => done(other.map(drop)),
                }
            }),
        );
    }
}
