//! A large read from the page cache shared with an idle core: the read is
//! cut into pieces (a `preadv2(RWF_NOWAIT)` and the decryption of each),
//! and the connection's thread and one borrowed thread claim pieces until
//! none is left. Only the claiming is here (`share`, which the opening of
//! a large sealed read uses too: `sealed.rs`); what a piece of a read
//! does is `DataArea::read_cached_sectors`, and when a read is shared is
//! `DataArea::read_cached`'s choice.
//!
//! Why: one connection's sequential 1 MiB reads keep its ring thread busy
//! (copy from the page cache, XTS, copy into the socket, one after the
//! other) while the second core is half idle (benches/results/history.md, "Large
//! cached reads shared with an idle ring"). The borrowed thread is a ring no connection lives on
//! (`UringEngine::lend_idle_ring`), so two busy connections never take
//! each other's core (a vhost-user queue's worker lends one too; its
//! queues are not ring connections, so two busy queues may share a
//! core with a helper, which then does fewer pieces). Pieces are claimed, never handed out: the
//! connection's thread does every piece nobody else took, so a helper that
//! wakes late (a halted vCPU) or never costs at most its own pieces, and
//! the connection's thread waits only for pieces the helper is working on.
//!
//! Not here: splitting writes (their pool path splits encryption with
//! rayon), and reads the page cache cannot serve (they go to an engine).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::volume::data::{DataArea, DataKeys};

/// What a lender runs on the thread it lends: claims pieces until none is left.
pub(super) type HelperJob = Box<dyn FnOnce() + Send>;

/// Bytes per piece: eight per 1 MiB read, so a helper that arrives some
/// tens of microseconds late still finds most of the pieces unclaimed,
/// while the extra `preadv2` calls stay a small part of the read's time.
pub(super) const PIECE: usize = 128 * 1024;

/// Work cut into `count` pieces; `work(i)` does piece `i` and says
/// whether it succeeded (`false`: a miss, and the rest need not be done).
struct Pieces<W> {
    work: W,
    count: usize,
    next: AtomicUsize,
    done: AtomicUsize,
    missed: AtomicBool,
}

impl<W: Fn(usize) -> bool> Pieces<W> {
    /// Claims and does pieces until none is left.
    fn claim(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.count {
                return;
            }
            let _done = PieceDone(&self.done, &self.missed);
            // After a miss the rest of the pieces need not be done.
            if !self.missed.load(Ordering::Relaxed) && !(self.work)(i) {
                self.missed.store(true, Ordering::Relaxed);
            }
        }
    }
}

/// Counts a claimed piece done when it is, or when its thread unwinds
/// (then the work is a miss: the piece may be half done).
struct PieceDone<'a>(&'a AtomicUsize, &'a AtomicBool);

impl Drop for PieceDone<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.1.store(true, Ordering::Relaxed);
        }
        self.0.fetch_add(1, Ordering::Release);
    }
}

/// Held by the caller of `share`: when dropped, also while unwinding, it
/// ends the claiming and waits until every claimed piece is done, so no
/// other thread is inside the caller's buffers when `share` returns.
struct HelpersOut<'a, W>(&'a Pieces<W>);

impl<W> Drop for HelpersOut<'_, W> {
    fn drop(&mut self) {
        let claimed = self
            .0
            .next
            .fetch_max(self.0.count, Ordering::Relaxed)
            .min(self.0.count);
        // Only pieces a helper is in the middle of are left: a piece's
        // time at most, unless its thread lost its core.
        let mut turns = 0u32;
        while self.0.done.load(Ordering::Acquire) < claimed {
            turns = turns.wrapping_add(1);
            if turns.is_multiple_of(64) {
                std::thread::yield_now();
            }
            std::hint::spin_loop();
        }
    }
}

/// Does `count` pieces of `work` on this thread, sharing them with a
/// thread `lend` starts when it can; whether every piece succeeded.
/// Returns only once no other thread is in a piece, so `work` may
/// point into the caller's buffers (`SendPtr`).
pub(super) fn share<W>(count: usize, lend: impl FnOnce(HelperJob) -> bool, work: W) -> bool
where
    W: Fn(usize) -> bool + Send + Sync + 'static,
{
    let pieces = Arc::new(Pieces {
        work,
        count,
        next: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        missed: AtomicBool::new(false),
    });
    let helper = pieces.clone();
    if count > 1 && lend(Box::new(move || helper.claim())) {
        let _out = HelpersOut(&*pieces);
        pieces.claim();
    } else {
        pieces.claim();
    }
    !pieces.missed.load(Ordering::Relaxed)
}

/// A pointer into a buffer the caller of `share` owns, for its pieces.
pub(super) struct SendPtr<T>(pub(super) *mut T);

// By hand: a derive would ask `T: Copy`.
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so a closure captures the whole `SendPtr`).
    pub(super) fn get(self) -> *mut T {
        self.0
    }
}

// SAFETY: `share` hands each piece index to exactly one thread
// (`fetch_add`), pieces touch disjoint bytes, and `share` returns only
// when every claimed piece is done (Release/Acquire on `done`), so the
// pointee outlives every use on another thread; a claim made after that
// finds `next >= count` and touches nothing.
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as for `Send`.
unsafe impl<T> Sync for SendPtr<T> {}

/// Fills `buf` with the sectors from `start`, decrypted with `keys` (or
/// left encrypted: `None`), if the page cache holds them all (`false`
/// otherwise), sharing the pieces with a thread `lend` starts when it can
/// (`false`: nobody to share with, and the read is done whole on this
/// thread).
pub(super) fn read_shared(
    area: &Arc<DataArea>,
    keys: Option<&Arc<DataKeys>>,
    buf: &mut [u8],
    start: u64,
    lend: impl FnOnce(HelperJob) -> bool,
) -> bool {
    let piece = PIECE.next_multiple_of(area.sector_size() as usize);
    let (area, keys) = (area.clone(), keys.cloned());
    let (base, len) = (SendPtr(buf.as_mut_ptr()), buf.len());
    share(len.div_ceil(piece), lend, move |i| {
        let from = i * piece;
        let to = (from + piece).min(len);
        // SAFETY: piece `i` is this thread's alone and `from < to <= len`
        // lies inside the buffer, live until `share` returns (`SendPtr`).
        let part = unsafe { std::slice::from_raw_parts_mut(base.get().add(from), to - from) };
        area.read_cached_sectors(keys.as_deref(), part, start + from as u64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::data::tests::file_area;

    /// Every piece is read and decrypted once, whether the helper takes
    /// some, all or none of them.
    #[test]
    fn a_shared_read_returns_what_a_whole_read_returns() {
        let (_d, a) = file_area(4096, 4 << 20);
        let a = Arc::new(a);
        let text: Vec<u8> = (0..(1 << 20) + 8192).map(|i| (i * 7 % 251) as u8).collect();
        a.write(4096, &mut text.clone()).unwrap();
        let keys = a.cipher().unwrap();
        let helpers: [&dyn Fn(HelperJob) -> bool; 3] = [
            &|job| {
                std::thread::spawn(job);
                true
            },
            // Arrives when the reader has claimed everything.
            &|job| {
                drop(job);
                true
            },
            &|_| false,
        ];
        for lend in helpers {
            let mut buf = vec![0u8; text.len()];
            assert!(read_shared(&a, Some(&keys), &mut buf, 4096, lend));
            assert!(buf == text, "a shared read returned other bytes");
        }
    }

    /// Pages the page cache does not hold make the whole read a miss, for
    /// the reader to send to an engine.
    #[test]
    fn a_shared_read_of_uncached_pages_misses() {
        use std::os::fd::AsRawFd;
        let (dir, a) = file_area(4096, 4 << 20);
        let a = Arc::new(a);
        a.write(0, &mut vec![9u8; 1 << 20]).unwrap();
        // The page cache is the file's, whichever descriptor advises it.
        let file = std::fs::File::open(dir.path().join("d.img")).unwrap();
        file.sync_all().unwrap();
        // SAFETY: fadvise on a descriptor `file` keeps open.
        let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0);
        let keys = a.cipher().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let lend = |job: HelperJob| {
            std::thread::spawn(job);
            true
        };
        assert!(!read_shared(&a, Some(&keys), &mut buf, 0, lend));
    }
}
