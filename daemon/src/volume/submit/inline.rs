//! The fast paths that run on the caller's thread: a read whose sectors
//! are all in the host page cache (`read_cached`, sharing its pieces with
//! an idle ring from `SHARED_READ_MIN` on: `shared_read.rs`) and a small
//! whole-sector write to a buffered backing (`write_inline`). Either
//! answers `None` when it cannot, and the caller submits to an engine.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::io::IoBuf;
use crate::volume::data::trim_to;
use crate::volume::{DataArea, SealedRead, WriteData};

/// Reads up to this size are tried from the page cache on the caller's
/// thread (`read_cached`): there the hand-off to an engine thread costs
/// more than the read and its decryption, and a connection keeps to one
/// core (benches/results/history.md, "cached reads up to 1 MiB"). Larger reads keep
/// the engines, which spread them over cores.
const INLINE_READ_MAX: usize = 1024 * 1024;
/// Cached reads from this size on share their pieces with a ring no
/// connection lives on, when there is one (`shared_read.rs`).
pub(super) const SHARED_READ_MIN: usize = 256 * 1024;
/// Whole-sector writes up to this size to a buffered backing are written
/// on the caller's thread (`write_inline`); larger ones split their
/// encryption across the pool's threads.
const INLINE_WRITE_MAX: usize = 64 * 1024;
/// An inline write slower than this blocked on the disk (a buffered 4 KiB
/// write takes some microseconds), and pauses inline writes for
/// `INLINE_WRITE_PAUSE`.
const SLOW_INLINE_WRITE: Duration = Duration::from_millis(1);
const INLINE_WRITE_PAUSE: Duration = Duration::from_secs(1);

impl DataArea {
    /// `read` on the caller's thread when every sector is in the host page
    /// cache: no thread hand-off, no lock, one `preadv2(RWF_NOWAIT)` and
    /// the decryption (from `SHARED_READ_MIN` on, in pieces that a thread
    /// `lend` starts may share: `shared_read.rs`). `None` when the read is larger than
    /// `INLINE_READ_MAX`, the backing bypasses the page cache (O_DIRECT),
    /// a re-encryption is under way, or the data is not all cached; the
    /// caller then submits it to an engine. With `seal` the sectors are
    /// handed back still encrypted, with the key to open them.
    pub fn read_cached(
        self: &Arc<Self>,
        (offset, len): (u64, usize),
        seal: bool,
        lend: impl FnOnce(super::shared_read::HelperJob) -> bool,
    ) -> Option<io::Result<SealedRead>> {
        // O_DIRECT is known before any work: its reads would only be
        // checked, keyed and allocated twice.
        if len > INLINE_READ_MAX || len == 0 || self.backing.is_direct() {
            return None;
        }
        let keys = match self
            .check_range(offset, len as u64)
            .and_then(|()| self.cipher())
        {
            Ok(keys) => keys,
            Err(e) => return Some(Err(e)),
        };
        if keys.target.is_some() {
            return None;
        }
        let (start, end) = self.aligned(offset, len as u64);
        let mut buf = IoBuf::new((end - start) as usize);
        let open = (!seal).then_some(&keys);
        let cached = if buf.len() >= SHARED_READ_MIN {
            super::shared_read::read_shared(self, open, &mut buf, start, lend)
        } else {
            self.read_cached_sectors(open.map(|k| &**k), &mut buf, start)
        };
        // As for ring reads: a re-encryption that began meanwhile may have
        // rewritten these sectors (and the decryption was then wasted).
        if !cached || !self.still_in_place(&keys) {
            return None;
        }
        if seal {
            let cipher = keys.current.clone();
            let read = SealedRead::sealed(self.clone(), cipher, buf, start, (offset, len));
            return Some(Ok(read));
        }
        Some(Ok(SealedRead::open(trim_to(
            buf,
            (offset - start) as usize,
            len,
        ))))
    }

    /// `write` on the caller's thread, for a whole-sector write of up to
    /// `INLINE_WRITE_MAX` to a buffered backing whose sectors no other
    /// writer holds: the encryption and one `pwrite` into the page cache
    /// cost less than handing the write to a pool thread
    /// (benches/results/history.md, "small writes on the connection's
    /// thread"). `Err(data)`
    /// (nothing done) otherwise, or while inline writes are paused; the
    /// caller then submits the write to an engine.
    ///
    /// ext4 refuses `RWF_NOWAIT` on buffered writes, so this write may
    /// block: on dirty-page throttling or a contended inode lock. One
    /// that takes longer than `SLOW_INLINE_WRITE` pauses inline writes on
    /// this volume for `INLINE_WRITE_PAUSE`, so a throttled disk stalls
    /// the pool's threads, not the connections' own.
    pub fn write_inline(&self, offset: u64, data: WriteData) -> Result<io::Result<()>, WriteData> {
        let len = data.len() as u64;
        if data.len() > INLINE_WRITE_MAX || len == 0 || self.backing.is_direct() {
            return Err(data);
        }
        if let Err(e) = self.check_range(offset, len) {
            return Ok(Err(e));
        }
        let (start, end) = self.aligned(offset, len);
        if start != offset || end != offset + len {
            return Err(data);
        }
        let now = self.clock.elapsed();
        if now < Duration::from_nanos(self.inline_writes_paused_until.load(Ordering::Relaxed)) {
            return Err(data);
        }
        if !self.writers.try_acquire(start, end) {
            return Err(data);
        }
        let result = self.write_sealed(data, start);
        self.writers.release(start, end);
        let took = self.clock.elapsed().saturating_sub(now);
        if took > SLOW_INLINE_WRITE {
            let until = (now + took + INLINE_WRITE_PAUSE).as_nanos();
            self.inline_writes_paused_until
                .store(u64::try_from(until).unwrap_or(u64::MAX), Ordering::Relaxed);
            tracing::debug!(
                ?took,
                "a write blocked its connection; inline writes paused"
            );
        }
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::data::tests::area;

    /// Plaintext of ours as a write's data.
    fn data(bytes: &[u8]) -> WriteData {
        let mut buf = IoBuf::new(bytes.len());
        buf.copy_from_slice(bytes);
        WriteData::Buffer(buf)
    }

    #[test]
    fn inline_writes_take_free_whole_sectors_and_pause_after_a_slow_one() {
        let a = area(4096, 1 << 20);
        let text = b"inline!!".repeat(512);
        assert!(matches!(a.write_inline(8192, data(&text)), Ok(Ok(()))));
        assert_eq!(&a.read(8192, 4096).unwrap()[..], &text[..]);
        let mut raw = vec![0u8; 4096];
        a.backing.read_at(&mut raw, 4096 + 8192).unwrap();
        assert_ne!(raw, text, "written encrypted");
        // Partial sectors need a read-modify-write, which may wait.
        assert!(a.write_inline(100, data(&[1; 512])).is_err());
        // Too large for one thread's turn.
        assert!(a
            .write_inline(0, data(&vec![1; INLINE_WRITE_MAX + 4096]))
            .is_err());
        // Beyond the end: the error, at once.
        assert!(matches!(
            a.write_inline(1 << 20, data(&[1; 4096])),
            Ok(Err(_))
        ));
        // Sectors another writer holds.
        assert!(a.writers.try_acquire(0, 4096));
        assert!(a.write_inline(0, data(&[2; 4096])).is_err());
        a.writers.release(0, 4096);
        assert!(a.write_inline(0, data(&[2; 4096])).is_ok());
        // After a write that blocked, inline writes pause.
        let later = (a.clock.elapsed() + INLINE_WRITE_PAUSE).as_nanos() as u64;
        a.inline_writes_paused_until.store(later, Ordering::Relaxed);
        assert!(a.write_inline(0, data(&[3; 4096])).is_err());
        assert_eq!(a.read(0, 1).unwrap()[0], 2);
    }
}
