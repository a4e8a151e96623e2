//! Backing I/O: the file, block device (`file.rs`) or remote NBD export
//! (`remote.rs`) under a volume (`backing.rs` joins them), the two engines
//! that run I/O (`uring.rs`, `workers.rs`, chosen in `engine.rs`), pooled
//! and registered buffers, and the range lock that serialises writers on overlapping sectors.
//!
//! Encryption does not happen here; `volume/` encrypts, this module moves
//! ciphertext.

mod backing;
mod buffers;
pub mod engine;
mod file;
mod fixed;
mod range_lock;
pub mod remote;
pub mod uring;
pub mod workers;

pub use backing::{is_remote, Backing};
pub use buffers::IoBuf;
pub use range_lock::{RangeGuard, RangeLock};
