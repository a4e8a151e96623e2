//! A volume's backing, local or remote, behind one type: a file or block
//! device (`file.rs`) or an NBD export (`remote/`), chosen by whether
//! the configured `backing` is an NBD URI; for tests, memory
//! (`memory.rs`). Callers that need the local
//! specifics (the io_uring engine's descriptor, O_DIRECT, holes) ask, and
//! get `None` or a plain answer for a remote one. Opening to write claims a
//! local backing for one owner (`owner.rs`); opening to read does not.

use std::io;
use std::path::Path;
use std::sync::Arc;

use super::file::FileBacking;
use super::memory::MemoryBacking;
use super::remote::RemoteBacking;
use super::write_back::WriteBack;
use crate::io::remote::client::NbdUri;

#[derive(Debug)]
pub struct Backing {
    kind: Kind,
    /// Syncs that failed on it (`write_back.rs`), and a remote backing's
    /// durability losses, which count as such.
    write_back: Arc<WriteBack>,
}

#[derive(Debug)]
enum Kind {
    File(FileBacking),
    Remote(RemoteBacking),
    Memory(MemoryBacking),
}

/// Whether a configured backing names an NBD export rather than a path.
pub fn is_remote(path: &Path) -> bool {
    path.to_str().is_some_and(NbdUri::looks_like)
}

impl Backing {
    fn new(kind: Kind) -> Self {
        let write_back = Arc::new(WriteBack::default());
        if let Kind::Remote(r) = &kind {
            let record = write_back.clone();
            r.on_durability_lost(Arc::new(move |loss| record.record_lost(&loss.to_string())));
        }
        Backing { kind, write_back }
    }

    /// Opens an existing backing read-write (connects to a remote one).
    pub fn open(path: &Path) -> io::Result<Self> {
        if is_remote(path) {
            return RemoteBacking::connect(path)
                .map(Kind::Remote)
                .map(Backing::new);
        }
        FileBacking::open(path).map(Kind::File).map(Backing::new)
    }

    /// Opens a backing, creating a regular file if it does not exist.
    pub fn open_or_create(path: &Path) -> io::Result<Self> {
        if is_remote(path) {
            return RemoteBacking::connect(path)
                .map(Kind::Remote)
                .map(Backing::new);
        }
        FileBacking::open_or_create(path)
            .map(Kind::File)
            .map(Backing::new)
    }

    /// Opens a backing only to read it: a local one read-only and without
    /// the writer's claim (`owner.rs`), so it works while it is served.
    pub fn open_read_only(path: &Path) -> io::Result<Self> {
        if is_remote(path) {
            return RemoteBacking::connect(path)
                .map(Kind::Remote)
                .map(Backing::new);
        }
        FileBacking::open_read_only(path)
            .map(Kind::File)
            .map(Backing::new)
    }

    /// A backing in memory of `len` bytes, for tests (`memory.rs`).
    pub fn memory(len: u64) -> io::Result<Self> {
        MemoryBacking::new(len).map(Kind::Memory).map(Backing::new)
    }

    /// The in-memory backing, to inject faults; `None` for any other.
    pub fn as_memory(&self) -> Option<&MemoryBacking> {
        match &self.kind {
            Kind::Memory(m) => Some(m),
            _ => None,
        }
    }

    pub fn remote(&self) -> Option<&RemoteBacking> {
        match &self.kind {
            Kind::Remote(r) => Some(r),
            Kind::File(_) | Kind::Memory(_) => None,
        }
    }

    /// Routes data-area I/O through an O_DIRECT descriptor (local only).
    pub fn enable_direct(&mut self) -> io::Result<()> {
        match &mut self.kind {
            Kind::File(f) => f.enable_direct(),
            Kind::Remote(_) | Kind::Memory(_) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "direct = true applies to local backings, not to a remote export",
            )),
        }
    }

    /// The descriptor the io_uring engine submits data-area I/O on; a
    /// remote backing has none.
    pub fn data_fd(&self) -> Option<std::os::unix::io::RawFd> {
        match &self.kind {
            Kind::File(f) => Some(f.data_fd()),
            Kind::Remote(_) | Kind::Memory(_) => None,
        }
    }

    pub fn is_direct(&self) -> bool {
        matches!(&self.kind, Kind::File(f) if f.is_direct())
    }

    /// See `FileBacking::set_cache_large_writes`; a remote backing has no
    /// page cache here.
    pub fn set_cache_large_writes(&self, cache: bool) {
        if let Kind::File(f) = &self.kind {
            f.set_cache_large_writes(cache);
        }
    }

    pub fn uncached_large_writes(&self) -> bool {
        matches!(&self.kind, Kind::File(f) if f.uncached_large_writes())
    }

    pub fn path(&self) -> &Path {
        match &self.kind {
            Kind::File(f) => f.path(),
            Kind::Remote(r) => r.path(),
            Kind::Memory(m) => m.path(),
        }
    }

    pub fn is_block_device(&self) -> bool {
        matches!(&self.kind, Kind::File(f) if f.is_block_device())
    }

    /// A block device or a remote export: its size is given, it cannot be
    /// truncated, and old contents stay until overwritten.
    pub fn is_fixed_size(&self) -> bool {
        match &self.kind {
            Kind::File(f) => f.is_block_device(),
            Kind::Remote(_) => true,
            Kind::Memory(_) => false,
        }
    }

    /// The next allocated byte at or after `offset` (a remote export
    /// reports everything as allocated).
    pub fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        match &self.kind {
            Kind::File(f) => f.next_data(offset),
            Kind::Remote(_) | Kind::Memory(_) => Ok(Some(offset)),
        }
    }

    pub fn next_hole(&self, offset: u64) -> io::Result<u64> {
        match &self.kind {
            Kind::File(f) => f.next_hole(offset),
            Kind::Remote(_) | Kind::Memory(_) => Ok(u64::MAX),
        }
    }

    /// See `FileBacking::check_identity`; a remote backing is checked by
    /// its own connection monitor.
    pub fn check_identity(&self, needed: u64) -> io::Result<()> {
        match &self.kind {
            Kind::File(f) => f.check_identity(needed),
            Kind::Remote(_) | Kind::Memory(_) => Ok(()),
        }
    }

    pub fn size(&self) -> io::Result<u64> {
        match &self.kind {
            Kind::File(f) => f.size(),
            Kind::Remote(r) => Ok(r.size()),
            Kind::Memory(m) => Ok(m.size()),
        }
    }

    pub fn logical_block_size(&self) -> io::Result<u32> {
        match &self.kind {
            Kind::File(f) => f.logical_block_size(),
            Kind::Remote(_) | Kind::Memory(_) => Ok(512),
        }
    }

    pub fn set_len(&self, len: u64) -> io::Result<()> {
        match &self.kind {
            Kind::File(f) => f.set_len(len),
            Kind::Remote(r) => r.set_len(len),
            Kind::Memory(m) => m.set_len(len),
        }
    }

    /// Fills `buf` from `offset` (past the end of a file: zeros).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match &self.kind {
            Kind::File(f) => f.read_at(buf, offset),
            Kind::Remote(r) => r.read_at(buf, offset),
            Kind::Memory(m) => m.read_at(buf, offset),
        }
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match &self.kind {
            Kind::File(f) => f.write_at(buf, offset),
            Kind::Remote(r) => r.write_at(buf, offset),
            Kind::Memory(m) => m.write_at(buf, offset),
        }
    }

    /// See `FileBacking::read_cached`; always a miss on a remote backing.
    pub fn read_cached(&self, buf: &mut [u8], offset: u64) -> bool {
        match &self.kind {
            Kind::File(f) => f.read_cached(buf, offset),
            Kind::Remote(_) | Kind::Memory(_) => false,
        }
    }

    /// Like `read_at`, through the O_DIRECT descriptor when enabled.
    pub fn read_data(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match &self.kind {
            Kind::File(f) => f.read_data(buf, offset),
            Kind::Remote(r) => r.read_at(buf, offset),
            Kind::Memory(m) => m.read_at(buf, offset),
        }
    }

    pub fn write_data(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match &self.kind {
            Kind::File(f) => f.write_data(buf, offset),
            Kind::Remote(r) => r.write_at(buf, offset),
            Kind::Memory(m) => m.write_at(buf, offset),
        }
    }

    /// Makes every completed write durable (fdatasync; FLUSH remotely),
    /// for a client's FLUSH or FUA: fails for good once any sync has
    /// failed (`write_back.rs`).
    pub fn sync(&self) -> io::Result<()> {
        // The check, the sync and its recording under one lock, and a
        // failure recorded meanwhile by anyone (a remote backing's lost
        // connection) fails this sync too: a FLUSH waiting behind a failed
        // one must not succeed on the error the kernel reports only once.
        let _one_at_a_time = self.write_back.serialize();
        self.write_back.check()?;
        let before = self.write_back.failures();
        self.sync_raw()?;
        if self.write_back.failures() != before {
            return self.write_back.check();
        }
        Ok(())
    }

    /// A sync for a writer that has just written everything it needs
    /// durable and holds it to write again: runs even after an earlier
    /// failure (which `write_back_failures` tells it about), and records
    /// its own.
    pub fn sync_rewritten(&self) -> io::Result<()> {
        // One sync at a time, recorded before the next may start: Linux
        // tells only one fsync on a descriptor of a write-back error, and
        // a concurrent one must not return Ok before the failure counts.
        let _one_at_a_time = self.write_back.serialize();
        self.sync_raw()
    }

    /// One sync, its failure recorded; the caller holds `serialize`.
    fn sync_raw(&self) -> io::Result<()> {
        let result = match &self.kind {
            Kind::File(f) => f.sync(),
            Kind::Remote(r) => r.sync(),
            Kind::Memory(m) => m.sync(),
        };
        if let Err(e) = &result {
            self.write_back.record(e);
        }
        result
    }

    /// Runs `write`, which writes everything its caller needs durable, then
    /// syncs; writes and syncs again while a sync failure may have touched
    /// those pages (a failure seen by any caller since `write` began), up
    /// to three times.
    pub fn write_durably(&self, write: impl Fn() -> io::Result<()>) -> io::Result<()> {
        let mut last = None;
        for _ in 0..3 {
            let before = self.write_back.failures();
            write()?;
            match self.sync_rewritten() {
                Ok(()) if self.write_back.failures() == before => return Ok(()),
                Ok(()) => {
                    last = Some(io::Error::other(
                        "a sync of the backing failed while this write was in flight",
                    ))
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("write_durably made no attempt")))
    }

    /// Records a sync that failed outside `sync` (the io_uring engine's).
    pub fn record_sync_failure(&self, error: &io::Error) {
        self.write_back.record(error);
    }

    /// Fails once any sync has failed, as `sync` would.
    pub fn check_write_back(&self) -> io::Result<()> {
        self.write_back.check()
    }

    /// How many syncs have failed since the backing was opened.
    pub fn write_back_failures(&self) -> u64 {
        self.write_back.failures()
    }

    /// The first failed sync, if any: why flushes fail.
    pub fn write_back_error(&self) -> Option<String> {
        self.write_back.error()
    }

    pub fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match &self.kind {
            Kind::File(f) => f.zero_range(offset, len),
            Kind::Remote(r) => r.zero_range(offset, len),
            Kind::Memory(m) => m.zero_range(offset, len),
        }
    }

    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match &self.kind {
            Kind::File(f) => f.discard(offset, len),
            Kind::Remote(r) => r.discard(offset, len),
            Kind::Memory(m) => m.zero_range(offset, len),
        }
    }
}
