//! One connection slot of the NBD client: opening a socket (Unix or TCP,
//! TLS for `nbds`), the thread that reads its replies and matches them to
//! requests, and reconnecting with back-off when it breaks. Which requests
//! go where, and what happens to them on failure, is `mod.rs`'s.
//!
//! Opening a connection (connect, TLS, every option round trip) has one
//! deadline (`Deadlined`): a per-read socket timeout alone would let a
//! server that sends one byte at a time hold the attempt forever.

use std::io::{self, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::negotiate::{negotiate, ExportInfo};
use super::socket::{Deadlined, Timed};
pub use super::socket::{OpenError, Stream};
use super::uri::{Address, NbdUri};
use super::{RemoteOptions, Shared};
use crate::io::IoBuf;
use crate::wire::nbd::*;

const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Error chunks carry a message of up to 4 KiB; anything far larger is a
/// broken server.
const MAX_CHUNK_META: u32 = 64 * 1024;

/// Connects and negotiates one connection, all of it by `deadline`
/// (at most `options.timeout` from now).
pub fn open(
    uri: &NbdUri,
    options: &RemoteOptions,
    deadline: Instant,
) -> Result<(Stream, ExportInfo), OpenError> {
    let deadline = deadline.min(Instant::now() + options.timeout);
    let opened = open_by(uri, options, deadline);
    // Whatever failed last (a read timed out, a connect gave up, the TLS
    // relay stopped waiting) failed because time ran out.
    match opened {
        Err(_) if Instant::now() >= deadline => Err(OpenError::TimedOut(options.timeout)),
        other => other,
    }
}

fn open_by(
    uri: &NbdUri,
    options: &RemoteOptions,
    deadline: Instant,
) -> Result<(Stream, ExportInfo), OpenError> {
    let stream = match &uri.address {
        Address::Unix(path) => Stream::Unix(UnixStream::connect(path).map_err(OpenError::Io)?),
        Address::Tcp { host, port } => {
            let mut last =
                io::Error::new(io::ErrorKind::NotFound, "the host name resolves to nothing");
            let mut found = None;
            for addr in (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(OpenError::Io)?
            {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match TcpStream::connect_timeout(&addr, left) {
                    Ok(s) => {
                        found = Some(s);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            let s = found.ok_or(OpenError::Io(last))?;
            s.set_nodelay(true).map_err(OpenError::Io)?;
            Stream::Tcp(s)
        }
    };
    let (stream, info) = if uri.tls {
        super::tls::negotiate_tls(stream, uri, options, deadline)?
    } else {
        let mut s = Deadlined::new(&stream, deadline);
        let info = negotiate(&mut s, &uri.export).map_err(OpenError::Negotiate)?;
        (stream, info)
    };
    stream.set_timeout(None).map_err(OpenError::Io)?;
    Ok((stream, info))
}

/// The sending half of a slot: the live connection's writer and its
/// generation (bumped by every reconnect, so a request meant for a dead
/// connection is never written to its successor), and the requests
/// waiting to be written.
///
/// Sending combines: a request joins the queue, and whichever thread
/// gets the writer writes everything queued with one `writev`, so under
/// load many small requests cost one system call instead of one each.
#[derive(Default)]
pub struct Link {
    writer: Mutex<Option<(u64, Stream)>>,
    /// Another handle on the live socket, only ever used to shut it down:
    /// a writer blocked on a hung server holds `writer`, and shutting the
    /// socket down is what unblocks it.
    breaker: Mutex<Option<Stream>>,
    queue: Mutex<Vec<Outgoing>>,
    generation: AtomicU64,
}

pub(super) struct Outgoing {
    generation: u64,
    header: [u8; REQUEST_LEN],
    payload: Option<Arc<IoBuf>>,
    /// For a request that changes the export (the lease's, `lease.rs`):
    /// its cookie, its slot, and whether this is its first send.
    write: Option<OutgoingWrite>,
}

#[derive(Clone, Copy)]
pub(super) struct OutgoingWrite {
    pub cookie: u64,
    pub slot: usize,
    pub first_send: bool,
}

impl Outgoing {
    pub(super) fn write(&self) -> Option<OutgoingWrite> {
        self.write
    }

    pub(super) fn generation(&self) -> u64 {
        self.generation
    }
}

/// At most this many requests per `writev` (two iovecs each, under IOV_MAX).
const BATCH: usize = 256;

impl Link {
    fn writer(&self) -> std::sync::MutexGuard<'_, Option<(u64, Stream)>> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Vec<Outgoing>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `stream` this slot's live connection.
    pub fn install(&self, shared: &Shared, slot: usize, stream: &Stream) -> bool {
        let (Ok(writer), Ok(breaker)) = (stream.try_clone(), stream.try_clone()) else {
            return false;
        };
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        *self.writer() = Some((generation, writer));
        *self.breaker.lock().unwrap_or_else(|p| p.into_inner()) = Some(breaker);
        let mut state = shared.lock();
        state.up[slot] = Some(generation);
        state.down_since = None;
        true
    }

    /// Queues one request and writes the queue unless another thread is
    /// writing (that thread then writes this one too). A failed write
    /// shuts the socket down, which the reader notices and handles (the
    /// requests are re-sent from there).
    /// A write whose lease (`lease.rs`) ran out while it waited in the
    /// queue, behind a write blocked on a full socket, is not written: it
    /// goes back to the table, held.
    pub fn send(
        &self,
        shared: &Shared,
        generation: u64,
        header: [u8; REQUEST_LEN],
        payload: Option<Arc<IoBuf>>,
        write: Option<OutgoingWrite>,
    ) {
        self.queue().push(Outgoing {
            generation,
            header,
            payload,
            write,
        });
        loop {
            let writer = match self.writer.try_lock() {
                Ok(w) => w,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                // The holder looks at the queue again after it lets go.
                Err(std::sync::TryLockError::WouldBlock) => return,
            };
            let mut batch = std::mem::take(&mut *self.queue());
            if batch.is_empty() {
                return;
            }
            let refused = shared.hold_unleased(&mut batch);
            if let Some((live, stream)) = writer.as_ref() {
                for chunk in batch.chunks(BATCH) {
                    if write_batch(stream, *live, chunk).is_err() {
                        stream.shutdown();
                        break;
                    }
                }
            }
            drop(writer);
            // Outside the writer's lock: a completion may take its time.
            for (p, reason) in refused {
                super::fail(p, io::Error::other(reason));
            }
        }
    }

    /// Breaks the live connection (its reader then reconnects, or exits
    /// when the client is closing), asking the server politely first.
    /// Never waits for a writer: a busy connection is just shut down.
    pub fn disconnect(&self) {
        if let Ok(writer) = self.writer.try_lock() {
            if let Some((_, stream)) = writer.as_ref() {
                let disc = Request {
                    flags: 0,
                    command: Command::Disc,
                    cookie: 0,
                    offset: 0,
                    length: 0,
                };
                let _ = (&*stream).write_all(&disc.encode());
            }
        }
        if let Some(stream) = self
            .breaker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            stream.shutdown();
        }
    }

    fn clear(&self) {
        *self.breaker.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *self.writer() = None;
    }
}

/// Writes the requests of `batch` meant for connection `live` (others
/// were for a connection that is gone; the reader re-sends them).
fn write_batch(stream: &Stream, live: u64, batch: &[Outgoing]) -> io::Result<()> {
    let mut slices: Vec<io::IoSlice<'_>> = Vec::with_capacity(batch.len() * 2);
    for o in batch.iter().filter(|o| o.generation == live) {
        slices.push(io::IoSlice::new(&o.header));
        if let Some(p) = &o.payload {
            slices.push(io::IoSlice::new(p));
        }
    }
    let mut slices = &mut slices[..];
    let mut w = stream;
    while !slices.is_empty() {
        let n = w.write_vectored(slices)?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        io::IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

/// A slot's thread: reads replies while connected, reconnects when not,
/// until the client closes. `first` is the connection opened already,
/// with whether it negotiated structured replies.
pub fn run(shared: &Shared, slot: usize, first: Option<(Stream, bool)>) {
    let link = &shared.links[slot];
    let mut stream = first;
    let mut backoff = FIRST_BACKOFF;
    while !shared.closing() {
        // Structured replies are per connection: a server may stop offering
        // them when it comes back.
        let (live, structured) = match stream.take() {
            Some(s) => s,
            None => match open(
                &shared.uri,
                &shared.options,
                Instant::now() + shared.options.timeout,
            ) {
                Ok((s, info)) if same_export(&info, &shared.info) => {
                    if !link.install(shared, slot, &s) {
                        continue;
                    }
                    shared.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(backing = %shared.uri_text(), connection = slot, "reconnected to the remote backing");
                    shared.redispatch(None);
                    (s, info.structured)
                }
                outcome => {
                    let why = match outcome {
                        Ok((_, info)) => format!(
                            "the export changed: {} bytes, blocks {}..{} (was {} bytes, {}..{})",
                            info.size,
                            info.min_block,
                            info.max_block,
                            shared.info.size,
                            shared.info.min_block,
                            shared.info.max_block
                        ),
                        Err(e) => e.to_string(),
                    };
                    shared.lock().last_error = Some(why);
                    wait(shared, backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            },
        };
        let err = read_replies(shared, &live, structured);
        // A server that breaks the protocol whenever it is asked something
        // would otherwise be reconnected to in a tight loop: a protocol
        // error backs off as a failed connect does.
        let broken = err.kind() == io::ErrorKind::InvalidData;
        if !broken {
            backoff = FIRST_BACKOFF;
        }
        // Shut down first: that unblocks a writer stuck on this socket,
        // which holds the lock `clear` takes.
        live.shutdown();
        link.clear();
        let loss = {
            let mut state = shared.lock();
            state.up[slot] = None;
            if state.up.iter().all(Option::is_none) && state.down_since.is_none() {
                state.down_since = Some(std::time::Instant::now());
            }
            if !shared.closing() {
                state.last_error = Some(err.to_string());
            }
            (!shared.closing())
                .then(|| shared.connection_lost(&mut state, slot))
                .flatten()
        };
        if !shared.closing() {
            tracing::warn!(backing = %shared.uri_text(), connection = slot, "lost the remote backing: {err}; reconnecting");
        }
        // Reported before anything is re-sent: a FLUSH or FUA write that
        // completes after the reconnect must already see it.
        if let Some(loss) = &loss {
            shared.report_loss(loss);
        }
        shared.redispatch(Some(slot));
        if broken {
            wait(shared, backoff);
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

fn same_export(now: &ExportInfo, was: &ExportInfo) -> bool {
    now.size == was.size && now.min_block == was.min_block && now.max_block >= was.max_block
}

fn wait(shared: &Shared, pause: Duration) {
    let state = shared.lock();
    if shared.closing() {
        return;
    }
    let _ = shared.changed.wait_timeout(state, pause);
}

fn protocol(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// Reads replies until the connection fails; returns why it did.
fn read_replies(shared: &Shared, stream: &Stream, structured: bool) -> io::Error {
    let mut r = BufReader::with_capacity(64 * 1024, stream);
    loop {
        if let Err(e) = read_reply(shared, &mut r, structured) {
            return e;
        }
    }
}

/// Reads one reply (a simple reply, or one chunk of a structured one)
/// and applies it. An error return is a protocol error or a broken
/// stream: the connection is dropped and its requests re-sent. A reply
/// that is well framed but does not fit its request (a chunk outside it
/// or overlapping another, a read left incomplete) fails only that
/// request, with EIO. `structured`: whether this connection negotiated
/// structured replies.
pub(super) fn read_reply(shared: &Shared, r: &mut impl Read, structured: bool) -> io::Result<()> {
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic)?;
    match u32::from_be_bytes(magic) {
        SIMPLE_REPLY_MAGIC => {
            let mut h = [0u8; 12];
            r.read_exact(&mut h)?;
            let error = be32(&h[..4]);
            let cookie = be64(&h[4..]);
            let (kind, buf) = {
                let mut state = shared.lock();
                let p = state
                    .pending
                    .get_mut(&cookie)
                    .ok_or_else(|| protocol(format!("a reply for unknown request {cookie}")))?;
                (p.command, if error == 0 { p.buf.take() } else { None })
            };
            if kind == Command::Read && error == 0 {
                let mut buf = buf.ok_or_else(|| protocol("a read reply with no read buffer"))?;
                // The buffer is exactly the request's length: the payload
                // fills all of it or the stream breaks.
                r.read_exact(&mut buf)?;
                if let Some(p) = shared.lock().pending.get_mut(&cookie) {
                    p.covered.fill(p.length);
                    p.buf = Some(buf);
                }
            }
            shared.complete(cookie, error);
        }
        STRUCTURED_REPLY_MAGIC if !structured => {
            return Err(protocol(
                "a structured reply on a connection that did not negotiate them",
            ));
        }
        STRUCTURED_REPLY_MAGIC => {
            let mut h = [0u8; 16];
            r.read_exact(&mut h)?;
            let flags = be16(&h[..2]);
            let kind = be16(&h[2..4]);
            let cookie = be64(&h[4..12]);
            let length = be32(&h[12..16]);
            let done = flags & REPLY_FLAG_DONE != 0;
            read_chunk(shared, r, done, kind, cookie, length)?;
            if done {
                shared.complete(cookie, 0);
            }
        }
        other => return Err(protocol(format!("bad reply magic {other:#x}"))),
    }
    Ok(())
}

const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;
/// What precedes the data in an OFFSET_DATA chunk: its offset.
const DATA_HEADER: u32 = 8;
/// An OFFSET_HOLE chunk: offset and length, nothing else.
const HOLE_LEN: u32 = 12;

fn read_chunk(
    shared: &Shared,
    r: &mut impl Read,
    done: bool,
    kind: u16,
    cookie: u64,
    length: u32,
) -> io::Result<()> {
    let (command, request_len) = {
        let state = shared.lock();
        let p = state
            .pending
            .get(&cookie)
            .ok_or_else(|| protocol(format!("a reply chunk for unknown request {cookie}")))?;
        (p.command, p.length)
    };
    let is_read = command == Command::Read;
    if matches!(kind, REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE) && !is_read {
        return Err(protocol("read data for a request that is not a read"));
    }
    match kind {
        REPLY_TYPE_NONE if length == 0 && done => Ok(()),
        REPLY_TYPE_NONE if length <= MAX_CHUNK_META => {
            skip(r, length)?;
            fail_request(
                shared,
                cookie,
                "a NONE chunk that is not an empty last chunk",
            );
            Ok(())
        }
        // The one length a server chooses freely: bounded by the request
        // before a byte of it is read.
        REPLY_TYPE_OFFSET_DATA if length > request_len.saturating_add(DATA_HEADER) => {
            Err(protocol(format!(
                "a data chunk of {length} bytes for a read of {request_len}"
            )))
        }
        REPLY_TYPE_OFFSET_DATA if length < DATA_HEADER => {
            skip(r, length)?;
            fail_request(shared, cookie, "a data chunk too short for its offset");
            Ok(())
        }
        REPLY_TYPE_OFFSET_DATA => {
            let mut o = [0u8; 8];
            r.read_exact(&mut o)?;
            fill(shared, r, cookie, be64(&o), length - DATA_HEADER, true)
        }
        REPLY_TYPE_OFFSET_HOLE if length == HOLE_LEN => {
            let mut h = [0u8; 12];
            r.read_exact(&mut h)?;
            fill(shared, r, cookie, be64(&h[..8]), be32(&h[8..]), false)
        }
        REPLY_TYPE_OFFSET_HOLE if length <= MAX_CHUNK_META => {
            skip(r, length)?;
            fail_request(shared, cookie, "a hole chunk of the wrong length");
            Ok(())
        }
        REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET if (6..=MAX_CHUNK_META).contains(&length) => {
            let mut payload = vec![0u8; length as usize];
            r.read_exact(&mut payload)?;
            let code = be32(&payload[..4]);
            let message_len = be16(&payload[4..6]) as usize;
            let message = String::from_utf8_lossy(payload.get(6..6 + message_len).unwrap_or(&[]));
            if !message.is_empty() {
                tracing::debug!(backing = %shared.uri_text(), "remote backing error {code}: {message}");
            }
            if let Some(p) = shared.lock().pending.get_mut(&cookie) {
                p.error = Some(if code == 0 { EIO } else { code });
            }
            Ok(())
        }
        other if length <= MAX_CHUNK_META => {
            // Unknown chunk types are skipped; an unknown error type still
            // fails the request.
            skip(r, length)?;
            if other & (1 << 15) != 0 {
                if let Some(p) = shared.lock().pending.get_mut(&cookie) {
                    p.error = Some(EIO);
                }
            }
            Ok(())
        }
        other => Err(protocol(format!(
            "a reply chunk of type {other} with {length} bytes"
        ))),
    }
}

/// Discards `n` bytes the caller has bounded (no allocation).
fn skip(r: &mut impl Read, n: u32) -> io::Result<()> {
    let skipped = io::copy(&mut r.by_ref().take(u64::from(n)), &mut io::sink())?;
    if skipped < u64::from(n) {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Writes a chunk's `n` bytes at absolute `offset` into `cookie`'s read
/// buffer: the next `n` bytes of `r` for data, zeros for a hole. A chunk
/// that does not fit (outside the request, over bytes already written,
/// too scattered, or the buffer in use elsewhere) fails the request and
/// its data is skipped. Coverage is recorded only once the bytes are in
/// the buffer, so a read cut short never counts as written.
fn fill(
    shared: &Shared,
    r: &mut impl Read,
    cookie: u64,
    offset: u64,
    n: u32,
    data: bool,
) -> io::Result<()> {
    let skip_data = |r: &mut _| if data { skip(r, n) } else { Ok(()) };
    // Taken out first: while the buffer is out, no other chunk can write
    // it or be recorded over it.
    let Some(mut buf) = take_buf(shared, cookie) else {
        fail_request(
            shared,
            cookie,
            "read data for a read whose buffer is in use",
        );
        return skip_data(r);
    };
    let located = {
        let state = shared.lock();
        state
            .pending
            .get(&cookie)
            .map(|p| p.covered.locate(p.offset, p.length, offset, u64::from(n)))
    };
    let (start, end) = match located {
        Some(Ok(range)) => range,
        Some(Err(e)) => {
            put_buf(shared, cookie, buf);
            fail_request(shared, cookie, &e.to_string());
            return skip_data(r);
        }
        None => return skip_data(r),
    };
    let written = match buf.get_mut(start..end) {
        Some(dest) if data => r.read_exact(dest),
        Some(dest) => {
            dest.fill(0);
            Ok(())
        }
        None => Err(protocol("a read buffer shorter than its request")),
    };
    let recorded = {
        let mut state = shared.lock();
        let Some(p) = state.pending.get_mut(&cookie) else {
            return written;
        };
        p.buf = Some(buf);
        // A read cut short breaks the connection (and re-sends the
        // request); should it be finished from elsewhere, it fails.
        let recorded = match &written {
            Ok(()) => p.covered.add(start, end).map_err(Some),
            Err(_) => Err(None),
        };
        if recorded.is_err() {
            p.error = Some(EIO);
        }
        recorded
    };
    if let Err(Some(e)) = recorded {
        tracing::warn!(backing = %shared.uri_text(), "{e}; failing the read with EIO");
    }
    written
}

/// Fails `cookie` with EIO when its reply ends, for a chunk that is well
/// framed but wrong.
fn fail_request(shared: &Shared, cookie: u64, why: &str) {
    tracing::warn!(backing = %shared.uri_text(), "{why}; failing the request with EIO");
    if let Some(p) = shared.lock().pending.get_mut(&cookie) {
        p.error = Some(EIO);
    }
}

fn take_buf(shared: &Shared, cookie: u64) -> Option<crate::io::IoBuf> {
    shared
        .lock()
        .pending
        .get_mut(&cookie)
        .and_then(|p| p.buf.take())
}

fn put_buf(shared: &Shared, cookie: u64, buf: crate::io::IoBuf) {
    if let Some(p) = shared.lock().pending.get_mut(&cookie) {
        p.buf = Some(buf);
    }
}

/// Crafted reply streams against requests in flight: a reply that does
/// not fill a read fails that read (never returns the buffer's old
/// contents), and only unframeable or unexpected replies break the
/// connection.
#[cfg(test)]
mod tests;
