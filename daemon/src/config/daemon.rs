//! `[daemon]`: settings of the whole daemon, whatever frontends it runs:
//! the I/O engine, the control socket, metrics, the audit log and where
//! the anti-rollback records live. Each frontend's listeners have their
//! own section (`[nbd]`, `nbd.rs`).

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::Deserialize;

use super::schema::{duration_text, DurationText};

/// Longest idle poll accepted: beyond a millisecond a ring would burn a
/// core between requests of any client that is merely slow.
const MAX_IDLE_POLL: std::time::Duration = std::time::Duration::from_millis(1);

/// Settings of the whole daemon, whatever frontends it runs: the I/O
/// engine, the control socket, metrics, the audit log and where the
/// anti-rollback records live.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// Backing I/O engine: `auto` (io_uring, else threads), `uring`, `threads`.
    #[serde(default)]
    #[schemars(extend("examples" = ["threads"]))]
    pub io_engine: crate::io::engine::EngineKind,
    /// With the io_uring engine, how long a ring keeps polling for work
    /// after its last before it sleeps, e.g. `"50us"`; `"0s"` sleeps at
    /// once. A vhost-user queue's worker looks at its virtqueue for as
    /// long before it asks the guest to kick. Waking a sleeping core (on
    /// a VM, a halted vCPU) is most of a QD1 read's latency
    /// (benches/results/history.md, "Idle polling on the rings"); the
    /// price is up to this much CPU time after each burst of requests.
    #[serde(
        default = "default_ring_idle_poll",
        deserialize_with = "idle_poll",
        serialize_with = "duration_text"
    )]
    #[schemars(with = "DurationText", extend("examples" = ["200us"]))]
    pub ring_idle_poll: std::time::Duration,
    /// Append-only JSON-lines audit log of every key operation (fsync'd,
    /// never a secret); absent = no audit log.
    #[schemars(extend("examples" = ["/var/log/hostcrypt/audit.jsonl"]))]
    pub audit_log: Option<PathBuf>,
    /// Where the per-volume anti-rollback records live (`volume/record.rs`):
    /// local, persistent, root-only. Absolute.
    #[serde(default = "default_state_dir")]
    #[schemars(extend("examples" = ["/srv/hostcrypt/state"]))]
    pub state_dir: PathBuf,
    /// Path of the control socket (`hostcrypt` talks to the daemon here);
    /// absent = no control socket.
    #[schemars(extend("examples" = ["/run/hostcrypt/control.sock"]))]
    pub control: Option<PathBuf>,
    /// Group (name or gid) whose members may use the control socket besides root.
    #[schemars(extend("examples" = ["hostcrypt"]))]
    pub control_group: Option<String>,
    /// Group (name or gid) whose members may only read over the control
    /// socket: `status`, `volumes`, `check-key`. The socket is then mode
    /// 0666 and the daemon's own check (SO_PEERCRED, SO_PEERGROUPS) is
    /// the boundary.
    #[schemars(extend("examples" = ["hostcrypt-read"]))]
    pub control_read_group: Option<String>,
    /// Address of the Prometheus/OpenMetrics endpoint (`GET /metrics`);
    /// absent = none.
    #[schemars(extend("examples" = ["127.0.0.1:9310"]))]
    pub metrics: Option<std::net::SocketAddr>,
}

/// The keys of `[daemon]`, for the migration of a `[server]` section
/// (and the test harness, which splits lines the same way).
pub const KEYS: &[&str] = &[
    "io_engine",
    "ring_idle_poll",
    "audit_log",
    "state_dir",
    "control",
    "control_group",
    "control_read_group",
    "metrics",
];

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/hostcrypt/state")
}

fn default_ring_idle_poll() -> std::time::Duration {
    std::time::Duration::from_micros(50)
}

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

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            io_engine: Default::default(),
            ring_idle_poll: default_ring_idle_poll(),
            audit_log: None,
            state_dir: default_state_dir(),
            control: None,
            control_group: None,
            control_read_group: None,
            metrics: None,
        }
    }
}
