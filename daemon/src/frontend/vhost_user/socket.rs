//! One export's vhost-user socket: binding it (its group and mode; the
//! file is put in place by `bind.rs`), the accept loop, the peer check,
//! and one connection's life. A connection is admitted only when its
//! volume is served and its peer (SO_PEERCRED, SO_PEERGROUPS) passes the
//! volume's `allow` list, the same rules as the NBD Unix listener; only
//! then does vhost-user-backend read a message from it
//! (`VhostUserDaemon::start_stream`, see
//! third_party/vhost-user-backend/HOSTCRYPT.md). One client at a time: a
//! vhost-user-blk device belongs to one VMM; a second connection is closed
//! at once while the first lasts.
//!
//! A connection runs on its own threads: vhost-user-backend's message
//! loop and one worker per virtqueue (`backend.rs`). It ends when the
//! client hangs up, the daemon stops, or a reload removes the volume
//! (its retirement), each of which shuts the socket down. Requests it
//! leaves running (past DRAIN_TIMEOUT) are handed on: the next
//! connection resubmits nothing until they have finished.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use super::backend::BlockBackend;
use super::device::Device;
use super::guest::Memory;
use super::inflight::InFlight;
use super::spec::{SocketSpec, VhostUserError};
use crate::export::peer::{may_log_refusal, Peer};
use crate::export::{Export, Exports};

/// How long a new client waits for the previous one's connection to end.
const HANDOVER: Duration = Duration::from_secs(2);
/// How long a closing connection's running requests may take.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

/// A bound socket, not yet accepting.
pub(super) struct Bound {
    pub spec: SocketSpec,
    pub listener: std::os::unix::net::UnixListener,
}

/// Binds `spec.path` with the configured group and mode (`bind.rs`:
/// a stale socket file left by a crash is replaced, nothing else).
pub(super) fn bind(spec: SocketSpec) -> Result<Bound, VhostUserError> {
    match super::bind::listen(&spec.path, spec.mode, spec.group) {
        Ok(listener) => Ok(Bound { spec, listener }),
        Err(source) => Err(VhostUserError::Bind {
            path: spec.path,
            source,
        }),
    }
}

/// Accepts on one socket until `shutdown`, then ends the connection and
/// removes the socket file.
pub(super) async fn serve(
    bound: Bound,
    exports: Exports,
    mut shutdown: watch::Receiver<bool>,
    idle_poll: Duration,
) {
    let Bound { spec, listener } = bound;
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(socket = %spec.path.display(), "vhost-user socket: {e}");
            return;
        }
    };
    let mut current: Option<tokio::task::JoinHandle<()>> = None;
    // Earlier connections' requests that may still be running.
    let mut earlier: Vec<Arc<InFlight>> = Vec::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    // A client that reconnects at once may find its old
                    // connection still closing: give that a moment.
                    if let Some(session) = current.as_mut().filter(|c| !c.is_finished()) {
                        if tokio::time::timeout(HANDOVER, session).await.is_ok() {
                            // Awaited to its end: never poll it again.
                            current = None;
                        }
                    }
                    if current.as_ref().is_some_and(|c| !c.is_finished()) {
                        if may_log_refusal() {
                            tracing::warn!(
                                volume = spec.volume,
                                peer = %Peer::unix(&stream),
                                "vhost-user client refused: the device already has a client"
                            );
                        }
                        continue;
                    }
                    let Some((export, peer)) = admit(&spec, &exports, &stream) else {
                        continue;
                    };
                    earlier.retain(|e| !e.wait_idle(Duration::ZERO));
                    match start(stream, export, &spec, peer, shutdown.clone(), &mut earlier, idle_poll) {
                        Ok(session) => current = Some(session),
                        Err(e) => tracing::warn!(volume = spec.volume, "vhost-user client: {e}"),
                    }
                }
                Err(e) => {
                    tracing::warn!(socket = %spec.path.display(), "vhost-user accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    remove_socket(&spec.path);
    if let Some(session) = current {
        if tokio::time::timeout(DRAIN_TIMEOUT * 2, session)
            .await
            .is_err()
        {
            tracing::warn!(
                volume = spec.volume,
                "vhost-user client still busy at shutdown"
            );
        }
    }
}

fn remove_socket(path: &Path) {
    let _ = std::fs::remove_file(path);
}

/// The export a new client may use, and who it is; `None` (logged, at a
/// bounded rate) when the volume is not served or the peer not allowed.
fn admit(
    spec: &SocketSpec,
    exports: &Exports,
    stream: &tokio::net::UnixStream,
) -> Option<(Arc<Export>, Peer)> {
    let peer = Peer::unix(stream);
    let export = exports
        .find(&spec.volume)
        .filter(|e| !e.retirement.is_retired());
    let Some(export) = export else {
        if may_log_refusal() {
            let why = exports
                .find_unavailable(&spec.volume)
                .map(|u| format!("{}: {}", u.state, u.reason))
                .unwrap_or_else(|| "not served".into());
            tracing::warn!(volume = spec.volume, peer = %peer, "vhost-user client refused: the volume is {why}");
        }
        return None;
    };
    if !export.allow.load().permits(&peer) {
        export.metrics.refuse();
        if may_log_refusal() {
            tracing::warn!(volume = spec.volume, peer = %peer, "vhost-user client refused: not in the volume's allow list");
        }
        return None;
    }
    Some((export, peer))
}

/// Starts serving an admitted client on threads of its own; the task
/// returned ends when the connection has ended and its requests drained.
/// `earlier`: the connections before it whose requests may still run;
/// this one is added.
fn start(
    stream: tokio::net::UnixStream,
    export: Arc<Export>,
    spec: &SocketSpec,
    peer: Peer,
    mut shutdown: watch::Receiver<bool>,
    earlier: &mut Vec<Arc<InFlight>>,
    idle_poll: Duration,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    let closer = stream.try_clone()?;
    let device = Device::new(
        export.name(),
        export.size(),
        export.volume.data.sector_size() as u32,
        spec.queues,
        spec.read_only,
        export.allow_discards,
    );
    let mut retired = export.retirement.watch();
    let (ended, mut has_ended) = oneshot::channel();
    let peer = peer.to_string();
    let memory = GuestMemoryAtomic::new(GuestMemoryMmap::<()>::new());
    let backend = Arc::new(BlockBackend::new(
        export.clone(),
        device,
        memory.clone(),
        peer.clone(),
        earlier.clone(),
        idle_poll,
    )?);
    earlier.push(backend.in_flight());
    let queues = spec.queues;
    tracing::info!(
        volume = export.name(),
        peer,
        queues = spec.queues,
        "vhost-user client connected"
    );
    let closing = backend.clone();
    let thread = std::thread::Builder::new()
        .name("vhost-user".into())
        .spawn(move || {
            let name = export.name().to_owned();
            match run(stream, export, backend, memory, queues, &peer) {
                Ok(()) => tracing::info!(volume = name, peer, "vhost-user client disconnected"),
                Err(e) => tracing::warn!(volume = name, peer, "vhost-user client ended: {e}"),
            }
            let _ = ended.send(());
        })
        .inspect_err(|_| closing.close())?;
    Ok(tokio::spawn(async move {
        // A closed watch (its sender gone) is no reason to close.
        let close = tokio::select! {
            _ = &mut has_ended => false,
            Ok(_) = retired.wait_for(|r| *r) => true,
            Ok(_) = shutdown.wait_for(|s| *s) => true,
        };
        if close {
            // The message loop sees the hang-up; the workers stop when
            // vhost-user-backend drops the connection's handler.
            let _ = closer.shutdown(std::net::Shutdown::Both);
            let _ = has_ended.await;
        }
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }))
}

/// One connection, on this thread until it ends: vhost-user-backend's
/// message loop over `stream`, the device's queues on its worker threads.
fn run(
    stream: std::os::unix::net::UnixStream,
    export: Arc<Export>,
    backend: Arc<BlockBackend>,
    memory: Memory,
    queues: u16,
    peer: &str,
) -> Result<(), VhostUserError> {
    use vhost::vhost_user::Error as Protocol;
    use vhost_user_backend::Error as Daemon;
    let counted = export.clone();
    let _connected = counted.metrics.connect();
    let _listed = counted.clients.register("vhost-user", peer, Some(queues));
    let session = |e: Daemon| VhostUserError::Session(e.to_string());
    let started = VhostUserDaemon::new("vhost-user".into(), backend.clone(), memory)
        .map_err(session)
        .and_then(|mut daemon| {
            // Before any message: a queue may start with the first ones.
            backend
                .register_restarts(&daemon.get_epoll_handlers())
                .map_err(|e| VhostUserError::Session(format!("queue restart events: {e}")))?;
            daemon.start_stream(stream).map_err(session)?;
            Ok(daemon)
        });
    let mut daemon = match started {
        Ok(daemon) => daemon,
        Err(e) => {
            // Ends the backend's notifier thread.
            backend.close();
            return Err(e);
        }
    };
    let result = daemon.wait();
    // Before the workers are told to exit: one waiting for the budget
    // gives up, and late completions write nothing (the frontend may
    // already have handed the guest's memory to a new connection).
    backend.close();
    // Dropping the daemon signals the queue workers' exit events.
    drop(daemon);
    if !backend.drain(DRAIN_TIMEOUT) {
        tracing::warn!(
            peer,
            "vhost-user requests still running after {DRAIN_TIMEOUT:?}"
        );
    }
    match result {
        Ok(())
        | Err(Daemon::HandleRequest(Protocol::Disconnected))
        | Err(Daemon::HandleRequest(Protocol::PartialMessage)) => Ok(()),
        Err(e) => Err(session(e)),
    }
}
