//! The vhost-user-blk frontend: one Unix socket per volume that asks for
//! one (`vhost_user = PATH` on its `[[volume]]`), where a VMM (qemu's
//! `vhost-user-blk-pci`, cloud-hypervisor's `--disk vhost_user=true`) or a
//! userspace driver (libblkio) connects and shares the guest's memory and
//! virtqueues with the daemon. Requests are read from the virtqueues and
//! answered by writing guest memory: no socket carries the data.
//!
//! Here: the frontend contract ([`VhostUserFrontend`]); what the daemon
//! hands it and the errors (`spec.rs`); the socket, the peer check and a
//! connection's life (`socket.rs`); putting the socket file in place,
//! relative to its directory's fd (`bind.rs`); the device on one
//! connection, from descriptor chain to `volume::Op` and back
//! (`backend.rs`); the request parser, without I/O (`request.rs`);
//! features and configuration space (`device.rs`); what a connection has
//! in flight (`inflight.rs`); the inflight log the VMM keeps across a
//! daemon restart (`inflight_log.rs`) and the chains resubmitted from it
//! (`resubmit.rs`); interrupts (`notify.rs`). Shared with other frontends: exports, access rules,
//! peer identity and metrics (`export/`). The daemon builds the specs from
//! the config (`daemon/vhost_user.rs`); this folder never reads it.
//!
//! Built on the rust-vmm crates: `vhost` speaks the vhost-user protocol,
//! `vhost-user-backend` runs the session (memory table, vrings, worker
//! threads), `virtio-queue` walks descriptor chains, `vm-memory` maps and
//! bounds-checks guest memory. Hand-written: the virtio-blk request parser
//! and device (the part cloud-hypervisor's `vhost_user_block` and
//! Firecracker also write themselves), and one method added to a copy of
//! vhost-user-backend (third_party/vhost-user-backend/HOSTCRYPT.md) so the
//! daemon can check the peer before the session starts.
//!
//! Sockets are bound at start from the config; a reload adds, removes
//! and replaces them through [`VhostUserSockets`] (a removed socket's
//! file goes at once, and its client's connection ends). A reload that
//! removes a volume ends its client's connection (the export's
//! retirement); while a volume is not served (waiting for its key, say)
//! its socket refuses clients, and serves them again once it is.

mod backend;
mod bind;
mod device;
mod guest;
mod inflight;
mod inflight_log;
mod notify;
pub mod request;
mod resubmit;
mod socket;
mod spec;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tokio::sync::{mpsc, watch};

use crate::frontend::{Context, Frontend, Running};

pub use bind::BindError;
pub use device::MAX_QUEUES;
pub use spec::{SocketSpec, VhostUserError};

/// The vhost-user-blk frontend as the daemon starts it: its sockets,
/// bound.
pub struct VhostUserFrontend {
    sockets: Vec<socket::Bound>,
    changes: mpsc::UnboundedReceiver<Change>,
    handle: VhostUserSockets,
}

/// Adds and removes sockets while the frontend runs (a reload).
#[derive(Clone)]
pub struct VhostUserSockets {
    changes: mpsc::UnboundedSender<Change>,
}

enum Change {
    Add(socket::Bound),
    Remove(PathBuf),
}

impl VhostUserSockets {
    /// Binds `spec`'s socket now and serves it.
    pub fn add(&self, spec: SocketSpec) -> Result<(), VhostUserError> {
        let bound = socket::bind(spec)?;
        let path = bound.spec.path.clone();
        self.changes.send(Change::Add(bound)).map_err(|_| {
            let _ = std::fs::remove_file(&path);
            VhostUserError::Session("the vhost-user frontend has stopped".into())
        })
    }

    /// Stops serving the socket at `path` (its client's connection ends)
    /// and waits, up to `within`, for its file to go, so the path can be
    /// bound again. Returns whether it went.
    pub fn remove(&self, path: &Path, within: std::time::Duration) -> bool {
        if self.changes.send(Change::Remove(path.to_owned())).is_err() {
            return false;
        }
        let deadline = std::time::Instant::now() + within;
        while path.symlink_metadata().is_ok() {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        true
    }
}

impl VhostUserFrontend {
    /// Binds every socket (none is left bound when one fails).
    pub fn bind(specs: Vec<SocketSpec>) -> Result<Self, VhostUserError> {
        let mut sockets = Vec::with_capacity(specs.len());
        for spec in specs {
            match socket::bind(spec) {
                Ok(bound) => sockets.push(bound),
                Err(e) => {
                    for bound in sockets {
                        let _ = std::fs::remove_file(&bound.spec.path);
                    }
                    return Err(e);
                }
            }
        }
        let (tx, changes) = mpsc::unbounded_channel();
        Ok(VhostUserFrontend {
            sockets,
            changes,
            handle: VhostUserSockets { changes: tx },
        })
    }

    /// The handle a reload changes the sockets through.
    pub fn sockets(&self) -> VhostUserSockets {
        self.handle.clone()
    }

    /// `vhost-user:PATH (VOLUME)` for each socket, for the log and status.
    pub fn describe(&self) -> Vec<String> {
        self.sockets
            .iter()
            .map(|s| format!("vhost-user:{} ({})", s.spec.path.display(), s.spec.volume))
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }
}

/// Serves `bound` with a stop signal of its own (a socket served at its
/// path before is stopped).
fn serve(
    bound: socket::Bound,
    exports: &crate::export::Exports,
    tasks: &mut tokio::task::JoinSet<()>,
    stops: &mut BTreeMap<PathBuf, watch::Sender<bool>>,
    idle_poll: std::time::Duration,
) {
    let (stop, stopped) = watch::channel(false);
    if let Some(earlier) = stops.insert(bound.spec.path.clone(), stop) {
        let _ = earlier.send(true);
    }
    tasks.spawn(socket::serve(bound, exports.clone(), stopped, idle_poll));
}

impl Frontend for VhostUserFrontend {
    fn name(&self) -> &'static str {
        "vhost-user"
    }

    /// Serves each socket until the daemon stops or a reload removes it
    /// (each has a stop signal of its own); takes sockets a reload adds.
    fn start(self: Box<Self>, context: Context) -> Running {
        let VhostUserFrontend {
            sockets,
            mut changes,
            handle,
        } = *self;
        let task = tokio::spawn(async move {
            // Kept so `changes` never reports every sender gone.
            let _handle = handle;
            let mut tasks = tokio::task::JoinSet::new();
            let mut stops: BTreeMap<PathBuf, watch::Sender<bool>> = BTreeMap::new();
            let exports = context.exports;
            // A queue's worker polls its ring as long as the engine's rings do.
            let idle_poll = context.engine.idle_poll();
            for bound in sockets {
                serve(bound, &exports, &mut tasks, &mut stops, idle_poll);
            }
            let mut shutdown = context.shutdown;
            loop {
                tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => break,
                    change = changes.recv() => match change {
                        Some(Change::Add(bound)) => {
                            tracing::info!(
                                listener = format!("vhost-user:{} ({})", bound.spec.path.display(), bound.spec.volume),
                                "listening (added by a reload)"
                            );
                            serve(bound, &exports, &mut tasks, &mut stops, idle_poll);
                        }
                        Some(Change::Remove(path)) => {
                            if let Some(stop) = stops.remove(&path) {
                                tracing::info!(socket = %path.display(), "vhost-user socket removed by a reload");
                                let _ = stop.send(true);
                            }
                        }
                        None => break,
                    },
                    Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                }
            }
            for stop in stops.values() {
                let _ = stop.send(true);
            }
            while tasks.join_next().await.is_some() {}
        });
        Running::new("vhost-user", task)
    }
}
