//! The one submit point of the data path: every request the NBD layer has
//! validated becomes an [`Op`], and [`DataArea::submit`] is the only code
//! that knows which engine runs it, when O_DIRECT lets a write take the
//! ring, and how FUA becomes a flush. The NBD layer validates, submits and
//! replies; it never names an engine.
//!
//! Where an op runs:
//! - a remote backing: reads and writes go straight to the backend's NBD
//!   connection (small writes encrypted on the caller's thread, large ones
//!   on a worker); the rest on the thread pool;
//! - a local read of up to `INLINE_READ_MAX` whose data is all in the host
//!   page cache (on tmpfs, every read: its pages are memory,
//!   `io/file.rs`): on the caller's thread, at once (`DataArea::read_cached`;
//!   from 256 KiB on, a ring no connection lives on may share the pieces:
//!   `lend_an_idle_ring`);
//! - a local whole-sector write of up to `INLINE_WRITE_MAX` to a buffered
//!   backing whose sectors no other writer holds: on
//!   the caller's thread (`DataArea::write_inline`), its FUA flush on the
//!   thread pool;
//! - io_uring: reads on a ring; writes on a ring only with O_DIRECT, since
//!   buffered writes on ext4 are punted to io_uring's own io-wq threads
//!   (the inode lock may block), which costs random writes dearly;
//! - everything else on the thread pool (`io/workers.rs`).
//!
//! A read comes back decrypted (`Op::Read`) or sealed (`Op::ReadSealed`):
//! its sectors as read, with the key that opens them, for a frontend that
//! decrypts straight into its client's memory (`sealed.rs`; a large one
//! opened in pieces shared with an idle ring, as a large cached read is).
//! The cached, ring and remote paths seal; the thread pool, and a re-read
//! after a re-encryption moved the checkpoint, hand back plaintext.
//!
//! The paths themselves live beside this file: the caller's-thread fast
//! paths (`inline.rs`, `shared_read.rs`), ring reads and writes
//! (`ring.rs`), remote reads and writes (`remote.rs`), and the checks and
//! completions they share (`unlocked.rs`). Only this folder knows the
//! engine. What lives elsewhere: geometry, keys, range locks and the
//! synchronous operations the thread pool runs (`volume/data/`); the
//! engines (`io/`).

mod inline;
mod plaintext;
mod remote;
mod ring;
mod sealed;
mod shared_read;
mod unlocked;

use std::io;
use std::sync::Arc;

use super::{Allocation, DataArea};
use crate::io::engine::Engine;
use crate::io::IoBuf;
#[cfg(test)]
pub use plaintext::AlwaysReadable;
pub use plaintext::{ClientPlaintext, MemoryGate, WriteData};
pub use sealed::{Destination, SealedRead};

/// Remote-backing writes up to this size are encrypted on the caller's
/// thread: well under the cost of a thread hand-off.
const INLINE_ENCRYPT_MAX: usize = 64 * 1024;

/// One request against the data area, ranges already checked by the
/// caller (and checked again below it).
#[derive(Debug)]
pub enum Op {
    Read {
        offset: u64,
        len: usize,
    },
    /// A read whose sectors come back still encrypted, with the key that
    /// opens them (`Outcome::Sealed`), for a frontend that decrypts into
    /// its client's memory itself; paths that must decrypt hand back
    /// plaintext in the same type.
    ReadSealed {
        offset: u64,
        len: usize,
    },
    Write {
        offset: u64,
        data: WriteData,
        fua: bool,
    },
    Flush,
    WriteZeroes {
        offset: u64,
        len: u64,
        punch: bool,
        fua: bool,
    },
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    /// Which parts of a range are holes, as at most `max_runs` runs.
    Allocation {
        offset: u64,
        len: u64,
        max_runs: usize,
    },
}

/// The kind of an [`Op`], without its data: what metrics count by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write,
    Flush,
    WriteZeroes,
    Trim,
    Allocation,
}

impl Op {
    pub fn kind(&self) -> OpKind {
        match self {
            Op::Read { .. } | Op::ReadSealed { .. } => OpKind::Read,
            Op::Write { .. } => OpKind::Write,
            Op::Flush => OpKind::Flush,
            Op::WriteZeroes { .. } => OpKind::WriteZeroes,
            Op::Trim { .. } => OpKind::Trim,
            Op::Allocation { .. } => OpKind::Allocation,
        }
    }
}

/// What a successful op produced.
#[derive(Debug)]
pub enum Outcome {
    Done,
    Data(IoBuf),
    /// What `Op::ReadSealed` produced.
    Sealed(SealedRead),
    /// Block-status runs from the op's offset.
    Runs(Vec<(u64, Allocation)>),
}

impl DataArea {
    /// Runs `op` on the engine that suits it; `done` gets its outcome, on
    /// whichever thread finished it.
    pub fn submit<F>(self: Arc<Self>, op: Op, done: F)
    where
        F: FnOnce(io::Result<Outcome>) + Send + 'static,
    {
        let remote = self.backing().remote().is_some();
        match op {
            Op::Read { offset, len } => self.read_any((offset, len), false, move |r| {
                done(r.map(|read| Outcome::Data(read.into_plaintext())))
            }),
            Op::ReadSealed { offset, len } => {
                self.read_any((offset, len), true, move |r| done(r.map(Outcome::Sealed)))
            }
            Op::Write { offset, data, fua } if remote => {
                let small = data.len() <= INLINE_ENCRYPT_MAX;
                let write = move || {
                    self.write_remote(offset, data, fua, move |r| done(r.map(|()| Outcome::Done)))
                };
                if small {
                    write();
                } else {
                    crate::io::workers::spawn(write);
                }
            }
            Op::Write { offset, data, fua } => match self.engine.clone().as_ref() {
                Engine::Uring(ring) if self.backing().is_direct() => ring.submit(move |ring| {
                    self.write_on_ring(ring, offset, data, fua, move |r| {
                        done(r.map(|()| Outcome::Done))
                    })
                }),
                _ => self.write_locally(offset, data, fua, done),
            },
            Op::Flush => {
                crate::io::workers::spawn(move || done(self.flush().map(|()| Outcome::Done)))
            }
            Op::WriteZeroes {
                offset,
                len,
                punch,
                fua,
            } => crate::io::workers::spawn(move || {
                let result = self.write_zeroes(offset, len, punch);
                done(self.then_flush(result, fua))
            }),
            Op::Trim { offset, len, fua } => crate::io::workers::spawn(move || {
                let result = self.trim(offset, len);
                done(self.then_flush(result, fua))
            }),
            Op::Allocation {
                offset,
                len,
                max_runs,
            } => crate::io::workers::spawn(move || {
                done(self.allocation(offset, len, max_runs).map(Outcome::Runs))
            }),
        }
    }

    /// A read, sealed where the path allows (`seal`) and plaintext where
    /// it does not: from a remote backing, from the page cache on this
    /// thread, or on an engine.
    fn read_any<F>(self: Arc<Self>, (offset, len): (u64, usize), seal: bool, done: F)
    where
        F: FnOnce(io::Result<SealedRead>) + Send + 'static,
    {
        if self.backing().remote().is_some() {
            return self.read_remote((offset, len), seal, done);
        }
        // Borrows the engine: no reference count on every read.
        let cached = self.read_cached((offset, len), seal, |job| {
            lend_an_idle_ring(&self.engine, job)
        });
        if let Some(result) = cached {
            return done(result);
        }
        match self.engine.clone().as_ref() {
            Engine::Uring(ring) => {
                ring.submit(move |ring| self.read_on_ring(ring, (offset, len), seal, done))
            }
            _ => crate::io::workers::spawn(move || {
                done(self.read(offset, len).map(SealedRead::open))
            }),
        }
    }

    /// A write to a buffered backing (or O_DIRECT without a ring): small
    /// whole-sector writes on this thread (`write_inline`), the rest, and
    /// every FUA's flush, on the thread pool.
    fn write_locally<F>(self: Arc<Self>, offset: u64, data: WriteData, fua: bool, done: F)
    where
        F: FnOnce(io::Result<Outcome>) + Send + 'static,
    {
        match self.write_inline(offset, data) {
            Ok(Ok(())) if fua => {
                crate::io::workers::spawn(move || done(self.flush().map(|()| Outcome::Done)))
            }
            Ok(result) => done(result.map(|()| Outcome::Done)),
            Err(data) => crate::io::workers::spawn(move || {
                let result = self.write_data(offset, data);
                done(self.then_flush(result, fua))
            }),
        }
    }

    /// A successful op with FUA is done once a flush made it durable.
    fn then_flush(&self, result: io::Result<()>, fua: bool) -> io::Result<Outcome> {
        result?;
        if fua {
            self.flush()?;
        }
        Ok(Outcome::Done)
    }
}

/// Starts a shared read's helper (`shared_read.rs`) on a ring that no
/// connection lives on, when the engine has one; `false` otherwise.
fn lend_an_idle_ring(engine: &Engine, job: shared_read::HelperJob) -> bool {
    match engine {
        Engine::Uring(rings) => rings.lend_idle_ring(move |_| job()),
        Engine::Threads => false,
    }
}
