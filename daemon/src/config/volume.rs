//! `[[volume]]` and `[kek.NAME]`: each volume's backing, role, keys,
//! access and key policy, and the key providers they name. Checked in
//! `mod.rs` (`Config::validate`), where the other sections are known.

use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::{duration, ByteSize};
use crate::volume::Role;

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "provider", rename_all = "lowercase", deny_unknown_fields)]
pub enum KekConfig {
    /// A KEK in a root-only file on this host.
    Local { path: PathBuf },
    /// An OpenBao / Vault transit key.
    Vault(crate::kek::VaultConfig),
    /// A key on a PKCS#11 token (HSM, SoftHSM2).
    Pkcs11(crate::kek::Pkcs11Config),
    /// An RSA key in Azure Key Vault or Managed HSM.
    Azure(crate::kek::AzureConfig),
}

impl KekConfig {
    pub fn provider_name(&self) -> &'static str {
        match self {
            KekConfig::Local { .. } => "local",
            KekConfig::Vault(_) => "vault",
            KekConfig::Pkcs11(_) => "pkcs11",
            KekConfig::Azure(_) => "azure",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    /// The NBD export name.
    pub name: Spanned<String>,
    pub backing: Spanned<PathBuf>,
    pub role: Role,
    pub kek: Option<Spanned<String>>,
    /// Double encryption: a second layer whose DEK this other KEK wraps.
    pub kek_inner: Option<Spanned<String>>,
    /// The inner layer's cipher, chosen at `create`: `aes-xts` (default)
    /// or `adiantum` (another primitive and mode than the outer XTS-AES).
    pub inner_cipher: Option<Spanned<crate::volume::InnerCipher>>,
    pub size: Option<Spanned<ByteSize>>,
    #[serde(default = "default_sector_size", deserialize_with = "sector_size")]
    pub sector_size: u32,
    #[serde(default)]
    pub allow_discards: bool,
    /// O_DIRECT on the data area (bypass the host page cache).
    #[serde(default)]
    pub direct: bool,
    /// Keep writes of 128 KiB and more in the host page cache (default);
    /// `false` lets them leave it once written back (RWF_DONTCACHE), see
    /// `io/file.rs`.
    #[serde(default = "yes")]
    pub cache_large_writes: bool,
    pub description: Option<String>,
    /// Who may open this volume (nbdkit ip-filter syntax); absent = anyone.
    pub allow: Option<Vec<Spanned<String>>>,
    /// What to do when the KEK becomes unusable: `stop` or `until-restart`.
    #[serde(default)]
    pub on_key_loss: crate::volume::OnKeyLoss,
    /// While the KEK's provider cannot be reached: `serve` from memory for
    /// `key_unreachable_grace`, or `stop` as on key loss.
    #[serde(default)]
    pub on_key_unreachable: crate::volume::OnKeyUnreachable,
    /// How long an unreachable provider is tolerated (`"24h"`).
    #[serde(default = "default_unreachable_grace", deserialize_with = "duration")]
    pub key_unreachable_grace: std::time::Duration,
    /// Rewrap to the provider's newest key version at every key check.
    #[serde(default)]
    pub auto_rotate: bool,
    /// How often the daemon verifies it can still unwrap the DEK (`60s`, `1s`, ...).
    #[serde(default = "default_key_check", deserialize_with = "duration")]
    pub key_check_interval: std::time::Duration,
    /// Remote backings (`backing = "nbd://…"`): connections to open when
    /// the server allows several (default 4).
    pub backing_connections: Option<Spanned<usize>>,
    /// How long clients stall while a remote backing is unreachable
    /// before their requests fail with EIO (default `30s`).
    #[serde(default, deserialize_with = "optional_duration")]
    pub backing_timeout: Option<std::time::Duration>,
    /// `nbds://` credentials: `ca-cert.pem`, optional `client-cert.pem`
    /// and `client-key.pem`.
    pub backing_tls_certificates: Option<Spanned<PathBuf>>,
    /// Remote backings: serve it even though another daemon's owner record
    /// (not released) is in its header, after waiting out that daemon's
    /// write lease (`volume/claim.rs`). Only for a daemon that is stopped
    /// or cut off from the storage for good.
    pub take_over: Option<Spanned<bool>>,
}

fn optional_duration<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<std::time::Duration>, D::Error> {
    duration(d).map(Some)
}

fn default_unreachable_grace() -> std::time::Duration {
    std::time::Duration::from_secs(24 * 3600)
}

fn default_key_check() -> std::time::Duration {
    std::time::Duration::from_secs(60)
}

fn default_sector_size() -> u32 {
    4096
}

fn sector_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let v = u32::deserialize(d)?;
    if v == 512 || v == 4096 {
        Ok(v)
    } else {
        Err(serde::de::Error::custom(format!(
            "sector_size must be 512 or 4096, not {v}"
        )))
    }
}

impl VolumeConfig {
    /// Whether this volume may take over a remote backing (`take_over`).
    pub fn take_over(&self) -> bool {
        self.take_over.as_ref().is_some_and(|t| *t.get_ref())
    }

    /// Whether the backing is an NBD URI rather than a local path.
    pub fn is_remote(&self) -> bool {
        crate::io::is_remote(self.backing.get_ref())
    }

    /// How a remote backing is reached (defaults for what is unset).
    pub fn remote_options(&self) -> crate::io::remote::client::RemoteOptions {
        let defaults = crate::io::remote::client::RemoteOptions::default();
        crate::io::remote::client::RemoteOptions {
            connections: self
                .backing_connections
                .as_ref()
                .map_or(defaults.connections, |c| *c.get_ref()),
            timeout: self.backing_timeout.unwrap_or(defaults.timeout),
            tls_certificates: self
                .backing_tls_certificates
                .as_ref()
                .map(|d| d.get_ref().clone()),
        }
    }

    pub fn size_bytes(&self) -> Option<u64> {
        self.size.as_ref().map(|s| s.get_ref().0)
    }

    /// The allow list, with names resolved now (a reload resolves again).
    pub fn allow_list(
        &self,
    ) -> Result<crate::export::access::AllowList, crate::export::access::RuleError> {
        let entries: Option<Vec<&str>> = self
            .allow
            .as_ref()
            .map(|l| l.iter().map(|e| e.get_ref().as_str()).collect());
        crate::export::access::AllowList::parse(entries.as_deref())
    }
}
