//! A plaintext connection whose requests are received on an io_uring ring:
//! with the io_uring engine and `ring_connections` (on by default), each
//! accepted connection is placed on the ring with the fewest connections
//! and stays there. Its receives, the
//! cached reads and the backing reads its requests start, their decryption
//! and their replies (`replies.rs` sends from the completing thread) all run
//! on that ring's thread; nothing crosses threads on the read path unless
//! the socket is full.
//!
//! The reader is a small state machine that owns itself: it moves into
//! each receive's continuation and comes back with the buffer, so it needs
//! no lock. What it does with a header is `transmission::admit`'s
//! decision, shared with the tokio reader, which still serves TLS
//! connections (no kernel TLS here: the `tls` ULP is not available) and
//! the thread-pool engine.
//!
//! The socket leaves tokio's reactor: replies that cannot be sent at
//! once go through a writer task that watches it for writability only.
//!
//! Waiting for the byte budgets (`budget.rs`) is the one thing a ring
//! cannot do: the reader then moves into a tokio task that waits for the
//! permit and sends it back to its ring, or ends the reader when the
//! connection broke or the server stops first. Shutdown marks the reader
//! stopping and shuts the socket's read side, which ends a receive in
//! flight.
//!
//! What lives elsewhere: framing decisions and replies
//! (`transmission.rs`), reply sending (`replies.rs`), the ring
//! (`io/uring.rs`).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncWrite, Interest};
use tokio::sync::{oneshot, watch};

use super::budget::{Budget, Permit, Units};
use super::replies::{send_now, ReplyRoute, ReplySink};
use super::transmission::{admit, handle, handle_write, Ctx, Next, READ_BUFFER};
use crate::export::Export;
use crate::io::uring::{Ring, UringEngine};
use crate::io::IoBuf;
use crate::wire::nbd::{Features, Request, EXTENDED_REQUEST_LEN};

/// What the reader is in the middle of.
enum Stage {
    Headers,
    /// Dropping a refused payload; then the error reply.
    Discard {
        ctx: Ctx,
        left: u64,
        code: u32,
    },
    /// Collecting a write's payload, budget already taken.
    Payload {
        ctx: Ctx,
        data: IoBuf,
        got: usize,
        permit: Permit,
    },
}

/// A request waiting for its share of the byte budget.
enum Waiting {
    Handle(Ctx),
    Write(Ctx, usize),
    Fail(Ctx, u32),
}

struct RingReader {
    fd: RawFd,
    /// Keeps `fd` open for as long as the reader may receive on it.
    _socket: Arc<OwnedFd>,
    /// Received bytes not yet parsed are `input[start..end]`; `None` while
    /// the kernel holds the buffer.
    input: Option<IoBuf>,
    start: usize,
    end: usize,
    stage: Stage,
    header_len: usize,
    export: Arc<Export>,
    features: Features,
    sink: Arc<ReplySink>,
    budget: Budget,
    peer: String,
    stopping: Arc<AtomicBool>,
    /// The server's stop signal, for a wait for budget on a tokio task.
    shutdown: watch::Receiver<bool>,
    ended: Option<oneshot::Sender<io::Result<()>>>,
    runtime: tokio::runtime::Handle,
    engine: Arc<UringEngine>,
    worker: usize,
}

/// Serves a plaintext connection (`socket`, taken off tokio) with its
/// requests received on one of `engine`'s rings, until the client leaves,
/// sends garbage, or the server shuts down; then waits for the replies
/// still owed.
pub async fn serve_on_ring(
    socket: OwnedFd,
    engine: Arc<UringEngine>,
    export: Arc<Export>,
    features: Features,
    mut shutdown: watch::Receiver<bool>,
    peer: &str,
    route: ReplyRoute,
) -> io::Result<()> {
    let counted = export.clone();
    let _connected = counted.metrics.connect();
    let _listed = counted.clients.register("nbd", peer, None);
    let socket = Arc::new(socket);
    let fd = socket.as_raw_fd();
    let writer = SocketWriter {
        socket: socket.clone(),
        waiting: None,
    };
    let budget = Budget::new(route.memory.clone());
    let route = ReplyRoute {
        direct: Some(fd),
        ..route
    };
    let (sink, replies) = ReplySink::start(writer, route);
    let stopping = Arc::new(AtomicBool::new(false));
    let (ended, mut done) = oneshot::channel();
    let placement = engine.place_connection();
    let worker = placement.worker;
    let reader = Box::new(RingReader {
        fd,
        _socket: socket.clone(),
        input: Some(IoBuf::new(READ_BUFFER)),
        start: 0,
        end: 0,
        stage: Stage::Headers,
        header_len: Request::header_len(features.extended),
        export,
        features,
        sink,
        budget,
        peer: peer.to_owned(),
        stopping: stopping.clone(),
        shutdown: shutdown.clone(),
        ended: Some(ended),
        runtime: tokio::runtime::Handle::current(),
        engine: engine.clone(),
        worker,
    });
    engine.submit_to(worker, move |ring| reader.run(ring));
    let result = tokio::select! {
        result = &mut done => result,
        _ = shutdown.changed() => {
            stopping.store(true, Ordering::SeqCst);
            // SAFETY: shuts down the read side of the socket our `Arc`
            // keeps open; a receive in flight then completes with 0.
            unsafe { libc::shutdown(fd, libc::SHUT_RD) };
            done.await
        }
    };
    replies.finish(peer).await;
    drop((socket, placement));
    // A reader dropped without a word went down with its ring.
    result.unwrap_or(Ok(()))
}

/// The reply writer's side of a socket the ring reads. It is registered
/// with tokio (for writability only) just while a write waits for room,
/// and leaves again once the writer has caught up: a standing
/// registration woke a tokio thread each time the client took a reply
/// off the socket (with 4 MiB send buffers the socket is nearly always
/// writable), which cost a third of the 4 KiB reads per second. A
/// registration for reading, as a tokio stream has, did the same for
/// every request that arrived.
struct SocketWriter {
    socket: Arc<OwnedFd>,
    waiting: Option<AsyncFd<Arc<OwnedFd>>>,
}

impl SocketWriter {
    fn send(&self, buf: &[u8]) -> io::Result<usize> {
        send_now(self.socket.as_raw_fd(), &[buf, &[]])
    }
}

impl AsyncWrite for SocketWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.waiting.is_none() {
            match self.send(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                sent => return Poll::Ready(sent),
            }
            // Registering reports the socket's state at once, so room
            // made since the send above is not missed.
            // SAFETY: the `Arc` keeps the descriptor open, and naming the
            // same socket, for as long as the `AsyncFd` holds it.
            let registered =
                unsafe { AsyncFd::register_with_interest(self.socket.clone(), Interest::WRITABLE) };
            self.waiting = Some(registered.map_err(|e| e.into_parts().1)?);
        }
        let this = &*self;
        let Some(waiting) = &this.waiting else {
            return Poll::Ready(Err(io::Error::other("socket writer lost its registration")));
        };
        loop {
            let mut ready = std::task::ready!(waiting.poll_write_ready(cx))?;
            if let Ok(result) = ready.try_io(|_| this.send(buf)) {
                return Poll::Ready(result);
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Caught up: stop hearing about room on the socket.
        self.waiting = None;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // SAFETY: shuts down the write side of a socket the `Arc` keeps open.
        let rc = unsafe { libc::shutdown(self.socket.as_raw_fd(), libc::SHUT_WR) };
        let result = if rc == 0 {
            Ok(())
        } else {
            match io::Error::last_os_error() {
                e if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(()),
                e => Err(e),
            }
        };
        Poll::Ready(result)
    }
}

impl RingReader {
    /// Parses and acts on everything received, until more bytes or budget
    /// are needed.
    fn run(mut self: Box<Self>, ring: &mut Ring) {
        loop {
            if self.stopping.load(Ordering::Relaxed) {
                return self.finish(Ok(()));
            }
            let avail = self.end - self.start;
            match std::mem::replace(&mut self.stage, Stage::Headers) {
                Stage::Discard { ctx, left, code } => {
                    let take = left.min(avail as u64);
                    self.start += take as usize;
                    if take < left {
                        self.stage = Stage::Discard {
                            ctx,
                            left: left - take,
                            code,
                        };
                        return self.receive(ring);
                    }
                    match self.budget.try_take(Units::ONE) {
                        Some(permit) => ctx.fail(code, permit),
                        None => return self.wait(Units::ONE, Waiting::Fail(ctx, code)),
                    }
                }
                Stage::Payload {
                    ctx,
                    mut data,
                    got,
                    permit,
                } => {
                    let take = (data.len() - got).min(avail);
                    if let Some(input) = &self.input {
                        data[got..got + take]
                            .copy_from_slice(&input[self.start..self.start + take]);
                    }
                    self.start += take;
                    let got = got + take;
                    if got < data.len() {
                        return self.receive_payload(ring, ctx, data, got, permit);
                    }
                    handle_write(ctx, data, permit);
                }
                Stage::Headers => {
                    if avail < self.header_len {
                        return self.receive(ring);
                    }
                    let mut raw = [0u8; EXTENDED_REQUEST_LEN];
                    if let Some(input) = &self.input {
                        raw[..self.header_len]
                            .copy_from_slice(&input[self.start..self.start + self.header_len]);
                    }
                    self.start += self.header_len;
                    let raw = &raw[..self.header_len];
                    match admit(raw, self.features, &self.export, &self.sink, &self.peer) {
                        Next::Close => return self.finish(Ok(())),
                        Next::Refuse { ctx, payload, code } => {
                            self.stage = Stage::Discard {
                                ctx,
                                left: payload,
                                code,
                            }
                        }
                        Next::Handle { ctx, units } => match self.budget.try_take(units) {
                            Some(permit) => handle(ctx, permit),
                            None => return self.wait(units, Waiting::Handle(ctx)),
                        },
                        Next::Write { ctx, len, units } => match self.budget.try_take(units) {
                            Some(permit) => self.stage = Self::payload(ctx, len, permit),
                            None => return self.wait(units, Waiting::Write(ctx, len)),
                        },
                    }
                }
            }
        }
    }

    fn payload(ctx: Ctx, len: usize, permit: Permit) -> Stage {
        Stage::Payload {
            ctx,
            data: IoBuf::new(len),
            got: 0,
            permit,
        }
    }

    /// Receives more bytes into the input buffer, after the unparsed ones.
    fn receive(mut self: Box<Self>, ring: &mut Ring) {
        let Some(mut input) = self.input.take() else {
            return self.finish(Err(io::Error::other("input buffer lost")));
        };
        // Keep only the unparsed tail (less than a header, as a rule).
        input.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        let (fd, from) = (self.fd, self.end);
        ring.recv(
            fd,
            input,
            from,
            Box::new(move |ring, received, input| {
                self.input = Some(input);
                match received {
                    Ok(0) => self.at_end_of_stream(),
                    Ok(n) => {
                        self.end += n;
                        self.run(ring)
                    }
                    Err(e) => self.finish(Err(e)),
                }
            }),
        );
    }

    /// Receives the rest of a write's payload straight into its buffer.
    fn receive_payload(
        self: Box<Self>,
        ring: &mut Ring,
        ctx: Ctx,
        data: IoBuf,
        got: usize,
        permit: Permit,
    ) {
        let fd = self.fd;
        ring.recv(
            fd,
            data,
            got,
            Box::new(move |ring, received, data| match received {
                Ok(0) | Err(_) => {
                    let why = received
                        .err()
                        .map_or("end of stream".into(), |e| e.to_string());
                    tracing::warn!(
                        peer = self.peer,
                        export = self.export.name(),
                        "connection ended inside a write payload: {why}"
                    );
                    self.finish(Ok(()))
                }
                Ok(n) if got + n < data.len() => {
                    self.receive_payload(ring, ctx, data, got + n, permit)
                }
                Ok(_) => {
                    handle_write(ctx, data, permit);
                    self.run(ring)
                }
            }),
        );
    }

    fn at_end_of_stream(self: Box<Self>) {
        match self.stage {
            // A payload we were dropping ended early: the stream is broken.
            Stage::Discard { .. } => self.finish(Err(io::ErrorKind::UnexpectedEof.into())),
            // Between requests or inside a header: the client left.
            _ => self.finish(Ok(())),
        }
    }

    /// Waits on a tokio task for `units` of budget, then goes on with
    /// `waiting` on this reader's ring; gives up when the connection
    /// broke (a reply timed out) or the server stops first.
    fn wait(self: Box<Self>, units: Units, waiting: Waiting) {
        let (budget, sink) = (self.budget.clone(), self.sink.clone());
        let mut shutdown = self.shutdown.clone();
        let runtime = self.runtime.clone();
        runtime.spawn(async move {
            let permit = tokio::select! {
                permit = budget.take(units) => permit,
                _ = sink.broken() => None,
                _ = shutdown.wait_for(|stop| *stop) => None,
            };
            match permit {
                Some(permit) => {
                    let (engine, worker) = (self.engine.clone(), self.worker);
                    engine.submit_to(worker, move |ring| self.resume(ring, waiting, permit))
                }
                None => self.finish(Ok(())),
            }
        });
    }

    fn resume(mut self: Box<Self>, ring: &mut Ring, waiting: Waiting, permit: Permit) {
        match waiting {
            Waiting::Handle(ctx) => handle(ctx, permit),
            Waiting::Write(ctx, len) => self.stage = Self::payload(ctx, len, permit),
            Waiting::Fail(ctx, code) => ctx.fail(code, permit),
        }
        self.run(ring)
    }

    /// Stops reading. Requests in flight still reply: each holds the sink.
    fn finish(mut self: Box<Self>, result: io::Result<()>) {
        if let Some(ended) = self.ended.take() {
            let _ = ended.send(result);
        }
    }
}
