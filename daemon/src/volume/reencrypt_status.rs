//! What an operator sees of and asks of a re-encryption: its status and
//! state, the actions, the rate bounds, and the per-volume controls the
//! worker (`reencrypt.rs`) and the control requests share. Types and the
//! state they guard, no I/O, so the key lifecycle (`keys.rs`) can hold the
//! controls without knowing the worker.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Where a re-encryption stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReencryptState {
    /// None in progress.
    #[default]
    Idle,
    Running,
    Paused,
    WaitingForKey,
    /// Stopped on an error (see `error`); resume retries.
    Failed,
    Done,
}

impl ReencryptState {
    /// Every state, in the order above (the metrics' `state` label set).
    pub const ALL: [ReencryptState; 6] = [
        ReencryptState::Idle,
        ReencryptState::Running,
        ReencryptState::Paused,
        ReencryptState::WaitingForKey,
        ReencryptState::Failed,
        ReencryptState::Done,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ReencryptState::Idle => "idle",
            ReencryptState::Running => "running",
            ReencryptState::Paused => "paused",
            ReencryptState::WaitingForKey => "waiting-for-key",
            ReencryptState::Failed => "failed",
            ReencryptState::Done => "done",
        }
    }
}

impl std::fmt::Display for ReencryptState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What `hostcrypt reencrypt --status` shows.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReencryptStatus {
    pub volume: String,
    pub state: ReencryptState,
    /// Bytes of the data area already under the new DEK.
    pub checkpoint: u64,
    pub size: u64,
    pub target_generation: Option<u32>,
    /// The DEK generation in use (after completion: the new one).
    pub generation: u32,
    pub rate_limit_mbps: Option<f64>,
    /// Measured since the worker last started.
    pub rate_mbps: f64,
    pub error: Option<String>,
}

/// What the operator asks of a re-encryption.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReencryptAction {
    /// Start one (or resume the one in progress).
    Start,
    Pause,
    Resume,
    Status,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) paused: bool,
    pub(super) stop: bool,
    pub(super) worker: Option<std::thread::JoinHandle<()>>,
    /// Bytes per second; `None` = as fast as it goes.
    pub(super) rate: Option<f64>,
    /// `Idle` before the worker runs, `Running`, then `Done`.
    pub(super) phase: ReencryptState,
    pub(super) error: Option<String>,
    pub(super) started: Option<Instant>,
    /// When the walk ended (so the reported rate stops decaying).
    pub(super) ended: Option<Instant>,
    pub(super) moved: u64,
}

/// Per-volume re-encryption controls, shared by the worker and the control
/// requests.
#[derive(Default)]
pub struct Controls {
    state: Mutex<State>,
    pub(super) changed: Condvar,
}

impl Controls {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits up to `timeout` for a control change (pause, resume, stop).
    pub(super) fn wait(&self, timeout: Duration) {
        let guard = self.lock();
        let _ = self.changed.wait_timeout(guard, timeout);
    }
}

/// The re-encryption rates an operator may set, in MB/s (0: unlimited).
pub const MIN_RATE_MBPS: f64 = 0.1;
pub const MAX_RATE_MBPS: f64 = 1_000_000.0;
