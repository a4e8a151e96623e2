//! Data-area cryptography: the XTS-AES-256 sector cipher, the DEK secret type
//! and the locked arena that holds every long-lived key (`arena.rs`).
//!
//! Key wrapping (protecting a DEK with a KEK) lives in `kek/`, not here: this
//! module only knows how to turn plaintext sectors into ciphertext sectors.

mod adiantum;
pub mod arena;
mod dek;
mod xts;
#[cfg(target_arch = "x86_64")]
mod xts_vaes;
#[cfg(target_arch = "x86_64")]
mod xts_vaes_avx2;

pub use adiantum::AdiantumSectorCipher;
pub use arena::Locked;
pub use dek::{Dek, DEK_LEN};
pub use xts::{SectorCipher, XtsKernel, XTS_BLOCK};
