//! The encrypted data area: maps plaintext byte ranges the client sees onto
//! XTS-encrypted sectors of the backing, doing read-modify-write for requests
//! that do not cover whole sectors.
//!
//! Convention: a sector whose ciphertext is all zeros reads as all-zero
//! plaintext. A real ciphertext sector is all zeros with probability 2^-4096,
//! so this costs nothing in practice, and it makes never-written space of a
//! sparse backing and punched holes read as zeros, as clients expect of a
//! fresh disk, and lets block status report such sectors as zero
//! (`allocation.rs`). Zeroing writes still store encrypted zeros unless the volume
//! allows discards, because a hole tells an observer the block is unused.
//!
//! Range checks against the export size happen in the NBD layer; this layer
//! re-checks and answers `InvalidInput` rather than trusting its caller.
//!
//! During an online re-encryption (`reencrypt.rs` drives it) two key sets
//! are loaded: sectors below the checkpoint use the target generation, the
//! rest the current one. Every request then holds the range lock on its
//! sectors (reads too), and the re-encryption holds it on the window it
//! rewrites, so a request waits only when it touches that window and never
//! sees the checkpoint move under it. Requests take the thread pool rather
//! than the ring meanwhile (a ring thread must never wait on a lock);
//! whole-sector writes stay on the ring when their range is free.
//!
//! The keys and the checkpoint are one immutable snapshot (`DataKeys`),
//! swapped whole, and a request uses the snapshot it loaded *after* taking
//! its range lock: a separate checkpoint counter let a request pair the old
//! keys with a checkpoint reset at the end of a re-encryption, which read
//! (or wrote) a whole window under the wrong key. A request that does not
//! lock (a read while no re-encryption runs) checks after its backing read
//! that the snapshot it decrypts with is still the one in place, and
//! otherwise reads again, locked.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwapOption;

mod keys;
mod window;

pub use keys::DataKeys;
pub use window::PreparedWindow;

use super::cipher::VolumeCipher;
use crate::io::engine::Engine;
use crate::io::{Backing, IoBuf, RangeLock};

/// Zeroing writes go out in pieces of this size to bound memory.
const ZERO_CHUNK: u64 = 1024 * 1024;

pub struct DataArea {
    pub(in crate::volume) backing: Backing,
    /// `None` while the volume's key is lost (`on_key_loss = "stop"`): the
    /// key schedules are dropped (and zeroized) and I/O fails with EIO.
    pub(in crate::volume) cipher: ArcSwapOption<DataKeys>,
    /// Serializes the (rare) snapshot changes, so that a key reload and a
    /// moving checkpoint never undo each other.
    pub(in crate::volume) rekeying: Mutex<()>,
    pub(in crate::volume) kernel: &'static str,
    pub(in crate::volume) layers: usize,
    pub(in crate::volume) inner_cipher: super::InnerCipher,
    /// Time spent in the cipher, for metrics.
    pub(in crate::volume) crypto_nanos: AtomicU64,
    pub(in crate::volume) size: u64,
    pub(in crate::volume) sector: u64,
    pub(in crate::volume) data_offset: u64,
    /// Held by client writes, and by re-encryption over a whole window
    /// from its read to its commit, so no client write is lost under it.
    pub(in crate::volume) writers: RangeLock,
    /// Held by reads during a re-encryption, and by the re-encryption only
    /// while a window's sectors change in place (in-place write to
    /// commit): a read then never decrypts a sector with the wrong
    /// generation, and waits only for that short part of a window's life.
    pub(in crate::volume) rewriting: RangeLock,
    /// Inline writes wait until `clock` reads this (nanoseconds), after
    /// one blocked (`write_inline`).
    pub(in crate::volume) inline_writes_paused_until: AtomicU64,
    pub(in crate::volume) clock: Instant,
    /// Set once the backing is found deleted, replaced or truncated under
    /// the daemon: every request fails with this from then on.
    pub(in crate::volume) failed: std::sync::OnceLock<String>,
    /// The engine this volume's requests run on (`volume/submit/`).
    pub(in crate::volume) engine: Arc<Engine>,
}

impl std::fmt::Debug for DataArea {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataArea")
            .field("backing", &self.backing.path())
            .field("size", &self.size)
            .field("sector", &self.sector)
            .finish_non_exhaustive()
    }
}

impl DataArea {
    pub fn new(
        backing: Backing,
        cipher: VolumeCipher,
        (size, data_offset): (u64, u64),
        engine: Arc<Engine>,
    ) -> Self {
        let sector = cipher.sector_size() as u64;
        DataArea {
            backing,
            kernel: cipher.kernel(),
            layers: cipher.layers(),
            inner_cipher: cipher.inner_cipher(),
            crypto_nanos: AtomicU64::new(0),
            rekeying: Mutex::new(()),
            cipher: ArcSwapOption::from_pointee(DataKeys {
                current: Arc::new(cipher),
                target: None,
                checkpoint: 0,
            }),
            size,
            sector,
            data_offset,
            writers: RangeLock::new(),
            rewriting: RangeLock::new(),
            inline_writes_paused_until: AtomicU64::new(0),
            clock: Instant::now(),
            failed: std::sync::OnceLock::new(),
            engine,
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn sector_size(&self) -> u64 {
        self.sector
    }

    /// Which XTS kernel encrypts this volume (e.g. `vaes-avx512`).
    pub fn cipher_kernel(&self) -> &'static str {
        self.kernel
    }

    /// Encryption layers: 1, or 2 with double encryption.
    /// The inner layer's cipher (XTS when single-layer).
    pub fn inner_cipher(&self) -> super::InnerCipher {
        self.inner_cipher
    }

    pub fn layers(&self) -> usize {
        self.layers
    }

    /// Seconds spent encrypting and decrypting since the volume opened.
    pub fn crypto_seconds(&self) -> f64 {
        self.crypto_nanos.load(Ordering::Relaxed) as f64 / 1e9
    }

    /// Runs one cipher pass, adding its time to the crypto counter.
    pub(in crate::volume) fn timed<T>(&self, pass: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = pass();
        self.crypto_nanos
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        out
    }

    /// Checks that the backing is still the one opened (see
    /// `FileBacking::check_identity`); if not, the volume fails for good:
    /// every request, flush included, gets the reason.
    pub fn check_backing(&self) -> io::Result<()> {
        if let Some(reason) = self.failed.get() {
            return Err(io::Error::other(reason.clone()));
        }
        let needed = self.data_offset.saturating_add(self.size);
        if let Err(e) = self.backing.check_identity(needed) {
            let reason = format!("{e}; I/O on this volume is stopped until it is reopened");
            if self.failed.set(reason.clone()).is_ok() {
                tracing::error!(backing = %self.backing.path().display(), "{reason}");
            }
            return Err(io::Error::other(reason));
        }
        Ok(())
    }

    /// Fails the volume for good (the first reason stays): every request,
    /// flush included, gets `reason` until it is reopened. For what the
    /// data area cannot see itself, such as a take-over (`claim.rs`).
    pub fn fail(&self, reason: String) {
        if self.failed.set(reason.clone()).is_ok() {
            tracing::error!(backing = %self.backing.path().display(), "{reason}");
        }
    }

    /// Why the volume failed, if it did (`check_backing`).
    pub fn failure(&self) -> Option<&str> {
        self.failed.get().map(String::as_str)
    }

    /// Where the data area starts on the backing.
    pub(in crate::volume) fn data_offset(&self) -> u64 {
        self.data_offset
    }

    pub fn backing(&self) -> &Backing {
        &self.backing
    }

    pub(in crate::volume) fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "request beyond the end of the volume",
            )),
        }
    }

    /// Sector-aligned bounds `[start, end)` covering `[offset, offset + len)`.
    pub(in crate::volume) fn aligned(&self, offset: u64, len: u64) -> (u64, u64) {
        let start = offset - offset % self.sector;
        let end = (offset + len).div_ceil(self.sector) * self.sector;
        (start, end)
    }

    /// Reads whole sectors `[start, end)` and decrypts them into `buf`.
    pub(in crate::volume) fn read_sectors(&self, buf: &mut [u8], start: u64) -> io::Result<()> {
        let cipher = self.cipher()?;
        self.backing.read_data(buf, self.data_offset + start)?;
        self.timed(|| self.decrypt_range(&cipher, buf, start));
        Ok(())
    }

    /// Encrypts whole sectors in place and writes them at `start`.
    pub(in crate::volume) fn write_sectors(&self, buf: &mut [u8], start: u64) -> io::Result<()> {
        let keys = self.cipher()?;
        self.timed(|| self.encrypt_range(&keys, buf, start));
        self.backing.write_data(buf, self.data_offset + start)
    }

    pub fn read(&self, offset: u64, len: usize) -> io::Result<IoBuf> {
        self.check_range(offset, len as u64)?;
        let (start, end) = self.aligned(offset, len as u64);
        let mut buf = IoBuf::new((end - start) as usize);
        let keys = self.cipher()?;
        if keys.target.is_none() {
            self.backing.read_data(&mut buf, self.data_offset + start)?;
            if self.still_in_place(&keys) {
                return Ok(self.plaintext(&keys, buf, start, (offset, len)));
            }
        }
        let _window = self.rewriting.lock(start, end);
        self.read_sectors(&mut buf, start)?;
        Ok(trim_to(buf, (offset - start) as usize, len))
    }

    /// Fills `buf` with the sectors from `start` and decrypts them with
    /// `keys` (`None`: leaves them encrypted, for a `SealedRead`), if the
    /// page cache holds every byte; `false` (and `buf` unspecified) if
    /// not. The caller checks that the keys are still in place afterwards.
    pub(in crate::volume) fn read_cached_sectors(
        &self,
        keys: Option<&DataKeys>,
        buf: &mut [u8],
        start: u64,
    ) -> bool {
        if !self.backing.read_cached(buf, self.data_offset + start) {
            return false;
        }
        if let Some(keys) = keys {
            self.timed(|| decrypt_sectors(&keys.current, self.sector, buf, start));
        }
        true
    }

    /// Writes `data` at `offset`. Whole-sector writes are encrypted in place
    /// in `data`'s own buffer (so `data` holds ciphertext afterwards); partial
    /// sectors are read, merged and rewritten while the range lock keeps
    /// other writers off those sectors.
    pub fn write(&self, offset: u64, data: &mut [u8]) -> io::Result<()> {
        let len = data.len() as u64;
        self.check_range(offset, len)?;
        let (start, end) = self.aligned(offset, len);
        let _guard = self.writers.lock(start, end);
        if start == offset && end == offset + len {
            return self.write_sectors(data, start);
        }
        let mut buf = IoBuf::new((end - start) as usize);
        let ss = self.sector as usize;
        if offset != start {
            self.read_sectors(&mut buf[..ss], start)?;
        }
        let tail_start = end - self.sector;
        if offset + len != end && (offset == start || tail_start != start) {
            let at = (tail_start - start) as usize;
            self.read_sectors(&mut buf[at..], tail_start)?;
        }
        let at = (offset - start) as usize;
        buf[at..at + data.len()].copy_from_slice(data);
        self.write_sectors(&mut buf, start)
    }

    /// Makes `[offset, offset + len)` read as zeros. With `punch`, whole
    /// sectors become holes; otherwise encrypted zeros are written, which
    /// hides which blocks are in use.
    /// Whether `write_zeroes` with `punch` is fast (NBD's FAST_ZERO): a
    /// hole punched in a file is; writing encrypted zeros, or BLKZEROOUT on
    /// a device that may fall back to writing, is not.
    pub fn zeroes_fast(&self, punch: bool) -> bool {
        punch && !self.backing.is_fixed_size()
    }

    pub fn write_zeroes(&self, offset: u64, len: u64, punch: bool) -> io::Result<()> {
        self.check_range(offset, len)?;
        if punch {
            let first_whole = offset.div_ceil(self.sector) * self.sector;
            let last_whole = (offset + len) / self.sector * self.sector;
            if first_whole < last_whole {
                if offset < first_whole {
                    self.write(offset, &mut IoBuf::zeroed((first_whole - offset) as usize))?;
                }
                {
                    let _guard = self.writers.lock(first_whole, last_whole);
                    self.backing
                        .zero_range(self.data_offset + first_whole, last_whole - first_whole)?;
                }
                if last_whole < offset + len {
                    self.write(
                        last_whole,
                        &mut IoBuf::zeroed((offset + len - last_whole) as usize),
                    )?;
                }
                return Ok(());
            }
        }
        let mut at = offset;
        while at < offset + len {
            let piece = ZERO_CHUNK.min(offset + len - at);
            self.write(at, &mut IoBuf::zeroed(piece as usize))?;
            at += piece;
        }
        Ok(())
    }

    /// Discards whole sectors inside the range (partial sectors are left
    /// alone: a discard is advisory). Discarded sectors of a file read as
    /// zeros; a block device may keep their old contents (NBD allows either).
    pub fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, len)?;
        let first_whole = offset.div_ceil(self.sector) * self.sector;
        let last_whole = (offset + len) / self.sector * self.sector;
        if first_whole >= last_whole {
            return Ok(());
        }
        let _guard = self.writers.lock(first_whole, last_whole);
        self.backing
            .discard(self.data_offset + first_whole, last_whole - first_whole)
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> io::Result<()> {
        if let Some(reason) = self.failed.get() {
            return Err(io::Error::other(reason.clone()));
        }
        self.backing.sync()
    }
}

/// The next run `[start, end)` of whole sectors at or after byte `from`
/// that are not all zeros.
pub(in crate::volume) fn next_nonzero_run(
    buf: &[u8],
    sector: usize,
    from: usize,
) -> Option<(usize, usize)> {
    let nonzero = |at: usize| !is_zero(&buf[at..(at + sector).min(buf.len())]);
    let start = (from..buf.len()).step_by(sector).find(|&at| nonzero(at))?;
    let end = (start..buf.len())
        .step_by(sector)
        .find(|&at| !nonzero(at))
        .unwrap_or(buf.len());
    Some((start, end))
}

/// Calls `write(run, offset_in_buf)` for each run of sectors of `buf` that
/// are not all zeros. A re-encrypted window writes only these: an all-zero
/// sector stays as it was (a hole stays a hole), so re-encrypting a sparse
/// volume allocates nothing new in its backing filesystem.
pub(in crate::volume) fn for_nonzero_runs(
    buf: &[u8],
    sector: usize,
    mut write: impl FnMut(&[u8], u64) -> io::Result<()>,
) -> io::Result<()> {
    let mut from = 0;
    while let Some((start, end)) = next_nonzero_run(buf, sector, from) {
        write(&buf[start..end], start as u64)?;
        from = end;
    }
    Ok(())
}

/// OR-folds blocks of 256 bytes rather than comparing byte by byte: the
/// fold has no early exit inside a block, so it vectorizes (a hole's 4 KiB
/// costs 16 wide ORs instead of 4096 compares), and ciphertext, non-zero
/// from its first block, still stops after one. Under the fuzzers'
/// coverage instrumentation this also removes one traced compare per byte.
pub(in crate::volume) fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(256).all(|block| {
        let words = block.chunks_exact(8);
        let tail = words.remainder().iter().fold(0u8, |acc, &b| acc | b);
        let body = words.fold(0u64, |acc, w| {
            let mut word = [0u8; 8];
            word.copy_from_slice(w);
            acc | u64::from_ne_bytes(word)
        });
        body == 0 && tail == 0
    })
}

/// Decrypts whole sectors that were read from `start`, in place. Runs of
/// written sectors go to the cipher in one call, so their initial tweaks
/// are encrypted in a batch; all-zero sectors (never written) stay zeros.
pub(in crate::volume) fn decrypt_sectors(
    cipher: &VolumeCipher,
    sector_size: u64,
    buf: &mut [u8],
    start: u64,
) {
    let first = start / sector_size;
    let ss = sector_size as usize;
    let mut from = 0;
    while let Some((run_start, run_end)) = next_nonzero_run(buf, ss, from) {
        cipher.decrypt(
            &mut buf[run_start..run_end],
            first + (run_start / ss) as u64,
        );
        from = run_end;
    }
}

/// The `len` bytes at `skip` of a sector-aligned read, moved to the front.
pub(in crate::volume) fn trim_to(mut buf: IoBuf, skip: usize, len: usize) -> IoBuf {
    if skip != 0 || buf.len() != len {
        buf.copy_within(skip..skip + len, 0);
        buf.truncate(len);
    }
    buf
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::crypto::Dek;
    use proptest::prelude::*;

    /// A data area of `size` bytes with `sector`-byte sectors on an
    /// in-memory backing (`io/memory.rs`).
    pub(in crate::volume) fn area(sector: usize, size: u64) -> DataArea {
        area_on(Backing::memory(4096 + size).unwrap(), sector, size)
    }

    /// As [`area`], on a file in a fresh directory: for the paths that
    /// need the page cache.
    pub(in crate::volume) fn file_area(sector: usize, size: u64) -> (tempfile::TempDir, DataArea) {
        let dir = tempfile::tempdir().unwrap();
        let backing = Backing::open_or_create(&dir.path().join("d.img")).unwrap();
        backing.set_len(4096 + size).unwrap();
        (dir, area_on(backing, sector, size))
    }

    fn area_on(backing: Backing, sector: usize, size: u64) -> DataArea {
        let cipher = VolumeCipher::new(
            &Dek::generate().unwrap(),
            None,
            super::super::InnerCipher::AesXts,
            sector,
        );
        DataArea::new(backing, cipher, (size, 4096), Engine::threads())
    }

    #[test]
    fn a_failed_sync_fails_every_later_flush_and_fua_write() {
        let a = area(4096, 1 << 20);
        a.write(0, &mut vec![1; 4096]).unwrap();
        let memory = a.backing().as_memory().unwrap();
        memory.fail_syncs(true);
        assert!(a.flush().is_err());
        memory.fail_syncs(false);
        // The disk works again, but what the failed sync covered may be
        // gone: the failure sticks until the volume is reopened.
        assert!(a.flush().is_err(), "a FLUSH after a failed one succeeded");
        assert!(a.backing().check_write_back().is_err(), "FUA must fail too");
        assert!(a.backing().write_back_error().is_some());
    }

    #[test]
    fn fresh_area_reads_zeros_and_ciphertext_hides_plaintext() {
        let a = area(4096, 1 << 20);
        assert!(a.read(0, 8192).unwrap().iter().all(|&b| b == 0));
        let text = b"attack at dawn! ".repeat(256);
        a.write(4096, &mut text.clone()).unwrap();
        let mut raw = vec![0u8; 4096];
        a.backing.read_at(&mut raw, 4096 + 4096).unwrap();
        assert!(!raw.windows(16).any(|w| w == b"attack at dawn! "));
        assert_eq!(&a.read(4096, text.len()).unwrap()[..], &text[..]);
    }

    #[test]
    fn beyond_end_is_invalid_input() {
        let a = area(512, 8192);
        assert_eq!(
            a.read(8000, 500).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            a.write(u64::MAX - 2, &mut [1; 4]).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn punched_and_written_zeroes_read_as_zero() {
        let a = area(4096, 1 << 20);
        a.write(0, &mut vec![0xee; 1 << 20]).unwrap();
        a.write_zeroes(1000, 20000, true).unwrap();
        a.write_zeroes(100_000, 5000, false).unwrap();
        let back = a.read(0, 1 << 20).unwrap();
        for (i, &b) in back.iter().enumerate() {
            let zero = (1000..21000).contains(&i) || (100_000..105_000).contains(&i);
            assert_eq!(b, if zero { 0 } else { 0xee }, "byte {i}");
        }
    }

    #[test]
    fn only_nonzero_sector_runs_are_written() {
        let mut buf = vec![0u8; 8 * 512];
        buf[512] = 1; // sector 1
        buf[2 * 512 + 511] = 1; // sector 2
        buf[7 * 512] = 1; // sector 7
        let mut runs = Vec::new();
        for_nonzero_runs(&buf, 512, |run, at| {
            runs.push((at, run.len()));
            Ok(())
        })
        .unwrap();
        assert_eq!(runs, vec![(512, 1024), (7 * 512, 512)]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Any sequence of unaligned writes reads back like a plain buffer.
        #[test]
        fn behaves_like_a_plain_buffer(
            sector in prop_oneof![Just(512usize), Just(4096usize)],
            ops in proptest::collection::vec((0u64..60_000, 1usize..9000, any::<u8>()), 1..12)
        ) {
            let size = 64 * 1024;
            let a = area(sector, size);
            let mut model = vec![0u8; size as usize];
            for (off, len, byte) in ops {
                let len = len.min((size - off) as usize);
                a.write(off, &mut vec![byte; len]).unwrap();
                model[off as usize..off as usize + len].fill(byte);
            }
            prop_assert_eq!(&a.read(0, size as usize).unwrap()[..], &model[..]);
            prop_assert_eq!(&a.read(333, 1000).unwrap()[..], &model[333..1333]);
        }
    }
}
