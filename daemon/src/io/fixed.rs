//! Registered buffers: a bounded arena per io_uring worker, registered
//! once with IORING_REGISTER_BUFFERS, so reads and writes on that ring can
//! use the fixed opcodes. A fixed op skips the per-request work of mapping
//! the user buffer (and, with O_DIRECT, of pinning its pages).
//!
//! The arena is cut into equal slots; a slot is lent out as an `IoBuf`
//! (`IoBuf::fixed`) and comes back when that `IoBuf` drops, on whichever
//! thread that happens. When every slot is out, or a request is larger
//! than a slot, callers get an ordinary pooled buffer: the arena bounds
//! locked memory, never throughput.
//!
//! What lives elsewhere: the pooled buffers and `IoBuf` itself
//! (`buffers.rs`); registering the arena and choosing the opcodes
//! (`uring.rs`).

use std::sync::{Arc, Mutex, PoisonError};

use super::page::{Page, PAGE};

/// Slots per ring: a queue depth of 32 per ring, the deepest the
/// benchmarks drive; deeper queues borrow pooled buffers.
pub const FIXED_SLOTS: usize = 32;
/// Bytes per slot: covers the small requests where per-op overhead shows;
/// larger ones are dominated by the copy and XTS. 2 MiB locked per ring
/// (per core), which the unit's `LimitMEMLOCK` allows.
pub const FIXED_SLOT_BYTES: usize = 64 * 1024;

/// One ring's registered memory and the slots not lent out.
pub struct FixedArena {
    /// Owns `slots * slot_bytes` bytes; freed only when the last `Arc`
    /// (the ring's or a lent slot's) goes.
    base: *mut Page,
    pages: usize,
    slot_bytes: usize,
    free: Mutex<Vec<u16>>,
}

// SAFETY: `base` is a heap allocation owned by the arena. Shared access
// only hands out disjoint slots, each to one `FixedSlot` at a time (the
// free list is behind a mutex), so no two threads ever alias a slot's
// bytes mutably.
unsafe impl Send for FixedArena {}
// SAFETY: as above.
unsafe impl Sync for FixedArena {}

impl FixedArena {
    pub fn new(slots: usize, slot_bytes: usize) -> Arc<Self> {
        let slot_bytes = slot_bytes.next_multiple_of(PAGE);
        let slots = slots.min(u16::MAX as usize);
        let pages = slots * slot_bytes / PAGE;
        let memory: Box<[Page]> = vec![Page([0; PAGE]); pages].into_boxed_slice();
        Arc::new(FixedArena {
            base: Box::into_raw(memory).cast::<Page>(),
            pages,
            slot_bytes,
            free: Mutex::new((0..slots as u16).rev().collect()),
        })
    }

    /// One iovec per slot, in index order, for IORING_REGISTER_BUFFERS.
    pub fn iovecs(&self) -> Vec<libc::iovec> {
        (0..self.slots())
            .map(|i| libc::iovec {
                iov_base: self.slot_ptr(i as u16).cast(),
                iov_len: self.slot_bytes,
            })
            .collect()
    }

    pub fn slots(&self) -> usize {
        self.pages * PAGE / self.slot_bytes
    }

    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// How many slots are lent out now.
    pub fn in_use(&self) -> usize {
        self.slots()
            - self
                .free
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .len()
    }

    fn slot_ptr(&self, index: u16) -> *mut u8 {
        // SAFETY: callers pass indexes below `slots()`, so the offset stays
        // inside the allocation.
        unsafe { self.base.cast::<u8>().add(index as usize * self.slot_bytes) }
    }

    /// Lends a free slot for a buffer of `len` bytes, if one fits.
    pub fn take(self: &Arc<Self>, len: usize) -> Option<FixedSlot> {
        if len > self.slot_bytes {
            return None;
        }
        let index = self
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()?;
        Some(FixedSlot {
            arena: self.clone(),
            index,
        })
    }
}

impl Drop for FixedArena {
    fn drop(&mut self) {
        // SAFETY: `base` came from `Box::into_raw` of a `[Page]` of
        // `pages` elements and is freed only here, once no slot is lent
        // (each lent slot holds an `Arc` to the arena).
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.base, self.pages)) });
    }
}

/// A slot lent out of an arena; returned when dropped.
pub struct FixedSlot {
    arena: Arc<FixedArena>,
    index: u16,
}

impl FixedSlot {
    pub fn as_ptr(&self) -> *mut u8 {
        self.arena.slot_ptr(self.index)
    }

    /// The slot's buffer index if it belongs to `arena`.
    pub fn index_in(&self, arena: &Arc<FixedArena>) -> Option<u16> {
        Arc::ptr_eq(&self.arena, arena).then_some(self.index)
    }
}

impl Drop for FixedSlot {
    fn drop(&mut self) {
        self.arena
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(self.index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::IoBuf;

    #[test]
    fn slots_are_lent_once_and_come_back() {
        let arena = FixedArena::new(2, 8192);
        let a = IoBuf::fixed(&arena, 8192).expect("a free slot");
        let mut b = IoBuf::fixed(&arena, 100).expect("a second slot");
        assert!(IoBuf::fixed(&arena, 1).is_none(), "only two slots");
        assert!(
            IoBuf::fixed(&FixedArena::new(1, 4096), 4097).is_none(),
            "too large"
        );
        assert_ne!(a.as_ptr(), b.as_ptr());
        assert_eq!(a.as_ptr() as usize % PAGE, 0);
        b.fill(9);
        assert_eq!(b.len(), 100);
        assert_eq!(arena.in_use(), 2);
        let (ia, ib) = (a.fixed_index(&arena), b.fixed_index(&arena));
        assert!(ia.is_some() && ib.is_some() && ia != ib);
        assert_eq!(
            a.fixed_index(&FixedArena::new(1, 4096)),
            None,
            "another ring's arena"
        );
        drop(a);
        assert_eq!(arena.in_use(), 1);
        // Dropped on another thread, as replies are.
        std::thread::spawn(move || drop(b)).join().expect("thread");
        assert_eq!(arena.in_use(), 0);
        assert_eq!(arena.iovecs().len(), 2);
        assert_eq!(IoBuf::new(10).fixed_index(&arena), None);
    }
}
