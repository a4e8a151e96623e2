//! The transmission phase of one connection: read requests, submit each to
//! the data area as soon as it arrives, send replies in completion order.
//!
//! The reader task only parses headers and payloads, so many requests are in
//! flight per connection and replies may overtake each other, as the protocol
//! allows. Byte budgets (`budget.rs`: one per connection, one daemon-wide for
//! read and BLOCK_STATUS replies, released when a reply has been written)
//! bound the memory one connection and all of them can pin; a reply not
//! taken for `reply_timeout` ends the connection, TLS or not. A request the
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
    let _listed = export.clients.register("nbd", peer, None);
    let budget = Budget::new(route.memory.clone());
    let (sink, replies) = ReplySink::start(writer, route);
    let header_len = Request::header_len(features.extended);

    // Buffered: at queue depth 32 one recv() brings in many request headers
    // instead of one syscall per 28-byte header. Large payloads bypass the
    // buffer when it is empty.
    let mut reader = tokio::io::BufReader::with_capacity(READ_BUFFER, reader);
    let result = loop {
        let mut raw = [0u8; EXTENDED_REQUEST_LEN];
        // Every wait for the client also ends when the sink broke (a reply
        // was not taken for `reply_timeout`): a TLS stream has no socket
        // the writer could shut down under this reader.
        tokio::select! {
            read = reader.read_exact(&mut raw[..header_len]) => match read {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
                Err(e) => break Err(e),
            },
            _ = sink.broken() => break Ok(()),
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
                let discarded = tokio::select! {
                    discarded = discard(&mut reader, payload) => discarded,
                    _ = sink.broken() => break Ok(()),
                    _ = shutdown.changed() => break Ok(()),
                };
                if let Err(e) = discarded {
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
                    _ = sink.broken() => break Ok(()),
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
    // Only commands with a payload or a large reply pin memory; zeroing
    // and trimming a large range costs one unit.
    let connection_units = match req.command {
        Command::Read | Command::Write => req
            .length
            .div_ceil(UNIT)
            .clamp(1, u64::from(CONNECTION_UNITS)) as u32,
        Command::BlockStatus => status_reply_units(req.flags, features),
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
    // Only a read or BLOCK_STATUS that will be served gets a large reply
    // (data, or up to MAX_EXTENTS descriptors): one that is refused
    // replies with an error chunk and must not hold the daemon-wide
    // budget while its client declines to read that.
    let served = match req.command {
        Command::Read => req.length <= u64::from(MAX_PAYLOAD),
        Command::BlockStatus => features.base_allocation && req.length > 0,
        _ => false,
    };
    if served && req.flags & !valid_flags(req.command, features) == 0 && ctx.in_range() {
        units.replies = connection_units;
    }
    Next::Handle { ctx, units }
}

/// Most extents a BLOCK_STATUS reply carries.
fn max_extents(flags: u16) -> usize {
    if flags & CMD_FLAG_REQ_ONE != 0 {
        1
    } else {
        MAX_EXTENTS
    }
}

/// Budget units the largest BLOCK_STATUS reply takes: the chunk header,
/// the context id and count, and the descriptors.
fn status_reply_units(flags: u16, features: Features) -> u32 {
    let descriptor = if features.extended { 16 } else { 8 };
    let bytes = MAX_CHUNK_HEADER + 8 + descriptor * max_extents(flags);
    (bytes as u64).div_ceil(UNIT) as u32
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
                Outcome::Sealed(read) => Body::Data(read.into_plaintext()),
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
    ctx.submit(
        Op::Write {
            offset,
            data: data.into(),
            fua,
        },
        budget,
    );
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
            let op = Op::Allocation {
                offset,
                len,
                max_runs: max_extents(req.flags),
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
mod tests;
