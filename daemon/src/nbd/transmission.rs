//! The transmission phase of one connection: read requests, run each on the
//! I/O workers as soon as it arrives, send replies in completion order.
//!
//! The reader task only parses headers and payloads, so many requests are in
//! flight per connection and replies may overtake each other, as the protocol
//! allows. A byte budget (a semaphore in 4 KiB units, released when a reply has
//! been written) bounds the memory one connection can pin. A request the
//! server cannot honour gets an error reply; a request it cannot even frame
//! (bad magic, truncated) ends this connection and no other.
//!
//! Replies are simple, or structured chunks when the client negotiated
//! them (one chunk per request: OFFSET_DATA for a read, BLOCK_STATUS,
//! ERROR, or NONE, each with the DONE flag).

use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use super::exports::Export;
use super::proto::*;
use crate::io::engine::{self, Engine};
use crate::io::IoBuf;

/// Per-connection in-flight budget: 64 MiB in 4 KiB units.
const BUDGET_UNITS: u32 = 16 * 1024;
const UNIT: u32 = 4096;
const READ_BUFFER: usize = 128 * 1024;
/// Most extents in one BLOCK_STATUS reply (8 KiB of descriptors); the
/// client asks again from where the reply ended.
const MAX_EXTENTS: usize = 1024;

struct Reply {
    /// The reply header, and for chunks whatever precedes the data.
    header: Head,
    data: Option<IoBuf>,
    _budget: OwnedSemaphorePermit,
}

/// Reply header bytes: inline for every reply but BLOCK_STATUS (at most
/// 28 bytes: a chunk header and a read's offset), so the common path
/// allocates nothing per reply.
enum Head {
    Inline { bytes: [u8; 28], len: usize },
    Heap(Vec<u8>),
}

impl Head {
    fn of(parts: &[&[u8]]) -> Head {
        let mut bytes = [0u8; 28];
        let mut len = 0;
        for part in parts {
            bytes[len..len + part.len()].copy_from_slice(part);
            len += part.len();
        }
        Head::Inline { bytes, len }
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            Head::Inline { bytes, len } => &bytes[..*len],
            Head::Heap(v) => v,
        }
    }
}

/// What a request produced besides its status.
enum Body {
    Empty,
    Data(IoBuf),
    /// BLOCK_STATUS extents for `base:allocation`: (length, flags).
    Extents(Vec<(u32, u32)>),
}

/// Serves requests until the client disconnects, sends garbage, or the
/// server shuts down; then waits for in-flight requests and their replies.
pub async fn serve<R, W>(
    reader: R,
    writer: W,
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
    let budget = Arc::new(Semaphore::new(BUDGET_UNITS as usize));
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let writer_task = tokio::spawn(write_replies(writer, rx));

    // Buffered: at queue depth 32 one recv() brings in many request headers
    // instead of one syscall per 28-byte header. Large payloads bypass the
    // buffer when it is empty.
    let mut reader = tokio::io::BufReader::with_capacity(READ_BUFFER, reader);
    let result = loop {
        let mut raw = [0u8; REQUEST_LEN];
        tokio::select! {
            read = reader.read_exact(&mut raw) => match read {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
                Err(e) => break Err(e),
            },
            _ = shutdown.changed() => break Ok(()),
        }
        let Some(req) = Request::parse(&raw) else {
            tracing::warn!(
                peer,
                export = export.name(),
                "bad request magic; closing this connection"
            );
            break Ok(());
        };
        // Only payload-carrying commands pin memory; zeroing and trimming
        // a large range costs one unit.
        let units = match req.kind {
            CMD_READ | CMD_WRITE => req.length.div_ceil(UNIT).clamp(1, BUDGET_UNITS),
            _ => 1,
        };
        // A write we refuse still has its payload on the wire.
        let refused_write = req.kind == CMD_WRITE
            && (req.length > MAX_PAYLOAD || req.flags & !valid_flags(req.kind, features) != 0);
        let permit = if refused_write {
            None
        } else {
            match budget.clone().acquire_many_owned(units).await {
                Ok(p) => Some(p),
                Err(_) => break Ok(()),
            }
        };
        export.metrics.begin();
        let ctx = Ctx {
            req,
            features,
            tx: tx.clone(),
            export: export.clone(),
            started: Instant::now(),
        };
        match req.kind {
            CMD_DISC => break Ok(()),
            CMD_WRITE => {
                let Some(permit) = permit else {
                    // Consume the payload so the stream stays framed.
                    if let Err(e) = discard(&mut reader, req.length).await {
                        break Err(e);
                    }
                    let permit = match budget.clone().acquire_owned().await {
                        Ok(p) => p,
                        Err(_) => break Ok(()),
                    };
                    // Past the end is ENOSPC even when also too long or
                    // badly flagged: the spec's one error for "no room".
                    let code = if ctx.in_range() { EINVAL } else { ENOSPC };
                    ctx.fail(code, permit);
                    continue;
                };
                let mut data = IoBuf::new(req.length as usize);
                if let Err(e) = reader.read_exact(&mut data).await {
                    tracing::warn!(
                        peer,
                        export = export.name(),
                        "connection ended inside a write payload: {e}"
                    );
                    break Ok(());
                }
                handle_write(ctx, data, permit);
            }
            _ => match permit {
                Some(permit) => handle(ctx, permit),
                None => break Ok(()),
            },
        }
    };

    drop(tx);
    match writer_task.await {
        Ok(Err(e)) => tracing::debug!(peer, "reply stream closed: {e}"),
        Err(e) => tracing::error!(peer, "reply writer failed: {e}"),
        Ok(Ok(())) => {}
    }
    result
}

struct Ctx {
    req: Request,
    features: Features,
    tx: mpsc::UnboundedSender<Reply>,
    export: Arc<Export>,
    started: Instant,
}

impl Drop for Ctx {
    fn drop(&mut self) {
        self.export.metrics.end();
    }
}

impl Ctx {
    fn respond(&self, error: u32, body: Body, budget: OwnedSemaphorePermit) {
        self.export.metrics.complete(
            self.req.kind,
            self.req.length,
            error,
            self.started.elapsed(),
        );
        let cookie = self.req.cookie;
        let (header, data) = if !self.features.structured {
            let data = match body {
                Body::Data(data) if error == 0 => Some(data),
                _ => None,
            };
            (Head::of(&[&simple_reply(error, cookie)]), data)
        } else if error != 0 {
            // Errno and an empty message.
            let chunk = chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, 6);
            (
                Head::of(&[&chunk, &error.to_be_bytes(), &0u16.to_be_bytes()]),
                None,
            )
        } else {
            match body {
                // OFFSET_DATA must carry at least one byte.
                Body::Data(data) if !data.is_empty() => {
                    let length = 8 + data.len() as u32;
                    let chunk =
                        chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, length);
                    (
                        Head::of(&[&chunk, &self.req.offset.to_be_bytes()]),
                        Some(data),
                    )
                }
                Body::Extents(extents) => {
                    let length = 4 + 8 * extents.len() as u32;
                    let mut h =
                        chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, cookie, length)
                            .to_vec();
                    h.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
                    for (len, flags) in extents {
                        h.extend_from_slice(&len.to_be_bytes());
                        h.extend_from_slice(&flags.to_be_bytes());
                    }
                    (Head::Heap(h), None)
                }
                _ => {
                    let chunk = chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
                    (Head::of(&[&chunk]), None)
                }
            }
        };
        // A send fails only when the writer is gone (client hung up).
        let _ = self.tx.send(Reply {
            header,
            data,
            _budget: budget,
        });
    }

    fn fail(&self, error: u32, budget: OwnedSemaphorePermit) {
        self.respond(error, Body::Empty, budget);
    }

    fn in_range(&self) -> bool {
        self.req
            .offset
            .checked_add(u64::from(self.req.length))
            .is_some_and(|end| end <= self.export.size())
    }

    /// Runs `op` on an I/O worker, then a flush if the request has FUA,
    /// and replies with its outcome.
    fn run<F>(self, budget: OwnedSemaphorePermit, op: F)
    where
        F: FnOnce(&Export, &Request) -> std::io::Result<Body> + Send + 'static,
    {
        crate::io::workers::spawn(move || {
            let fua = self.req.flags & CMD_FLAG_FUA != 0;
            let outcome = op(&self.export, &self.req).and_then(|data| {
                if fua {
                    self.export.volume.data.flush()?;
                }
                Ok(data)
            });
            self.finish(outcome, budget);
        });
    }

    /// Replies with a request's outcome, logging failures.
    fn finish(self, outcome: std::io::Result<Body>, budget: OwnedSemaphorePermit) {
        match outcome {
            Ok(body) => self.respond(0, body, budget),
            Err(e) => {
                tracing::warn!(
                    export = self.export.name(),
                    command = self.req.kind,
                    offset = self.req.offset,
                    length = self.req.length,
                    "request failed: {e}"
                );
                self.fail(errno_for(&e), budget);
            }
        }
    }
}

/// Remote-backing writes up to this size are encrypted on the event loop.
const INLINE_ENCRYPT_MAX: usize = 64 * 1024;

fn handle_write(ctx: Ctx, mut data: IoBuf, budget: OwnedSemaphorePermit) {
    if !ctx.in_range() {
        return ctx.fail(ENOSPC, budget);
    }
    // Buffered writes go to the thread pool even with io_uring: measured on
    // ext4, io_uring punts them to its io-wq threads (the inode lock may
    // block), which cost a third of random-write IOPS. O_DIRECT writes are
    // truly asynchronous, so they take the ring.
    if ctx.export.volume.data.backing().remote().is_some() {
        let area = ctx.export.volume.data.clone();
        let (offset, fua) = (ctx.req.offset, ctx.req.flags & CMD_FLAG_FUA != 0);
        let len = data.len();
        let write = move || {
            area.write_remote(offset, data, fua, move |result| {
                ctx.finish(result.map(|()| Body::Empty), budget)
            })
        };
        // Small writes are encrypted right here (well under the cost of a
        // thread hand-off); large ones on a worker, off the event loop.
        if len <= INLINE_ENCRYPT_MAX {
            write();
        } else {
            crate::io::workers::spawn(write);
        }
        return;
    }
    let direct = ctx.export.volume.data.backing().is_direct();
    if let (Engine::Uring(engine), true) = (engine::current(), direct) {
        let area = ctx.export.volume.data.clone();
        let (offset, fua) = (ctx.req.offset, ctx.req.flags & CMD_FLAG_FUA != 0);
        engine.submit(move |ring| {
            area.write_on_ring(ring, offset, data, fua, move |result| {
                ctx.finish(result.map(|()| Body::Empty), budget)
            })
        });
        return;
    }
    ctx.run(budget, move |export, req| {
        export.volume.data.write(req.offset, &mut data)?;
        Ok(Body::Empty)
    });
}

fn handle(ctx: Ctx, budget: OwnedSemaphorePermit) {
    let req = ctx.req;
    // Flags that are unknown, not valid for this command, or not
    // advertised (DF without structured replies, FAST_ZERO, FUA on READ).
    if req.flags & !valid_flags(req.kind, ctx.features) != 0 {
        return ctx.fail(EINVAL, budget);
    }
    match req.kind {
        CMD_READ => {
            if req.length > MAX_PAYLOAD {
                return ctx.fail(EINVAL, budget);
            }
            if !ctx.in_range() {
                return ctx.fail(EINVAL, budget);
            }
            if ctx.export.volume.data.backing().remote().is_some() {
                let area = ctx.export.volume.data.clone();
                let (offset, len) = (req.offset, req.length as usize);
                area.read_remote(offset, len, move |result| {
                    ctx.finish(result.map(Body::Data), budget)
                });
                return;
            }
            if let Engine::Uring(engine) = engine::current() {
                let area = ctx.export.volume.data.clone();
                let (offset, len) = (req.offset, req.length as usize);
                engine.submit(move |ring| {
                    area.read_on_ring(ring, offset, len, move |result| {
                        ctx.finish(result.map(Body::Data), budget)
                    })
                });
                return;
            }
            ctx.run(budget, |export, req| {
                export
                    .volume
                    .data
                    .read(req.offset, req.length as usize)
                    .map(Body::Data)
            });
        }
        CMD_FLUSH => ctx.run(budget, |export, _| {
            export.volume.data.flush()?;
            Ok(Body::Empty)
        }),
        CMD_WRITE_ZEROES => {
            if !ctx.in_range() {
                return ctx.fail(ENOSPC, budget);
            }
            let punch = ctx.export.allow_discards && req.flags & CMD_FLAG_NO_HOLE == 0;
            // FAST_ZERO: fail at once rather than write zeros slowly; the
            // client then falls back to its own way (e.g. skipping zeros).
            if req.flags & CMD_FLAG_FAST_ZERO != 0 && !ctx.export.volume.data.zeroes_fast(punch) {
                return ctx.fail(ENOTSUP, budget);
            }
            ctx.run(budget, move |export, req| {
                export
                    .volume
                    .data
                    .write_zeroes(req.offset, u64::from(req.length), punch)?;
                Ok(Body::Empty)
            });
        }
        CMD_TRIM => {
            if !ctx.export.allow_discards || !ctx.in_range() {
                return ctx.fail(EINVAL, budget);
            }
            ctx.run(budget, |export, req| {
                export.volume.data.trim(req.offset, u64::from(req.length))?;
                Ok(Body::Empty)
            });
        }
        CMD_BLOCK_STATUS => {
            // Only with `base:allocation` negotiated (valid_flags already
            // refused REQ_ONE otherwise), for a non-empty range inside.
            if !ctx.features.base_allocation || req.length == 0 || !ctx.in_range() {
                return ctx.fail(EINVAL, budget);
            }
            let one = req.flags & CMD_FLAG_REQ_ONE != 0;
            ctx.run(budget, move |export, req| {
                let runs = export.volume.data.allocation(
                    req.offset,
                    u64::from(req.length),
                    if one { 1 } else { MAX_EXTENTS },
                )?;
                Ok(Body::Extents(
                    runs.into_iter()
                        .map(|(len, hole)| {
                            let flags = if hole { STATE_HOLE | STATE_ZERO } else { 0 };
                            (len as u32, flags)
                        })
                        .collect(),
                ))
            });
        }
        CMD_CACHE => {
            let code = if ctx.in_range() { 0 } else { EINVAL };
            ctx.fail(code, budget);
        }
        _ => ctx.fail(EINVAL, budget),
    }
}

/// Reads and drops `len` bytes of a payload we refuse.
async fn discard<R: AsyncRead + Unpin>(reader: &mut R, len: u32) -> std::io::Result<()> {
    let copied = tokio::io::copy(&mut reader.take(u64::from(len)), &mut tokio::io::sink()).await?;
    if copied < u64::from(len) {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

async fn write_replies<W: AsyncWrite + Unpin>(
    writer: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
) -> std::io::Result<()> {
    let mut out = BufWriter::with_capacity(256 * 1024, writer);
    while let Some(reply) = rx.recv().await {
        out.write_all(reply.header.as_slice()).await?;
        if let Some(data) = &reply.data {
            out.write_all(data).await?;
        }
        drop(reply);
        // Batch replies that are already waiting into one write.
        if rx.is_empty() {
            out.flush().await?;
        }
    }
    out.flush().await?;
    out.shutdown().await
}
