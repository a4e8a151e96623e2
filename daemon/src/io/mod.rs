//! Backing I/O: the file, block device (`file.rs`) or remote NBD export
//! (`remote/`) under a volume (`backing.rs` joins them), the two engines
//! that run I/O (`uring.rs`, `workers.rs`, chosen in `engine.rs`), pooled
//! and registered buffers, the range lock that serialises writers on
//! overlapping sectors, and the claim that gives a local backing one owner
//! (`owner.rs`), and the idle polling of threads that serve requests
//! (`idle.rs`).
//!
//! Encryption does not happen here; `volume/` encrypts, this module moves
//! ciphertext.

mod backing;
mod buffers;
pub mod engine;
mod file;
mod fixed;
pub mod idle;
mod memory;
mod owner;
mod page;
mod range_lock;
pub mod remote;
pub mod uring;
pub mod workers;
mod write_back;

pub use backing::{is_remote, Backing};
pub use buffers::IoBuf;
pub use memory::MemoryBacking;
pub use owner::open_claimed;
pub use range_lock::{RangeGuard, RangeLock};
