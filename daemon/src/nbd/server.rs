//! Listening sockets and the accept loop: each accepted socket is admitted
//! by the gate (connection limits) or closed at once, then gets one task
//! (`connection.rs`); at shutdown, a bounded drain of live connections.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::connection::{self, Stream};
use super::exports::Exports;
use super::gate::Gate;
use super::peer::Peer;
/// How long shutdown waits for in-flight requests before dropping connections.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

pub enum Listener {
    Unix {
        listener: UnixListener,
        path: PathBuf,
        /// Whether we bound it (and so remove the socket file at shutdown);
        /// a socket passed in by systemd belongs to systemd.
        owned: bool,
    },
    Tcp(TcpListener),
}

impl Listener {
    /// Binds a Unix socket, replacing a stale socket file left by a crash
    /// but refusing to remove anything that is not a socket.
    pub fn bind_unix(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::FileTypeExt;
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running server", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let listener = UnixListener::bind(path)?;
        Ok(Listener::Unix {
            listener,
            path: path.to_owned(),
            owned: true,
        })
    }

    /// Wraps a listening Unix socket passed in by the service manager.
    pub fn from_std_unix(
        listener: std::os::unix::net::UnixListener,
        path: PathBuf,
    ) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(Listener::Unix {
            listener: UnixListener::from_std(listener)?,
            path,
            owned: false,
        })
    }

    /// Wraps a listening TCP socket passed in by the service manager.
    pub fn from_std_tcp(listener: std::net::TcpListener) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(Listener::Tcp(TcpListener::from_std(listener)?))
    }

    pub async fn bind_tcp(addr: &str) -> std::io::Result<Self> {
        Ok(Listener::Tcp(TcpListener::bind(addr).await?))
    }

    pub fn is_tcp(&self) -> bool {
        matches!(self, Listener::Tcp(_))
    }

    pub fn describe(&self) -> String {
        match self {
            Listener::Unix { path, .. } => format!("unix:{}", path.display()),
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("tcp:{a}"),
                Err(_) => "tcp:?".into(),
            },
        }
    }
}

/// Accepts connections on every listener until `shutdown` turns true, then
/// waits (bounded) for connections to finish their in-flight requests.
pub async fn run(
    listeners: Vec<Listener>,
    exports: Exports,
    gate: Arc<Gate>,
    shutdown: watch::Receiver<bool>,
) {
    let exports = Arc::new(exports);
    let mut accept_loops = JoinSet::new();
    for listener in listeners {
        accept_loops.spawn(accept_loop(
            listener,
            exports.clone(),
            gate.clone(),
            shutdown.clone(),
        ));
    }
    while accept_loops.join_next().await.is_some() {}
}

async fn accept_loop(
    listener: Listener,
    exports: Arc<Exports>,
    gate: Arc<Gate>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            // Reap finished connections so the set does not grow forever.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = accept(&listener) => match accepted {
                Ok((stream, peer)) => match gate.admit(peer.key()) {
                    Ok(slot) => {
                        connections.spawn(connection::run(
                            stream,
                            peer,
                            gate.clone(),
                            exports.clone(),
                            shutdown.clone(),
                            slot,
                        ));
                    }
                    // Closed at once: a client over the limit gets no greeting.
                    Err(refusal) => {
                        Gate::count(&gate.counters.refused_limit);
                        tracing::warn!(peer = %peer, "refused: {refusal}");
                    }
                },
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listener = listener.describe(), "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    if let Listener::Unix {
        path, owned: true, ..
    } = &listener
    {
        let _ = std::fs::remove_file(path);
    }
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("connections still busy after {DRAIN_TIMEOUT:?}; closing them");
        connections.abort_all();
    }
}

async fn accept(listener: &Listener) -> std::io::Result<(Stream, Peer)> {
    match listener {
        Listener::Unix { listener, .. } => {
            let (s, _) = listener.accept().await?;
            let peer = Peer::unix(&s);
            Ok((Stream::Unix(s), peer))
        }
        Listener::Tcp(l) => {
            let (s, a) = l.accept().await?;
            let _ = s.set_nodelay(true);
            Ok((Stream::Tcp(s), Peer::tcp(a)))
        }
    }
}
