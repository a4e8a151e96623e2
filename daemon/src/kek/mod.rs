//! Key-encryption-key (KEK) providers: the one trait every provider
//! implements, the wrapped-key type stored in volume headers, and the errors.
//!
//! A provider only wraps and unwraps DEKs; it never sees data. The trait is
//! blocking on purpose: remote providers (OpenBao transit, PKCS#11, Azure Key
//! Vault) are driven from control threads or `spawn_blocking`, and the I/O
//! path holds its unwrapped DEK in memory, so a slow provider can delay a
//! volume opening or a key check but never a read or a write.
//! Concrete providers live one per file (`local.rs`, `vault.rs`, ...); the
//! audit log is `audit.rs`.

pub mod audit;
mod azure;
mod http;
mod local;
mod pkcs11;
mod vault;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::crypto::{Dek, Locked, DEK_LEN};

pub use azure::{AzureAuth, AzureConfig, AzureKek};
pub use local::LocalKek;
pub use pkcs11::{Pkcs11Config, Pkcs11Kek};
pub use vault::{VaultConfig, VaultKek};

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
    #[error("secret file {path} is accessible by group or others (mode {mode:04o}); run `chmod 600 {path}`")]
    InsecureKeyFile { path: PathBuf, mode: u32 },
    #[error("secret file {path} is owned by uid {owner}, neither root nor the daemon's user: whoever owns it can change or replace the key; run `chown root {path}`")]
    SecretFileOwner { path: PathBuf, owner: u32 },
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
    /// The provider refused: revoked credentials or a missing permission.
    #[error("{provider} denied access: {reason}")]
    AccessDenied { provider: String, reason: String },
    /// The key (or the key version the volume needs) is gone or disabled.
    #[error("{provider}: key unavailable: {reason}")]
    KeyGone { provider: String, reason: String },
    /// The provider could not be reached or kept failing after retries.
    #[error("{provider} is unavailable: {reason}")]
    Unavailable { provider: String, reason: String },
    #[error("{provider}: the RSA key has {bits} bits; hostcrypt wraps only with RSA keys of 2048 bits or more (3072 or 4096 recommended)")]
    WeakKey { provider: String, bits: u64 },
    #[error("{provider} cannot {operation}")]
    Unsupported {
        provider: String,
        operation: &'static str,
    },
    #[error("{provider}: {reason}")]
    Insecure {
        provider: &'static str,
        reason: String,
    },
    #[error("{provider}: cannot read secret file {path}: {source}")]
    SecretFile {
        provider: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl KekError {
    /// Whether the provider could not be reached (connect/timeout, 5xx,
    /// 429, sealed, token endpoint down), as opposed to an answer that
    /// denies access or says the key is gone: an outage, not a revocation.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, KekError::Unavailable { .. })
    }

    /// A short machine-readable class for audit lines and status output.
    pub fn class(&self) -> &'static str {
        match self {
            KekError::AccessDenied { .. } => "access-denied",
            KekError::KeyGone { .. } => "key-gone",
            KekError::Unavailable { .. } => "unavailable",
            KekError::WrongKey { .. } | KekError::UnwrapFailed { .. } => "wrong-key",
            _ => "error",
        }
    }
}

/// One key-encryption key, as configured in a `[kek.NAME]` table.
pub trait KeyProvider: Send + Sync + std::fmt::Debug {
    /// Human description for logs and errors, e.g. `local key 3fa2c1d0 (/etc/hostcrypt/kek.key)`.
    /// Never contains secret material.
    fn describe(&self) -> String;

    /// Whether a DEK wrapped under `kek` is this provider's to unwrap
    /// (same provider kind and key; any version).
    fn owns(&self, kek: &KekRef) -> bool;

    /// Wraps `dek` under the provider's current key version.
    fn wrap(&self, dek: &Dek) -> Result<WrappedDek, KekError>;

    /// Unwraps a DEK previously wrapped by this provider (any version it still holds).
    fn unwrap(&self, wrapped: &WrappedDek) -> Result<Dek, KekError>;

    /// Re-wraps under the newest key version (or `to_version`). The default
    /// unwraps and wraps locally; providers that can rewrap server-side
    /// (Vault transit) override it so the DEK never leaves the daemon again.
    fn rewrap(
        &self,
        wrapped: &WrappedDek,
        to_version: Option<&str>,
    ) -> Result<WrappedDek, KekError> {
        if to_version.is_some() {
            return Err(KekError::Unsupported {
                provider: self.describe(),
                operation: "wrap under a chosen key version",
            });
        }
        let dek = self.unwrap(wrapped)?;
        self.wrap(&dek)
    }

    /// Settings of the KEK that put what it protects at risk (it can be
    /// deleted or purged for good, exported, expires, lacks a permission),
    /// one sentence each, for status, logs and metrics. Read at open, at
    /// every key check and by `check-key`. Settings the provider cannot
    /// read are a warning too: never silent. Default: nothing to report.
    fn safety_warnings(&self) -> Result<Vec<String>, KekError> {
        Ok(Vec::new())
    }

    /// Proves the provider can still unwrap `wrapped`, for key checks.
    fn check(&self, wrapped: &WrappedDek) -> Result<(), KekError> {
        self.unwrap(wrapped).map(drop)
    }
}

/// A DEK from the base64 `text` a provider answered with, decoded
/// straight into a slot of the key arena so the plaintext never lands on
/// the heap; anything but a DEK's length means the unwrap failed. (The
/// text itself is the caller's to wipe: [`scrub_json`].)
pub(crate) fn dek_from_base64(
    engine: &impl base64::Engine,
    text: Option<&str>,
    provider: impl FnOnce() -> String,
) -> Result<Dek, KekError> {
    let mut plain = Locked::<[u8; DEK_LEN]>::zeroed();
    // Longer input fails (the slot is too small) instead of spilling.
    let decoded = text.and_then(|text| engine.decode_slice(text, &mut plain[..]).ok());
    // The decoder's last partial quad may sit on the stack.
    crate::crypto::arena::scrub_stack();
    match decoded {
        Some(DEK_LEN) => Ok(Dek::from_locked(plain)),
        _ => Err(KekError::UnwrapFailed {
            provider: provider(),
        }),
    }
}

/// Overwrites every string in a JSON value with zeros before it is
/// dropped: request and response bodies may carry a DEK in base64. (What
/// the HTTP client copies internally is out of reach; this wipes ours.)
pub(crate) fn scrub_json(value: &mut serde_json::Value) {
    use serde_json::Value;
    use zeroize::Zeroize;
    match value {
        Value::String(s) => s.zeroize(),
        Value::Array(items) => items.iter_mut().for_each(scrub_json),
        Value::Object(map) => map.values_mut().for_each(scrub_json),
        _ => {}
    }
}

/// The smallest RSA modulus hostcrypt wraps with.
pub const MIN_RSA_BITS: u64 = 2048;

/// `"3"` or `"v3"` → 3, for providers whose versions are numbers.
pub(crate) fn numeric_version(
    version: &str,
    provider: impl FnOnce() -> String,
) -> Result<u64, KekError> {
    version
        .trim_start_matches('v')
        .parse()
        .map_err(|_| KekError::Unsupported {
            provider: provider(),
            operation: "use a non-numeric key version",
        })
}

/// Remote providers: attempts for retryable failures (429, 5xx, sealed,
/// connection errors) and the per-request timeout in seconds.
pub(crate) fn default_attempts() -> u32 {
    4
}
pub(crate) fn default_timeout() -> u64 {
    10
}

/// Refuses a secret file (KEK, token, PIN, client secret) that group or
/// others may read, or that someone other than root or the daemon's user
/// owns (the owner can chmod it, or swap the key). A missing file passes:
/// reading it reports that better.
pub(crate) fn check_secret_file(path: &std::path::Path) -> Result<(), KekError> {
    match std::fs::metadata(path) {
        Ok(m) => check_secret_metadata(path, &m),
        Err(_) => Ok(()),
    }
}

/// `check_secret_file` on metadata already read (from an open file).
pub(crate) fn check_secret_metadata(
    path: &std::path::Path,
    m: &std::fs::Metadata,
) -> Result<(), KekError> {
    use std::os::unix::fs::MetadataExt;
    if m.mode() & 0o077 != 0 {
        return Err(KekError::InsecureKeyFile {
            path: path.to_owned(),
            mode: m.mode() & 0o7777,
        });
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if m.uid() != 0 && m.uid() != me {
        return Err(KekError::SecretFileOwner {
            path: path.to_owned(),
            owner: m.uid(),
        });
    }
    Ok(())
}

/// Compares key versions numerically where both are numbers (`"10" > "9"`).
pub fn version_newer(candidate: &str, than: &str) -> bool {
    match (candidate.parse::<u64>(), than.parse::<u64>()) {
        (Ok(a), Ok(b)) => a > b,
        _ => candidate != than,
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use serde_json::json;

    use super::*;
    use crate::crypto::arena;
    use crate::test_heap::allocations_in;

    const STANDARD: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

    #[test]
    fn scrub_wipes_every_string() {
        let mut v = json!({"data": {"plaintext": "c2VjcmV0", "list": ["a", 1]}});
        scrub_json(&mut v);
        assert_eq!(v["data"]["plaintext"], "");
        assert_eq!(v["data"]["list"][0], "");
        assert_eq!(v["data"]["list"][1], 1);
    }

    /// The DEK a provider answers with in base64 is decoded into the
    /// arena, with no plaintext copy on the heap on the way.
    #[test]
    fn a_base64_dek_is_decoded_into_the_arena_without_the_heap() {
        let raw: Vec<u8> = (0..DEK_LEN as u8).collect();
        let text = STANDARD.encode(&raw);
        let provider = || "test".to_string();
        // A slot from a fresh region allocates for the arena's own
        // bookkeeping, rarely: one clean try out of three is enough.
        let clean = (0..3).any(|_| {
            let (dek, allocations) =
                allocations_in(|| dek_from_base64(&STANDARD, Some(&text), provider).unwrap());
            assert_eq!(&dek.expose()[..], &raw[..]);
            assert!(arena::contains(dek.expose().as_ptr() as usize, DEK_LEN));
            allocations == 0
        });
        assert!(clean, "every decode allocated on the heap");
    }

    #[test]
    fn base64_that_is_not_a_dek_fails_without_a_panic() {
        let provider = || "test".to_string();
        let long = STANDARD.encode([7u8; 4096]);
        for text in [
            Some(STANDARD.encode([1u8; DEK_LEN - 1])),
            Some(STANDARD.encode([1u8; DEK_LEN + 1])),
            Some(long),
            Some("not base64 at all!".to_string()),
            Some(String::new()),
            None,
        ] {
            let got = dek_from_base64(&STANDARD, text.as_deref(), provider);
            assert!(
                matches!(got, Err(KekError::UnwrapFailed { .. })),
                "{text:?}"
            );
        }
    }
}
