//! Reusable I/O buffers. Every request needs a buffer as large as its
//! payload; allocating it fresh meant zero-filling (and, above glibc's mmap
//! threshold, page-faulting) up to 32 MiB per request — about a tenth of the
//! server's CPU on sequential reads. Buffers come in power-of-two classes
//! from 4 KiB to 32 MiB, are zeroed once when first made, and go back to
//! their class when dropped, up to a cap on the bytes kept idle.
//!
//! Every buffer starts on a 4 KiB boundary and spans whole pages, so the
//! same buffers serve O_DIRECT backings (which need aligned memory).
//!
//! An `IoBuf` may instead be a slot of a ring's registered arena
//! (`fixed.rs`); it behaves the same and returns to that arena on drop.
//!
//! The rule for pooled buffers: a buffer's old contents may be another
//! volume's plaintext, so a buffer never reaches a client, a backend or
//! the cipher before it has been fully written. Whoever fills one answers
//! for every byte: a local read fills the whole length (zeros past the end
//! of a file) or fails; a remote read is handed over only when the server's reply covered all of
//! it (`io/remote/client/coverage.rs`; a failed one has its unwritten bytes
//! zeroed). `new` does not zero (that cost is on the hot path); use
//! `zeroed` where nothing else will write the whole buffer.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::fixed::{FixedArena, FixedSlot};
use super::page::{Page, PAGE};

const MIN_CLASS: u32 = 12; // 4 KiB
const MAX_CLASS: u32 = 25; // 32 MiB
const CLASSES: usize = (MAX_CLASS - MIN_CLASS + 1) as usize;
/// Idle bytes kept for reuse across all classes.
const MAX_IDLE_BYTES: usize = 256 << 20;

static FREE: [Mutex<Vec<Vec<Page>>>; CLASSES] = [const { Mutex::new(Vec::new()) }; CLASSES];
static IDLE_BYTES: AtomicUsize = AtomicUsize::new(0);

/// A byte buffer of a requested length, returned to the pool on drop.
/// Its contents on arrival are whatever the last user left: callers
/// overwrite all of it before anything reads it (see the module doc).
pub struct IoBuf {
    /// Invariant: `len` never exceeds the storage's capacity.
    storage: Storage,
    len: usize,
}

enum Storage {
    Pooled(Vec<Page>),
    Fixed(FixedSlot),
}

impl Storage {
    fn as_ptr(&self) -> *const u8 {
        match self {
            Storage::Pooled(pages) => pages.as_ptr().cast(),
            Storage::Fixed(slot) => slot.as_ptr(),
        }
    }

    fn as_mut_ptr(&mut self) -> *mut u8 {
        match self {
            Storage::Pooled(pages) => pages.as_mut_ptr().cast(),
            Storage::Fixed(slot) => slot.as_ptr(),
        }
    }
}

fn pages(bytes: usize) -> Vec<Page> {
    vec![Page([0; PAGE]); bytes.div_ceil(PAGE)]
}

impl IoBuf {
    /// A buffer of exactly `len` bytes (contents unspecified).
    pub fn new(len: usize) -> Self {
        let pages = match class_of(len) {
            Some(class) => {
                let reused = FREE[class]
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .pop();
                match reused {
                    Some(p) => {
                        IDLE_BYTES.fetch_sub(p.len() * PAGE, Ordering::Relaxed);
                        p
                    }
                    None => pages(1 << (class as u32 + MIN_CLASS)),
                }
            }
            None => pages(len),
        };
        IoBuf {
            storage: Storage::Pooled(pages),
            len,
        }
    }

    /// A buffer in a free slot of `arena`, if `len` fits one and a slot
    /// is free (contents unspecified).
    pub fn fixed(arena: &Arc<FixedArena>, len: usize) -> Option<Self> {
        let slot = arena.take(len)?;
        Some(IoBuf {
            storage: Storage::Fixed(slot),
            len,
        })
    }

    /// This buffer's index among `arena`'s registered buffers, if it is one.
    pub fn fixed_index(&self, arena: &Arc<FixedArena>) -> Option<u16> {
        match &self.storage {
            Storage::Fixed(slot) => slot.index_in(arena),
            Storage::Pooled(_) => None,
        }
    }

    /// A buffer of `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        let mut buf = Self::new(len);
        buf.fill(0);
        buf
    }

    /// Shortens the buffer to its first `len` bytes.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

fn class_of(len: usize) -> Option<usize> {
    let bits = len
        .max(1)
        .next_power_of_two()
        .trailing_zeros()
        .max(MIN_CLASS);
    (bits <= MAX_CLASS).then(|| (bits - MIN_CLASS) as usize)
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `Page` is `repr(C)` around `[u8; PAGE]` with size PAGE and
        // no padding, so pooled pages are contiguous, initialised bytes; a
        // fixed slot is initialised arena memory lent to this buffer alone
        // (`fixed.rs`). `len` never exceeds either capacity.
        unsafe { std::slice::from_raw_parts(self.storage.as_ptr(), self.len) }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.storage.as_mut_ptr(), self.len) }
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        // A fixed slot goes back to its arena when `storage` drops.
        let Storage::Pooled(pages) = &mut self.storage else {
            return;
        };
        let size = pages.len() * PAGE;
        let Some(class) = class_of(size).filter(|&c| 1usize << (c as u32 + MIN_CLASS) == size)
        else {
            return;
        };
        if IDLE_BYTES.fetch_add(size, Ordering::Relaxed) + size > MAX_IDLE_BYTES {
            IDLE_BYTES.fetch_sub(size, Ordering::Relaxed);
            return;
        }
        let pages = std::mem::take(pages);
        FREE[class]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(pages);
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_and_reuse() {
        let mut a = IoBuf::new(5000);
        assert_eq!(a.len(), 5000);
        assert_eq!(a.as_ptr() as usize % PAGE, 0, "buffers are page-aligned");
        a.fill(7);
        let ptr = a.as_ptr();
        drop(a);
        let b = IoBuf::zeroed(6000);
        assert_eq!(b.len(), 6000);
        assert!(b.iter().all(|&x| x == 0));
        // Same 8 KiB class: most likely the same allocation came back.
        let _ = ptr;
        let huge = IoBuf::new((32 << 20) + 1);
        assert_eq!(huge.len(), (32 << 20) + 1);
        let mut t = IoBuf::new(100);
        t.truncate(10);
        assert_eq!(t.len(), 10);
    }
}
