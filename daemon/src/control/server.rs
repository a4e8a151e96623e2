//! The daemon side of the control socket: bind it private (0600, or 0660
//! with `control_group`), check every peer with SO_PEERCRED (root, the
//! daemon's own uid, or a member of `control_group`), log each request with
//! the peer's uid and pid, and run it on a blocking thread (key providers
//! block; the async runtime must not).

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use super::protocol::{
    CheckResult, ConnectionStatus, IoStatus, KeyChange, Status, UnavailableStatus, VolumeStatus,
    MAX_REQUEST,
};
use super::{ControlRequest, ControlResponse};
use crate::service::registry::Registry;
use crate::service::reload::Reloader;
use crate::volume::LayerKek;

/// How long a peer may take to send its request line.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What control requests act on.
pub struct ControlState {
    pub started: Instant,
    pub engine: &'static str,
    pub registry: Registry,
    /// Config reloads, and the KEK providers configured now.
    pub reloader: Arc<Reloader>,
    pub allowed_gid: Option<u32>,
    /// `control_read_group`: may only read (`ControlRequest::is_read_only`).
    pub read_gid: Option<u32>,
    pub gate: Arc<crate::frontend::nbd::gate::Gate>,
    pub listeners: Vec<super::protocol::ListenerStatus>,
    /// Volumes attached as kernel block devices.
    pub attacher: Arc<crate::frontend::attach::Attacher>,
}

/// Binds the control socket, replacing a stale one, mode 0600 (0660 and
/// group-owned when `group` is set; 0666 with `open_to_readers`, when the
/// daemon's peer check alone decides).
pub fn bind(path: &Path, group: Option<u32>, open_to_readers: bool) -> io::Result<UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another daemon is answering on this control socket",
            ));
        }
        std::fs::remove_file(path)?;
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let listener = UnixListener::bind(path)?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(path, None, Some(gid))?;
    }
    let mode = if open_to_readers {
        0o666
    } else if group.is_some() {
        0o660
    } else {
        0o600
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// Resolves `control_group` (a name from /etc/group or a numeric gid).
pub fn resolve_group(group: &str) -> io::Result<u32> {
    crate::export::access::resolve_id(group, "/etc/group")
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no group named {group:?}")))
}

pub async fn run(
    listener: UnixListener,
    state: Arc<ControlState>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(serve(stream, state.clone()));
                }
                Err(e) => tracing::warn!("control socket accept: {e}"),
            },
        }
    }
}

async fn serve(stream: UnixStream, state: Arc<ControlState>) {
    let cred = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("control: cannot read peer credentials: {e}");
            return;
        }
    };
    let (uid, pid) = (cred.uid(), cred.pid().unwrap_or(0));
    let groups = crate::export::peer::peer_groups(std::os::unix::io::AsRawFd::as_raw_fd(&stream));
    let member = |gid: Option<u32>| gid.is_some_and(|g| cred.gid() == g || groups.contains(&g));
    let allowed = uid == 0 || uid == daemon_euid() || member(state.allowed_gid);
    let reader_only = !allowed && member(state.read_gid);
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read.take(MAX_REQUEST as u64));
    // The request is read before anything is answered, refusals included:
    // a client still writing when the socket closed would see EPIPE
    // instead of the reason. Bounded in size and time.
    let mut line = String::new();
    let read = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await;
    let response = match read {
        Err(_) => ControlResponse::error("no complete request line within 10 s"),
        Ok(Ok(0)) => return,
        Ok(Err(e)) => ControlResponse::error(format!("reading the request: {e}")),
        Ok(Ok(_)) if !allowed && !reader_only => {
            tracing::warn!(
                uid,
                pid,
                "control: refused a peer that is neither root nor in control_group"
            );
            ControlResponse::error(
                "permission denied: only root or members of control_group may use the control socket",
            )
        }
        Ok(Ok(_)) => match serde_json::from_str::<ControlRequest>(&line) {
            Ok(request) if reader_only && !request.is_read_only() => {
                tracing::warn!(uid, pid, request = ?request, "control: refused a change from a member of control_read_group");
                ControlResponse::error(
                    "permission denied: control_read_group may only read (status, volumes, check-key); changes need root or control_group",
                )
            }
            Ok(request) => {
                tracing::info!(uid, pid, request = ?request, "control request");
                let state = state.clone();
                tokio::task::spawn_blocking(move || match request {
                    ControlRequest::CheckKey { volume } if reader_only => {
                        cached_check_key(&state, volume)
                    }
                    request => handle(&state, request, uid),
                })
                .await
                .unwrap_or_else(|e| ControlResponse::error(format!("request failed: {e}")))
            }
            Err(e) => ControlResponse::error(format!("malformed request: {e}")),
        },
    };
    let mut text = serde_json::to_string(&response).unwrap_or_else(|_| "{\"ok\":false}".into());
    text.push('\n');
    let _ = write.write_all(text.as_bytes()).await;
}

/// The daemon's effective uid (a plain getter; no memory is touched).
fn daemon_euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// `check-key` over the volumes it names: `check` decides each one.
fn check_key(
    state: &ControlState,
    volume: Option<String>,
    check: impl Fn(&crate::service::registry::Served, &crate::volume::VolumeKeys) -> Result<(), String>,
) -> ControlResponse {
    let mut results = Vec::new();
    for export in state.registry.iter() {
        if volume.as_deref().is_some_and(|v| v != export.name()) {
            continue;
        }
        let Some(keys) = &export.keys else { continue };
        let outcome = check(&export, keys);
        let status = keys.status();
        results.push(CheckResult {
            volume: export.name().to_owned(),
            ok: outcome.is_ok(),
            error: outcome.err(),
            state: status.state,
            warnings: status.warnings,
        });
    }
    if let Some(v) = &volume {
        if results.is_empty() {
            return ControlResponse::error(unknown_volume(state, v));
        }
    }
    ControlResponse::ok(results)
}

/// `check-key` for `control_read_group`: the outcome of the last periodic
/// check, with no provider call. A live check may rotate a key
/// (`auto_rotate`) or declare it lost and stop I/O: changes a reader must
/// not be able to time.
fn cached_check_key(state: &ControlState, volume: Option<String>) -> ControlResponse {
    check_key(state, volume, |export, keys| {
        if let Some(failure) = export.volume.data.failure() {
            return Err(failure.to_owned());
        }
        let status = keys.status();
        match (status.state.as_str(), status.last_error) {
            (_, Some(e)) => Err(e),
            ("serving", None) => Ok(()),
            (other, None) => Err(format!("the key is {other}")),
        }
    })
}

/// Runs one request (blocking: providers may talk to remote servers).
pub fn handle(state: &ControlState, request: ControlRequest, uid: u32) -> ControlResponse {
    let uid = Some(uid);
    match request {
        ControlRequest::Status => ControlResponse::ok(status(state)),
        ControlRequest::Attach { .. } | ControlRequest::Detach { .. } if uid != Some(0) => {
            ControlResponse::error(
                "attach and detach are root's: the device they make holds the plaintext",
            )
        }
        ControlRequest::Attach { volume, via } => match state.attacher.attach(&volume, via) {
            Ok(attached) => ControlResponse::ok(vec![attached]),
            Err(e) => ControlResponse::error(e),
        },
        ControlRequest::Detach { volume, force } => match state.attacher.detach(&volume, force) {
            Ok(detached) => ControlResponse::ok(vec![detached]),
            Err(e) => ControlResponse::error(e),
        },
        ControlRequest::Attached => ControlResponse::ok(state.attacher.list()),
        ControlRequest::CheckKey { volume } => check_key(state, volume, |export, keys| {
            // A key that unwraps says nothing of a backing that is gone.
            export
                .volume
                .data
                .check_backing()
                .map_err(|e| e.to_string())
                .and_then(|()| keys.check(uid).map_err(|e| e.to_string()))
        }),
        ControlRequest::RotateKek {
            volume,
            to_version,
            layer,
        } => match find_keys(state, &volume) {
            Err(e) => ControlResponse::error(e),
            Ok(keys) => match keys.rotate(layer, to_version.as_deref(), uid) {
                Ok(kek) => ControlResponse::ok(KeyChange { volume, layer, kek }),
                Err(e) => ControlResponse::error(e),
            },
        },
        ControlRequest::Reencrypt {
            volume,
            action,
            rate_mbps,
        } => match find_keys(state, &volume) {
            Err(e) => ControlResponse::error(e),
            Ok(keys) => match keys.reencrypt(action, rate_mbps, uid) {
                Ok(status) => ControlResponse::ok(status),
                Err(e) => ControlResponse::error(e),
            },
        },
        ControlRequest::Reload => match state.reloader.reload() {
            Ok(report) => ControlResponse::ok(report),
            Err(e) => ControlResponse::error(crate::report::error_chain(&e)),
        },
        ControlRequest::Rekey { volume, kek, layer } => {
            let Some(provider) = state.reloader.provider(&kek) else {
                return ControlResponse::error(format!(
                    "no [kek.{kek}] is configured in the running daemon; add it and restart"
                ));
            };
            match find_keys(state, &volume) {
                Err(e) => ControlResponse::error(e),
                Ok(keys) => match keys.rekey(
                    layer,
                    LayerKek {
                        name: kek,
                        provider,
                    },
                    uid,
                ) {
                    Ok(kek) => ControlResponse::ok(KeyChange { volume, layer, kek }),
                    Err(e) => ControlResponse::error(e),
                },
            }
        }
    }
}

fn find_keys(state: &ControlState, volume: &str) -> Result<Arc<crate::volume::VolumeKeys>, String> {
    let export = state
        .registry
        .iter()
        .find(|e| e.name() == volume)
        .ok_or_else(|| unknown_volume(state, volume))?;
    export
        .keys
        .clone()
        .ok_or_else(|| format!("volume {volume:?} is a temp volume: its key is never stored, so there is nothing to rotate"))
}

fn unknown_volume(state: &ControlState, volume: &str) -> String {
    let names: Vec<_> = state.registry.iter().map(|e| e.name().to_owned()).collect();
    format!(
        "no volume {volume:?} is served (volumes: {})",
        names.join(", ")
    )
}

fn status(state: &ControlState) -> Status {
    Status {
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_secs: state.started.elapsed().as_secs(),
        engine: state.engine.into(),
        listeners: state.listeners.clone(),
        tls: state.gate.tls().map(|t| t.info.clone()),
        connections: connection_status(&state.gate),
        attached: state.attacher.list(),
        volumes: state
            .registry
            .iter()
            .map(|e| VolumeStatus {
                name: e.name().to_owned(),
                role: e.volume.role.to_string(),
                size: e.size(),
                sector_size: e.volume.data.sector_size(),
                allow: e.allow.load().describe(),
                refused: e.metrics.refused(),
                clients: e.clients.list(),
                key: e.keys.as_ref().map(|k| k.status()),
                io: io_status(&e),
                reencrypt: e
                    .keys
                    .as_ref()
                    .map(|k| k.reencrypt_status())
                    .filter(|r| r.target_generation.is_some()),
                unavailable: None,
                backing: e.volume.data.backing().remote().map(|r| r.status()),
                write_back_error: e.volume.data.backing().write_back_error(),
                failed: e.volume.data.failure().map(str::to_owned),
            })
            .chain(state.registry.unavailable().iter().map(|u| VolumeStatus {
                name: u.name.clone(),
                role: "-".into(),
                size: 0,
                sector_size: 0,
                allow: u.allow.describe(),
                refused: 0,
                clients: Vec::new(),
                unavailable: Some(UnavailableStatus {
                    state: u.state.as_str().into(),
                    error: u.reason.clone(),
                    since: u.since,
                }),
                key: None,
                io: IoStatus::default(),
                reencrypt: None,
                backing: None,
                write_back_error: None,
                failed: None,
            }))
            .collect(),
    }
}

fn connection_status(gate: &crate::frontend::nbd::gate::Gate) -> ConnectionStatus {
    use std::sync::atomic::Ordering::Relaxed;
    let c = &gate.counters;
    ConnectionStatus {
        open: gate.open_connections(),
        max: gate.settings.max_connections,
        max_per_peer: gate.settings.max_connections_per_peer,
        refused_limit: c.refused_limit.load(Relaxed),
        refused_tls_required: c.tls_required.load(Relaxed),
        tls_failures: c.tls_failures.load(Relaxed),
        handshake_failures: c.handshake_failures.load(Relaxed),
        reply_bytes_pending: gate.replies.pending_bytes(),
        reply_memory: gate.replies.limit_bytes(),
    }
}

fn io_status(export: &crate::export::Export) -> IoStatus {
    let mut io = IoStatus {
        connections: export.metrics.connections(),
        in_flight: export.metrics.in_flight(),
        ..IoStatus::default()
    };
    for c in export.metrics.commands() {
        io.errors += c.errors;
        match c.name {
            "read" => (io.read_ops, io.read_bytes) = (c.requests, c.bytes),
            "write" => (io.write_ops, io.write_bytes) = (c.requests, c.bytes),
            _ => {}
        }
    }
    io
}
