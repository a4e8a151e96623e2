//! Data-area cryptography: the XTS-AES-256 sector cipher and the DEK secret type.
//!
//! Key wrapping (protecting a DEK with a KEK) lives in `kek/`, not here: this
//! module only knows how to turn plaintext sectors into ciphertext sectors.

mod adiantum;
mod dek;
mod xts;
#[cfg(target_arch = "x86_64")]
mod xts_vaes;
#[cfg(target_arch = "x86_64")]
mod xts_vaes_avx2;

pub use adiantum::AdiantumSectorCipher;
pub use dek::{Dek, DEK_LEN};
pub use xts::{SectorCipher, XtsKernel, XTS_BLOCK};
