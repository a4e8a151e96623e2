//! Control-socket messages: one JSON object per line, one request and one
//! response per connection. JSON lines rather than HTTP: there is nothing to
//! route, no client but our own CLI, and `socat`/`nc -U` can drive it by
//! hand. Answers are one typed enum (`ControlReply`) that both the daemon and the
//! CLI use, so neither decodes untyped JSON. Never carries key material.

use serde::{Deserialize, Serialize};

use crate::kek::KekRef;
use crate::volume::{KeyStatus, Layer, ReencryptAction};

/// Longest request line accepted.
pub const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ControlRequest {
    /// Daemon and per-volume state.
    Status,
    /// Verify key access now (all volumes, or one).
    CheckKey { volume: Option<String> },
    /// Rewrap a volume's DEK under the newest (or given) KEK version.
    RotateKek {
        volume: String,
        to_version: Option<String>,
        /// Which layer of a double-encrypted volume (default outer).
        #[serde(default)]
        layer: Layer,
    },
    /// Re-read the config file: add and remove volumes, leave the others.
    Reload,
    /// Start, pause, resume or report an online DEK re-encryption.
    Reencrypt {
        volume: String,
        action: ReencryptAction,
        /// Rate limit in MB/s (0 = unlimited); kept until changed.
        rate_mbps: Option<f64>,
    },
    /// Move a volume's DEK under another configured KEK.
    Rekey {
        volume: String,
        kek: String,
        #[serde(default)]
        layer: Layer,
    },
    /// Attach a volume as a kernel block device on this host.
    Attach {
        volume: String,
        via: Option<crate::frontend::attach::Via>,
    },
    /// Detach an attached volume (refused while mounted, unless forced).
    Detach {
        volume: String,
        #[serde(default)]
        force: bool,
    },
    /// The attached volumes.
    Attached,
}

impl ControlRequest {
    /// What `control_read_group` may ask: nothing that changes a key, a
    /// volume or the config.
    pub fn is_read_only(&self) -> bool {
        matches!(
            self,
            ControlRequest::Status
                | ControlRequest::Attached
                | ControlRequest::CheckKey { .. }
                | ControlRequest::Reencrypt {
                    action: ReencryptAction::Status,
                    rate_mbps: None,
                    ..
                }
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControlResponse {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<ControlReply>,
}

impl ControlResponse {
    pub fn ok(reply: impl Into<ControlReply>) -> Self {
        ControlResponse {
            ok: true,
            error: None,
            result: Some(reply.into()),
        }
    }

    pub fn error(message: impl std::fmt::Display) -> Self {
        ControlResponse {
            ok: false,
            error: Some(message.to_string()),
            result: None,
        }
    }
}

/// What a successful request answers: one variant per kind of answer, so
/// both ends decode the same types.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "kebab-case")]
pub enum ControlReply {
    Status(Status),
    Checks(Vec<CheckResult>),
    KeyChange(KeyChange),
    Reload(crate::service::reload::ReloadReport),
    Reencrypt(crate::volume::ReencryptStatus),
    Attached(Vec<crate::frontend::attach::Attached>),
}

impl ControlReply {
    /// The kind of answer, for an error about an unexpected one.
    pub fn kind(&self) -> &'static str {
        match self {
            ControlReply::Status(_) => "status",
            ControlReply::Checks(_) => "checks",
            ControlReply::KeyChange(_) => "key-change",
            ControlReply::Reload(_) => "reload",
            ControlReply::Reencrypt(_) => "reencrypt",
            ControlReply::Attached(_) => "attached",
        }
    }
}

/// `ControlReply` from and into each answer type.
macro_rules! reply_variants {
    ($($variant:ident($ty:ty)),* $(,)?) => {$(
        impl From<$ty> for ControlReply {
            fn from(value: $ty) -> Self {
                ControlReply::$variant(value)
            }
        }
        impl TryFrom<ControlReply> for $ty {
            type Error = ControlReply;
            fn try_from(reply: ControlReply) -> Result<Self, ControlReply> {
                match reply {
                    ControlReply::$variant(value) => Ok(value),
                    other => Err(other),
                }
            }
        }
    )*};
}

reply_variants!(
    Attached(Vec<crate::frontend::attach::Attached>),
    Status(Status),
    Checks(Vec<CheckResult>),
    KeyChange(KeyChange),
    Reload(crate::service::reload::ReloadReport),
    Reencrypt(crate::volume::ReencryptStatus),
);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub uptime_secs: u64,
    pub engine: String,
    #[serde(default)]
    pub listeners: Vec<ListenerStatus>,
    /// The TLS credentials new connections get, when TLS is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<crate::frontend::tls::TlsInfo>,
    #[serde(default)]
    pub connections: ConnectionStatus,
    pub volumes: Vec<VolumeStatus>,
    /// Volumes attached as block devices on this host.
    #[serde(default)]
    pub attached: Vec<crate::frontend::attach::Attached>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListenerStatus {
    pub address: String,
    /// The TCP listener's TLS mode (`off` on Unix sockets, whose peers are
    /// identified by SO_PEERCRED).
    pub tls: crate::frontend::tls::TlsMode,
}

/// Connections open now, the limits, and everyone turned away since start.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnectionStatus {
    pub open: usize,
    pub max: usize,
    pub max_per_peer: usize,
    pub refused_limit: u64,
    pub refused_tls_required: u64,
    pub tls_failures: u64,
    pub handshake_failures: u64,
    /// Bytes reserved by read replies not yet sent, and the budget.
    #[serde(default)]
    pub reply_bytes_pending: u64,
    #[serde(default)]
    pub reply_memory: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub name: String,
    pub role: String,
    pub size: u64,
    pub sector_size: u64,
    /// Who may open it (`None`: anyone who can connect).
    #[serde(default)]
    pub allow: Option<Vec<String>>,
    /// Clients the allow list turned away since start.
    #[serde(default)]
    pub refused: u64,
    /// Clients connected now (NBD connections, vhost-user sessions).
    #[serde(default)]
    pub clients: Vec<crate::export::clients::ClientStatus>,
    /// Set while the volume is configured but not open (`waiting-for-key`,
    /// `open-failed`), with why; it is retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<UnavailableStatus>,
    /// Absent for temp volumes (their key never leaves memory).
    pub key: Option<KeyStatus>,
    #[serde(default)]
    pub io: IoStatus,
    /// The re-encryption in progress, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reencrypt: Option<crate::volume::ReencryptStatus>,
    /// A remote (NBD) backing's connection state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<crate::io::remote::client::RemoteStatus>,
    /// The first failed sync of the backing: from then on every FLUSH and
    /// FUA fails until the volume is reopened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_back_error: Option<String>,
    /// Set once the backing was found deleted, replaced or truncated while
    /// served: I/O is stopped until the volume is reopened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UnavailableStatus {
    pub state: String,
    pub error: String,
    /// Seconds since the epoch of the first failure.
    pub since: u64,
}

/// A volume's traffic since the daemon started.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IoStatus {
    pub connections: i64,
    pub in_flight: i64,
    pub read_ops: u64,
    pub read_bytes: u64,
    pub write_ops: u64,
    pub write_bytes: u64,
    /// Requests of any kind answered with an error.
    pub errors: u64,
}

/// Result of a check: per volume, `ok` or the error.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckResult {
    pub volume: String,
    pub ok: bool,
    pub error: Option<String>,
    pub state: String,
    /// Key-safety warnings (deletion allowed, purgeable, exportable, ...).
    #[serde(default)]
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyChange {
    pub volume: String,
    #[serde(default)]
    pub layer: Layer,
    pub kek: KekRef,
}
