//! A backing in memory, for tests: no file, no descriptor, nothing left
//! behind, and faults on command (writes or syncs that fail until told
//! otherwise), so the data path and the durability rules above it can be
//! tested without a disk or a flaky device. It behaves like a sparse
//! regular file: it grows when written past its end, reads past the end
//! fail, and it reports no holes.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

#[derive(Debug)]
pub struct MemoryBacking {
    bytes: RwLock<Vec<u8>>,
    path: PathBuf,
    failing_writes: AtomicBool,
    failing_syncs: AtomicBool,
}

fn injected(what: &str) -> io::Error {
    io::Error::other(format!("{what} failed (injected by the test)"))
}

impl MemoryBacking {
    pub fn new(len: u64) -> io::Result<Self> {
        let len = usize::try_from(len).map_err(|_| io::ErrorKind::OutOfMemory)?;
        Ok(MemoryBacking {
            bytes: RwLock::new(vec![0; len]),
            path: PathBuf::from("memory"),
            failing_writes: AtomicBool::new(false),
            failing_syncs: AtomicBool::new(false),
        })
    }

    /// From now on, writes (`true`) or syncs fail with EIO-like errors,
    /// until called again with `false`.
    pub fn fail_writes(&self, fail: bool) {
        self.failing_writes.store(fail, Ordering::SeqCst);
    }

    pub fn fail_syncs(&self, fail: bool) {
        self.failing_syncs.store(fail, Ordering::SeqCst);
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<u8>> {
        self.bytes.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<u8>> {
        self.bytes.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn size(&self) -> u64 {
        self.read().len() as u64
    }

    pub fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::ErrorKind::OutOfMemory)?;
        self.write().resize(len, 0);
        Ok(())
    }

    /// The range `[offset, offset + len)` as indices, or an error for one
    /// that does not fit in memory.
    fn range(offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let end = start.checked_add(len).ok_or(io::ErrorKind::InvalidInput)?;
        Ok(start..end)
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let range = Self::range(offset, buf.len())?;
        let bytes = self.read();
        let from = bytes
            .get(range)
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(from);
        Ok(())
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.failing_writes.load(Ordering::SeqCst) {
            return Err(injected("write"));
        }
        let range = Self::range(offset, buf.len())?;
        let mut bytes = self.write();
        if bytes.len() < range.end {
            bytes.resize(range.end, 0);
        }
        bytes[range].copy_from_slice(buf);
        Ok(())
    }

    pub fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
        let range = Self::range(offset, len)?;
        let mut bytes = self.write();
        let end = range.end.min(bytes.len());
        if range.start < end {
            bytes[range.start..end].fill(0);
        }
        Ok(())
    }

    pub fn sync(&self) -> io::Result<()> {
        if self.failing_syncs.load(Ordering::SeqCst) {
            return Err(injected("sync"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_was_written_and_fails_on_command() {
        let m = MemoryBacking::new(8192).unwrap();
        m.write_at(&[7; 100], 4000).unwrap();
        let mut buf = [0u8; 100];
        m.read_at(&mut buf, 4000).unwrap();
        assert_eq!(buf, [7; 100]);
        assert!(m.read_at(&mut buf, 8150).is_err(), "past the end");
        m.write_at(&[1; 10], 9000).unwrap();
        assert_eq!(m.size(), 9010, "grows like a file");
        m.zero_range(4000, 50).unwrap();
        m.read_at(&mut buf, 4000).unwrap();
        assert_eq!((buf[49], buf[50]), (0, 7));
        m.fail_syncs(true);
        assert!(m.sync().is_err());
        m.fail_syncs(false);
        m.fail_writes(true);
        assert!(m.write_at(&[1], 0).is_err());
        assert!(m.read_at(&mut buf, u64::MAX).is_err(), "no overflow");
    }
}
