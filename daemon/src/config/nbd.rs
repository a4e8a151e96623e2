//! `[nbd]`: the NBD frontend's listeners (Unix socket, TCP), TLS on TCP,
//! connection limits and timeouts, and whether plaintext connections live
//! on the engine's rings. The frontend itself (`frontend/nbd/`) never reads
//! the config; the daemon maps this section to its listeners and gate.

use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::Deserialize;

use super::schema::{duration_text, size_text, DurationText, SizeText};

/// The NBD frontend: its listeners (a Unix socket, TCP, or both), TLS on
/// TCP, connection limits and timeouts.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NbdConfig {
    /// Path of the NBD Unix socket (qemu:
    /// `nbd+unix:///NAME?socket=PATH`). At least one of `unix` and `tcp`
    /// is needed.
    #[schemars(extend("examples" = ["/run/hostcrypt/nbd.sock"]))]
    pub unix: Option<PathBuf>,
    /// Address of the NBD TCP listener. One other hosts can reach needs
    /// `tls = "require"` (or `insecure_plaintext_tcp = true`).
    #[schemars(extend("examples" = ["127.0.0.1:10809"]))]
    pub tcp: Option<String>,
    /// With the io_uring engine, receive each plaintext connection's
    /// requests on one ring, which also reads, decrypts and replies for it
    /// (`frontend/nbd/ring_reader.rs`). On by default: nothing crosses
    /// threads on a request's path (benches/results/history.md, "Ring connections after
    /// the writer fix"). `false` keeps every connection on a tokio task.
    #[serde(default = "yes")]
    #[schemars(extend("examples" = [false]))]
    pub ring_connections: bool,
    /// TLS on the TCP listener: `off`, `on` (optional) or `require`.
    #[serde(default)]
    #[schemars(extend("examples" = ["require"]))]
    pub tls: crate::frontend::tls::TlsMode,
    /// Directory with ca-cert.pem, server-cert.pem, server-key.pem and
    /// optionally ca-crl.pem (the layout qemu, nbdkit and libnbd share);
    /// re-read by `hostcrypt reload` and SIGHUP.
    #[schemars(extend("examples" = ["/etc/hostcrypt/tls"]))]
    pub tls_certificates: Option<PathBuf>,
    /// Clients must present a certificate signed by ca-cert.pem.
    #[serde(default = "yes")]
    #[schemars(extend("examples" = [false]))]
    pub tls_verify_peer: bool,
    /// A ca-crl.pem past its nextUpdate: `refuse` (the default: it is not
    /// loaded, and clients are refused while it is stale) or `warn`.
    #[serde(default)]
    #[schemars(extend("examples" = ["warn"]))]
    pub tls_crl_expired: crate::frontend::tls::CrlExpired,
    /// Serve plaintext on a TCP address other hosts can reach: every
    /// volume then crosses the network decrypted.
    #[serde(default)]
    #[schemars(extend("examples" = [true]))]
    pub insecure_plaintext_tcp: bool,
    /// Open NBD connections at most, over all listeners.
    #[serde(default = "default_max_connections")]
    #[schemars(extend("examples" = [4096]))]
    pub max_connections: usize,
    /// Open NBD connections at most from one IPv4 address, IPv6 /64 or
    /// Unix uid.
    #[serde(default = "default_max_connections_per_peer")]
    #[schemars(extend("examples" = [16]))]
    pub max_connections_per_peer: usize,
    /// Connections at most still in the handshake (not yet authenticated);
    /// each also counts towards `max_connections`.
    #[serde(default = "default_max_handshakes")]
    #[schemars(extend("examples" = [16]))]
    pub max_handshakes: usize,
    /// How long a client may take from connecting to choosing an export.
    #[serde(
        default = "default_handshake_timeout",
        deserialize_with = "super::duration",
        serialize_with = "duration_text"
    )]
    #[schemars(with = "DurationText", extend("examples" = ["10s"]))]
    pub handshake_timeout: std::time::Duration,
    /// How long a reply may wait for a client that does not read it; then
    /// the connection is closed and what it held is freed.
    #[serde(
        default = "default_reply_timeout",
        deserialize_with = "super::duration",
        serialize_with = "duration_text"
    )]
    #[schemars(with = "DurationText", extend("examples" = ["5m"]))]
    pub reply_timeout: std::time::Duration,
    /// Bytes that read and BLOCK_STATUS replies not yet sent may hold,
    /// over all connections (64M to 1T); a connection whose request would
    /// exceed it waits, and reads no further requests meanwhile.
    #[serde(
        default = "default_reply_memory",
        deserialize_with = "reply_memory",
        serialize_with = "size_text"
    )]
    #[schemars(with = "SizeText", extend("examples" = ["2G"]))]
    pub reply_memory: u64,
}

fn yes() -> bool {
    true
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
    crate::frontend::nbd::budget::DEFAULT_REPLY_MEMORY
}

/// `reply_memory`: at least one connection's budget (64 MiB, so any one
/// request fits in the whole), at most 1 TiB.
fn reply_memory<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    use crate::frontend::nbd::budget::{MAX_REPLY_MEMORY, MIN_REPLY_MEMORY};
    let super::ByteSize(bytes) = super::ByteSize::deserialize(d)?;
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

fn default_handshake_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(30)
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            unix: None,
            tcp: None,
            ring_connections: true,
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

impl NbdConfig {
    /// The gate settings the NBD server runs with.
    pub fn gate(&self) -> crate::frontend::nbd::gate::GateSettings {
        crate::frontend::nbd::gate::GateSettings {
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
        self.tls_certificates.as_deref()
    }

    /// What [`super::Config::validate`] checks of this section: a
    /// message for the first problem, with its key.
    pub(super) fn problem(&self) -> Option<(&'static str, String)> {
        if self.unix.is_none() && self.tcp.is_none() {
            return Some((
                "nbd",
                "set `unix` or `tcp` (or both) in [nbd] so clients can connect".into(),
            ));
        }
        if self.tls != crate::frontend::tls::TlsMode::Off && self.tls_certificates.is_none() {
            return Some((
                "tls_certificates",
                format!(
                    "tls = \"{}\" needs tls_certificates = DIR (with ca-cert.pem, server-cert.pem, server-key.pem)",
                    self.tls
                ),
            ));
        }
        if let Some(tcp) = &self.tcp {
            if self.tls != crate::frontend::tls::TlsMode::Require
                && !self.insecure_plaintext_tcp
                && !is_loopback(tcp)
            {
                return Some((
                    "tcp",
                    format!(
                        "{tcp} is reachable from other hosts, and without tls = \"require\" every volume would cross the network decrypted. Set tls = \"require\" and tls_certificates = DIR, listen on 127.0.0.1, or set insecure_plaintext_tcp = true to accept plaintext"
                    ),
                ));
            }
        }
        if self.max_connections == 0
            || self.max_connections_per_peer == 0
            || self.max_handshakes == 0
        {
            return Some((
                "max_connections",
                "max_connections, max_connections_per_peer and max_handshakes must be at least 1"
                    .into(),
            ));
        }
        None
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
