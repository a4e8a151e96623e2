//! A volume's backing, local or remote, behind one type: a file or block
//! device (`file.rs`) or an NBD export (`remote.rs`), chosen by whether
//! the configured `backing` is an NBD URI. Callers that need the local
//! specifics (the io_uring engine's descriptor, O_DIRECT, holes) ask, and
//! get `None` or a plain answer for a remote one.

use std::io;
use std::path::Path;

use super::file::FileBacking;
use super::remote::RemoteBacking;
use crate::nbd::client::NbdUri;

#[derive(Debug)]
pub enum Backing {
    File(FileBacking),
    Remote(RemoteBacking),
}

/// Whether a configured backing names an NBD export rather than a path.
pub fn is_remote(path: &Path) -> bool {
    path.to_str().is_some_and(NbdUri::looks_like)
}

impl Backing {
    /// Opens an existing backing read-write (connects to a remote one).
    pub fn open(path: &Path) -> io::Result<Self> {
        if is_remote(path) {
            return RemoteBacking::connect(path).map(Backing::Remote);
        }
        FileBacking::open(path).map(Backing::File)
    }

    /// Opens a backing, creating a regular file if it does not exist.
    pub fn open_or_create(path: &Path) -> io::Result<Self> {
        if is_remote(path) {
            return RemoteBacking::connect(path).map(Backing::Remote);
        }
        FileBacking::open_or_create(path).map(Backing::File)
    }

    pub fn remote(&self) -> Option<&RemoteBacking> {
        match self {
            Backing::Remote(r) => Some(r),
            Backing::File(_) => None,
        }
    }

    /// Routes data-area I/O through an O_DIRECT descriptor (local only).
    pub fn enable_direct(&mut self) -> io::Result<()> {
        match self {
            Backing::File(f) => f.enable_direct(),
            Backing::Remote(_) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "direct = true applies to local backings, not to a remote export",
            )),
        }
    }

    /// The descriptor the io_uring engine submits data-area I/O on; a
    /// remote backing has none.
    pub fn data_fd(&self) -> Option<std::os::unix::io::RawFd> {
        match self {
            Backing::File(f) => Some(f.data_fd()),
            Backing::Remote(_) => None,
        }
    }

    pub fn is_direct(&self) -> bool {
        matches!(self, Backing::File(f) if f.is_direct())
    }

    /// See `FileBacking::set_cache_large_writes`; a remote backing has no
    /// page cache here.
    pub fn set_cache_large_writes(&self, cache: bool) {
        if let Backing::File(f) = self {
            f.set_cache_large_writes(cache);
        }
    }

    pub fn uncached_large_writes(&self) -> bool {
        matches!(self, Backing::File(f) if f.uncached_large_writes())
    }

    pub fn path(&self) -> &Path {
        match self {
            Backing::File(f) => f.path(),
            Backing::Remote(r) => r.path(),
        }
    }

    pub fn is_block_device(&self) -> bool {
        matches!(self, Backing::File(f) if f.is_block_device())
    }

    /// A block device or a remote export: its size is given, it cannot be
    /// truncated, and old contents stay until overwritten.
    pub fn is_fixed_size(&self) -> bool {
        match self {
            Backing::File(f) => f.is_block_device(),
            Backing::Remote(_) => true,
        }
    }

    /// The next allocated byte at or after `offset` (a remote export
    /// reports everything as allocated).
    pub fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        match self {
            Backing::File(f) => f.next_data(offset),
            Backing::Remote(_) => Ok(Some(offset)),
        }
    }

    pub fn next_hole(&self, offset: u64) -> io::Result<u64> {
        match self {
            Backing::File(f) => f.next_hole(offset),
            Backing::Remote(_) => Ok(u64::MAX),
        }
    }

    pub fn size(&self) -> io::Result<u64> {
        match self {
            Backing::File(f) => f.size(),
            Backing::Remote(r) => Ok(r.size()),
        }
    }

    pub fn logical_block_size(&self) -> io::Result<u32> {
        match self {
            Backing::File(f) => f.logical_block_size(),
            Backing::Remote(_) => Ok(512),
        }
    }

    pub fn set_len(&self, len: u64) -> io::Result<()> {
        match self {
            Backing::File(f) => f.set_len(len),
            Backing::Remote(r) => r.set_len(len),
        }
    }

    /// Fills `buf` from `offset` (past the end of a file: zeros).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self {
            Backing::File(f) => f.read_at(buf, offset),
            Backing::Remote(r) => r.read_at(buf, offset),
        }
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match self {
            Backing::File(f) => f.write_at(buf, offset),
            Backing::Remote(r) => r.write_at(buf, offset),
        }
    }

    /// See `FileBacking::read_cached`; always a miss on a remote backing.
    pub fn read_cached(&self, buf: &mut [u8], offset: u64) -> bool {
        match self {
            Backing::File(f) => f.read_cached(buf, offset),
            Backing::Remote(_) => false,
        }
    }

    /// Like `read_at`, through the O_DIRECT descriptor when enabled.
    pub fn read_data(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self {
            Backing::File(f) => f.read_data(buf, offset),
            Backing::Remote(r) => r.read_at(buf, offset),
        }
    }

    pub fn write_data(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match self {
            Backing::File(f) => f.write_data(buf, offset),
            Backing::Remote(r) => r.write_at(buf, offset),
        }
    }

    /// Makes every completed write durable (fdatasync; FLUSH remotely).
    pub fn sync(&self) -> io::Result<()> {
        match self {
            Backing::File(f) => f.sync(),
            Backing::Remote(r) => r.sync(),
        }
    }

    pub fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match self {
            Backing::File(f) => f.zero_range(offset, len),
            Backing::Remote(r) => r.zero_range(offset, len),
        }
    }

    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match self {
            Backing::File(f) => f.discard(offset, len),
            Backing::Remote(r) => r.discard(offset, len),
        }
    }
}
