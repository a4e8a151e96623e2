//! Frontends: the ways clients reach an export. Each is one folder
//! (`nbd/`, the NBD server; `vhost_user/`, vhost-user-blk devices for
//! VMs) that turns its wire requests into `volume::Op`s,
//! submits them through the one submit point (`volume/submit/`) and
//! answers; each starts the same way, through [`Frontend::start`], so the
//! daemon (`daemon.rs`) starts every configured frontend alike. TLS
//! credentials (`tls.rs`) are shared by the frontends that listen on TCP.
//!
//! What a frontend may use: `export/` (who may open what, metrics),
//! `volume/` (ops and their outcomes), `io/` (the engine, buffers) and
//! `wire/`. It never reads the config or the key providers: the daemon
//! builds what it needs (listeners, limits) and hands it over.
//!
//! A new frontend (ublk, say) is a folder here with a type that
//! implements [`Frontend`], and a config section the daemon maps to it.

pub mod attach;
pub mod nbd;
pub mod tls;
pub mod vhost_user;

use std::sync::Arc;

use tokio::sync::watch;

use crate::export::Exports;
use crate::io::engine::Engine;

/// What every frontend is given when it starts.
pub struct Context {
    /// The served exports; a reload swaps them, so look up at open time.
    pub exports: Exports,
    /// The engine the volumes run on, for a frontend that puts its own
    /// queues on its rings.
    pub engine: Arc<Engine>,
    /// Turns true when the daemon stops: stop accepting, drain, return.
    pub shutdown: watch::Receiver<bool>,
}

/// A frontend that has started; [`Running::stopped`] waits until it has
/// drained after shutdown.
pub struct Running {
    pub name: &'static str,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    pub fn new(name: &'static str, task: tokio::task::JoinHandle<()>) -> Self {
        Running { name, task }
    }

    pub async fn stopped(self) {
        if let Err(e) = self.task.await {
            tracing::error!(frontend = self.name, "frontend task failed: {e}");
        }
    }
}

/// The contract every frontend meets.
pub trait Frontend: Send {
    /// A short name for logs (`nbd`).
    fn name(&self) -> &'static str;
    /// Starts serving on the current tokio runtime and returns at once.
    fn start(self: Box<Self>, context: Context) -> Running;
}
