//! `[[volume]]` and `[kek.NAME]`: each volume's backing, role, keys,
//! access and key policy, and the key providers they name. Checked in
//! `mod.rs` (`Config::validate`), where the other sections are known.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::Deserialize;
use toml::Spanned;

use super::schema::{duration_text, DurationText, SizeText};
use super::{duration, ByteSize};
use crate::volume::Role;

fn yes() -> bool {
    true
}

/// A key-encryption key, `[kek.NAME]`: volumes name it in `kek` or
/// `kek_inner`; `provider` says where the key lives.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(tag = "provider", rename_all = "lowercase", deny_unknown_fields)]
pub enum KekConfig {
    /// A KEK in a root-only file on this host: 32 random bytes, created
    /// with `hostcrypt kek init-local PATH`.
    Local {
        /// The key file (mode 0600, owned by root).
        #[schemars(extend("examples" = ["/etc/hostcrypt/kek.key"]))]
        path: PathBuf,
    },
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

/// One encrypted volume, `[[volume]]`: an NBD export over a backing file,
/// block device or remote NBD export, which holds only ciphertext.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    /// The NBD export name (1 to 256 bytes, unique).
    #[schemars(with = "String", extend("examples" = ["cache0"]))]
    pub name: Spanned<String>,
    /// Where the ciphertext lives: a file, a block device, or an NBD URI
    /// of remote storage (`nbd://HOST/EXPORT`, `nbds://HOST/EXPORT` with
    /// TLS). Each volume has its own.
    #[schemars(with = "PathBuf", extend("examples" = ["/var/lib/hostcrypt/cache0.img"]))]
    pub backing: Spanned<PathBuf>,
    /// `cache`: persistent, its DEK wrapped by `kek`, formatted once with
    /// `hostcrypt create`. `temp`: a fresh key at every start that is
    /// never written anywhere, and a backing recreated, so a restart
    /// erases it.
    #[schemars(extend("examples" = ["cache"]))]
    pub role: Role,
    /// Name of the `[kek.NAME]` table whose KEK wraps this volume's DEK:
    /// required for a cache volume, refused for a temp volume.
    #[schemars(with = "Option<String>", extend("examples" = ["main"]))]
    pub kek: Option<Spanned<String>>,
    /// Double encryption: a second layer whose DEK this other KEK wraps.
    #[schemars(with = "Option<String>", extend("examples" = ["hsm"]))]
    pub kek_inner: Option<Spanned<String>>,
    /// The inner layer's cipher, chosen at `create`: `aes-xts` (default)
    /// or `adiantum` (another primitive and mode than the outer XTS-AES).
    #[schemars(
        with = "Option<crate::volume::InnerCipher>",
        extend("examples" = ["adiantum"])
    )]
    pub inner_cipher: Option<Spanned<crate::volume::InnerCipher>>,
    /// Logical size, a multiple of `sector_size`: required for a temp
    /// volume; for a cache volume, what `hostcrypt create` formats when
    /// given no `--size`.
    #[schemars(with = "Option<SizeText>", extend("examples" = ["100G"]))]
    pub size: Option<Spanned<ByteSize>>,
    /// Encryption sector size in bytes, 512 or 4096; fixed at `create`.
    #[serde(default = "default_sector_size", deserialize_with = "sector_size")]
    #[schemars(extend("examples" = [512]))]
    pub sector_size: u32,
    /// Pass TRIM and WRITE_ZEROES with discards on to the backing (holes
    /// in a file, BLKDISCARD on a device). This reveals which blocks are
    /// unused.
    #[serde(default)]
    #[schemars(extend("examples" = [true]))]
    pub allow_discards: bool,
    /// O_DIRECT on the data area (bypass the host page cache).
    #[serde(default)]
    #[schemars(extend("examples" = [true]))]
    pub direct: bool,
    /// Keep writes of 128 KiB and more in the host page cache (default);
    /// `false` lets them leave it once written back (RWF_DONTCACHE), see
    /// `io/file.rs`.
    #[serde(default = "yes")]
    #[schemars(extend("examples" = [false]))]
    pub cache_large_writes: bool,
    /// The export's description that NBD clients see (NBD_INFO_DESCRIPTION);
    /// absent = the role, cipher and sector size.
    #[schemars(extend("examples" = ["build cache"]))]
    pub description: Option<String>,
    /// Who may open this volume: `uid:N`, `gid:NAME`, `dn:SUBJECT` of a
    /// verified client certificate, addresses and networks (nbdkit
    /// ip-filter syntax), or `all`. Absent = Unix-socket peers and
    /// verified client certificates, never a bare TCP address.
    #[schemars(
        with = "Option<Vec<String>>",
        extend("examples" = [["uid:107", "gid:kvm", "10.0.0.0/8"]])
    )]
    pub allow: Option<Vec<Spanned<String>>>,
    /// What to do when the KEK becomes unusable: `stop` or `until-restart`.
    #[serde(default)]
    #[schemars(extend("examples" = ["until-restart"]))]
    pub on_key_loss: crate::volume::OnKeyLoss,
    /// While the KEK's provider cannot be reached: `serve` from memory for
    /// `key_unreachable_grace`, or `stop` as on key loss.
    #[serde(default)]
    #[schemars(extend("examples" = ["stop"]))]
    pub on_key_unreachable: crate::volume::OnKeyUnreachable,
    /// How long an unreachable provider is tolerated (`"24h"`).
    #[serde(
        default = "default_unreachable_grace",
        deserialize_with = "duration",
        serialize_with = "duration_text"
    )]
    #[schemars(with = "DurationText", extend("examples" = ["1h"]))]
    pub key_unreachable_grace: std::time::Duration,
    /// Rewrap to the provider's newest key version at every key check.
    #[serde(default)]
    #[schemars(extend("examples" = [true]))]
    pub auto_rotate: bool,
    /// How often the daemon verifies it can still unwrap the DEK (`60s`, `1s`, ...).
    #[serde(
        default = "default_key_check",
        deserialize_with = "duration",
        serialize_with = "duration_text"
    )]
    #[schemars(with = "DurationText", extend("examples" = ["5m"]))]
    pub key_check_interval: std::time::Duration,
    /// Remote backings (`backing = "nbd://…"`): connections to open when
    /// the server allows several (default 4), 1 to 64.
    #[schemars(with = "Option<usize>", extend("examples" = [8]))]
    pub backing_connections: Option<Spanned<usize>>,
    /// How long clients stall while a remote backing is unreachable
    /// before their requests fail with EIO (default `30s`).
    #[serde(default, deserialize_with = "optional_duration")]
    #[schemars(with = "Option<DurationText>", extend("examples" = ["2m"]))]
    pub backing_timeout: Option<std::time::Duration>,
    /// `nbds://` credentials: `ca-cert.pem`, optional `client-cert.pem`
    /// and `client-key.pem`.
    #[schemars(with = "Option<PathBuf>", extend("examples" = ["/etc/hostcrypt/backing-tls"]))]
    pub backing_tls_certificates: Option<Spanned<PathBuf>>,
    /// Path of a vhost-user-blk socket for this volume: VMMs (qemu
    /// `vhost-user-blk-pci`, cloud-hypervisor `--disk vhost_user=true`)
    /// and libblkio connect here and share guest memory with the daemon.
    /// Clients pass the volume's `allow` list like NBD clients; one client
    /// at a time. A reload adds, removes or rebinds it (a removed or changed
    /// socket's client is disconnected).
    /// Its directory must not itself be a symbolic link.
    #[schemars(with = "Option<PathBuf>", extend("examples" = ["/run/hostcrypt/cache0.vhost"]))]
    pub vhost_user: Option<Spanned<PathBuf>>,
    /// Virtqueues the vhost-user-blk device offers, 1 to 64 (default: one
    /// per core); each is served by a thread of its own.
    #[schemars(with = "Option<u16>", extend("examples" = [4]))]
    pub vhost_user_queues: Option<Spanned<u16>>,
    /// Group (name or gid) of the vhost-user socket, e.g. the VMM's (the
    /// daemon's own group when absent).
    #[schemars(with = "Option<String>", extend("examples" = ["kvm"]))]
    pub vhost_user_group: Option<Spanned<String>>,
    /// Permission bits of the vhost-user socket, in octal (default
    /// `"0660"`: the owner and `vhost_user_group`).
    #[schemars(with = "Option<String>", extend("examples" = ["0600"]))]
    pub vhost_user_mode: Option<Spanned<String>>,
    /// Offer the vhost-user-blk device read-only (VIRTIO_BLK_F_RO):
    /// writes, discards and write-zeroes from it fail. NBD is unaffected.
    #[schemars(with = "Option<bool>", extend("examples" = [true]))]
    pub vhost_user_read_only: Option<Spanned<bool>>,
    /// Attach the volume as a block device on this host when the daemon
    /// starts (`hostcrypt attach` does it by hand): `"ublk"` through ublk
    /// (module `ublk_drv`, Linux 6.0 and later), `"nbd"` through the
    /// kernel's NBD client (module `nbd`), `"auto"` ublk where the kernel
    /// has it, else nbd. The device is /dev/hostcrypt/NAME. It stays across a restart of the daemon (a
    /// mounted filesystem pauses and carries on); at stop it is detached
    /// if nothing uses it, and a temp volume's always is.
    #[schemars(with = "Option<String>", extend("examples" = ["auto"]))]
    pub attach: Option<Spanned<String>>,
    /// Remote backings: serve it even though another daemon's owner record
    /// (not released) is in its header, after waiting out that daemon's
    /// write lease (`volume/claim.rs`). Only for a daemon that is stopped
    /// or cut off from the storage for good.
    #[schemars(with = "Option<bool>", extend("examples" = [true]))]
    pub take_over: Option<Spanned<bool>>,
}

/// One vhost-user queue per core, within what a device may offer.
fn default_vhost_user_queues() -> u16 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.clamp(1, crate::frontend::vhost_user::MAX_QUEUES) as u16
}

/// Permission bits written in octal (`"0660"`, `"660"`), at most 0777.
pub(super) fn parse_mode(text: &str) -> Result<u32, String> {
    u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{text:?} is not a file mode in octal (e.g. \"0660\")"))
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

    /// How the volume is attached at start (`attach`); `None` without it,
    /// `Some(Ok(None))` for `auto` (the best available when it starts).
    pub fn attach_via(&self) -> Option<Result<Option<crate::frontend::attach::Via>, String>> {
        use crate::frontend::attach::Via;
        let text = self.attach.as_ref()?.get_ref();
        Some(match text.as_str() {
            "nbd" => Ok(Some(Via::Nbd)),
            "ublk" => Ok(Some(Via::Ublk)),
            "auto" => Ok(None),
            other => Err(format!(
                "attach is \"ublk\", \"nbd\" or \"auto\", not {other:?}"
            )),
        })
    }

    /// The vhost-user socket's settings; `None` without `vhost_user`.
    /// Group names are resolved now (`Config::validate` checked them).
    pub fn vhost_user_socket(
        &self,
    ) -> Option<Result<crate::frontend::vhost_user::SocketSpec, String>> {
        let path = self.vhost_user.as_ref()?.get_ref().clone();
        let queues = self
            .vhost_user_queues
            .as_ref()
            .map(|q| *q.get_ref())
            .unwrap_or_else(default_vhost_user_queues);
        let mode = match self.vhost_user_mode.as_ref() {
            Some(m) => match parse_mode(m.get_ref()) {
                Ok(mode) => mode,
                Err(e) => return Some(Err(e)),
            },
            None => 0o660,
        };
        let group = match self.vhost_user_group.as_ref() {
            Some(g) => match crate::export::access::resolve_id(g.get_ref(), "/etc/group") {
                Some(gid) => Some(gid),
                None => return Some(Err(format!("no group named {:?}", g.get_ref()))),
            },
            None => None,
        };
        Some(Ok(crate::frontend::vhost_user::SocketSpec {
            volume: self.name.get_ref().clone(),
            path,
            queues,
            mode,
            group,
            read_only: self
                .vhost_user_read_only
                .as_ref()
                .is_some_and(|r| *r.get_ref()),
        }))
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
