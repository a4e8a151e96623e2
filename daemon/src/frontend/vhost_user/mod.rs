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
//! Sockets are bound at start from the config; a reload that adds or
//! removes a volume's socket is reported as needing a restart. A reload
//! that removes a volume ends its client's connection (the export's
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

use crate::frontend::{Context, Frontend, Running};

pub use bind::BindError;
pub use device::MAX_QUEUES;
pub use spec::{SocketSpec, VhostUserError};

/// The vhost-user-blk frontend as the daemon starts it: its sockets,
/// bound.
pub struct VhostUserFrontend {
    sockets: Vec<socket::Bound>,
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
        Ok(VhostUserFrontend { sockets })
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

impl Frontend for VhostUserFrontend {
    fn name(&self) -> &'static str {
        "vhost-user"
    }

    fn start(self: Box<Self>, context: Context) -> Running {
        let task = tokio::spawn(async move {
            let mut sockets = tokio::task::JoinSet::new();
            for bound in self.sockets {
                sockets.spawn(socket::serve(
                    bound,
                    context.exports.clone(),
                    context.shutdown.clone(),
                ));
            }
            while sockets.join_next().await.is_some() {}
        });
        Running::new("vhost-user", task)
    }
}
