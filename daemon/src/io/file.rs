//! Positional I/O on a local backing: a file or block device (pread/pwrite
//! here; the io_uring engine submits on `data_fd` itself). Remote backings
//! are `remote.rs`; `backing.rs` puts both behind one type.
//! A block device is sized with BLKGETSIZE64, zeroed with BLKZEROOUT and
//! trimmed with BLKDISCARD where a file gets holes.
//!
//! Reads past the end of a shorter-than-expected file return zeros rather than
//! an error, so a sparse file that was never extended still reads as holes.
//!
//! With `direct = true` the data area goes through a second descriptor opened
//! with O_DIRECT (no double caching under a guest's own page cache), while
//! headers keep using the buffered one: header I/O is rare and its buffers
//! need no alignment. Data buffers come from `IoBuf`, which is page-aligned.
//!
//! With `cache_large_writes = false` on the volume, buffered data writes
//! of `UNCACHED_WRITE_MIN` or more go out with `RWF_DONTCACHE` (kernel
//! 6.14+; plain writes where the kernel or file system refuses it). Large
//! writes land in large page-cache folios, and every later 4 KiB write
//! into such a folio walks all of its buffer heads under the inode lock,
//! so 4k random writes after a sequential fill slow down. Dropping
//! those folios once written back keeps the cache in small folios and
//! keeps streaming writes from evicting what the host had cached, but the
//! writer then starts the writeback itself and sequential writes slow
//! down, so it is not the default (benches/results/history.md, "4k random writes
//! depend on how the page cache was filled").

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

// Block-device ioctls (linux/fs.h): _IOR(0x12, 114, size_t),
// _IO(0x12, 104), _IO(0x12, 119), _IO(0x12, 127).
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;

#[derive(Debug)]
pub struct FileBacking {
    file: File,
    /// O_DIRECT descriptor for the data area, when enabled.
    direct: Option<File>,
    path: PathBuf,
    is_block_device: bool,
    /// Device and inode of what was opened, to notice a replacement.
    identity: (u64, u64),
    /// Large buffered writes use RWF_DONTCACHE; cleared for good once
    /// the kernel refuses the flag.
    uncached_large_writes: AtomicBool,
    /// `read_cached` tries RWF_NOWAIT; cleared for good once the
    /// filesystem refuses it, so a read there costs no failing syscall
    /// before it takes its engine.
    nowait_reads: AtomicBool,
    /// A tmpfs file: its pages are memory, so a plain read never waits
    /// for a disk (only for swap, if the host swaps tmpfs out) and
    /// `read_cached` serves every read. tmpfs refuses RWF_NOWAIT, and
    /// io_uring hands every tmpfs read to a kernel worker thread: two
    /// thread hand-offs for a memory copy.
    in_memory: bool,
}

/// Buffered writes from this size up skip the page cache once written
/// back: a 128 KiB write already makes a 32-buffer-head folio, while the
/// 4-64 KiB writes of random I/O stay cached.
const UNCACHED_WRITE_MIN: usize = 128 * 1024;

impl FileBacking {
    /// Opens an existing backing file or block device read-write, claimed
    /// for this descriptor alone (`owner.rs`).
    pub fn open(path: &Path) -> io::Result<Self> {
        Self::from_file(super::owner::open_claimed(path, false)?, path)
    }

    /// Opens a backing, creating a regular file if it does not exist;
    /// claimed like `open`.
    pub fn open_or_create(path: &Path) -> io::Result<Self> {
        Self::from_file(super::owner::open_claimed(path, true)?, path)
    }

    /// Opens a backing only to look at it: read-only and unclaimed, so it
    /// works while a daemon serves the volume. Writes through it fail.
    pub fn open_read_only(path: &Path) -> io::Result<Self> {
        Self::from_file(File::open(path)?, path)
    }

    fn from_file(file: File, path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let meta = file.metadata()?;
        let in_memory = is_tmpfs(&file);
        Ok(FileBacking {
            file,
            direct: None,
            path: path.to_owned(),
            is_block_device: meta.file_type().is_block_device(),
            identity: (meta.dev(), meta.ino()),
            uncached_large_writes: AtomicBool::new(false),
            nowait_reads: AtomicBool::new(true),
            in_memory,
        })
    }

    /// Whether the backing is still what was opened and large enough:
    /// not deleted (link count), not replaced at its path (device and
    /// inode), not truncated below `needed` bytes. An error says which.
    pub fn check_identity(&self, needed: u64) -> io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let gone = |what: String| Err(io::Error::new(io::ErrorKind::NotFound, what));
        let open = self.file.metadata()?;
        if !self.is_block_device && open.nlink() == 0 {
            return gone(format!("{} was deleted while served", self.path.display()));
        }
        match std::fs::metadata(&self.path) {
            Ok(now) if (now.dev(), now.ino()) == self.identity => {}
            Ok(_) => {
                return gone(format!(
                    "{} was replaced by another file while served",
                    self.path.display()
                ))
            }
            Err(e) => return gone(format!("{} is no longer there ({e})", self.path.display())),
        }
        let size = self.size()?;
        if size < needed {
            return gone(format!(
                "{} shrank to {size} bytes while served ({needed} needed)",
                self.path.display()
            ));
        }
        Ok(())
    }

    /// Routes data-area I/O through an O_DIRECT descriptor.
    pub fn enable_direct(&mut self) -> io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&self.path)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("direct = true, but O_DIRECT open failed (does this filesystem support it?): {e}"),
                )
            })?;
        self.direct = Some(file);
        Ok(())
    }

    /// The descriptor data-area I/O uses (O_DIRECT one when enabled), for
    /// engines that submit I/O themselves.
    pub fn data_fd(&self) -> std::os::unix::io::RawFd {
        self.direct.as_ref().unwrap_or(&self.file).as_raw_fd()
    }

    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Keeps large buffered writes in the page cache (`true`, the default)
    /// or lets them leave it once written back (`false`).
    pub fn set_cache_large_writes(&self, cache: bool) {
        self.uncached_large_writes.store(!cache, Ordering::Relaxed);
    }

    /// Whether large buffered writes currently skip the page cache.
    pub fn uncached_large_writes(&self) -> bool {
        self.direct.is_none() && self.uncached_large_writes.load(Ordering::Relaxed)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_block_device(&self) -> bool {
        self.is_block_device
    }

    /// Where the next allocated byte at or after `offset` is: `None` when
    /// only a hole (or the end) follows. A file system without SEEK_DATA,
    /// and a block device, report everything as allocated.
    pub fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        match self.seek(offset, libc::SEEK_DATA) {
            Ok(at) => Ok(Some(at)),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(Some(offset)),
            Err(e) => Err(e),
        }
    }

    /// Where the hole at or after `offset` begins (the end of the file
    /// counts as one).
    pub fn next_hole(&self, offset: u64) -> io::Result<u64> {
        match self.seek(offset, libc::SEEK_HOLE) {
            Ok(at) => Ok(at),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(u64::MAX),
            Err(e) => Err(e),
        }
    }

    fn seek(&self, offset: u64, whence: i32) -> io::Result<u64> {
        let offset =
            i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: lseek on a descriptor this Backing owns for its whole
        // life; no memory is passed. The file position it moves is never
        // used: every read and write here is positioned (pread/pwrite).
        let at = unsafe { libc::lseek(self.file.as_raw_fd(), offset, whence) };
        if at < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(at as u64)
    }

    /// Current size in bytes (for a block device, its capacity).
    pub fn size(&self) -> io::Result<u64> {
        if self.is_block_device {
            let mut bytes: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which
            // points at a live local for the duration of the call.
            let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), BLKGETSIZE64, &mut bytes) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(bytes)
        } else {
            Ok(self.file.metadata()?.len())
        }
    }

    /// The device's logical block size (the O_DIRECT alignment), or 512
    /// for a regular file.
    pub fn logical_block_size(&self) -> io::Result<u32> {
        if !self.is_block_device {
            return Ok(512);
        }
        let mut size: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int through the pointer, which points
        // at a live local for the duration of the call.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), BLKSSZGET, &mut size) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(size.max(512) as u32)
    }

    /// Grows (sparsely) or shrinks a regular file; a block device must already
    /// be large enough.
    pub fn set_len(&self, len: u64) -> io::Result<()> {
        if self.is_block_device {
            let have = self.size()?;
            if have < len {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("block device holds {have} bytes, {len} needed"),
                ));
            }
            return Ok(());
        }
        self.file.set_len(len)
    }

    /// Fills `buf` from `offset`; bytes beyond the end of the file read as zeros.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        read_full(&self.file, buf, offset)
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    /// Fills `buf` from `offset` only if every byte is in the page cache
    /// already (`RWF_NOWAIT`), so the caller never blocks on the disk:
    /// `false` when it is not, on an O_DIRECT backing, or on any error
    /// (the caller then takes its usual path, which reports errors).
    pub fn read_cached(&self, buf: &mut [u8], offset: u64) -> bool {
        if self.direct.is_some() || buf.is_empty() || !self.nowait_reads.load(Ordering::Relaxed) {
            return false;
        }
        let Ok(at) = libc::off_t::try_from(offset) else {
            return false;
        };
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: one iovec over a live, exclusively borrowed slice, on a
        // descriptor `self.file` keeps open; the kernel writes at most
        // `buf.len()` bytes into it.
        let flags = if self.in_memory { 0 } else { libc::RWF_NOWAIT };
        let n = unsafe { libc::preadv2(self.file.as_raw_fd(), &iov, 1, at, flags) };
        if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP) {
            self.nowait_reads.store(false, Ordering::Relaxed);
        }
        // A short read (part cached, or the end of the file) counts as a
        // miss: the usual path zero-fills past the end.
        n >= 0 && n as usize == buf.len()
    }

    /// Like `read_at`, through the O_DIRECT descriptor when enabled
    /// (`buf` and `offset` must then be block-aligned).
    pub fn read_data(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        read_full(self.direct.as_ref().unwrap_or(&self.file), buf, offset)
    }

    /// Like `write_at`, through the O_DIRECT descriptor when enabled.
    pub fn write_data(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if let Some(direct) = &self.direct {
            return direct.write_all_at(buf, offset);
        }
        if buf.len() >= UNCACHED_WRITE_MIN && self.uncached_large_writes.load(Ordering::Relaxed) {
            match pwrite_all_flags(&self.file, buf, offset, libc::RWF_DONTCACHE) {
                // Checked before anything is written, so a plain write of
                // the same bytes follows.
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    if self.uncached_large_writes.swap(false, Ordering::Relaxed) {
                        tracing::info!(
                            backing = %self.path.display(),
                            "RWF_DONTCACHE unsupported here; large writes stay in the page cache"
                        );
                    }
                }
                other => return other,
            }
        }
        self.file.write_all_at(buf, offset)
    }

    /// Makes every completed write durable (fdatasync).
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Makes a byte range read back as zeros, deallocating it where the
    /// storage can: a hole in a file; BLKZEROOUT on a block device (the
    /// kernel unmaps when the device supports zeroing that way).
    pub fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.is_block_device {
            return self.range_ioctl(BLKZEROOUT, offset, len);
        }
        self.punch_hole(offset, len)
    }

    /// Discards a byte range (TRIM): a hole in a file, BLKDISCARD on a block
    /// device. A device may return its old contents or zeros afterwards;
    /// NBD clients make no assumption about trimmed data.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.is_block_device {
            return self.range_ioctl(BLKDISCARD, offset, len);
        }
        self.punch_hole(offset, len)
    }

    fn range_ioctl(&self, request: libc::c_ulong, offset: u64, len: u64) -> io::Result<()> {
        let range: [u64; 2] = [offset, len];
        // SAFETY: BLKDISCARD/BLKZEROOUT read a [u64; 2] (start, length)
        // through the pointer, which points at a live local for the call.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), request, &range) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Deallocates a byte range of a regular file so it reads back as zeros.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // SAFETY: fallocate takes a descriptor we own for the call's duration
        // and plain integers; it touches no memory of ours.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// `write_all_at` through pwritev2 with `flags`.
fn pwrite_all_flags(
    file: &File,
    mut buf: &[u8],
    mut offset: u64,
    flags: libc::c_int,
) -> io::Result<()> {
    while !buf.is_empty() {
        let iov = libc::iovec {
            iov_base: buf.as_ptr().cast_mut().cast(),
            iov_len: buf.len(),
        };
        let at =
            libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        // SAFETY: one iovec over a live slice, which the kernel only reads,
        // on a descriptor `file` keeps open.
        let n = unsafe { libc::pwritev2(file.as_raw_fd(), &iov, 1, at, flags) };
        match n {
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n => {
                buf = &buf[n as usize..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}

fn read_full(file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match file.read_at(buf, offset) {
            Ok(0) => {
                buf.fill(0);
                return Ok(());
            }
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Whether `file` lives on tmpfs (or ramfs-like shmem: the same magic).
fn is_tmpfs(file: &File) -> bool {
    const TMPFS_MAGIC: libc::c_long = 0x0102_1994;
    // SAFETY: fstatfs fills the zeroed struct we pass, for a descriptor
    // `file` keeps open.
    unsafe {
        let mut s: libc::statfs = std::mem::zeroed();
        libc::fstatfs(file.as_raw_fd(), &mut s) == 0 && s.f_type as libc::c_long == TMPFS_MAGIC
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// `read_cached` never waits for the disk: after the file's pages are
    /// dropped it declines; once a plain read brought them back it returns
    /// the same bytes. A read past the end declines rather than invent
    /// zeros (the plain path fills those).
    #[test]
    fn read_cached_serves_only_what_the_page_cache_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backing");
        let backing = FileBacking::open_or_create(&path).unwrap();
        let data: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 % 251) as u8).collect();
        backing.file.write_all_at(&data, 0).unwrap();
        backing.sync().unwrap();
        // SAFETY: fadvise on a descriptor the backing keeps open.
        let rc = unsafe {
            libc::posix_fadvise(backing.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED)
        };
        assert_eq!(rc, 0);
        let mut buf = vec![0u8; 16 * 1024];
        // tmpfs keeps its pages whatever the advice; elsewhere they are gone.
        if !on_tmpfs(&path) {
            assert!(!backing.read_cached(&mut buf, 8192), "pages were dropped");
        }
        backing.read_at(&mut buf, 8192).unwrap();
        buf.fill(0);
        assert!(
            backing.read_cached(&mut buf, 8192),
            "pages are cached again"
        );
        assert_eq!(buf, data[8192..8192 + buf.len()]);
        let mut past_end = vec![0u8; 8192];
        assert!(!backing.read_cached(&mut past_end, 60 * 1024));
    }

    /// tmpfs pages are memory: every read is served at once. A
    /// filesystem that refuses RWF_NOWAIT (tmpfs does, on recent kernels)
    /// is asked once: reads there then go to their engine at once.
    #[test]
    fn tmpfs_reads_are_served_and_a_refused_nowait_is_asked_once() {
        let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
            return;
        };
        let path = dir.path().join("backing");
        let backing = FileBacking::open_or_create(&path).unwrap();
        backing.file.write_all_at(&[7u8; 8192], 0).unwrap();
        let mut buf = vec![0u8; 4096];
        // tmpfs: memory, served by a plain read.
        assert!(backing.in_memory);
        assert!(backing.read_cached(&mut buf, 0));
        assert_eq!(buf, [7u8; 4096]);
        drop(backing);
        // Elsewhere, a filesystem that refuses RWF_NOWAIT is asked once.
        let other = FileBacking {
            in_memory: false,
            ..FileBacking::open(&path).unwrap()
        };
        let served = other.read_cached(&mut buf, 0);
        let asked = other.nowait_reads.load(Ordering::Relaxed);
        assert!(served == asked, "served {served}, still asking {asked}");
        if !asked {
            assert!(!other.read_cached(&mut buf, 0));
        }
    }

    fn on_tmpfs(path: &Path) -> bool {
        const TMPFS_MAGIC: libc::c_long = 0x0102_1994;
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: statfs fills the zeroed struct we pass, from a valid C string.
        unsafe {
            let mut s: libc::statfs = std::mem::zeroed();
            libc::statfs(c.as_ptr(), &mut s) == 0 && s.f_type as libc::c_long == TMPFS_MAGIC
        }
    }
}
