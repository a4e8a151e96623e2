//! The daemon's TOML configuration: its shape (serde, unknown keys refused)
//! and the checks serde cannot express, each reported with the key and the
//! line it is on.

mod size;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

pub use size::ByteSize;

use crate::volume::Role;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}, line {line}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub kek: BTreeMap<String, KekConfig>,
    #[serde(default, rename = "volume")]
    pub volumes: Vec<VolumeConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Path of the NBD Unix socket.
    pub unix: Option<PathBuf>,
    /// Address of the NBD TCP listener, e.g. `127.0.0.1:10809`.
    pub tcp: Option<String>,
    /// Backing I/O engine: `auto` (io_uring, else threads), `uring`, `threads`.
    #[serde(default)]
    pub io_engine: crate::io::engine::EngineKind,
    /// With the io_uring engine, receive each plaintext connection's
    /// requests on one ring, which also reads, decrypts and replies for it
    /// (`nbd/ring_reader.rs`). On by default: on AMD Zen 3 at or ahead of
    /// the tokio reader on 8 of 9 benchmark jobs, with lower tail latency
    /// (BENCHMARKS.md). `false` keeps every connection on a tokio task.
    #[serde(default = "default_ring_connections")]
    pub ring_connections: bool,
    /// With the io_uring engine, how long a ring keeps polling for work
    /// after its last before it sleeps, e.g. `"50us"`; `"0s"` sleeps at
    /// once. Waking a sleeping core (on a VM, a halted vCPU) cost a QD1
    /// 4 KiB read two thirds of its latency on AMD Zen 3 (BENCHMARKS.md);
    /// the price is up to this much CPU time after each burst of requests.
    #[serde(default = "default_ring_idle_poll", deserialize_with = "idle_poll")]
    pub ring_idle_poll: std::time::Duration,
    /// Append-only JSON-lines audit log of every key operation.
    pub audit_log: Option<PathBuf>,
    /// Where the per-volume anti-rollback records live (`volume/record.rs`):
    /// local, persistent, root-only. Absolute.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Path of the control socket (`hostcrypt` talks to the daemon here).
    pub control: Option<PathBuf>,
    /// Group (name or gid) whose members may use the control socket besides root.
    pub control_group: Option<String>,
    /// Group (name or gid) whose members may only read over the control
    /// socket: `status`, `volumes`, `check-key`. The socket is then mode
    /// 0666 and the daemon's own check (SO_PEERCRED, SO_PEERGROUPS) is
    /// the boundary.
    pub control_read_group: Option<String>,
    /// Address of the Prometheus/OpenMetrics endpoint, e.g. `127.0.0.1:9310`.
    pub metrics: Option<std::net::SocketAddr>,
    /// TLS on the TCP listener: `off`, `on` (optional) or `require`.
    #[serde(default)]
    pub tls: crate::nbd::tls::TlsMode,
    /// Directory with ca-cert.pem, server-cert.pem, server-key.pem and
    /// optionally ca-crl.pem (the layout qemu, nbdkit and libnbd share).
    pub tls_certificates: Option<Spanned<PathBuf>>,
    /// Clients must present a certificate signed by ca-cert.pem.
    #[serde(default = "yes")]
    pub tls_verify_peer: bool,
    /// A ca-crl.pem past its nextUpdate: `refuse` (the default: it is not
    /// loaded, and clients are refused while it is stale) or `warn`.
    #[serde(default)]
    pub tls_crl_expired: crate::nbd::tls::CrlExpired,
    /// Serve plaintext on a TCP address other hosts can reach.
    #[serde(default)]
    pub insecure_plaintext_tcp: bool,
    /// Open NBD connections at most, over all listeners.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Open NBD connections at most from one IPv4 address, IPv6 /64 or
    /// Unix uid.
    #[serde(default = "default_max_connections_per_peer")]
    pub max_connections_per_peer: usize,
    /// Connections at most still in the handshake (not yet authenticated);
    /// each also counts towards `max_connections`.
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: usize,
    /// How long a client may take from connecting to choosing an export.
    #[serde(default = "default_handshake_timeout", deserialize_with = "duration")]
    pub handshake_timeout: std::time::Duration,
    /// How long a reply may wait for a client that does not read it; then
    /// the connection is closed and what it held is freed.
    #[serde(default = "default_reply_timeout", deserialize_with = "duration")]
    pub reply_timeout: std::time::Duration,
    /// Bytes that read replies not yet sent may hold, over all connections
    /// (64M to 1T); a connection whose read would exceed it waits, and
    /// reads no further requests meanwhile.
    #[serde(default = "default_reply_memory", deserialize_with = "reply_memory")]
    pub reply_memory: u64,
}

fn yes() -> bool {
    true
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/hostcrypt/state")
}

fn default_max_connections() -> usize {
    1024
}

fn default_max_connections_per_peer() -> usize {
    256
}

fn default_reply_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(60)
}

fn default_reply_memory() -> u64 {
    crate::nbd::budget::DEFAULT_REPLY_MEMORY
}

/// `reply_memory`: at least one connection's budget (64 MiB, so any one
/// request fits in the whole), at most 1 TiB.
fn reply_memory<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    use crate::nbd::budget::{MAX_REPLY_MEMORY, MIN_REPLY_MEMORY};
    let ByteSize(bytes) = ByteSize::deserialize(d)?;
    if !(MIN_REPLY_MEMORY..=MAX_REPLY_MEMORY).contains(&bytes) {
        return Err(serde::de::Error::custom(
            "must be from 64M (one connection's budget, so any one request fits) to 1T",
        ));
    }
    Ok(bytes)
}

fn default_max_handshakes() -> usize {
    64
}

fn default_ring_connections() -> bool {
    true
}

fn default_ring_idle_poll() -> std::time::Duration {
    std::time::Duration::from_micros(50)
}

/// Longest idle poll accepted: beyond a millisecond a ring would burn a
/// core between requests of any client that is merely slow.
const MAX_IDLE_POLL: std::time::Duration = std::time::Duration::from_millis(1);

fn idle_poll<'de, D: serde::Deserializer<'de>>(d: D) -> Result<std::time::Duration, D::Error> {
    let text = String::deserialize(d)?;
    let value = humantime::parse_duration(&text).map_err(serde::de::Error::custom)?;
    if value > MAX_IDLE_POLL {
        return Err(serde::de::Error::custom(
            "must be at most 1ms (\"0s\" turns polling off)",
        ));
    }
    Ok(value)
}

fn default_handshake_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(30)
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            unix: None,
            tcp: None,
            io_engine: Default::default(),
            ring_connections: default_ring_connections(),
            ring_idle_poll: default_ring_idle_poll(),
            audit_log: None,
            state_dir: default_state_dir(),
            control: None,
            control_group: None,
            control_read_group: None,
            metrics: None,
            tls: Default::default(),
            tls_certificates: None,
            tls_verify_peer: true,
            tls_crl_expired: Default::default(),
            insecure_plaintext_tcp: false,
            max_connections: default_max_connections(),
            max_connections_per_peer: default_max_connections_per_peer(),
            max_handshakes: default_max_handshakes(),
            handshake_timeout: default_handshake_timeout(),
            reply_timeout: default_reply_timeout(),
            reply_memory: default_reply_memory(),
        }
    }
}

impl ServerConfig {
    /// The gate settings the NBD server runs with.
    pub fn gate(&self) -> crate::nbd::gate::GateSettings {
        crate::nbd::gate::GateSettings {
            tls_mode: self.tls,
            max_connections: self.max_connections,
            max_connections_per_peer: self.max_connections_per_peer,
            max_handshakes: self.max_handshakes,
            reserve_per_transport: self.unix.is_some() && self.tcp.is_some(),
            handshake_timeout: self.handshake_timeout,
            reply_timeout: self.reply_timeout,
            reply_memory: self.reply_memory,
            ring_connections: self.ring_connections,
        }
    }

    pub fn tls_dir(&self) -> Option<&Path> {
        self.tls_certificates
            .as_ref()
            .map(|d| d.get_ref().as_path())
    }
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

/// `"90s"`, `"1m"`, `"500ms"` (humantime) or a number of seconds; at least 1 s.
fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<std::time::Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Seconds(u64),
        Text(String),
    }
    let value = match Raw::deserialize(d)? {
        Raw::Seconds(s) => std::time::Duration::from_secs(s),
        Raw::Text(t) => humantime::parse_duration(&t).map_err(serde::de::Error::custom)?,
    };
    if value < std::time::Duration::from_secs(1) {
        return Err(serde::de::Error::custom("must be at least 1s"));
    }
    Ok(value)
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
    /// Whether the backing is an NBD URI rather than a local path.
    pub fn is_remote(&self) -> bool {
        crate::io::is_remote(self.backing.get_ref())
    }

    /// How a remote backing is reached (defaults for what is unset).
    pub fn remote_options(&self) -> crate::nbd::client::RemoteOptions {
        let defaults = crate::nbd::client::RemoteOptions::default();
        crate::nbd::client::RemoteOptions {
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
    ) -> Result<crate::nbd::access::AllowList, crate::nbd::access::RuleError> {
        let entries: Option<Vec<&str>> = self
            .allow
            .as_ref()
            .map(|l| l.iter().map(|e| e.get_ref().as_str()).collect());
        crate::nbd::access::AllowList::parse(entries.as_deref())
    }
}

/// Whether every address `addr` (`host:port`) names is a loopback address.
fn is_loopback(addr: &str) -> bool {
    use std::net::ToSocketAddrs;
    if let Ok(a) = addr.parse::<std::net::SocketAddr>() {
        return a.ip().is_loopback();
    }
    match addr.to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<_> = addrs.collect();
            !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback())
        }
        Err(_) => false,
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates; `path` only labels errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_string(),
        })?;
        config.validate(text, path)?;
        // Every later open of a remote backing (daemon or CLI) finds its
        // options by URI.
        for v in config.volumes.iter().filter(|v| v.is_remote()) {
            crate::io::remote::configure(
                &v.backing.get_ref().to_string_lossy(),
                v.remote_options(),
            );
        }
        Ok(config)
    }

    pub fn volume(&self, name: &str) -> Option<&VolumeConfig> {
        self.volumes.iter().find(|v| v.name.get_ref() == name)
    }

    fn validate(&self, text: &str, path: &Path) -> Result<(), ConfigError> {
        let invalid =
            |span: std::ops::Range<usize>, key: &str, message: String| ConfigError::Invalid {
                path: path.to_owned(),
                line: line_of(text, span.start),
                key: key.to_string(),
                message,
            };
        if self.server.unix.is_none() && self.server.tcp.is_none() {
            return Err(invalid(
                0..0,
                "server",
                "set `unix` or `tcp` (or both) so clients can connect".into(),
            ));
        }
        let server = &self.server;
        if server.tls != crate::nbd::tls::TlsMode::Off && server.tls_certificates.is_none() {
            return Err(invalid(
                0..0,
                "tls_certificates",
                format!(
                    "tls = \"{}\" needs tls_certificates = DIR (with ca-cert.pem, server-cert.pem, server-key.pem)",
                    server.tls
                ),
            ));
        }
        if let Some(tcp) = &server.tcp {
            if server.tls != crate::nbd::tls::TlsMode::Require
                && !server.insecure_plaintext_tcp
                && !is_loopback(tcp)
            {
                return Err(invalid(
                    0..0,
                    "tcp",
                    format!(
                        "{tcp} is reachable from other hosts, and without tls = \"require\" every volume would cross the network decrypted. Set tls = \"require\" and tls_certificates = DIR, listen on 127.0.0.1, or set insecure_plaintext_tcp = true to accept plaintext"
                    ),
                ));
            }
        }
        if !server.state_dir.is_absolute() {
            return Err(invalid(
                0..0,
                "state_dir",
                format!(
                    "{} is not an absolute path; the anti-rollback records need a fixed place (default /var/lib/hostcrypt/state)",
                    server.state_dir.display()
                ),
            ));
        }
        if server.max_connections == 0
            || server.max_connections_per_peer == 0
            || server.max_handshakes == 0
        {
            return Err(invalid(
                0..0,
                "max_connections",
                "max_connections, max_connections_per_peer and max_handshakes must be at least 1"
                    .into(),
            ));
        }
        if self.volumes.is_empty() {
            return Err(invalid(
                0..0,
                "volume",
                "no [[volume]] is configured".into(),
            ));
        }
        let mut names = HashSet::new();
        let mut backings = HashSet::new();
        for v in &self.volumes {
            let name = v.name.get_ref();
            if name.is_empty() || name.len() > 256 || name.contains('\0') {
                return Err(invalid(
                    v.name.span(),
                    "name",
                    "export names are 1 to 256 bytes".into(),
                ));
            }
            if !names.insert(name.clone()) {
                return Err(invalid(
                    v.name.span(),
                    "name",
                    format!("volume {name:?} is defined twice"),
                ));
            }
            if !backings.insert(v.backing.get_ref().clone()) {
                return Err(invalid(
                    v.backing.span(),
                    "backing",
                    format!(
                        "{} is the backing of another volume",
                        v.backing.get_ref().display()
                    ),
                ));
            }
            if v.is_remote() {
                let uri = v.backing.get_ref().to_string_lossy();
                match crate::nbd::client::NbdUri::parse(&uri) {
                    Err(e) => return Err(invalid(v.backing.span(), "backing", e.to_string())),
                    Ok(u)
                        if u.tls
                            && u.tls_certificates.is_none()
                            && v.backing_tls_certificates.is_none() =>
                    {
                        return Err(invalid(
                            v.backing.span(),
                            "backing",
                            "an nbds:// backing needs backing_tls_certificates = \"DIR\"".into(),
                        ))
                    }
                    Ok(_) => {}
                }
                if v.direct {
                    return Err(invalid(
                        v.backing.span(),
                        "direct",
                        "direct = true applies to local backings, not to a remote export".into(),
                    ));
                }
                if let Some(c) = &v.backing_connections {
                    if !(1..=64).contains(c.get_ref()) {
                        return Err(invalid(
                            c.span(),
                            "backing_connections",
                            "backing_connections is 1 to 64".into(),
                        ));
                    }
                }
            } else {
                let remote_only = [
                    (
                        "backing_connections",
                        v.backing_connections.as_ref().map(|c| c.span()),
                    ),
                    (
                        "backing_tls_certificates",
                        v.backing_tls_certificates.as_ref().map(|c| c.span()),
                    ),
                ];
                for (key, span) in remote_only {
                    if let Some(span) = span {
                        return Err(invalid(
                            span,
                            key,
                            format!(
                                "{key} applies only to a remote backing (backing = \"nbd://…\")"
                            ),
                        ));
                    }
                }
            }
            for entry in v.allow.iter().flatten() {
                if let Err(e) = crate::nbd::access::Rule::parse(entry.get_ref()) {
                    return Err(invalid(entry.span(), "allow", e.to_string()));
                }
            }
            match (v.role, &v.kek) {
                (Role::Cache, None) => {
                    return Err(invalid(v.name.span(), "kek", format!("cache volume {name:?} needs `kek = \"NAME\"` naming a [kek.NAME] table")));
                }
                (Role::Cache, Some(kek)) if !self.kek.contains_key(kek.get_ref()) => {
                    return Err(invalid(
                        kek.span(),
                        "kek",
                        format!("no [kek.{}] table is defined", kek.get_ref()),
                    ));
                }
                (Role::Temp, Some(kek)) => {
                    return Err(invalid(
                        kek.span(),
                        "kek",
                        "temp volumes use a fresh in-memory key at every start and take no KEK"
                            .into(),
                    ));
                }
                _ => {}
            }
            if let (Some(cipher), None) = (&v.inner_cipher, &v.kek_inner) {
                return Err(invalid(
                    cipher.span(),
                    "inner_cipher",
                    "inner_cipher applies to the inner layer of a double-encrypted volume: set kek_inner too".into(),
                ));
            }
            if let Some(inner) = &v.kek_inner {
                let problem = if v.role == Role::Temp {
                    Some("temp volumes take no KEK, so no inner KEK either".to_string())
                } else if !self.kek.contains_key(inner.get_ref()) {
                    Some(format!("no [kek.{}] table is defined", inner.get_ref()))
                } else if v.kek.as_ref().map(|k| k.get_ref()) == Some(inner.get_ref()) {
                    Some("kek_inner must name a different KEK than kek: double encryption needs two independent keys".to_string())
                } else {
                    None
                };
                if let Some(problem) = problem {
                    return Err(invalid(inner.span(), "kek_inner", problem));
                }
            }
            match (&v.size, v.role) {
                (None, Role::Temp) => {
                    return Err(invalid(
                        v.name.span(),
                        "size",
                        format!("temp volume {name:?} needs a size, e.g. size = \"8G\""),
                    ));
                }
                (Some(size), _)
                    if size.get_ref().0 == 0
                        || size.get_ref().0 % u64::from(v.sector_size) != 0 =>
                {
                    return Err(invalid(
                        size.span(),
                        "size",
                        format!(
                            "must be a non-zero multiple of the sector size {}",
                            v.sector_size
                        ),
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[server]
unix = "/run/hostcrypt/nbd.sock"
tcp  = "127.0.0.1:10809"

[kek.main]
provider = "local"
path = "/etc/hostcrypt/kek.key"

[[volume]]
name = "cache0"
backing = "/var/lib/hostcrypt/cache0.img"
role = "cache"
kek = "main"

[[volume]]
name = "scratch"
backing = "/var/lib/hostcrypt/scratch.img"
role = "temp"
size = "8G"
sector_size = 512
allow_discards = true
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn parses_the_documented_example() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.volumes.len(), 2);
        assert_eq!(c.volumes[1].size_bytes(), Some(8 << 30));
        assert_eq!(c.volumes[0].sector_size, 4096);
        assert!(matches!(c.kek["main"], KekConfig::Local { .. }));
    }

    #[test]
    fn ring_idle_poll_defaults_to_50us_and_is_bounded() {
        let with = |value: &str| {
            parse(&GOOD.replace(
                "[server]\n",
                &format!("[server]\nring_idle_poll = {value}\n"),
            ))
        };
        assert_eq!(
            parse(GOOD).unwrap().server.ring_idle_poll,
            std::time::Duration::from_micros(50)
        );
        assert_eq!(
            with("\"200us\"").unwrap().server.ring_idle_poll,
            std::time::Duration::from_micros(200)
        );
        assert!(with("\"0s\"").unwrap().server.ring_idle_poll.is_zero());
        let err = with("\"5ms\"").unwrap_err().to_string();
        assert!(
            err.contains("ring_idle_poll") && err.contains("at most 1ms"),
            "{err}"
        );
        let err = with("\"soon\"").unwrap_err().to_string();
        assert!(err.contains("ring_idle_poll"), "{err}");
    }

    #[test]
    fn kek_inner_must_be_another_defined_kek_on_a_cache_volume() {
        let with_inner = |inner: &str| {
            GOOD.replace(
                "kek = \"main\"\n",
                &format!("kek = \"main\"\nkek_inner = \"{inner}\"\n"),
            )
            .replace(
                "[[volume]]\nname = \"cache0\"",
                "[kek.hsm]\nprovider = \"local\"\npath = \"/etc/hostcrypt/second.key\"\n\n[[volume]]\nname = \"cache0\"",
            )
        };
        let c = parse(&with_inner("hsm")).unwrap();
        assert_eq!(c.volumes[0].kek_inner.as_ref().unwrap().get_ref(), "hsm");
        let err = parse(&with_inner("main")).unwrap_err().to_string();
        assert!(
            err.contains("kek_inner") && err.contains("different KEK"),
            "{err}"
        );
        let err = parse(&with_inner("nope")).unwrap_err().to_string();
        assert!(err.contains("[kek.nope]"), "{err}");
        let temp = GOOD.replace(
            "role = \"temp\"\n",
            "role = \"temp\"\nkek_inner = \"main\"\n",
        );
        let err = parse(&temp).unwrap_err().to_string();
        assert!(err.contains("temp volumes"), "{err}");
    }

    #[test]
    fn tcp_beyond_loopback_needs_tls_require_or_an_explicit_opt_out() {
        let open = GOOD.replace("127.0.0.1:10809", "0.0.0.0:10809");
        let err = parse(&open).unwrap_err().to_string();
        assert!(
            err.contains("0.0.0.0:10809")
                && err.contains("tls = \"require\"")
                && err.contains("insecure_plaintext_tcp = true"),
            "{err}"
        );
        parse(&open.replace("[server]\n", "[server]\ninsecure_plaintext_tcp = true\n")).unwrap();
        let tls = open.replace(
            "[server]\n",
            "[server]\ntls = \"require\"\ntls_certificates = \"/etc/hostcrypt/tls\"\n",
        );
        let c = parse(&tls).unwrap();
        assert!(
            c.server.tls_verify_peer,
            "client certificates are required by default"
        );
        let err = parse(&open.replace("[server]\n", "[server]\ntls = \"on\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("tls_certificates"), "{err}");
        assert!(parse(&GOOD.replace("127.0.0.1:10809", "localhost:10809")).is_ok());
        assert!(parse(&GOOD.replace("127.0.0.1:10809", "[::1]:10809")).is_ok());
    }

    #[test]
    fn allow_entries_are_checked_with_their_line() {
        let text = GOOD.replace(
            "kek = \"main\"\n",
            "kek = \"main\"\nallow = [\"uid:0\", \"10.0.0.0/40\"]\n",
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("line 15") && err.contains("prefix"), "{err}");
        let ok = text.replace("10.0.0.0/40", "gid:root");
        let c = parse(&ok).unwrap();
        assert_eq!(
            c.volumes[0].allow_list().unwrap().describe(),
            Some(vec!["uid:0".to_string(), "gid:0".to_string()])
        );
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = GOOD.replace("allow_discards = true", "allow_discard = true");
        let err = parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("allow_discard") && err.contains("line 22"),
            "{err}"
        );
    }

    #[test]
    fn bad_values_name_key_and_line() {
        let err = parse(&GOOD.replace("sector_size = 512", "sector_size = 1000"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("512 or 4096") && err.contains("line 21"),
            "{err}"
        );
        let err = parse(&GOOD.replace("kek = \"main\"", "kek = \"nope\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 14") && err.contains("[kek.nope]"),
            "{err}"
        );
        let err = parse(&GOOD.replace("size = \"8G\"", "size = \"8X\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown unit") && err.contains("line 20"),
            "{err}"
        );
        let err = parse(&GOOD.replace("provider = \"local\"", "provider = \"nope\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope"), "{err}");
        let err = parse(&GOOD.replace("size = \"8G\"\n", ""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs a size"), "{err}");
    }
}
