//! The transmission phase of one connection: read requests, submit each to
//! the data area as soon as it arrives, send replies in completion order.
//!
//! The reader task only parses headers and payloads, so many requests are in
//! flight per connection and replies may overtake each other, as the protocol
//! allows. Byte budgets (`budget.rs`: one per connection, one daemon-wide for
//! read replies, released when a reply has been written) bound the memory one
//! connection and all of them can pin. A request the
//! server cannot honour gets an error reply; a request it cannot even frame
//! (bad magic, truncated, a payload it will not consume) ends this
//! connection and no other.
//!
//! This layer validates, submits and replies; which engine runs a request
//! is `volume/submit/`'s business alone.
//!
//! Headers are compact (28-byte requests) or, with extended headers, 32
//! bytes with 64-bit lengths. Replies are simple, or structured chunks
//! when the client negotiated them, or extended chunks with extended
//! headers (one chunk per request: OFFSET_DATA for a read, BLOCK_STATUS or
//! BLOCK_STATUS_EXT, ERROR, or NONE, each with the DONE flag).

use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::watch;

use super::budget::{Budget, Permit, Units, CONNECTION_UNITS, UNIT};
use super::replies::{Head, Reply, ReplyRoute, ReplySink};
use crate::export::metrics::RequestKind;
use crate::export::Export;
use crate::io::IoBuf;
use crate::volume::{Allocation, Op, OpKind, Outcome};
use crate::wire::nbd::*;

pub(super) const READ_BUFFER: usize = 128 * 1024;
/// Most extents in one BLOCK_STATUS reply (8 or 16 KiB of descriptors);
/// the client asks again from where the reply ended.
const MAX_EXTENTS: usize = 1024;

/// What a request produced besides its status.
enum Body {
    Empty,
    Data(IoBuf),
    /// BLOCK_STATUS extents for `base:allocation`: (length, flags).
    Extents(Vec<(u64, u32)>),
}

/// Serves requests until the client disconnects, sends garbage, or the
/// server shuts down; then waits for in-flight requests and their replies.
/// `route.direct` is the plaintext socket behind `writer`, if any: replies are
/// then sent from the thread that completed them (`replies.rs`).
pub async fn serve<R, W>(
    reader: R,
    writer: W,
    route: ReplyRoute,
    export: Arc<Export>,
    features: Features,
    mut shutdown: watch::Receiver<bool>,
    peer: &str,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let _connected = export.metrics.connect();
    let budget = Budget::new(route.memory.clone());
    let (sink, replies) = ReplySink::start(writer, route);
    let header_len = Request::header_len(features.extended);

    // Buffered: at queue depth 32 one recv() brings in many request headers
    // instead of one syscall per 28-byte header. Large payloads bypass the
    // buffer when it is empty.
    let mut reader = tokio::io::BufReader::with_capacity(READ_BUFFER, reader);
    let result = loop {
        let mut raw = [0u8; EXTENDED_REQUEST_LEN];
        tokio::select! {
            read = reader.read_exact(&mut raw[..header_len]) => match read {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
                Err(e) => break Err(e),
            },
            _ = shutdown.changed() => break Ok(()),
        }
        // Waiting for budget is back-pressure: no request is read
        // meanwhile. It ends with the connection or the server.
        macro_rules! reserve {
            ($units:expr) => {
                tokio::select! {
                    permit = budget.take($units) => match permit {
                        Some(permit) => permit,
                        None => break Ok(()),
                    },
                    _ = sink.broken() => break Ok(()),
                    _ = shutdown.changed() => break Ok(()),
                }
            };
        }
        match admit(&raw[..header_len], features, &export, &sink, peer) {
            Next::Close => break Ok(()),
            Next::Refuse { ctx, payload, code } => {
                // Consume the payload so the stream stays framed.
                if let Err(e) = discard(&mut reader, payload).await {
                    break Err(e);
                }
                ctx.fail(code, reserve!(Units::ONE));
            }
            Next::Handle { ctx, units } => handle(ctx, reserve!(units)),
            Next::Write { ctx, len, units } => {
                let permit = reserve!(units);
                let mut data = IoBuf::new(len);
                // A client that stalls inside a payload must not hold the
                // connection open past a shutdown or its volume's removal.
                let read = tokio::select! {
                    read = reader.read_exact(&mut data) => read,
                    _ = shutdown.changed() => break Ok(()),
                };
                if let Err(e) = read {
                    tracing::warn!(
                        peer,
                        export = export.name(),
                        "connection ended inside a write payload: {e}"
                    );
                    break Ok(());
                }
                handle_write(ctx, data, permit);
            }
        }
    };

    drop(sink);
    replies.finish(peer).await;
    result
}

/// What a connection does next with a request whose header it has read.
pub(super) enum Next {
    /// Stop reading: DISC, or a request that cannot be framed.
    Close,
    /// Consume and drop `payload` bytes, then answer `code` (one unit of
    /// the connection's budget).
    Refuse { ctx: Ctx, payload: u64, code: u32 },
    /// Take `units` of budget, then `handle`.
    Handle { ctx: Ctx, units: Units },
    /// Take `units` of budget, read the `len`-byte payload, then
    /// `handle_write`.
    Write { ctx: Ctx, len: usize, units: Units },
}

/// Parses and classifies one request header: the framing decisions every
/// reader (this module's task, `ring_reader.rs`) shares.
pub(super) fn admit(
    raw: &[u8],
    features: Features,
    export: &Arc<Export>,
    sink: &Arc<ReplySink>,
    peer: &str,
) -> Next {
    let Some(req) = Request::parse(raw, features.extended) else {
        tracing::warn!(
            peer,
            export = export.name(),
            "bad request magic; closing this connection"
        );
        return Next::Close;
    };
    if let Some(why) = unframeable(&req, features) {
        tracing::warn!(
            peer,
            export = export.name(),
            "{why}; closing this connection"
        );
        return Next::Close;
    }
    if req.command == Command::Disc {
        return Next::Close;
    }
    let payload = req.payload_len(features);
    let is_write = req.command == Command::Write;
    // Only payload-carrying commands pin memory; zeroing and trimming
    // a large range costs one unit.
    let connection_units = match req.command {
        Command::Read | Command::Write => req
            .length
            .div_ceil(UNIT)
            .clamp(1, u64::from(CONNECTION_UNITS)) as u32,
        _ => 1,
    };
    // A payload we refuse is still on the wire.
    let refused = (is_write || payload > 0)
        && (!is_write
            || req.length > u64::from(MAX_PAYLOAD)
            || req.flags & !valid_flags(req.command, features) != 0);
    export.metrics.begin();
    let ctx = Ctx {
        req,
        features,
        sink: sink.clone(),
        export: export.clone(),
        started: Instant::now(),
    };
    if refused {
        // A write past the end is ENOSPC even when also too long or
        // badly flagged: the spec's one error for "no room".
        let code = if is_write && !ctx.in_range() {
            ENOSPC
        } else {
            EINVAL
        };
        return Next::Refuse { ctx, payload, code };
    }
    let mut units = Units {
        connection: connection_units,
        replies: 0,
    };
    if is_write {
        return Next::Write {
            ctx,
            len: payload as usize,
            units,
        };
    }
    // Only a read that will be served gets a data buffer: one that is
    // refused replies with an error chunk and must not hold the
    // daemon-wide budget while its client declines to read that.
    if req.command == Command::Read
        && req.length <= u64::from(MAX_PAYLOAD)
        && req.flags & !valid_flags(req.command, features) == 0
        && ctx.in_range()
    {
        units.replies = connection_units;
    }
    Next::Handle { ctx, units }
}

/// Why a request cannot be answered without losing the stream's framing:
/// with extended headers, a payload larger than any we would consume (the
/// extension asks for a hard disconnect). A compact header's payload is a
/// WRITE's, which is consumed and refused whatever its size.
fn unframeable(req: &Request, features: Features) -> Option<&'static str> {
    (features.extended && req.payload_len(features) > u64::from(MAX_PAYLOAD))
        .then_some("client sent a payload over the maximum block size")
}

pub(super) struct Ctx {
    req: Request,
    features: Features,
    sink: Arc<ReplySink>,
    export: Arc<Export>,
    started: Instant,
}

impl Drop for Ctx {
    fn drop(&mut self) {
        self.export.metrics.end();
    }
}

impl Ctx {
    fn respond(&self, error: u32, body: Body, budget: Permit) {
        self.export.metrics.complete(
            request_kind(self.req.command),
            self.req.length,
            error != 0,
            self.started.elapsed(),
        );
        let (cookie, offset, extended) = (self.req.cookie, self.req.offset, self.features.extended);
        let chunk = |kind: u16, length: u32| {
            chunk_header(extended, REPLY_FLAG_DONE, kind, cookie, offset, length)
        };
        let (header, data) = if !self.features.structured {
            let data = match body {
                Body::Data(data) if error == 0 => Some(data),
                _ => None,
            };
            (Head::of(&[&simple_reply(error, cookie)]), data)
        } else if error != 0 {
            // Errno and an empty message.
            let (h, n) = chunk(REPLY_TYPE_ERROR, 6);
            (
                Head::of(&[&h[..n], &error.to_be_bytes(), &0u16.to_be_bytes()]),
                None,
            )
        } else {
            match body {
                // OFFSET_DATA must carry at least one byte.
                Body::Data(data) if !data.is_empty() => {
                    let (h, n) = chunk(REPLY_TYPE_OFFSET_DATA, 8 + data.len() as u32);
                    (Head::of(&[&h[..n], &offset.to_be_bytes()]), Some(data))
                }
                Body::Extents(extents) => (Head::Heap(self.status_chunk(&extents)), None),
                _ => {
                    let (h, n) = chunk(REPLY_TYPE_NONE, 0);
                    (Head::of(&[&h[..n]]), None)
                }
            }
        };
        self.sink.send(Reply {
            header,
            data,
            sent: 0,
            _budget: budget,
        });
    }

    /// A BLOCK_STATUS chunk (32-bit lengths; the request's length bounds
    /// every extent) or, with extended headers, BLOCK_STATUS_EXT (64-bit
    /// lengths and status, and a descriptor count).
    fn status_chunk(&self, extents: &[(u64, u32)]) -> Vec<u8> {
        let (req, extended) = (&self.req, self.features.extended);
        let (kind, length) = if extended {
            (REPLY_TYPE_BLOCK_STATUS_EXT, 8 + 16 * extents.len() as u32)
        } else {
            (REPLY_TYPE_BLOCK_STATUS, 4 + 8 * extents.len() as u32)
        };
        let (h, n) = chunk_header(
            extended,
            REPLY_FLAG_DONE,
            kind,
            req.cookie,
            req.offset,
            length,
        );
        let mut out = Vec::with_capacity(n + length as usize);
        out.extend_from_slice(&h[..n]);
        out.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
        if extended {
            out.extend_from_slice(&(extents.len() as u32).to_be_bytes());
        }
        for &(len, flags) in extents {
            if extended {
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(&u64::from(flags).to_be_bytes());
            } else {
                out.extend_from_slice(&(len as u32).to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
            }
        }
        out
    }

    pub(super) fn fail(&self, error: u32, budget: Permit) {
        self.respond(error, Body::Empty, budget);
    }

    fn in_range(&self) -> bool {
        self.req
            .offset
            .checked_add(self.req.length)
            .is_some_and(|end| end <= self.export.size())
    }

    fn fua(&self) -> bool {
        self.req.flags & CMD_FLAG_FUA != 0
    }

    /// Submits `op` to the data area and replies with its outcome.
    fn submit(self, op: Op, budget: Permit) {
        let area = self.export.volume.data.clone();
        area.submit(op, move |outcome| {
            let outcome = outcome.map(|done| match done {
                Outcome::Done => Body::Empty,
                Outcome::Data(data) => Body::Data(data),
                Outcome::Runs(runs) => Body::Extents(
                    runs.into_iter()
                        .map(|(len, kind)| {
                            let flags = match kind {
                                Allocation::Hole => STATE_HOLE | STATE_ZERO,
                                Allocation::Zero => STATE_ZERO,
                                Allocation::Data => 0,
                            };
                            (len, flags)
                        })
                        .collect(),
                ),
            });
            self.finish(outcome, budget)
        });
    }

    /// Replies with a request's outcome, logging failures.
    fn finish(self, outcome: std::io::Result<Body>, budget: Permit) {
        match outcome {
            Ok(body) => self.respond(0, body, budget),
            Err(e) => {
                tracing::warn!(
                    export = self.export.name(),
                    command = self.req.command.name(),
                    offset = self.req.offset,
                    length = self.req.length,
                    "request failed: {e}"
                );
                self.fail(errno_for(&e), budget);
            }
        }
    }
}

pub(super) fn handle_write(ctx: Ctx, data: IoBuf, budget: Permit) {
    if !ctx.in_range() {
        return ctx.fail(ENOSPC, budget);
    }
    let (offset, fua) = (ctx.req.offset, ctx.fua());
    ctx.submit(Op::Write { offset, data, fua }, budget);
}

pub(super) fn handle(ctx: Ctx, budget: Permit) {
    let req = ctx.req;
    // Flags that are unknown, not valid for this command, or not
    // advertised (DF without structured replies, FAST_ZERO, FUA on READ).
    if req.flags & !valid_flags(req.command, ctx.features) != 0 {
        return ctx.fail(EINVAL, budget);
    }
    let (offset, len, fua) = (req.offset, req.length, ctx.fua());
    match req.command {
        Command::Read => {
            if len > u64::from(MAX_PAYLOAD) || !ctx.in_range() {
                return ctx.fail(EINVAL, budget);
            }
            let len = len as usize;
            ctx.submit(Op::Read { offset, len }, budget);
        }
        Command::Flush => ctx.submit(Op::Flush, budget),
        Command::WriteZeroes => {
            if !ctx.in_range() {
                return ctx.fail(ENOSPC, budget);
            }
            let punch = ctx.export.allow_discards && req.flags & CMD_FLAG_NO_HOLE == 0;
            // FAST_ZERO: fail at once rather than write zeros slowly; the
            // client then falls back to its own way (e.g. skipping zeros).
            if req.flags & CMD_FLAG_FAST_ZERO != 0 && !ctx.export.volume.data.zeroes_fast(punch) {
                return ctx.fail(ENOTSUP, budget);
            }
            let op = Op::WriteZeroes {
                offset,
                len,
                punch,
                fua,
            };
            ctx.submit(op, budget);
        }
        Command::Trim => {
            if !ctx.export.allow_discards || !ctx.in_range() {
                return ctx.fail(EINVAL, budget);
            }
            ctx.submit(Op::Trim { offset, len, fua }, budget);
        }
        Command::BlockStatus => {
            // Only with `base:allocation` negotiated (valid_flags already
            // refused REQ_ONE otherwise), for a non-empty range inside.
            if !ctx.features.base_allocation || len == 0 || !ctx.in_range() {
                return ctx.fail(EINVAL, budget);
            }
            let max_runs = if req.flags & CMD_FLAG_REQ_ONE != 0 {
                1
            } else {
                MAX_EXTENTS
            };
            let op = Op::Allocation {
                offset,
                len,
                max_runs,
            };
            ctx.submit(op, budget);
        }
        Command::Cache => {
            let code = if ctx.in_range() { 0 } else { EINVAL };
            ctx.fail(code, budget);
        }
        Command::Write | Command::Disc | Command::Unknown(_) => ctx.fail(EINVAL, budget),
    }
}

/// What the metrics count a command as: the kind of op it becomes.
fn request_kind(command: Command) -> RequestKind {
    match command {
        Command::Read => RequestKind::Op(OpKind::Read),
        Command::Write => RequestKind::Op(OpKind::Write),
        Command::Flush => RequestKind::Op(OpKind::Flush),
        Command::Trim => RequestKind::Op(OpKind::Trim),
        Command::WriteZeroes => RequestKind::Op(OpKind::WriteZeroes),
        Command::BlockStatus => RequestKind::Op(OpKind::Allocation),
        Command::Cache => RequestKind::Prefetch,
        Command::Disc | Command::Unknown(_) => RequestKind::Other,
    }
}

/// Reads and drops `len` bytes of a payload we refuse.
async fn discard<R: AsyncRead + Unpin>(reader: &mut R, len: u64) -> std::io::Result<()> {
    let copied = tokio::io::copy(&mut reader.take(len), &mut tokio::io::sink()).await?;
    if copied < len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// The transmission phase over an in-memory duplex stream against a real
/// temp volume: no daemon, no socket.
#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::export::access::AllowList;

    const SIZE: u64 = 8 << 20;

    struct Served {
        to_server: Box<dyn AsyncWrite + Unpin + Send>,
        from_server: Box<dyn AsyncRead + Unpin + Send>,
        export: Arc<Export>,
        server: tokio::task::JoinHandle<std::io::Result<()>>,
        shutdown: watch::Sender<bool>,
        _dir: tempfile::TempDir,
    }

    /// A temp volume of SIZE bytes in a fresh directory (kept alive by
    /// the returned guard), exported to anyone.
    fn temp_export() -> (Arc<Export>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let geometry = crate::volume::Geometry {
            size: SIZE,
            sector_size: 512,
        };
        let volume = crate::volume::open_temp(
            "t",
            &dir.path().join("volume"),
            geometry,
            &Default::default(),
        )
        .unwrap();
        let export = Arc::new(Export::new(
            volume,
            String::new(),
            true,
            AllowList::anyone(),
        ));
        (export, dir)
    }

    /// Which reader serves the connection: the tokio task (over an
    /// in-memory duplex stream) or a ring (over a Unix socket pair).
    #[derive(Clone, Copy)]
    enum Reader {
        Task,
        Ring,
    }

    /// One ring, private to these tests.
    fn test_rings() -> Arc<crate::io::uring::UringEngine> {
        static RINGS: std::sync::OnceLock<Arc<crate::io::uring::UringEngine>> =
            std::sync::OnceLock::new();
        RINGS
            .get_or_init(|| {
                Arc::new(
                    crate::io::uring::UringEngine::start(1, std::time::Duration::ZERO).unwrap(),
                )
            })
            .clone()
    }

    fn serve_volume(features: Features, reader: Reader) -> Served {
        let (export, dir) = temp_export();
        let (stop, shutdown) = watch::channel(false);
        let served = export.clone();
        let (server, from_server, to_server): (
            _,
            Box<dyn AsyncRead + Unpin + Send>,
            Box<dyn AsyncWrite + Unpin + Send>,
        ) = match reader {
            Reader::Task => {
                let (client, server) = tokio::io::duplex(64 * 1024);
                let (server_r, server_w) = tokio::io::split(server);
                let (from_server, to_server) = tokio::io::split(client);
                let server = tokio::spawn(async move {
                    serve(
                        server_r,
                        server_w,
                        route(None),
                        served,
                        features,
                        shutdown,
                        "test",
                    )
                    .await
                });
                (server, Box::new(from_server), Box::new(to_server))
            }
            Reader::Ring => {
                let (client, server) = std::os::unix::net::UnixStream::pair().unwrap();
                let client = tokio::net::UnixStream::from_std({
                    client.set_nonblocking(true).unwrap();
                    client
                })
                .unwrap();
                server.set_nonblocking(true).unwrap();
                let (from_server, to_server) = client.into_split();
                let rings = test_rings();
                let server = tokio::spawn(async move {
                    super::super::ring_reader::serve_on_ring(
                        server.into(),
                        rings,
                        served,
                        features,
                        shutdown,
                        "test",
                        route(None),
                    )
                    .await
                });
                (server, Box::new(from_server), Box::new(to_server))
            }
        };
        Served {
            to_server,
            from_server,
            export,
            server,
            shutdown: stop,
            _dir: dir,
        }
    }

    const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

    fn route(direct: Option<std::os::fd::RawFd>) -> super::super::replies::ReplyRoute {
        super::super::replies::ReplyRoute {
            direct,
            timeout: REPLY_TIMEOUT,
            memory: crate::frontend::nbd::budget::ReplyMemory::new(
                crate::frontend::nbd::budget::DEFAULT_REPLY_MEMORY,
            ),
        }
    }
    const SIMPLE: Features = Features {
        structured: false,
        extended: false,
        base_allocation: false,
    };
    const EXTENDED: Features = Features {
        structured: true,
        extended: true,
        base_allocation: true,
    };

    fn request(command: Command, flags: u16, cookie: u64, offset: u64, length: u64) -> Request {
        Request {
            flags,
            command,
            cookie,
            offset,
            length,
        }
    }

    impl Served {
        async fn send(&mut self, req: Request, payload: &[u8]) {
            let extended = req.flags & CMD_FLAG_PAYLOAD_LEN != 0
                || matches!(req.command, Command::Trim | Command::BlockStatus)
                    && req.length > u64::from(u32::MAX);
            self.send_as(req, payload, extended).await;
        }

        async fn send_as(&mut self, req: Request, payload: &[u8], extended: bool) {
            if extended {
                self.to_server
                    .write_all(&req.encode_extended())
                    .await
                    .unwrap();
            } else {
                self.to_server.write_all(&req.encode()).await.unwrap();
            }
            self.to_server.write_all(payload).await.unwrap();
        }

        /// A simple reply: (error, cookie), and `read_len` bytes of data
        /// when the error is 0.
        async fn simple(&mut self, read_len: usize) -> (u32, u64, Vec<u8>) {
            let mut h = [0u8; 16];
            self.from_server.read_exact(&mut h).await.unwrap();
            assert_eq!(be32(&h), SIMPLE_REPLY_MAGIC);
            let (error, cookie) = (be32(&h[4..]), be64(&h[8..]));
            let mut data = vec![0u8; if error == 0 { read_len } else { 0 }];
            self.from_server.read_exact(&mut data).await.unwrap();
            (error, cookie, data)
        }

        /// An extended reply chunk: (flags, type, cookie, offset, payload).
        async fn extended_chunk(&mut self) -> (u16, u16, u64, u64, Vec<u8>) {
            let mut h = [0u8; 32];
            self.from_server.read_exact(&mut h).await.unwrap();
            assert_eq!(be32(&h), EXTENDED_REPLY_MAGIC);
            let mut payload = vec![0u8; be64(&h[24..]) as usize];
            self.from_server.read_exact(&mut payload).await.unwrap();
            (
                be16(&h[4..]),
                be16(&h[6..]),
                be64(&h[8..]),
                be64(&h[16..]),
                payload,
            )
        }

        async fn at_eof(&mut self) -> bool {
            let mut byte = [0u8; 1];
            matches!(self.from_server.read(&mut byte).await, Ok(0))
        }

        fn completed_reads(&self) -> u64 {
            self.export
                .metrics
                .commands()
                .next()
                .map_or(0, |c| c.requests)
        }
    }

    async fn write_then_read_with_simple_replies(reader: Reader) {
        let mut s = serve_volume(SIMPLE, reader);
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        s.send(request(Command::Write, 0, 1, 8192, 4096), &data)
            .await;
        assert_eq!(s.simple(0).await, (0, 1, vec![]));
        s.send(request(Command::Read, 0, 2, 8192, 4096), &[]).await;
        assert_eq!(s.simple(4096).await, (0, 2, data));
    }

    async fn every_request_is_answered_before_disc_closes(reader: Reader) {
        let mut s = serve_volume(SIMPLE, reader);
        for cookie in 0..32u64 {
            s.send(request(Command::Read, 0, cookie, cookie * 4096, 4096), &[])
                .await;
        }
        s.send(request(Command::Disc, 0, 99, 0, 0), &[]).await;
        let mut cookies = Vec::new();
        for _ in 0..32 {
            let (error, cookie, data) = s.simple(4096).await;
            assert_eq!((error, data.len()), (0, 4096));
            cookies.push(cookie);
        }
        cookies.sort_unstable();
        assert_eq!(cookies, (0..32).collect::<Vec<_>>(), "one reply per cookie");
        assert!(s.at_eof().await, "nothing after the last reply");
        assert!(s.server.await.unwrap().is_ok());
    }

    async fn bad_magic_ends_the_connection_after_earlier_replies(reader: Reader) {
        let mut s = serve_volume(SIMPLE, reader);
        s.send(request(Command::Flush, 0, 5, 0, 0), &[]).await;
        let mut garbage = request(Command::Read, 0, 6, 0, 512).encode();
        garbage[0] ^= 0xff;
        s.to_server.write_all(&garbage).await.unwrap();
        assert_eq!(s.simple(0).await, (0, 5, vec![]));
        assert!(
            s.at_eof().await,
            "no reply to a request that cannot be framed"
        );
        assert!(s.server.await.unwrap().is_ok());
    }

    async fn refused_write_payload_is_consumed_and_the_stream_stays_framed(reader: Reader) {
        let mut s = serve_volume(SIMPLE, reader);
        // Past the end: ENOSPC, and its 4 KiB payload must not be read as
        // the next header.
        s.send(request(Command::Write, 0, 1, SIZE, 4096), &[0xAA; 4096])
            .await;
        s.send(request(Command::Write, 1 << 9, 2, 0, 512), &[0xBB; 512])
            .await;
        s.send(request(Command::Read, 0, 3, 0, 512), &[]).await;
        assert_eq!(s.simple(0).await, (ENOSPC, 1, vec![]));
        assert_eq!(s.simple(0).await, (EINVAL, 2, vec![]), "unknown flag");
        assert_eq!(s.simple(512).await, (0, 3, vec![0; 512]));
    }

    async fn byte_budget_bounds_what_one_connection_pins(reader: Reader) {
        let mut s = serve_volume(SIMPLE, reader);
        const READ: u64 = 4 << 20;
        let in_budget = u64::from(CONNECTION_UNITS) * UNIT / READ;
        let sent = in_budget + 8;
        for cookie in 0..sent {
            s.send(request(Command::Read, 0, cookie, 0, READ), &[])
                .await;
        }
        // Replies are not read: once the budget is spent the reader must
        // stop taking requests.
        let deadline = Instant::now() + Duration::from_secs(20);
        while s.completed_reads() < in_budget {
            assert!(Instant::now() < deadline, "the budget's reads never ran");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let watch_until = Instant::now() + Duration::from_millis(300);
        while Instant::now() < watch_until {
            assert_eq!(s.completed_reads(), in_budget, "a read ran past the budget");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for _ in 0..sent {
            let (error, _, data) = s.simple(READ as usize).await;
            assert_eq!((error, data.len() as u64), (0, READ));
        }
        assert_eq!(s.completed_reads(), sent);
    }

    async fn extended_headers_carry_payload_lengths_and_64_bit_ranges(reader: Reader) {
        let mut s = serve_volume(EXTENDED, reader);
        let data = vec![0x5Au8; 8192];
        let write = request(Command::Write, CMD_FLAG_PAYLOAD_LEN, 1, 1 << 20, 8192);
        s.send(write, &data).await;
        let (flags, kind, cookie, offset, payload) = s.extended_chunk().await;
        assert_eq!(
            (flags, kind, cookie, offset, payload.len()),
            (REPLY_FLAG_DONE, REPLY_TYPE_NONE, 1, 1 << 20, 0)
        );

        s.send_as(request(Command::Read, 0, 2, 1 << 20, 8192), &[], true)
            .await;
        let (_, kind, cookie, offset, payload) = s.extended_chunk().await;
        assert_eq!((kind, cookie, offset), (REPLY_TYPE_OFFSET_DATA, 2, 1 << 20));
        assert_eq!(be64(&payload), 1 << 20, "the data's offset");
        assert_eq!(&payload[8..], &data[..]);

        // Block status over the whole volume: 64-bit descriptors, hole /
        // data / hole.
        s.send_as(request(Command::BlockStatus, 0, 3, 0, SIZE), &[], true)
            .await;
        let (_, kind, cookie, _, payload) = s.extended_chunk().await;
        assert_eq!((kind, cookie), (REPLY_TYPE_BLOCK_STATUS_EXT, 3));
        assert_eq!(be32(&payload), BASE_ALLOCATION_ID);
        let count = be32(&payload[4..]) as usize;
        assert_eq!(payload.len(), 8 + 16 * count);
        let extents: Vec<(u64, u64)> = payload[8..]
            .chunks(16)
            .map(|d| (be64(d), be64(&d[8..])))
            .collect();
        assert_eq!(extents.iter().map(|e| e.0).sum::<u64>(), SIZE);
        let data_extent = extents.iter().find(|e| e.1 == 0).expect("a data extent");
        assert!(data_extent.0 >= 8192);

        // A 64-bit trim length past the end: an error chunk, not a
        // truncated 32-bit range.
        s.send(request(Command::Trim, 0, 4, 0, 1 << 40), &[]).await;
        let (_, kind, cookie, _, payload) = s.extended_chunk().await;
        assert_eq!(
            (kind, cookie, be32(&payload)),
            (REPLY_TYPE_ERROR, 4, EINVAL)
        );

        // A payload on a command that takes none is consumed, then refused.
        let flush = request(Command::Flush, CMD_FLAG_PAYLOAD_LEN, 5, 0, 16);
        s.send(flush, &[0xEE; 16]).await;
        let (_, kind, cookie, _, payload) = s.extended_chunk().await;
        assert_eq!(
            (kind, cookie, be32(&payload)),
            (REPLY_TYPE_ERROR, 5, EINVAL)
        );

        // A write without PAYLOAD_LEN (as QEMU 10 sends them) is still a
        // write of its length.
        s.send_as(request(Command::Write, 0, 6, 0, 512), &[7; 512], true)
            .await;
        assert_eq!(s.extended_chunk().await.1, REPLY_TYPE_NONE);
        s.send_as(request(Command::Read, 0, 7, 0, 512), &[], true)
            .await;
        assert_eq!(&s.extended_chunk().await.4[8..], &[7; 512][..]);

        // A payload over the maximum cannot be consumed: the end.
        let huge = request(Command::Flush, CMD_FLAG_PAYLOAD_LEN, 8, 0, 1 << 40);
        s.send(huge, &[]).await;
        assert!(s.at_eof().await);
        assert!(s.server.await.unwrap().is_ok());
    }

    async fn a_write_larger_than_the_read_buffer_arrives_whole(reader: Reader) {
        let mut s = serve_volume(SIMPLE, reader);
        let len = 3 * READ_BUFFER + 4096;
        let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        s.send(request(Command::Write, 0, 1, 4096, len as u64), &data)
            .await;
        assert_eq!(s.simple(0).await, (0, 1, vec![]));
        s.send(request(Command::Read, 0, 2, 4096, len as u64), &[])
            .await;
        assert!(s.simple(len).await == (0, 2, data), "read back differs");
    }

    async fn shutdown_ends_a_connection_waiting_for_requests(reader: Reader) {
        let mut s = serve_volume(SIMPLE, reader);
        s.send(request(Command::Flush, 0, 1, 0, 0), &[]).await;
        assert_eq!(s.simple(0).await, (0, 1, vec![]));
        // The server is now waiting for the next header.
        s.shutdown.send(true).unwrap();
        let served = tokio::time::timeout(Duration::from_secs(20), &mut s.server).await;
        assert!(
            matches!(served, Ok(Ok(Ok(())))),
            "the connection did not end"
        );
        assert!(s.at_eof().await);
    }

    /// Each transmission test, once per reader.
    macro_rules! on_both_readers {
        ($($name:ident),* $(,)?) => {
            mod on_task {
                $(#[tokio::test]
                async fn $name() {
                    super::$name(super::Reader::Task).await
                })*
            }
            mod on_ring {
                $(#[tokio::test]
                async fn $name() {
                    super::$name(super::Reader::Ring).await
                })*
            }
        };
    }

    on_both_readers!(
        a_write_larger_than_the_read_buffer_arrives_whole,
        shutdown_ends_a_connection_waiting_for_requests,
        write_then_read_with_simple_replies,
        every_request_is_answered_before_disc_closes,
        bad_magic_ends_the_connection_after_earlier_replies,
        refused_write_payload_is_consumed_and_the_stream_stays_framed,
        byte_budget_bounds_what_one_connection_pins,
        extended_headers_carry_payload_lengths_and_64_bit_ranges,
    );

    /// Replies sent directly by the completing threads, over a real
    /// socket, mixed with replies too large for the socket buffer (which
    /// the writer task must finish first): every reply arrives whole,
    /// with its own data.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn direct_replies_on_a_socket_never_interleave() {
        use std::os::fd::AsRawFd;
        let (export, _dir) = temp_export();
        // Every 4 KiB block of the volume holds its own index.
        let pattern: Vec<u8> = (0..SIZE / 4096)
            .flat_map(|block| std::iter::repeat_n(block as u8, 4096))
            .collect();
        let mut data = IoBuf::new(pattern.len());
        data.copy_from_slice(&pattern);
        export.volume.data.write(0, &mut data).unwrap();

        let (client, server) = tokio::net::UnixStream::pair().unwrap();
        let fd = server.as_raw_fd();
        let (server_r, server_w) = server.into_split();
        let (keep, shutdown) = watch::channel(false);
        let served = export.clone();
        let server = tokio::spawn(async move {
            let _keep = keep;
            serve(
                server_r,
                server_w,
                route(Some(fd)),
                served,
                SIMPLE,
                shutdown,
                "test",
            )
            .await
        });
        let (mut from_server, mut to_server) = client.into_split();
        // Small and large reads; the large ones overflow the socket buffer.
        // A reply's cookie tells which request (and so which data) it is.
        let shape = |cookie: u64| {
            let len = if cookie.is_multiple_of(25) {
                2 << 20
            } else {
                4096
            };
            ((cookie * 7 % 1000) * 4096 % (SIZE - len), len)
        };
        const COUNT: u64 = 200;
        let sender = tokio::spawn(async move {
            for cookie in 0..COUNT {
                let (offset, len) = shape(cookie);
                let req = request(Command::Read, 0, cookie, offset, len);
                to_server.write_all(&req.encode()).await.unwrap();
            }
            let disc = request(Command::Disc, 0, 0, 0, 0);
            to_server.write_all(&disc.encode()).await.unwrap();
        });
        let mut replies = 0;
        loop {
            let mut h = [0u8; 16];
            if from_server.read_exact(&mut h).await.is_err() {
                break;
            }
            assert_eq!(be32(&h), SIMPLE_REPLY_MAGIC, "a reply header out of place");
            let cookie = be64(&h[8..]);
            let (offset, len) = shape(cookie);
            let mut body = vec![0u8; len as usize];
            from_server.read_exact(&mut body).await.unwrap();
            assert!(
                body == pattern[offset as usize..(offset + len) as usize],
                "reply {cookie} carries another request's data"
            );
            replies += 1;
        }
        sender.await.unwrap();
        assert_eq!(replies, COUNT);
        assert!(server.await.unwrap().is_ok());
    }
}
