//! The inflight log (vhost-user protocol feature INFLIGHT_SHMFD): shared
//! memory where the device records, per virtqueue, each descriptor head
//! it has taken off the ring and not yet put on the used ring. The VMM
//! keeps its fd across a daemon restart, kill -9 included, and hands it
//! to the next daemon (SET_INFLIGHT_FD), which resubmits what is still
//! pending instead of leaving the guest waiting for it forever.
//!
//! The layout is the one libvhost-user and qemu's backends use for split
//! virtqueues, so a VMM needs no knowledge of it (it only keeps the fd):
//! per queue, a 16-byte header (features u64, version u16, desc_num
//! u16, last_batch_head u16, used_idx u16) then `desc_num` 16-byte
//! entries (inflight u8, 5 padding bytes, next u16, counter u64), the
//! queue's area rounded up to 64 bytes. `counter` orders resubmission as
//! the guest posted the requests. `last_batch_head` and `used_idx` close
//! the one window a crash can leave open: a head put on the used ring
//! whose entry was not yet cleared.
//!
//! Here: creating the region (a sealed memfd), taking one back (its seals
//! and size checked, then mapped), the per-queue records, and recovery.
//! Not here: which chain a head is (`resubmit.rs`), when heads are taken
//! and completed (`backend.rs`).
//!
//! Untrusted: the VMM can write the region at any time and can hand back
//! any fd. Every field is read with atomics and bounds-checked; what a
//! hostile VMM can achieve is a wrong list of heads to resubmit, each of
//! which is then parsed like any other chain. The fd must be a tmpfs file
//! (a memfd, as the daemon makes them) carrying F_SEAL_SHRINK, so nobody
//! can shrink the file under the mapping, nor punch a hugetlbfs hole in
//! it, either of which would kill the daemon with SIGBUS on the next
//! write. A region whose used index is neither the ring's nor one behind
//! it (that crash window) is not this ring's (reused across a driver
//! reset, say): it is started afresh and nothing is resubmitted from it.
//!
//! Hand-written: vhost-user-backend 0.24 has no inflight support, and the
//! region is small (≤ 64 queues × 4 KiB).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{fence, AtomicU16, AtomicU64, AtomicU8, Ordering};

use super::device::{MAX_QUEUES, QUEUE_SIZE};

const HEADER: usize = 16;
const ENTRY: usize = 16;
const ALIGN: usize = 64;
/// The region's version once initialized (0: new, or reset by the VMM).
const VERSION: u16 = 1;

/// Why a region was refused.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("inflight region for {queues} queues of {size} descriptors is out of range")]
    Shape { queues: u16, size: u16 },
    #[error("inflight region of {given} bytes at offset {offset}: {why}")]
    Region {
        given: u64,
        offset: u64,
        why: &'static str,
    },
    #[error("inflight region: {0}")]
    Io(#[from] io::Error),
}

/// Bytes of one queue's area for queues of `size` descriptors.
fn queue_bytes(size: u16) -> usize {
    (HEADER + ENTRY * usize::from(size)).next_multiple_of(ALIGN)
}

fn check_shape(queues: u16, size: u16) -> Result<(), LogError> {
    if queues == 0 || usize::from(queues) > MAX_QUEUES || size == 0 || size > QUEUE_SIZE {
        return Err(LogError::Shape { queues, size });
    }
    Ok(())
}

/// What the frontend is told, or told us, about a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub mmap_size: u64,
    pub mmap_offset: u64,
    pub queues: u16,
    pub queue_size: u16,
}

/// A mapped inflight region.
pub struct InflightLog {
    base: *mut u8,
    len: usize,
    queues: u16,
    queue_size: u16,
    /// The next counter per queue (ours, not shared).
    counters: Box<[AtomicU64]>,
}

// SAFETY: the mapping is shared memory accessed only through atomics;
// the pointer stays valid until Drop unmaps it.
unsafe impl Send for InflightLog {}
unsafe impl Sync for InflightLog {}

impl InflightLog {
    /// A new zeroed region for `queues` queues of `queue_size`
    /// descriptors: the log, the fd for the frontend and its shape.
    pub fn create(queues: u16, queue_size: u16) -> Result<(Self, File, Shape), LogError> {
        check_shape(queues, queue_size)?;
        let len = queue_bytes(queue_size) * usize::from(queues);
        // SAFETY: a constant C string; the fd returned is ours alone.
        let fd = unsafe {
            libc::memfd_create(
                c"hostcryptd-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: memfd_create just returned this fd to us.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64)?;
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on an fd we own.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(io::Error::last_os_error().into());
        }
        let log = Self::map(&file, 0, len, queues, queue_size)?;
        let shape = Shape {
            mmap_size: len as u64,
            mmap_offset: 0,
            queues,
            queue_size,
        };
        Ok((log, file, shape))
    }

    /// Takes up the region the frontend hands back: it must be a tmpfs
    /// file sealed against shrinking, at least as long as `shape` says,
    /// and as large as the queues it describes need.
    pub fn open(file: &File, shape: Shape) -> Result<Self, LogError> {
        check_shape(shape.queues, shape.queue_size)?;
        let refuse = |why| LogError::Region {
            given: shape.mmap_size,
            offset: shape.mmap_offset,
            why,
        };
        let need = queue_bytes(shape.queue_size) * usize::from(shape.queues);
        if shape.mmap_size < need as u64 {
            return Err(refuse("smaller than its queues need"));
        }
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
        if !shape.mmap_offset.is_multiple_of(page) {
            return Err(refuse("offset not page-aligned"));
        }
        // Only tmpfs, what `create` makes: hugetlbfs can be sealed too,
        // but a hole punched in it faults on the next write (SIGBUS).
        // SAFETY: fstatfs fills the zeroed struct it is given, for an fd
        // the caller owns.
        let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) } != 0 {
            return Err(io::Error::last_os_error().into());
        }
        if fs.f_type != libc::TMPFS_MAGIC {
            return Err(refuse("not a tmpfs file (a memfd)"));
        }
        // SAFETY: fcntl on an fd the caller owns.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(refuse("the file can shrink (no F_SEAL_SHRINK)"));
        }
        let end = shape
            .mmap_offset
            .checked_add(need as u64)
            .ok_or_else(|| refuse("offset overflows"))?;
        if file.metadata()?.len() < end {
            return Err(refuse("past the end of its file"));
        }
        Self::map(
            file,
            shape.mmap_offset,
            need,
            shape.queues,
            shape.queue_size,
        )
    }

    fn map(
        file: &File,
        offset: u64,
        len: usize,
        queues: u16,
        queue_size: u16,
    ) -> Result<Self, LogError> {
        let offset = libc::off_t::try_from(offset).map_err(|_| LogError::Region {
            given: len as u64,
            offset,
            why: "offset out of range",
        })?;
        // SAFETY: a fresh shared mapping of `len` bytes of a file sealed
        // against shrinking and checked to be long enough.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error().into());
        }
        Ok(InflightLog {
            base: base.cast(),
            len,
            queues,
            queue_size,
            counters: (0..queues).map(|_| AtomicU64::new(1)).collect(),
        })
    }

    /// Queue `index`'s records, if the region has that queue.
    pub fn queue(&self, index: usize) -> Option<QueueLog<'_>> {
        (index < usize::from(self.queues)).then(|| QueueLog {
            log: self,
            // In bounds: index < queues, and the mapping holds them all.
            area: index * queue_bytes(self.queue_size),
            counter: &self.counters[index],
        })
    }

    fn u8_at(&self, at: usize) -> &AtomicU8 {
        assert!(at < self.len);
        // SAFETY: in the mapping (checked above), which lives as long as
        // `self`; any byte is a valid AtomicU8.
        unsafe { &*self.base.add(at).cast::<AtomicU8>() }
    }

    fn u16_at(&self, at: usize) -> &AtomicU16 {
        assert!(at + 2 <= self.len && at.is_multiple_of(2));
        // SAFETY: in the mapping and aligned (checked above; the mapping
        // is page-aligned).
        unsafe { &*self.base.add(at).cast::<AtomicU16>() }
    }

    fn u64_at(&self, at: usize) -> &AtomicU64 {
        assert!(at + 8 <= self.len && at.is_multiple_of(8));
        // SAFETY: as `u16_at`.
        unsafe { &*self.base.add(at).cast::<AtomicU64>() }
    }
}

impl Drop for InflightLog {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// One queue's records.
pub struct QueueLog<'a> {
    log: &'a InflightLog,
    area: usize,
    counter: &'a AtomicU64,
}

/// What a restarted queue takes up: where the ring stands and the heads
/// to resubmit, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    pub used_idx: u16,
    pub pending: Vec<u16>,
}

impl QueueLog<'_> {
    fn version(&self) -> &AtomicU16 {
        self.log.u16_at(self.area + 8)
    }
    fn desc_num(&self) -> &AtomicU16 {
        self.log.u16_at(self.area + 10)
    }
    fn last_batch_head(&self) -> &AtomicU16 {
        self.log.u16_at(self.area + 12)
    }
    fn used_idx(&self) -> &AtomicU16 {
        self.log.u16_at(self.area + 14)
    }
    /// `head`'s entry, if inside the queue.
    fn entry(&self, head: u16) -> Option<usize> {
        (head < self.log.queue_size).then(|| self.area + HEADER + ENTRY * usize::from(head))
    }

    /// The queue starts with the guest's used ring at `used_idx` and
    /// `size` descriptors: initializes a new (or reset) region, or reads
    /// what a previous backend left pending. A region whose size or used
    /// index does not match the ring is started afresh (logged by the
    /// caller): its heads would name other descriptors, or requests the
    /// guest no longer waits for.
    pub fn recover(&self, used_idx: u16, size: u16) -> Result<Recovery, &'static str> {
        let fresh = Recovery {
            used_idx,
            pending: Vec::new(),
        };
        if size > self.log.queue_size {
            return Err("the ring is larger than the inflight region's queues");
        }
        let version = self.version().load(Ordering::Acquire);
        let desc_num = self.desc_num().load(Ordering::Acquire);
        if version != VERSION || desc_num != size {
            self.reset(used_idx, size);
            return if version == 0 {
                Ok(fresh)
            } else {
                Err("the inflight region does not match the ring; started afresh")
            };
        }
        // A crash between putting the last head on the used ring and
        // clearing its entry: the guest has it, so it is not pending.
        // That leaves the ring exactly one ahead of the log; any other
        // gap means the region is not this ring's.
        let logged = self.used_idx().load(Ordering::Acquire);
        if logged != used_idx && logged.wrapping_add(1) != used_idx {
            self.reset(used_idx, size);
            return Err(
                "the inflight region's used index is not the ring's (a region from before a driver reset?); started afresh",
            );
        }
        if logged != used_idx {
            if let Some(at) = self.entry(self.last_batch_head().load(Ordering::Acquire)) {
                self.log.u8_at(at).store(0, Ordering::Release);
            }
            self.used_idx().store(used_idx, Ordering::Release);
        }
        let mut pending: Vec<(u64, u16)> = (0..size)
            .filter_map(|head| {
                let at = self.entry(head)?;
                (self.log.u8_at(at).load(Ordering::Acquire) == 1)
                    .then(|| (self.log.u64_at(at + 8).load(Ordering::Acquire), head))
            })
            .collect();
        pending.sort_unstable();
        let next = pending.iter().map(|(c, _)| *c).max().unwrap_or(0);
        self.counter
            .store(next.saturating_add(1), Ordering::Relaxed);
        Ok(Recovery {
            used_idx,
            pending: pending.into_iter().map(|(_, head)| head).collect(),
        })
    }

    /// Zeroes the queue's records and marks them valid for a ring of
    /// `size` at `used_idx`. Invalid first, valid last: a daemon killed
    /// midway leaves version 0, which the next one starts afresh, never
    /// half-old entries under a valid header.
    fn reset(&self, used_idx: u16, size: u16) {
        self.version().store(0, Ordering::Release);
        // Keeps the stores below from moving before it.
        fence(Ordering::Release);
        let end = self.area + HEADER + ENTRY * usize::from(self.log.queue_size);
        for at in (self.area + HEADER..end).step_by(ENTRY) {
            self.log.u8_at(at).store(0, Ordering::Relaxed);
            self.log.u64_at(at + 8).store(0, Ordering::Relaxed);
        }
        self.log.u64_at(self.area).store(0, Ordering::Relaxed);
        self.desc_num().store(size, Ordering::Relaxed);
        self.last_batch_head().store(0, Ordering::Relaxed);
        self.used_idx().store(used_idx, Ordering::Relaxed);
        self.version().store(VERSION, Ordering::Release);
        self.counter.store(1, Ordering::Relaxed);
    }

    /// `head` was taken off the available ring: pending until completed.
    pub fn taken(&self, head: u16) {
        if let Some(at) = self.entry(head) {
            let counter = self.counter.fetch_add(1, Ordering::Relaxed);
            self.log.u64_at(at + 8).store(counter, Ordering::Relaxed);
            self.log.u8_at(at).store(1, Ordering::Release);
        }
    }

    /// About to put `head` on the used ring (under the vring's lock).
    pub fn completing(&self, head: u16) {
        self.last_batch_head().store(head, Ordering::Release);
    }

    /// `head` is on the used ring, whose index is now `used_idx`.
    pub fn completed(&self, head: u16, used_idx: u16) {
        if let Some(at) = self.entry(head) {
            self.log.u8_at(at).store(0, Ordering::Release);
        }
        self.used_idx().store(used_idx, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_region_recovers_nothing_and_then_what_was_left_pending() {
        let (log, file, shape) = InflightLog::create(2, 128).unwrap();
        assert_eq!(shape.mmap_size as usize, 2 * queue_bytes(128));
        let q = log.queue(1).unwrap();
        assert_eq!(q.recover(0, 128).unwrap().pending, Vec::<u16>::new());
        // Taken in the order 7, 3, 9, 5; 3 completes (used index 1).
        for head in [7, 3, 9, 5] {
            q.taken(head);
        }
        q.completing(3);
        q.completed(3, 1);
        drop(log);
        // The next daemon, on the fd the frontend kept.
        let next = InflightLog::open(&file, shape).unwrap();
        let q = next.queue(1).unwrap();
        let recovery = q.recover(1, 128).unwrap();
        assert_eq!(recovery.pending, vec![7, 9, 5]);
        // Queue 0 was never used.
        assert!(next
            .queue(0)
            .unwrap()
            .recover(0, 128)
            .unwrap()
            .pending
            .is_empty());
        assert!(next.queue(2).is_none());
        // New heads are ordered after the resubmitted ones.
        q.taken(11);
        assert_eq!(q.recover(1, 128).unwrap().pending, vec![7, 9, 5, 11]);
    }

    #[test]
    fn a_crash_after_the_used_ring_was_written_does_not_resubmit_that_head() {
        let (log, _file, _) = InflightLog::create(1, 128).unwrap();
        let q = log.queue(0).unwrap();
        q.recover(0, 128).unwrap();
        q.taken(4);
        q.taken(6);
        q.completing(6);
        // The crash: the used ring says 1, the entry was not cleared.
        assert_eq!(q.recover(1, 128).unwrap().pending, vec![4]);
    }

    #[test]
    fn a_used_index_more_than_one_off_is_a_foreign_region() {
        let (log, _file, _) = InflightLog::create(1, 128).unwrap();
        let q = log.queue(0).unwrap();
        q.recover(0, 128).unwrap();
        q.taken(4);
        q.taken(6);
        q.completing(6);
        q.completed(6, 1);
        // Ahead by 2, behind by 1, or far off (a driver reset took the
        // ring back to 0 at 5): refused, nothing resubmitted, the region
        // started afresh at the ring's index.
        for guest in [3u16, 0, 5] {
            q.taken(4);
            q.completed(6, 1);
            assert!(q.recover(guest, 128).is_err(), "guest at {guest}");
            assert_eq!(q.used_idx().load(Ordering::Relaxed), guest);
            assert!(q.recover(guest, 128).unwrap().pending.is_empty());
        }
        // Wrapping: the log at 65535, the guest at 0, is one ahead.
        q.taken(9);
        q.completing(2);
        q.completed(2, u16::MAX);
        assert_eq!(q.recover(0, 128).unwrap().pending, vec![9]);
    }

    #[test]
    fn a_reset_marks_the_region_invalid_until_it_is_done() {
        let (log, _file, _) = InflightLog::create(1, 128).unwrap();
        let q = log.queue(0).unwrap();
        q.recover(0, 128).unwrap();
        q.taken(4);
        q.taken(6);
        // A daemon killed right after a reset's first store: version 0
        // over the old entries. The next one starts afresh.
        q.version().store(0, Ordering::Relaxed);
        assert!(q.recover(0, 128).unwrap().pending.is_empty());
        // A finished reset: valid, every entry cleared.
        assert_eq!(q.version().load(Ordering::Relaxed), VERSION);
        assert_eq!(q.desc_num().load(Ordering::Relaxed), 128);
        for head in [4, 6] {
            let at = q.entry(head).unwrap();
            assert_eq!(log.u8_at(at).load(Ordering::Relaxed), 0);
            assert_eq!(log.u64_at(at + 8).load(Ordering::Relaxed), 0);
        }
    }

    #[test]
    fn hostile_regions_are_refused_or_started_afresh() {
        // Not sealed against shrinking: a plain memfd.
        let fd = unsafe { libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        let plain = unsafe { File::from_raw_fd(fd) };
        plain.set_len(1 << 20).unwrap();
        let shape = Shape {
            mmap_size: 1 << 20,
            mmap_offset: 0,
            queues: 1,
            queue_size: 128,
        };
        assert!(InflightLog::open(&plain, shape).is_err());
        // Sealed, but on hugetlbfs (where the machine allows one).
        let fd = unsafe {
            libc::memfd_create(
                c"t".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING | libc::MFD_HUGETLB,
            )
        };
        if fd >= 0 {
            let huge = unsafe { File::from_raw_fd(fd) };
            let sealed = huge.set_len(2 << 20).is_ok()
                && unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) } == 0;
            if sealed {
                let err = InflightLog::open(&huge, shape).err().unwrap().to_string();
                assert!(err.contains("not a tmpfs file"), "{err}");
            }
        }
        let (_log, file, good) = InflightLog::create(1, 128).unwrap();
        // Too small, past the end, unaligned, too many queues or descriptors.
        for bad in [
            Shape {
                mmap_size: 64,
                ..good
            },
            Shape {
                mmap_offset: 4096,
                ..good
            },
            Shape {
                mmap_offset: 1,
                ..good
            },
            Shape { queues: 2, ..good },
            Shape {
                queue_size: QUEUE_SIZE + 1,
                ..good
            },
            Shape { queues: 0, ..good },
        ] {
            assert!(InflightLog::open(&file, bad).is_err(), "{bad:?}");
        }
        // Its header garbled by the frontend: started afresh, nothing
        // resubmitted; a ring larger than the region is refused.
        let log = InflightLog::open(&file, good).unwrap();
        let q = log.queue(0).unwrap();
        q.recover(0, 128).unwrap();
        q.taken(1);
        q.desc_num().store(64, Ordering::Relaxed);
        assert!(q.recover(0, 128).is_err());
        assert!(q.recover(0, 128).unwrap().pending.is_empty());
        assert!(q.recover(0, 256).is_err());
        // Heads outside the queue are ignored.
        q.taken(500);
        q.completed(500, 0);
        assert!(q.recover(0, 128).unwrap().pending.is_empty());
    }
}
