//! systemd integration through the `sd-notify` crate: readiness and status
//! (`READY=1` once every volume is open and every socket listens, `STATUS=`
//! one-line summaries, `STOPPING=1`), the watchdog (`WATCHDOG=1` at half of
//! `WatchdogSec`), and socket activation (`LISTEN_FDS`/`LISTEN_FDNAMES`).
//!
//! Activated sockets are sorted by what they are, not by their order: the
//! Unix socket whose name is `control` or whose path is the config's
//! `control` becomes the control socket; every other Unix or TCP socket
//! serves NBD. Without `NOTIFY_SOCKET` or `LISTEN_FDS` everything here is a
//! no-op, so the same binary runs under any supervisor.

use std::os::fd::{FromRawFd, IntoRawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sd_notify::NotifyState;

/// Sockets handed over by the service manager.
#[derive(Debug, Default)]
pub struct ActivatedSockets {
    /// NBD listeners: (socket, its path for Unix sockets).
    pub unix: Vec<(std::os::unix::net::UnixListener, PathBuf)>,
    pub tcp: Vec<std::net::TcpListener>,
    pub control: Option<(std::os::unix::net::UnixListener, PathBuf)>,
}

impl ActivatedSockets {
    pub fn is_empty(&self) -> bool {
        self.unix.is_empty() && self.tcp.is_empty() && self.control.is_none()
    }
}

/// Takes the sockets passed with `LISTEN_FDS` (none when not socket-activated).
pub fn activated_sockets(control_path: Option<&Path>) -> std::io::Result<ActivatedSockets> {
    let mut sockets = ActivatedSockets::default();
    for (fd, name) in sd_notify::listen_fds_with_names()? {
        // SAFETY: `fd` is one of the LISTEN_FDS descriptors (3..3+n) the
        // service manager passed to this process; nothing else in the
        // process owns or has wrapped it, and it is taken exactly once here.
        let unix = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
        match unix.local_addr() {
            Ok(addr) => {
                let path = addr
                    .as_pathname()
                    .map(Path::to_path_buf)
                    .unwrap_or_default();
                let is_control = name == "control" || control_path == Some(path.as_path());
                if is_control {
                    sockets.control = Some((unix, path));
                } else {
                    sockets.unix.push((unix, path));
                }
            }
            Err(_) => {
                let fd = unix.into_raw_fd();
                // SAFETY: the same descriptor, released from the Unix
                // wrapper just above without being closed: still owned once.
                sockets
                    .tcp
                    .push(unsafe { std::net::TcpListener::from_raw_fd(fd) });
            }
        }
    }
    Ok(sockets)
}

/// Tells the service manager we serve, with a status line.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `RELOADING=1` (with the monotonic time systemd ≥ 253 wants for
/// Type=notify-reload; older managers ignore it).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// `READY=1` after a reload.
pub fn ready_again() {
    send(&[NotifyState::Ready]);
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: draining in-flight requests"),
    ]);
}

/// The interval to send `WATCHDOG=1` at, when `WatchdogSec` is set.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|timeout| timeout / 2)
}

pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("sd_notify failed: {e}");
    }
}
