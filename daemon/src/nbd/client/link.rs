//! One connection slot of the NBD client: opening a socket (Unix or TCP,
//! TLS for `nbds`), the thread that reads its replies and matches them to
//! requests, and reconnecting with back-off when it breaks. Which requests
//! go where, and what happens to them on failure, is `mod.rs`'s.

use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::negotiate::{negotiate, ExportInfo, NegotiateError};
use super::uri::{Address, NbdUri};
use super::{RemoteOptions, Shared};
use crate::io::IoBuf;
use crate::nbd::proto::*;

/// How long connecting and the handshake may take before the attempt
/// counts as failed (and is retried).
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Error chunks carry a message of up to 4 KiB; anything far larger is a
/// broken server.
const MAX_CHUNK_META: u32 = 64 * 1024;

/// A connected socket. `nbds` connections are plain sockets too: the TLS
/// session runs in a relay (`super::tls`), so reads and writes can use
/// separate threads as they do here.
#[derive(Debug)]
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }

    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => (&*s).read(buf),
            Stream::Tcp(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => (&*s).write(buf),
            Stream::Tcp(s) => (&*s).write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => (&*s).write_vectored(bufs),
            Stream::Tcp(s) => (&*s).write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Debug)]
pub enum OpenError {
    Io(io::Error),
    Negotiate(NegotiateError),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Io(e) => e.fmt(f),
            OpenError::Negotiate(e) => e.fmt(f),
        }
    }
}

/// Connects and negotiates one connection.
pub fn open(uri: &NbdUri, options: &RemoteOptions) -> Result<(Stream, ExportInfo), OpenError> {
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
                match TcpStream::connect_timeout(&addr, HANDSHAKE_TIMEOUT) {
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
    stream
        .set_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(OpenError::Io)?;
    let (stream, info) = if uri.tls {
        super::tls::negotiate_tls(stream, uri, options)?
    } else {
        let mut s = &stream;
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

struct Outgoing {
    generation: u64,
    header: [u8; REQUEST_LEN],
    payload: Option<Arc<IoBuf>>,
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
    pub fn send(&self, generation: u64, header: [u8; REQUEST_LEN], payload: Option<Arc<IoBuf>>) {
        self.queue().push(Outgoing {
            generation,
            header,
            payload,
        });
        loop {
            let writer = match self.writer.try_lock() {
                Ok(w) => w,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                // The holder looks at the queue again after it lets go.
                Err(std::sync::TryLockError::WouldBlock) => return,
            };
            let batch = std::mem::take(&mut *self.queue());
            if batch.is_empty() {
                return;
            }
            if let Some((live, stream)) = writer.as_ref() {
                for chunk in batch.chunks(BATCH) {
                    if write_batch(stream, *live, chunk).is_err() {
                        stream.shutdown();
                        break;
                    }
                }
            }
            drop(writer);
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
/// until the client closes.
pub fn run(shared: &Shared, slot: usize, first: Option<Stream>) {
    let link = &shared.links[slot];
    let mut stream = first;
    let mut backoff = FIRST_BACKOFF;
    while !shared.closing() {
        let live = match stream.take() {
            Some(s) => s,
            None => match open(&shared.uri, &shared.options) {
                Ok((s, info)) if same_export(&info, &shared.info) => {
                    if !link.install(shared, slot, &s) {
                        continue;
                    }
                    shared.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(backing = %shared.uri_text(), connection = slot, "reconnected to the remote backing");
                    shared.redispatch(None);
                    s
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
        backoff = FIRST_BACKOFF;
        let err = read_replies(shared, &live);
        // Shut down first: that unblocks a writer stuck on this socket,
        // which holds the lock `clear` takes.
        live.shutdown();
        link.clear();
        {
            let mut state = shared.lock();
            state.up[slot] = None;
            if state.up.iter().all(Option::is_none) && state.down_since.is_none() {
                state.down_since = Some(std::time::Instant::now());
            }
            if !shared.closing() {
                state.last_error = Some(err.to_string());
            }
        }
        if !shared.closing() {
            tracing::warn!(backing = %shared.uri_text(), connection = slot, "lost the remote backing: {err}; reconnecting");
        }
        shared.redispatch(Some(slot));
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
fn read_replies(shared: &Shared, stream: &Stream) -> io::Error {
    let mut r = BufReader::with_capacity(64 * 1024, stream);
    loop {
        if let Err(e) = read_reply(shared, &mut r) {
            return e;
        }
    }
}

pub(super) fn read_reply(shared: &Shared, r: &mut impl Read) -> io::Result<()> {
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
                r.read_exact(&mut buf)?;
                if let Some(p) = shared.lock().pending.get_mut(&cookie) {
                    p.buf = Some(buf);
                }
            }
            shared.complete(cookie, error);
        }
        STRUCTURED_REPLY_MAGIC => {
            let mut h = [0u8; 16];
            r.read_exact(&mut h)?;
            let flags = be16(&h[..2]);
            let kind = be16(&h[2..4]);
            let cookie = be64(&h[4..12]);
            let length = be32(&h[12..16]);
            read_chunk(shared, r, kind, cookie, length)?;
            if flags & REPLY_FLAG_DONE != 0 {
                let error = shared
                    .lock()
                    .pending
                    .get(&cookie)
                    .and_then(|p| p.error)
                    .unwrap_or(0);
                shared.complete(cookie, error);
            }
        }
        other => return Err(protocol(format!("bad reply magic {other:#x}"))),
    }
    Ok(())
}

const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

fn read_chunk(
    shared: &Shared,
    r: &mut impl Read,
    kind: u16,
    cookie: u64,
    length: u32,
) -> io::Result<()> {
    // Where the request's read buffer begins and how long it is.
    let (start, len) = {
        let state = shared.lock();
        let p = state
            .pending
            .get(&cookie)
            .ok_or_else(|| protocol(format!("a reply chunk for unknown request {cookie}")))?;
        (p.offset, u64::from(p.length))
    };
    // A server's offsets are untrusted: overflow is "outside" too.
    let place = |offset: u64, n: u64| -> io::Result<usize> {
        match offset.checked_add(n) {
            Some(end) if offset >= start && end <= start + len => Ok((offset - start) as usize),
            _ => Err(protocol("a reply chunk outside its request")),
        }
    };
    match kind {
        REPLY_TYPE_NONE if length == 0 => Ok(()),
        REPLY_TYPE_OFFSET_DATA if length >= 8 => {
            let mut o = [0u8; 8];
            r.read_exact(&mut o)?;
            let n = u64::from(length - 8);
            let at = place(be64(&o), n)?;
            let mut buf = take_buf(shared, cookie)?;
            let read = r.read_exact(&mut buf[at..at + n as usize]);
            put_buf(shared, cookie, buf);
            read
        }
        REPLY_TYPE_OFFSET_HOLE if length == 12 => {
            let mut h = [0u8; 12];
            r.read_exact(&mut h)?;
            let n = u64::from(be32(&h[8..]));
            let at = place(be64(&h[..8]), n)?;
            let mut buf = take_buf(shared, cookie)?;
            buf[at..at + n as usize].fill(0);
            put_buf(shared, cookie, buf);
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
            io::copy(&mut r.by_ref().take(u64::from(length)), &mut io::sink())?;
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

fn take_buf(shared: &Shared, cookie: u64) -> io::Result<crate::io::IoBuf> {
    shared
        .lock()
        .pending
        .get_mut(&cookie)
        .and_then(|p| p.buf.take())
        .ok_or_else(|| protocol("read data for a request that is not a read"))
}

fn put_buf(shared: &Shared, cookie: u64, buf: crate::io::IoBuf) {
    if let Some(p) = shared.lock().pending.get_mut(&cookie) {
        p.buf = Some(buf);
    }
}
