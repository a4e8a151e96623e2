//! One connection's life: greeting and option haggling, the STARTTLS
//! upgrade when the client asks (option haggling then goes on inside TLS),
//! then the transmission phase on whichever stream came out — all under
//! one handshake deadline, so a client that stalls anywhere before
//! transmission (mid-TLS included) holds no more than a task and a socket.
//!
//! Plaintext connections on the io_uring engine are then served by a ring
//! (`ring_reader.rs`) unless `ring_connections = false`; all others by a
//! tokio task (`transmission.rs`).
//!
//! Listening and limits are `server.rs` and `gate.rs`; the options
//! themselves `handshake.rs`.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;

use super::gate::{Admitted, Gate};
use super::handshake::{greet, negotiate, HandshakeError, Negotiated, Session, TlsPhase};
use super::ring_reader::serve_on_ring;
use super::transmission::serve;
use crate::export::peer::Peer;
use crate::export::{Export, Exports};
use crate::frontend::tls::{self, TlsContext, TlsMode};
use crate::io::engine::Engine;
use crate::wire::nbd::Features;

/// An accepted socket, before the handshake.
pub enum Accepted {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

impl Accepted {
    /// Which kind of listener it came from, for the gate's reserves.
    pub fn transport(&self) -> super::gate::Transport {
        match self {
            Accepted::Unix(_) => super::gate::Transport::Unix,
            Accepted::Tcp(_) => super::gate::Transport::Tcp,
        }
    }
}

/// What the handshake left ready for transmission.
enum Ready<S> {
    Plain(S, Arc<Export>, Features),
    Tls(Box<TlsStream<S>>, Arc<Export>, Features),
    Closed,
}

#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("client was told TLS is required and left")]
    TlsRequired,
}

/// What every connection of one NBD server shares.
pub struct Server {
    pub exports: Exports,
    /// Limits and TLS credentials.
    pub gate: Arc<Gate>,
    /// Where plaintext connections' rings come from (io_uring).
    pub engine: Arc<Engine>,
}

pub async fn run(
    stream: Accepted,
    mut peer: Peer,
    server: Arc<Server>,
    shutdown: watch::Receiver<bool>,
    slot: Admitted,
) {
    let gate = &server.gate;
    // The credentials are fixed for this connection when it is accepted:
    // a reload changes what later connections get.
    let credentials = gate.tls();
    let phase = match (&credentials, gate.settings.tls_mode, &stream) {
        (None, _, _) | (_, TlsMode::Off, _) => TlsPhase::Unavailable,
        (Some(_), TlsMode::Require, Accepted::Tcp(_)) => TlsPhase::Offered { required: true },
        // Unix peers are known by SO_PEERCRED; TLS there is the client's choice.
        (Some(_), _, _) => TlsPhase::Offered { required: false },
    };
    let conn = Conn {
        phase,
        credentials: credentials.as_deref(),
        exports: &server.exports,
        gate,
        engine: &server.engine,
        shutdown,
        slot,
    };
    match stream {
        Accepted::Unix(s) => {
            let plain = Plain {
                split: tokio::net::UnixStream::into_split,
                into_fd: |s| s.into_std().map(OwnedFd::from),
            };
            conn.run(s, &mut peer, plain).await
        }
        Accepted::Tcp(s) => {
            let plain = Plain {
                split: tokio::net::TcpStream::into_split,
                into_fd: |s| s.into_std().map(OwnedFd::from),
            };
            conn.run(s, &mut peer, plain).await
        }
    }
}

/// How a plaintext stream of type `S` is taken apart for transmission:
/// into tokio halves, or out of tokio altogether for a ring.
struct Plain<S, R, W> {
    split: fn(S) -> (R, W),
    into_fd: fn(S) -> std::io::Result<OwnedFd>,
}

/// What one connection runs with, whatever its socket type.
struct Conn<'a> {
    phase: TlsPhase,
    credentials: Option<&'a TlsContext>,
    exports: &'a Exports,
    gate: &'a Gate,
    engine: &'a Engine,
    shutdown: watch::Receiver<bool>,
    /// Held for the connection's life; leaves the handshake pool once the
    /// handshake is done.
    slot: Admitted,
}

impl Conn<'_> {
    /// Handshake under the deadline, then transmission: a plaintext
    /// socket on a ring (with the io_uring engine) or on its own tokio
    /// halves, a TLS stream on its halves.
    async fn run<S, R, W>(mut self, stream: S, peer: &mut Peer, plain: Plain<S, R, W>)
    where
        S: AsyncRead + AsyncWrite + AsRawFd + Unpin + Send + 'static,
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let ready = tokio::time::timeout(
            self.gate.settings.handshake_timeout,
            handshake(stream, peer, self.phase, self.credentials, self.exports),
        )
        .await;
        let ready = settle(ready, peer, self.gate);
        if matches!(ready, Some(Ready::Plain(..) | Ready::Tls(..))) {
            self.slot.authenticated();
        }
        // A connection ends when the server stops or its export is retired.
        let stop = match &ready {
            Some(Ready::Plain(_, export, _) | Ready::Tls(_, export, _)) => {
                match stop_signal(self.shutdown.clone(), export.retirement.watch()) {
                    Some(stop) => stop,
                    None => return,
                }
            }
            _ => self.shutdown.clone(),
        };
        match ready {
            Some(Ready::Plain(s, export, features)) => {
                let on_ring = match self.engine {
                    Engine::Uring(rings) if self.gate.settings.ring_connections => {
                        Some(rings).filter(|rings| rings.receives_sockets())
                    }
                    _ => None,
                };
                if let Some(rings) = on_ring {
                    let socket = match (plain.into_fd)(s) {
                        Ok(socket) => socket,
                        Err(e) => {
                            tracing::warn!(peer = %peer, "cannot take the socket off tokio: {e}");
                            return;
                        }
                    };
                    tracing::info!(peer = %peer, export = export.name(), tls = "off", reader = "ring", "client connected");
                    let label = peer.to_string();
                    let served = serve_on_ring(
                        socket,
                        rings.clone(),
                        export.clone(),
                        features,
                        stop,
                        &label,
                        self.gate.reply_route(None),
                    )
                    .await;
                    return log_end(peer, &export, served);
                }
                // Replies may go straight to the plaintext socket.
                let fd = s.as_raw_fd();
                let (r, w) = (plain.split)(s);
                let channel = Channel {
                    peer,
                    tls: None,
                    route: self.gate.reply_route(Some(fd)),
                };
                transmit(r, w, (export, features), channel, stop).await
            }
            Some(Ready::Tls(s, export, features)) => {
                let session = tls::describe_session(s.get_ref().1);
                let (r, w) = tokio::io::split(*s);
                let channel = Channel {
                    peer,
                    tls: Some(session),
                    route: self.gate.reply_route(None),
                };
                transmit(r, w, (export, features), channel, stop).await
            }
            Some(Ready::Closed) | None => {}
        }
    }
}

/// One signal that turns true when either `shutdown` or `retired` does;
/// `None` when one already has (the connection should not start).
fn stop_signal(
    mut shutdown: watch::Receiver<bool>,
    mut retired: watch::Receiver<bool>,
) -> Option<watch::Receiver<bool>> {
    if *shutdown.borrow() || *retired.borrow() {
        return None;
    }
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => {}
            _ = retired.wait_for(|stop| *stop) => {}
            // The connection ended first.
            _ = tx.closed() => return,
        }
        let _ = tx.send(true);
    });
    Some(rx)
}

/// Logs and counts a handshake that did not reach transmission.
fn settle<S>(
    outcome: Result<Result<Ready<S>, ConnectError>, tokio::time::error::Elapsed>,
    peer: &Peer,
    gate: &Gate,
) -> Option<Ready<S>> {
    let counters = &gate.counters;
    let (counter, what) = match outcome {
        Ok(Ok(ready)) => return Some(ready),
        Ok(Err(ConnectError::TlsRequired)) => (
            &counters.tls_required,
            "refused: plaintext client on a listener that requires TLS".to_string(),
        ),
        Ok(Err(ConnectError::Handshake(e @ HandshakeError::ExportNameWithoutTls))) => {
            (&counters.tls_required, format!("refused: {e}"))
        }
        Ok(Err(e @ ConnectError::Tls(_))) => (&counters.tls_failures, format!("refused: {e}")),
        Ok(Err(e)) => (
            &counters.handshake_failures,
            format!("handshake failed: {e}; closing this connection"),
        ),
        Err(_) => (
            &counters.handshake_failures,
            "handshake timed out; closing this connection".to_string(),
        ),
    };
    Gate::count(counter);
    // Rate-limited: a client failing handshakes in a loop must not flood
    // the log (the counters still count every one).
    if crate::export::peer::may_log_refusal() {
        tracing::warn!(peer = %peer, "{what}");
    }
    None
}

async fn handshake<S>(
    mut stream: S,
    peer: &mut Peer,
    phase: TlsPhase,
    credentials: Option<&TlsContext>,
    exports: &Exports,
) -> Result<Ready<S>, ConnectError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let no_zeroes = greet(&mut stream).await?;
    let mut session = Session::new(peer, exports, phase, no_zeroes);
    match negotiate(&mut stream, &mut session).await? {
        Negotiated::Transmission(export, features) => {
            return Ok(Ready::Plain(stream, export, features))
        }
        Negotiated::Closed => return Ok(Ready::Closed),
        Negotiated::Refused => return Err(ConnectError::TlsRequired),
        Negotiated::StartTls => {}
    }
    let Some(credentials) = credentials else {
        // negotiate only acknowledges STARTTLS when credentials exist.
        return Ok(Ready::Closed);
    };
    let mut tls = credentials
        .acceptor
        .accept(stream)
        .await
        .map_err(ConnectError::Tls)?;
    peer.dn = tls::peer_subject(tls.get_ref().1);
    // Nothing negotiated before STARTTLS carries over, as the protocol
    // requires: a fresh session.
    let mut session = Session::new(peer, exports, TlsPhase::Active, no_zeroes);
    match negotiate(&mut tls, &mut session).await? {
        Negotiated::Transmission(export, features) => {
            Ok(Ready::Tls(Box::new(tls), export, features))
        }
        Negotiated::Closed | Negotiated::Refused | Negotiated::StartTls => Ok(Ready::Closed),
    }
}

/// Who a transmission serves and over what.
struct Channel<'a> {
    peer: &'a Peer,
    /// The TLS session's description, or `None` for plaintext.
    tls: Option<String>,
    /// How replies leave: the plaintext socket for replies sent without
    /// the writer task, the reply timeout and the daemon-wide budget.
    route: super::ReplyRoute,
}

async fn transmit<R, W>(
    reader: R,
    writer: W,
    (export, features): (Arc<Export>, Features),
    Channel { peer, tls, route }: Channel<'_>,
    shutdown: watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let tls = tls.as_deref().unwrap_or("off");
    tracing::info!(peer = %peer, export = export.name(), tls, reader = "task", "client connected");
    let label = peer.to_string();
    let served = serve(
        reader,
        writer,
        route,
        export.clone(),
        features,
        shutdown,
        &label,
    )
    .await;
    log_end(peer, &export, served)
}

fn log_end(peer: &Peer, export: &Export, served: std::io::Result<()>) {
    match served {
        Ok(()) => tracing::info!(peer = %peer, export = export.name(), "client disconnected"),
        Err(e) => tracing::warn!(peer = %peer, export = export.name(), "connection ended: {e}"),
    }
}
