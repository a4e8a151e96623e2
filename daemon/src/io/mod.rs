//! Backing I/O: the file or block device under a volume, and the range lock
//! that serialises read-modify-write cycles on overlapping sectors.
//!
//! Encryption does not happen here; `volume/` encrypts, this module moves
//! ciphertext.

mod backing;
mod buffers;
mod range_lock;
pub mod workers;

pub use backing::Backing;
pub use buffers::IoBuf;
pub use range_lock::{RangeGuard, RangeLock};
