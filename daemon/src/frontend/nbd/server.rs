//! Listening sockets and the accept loop: each accepted socket is admitted
//! by the gate (connection limits) or closed at once, then gets one task
//! (`connection.rs`); at shutdown, a bounded drain of live connections.

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::connection::{self, Accepted, Server};
use super::gate::Gate;
use crate::export::peer::Peer;
/// How long shutdown waits for in-flight requests before dropping connections.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);
/// Send buffer asked for on accepted Unix sockets (the kernel doubles it
/// for its bookkeeping): room for a few 1 MiB read replies, so a large
/// reply goes out at once instead of in pieces with the writer task
/// waking for each (benches/results/history.md, "Wide send buffers on Unix sockets").
const UNIX_SEND_BUFFER: libc::c_int = 4 << 20;

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

/// The NBD frontend as the daemon starts it: bound listeners and the gate
/// (limits, TLS credentials) they admit through.
pub struct NbdFrontend {
    pub listeners: Vec<Listener>,
    pub gate: Arc<Gate>,
}

impl crate::frontend::Frontend for NbdFrontend {
    fn name(&self) -> &'static str {
        "nbd"
    }

    fn start(self: Box<Self>, context: crate::frontend::Context) -> crate::frontend::Running {
        let server = Arc::new(Server {
            exports: context.exports,
            gate: self.gate,
            engine: context.engine,
        });
        let task = tokio::spawn(run(self.listeners, server, context.shutdown));
        crate::frontend::Running::new("nbd", task)
    }
}

/// Accepts connections on every listener until `shutdown` turns true, then
/// waits (bounded) for connections to finish their in-flight requests.
pub async fn run(listeners: Vec<Listener>, server: Arc<Server>, shutdown: watch::Receiver<bool>) {
    let mut accept_loops = JoinSet::new();
    for listener in listeners {
        accept_loops.spawn(accept_loop(listener, server.clone(), shutdown.clone()));
    }
    while accept_loops.join_next().await.is_some() {}
}

async fn accept_loop(listener: Listener, server: Arc<Server>, mut shutdown: watch::Receiver<bool>) {
    let gate = &server.gate;
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            // Reap finished connections so the set does not grow forever.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = accept(&listener) => match accepted {
                Ok((stream, peer)) => match gate.admit(peer.key(), stream.transport()) {
                    Ok(slot) => {
                        connections.spawn(connection::run(
                            stream,
                            peer,
                            server.clone(),
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

/// Serves one end of a socketpair whose other end the daemon hands to the
/// kernel's NBD client (`frontend/attach/`), as a Unix connection from
/// [`Peer::kernel`], admitted through the same gate. Returns when the
/// connection ends (the kernel or the daemon closed it) or at shutdown.
pub async fn serve_kernel(
    server: Arc<Server>,
    stream: std::os::unix::net::UnixStream,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    stream.set_nonblocking(true)?;
    let stream = tokio::net::UnixStream::from_std(stream)?;
    widen_send_buffer(&stream);
    let peer = Peer::kernel();
    let slot = server
        .gate
        .admit(peer.key(), super::gate::Transport::Unix)
        .map_err(|refusal| std::io::Error::other(refusal.to_string()))?;
    connection::run(Accepted::Unix(stream), peer, server, shutdown, slot).await;
    Ok(())
}

async fn accept(listener: &Listener) -> std::io::Result<(Accepted, Peer)> {
    match listener {
        Listener::Unix { listener, .. } => {
            let (s, _) = listener.accept().await?;
            widen_send_buffer(&s);
            let peer = Peer::unix(&s);
            Ok((Accepted::Unix(s), peer))
        }
        Listener::Tcp(l) => {
            let (s, a) = l.accept().await?;
            let _ = s.set_nodelay(true);
            Ok((Accepted::Tcp(s), Peer::tcp(a)))
        }
    }
}

/// Gives a Unix connection `UNIX_SEND_BUFFER`: SO_SNDBUFFORCE where we
/// hold CAP_NET_ADMIN, else SO_SNDBUF, which the kernel caps at
/// `net.core.wmem_max`. Says so once when the cap bites. TCP keeps the
/// kernel's autotuning, which setting a size would turn off.
fn widen_send_buffer(socket: &tokio::net::UnixStream) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static CAPPED_SAID: AtomicBool = AtomicBool::new(false);
    let granted = send_buffer_widened(socket.as_raw_fd());
    if granted.is_some_and(|got| got < UNIX_SEND_BUFFER)
        && !CAPPED_SAID.swap(true, Ordering::Relaxed)
    {
        tracing::info!(
            granted,
            wanted = UNIX_SEND_BUFFER,
            "net.core.wmem_max caps the send buffer of NBD Unix sockets; large reads \
             are faster with it raised (systemd/99-hostcrypt.conf)"
        );
    }
}

/// Asks for `UNIX_SEND_BUFFER` on socket `fd`; the size granted, when it
/// can be read back.
fn send_buffer_widened(fd: RawFd) -> Option<libc::c_int> {
    const LEN: libc::socklen_t = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    let set = |option| {
        // SAFETY: `fd` is an open socket; the value is a live c_int of LEN bytes.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                (&UNIX_SEND_BUFFER as *const libc::c_int).cast(),
                LEN,
            ) == 0
        }
    };
    if !set(libc::SO_SNDBUFFORCE) {
        set(libc::SO_SNDBUF);
    }
    let (mut got, mut len): (libc::c_int, _) = (0, LEN);
    // SAFETY: `got` and `len` are live and sized for one c_int.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&mut got as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    // The kernel reports twice what it granted (the rest is its bookkeeping).
    (rc == 0).then_some(got / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Unix socket gets the buffer asked for, up to what the kernel
    /// lets this process have (all of it as root).
    #[test]
    fn unix_connections_get_a_wide_send_buffer() {
        let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let cap = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .ok()
            .and_then(|v| v.trim().parse::<libc::c_int>().ok())
            .unwrap_or(0);
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let expected = if root {
            UNIX_SEND_BUFFER
        } else {
            UNIX_SEND_BUFFER.min(cap)
        };
        let granted = send_buffer_widened(ours.as_raw_fd()).unwrap();
        assert!(
            granted >= expected,
            "granted {granted}, expected {expected}"
        );
    }
}
