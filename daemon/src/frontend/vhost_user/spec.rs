//! What the daemon hands the vhost-user frontend for each socket
//! ([`SocketSpec`], built from a `[[volume]]`'s `vhost_user*` keys by
//! `daemon/vhost_user.rs`), and the frontend's errors. Plain data, so the
//! config can name it without knowing how a socket is served.

use std::path::PathBuf;

use super::bind::BindError;

/// One volume's vhost-user socket, as the daemon configures it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketSpec {
    /// The volume (export name) the socket serves.
    pub volume: String,
    pub path: PathBuf,
    /// Virtqueues offered, 1 to `MAX_QUEUES`.
    pub queues: u16,
    /// Permission bits of the socket file.
    pub mode: u32,
    /// Group of the socket file, if not the daemon's.
    pub group: Option<u32>,
    /// Offer the device read-only (VIRTIO_BLK_F_RO).
    pub read_only: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    #[error("vhost-user socket {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("vhost-user socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: BindError,
    },
    #[error("vhost-user session: {0}")]
    Session(String),
}
