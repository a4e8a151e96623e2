//! How replies leave a connection: sent at once by the thread that
//! completed the request, when the socket takes them whole, or else
//! queued for the connection's writer task.
//!
//! Every request used to cross threads twice (reader task → I/O thread →
//! writer task), and the second wake-up cost QD1 latency and CPU on every
//! reply. Now a completion on a ring or worker thread tries one
//! non-blocking `sendmsg` of header and payload on a plaintext socket. The
//! writer task takes over only when the socket is full (or the stream is
//! TLS): from then until its queue is empty it alone writes, so bytes of
//! two replies never interleave. A reply only partly sent is finished by
//! the writer before anything else.
//!
//! A reply that cannot be written for `reply_timeout` (the client stopped
//! reading) ends the connection: the sink is marked broken, which the
//! readers watch, and a plaintext socket is also shut down (a ring reader
//! then sees the end); every reply still owed is dropped with the byte
//! budget it held. A client that never reads pins at most its connection's
//! budget, and only for that long.
//!
//! A connection whose writer failed or timed out is marked broken, so a
//! reader waiting for budget on its behalf gives up (`budget.rs`).
//!
//! What lives elsewhere: encoding a reply (`transmission.rs`), the byte
//! budgets whose permits replies carry until they are written (`budget.rs`).

use std::io::IoSlice;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, Notify};

use super::budget::{Permit, ReplyMemory};
use crate::io::IoBuf;
use crate::wire::nbd::MAX_CHUNK_HEADER;

/// Longest inline reply header: an extended chunk header and a read's
/// offset (an error chunk's errno and message length are shorter).
const INLINE_HEAD: usize = MAX_CHUNK_HEADER + 8;

/// Reply header bytes: inline for every reply but BLOCK_STATUS, so the
/// common path allocates nothing per reply.
pub enum Head {
    Inline {
        bytes: [u8; INLINE_HEAD],
        len: usize,
    },
    Heap(Vec<u8>),
}

impl Head {
    pub fn of(parts: &[&[u8]]) -> Head {
        let mut bytes = [0u8; INLINE_HEAD];
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

pub struct Reply {
    /// The reply header, and for chunks whatever precedes the data.
    pub header: Head,
    pub data: Option<IoBuf>,
    /// Bytes already sent directly; the writer sends the rest.
    pub sent: usize,
    /// Held until the reply is written: its share of the byte budgets.
    pub _budget: Permit,
}

impl Reply {
    fn len(&self) -> usize {
        self.header.as_slice().len() + self.data.as_ref().map_or(0, |d| d.len())
    }

    /// The unsent parts: what is left of the header, then of the data.
    fn unsent(&self) -> [&[u8]; 2] {
        let header = self.header.as_slice();
        let data = self.data.as_deref().unwrap_or(&[]);
        if self.sent < header.len() {
            [&header[self.sent..], data]
        } else {
            [&[], &data[self.sent - header.len()..]]
        }
    }
}

/// How a connection's replies leave: straight to the plaintext socket
/// when there is one (`direct`), how long one may wait for a client
/// that does not read it, and the daemon-wide budget for read and
/// BLOCK_STATUS replies.
#[derive(Debug, Clone)]
pub struct ReplyRoute {
    pub direct: Option<RawFd>,
    pub timeout: std::time::Duration,
    pub memory: Arc<ReplyMemory>,
}

/// Where a connection's replies go.
pub struct ReplySink {
    /// The plaintext socket, when direct sends are allowed. It stays open
    /// while any request of the connection can still reply: the writer
    /// task owns the socket's write half and returns only after every
    /// sender (one per request in flight) is gone.
    direct: Option<RawFd>,
    /// True while the writer task owns the socket (its queue is not empty
    /// or its buffer not flushed). Replies are queued under this lock.
    writer_owns: Mutex<bool>,
    queue: mpsc::UnboundedSender<Reply>,
    /// The writer failed or timed out: no reply reaches the client now.
    broken: AtomicBool,
    broke: Notify,
}

/// A connection's writer task, which ends when every clone of its sink
/// is gone and the queue is written out.
pub struct ReplyWriter(tokio::task::JoinHandle<std::io::Result<()>>);

impl ReplyWriter {
    /// Waits until every reply owed has been written (or the stream
    /// failed, which is only logged: the client is gone).
    pub async fn finish(self, peer: &str) {
        match self.0.await {
            Ok(Err(e)) => tracing::debug!(peer, "reply stream closed: {e}"),
            Err(e) => tracing::error!(peer, "reply writer failed: {e}"),
            Ok(Ok(())) => {}
        }
    }
}

impl ReplySink {
    /// The sink and its writer task, started on the current runtime.
    pub fn start<W>(
        writer: W,
        ReplyRoute {
            direct,
            timeout: reply_timeout,
            ..
        }: ReplyRoute,
    ) -> (Arc<ReplySink>, ReplyWriter)
    where
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (queue, rx) = mpsc::unbounded_channel();
        let sink = Arc::new(ReplySink {
            direct,
            writer_owns: Mutex::new(false),
            queue,
            broken: AtomicBool::new(false),
            broke: Notify::new(),
        });
        let task = tokio::spawn(write_replies(
            writer,
            rx,
            Arc::downgrade(&sink),
            reply_timeout,
        ));
        (sink, ReplyWriter(task))
    }

    fn owns(&self) -> MutexGuard<'_, bool> {
        // A panic while holding this lock cannot leave it inconsistent.
        self.writer_owns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the writer failed or timed out (see [`ReplySink::broken`]).
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Returns once the writer failed or timed out.
    pub async fn broken(&self) {
        loop {
            // Created before the check, so a wake-up in between is kept.
            let woken = self.broke.notified();
            if self.is_broken() {
                return;
            }
            woken.await;
        }
    }

    fn break_off(&self) {
        self.broken.store(true, Ordering::Release);
        self.broke.notify_waiters();
    }

    /// Sends `reply` now if the socket takes it, else queues the rest.
    pub fn send(&self, mut reply: Reply) {
        let mut owns = self.owns();
        if let (Some(fd), false) = (self.direct, *owns) {
            match send_now(fd, &reply.unsent()).ok() {
                Some(n) if n == reply.len() => return,
                Some(n) => reply.sent = n,
                None => {}
            }
            *owns = true;
        }
        // A send fails only when the writer is gone (client hung up).
        let _ = self.queue.send(reply);
    }
}

/// One non-blocking `sendmsg` of `parts`: the bytes sent. A direct send
/// that would block or fails leaves the reply to the writer, which then
/// meets the error; the ring reader's writer sends with it too.
pub(super) fn send_now(fd: RawFd, parts: &[&[u8]; 2]) -> std::io::Result<usize> {
    let slices = [IoSlice::new(parts[0]), IoSlice::new(parts[1])];
    // SAFETY: `msghdr` is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSlice is guaranteed ABI-compatible with `iovec`; the slices and
    // the buffers they point to outlive the call, and sendmsg only reads.
    msg.msg_iov = slices.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = slices.len();
    // SAFETY: `fd` is open (callers keep it so: `ReplySink::direct`, the
    // ring reader's `SocketWriter`), `msg` points at live
    // memory for the whole call; MSG_DONTWAIT never blocks this thread,
    // MSG_NOSIGNAL turns a closed peer into EPIPE instead of SIGPIPE.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
}

async fn write_replies<W: AsyncWrite + Unpin>(
    writer: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    sink: std::sync::Weak<ReplySink>,
    reply_timeout: std::time::Duration,
) -> std::io::Result<()> {
    let mut out = BufWriter::with_capacity(256 * 1024, writer);
    let mut result = Ok(());
    // A write that makes no progress for `reply_timeout` ends the
    // connection (see the module doc).
    let stalled = |sink: &std::sync::Weak<ReplySink>| {
        tracing::warn!(
            "a reply could not be written for {reply_timeout:?} (the client is not reading); closing the connection"
        );
        if let Some(sink) = sink.upgrade() {
            sink.break_off();
            if let Some(fd) = sink.direct {
                // SAFETY: the socket stays open while this writer owns its
                // write half; shutdown takes no memory.
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            }
        }
        std::io::Error::new(std::io::ErrorKind::TimedOut, "reply write timed out")
    };
    while let Some(reply) = rx.recv().await {
        if result.is_err() {
            // Keep the socket (and so its descriptor) until every request
            // has replied, dropping replies nobody can receive.
            continue;
        }
        for part in reply.unsent() {
            match tokio::time::timeout(reply_timeout, out.write_all(part)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    result = Err(e);
                    break;
                }
                Err(_) => {
                    result = Err(stalled(&sink));
                    break;
                }
            }
        }
        drop(reply);
        if result.is_err() {
            if let Some(sink) = sink.upgrade() {
                sink.break_off();
            }
        }
        // Batch replies that are already waiting into one write.
        if rx.is_empty() && result.is_ok() {
            match tokio::time::timeout(reply_timeout, out.flush()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    result = Err(e);
                    if let Some(sink) = sink.upgrade() {
                        sink.break_off();
                    }
                    continue;
                }
                Err(_) => {
                    result = Err(stalled(&sink));
                    continue;
                }
            }
            // Hand the socket back to direct sends if nothing came in
            // meanwhile (replies are queued under the same lock).
            if let Some(sink) = sink.upgrade() {
                let mut owns = sink.owns();
                if rx.is_empty() {
                    *owns = false;
                }
            }
        }
    }
    result?;
    let last = async {
        out.flush().await?;
        out.shutdown().await
    };
    match tokio::time::timeout(reply_timeout, last).await {
        Ok(done) => done,
        Err(_) => Err(stalled(&sink)),
    }
}
