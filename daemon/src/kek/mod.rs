//! Key-encryption-key (KEK) providers: the one trait every provider
//! implements, the wrapped-key type stored in volume headers, and the errors.
//!
//! A provider only wraps and unwraps DEKs; it never sees data. The trait is
//! blocking on purpose: remote providers (OpenBao transit, PKCS#11, Azure Key
//! Vault) are driven from control threads or `spawn_blocking`, and the I/O
//! path holds its unwrapped DEK in memory, so a slow provider can delay a
//! volume opening or a key check but never a read or a write.
//! Concrete providers live one per file (`local.rs`, ...).

mod local;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::crypto::Dek;

pub use local::LocalKek;

/// Which key wrapped a DEK: provider kind, key id, key version. Stored in the
/// header beside every wrapped DEK so a volume always says which key it needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KekRef {
    pub provider: String,
    pub key_id: String,
    pub key_version: String,
}

impl std::fmt::Display for KekRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} key {} version {}",
            self.provider, self.key_id, self.key_version
        )
    }
}

/// A DEK wrapped by a KEK: opaque bytes plus the reference to the KEK.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrappedDek {
    pub kek: KekRef,
    pub blob: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum KekError {
    #[error("cannot read KEK file {path}: {source}")]
    KeyFileIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("KEK file {path} is accessible by group or others (mode {mode:04o}); run `chmod 600 {path}`")]
    InsecureKeyFile { path: PathBuf, mode: u32 },
    #[error("KEK file {path} is not a local KEK: {reason}")]
    BadKeyFile { path: PathBuf, reason: String },
    #[error("KEK file {path} already exists; refusing to overwrite a key")]
    KeyFileExists { path: PathBuf },
    #[error("the data key was wrapped by {wrapped_by}, but the configured KEK is {configured}")]
    WrongKey {
        wrapped_by: KekRef,
        configured: String,
    },
    #[error(
        "{provider} could not unwrap the data key: the wrapped key is corrupt or the KEK is wrong"
    )]
    UnwrapFailed { provider: String },
    #[error("{provider} could not wrap the data key: {reason}")]
    WrapFailed { provider: String, reason: String },
    #[error("operating system random generator failed: {0}")]
    Random(getrandom::Error),
}

/// One key-encryption key, as configured in a `[kek.NAME]` table.
pub trait KeyProvider: Send + Sync + std::fmt::Debug {
    /// Human description for logs and errors, e.g. `local key 3fa2c1d0 (/etc/hostcrypt/kek.key)`.
    /// Never contains secret material.
    fn describe(&self) -> String;

    /// Wraps `dek` under the provider's current key version.
    fn wrap(&self, dek: &Dek) -> Result<WrappedDek, KekError>;

    /// Unwraps a DEK previously wrapped by this provider (any version it still holds).
    fn unwrap(&self, wrapped: &WrappedDek) -> Result<Dek, KekError>;
}
