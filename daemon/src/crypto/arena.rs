//! The key arena: one process-wide home for all long-lived key material
//! (DEKs, the local KEK, the keys derived from a DEK, and the expanded AES
//! and Adiantum key schedules), so none of it reaches swap, a core dump or
//! a forked child.
//!
//! The arena is made of regions: anonymous mappings of [`REGION`] bytes
//! between two `PROT_NONE` guard pages, each `mlock`ed once and marked
//! `MADV_DONTDUMP` and `MADV_WIPEONFORK` when it is mapped. A region is
//! never unmapped or unlocked while the process lives, so freeing one key
//! can never unlock the page another key shares (what per-key `munlock`
//! did before). A full arena grows by another region; it never falls back
//! to the heap. A failed `mlock` (RLIMIT_MEMLOCK too low) is logged once:
//! the region is still out of core dumps and forks, and refusing to serve
//! over it would punish hosts without swap, where it is moot.
//!
//! Regions are cut into fixed-size slots (powers of two from 64 bytes to
//! [`MAX_SLOT`]), each aligned to its size and each size with its own
//! free list. A slot is zeroed when it is freed, so a fresh slot is always
//! all zeros.
//!
//! [`Locked<T>`] owns one slot holding a `T`. It is built in place where it
//! can be (byte arrays are filled in the slot), and otherwise moved in from
//! its constructor, after which the stack that constructor used is
//! overwritten ([`scrub_stack`]): a key schedule computed on the stack
//! does not outlive its copy in the arena there. `Locked` is not `Clone`
//! except for byte arrays, whose clone is another slot.
//!
//! All the `unsafe` of key storage lives here. What lives elsewhere: the
//! DEK type (`dek.rs`), the ciphers whose schedules sit in slots (`xts.rs`,
//! `adiantum.rs`), process-wide core-dump settings (`hardening.rs`).

use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Mutex, MutexGuard, Once};

use zeroize::Zeroize;

/// Bytes of key slots per region (guard pages not counted).
pub const REGION: usize = 256 * 1024;
/// The smallest slot.
const MIN_SLOT_SHIFT: u32 = 6;
/// The largest slot, and so the largest `T` a [`Locked`] holds.
const MAX_SLOT_SHIFT: u32 = 13;
pub const MAX_SLOT: usize = 1 << MAX_SLOT_SHIFT;
const CLASSES: usize = (MAX_SLOT_SHIFT - MIN_SLOT_SHIFT + 1) as usize;
// A region is only page-aligned and MAX_SLOT may exceed a page, so the
// first slot of a fresh region can start up to MAX_SLOT - 1 bytes in; it
// must still fit.
const _: () = assert!(
    2 * MAX_SLOT <= REGION,
    "a region must hold an aligned largest slot"
);
/// Stack bytes overwritten after a value was built on it and moved into a
/// slot: more than any key constructor here uses (an Adiantum cipher, the
/// largest, builds about 5 KiB of state).
const SCRUB: usize = 32 * 1024;

/// One mapped region: `base .. base + REGION` are slots.
#[derive(Debug, Clone, Copy)]
struct Region {
    base: usize,
    locked: bool,
}

struct Arena {
    regions: Vec<Region>,
    /// Freed (and zeroed) slots of each size class, by address.
    free: [Vec<usize>; CLASSES],
    /// The unused tail of the newest region: `next .. end`.
    next: usize,
    end: usize,
}

static ARENA: Mutex<Arena> = Mutex::new(Arena {
    regions: Vec::new(),
    free: [const { Vec::new() }; CLASSES],
    next: 0,
    end: 0,
});

static MLOCK_WARNING: Once = Once::new();

fn arena() -> MutexGuard<'static, Arena> {
    // Every update leaves the arena consistent, so a panic elsewhere while
    // holding the lock does not poison it for the rest of the process.
    ARENA.lock().unwrap_or_else(|e| e.into_inner())
}

fn page_size() -> usize {
    // SAFETY: sysconf reads a constant of the system.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(page).unwrap_or(4096).max(4096)
}

/// The size class of a value of `size` bytes aligned to `align`.
const fn class_of(size: usize, align: usize) -> usize {
    let need = if size > align { size } else { align };
    let mut class = 0;
    while (1usize << (MIN_SLOT_SHIFT as usize + class)) < need {
        class += 1;
    }
    class
}

const fn slot_len(class: usize) -> usize {
    1 << (MIN_SLOT_SHIFT as usize + class)
}

impl Arena {
    /// A zeroed slot of `class`, from the free list or the newest region.
    fn take(&mut self, class: usize) -> NonNull<u8> {
        self.take_or_map(class, map_region)
    }

    /// [`Arena::take`], with `map` making a new region when one is needed.
    fn take_or_map(&mut self, class: usize, map: impl FnOnce() -> Region) -> NonNull<u8> {
        if let Some(addr) = self.free[class].pop() {
            return NonNull::new(addr as *mut u8).expect("slots are never null");
        }
        let len = slot_len(class);
        // Slots are aligned to their own size (as addresses, not offsets
        // in a region), so every `T` whose alignment is at most its
        // class's size is aligned too. A region's base is only
        // page-aligned, which is less than the largest slots need.
        let mut at = self.next.next_multiple_of(len);
        if self.end == 0 || at + len > self.end {
            let region = map();
            self.regions.push(region);
            at = region.base.next_multiple_of(len);
            self.end = region.base + REGION;
        }
        self.next = at + len;
        NonNull::new(at as *mut u8).expect("mmap never returns null here")
    }
}

/// Maps, guards, locks and marks one region. Only a failure to map at all
/// is fatal: without it no key can be stored safely.
fn map_region() -> Region {
    let page = page_size();
    let total = REGION + 2 * page;
    // SAFETY: an anonymous private mapping at an address the kernel picks
    // touches no existing memory.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        panic!(
            "cannot map memory for keys: {}",
            std::io::Error::last_os_error()
        );
    }
    let start = raw as usize;
    let base = start + page;
    // SAFETY (the calls below): each names a page range inside the mapping
    // just made, which nothing else references yet; they change only its
    // protection, paging and dump attributes.
    unsafe {
        // Guard pages: running off either end of the region faults.
        libc::mprotect(raw, page, libc::PROT_NONE);
        libc::mprotect((base + REGION) as *mut libc::c_void, page, libc::PROT_NONE);
        if libc::madvise(base as *mut libc::c_void, REGION, libc::MADV_DONTDUMP) != 0 {
            // Since Linux 3.4; the process is also not dumpable
            // (`hardening.rs`), so this is the second lock, not the only.
            tracing::warn!(
                "could not keep key memory out of core dumps (madvise: {})",
                std::io::Error::last_os_error()
            );
        }
        // Since Linux 4.14; a forked child sees zeros instead of keys.
        // Older kernels refuse it, which only loses that extra.
        libc::madvise(base as *mut libc::c_void, REGION, libc::MADV_WIPEONFORK);
    }
    // SAFETY: as above; mlock faults the pages in and pins them.
    let locked = unsafe { libc::mlock(base as *const libc::c_void, REGION) } == 0;
    if !locked {
        MLOCK_WARNING.call_once(|| {
            tracing::warn!(
                "could not lock key memory (mlock: {}); raise LimitMEMLOCK to keep keys out of swap",
                std::io::Error::last_os_error()
            );
        });
    }
    Region { base, locked }
}

/// The arena's regions as `(start, end, locked)`, for tests and status.
pub fn regions() -> Vec<(usize, usize, bool)> {
    arena()
        .regions
        .iter()
        .map(|r| (r.base, r.base + REGION, r.locked))
        .collect()
}

/// Whether `addr .. addr + len` lies inside one region of the arena.
pub fn contains(addr: usize, len: usize) -> bool {
    arena()
        .regions
        .iter()
        .any(|r| addr >= r.base && addr + len <= r.base + REGION)
}

/// Overwrites [`SCRUB`] bytes of the stack below the caller's frame, where
/// a constructor that just returned kept its temporaries.
#[inline(never)]
pub fn scrub_stack() {
    let mut area = [0u8; SCRUB];
    // Volatile writes: not optimised away although nothing reads them.
    area.zeroize();
    std::hint::black_box(&area);
}

/// Overwrites `WORDS` words of the stack below the caller's frame: the
/// smaller, cheaper [`scrub_stack`] for a hot path whose callee's stack
/// depth is known (`adiantum.rs`).
#[inline(never)]
pub fn scrub_stack_words<const WORDS: usize>() {
    let mut area = [0u64; WORDS];
    // Word-sized volatile writes: not elided, and an eighth of the stores
    // of a byte array.
    area.zeroize();
    std::hint::black_box(&area);
}

/// A `T` in a slot of the key arena; zeroed (after `T`'s own drop) when
/// dropped.
pub struct Locked<T> {
    ptr: NonNull<T>,
    _owns: PhantomData<T>,
}

// SAFETY: a `Locked<T>` owns its `T` exclusively, like a `Box<T>`.
unsafe impl<T: Send> Send for Locked<T> {}
// SAFETY: shared access only hands out `&T`, like a `Box<T>`.
unsafe impl<T: Sync> Sync for Locked<T> {}

impl<T> Locked<T> {
    const CLASS: usize = {
        assert!(
            std::mem::size_of::<T>() <= MAX_SLOT && std::mem::align_of::<T>() <= MAX_SLOT,
            "a key type larger than the arena's largest slot"
        );
        class_of(std::mem::size_of::<T>(), std::mem::align_of::<T>())
    };

    /// Builds a value with `make` and moves it into a slot; the stack
    /// `make` used is then scrubbed.
    pub fn new(make: impl FnOnce() -> T) -> Self {
        let slot = arena().take(Self::CLASS).cast::<T>();
        place(slot, make);
        scrub_stack();
        Locked {
            ptr: slot,
            _owns: PhantomData,
        }
    }

    /// Like [`Locked::new`] for a constructor that may fail; the slot is
    /// freed again on failure.
    pub fn try_new<E>(make: impl FnOnce() -> Result<T, E>) -> Result<Self, E> {
        let slot = arena().take(Self::CLASS);
        let mut made = None;
        let result = place_result(slot.cast::<T>(), make, &mut made);
        scrub_stack();
        match result {
            Ok(()) => Ok(Locked {
                ptr: slot.cast(),
                _owns: PhantomData,
            }),
            Err(()) => {
                release(slot, Self::CLASS, 0);
                Err(made.expect("the error is kept on failure"))
            }
        }
    }
}

#[inline(never)]
fn place<T>(slot: NonNull<T>, make: impl FnOnce() -> T) {
    // SAFETY: `slot` is a fresh slot of this class, aligned to the class's
    // size, at least as large and aligned as `T` (`Locked::CLASS`), owned
    // by nobody else; writing does not drop the zeros it held.
    unsafe { slot.as_ptr().write(make()) }
}

#[inline(never)]
fn place_result<T, E>(
    slot: NonNull<T>,
    make: impl FnOnce() -> Result<T, E>,
    error: &mut Option<E>,
) -> Result<(), ()> {
    match make() {
        // SAFETY: as in `place`.
        Ok(value) => unsafe {
            slot.as_ptr().write(value);
            Ok(())
        },
        Err(e) => {
            *error = Some(e);
            Err(())
        }
    }
}

impl<const N: usize> Locked<[u8; N]> {
    /// A zeroed byte array in a slot, to be filled in place.
    pub fn zeroed() -> Self {
        let slot = arena().take(Self::CLASS).cast::<[u8; N]>();
        // Fresh regions are zero-filled by the kernel and freed slots are
        // zeroed, so the slot already holds a valid `[u8; N]` of zeros.
        Locked {
            ptr: slot,
            _owns: PhantomData,
        }
    }
}

impl<const N: usize> Clone for Locked<[u8; N]> {
    fn clone(&self) -> Self {
        let mut copy = Self::zeroed();
        copy.copy_from_slice(&self[..]);
        copy
    }
}

impl<T> Deref for Locked<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: `ptr` holds an initialised `T` that this owner alone
        // frees, for as long as `self` lives.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> DerefMut for Locked<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`, and `&mut self` makes the access unique.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T> Drop for Locked<T> {
    fn drop(&mut self) {
        // SAFETY: the slot holds an initialised `T` that nothing else
        // references; after this it is treated as bytes only.
        unsafe { std::ptr::drop_in_place(self.ptr.as_ptr()) };
        release(self.ptr.cast(), Self::CLASS, std::mem::size_of::<T>());
    }
}

/// Zeroes a slot's first `used` bytes and returns it to its free list.
fn release(slot: NonNull<u8>, class: usize, used: usize) {
    debug_assert!(used <= slot_len(class));
    // SAFETY: the slot is `slot_len(class)` bytes of a region that stays
    // mapped for the life of the process, owned by the caller until it is
    // pushed on the free list below; its bytes are plain memory now.
    let bytes = unsafe { std::slice::from_raw_parts_mut(slot.as_ptr(), used) };
    // Volatile, so not elided although the slot is not read again here.
    bytes.zeroize();
    arena().free[class].push(slot.as_ptr() as usize);
}

impl<T> std::fmt::Debug for Locked<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Locked(<secret>)")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The VmFlags of the mapping that holds `addr`, from /proc/self/smaps,
    /// and its `Locked:` size in KiB.
    pub(crate) fn mapping_of(addr: usize) -> Option<(Vec<String>, u64)> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        let mut locked = 0;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((lo, hi)) = first.split_once('-').filter(|_| !line.ends_with(':')) {
                if let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                {
                    inside = (lo..hi).contains(&addr);
                    continue;
                }
            }
            if !inside {
                continue;
            }
            if let Some(kb) = line.strip_prefix("Locked:") {
                locked = kb.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            }
            if let Some(flags) = line.strip_prefix("VmFlags:") {
                return Some((flags.split_whitespace().map(String::from).collect(), locked));
            }
        }
        None
    }

    /// Whether `addr` lies in a mapping that is out of core dumps and
    /// (when the arena could lock its regions) locked in every page.
    pub(crate) fn is_protected(addr: usize) -> bool {
        let Some((flags, locked_kb)) = mapping_of(addr) else {
            return false;
        };
        let all_locked = regions().iter().all(|r| r.2);
        let locked = flags.iter().any(|f| f == "lo") && locked_kb * 1024 == REGION as u64;
        flags.iter().any(|f| f == "dd") && (locked || !all_locked)
    }

    #[test]
    fn regions_are_out_of_dumps_and_locked() {
        let key = Locked::<[u8; 32]>::zeroed();
        let addr = key.as_ptr() as usize;
        assert!(contains(addr, 32));
        let (flags, locked_kb) = mapping_of(addr).expect("the arena is mapped");
        assert!(flags.iter().any(|f| f == "dd"), "{flags:?}");
        // Root (and any LimitMEMLOCK of 256 KiB or more) locks the region.
        let (_, _, locked) = regions()
            .into_iter()
            .find(|r| (r.0..r.1).contains(&addr))
            .unwrap();
        if locked {
            assert!(flags.iter().any(|f| f == "lo"), "{flags:?}");
            assert!(locked_kb > 0);
        } else {
            eprintln!("mlock failed here (RLIMIT_MEMLOCK); only dontdump is checked");
        }
    }

    #[test]
    fn freeing_a_slot_zeroes_it() {
        let mut key = Locked::<[u8; 64]>::zeroed();
        key.fill(0xAB);
        let at = key.as_ptr();
        drop(key);
        // SAFETY: regions stay mapped for the life of the process; the
        // slot may already hold another test's key, never ours.
        let after: Vec<u8> = (0..64)
            .map(|i| unsafe { std::ptr::read_volatile(at.add(i)) })
            .collect();
        assert!(!after.windows(4).any(|w| w == [0xAB; 4]), "{after:?}");
    }

    #[test]
    fn a_value_with_drop_glue_is_dropped_then_zeroed() {
        struct Counted {
            _witness: std::sync::Arc<()>,
            bytes: [u8; 100],
        }
        let witness = std::sync::Arc::new(());
        let held = Locked::new(|| Counted {
            _witness: witness.clone(),
            bytes: [7; 100],
        });
        assert_eq!(std::sync::Arc::strong_count(&witness), 2);
        assert_eq!(held.bytes, [7; 100]);
        drop(held);
        assert_eq!(std::sync::Arc::strong_count(&witness), 1);
    }

    #[test]
    fn slots_are_aligned_and_sized_by_class() {
        assert_eq!(class_of(1, 1), 0);
        assert_eq!(class_of(64, 8), 0);
        assert_eq!(class_of(65, 8), 1);
        assert_eq!(class_of(32, 128), 1);
        assert_eq!(slot_len(class_of(MAX_SLOT, 16)), MAX_SLOT);
        #[repr(align(256))]
        struct Wide([u8; 10]);
        let w = Locked::new(|| Wide([1; 10]));
        assert_eq!(&*w as *const Wide as usize % 256, 0);
        assert_eq!(w.0, [1; 10]);
    }

    /// A region's base is page-aligned only: the largest slots (larger
    /// than a page) taken first from a fresh region are still aligned to
    /// their size, and inside it. `take_or_map` only computes addresses,
    /// so the regions here are made up and never touched.
    #[test]
    fn the_first_slots_of_a_fresh_region_are_aligned_to_their_size() {
        const { assert!(MAX_SLOT > 4096, "this test needs a slot larger than a page") };
        let largest = class_of(MAX_SLOT, 1);
        for base in [0x7f00_0000_1000usize, 0x7f00_0000_3000, 0x7f00_0000_2000] {
            let mut arena = Arena {
                regions: Vec::new(),
                free: [const { Vec::new() }; CLASSES],
                next: 0,
                end: 0,
            };
            let region = || Region {
                base,
                locked: false,
            };
            let first = arena.take_or_map(largest, region).as_ptr() as usize;
            let second = arena.take_or_map(largest, region).as_ptr() as usize;
            let small = arena.take_or_map(0, region).as_ptr() as usize;
            assert_eq!(arena.regions.len(), 1, "one region holds them all");
            for (at, len) in [(first, MAX_SLOT), (second, MAX_SLOT), (small, 64)] {
                assert_eq!(at % len, 0, "{at:#x} in a region at {base:#x}");
                assert!(at >= base && at + len <= base + REGION, "{at:#x}");
            }
            assert_ne!(first, second);
        }
    }

    #[test]
    fn a_failed_constructor_gives_its_slot_back_zeroed() {
        let r = Locked::<[u8; 16]>::try_new(|| Err::<[u8; 16], _>("no"));
        assert_eq!(r.err(), Some("no"));
    }
}
