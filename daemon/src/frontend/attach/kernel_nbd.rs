//! A volume on the kernel's NBD client, as `nbd-client -N` would set it
//! up, without a client process: the daemon makes one socketpair per
//! connection, serves one end like any NBD connection (`frontend/nbd/`,
//! peer [`Peer::kernel`](crate::export::peer::Peer::kernel)), runs the
//! client's side of the handshake on the other end itself (simple
//! replies: the kernel reads no structured ones), and hands those ends to
//! the kernel over netlink (`netlink.rs`).
//!
//! The device carries the backend identifier `hostcrypt:VOLUME:UUID`
//! (/sys/block/nbdN/backend). After a restart the daemon finds its
//! devices by it and gives them fresh sockets (NBD_CMD_RECONFIGURE): the
//! kernel held their I/O for the dead-connection timeout, so a mounted
//! filesystem carries on. The UUID is the volume header's: a device is
//! only ever given the data it was attached to, never that of another
//! volume that took the name since (a temp volume is new at every start,
//! so its device is never resumed). A reconfigure must name the
//! identifier again, so the daemon never takes over a device it did not
//! attach.
//!
//! Here: sockets, handshake, connect, reconfigure, disconnect, finding
//! devices. Not here: which volumes are attached and the control verbs
//! (`mod.rs`), device names and mounts (`device.rs`).

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::watch;

use super::netlink::{Connect, NbdNetlink};
use super::AttachError;
use crate::frontend::nbd::{serve_kernel, Server};
use crate::io::remote::client::negotiate::{choose_replies, greet, ExportInfo};

/// How long the daemon's own handshake on a socketpair may take.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// What the NBD attachments of one daemon share.
pub struct Plumbing {
    pub server: Arc<Server>,
    pub runtime: Handle,
    pub shutdown: watch::Receiver<bool>,
    /// Connections per device (the kernel spreads its queues over them).
    pub connections: usize,
    /// Seconds the kernel holds I/O while the daemon is away.
    pub dead_conn_timeout: u64,
    /// Where block devices appear (`/dev`; a test may point elsewhere).
    pub dev: PathBuf,
    /// Where the kernel describes them (`/sys/block`).
    pub sys_block: PathBuf,
}

/// The volume name and UUID an identifier names, if it is one of ours
/// (for udev: `hostcrypt udev-env`).
pub fn parse_backend_identifier(text: &str) -> Option<(String, uuid::Uuid)> {
    let rest = text.trim_end().strip_prefix("hostcrypt:")?;
    let (name, uuid) = rest.rsplit_once(':')?;
    let uuid = uuid::Uuid::parse_str(uuid).ok()?;
    super::device::valid_name(name).then(|| (name.to_owned(), uuid))
}

/// The identifier a device attached for `volume` carries.
pub fn backend_identifier(volume: &str, uuid: &uuid::Uuid) -> String {
    format!("hostcrypt:{volume}:{uuid}")
}

/// Negotiated client ends for the kernel, what they agreed on, and a
/// handle on each server end.
struct Negotiated {
    sockets: Vec<UnixStream>,
    info: ExportInfo,
    servers: Vec<UnixStream>,
}

/// Whether the other end of `socket` is closed (POLLHUP now).
fn peer_closed(socket: &UnixStream) -> bool {
    let mut poll = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one pollfd, valid for the call; no wait.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    ready == 1 && poll.revents & (libc::POLLHUP | libc::POLLRDHUP) != 0
}

impl Plumbing {
    /// `connections` socketpairs: each server end served, each client end
    /// through the handshake for `volume` and ready for the kernel.
    /// Also returns a handle on each server end, to see whether the
    /// kernel kept the client end (`resume`).
    fn negotiated(&self, volume: &str) -> Result<Negotiated, AttachError> {
        let mut sockets = Vec::with_capacity(self.connections);
        let mut servers = Vec::with_capacity(self.connections);
        let mut agreed: Option<ExportInfo> = None;
        for _ in 0..self.connections.max(1) {
            let (ours, theirs) = UnixStream::pair()?;
            servers.push(ours.try_clone()?);
            let server = self.server.clone();
            let shutdown = self.shutdown.clone();
            let name = volume.to_owned();
            self.runtime.spawn(async move {
                if let Err(e) = serve_kernel(server, ours, shutdown).await {
                    tracing::warn!(volume = name, "attached NBD connection refused: {e}");
                }
            });
            theirs.set_read_timeout(Some(HANDSHAKE))?;
            theirs.set_write_timeout(Some(HANDSHAKE))?;
            let mut stream = &theirs;
            greet(&mut stream).map_err(|e| AttachError::Handshake(e.to_string()))?;
            let info = choose_replies(&mut stream, volume, false)
                .map_err(|e| AttachError::Handshake(e.to_string()))?;
            // The kernel reads and writes this socket from now on, with
            // its own timeouts.
            theirs.set_read_timeout(None)?;
            theirs.set_write_timeout(None)?;
            if agreed.is_some_and(|a| a != info) {
                return Err(AttachError::Handshake(
                    "connections of one device disagree on the export".into(),
                ));
            }
            agreed = Some(info);
            sockets.push(theirs);
        }
        let info = agreed.ok_or_else(|| AttachError::Handshake("no connection".into()))?;
        Ok(Negotiated {
            sockets,
            info,
            servers,
        })
    }

    /// The device attached for `volume`: connected anew, or, when one
    /// with its identifier exists (left by an earlier daemon; the caller
    /// knows what this one attached), given fresh sockets. Returns its
    /// index.
    pub fn attach(&self, volume: &str, uuid: &uuid::Uuid) -> Result<u32, AttachError> {
        if let Some(index) = self.resume(volume, uuid)? {
            return Ok(index);
        }
        let backend = backend_identifier(volume, uuid);
        // First: without the nbd module there is nothing to negotiate for.
        let mut link = NbdNetlink::open()?;
        let Negotiated { sockets, info, .. } = self.negotiated(volume)?;
        let fds: Vec<_> = sockets.iter().map(|s| s.as_fd()).collect();
        let request = Connect {
            size: info.size,
            // The volume's sector size, which the server prefers: the
            // device's logical block size.
            block_size: u64::from(info.preferred_block.clamp(512, 65536)),
            server_flags: info.flags,
            timeout: 0,
            dead_conn_timeout: self.dead_conn_timeout,
            backend: &backend,
        };
        Ok(link.connect(None, &fds, &request)?)
    }

    /// Gives an attached device whose daemon went away fresh sockets;
    /// `None` when no device carries the volume's identifier.
    pub fn resume(&self, volume: &str, uuid: &uuid::Uuid) -> Result<Option<u32>, AttachError> {
        let backend = backend_identifier(volume, uuid);
        let Some(index) = self.find(&backend) else {
            return Ok(None);
        };
        let mut link = NbdNetlink::open()?;
        let Negotiated {
            sockets, servers, ..
        } = self.negotiated(volume)?;
        let fds: Vec<_> = sockets.iter().map(|s| s.as_fd()).collect();
        link.reconfigure(index, &fds, &backend, self.dead_conn_timeout)?;
        // The kernel takes a socket only in place of one it has already
        // found dead, and says nothing of those it did not take (its
        // workers notice a dead server's sockets a little after it died).
        // Once our own handles are gone, a socket it did not take is
        // closed: if it took none, the device still waits, and the next
        // resume tries again.
        drop(fds);
        drop(sockets);
        if servers.iter().all(peer_closed) {
            return Err(AttachError::Io(format!(
                "/dev/nbd{index} took none of the new sockets (its old ones are not yet \
                 found dead); trying again"
            )));
        }
        Ok(Some(index))
    }

    /// Devices attached for an earlier volume named `volume` (another
    /// UUID: a temp volume before a restart) by a process that is gone:
    /// nothing will ever serve them, so they are disconnected now rather
    /// than fail their I/O when the dead-connection timeout ends. A device
    /// whose process lives (another daemon's) is left alone.
    pub fn disconnect_orphans(&self, volume: &str, uuid: &uuid::Uuid) -> Vec<u32> {
        let prefix = format!("hostcrypt:{volume}:");
        let current = backend_identifier(volume, uuid);
        let mut gone = Vec::new();
        for (index, backend) in self.devices() {
            if !backend.starts_with(&prefix) || backend == current {
                continue;
            }
            let alive = std::fs::read_to_string(self.sys_dir(index).join("pid"))
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok())
                .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
            if !alive && self.disconnect(index).is_ok() {
                gone.push(index);
            }
        }
        gone
    }

    /// NBD_CMD_DISCONNECT for the device at `index`.
    pub fn disconnect(&self, index: u32) -> Result<(), AttachError> {
        NbdNetlink::open()?.disconnect(index)?;
        Ok(())
    }

    /// `/dev/nbdN`.
    pub fn device(&self, index: u32) -> PathBuf {
        self.dev.join(format!("nbd{index}"))
    }

    /// The index of the device whose backend identifier is `backend`.
    pub fn find(&self, backend: &str) -> Option<u32> {
        self.devices()
            .into_iter()
            .find_map(|(index, b)| (b == backend).then_some(index))
    }

    /// `/sys/block/nbdN`.
    pub fn sys_dir(&self, index: u32) -> PathBuf {
        self.sys_block.join(format!("nbd{index}"))
    }

    /// The backend identifier of the device at `index` (none while it is
    /// not connected).
    pub fn backend_of(&self, index: u32) -> Option<String> {
        let text = std::fs::read_to_string(self.sys_dir(index).join("backend")).ok()?;
        Some(text.trim_end().to_owned())
    }

    /// Every connected NBD device with its backend identifier.
    fn devices(&self) -> Vec<(u32, String)> {
        let Ok(entries) = std::fs::read_dir(&self.sys_block) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|entry| {
                let index = entry
                    .file_name()
                    .to_str()?
                    .strip_prefix("nbd")?
                    .parse()
                    .ok()?;
                Some((index, self.backend_of(index)?))
            })
            .collect()
    }
}

impl From<super::netlink::NetlinkError> for AttachError {
    fn from(e: super::netlink::NetlinkError) -> Self {
        AttachError::Netlink(e.to_string())
    }
}

impl From<io::Error> for AttachError {
    fn from(e: io::Error) -> Self {
        AttachError::Io(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_round_trip_and_foreign_ones_are_not_ours() {
        let uuid = uuid::Uuid::new_v4();
        let id = backend_identifier("cache0", &uuid);
        assert_eq!(
            parse_backend_identifier(&format!("{id}\n")),
            Some(("cache0".to_owned(), uuid))
        );
        for foreign in [
            "",
            "nbd-client",
            "hostcrypt:cache0",
            "hostcrypt::00000000-0000-0000-0000-000000000000",
            "hostcrypt:a/b:00000000-0000-0000-0000-000000000000",
            "hostcrypt:x:not-a-uuid",
        ] {
            assert_eq!(parse_backend_identifier(foreign), None, "{foreign}");
        }
    }
}
