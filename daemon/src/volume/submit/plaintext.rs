//! A write's plaintext ([`WriteData`]): in a buffer of ours, encrypted
//! there in place, or still in its client's memory ([`ClientPlaintext`],
//! a guest's buffers), encrypted from there into a buffer of ours in one
//! pass. The second saves a whole copy of the data: the frontend does not
//! gather the guest's buffers first. Whatever needs the plaintext as
//! bytes of ours (a partial sector's read-modify-write, a remote backend
//! that merges writes) copies it out then ([`WriteData::into_plaintext`]).
//!
//! What lives elsewhere: the paths that choose where a write runs
//! (`mod.rs`, `inline.rs`, `unlocked.rs`), the ciphers (`volume/cipher.rs`).

use std::any::Any;
use std::fmt;
use std::io;
use std::sync::Arc;

use crate::io::IoBuf;
use crate::volume::cipher::VolumeCipher;
use crate::volume::data::DataKeys;
use crate::volume::DataArea;

/// Plaintext still in a client's memory: contiguous pieces, in order,
/// kept mapped by `mapped` for as long as this lives. The client may
/// write to them meanwhile (a guest changing a buffer whose write is in
/// flight): each byte is read once, and what is read is what gets
/// encrypted, so the ciphertext is of some mix of old and new bytes, as
/// a disk would store; nothing of ours is ever read back from there.
pub struct ClientPlaintext {
    pieces: Vec<Piece>,
    len: usize,
    _mapped: Arc<dyn Any + Send + Sync>,
    gate: Box<dyn MemoryGate>,
}

/// Whether a client's memory may still be read for a request. A guest's
/// memory may be handed to another ring or connection once the frontend
/// stops the request's queue; nothing read from it then may reach the
/// backing.
pub trait MemoryGate: Send {
    /// Runs `read` unless the memory may no longer be read for this
    /// request, holding it readable meanwhile; whether `read` ran.
    fn read(&self, read: &mut dyn FnMut()) -> bool;
}

/// A gate that is always open, for tests' own memory.
#[cfg(test)]
pub struct AlwaysReadable;

#[cfg(test)]
impl MemoryGate for AlwaysReadable {
    fn read(&self, read: &mut dyn FnMut()) -> bool {
        read();
        true
    }
}

#[derive(Clone, Copy)]
struct Piece {
    ptr: *const u8,
    len: usize,
}

// SAFETY: the pieces are plain memory that `_mapped` keeps mapped; they
// are only read, by whichever thread runs the write.
unsafe impl Send for ClientPlaintext {}

impl fmt::Debug for ClientPlaintext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientPlaintext")
            .field("pieces", &self.pieces.len())
            .field("len", &self.len)
            .finish()
    }
}

impl ClientPlaintext {
    /// The plaintext in `pieces` (address, length), in order, read only
    /// through `gate`; `None` if their total length overflows.
    ///
    /// # Safety
    /// Each piece's bytes must stay valid for reads for as long as
    /// `mapped` lives, and must not be memory this process writes
    /// through a reference of its own.
    pub unsafe fn new(
        pieces: impl IntoIterator<Item = (*const u8, usize)>,
        mapped: Arc<dyn Any + Send + Sync>,
        gate: Box<dyn MemoryGate>,
    ) -> Option<Self> {
        let pieces: Vec<Piece> = pieces
            .into_iter()
            .filter(|&(_, len)| len > 0)
            .map(|(ptr, len)| Piece { ptr, len })
            .collect();
        let len = pieces
            .iter()
            .try_fold(0usize, |total, p| total.checked_add(p.len))?;
        Some(ClientPlaintext {
            pieces,
            len,
            _mapped: mapped,
            gate,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Runs `read` through the gate, or fails: the request's queue was
    /// stopped before its data was read.
    fn through_gate(&self, mut read: impl FnMut()) -> io::Result<()> {
        if self.gate.read(&mut read) {
            Ok(())
        } else {
            Err(io::Error::other(
                "the request's queue was stopped before its data was read",
            ))
        }
    }

    /// Copies the plaintext into `target`, of its length.
    fn copy_to(&self, target: &mut [u8]) {
        assert_eq!(
            target.len(),
            self.len,
            "target and plaintext differ in length"
        );
        let mut at = 0;
        for p in &self.pieces {
            // SAFETY: `p` is readable while `self` lives (`new`); `target`
            // is ours, so they cannot overlap.
            unsafe { std::ptr::copy_nonoverlapping(p.ptr, target[at..].as_mut_ptr(), p.len) };
            at += p.len;
        }
    }

    /// Encrypts plaintext bytes `[from, from + target.len())` with
    /// `cipher` into `target`, whose first sector has index
    /// `first_sector`. Whole sectors inside one piece are encrypted
    /// straight from it; a sector that pieces cut is gathered into
    /// `target` first and encrypted there.
    fn encrypt_part(
        &self,
        cipher: &VolumeCipher,
        from: usize,
        target: &mut [u8],
        first_sector: u64,
    ) {
        let ss = cipher.sector_size();
        // A part that is not whole sectors would leave plaintext behind.
        assert!(
            from.is_multiple_of(ss) && target.len().is_multiple_of(ss),
            "a part that is not whole sectors"
        );
        let to = from + target.len();
        let mut at = 0usize;
        let mut piece_start = 0usize;
        for p in &self.pieces {
            let piece_end = piece_start + p.len;
            let (lo, hi) = (piece_start.max(from), piece_end.min(to));
            piece_start = piece_end;
            if lo >= hi {
                continue;
            }
            // SAFETY (pointer arithmetic): `lo` lies inside the piece.
            let mut ptr = unsafe { p.ptr.add(lo - (piece_end - p.len)) };
            let mut left = hi - lo;
            while left > 0 {
                let into_sector = at % ss;
                let n = if into_sector == 0 && left >= ss {
                    let n = left / ss * ss;
                    let sector = first_sector + (at / ss) as u64;
                    // SAFETY: `n` bytes at `ptr` lie in the piece, readable
                    // while `self` lives, and are not `target` (ours).
                    unsafe { cipher.encrypt_from_raw(ptr, &mut target[at..at + n], sector) };
                    n
                } else {
                    let n = (ss - into_sector).min(left);
                    // SAFETY: as above, for `n` bytes.
                    unsafe { std::ptr::copy_nonoverlapping(ptr, target[at..].as_mut_ptr(), n) };
                    if (at + n).is_multiple_of(ss) {
                        let begin = at + n - ss;
                        cipher.encrypt(
                            &mut target[begin..at + n],
                            first_sector + (begin / ss) as u64,
                        );
                    }
                    n
                };
                at += n;
                left -= n;
                // SAFETY: still inside the piece, or one past its end.
                ptr = unsafe { ptr.add(n) };
            }
        }
        assert_eq!(at, target.len(), "plaintext shorter than the part");
    }
}

/// The plaintext a write brings.
#[derive(Debug)]
pub enum WriteData {
    /// In a buffer of ours: encrypted in place.
    Buffer(IoBuf),
    /// In the client's memory: encrypted from there into a new buffer.
    Client(ClientPlaintext),
}

impl From<IoBuf> for WriteData {
    fn from(buf: IoBuf) -> Self {
        WriteData::Buffer(buf)
    }
}

impl WriteData {
    pub fn len(&self) -> usize {
        match self {
            WriteData::Buffer(buf) => buf.len(),
            WriteData::Client(plain) => plain.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The plaintext in a buffer of ours, copied out of the client's
    /// memory if it is still there (an error if it may no longer be
    /// read).
    pub fn into_plaintext(self) -> io::Result<IoBuf> {
        match self {
            WriteData::Buffer(buf) => Ok(buf),
            WriteData::Client(plain) => {
                let mut buf = IoBuf::new(plain.len());
                plain.through_gate(|| plain.copy_to(&mut buf))?;
                Ok(buf)
            }
        }
    }
}

impl DataArea {
    /// Encrypts `data` (whole sectors from byte `start`) with `keys`: the
    /// target generation's below the re-encryption checkpoint, the
    /// current one's from it. Every byte of the returned buffer is
    /// ciphertext written here (a pooled buffer's old contents never
    /// survive).
    pub(in crate::volume) fn seal(
        &self,
        keys: &DataKeys,
        data: WriteData,
        start: u64,
    ) -> io::Result<IoBuf> {
        match data {
            WriteData::Buffer(mut buf) => {
                self.timed(|| self.encrypt_range(keys, &mut buf, start));
                Ok(buf)
            }
            WriteData::Client(plain) => {
                let mut buf = IoBuf::new(plain.len());
                let split = self.target_part(keys, start, buf.len());
                let sector = self.sector;
                plain.through_gate(|| {
                    self.timed(|| {
                        let (low, high) = buf.split_at_mut(split);
                        if let Some(target) = &keys.target {
                            plain.encrypt_part(target, 0, low, start / sector);
                        }
                        let first = (start + split as u64) / sector;
                        plain.encrypt_part(&keys.current, split, high, first);
                    })
                })?;
                Ok(buf)
            }
        }
    }

    /// `write` of `data`: whole sectors are encrypted from where the
    /// plaintext is (`seal`) under the range lock; partial sectors take
    /// the read-modify-write of `write` on a copy.
    pub fn write_data(&self, offset: u64, data: WriteData) -> io::Result<()> {
        let len = data.len() as u64;
        self.check_range(offset, len)?;
        let (start, end) = self.aligned(offset, len);
        if start != offset || end != offset + len {
            return self.write(offset, &mut data.into_plaintext()?);
        }
        let _guard = self.writers.lock(start, end);
        self.write_sealed(data, start)
    }

    /// Encrypts whole sectors and writes them at `start`; the caller
    /// holds their range.
    pub(in crate::volume) fn write_sealed(&self, data: WriteData, start: u64) -> io::Result<()> {
        let keys = self.cipher()?;
        let sealed = self.seal(&keys, data, start)?;
        self.backing.write_data(&sealed, self.data_offset + start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Dek;
    use crate::volume::header::InnerCipher;

    /// Plaintext cut into pieces at every kind of place (inside a
    /// sector, at its edges, pieces shorter than a sector, one byte)
    /// encrypts to exactly what the whole plaintext in place does, for
    /// one layer and two, and every byte of the target is written.
    #[test]
    fn pieces_cut_anywhere_encrypt_as_the_whole_in_place() {
        let (a, b) = (Dek::generate().unwrap(), Dek::generate().unwrap());
        for ss in [512usize, 4096] {
            let mut plain = vec![0u8; 6 * ss];
            getrandom::fill(&mut plain).unwrap();
            for inner in [None, Some(&b)] {
                let cipher = VolumeCipher::new(&a, inner, InnerCipher::AesXts, ss);
                let mut sealed = plain.clone();
                cipher.encrypt(&mut sealed, 7);
                for cuts in [
                    vec![],
                    vec![1],
                    vec![ss],
                    vec![ss - 1, ss + 1],
                    vec![3, 4, 5, 16, 2 * ss + 7],
                    vec![ss / 2, ss, 3 * ss / 2, 5 * ss],
                    (1..6 * ss).step_by(ss / 2 + 3).collect(),
                ] {
                    let mut pieces = Vec::new();
                    let mut last = 0;
                    for &cut in cuts.iter().chain([&plain.len()]) {
                        pieces.push((plain[last..].as_ptr(), cut - last));
                        last = cut;
                    }
                    // SAFETY: `plain` outlives the plaintext and is only read.
                    let client = unsafe {
                        ClientPlaintext::new(pieces, Arc::new(()), Box::new(AlwaysReadable))
                    }
                    .unwrap();
                    assert_eq!(client.len(), plain.len());
                    for (from, to) in [(0, 6 * ss), (0, 2 * ss), (2 * ss, 6 * ss), (ss, 4 * ss)] {
                        let mut target = vec![0xa5u8; to - from];
                        let first = 7 + (from / ss) as u64;
                        client.encrypt_part(&cipher, from, &mut target, first);
                        assert_eq!(
                            target,
                            sealed[from..to],
                            "{ss}-byte sectors, {} layers, cuts {cuts:?}, part {from}..{to}",
                            cipher.layers()
                        );
                    }
                    let mut copy = vec![0u8; plain.len()];
                    client.copy_to(&mut copy);
                    assert_eq!(copy, plain);
                }
            }
        }
    }

    /// Client plaintext in odd pieces, written through `write_data`
    /// (whole sectors across a re-encryption checkpoint, and a partial
    /// write's read-modify-write), reads back, and the backing holds
    /// ciphertext only.
    #[test]
    fn client_plaintext_written_across_a_reencryption_checkpoint_reads_back() {
        use crate::volume::data::tests::area;
        let a = area(512, 1 << 20);
        let target = VolumeCipher::new(&Dek::generate().unwrap(), None, InnerCipher::AesXts, 512);
        a.begin_reencrypt(target, 8192).unwrap();
        let mut plain = b"client plaintext".repeat(1024);
        plain[5000..5016].copy_from_slice(b"somewhere else!!");
        let cut = |bytes: &[u8], at: &[usize]| {
            let mut pieces = Vec::new();
            let mut last = 0;
            for &cut in at.iter().chain([&bytes.len()]) {
                pieces.push((bytes[last..].as_ptr(), cut - last));
                last = cut;
            }
            // SAFETY: `bytes` outlives the write and is only read.
            WriteData::Client(
                unsafe { ClientPlaintext::new(pieces, Arc::new(()), Box::new(AlwaysReadable)) }
                    .unwrap(),
            )
        };
        // Sectors 8..40, the checkpoint at sector 16.
        a.write_data(4096, cut(&plain, &[700, 701, 4096, 9000]))
            .unwrap();
        assert_eq!(&a.read(4096, plain.len()).unwrap()[..], &plain[..]);
        let partial = b"partial".repeat(100);
        a.write_data(8000, cut(&partial, &[3, 300])).unwrap();
        let mut expected = plain.clone();
        expected[8000 - 4096..8000 - 4096 + partial.len()].copy_from_slice(&partial);
        assert_eq!(&a.read(4096, plain.len()).unwrap()[..], &expected[..]);
        let mut raw = vec![0u8; plain.len()];
        a.backing().read_at(&mut raw, 4096 + 4096).unwrap();
        assert!(!raw.windows(16).any(|w| w == b"client plaintext"));
    }

    #[test]
    fn an_overflowing_length_is_refused() {
        let pieces = [(std::ptr::null::<u8>(), usize::MAX), (std::ptr::null(), 1)];
        // SAFETY: refused before anything is read.
        assert!(
            unsafe { ClientPlaintext::new(pieces, Arc::new(()), Box::new(AlwaysReadable)) }
                .is_none()
        );
    }
}
