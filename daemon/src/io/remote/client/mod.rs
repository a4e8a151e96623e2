//! An NBD client for remote backings: hostcryptd in front of any storage
//! that speaks NBD (qemu-nbd, qemu-storage-daemon, nbdkit), which then
//! only ever sees ciphertext.
//!
//! Shape: up to `connections` sockets (more than one only when the server
//! advertises CAN_MULTI_CONN, so a FLUSH on one covers writes completed
//! on any), each with a reader thread that also reconnects it
//! (`link.rs`). Requests are kept in one table until their reply; a
//! request whose connection dies is sent again on another one or after
//! reconnecting (reads and writes at a fixed offset are idempotent, and
//! requests are re-sent in the order they were first sent, so a FLUSH
//! follows the writes it covered). A watchdog fails requests older than
//! `timeout` with `TimedOut` and closes the connection they sat on, so a
//! hung server cannot hold clients forever; while every connection is
//! down, requests wait (clients see a stall) until that same deadline.
//! Connecting, TLS and the option exchange share one deadline of that
//! same `timeout` per connection (`link::open`), so a server that
//! trickles its handshake fails the attempt instead of holding it.
//!
//! Durability across a lost connection. Re-sending covers only requests
//! still in flight; two hazards remain, and both are reported as a
//! *durability loss* (`DurabilityLost`) rather than repaired:
//!
//! - writes acknowledged since the last successful FLUSH, on a connection
//!   that is then lost: the server may have held them in a volatile cache
//!   and crashed (nbdkit's cache filter in writeback mode, any server with
//!   a write-back cache), so a FLUSH after the reconnect would vouch for
//!   data that is gone;
//! - a write that was sent and then timed out, or was in flight on a
//!   connection that was lost: the server may still apply it later, over
//!   a newer write to the same blocks (a TCP connection's far end does
//!   not stop when ours does).
//!
//! A loss fails every FLUSH in flight when it happens, and is handed to
//! the hook the owner installs (`on_durability_lost`); `io/backing.rs`
//! records it as a failed sync (`io/write_back.rs`), so every later FLUSH
//! and FUA on the volume fails until it is reopened, as after a failed
//! fdatasync on a local backing. Replaying unflushed writes instead would
//! need a copy of every write until the next FLUSH, and would still not
//! fence a stale write the server applies late; fencing ranges until a
//! FLUSH on a fresh connection would, but the sticky failure is simpler,
//! tells the client its durability is gone, and matches local backings.
//!
//! Completions run on the reader thread as callbacks (`Done`), so many
//! requests are in flight without a thread each; the blocking calls
//! (`call`) wait for such a callback. Hand-written, as the server side
//! is: no maintained Rust NBD client speaks OPT_GO, structured replies and
//! out-of-order completion (the `nbd` crate speaks EXPORT_NAME only).
//! Block-size alignment and splitting are the caller's (`io/remote/mod.rs`).

mod coverage;
mod link;
pub mod negotiate;
mod socket;
mod tls;
pub mod uri;

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::io::IoBuf;
use crate::wire::nbd::*;
pub use negotiate::ExportInfo;
pub use uri::NbdUri;

use link::{Link, Stream};

/// How a remote backing is reached and how long its outages are borne.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// Connections to open when the server allows several (CAN_MULTI_CONN).
    pub connections: usize,
    /// How long a request may wait for the backend (stalled while it is
    /// down, or unanswered while it is up) before it fails with EIO.
    pub timeout: Duration,
    /// For `nbds://`: `ca-cert.pem`, and `client-cert.pem` with
    /// `client-key.pem` when the server asks for a client certificate.
    pub tls_certificates: Option<PathBuf>,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            connections: 4,
            timeout: Duration::from_secs(30),
            tls_certificates: None,
        }
    }
}

/// Called once with a request's outcome: the data for a read, an empty
/// buffer otherwise.
pub type Done = Box<dyn FnOnce(io::Result<IoBuf>) + Send>;

/// A request in the table, from submission to reply (or failure).
struct Pending {
    command: Command,
    flags: u16,
    offset: u64,
    length: u32,
    /// A write's payload (shared, so a re-send needs no copy).
    payload: Option<Arc<IoBuf>>,
    /// A read's destination; out of the table while a reply fills it.
    buf: Option<IoBuf>,
    /// The connection (slot, generation) it was last sent on.
    sent_on: Option<(usize, u64)>,
    since: Instant,
    /// `None` once the watchdog failed it: its reply, if any, is dropped.
    done: Option<Done>,
    /// An error chunk of a structured reply, or a chunk that did not fit
    /// the request, reported at the last chunk.
    error: Option<u32>,
    /// The bytes of `buf` the reply has written so far; a read succeeds
    /// only once they are all of it (the buffer is pooled memory).
    covered: coverage::Coverage,
    /// Whether it was ever handed to a connection: a write that was may
    /// still land on the server even after its connection is gone.
    ever_sent: bool,
    /// For a FLUSH: the acknowledged writes it covers (`State::acked` when
    /// it was submitted: those completed before it was sent).
    covers: u64,
    /// `State::losses` when it was submitted: a FLUSH that sees a loss
    /// happen while it is in flight fails.
    losses: u64,
}

impl Pending {
    /// Whether it changes the export's contents.
    fn writes(&self) -> bool {
        matches!(
            self.command,
            Command::Write | Command::WriteZeroes | Command::Trim
        )
    }
}

#[derive(Default)]
struct State {
    next_cookie: u64,
    pending: BTreeMap<u64, Pending>,
    /// The generation of each slot's live connection, `None` while down.
    up: Vec<Option<u64>>,
    round_robin: usize,
    /// Since when no connection has been up.
    down_since: Option<Instant>,
    last_error: Option<String>,
    /// Writes acknowledged without FUA so far: write number `n` is the
    /// `n`th such acknowledgement.
    acked: u64,
    /// The highest write number a successful FLUSH covered.
    flushed: u64,
    /// Per slot, the highest write number acknowledged on its live
    /// connection: if it is above `flushed` when that connection is lost,
    /// the server may have dropped those writes.
    dirty: Vec<u64>,
    /// How many durability losses there have been, and the last one.
    losses: u64,
    last_loss: Option<DurabilityLost>,
}

/// Why writes the server acknowledged may not be what it holds: see the
/// module documentation. Every later FLUSH must fail until the volume is
/// reopened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurabilityLost {
    #[error("the connection to the remote backing was lost with up to {writes} acknowledged writes not yet flushed; a backend with a volatile cache may have dropped them")]
    Unflushed { writes: u64 },
    #[error("the connection to the remote backing was lost with {writes} writes in flight; the backend may still apply them after newer writes")]
    InFlight { writes: u64 },
    #[error("a write of {length} bytes at {offset} to the remote backing timed out; the backend may still apply it after newer writes")]
    TimedOut { offset: u64, length: u32 },
}

/// Told of each durability loss, before any request is re-sent.
pub type LossHook = Arc<dyn Fn(&DurabilityLost) + Send + Sync>;

#[derive(Default)]
struct Counters {
    reconnects: AtomicU64,
    timeouts: AtomicU64,
    resent: AtomicU64,
    errors: AtomicU64,
}

struct Shared {
    uri: NbdUri,
    options: RemoteOptions,
    info: ExportInfo,
    state: Mutex<State>,
    /// Wakes the watchdog and reconnect back-offs when closing.
    changed: Condvar,
    links: Vec<Link>,
    closing: AtomicBool,
    counters: Counters,
    on_loss: Mutex<Option<LossHook>>,
}

/// What `hostcrypt status` and the metrics show about a remote backing.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct RemoteStatus {
    /// `up`, `degraded` (some connections down) or `down`.
    pub state: String,
    pub connections_up: usize,
    pub connections: usize,
    pub in_flight: usize,
    pub reconnects: u64,
    pub timeouts: u64,
    pub resent: u64,
    pub errors: u64,
    pub min_block: u32,
    pub max_block: u32,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last_error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{uri}: {source}")]
    Uri { uri: String, source: uri::UriError },
    #[error("cannot connect to {uri}: {source}")]
    Connect { uri: String, source: io::Error },
    #[error("{uri}: connecting and the NBD handshake took longer than {}; is the server overloaded or not an NBD server?", humantime::format_duration(*after))]
    HandshakeTimedOut { uri: String, after: Duration },
    #[error("{uri}: {source}")]
    Negotiate {
        uri: String,
        source: negotiate::NegotiateError,
    },
}

/// A connected remote export. Dropping it disconnects.
pub struct NbdClient {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("uri", &self.shared.uri)
            .field("info", &self.shared.info)
            .finish_non_exhaustive()
    }
}

impl NbdClient {
    /// Connects to `text` (an NBD URI). The first connection is made here,
    /// so an unreachable or misconfigured backend is an error at once;
    /// further connections that fail now are retried in the background.
    pub fn connect(text: &str, options: RemoteOptions) -> Result<Self, ClientError> {
        let uri = NbdUri::parse(text).map_err(|source| ClientError::Uri {
            uri: text.to_string(),
            source,
        })?;
        // One deadline for every connection opened here, so connecting
        // takes at most `timeout` however many connections are wanted.
        let deadline = Instant::now() + options.timeout;
        let (first, info) = link::open(&uri, &options, deadline).map_err(|e| match e {
            link::OpenError::Io(source) => ClientError::Connect {
                uri: text.to_string(),
                source,
            },
            link::OpenError::Negotiate(source) => ClientError::Negotiate {
                uri: text.to_string(),
                source,
            },
            link::OpenError::TimedOut(after) => ClientError::HandshakeTimedOut {
                uri: text.to_string(),
                after,
            },
        })?;
        let wanted = if info.has(TFLAG_CAN_MULTI_CONN) {
            options.connections.clamp(1, 64)
        } else {
            1
        };
        let mut streams = vec![Some((first, info.structured))];
        for _ in 1..wanted {
            streams.push(
                link::open(&uri, &options, deadline)
                    .ok()
                    .map(|(s, info)| (s, info.structured)),
            );
        }
        let shared = Arc::new(Shared {
            uri,
            options,
            info,
            state: Mutex::new(State {
                up: vec![None; wanted],
                dirty: vec![0; wanted],
                ..State::default()
            }),
            changed: Condvar::new(),
            links: (0..wanted).map(|_| Link::default()).collect(),
            closing: AtomicBool::new(false),
            counters: Counters::default(),
            on_loss: Mutex::new(None),
        });
        for (slot, stream) in streams.into_iter().enumerate() {
            let shared = shared.clone();
            if let Some((stream, _)) = &stream {
                shared.links[slot].install(&shared, slot, stream);
            }
            std::thread::Builder::new()
                .name(format!("hostcrypt-nbd-{slot}"))
                .spawn(move || link::run(&shared, slot, stream))
                .map_err(|source| ClientError::Connect {
                    uri: text.to_string(),
                    source,
                })?;
        }
        let watched = shared.clone();
        std::thread::Builder::new()
            .name("hostcrypt-nbd-watchdog".into())
            .spawn(move || watchdog(&watched))
            .map_err(|source| ClientError::Connect {
                uri: text.to_string(),
                source,
            })?;
        Ok(NbdClient { shared })
    }

    pub fn info(&self) -> &ExportInfo {
        &self.shared.info
    }

    /// Installs the hook told of durability losses (see the module
    /// documentation); a loss that happened before it was installed is
    /// reported to it at once.
    pub fn on_durability_lost(&self, hook: LossHook) {
        *self
            .shared
            .on_loss
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(hook.clone());
        if let Some(loss) = self.shared.lock().last_loss.clone() {
            hook(&loss);
        }
    }

    /// Sends one request; `done` runs when it completes or fails. `len`
    /// is the read length (a write's comes from its payload).
    pub fn submit(
        &self,
        command: Command,
        flags: u16,
        offset: u64,
        len: u32,
        payload: Option<IoBuf>,
        done: Done,
    ) {
        let length = payload.as_ref().map_or(len, |p| p.len() as u32);
        let pending = Pending {
            command,
            flags,
            offset,
            length,
            payload: payload.map(Arc::new),
            buf: (command == Command::Read).then(|| IoBuf::new(length as usize)),
            sent_on: None,
            since: Instant::now(),
            done: Some(done),
            error: None,
            covered: coverage::Coverage::default(),
            ever_sent: false,
            covers: 0,
            losses: 0,
        };
        self.shared.dispatch_new(pending);
    }

    /// `submit`, waiting for the outcome.
    pub fn call(
        &self,
        command: Command,
        flags: u16,
        offset: u64,
        len: u32,
        payload: Option<IoBuf>,
    ) -> io::Result<IoBuf> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.submit(
            command,
            flags,
            offset,
            len,
            payload,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.recv()
            .unwrap_or_else(|_| Err(io::Error::other("the NBD client closed")))
    }

    pub fn status(&self) -> RemoteStatus {
        let s = &self.shared;
        let state = s.lock();
        let up = state.up.iter().filter(|u| u.is_some()).count();
        let c = &s.counters;
        RemoteStatus {
            state: match up {
                0 => "down",
                n if n < state.up.len() => "degraded",
                _ => "up",
            }
            .to_string(),
            connections_up: up,
            connections: state.up.len(),
            in_flight: state.pending.len(),
            reconnects: c.reconnects.load(Ordering::Relaxed),
            timeouts: c.timeouts.load(Ordering::Relaxed),
            resent: c.resent.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            min_block: s.info.min_block,
            max_block: s.info.max_block,
            last_error: state.last_error.clone(),
        }
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        let s = &self.shared;
        s.closing.store(true, Ordering::SeqCst);
        for link in &s.links {
            link.disconnect();
        }
        s.changed.notify_all();
        // Requests still waiting get an answer rather than hanging a caller.
        let orphans: Vec<Done> = {
            let mut state = s.lock();
            std::mem::take(&mut state.pending)
                .into_values()
                .filter_map(|p| p.done)
                .collect()
        };
        for done in orphans {
            done(Err(io::Error::other("the remote backing was closed")));
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    fn dispatch_new(&self, mut pending: Pending) {
        let mut state = self.lock();
        if self.closing() {
            drop(state);
            return fail(pending, io::Error::other("the remote backing was closed"));
        }
        // Down past the deadline already: fail now instead of stalling
        // every new request for another full timeout.
        if state
            .down_since
            .is_some_and(|t| t.elapsed() >= self.options.timeout)
        {
            drop(state);
            return fail(pending, self.unreachable());
        }
        let cookie = state.next_cookie;
        state.next_cookie += 1;
        pending.covers = state.acked;
        pending.losses = state.losses;
        state.pending.insert(cookie, pending);
        let target = assign(&mut state, cookie);
        drop(state);
        if let Some(target) = target {
            self.send(cookie, target);
        }
    }

    fn unreachable(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the remote backing has been unreachable for over {}",
                humantime::format_duration(self.options.timeout)
            ),
        )
    }

    /// Marks `cookie` as sent on `target` and writes it there. A failed
    /// write leaves the request in the table: the connection's reader sees
    /// the broken socket and re-sends it elsewhere.
    /// `target` was assigned by `pick` under the lock; a request moved
    /// elsewhere since (its connection died) is not sent twice.
    fn send(&self, cookie: u64, target: (usize, u64)) {
        let (header, payload) = {
            let mut state = self.lock();
            let Some(p) = state.pending.get_mut(&cookie) else {
                return;
            };
            if p.sent_on != Some(target) {
                return;
            }
            if p.command == Command::Read && p.buf.is_none() {
                p.buf = Some(IoBuf::new(p.length as usize));
            }
            // A re-send starts over: what a lost connection's reply wrote
            // or reported does not count towards this one.
            p.covered.clear();
            p.error = None;
            p.ever_sent = true;
            (request_header(p, cookie), p.payload.clone())
        };
        self.links[target.0].send(target.1, header, payload);
    }

    /// Re-sends (in first-sent order) the requests that were on a lost
    /// connection or waiting for one.
    fn redispatch(&self, lost: Option<usize>) {
        let moves: Vec<(u64, (usize, u64))> = {
            let mut state = self.lock();
            let orphaned: Vec<u64> = state
                .pending
                .iter()
                .filter(|(_, p)| match (lost, p.sent_on) {
                    (_, None) => true,
                    (Some(slot), Some((s, _))) => s == slot,
                    (None, Some(_)) => false,
                })
                .map(|(c, _)| *c)
                .collect();
            let mut moves = Vec::new();
            for cookie in orphaned {
                let abandoned = state.pending.get(&cookie).is_some_and(|p| p.done.is_none());
                if abandoned {
                    state.pending.remove(&cookie);
                    continue;
                }
                if let Some(target) = assign(&mut state, cookie) {
                    if lost.is_some() {
                        self.counters.resent.fetch_add(1, Ordering::Relaxed);
                    }
                    moves.push((cookie, target));
                }
            }
            moves
        };
        for (cookie, target) in moves {
            self.send(cookie, target);
        }
    }

    /// Finishes `cookie` with the server's error code (0 = success), or
    /// the error a chunk recorded. A read succeeds only with its whole
    /// buffer written by the reply: this is where the pooled-buffer rule
    /// (`io/buffers.rs`) is enforced for remote reads.
    fn complete(&self, cookie: u64, error: u32) {
        let (mut p, lost) = {
            let mut state = self.lock();
            let Some(p) = state.pending.remove(&cookie) else {
                return;
            };
            let lost = (error == 0 && p.error.is_none())
                .then(|| self.account(&mut state, &p))
                .flatten();
            (p, lost)
        };
        if let Some(loss) = lost {
            return fail(p, io::Error::other(loss));
        }
        let mut error = if error != 0 {
            error
        } else {
            p.error.unwrap_or(0)
        };
        if error == 0 && p.command == Command::Read {
            let whole = p.buf.as_ref().is_some_and(|b| b.len() == p.length as usize);
            if !whole || !p.covered.is_complete(p.length) {
                tracing::warn!(
                    backing = %self.uri_text(),
                    "the remote backing ended a reply before filling the read ({} bytes at {}); failing it with EIO",
                    p.length,
                    p.offset
                );
                error = EIO;
            }
        }
        if error != 0 {
            // Defence in depth: the buffer returns to the pool holding
            // only the server's bytes and zeros.
            if let Some(buf) = p.buf.as_mut() {
                p.covered.zero_gaps(buf);
            }
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
            let err = io::Error::from_raw_os_error(error as i32);
            return fail(p, err);
        }
        if let Some(done) = p.done {
            done(Ok(p.buf.unwrap_or_else(|| IoBuf::new(0))));
        }
    }
}

impl Shared {
    /// Durability bookkeeping for a request the server reports done:
    /// counts an acknowledged write on its connection, or a FLUSH's
    /// coverage. Returns the loss that fails a FLUSH which was in flight
    /// when it happened.
    fn account(&self, state: &mut State, p: &Pending) -> Option<DurabilityLost> {
        // A server without FLUSH has no cache to lose (`io/remote/mod.rs`),
        // and a FUA write is on stable storage when acknowledged.
        let volatile = self.info.has(TFLAG_SEND_FLUSH) && p.flags & CMD_FLAG_FUA == 0;
        if p.writes() && volatile {
            state.acked += 1;
            if let Some((slot, _)) = p.sent_on {
                state.dirty[slot] = state.acked;
            }
        } else if p.command == Command::Flush {
            // Any loss so far, not only one during this FLUSH: a FLUSH
            // sent after a reconnect covers only what the backend still
            // holds, so it must not vouch for writes lost before it.
            if state.losses != p.losses || state.losses > 0 {
                return state.last_loss.clone();
            }
            state.flushed = state.flushed.max(p.covers);
        }
        None
    }

    /// Records a durability loss (under the lock); the caller then calls
    /// `report_loss` without it, before re-sending anything.
    fn lose(&self, state: &mut State, loss: DurabilityLost) -> DurabilityLost {
        state.losses += 1;
        state.last_loss = Some(loss.clone());
        state.last_error = Some(loss.to_string());
        loss
    }

    fn report_loss(&self, loss: &DurabilityLost) {
        tracing::error!(
            backing = %self.uri_text(),
            "{loss}: every FLUSH and FUA on this volume fails until it is reopened"
        );
        let hook = self
            .on_loss
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(hook) = hook {
            hook(loss);
        }
    }

    /// What losing the live connection of `slot` costs: writes it
    /// acknowledged since the last FLUSH, and writes still in flight on it
    /// (abandoned ones were counted when they timed out). Called under the
    /// lock, before its requests are re-sent.
    fn connection_lost(&self, state: &mut State, slot: usize) -> Option<DurabilityLost> {
        let dirty = std::mem::take(&mut state.dirty[slot]);
        let in_flight = state
            .pending
            .values()
            .filter(|p| p.writes() && p.done.is_some())
            .filter(|p| p.sent_on.is_some_and(|(s, _)| s == slot))
            .count() as u64;
        let loss = if dirty > state.flushed {
            DurabilityLost::Unflushed {
                writes: state.acked.saturating_sub(state.flushed),
            }
        } else if in_flight > 0 {
            DurabilityLost::InFlight { writes: in_flight }
        } else {
            return None;
        };
        Some(self.lose(state, loss))
    }
}

fn fail(p: Pending, err: io::Error) {
    if let Some(done) = p.done {
        done(Err(err));
    }
}

/// Gives `cookie` the next live connection (round robin), or none: it
/// then waits for a reconnect. Done under the lock, so a connection's
/// teardown sees every request that was meant for it.
fn assign(state: &mut State, cookie: u64) -> Option<(usize, u64)> {
    let n = state.up.len();
    let mut target = None;
    for _ in 0..n {
        let slot = state.round_robin % n;
        state.round_robin = state.round_robin.wrapping_add(1);
        if let Some(generation) = state.up[slot] {
            target = Some((slot, generation));
            break;
        }
    }
    if let Some(p) = state.pending.get_mut(&cookie) {
        p.sent_on = target;
    }
    target
}

fn request_header(p: &Pending, cookie: u64) -> [u8; REQUEST_LEN] {
    Request {
        flags: p.flags,
        command: p.command,
        cookie,
        offset: p.offset,
        length: u64::from(p.length),
    }
    .encode()
}

/// Fails requests older than the timeout, and closes the connection such
/// a request was sent on (a server that stopped answering is treated as
/// gone: the reader reconnects).
fn watchdog(s: &Shared) {
    let tick =
        (s.options.timeout / 10).clamp(Duration::from_millis(20), Duration::from_millis(500));
    let mut state = s.lock();
    while !s.closing() {
        state = s
            .changed
            .wait_timeout(state, tick)
            .map(|(g, _)| g)
            .unwrap_or_else(|p| p.into_inner().0);
        let now = Instant::now();
        let mut expired = Vec::new();
        let mut stuck = Vec::new();
        let mut late_write = None;
        state.pending.retain(|_, p| {
            if p.done.is_none() || now.duration_since(p.since) < s.options.timeout {
                return true;
            }
            expired.extend(p.done.take());
            if p.writes() && p.ever_sent {
                late_write.get_or_insert(DurabilityLost::TimedOut {
                    offset: p.offset,
                    length: p.length,
                });
            }
            match p.sent_on {
                // Kept (abandoned) so its reply, if one comes, is parsed and dropped.
                Some((slot, _)) => {
                    stuck.push(slot);
                    true
                }
                None => false,
            }
        });
        if expired.is_empty() {
            continue;
        }
        let loss = late_write.map(|l| s.lose(&mut state, l));
        drop(state);
        // Recorded and the connection broken before the client hears of
        // the timeout: a write it sends next must not be answered, nor a
        // FLUSH succeed, as if the stale one could not still land.
        if let Some(loss) = &loss {
            s.report_loss(loss);
        }
        stuck.sort_unstable();
        stuck.dedup();
        for &slot in &stuck {
            s.links[slot].disconnect();
        }
        s.counters
            .timeouts
            .fetch_add(expired.len() as u64, Ordering::Relaxed);
        tracing::warn!(
            backing = %s.uri_text(),
            requests = expired.len(),
            "remote backing did not answer within {}; failing those requests with EIO",
            humantime::format_duration(s.options.timeout)
        );
        for done in expired {
            done(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the remote backing did not answer in time",
            )));
        }
        state = s.lock();
    }
}

impl Shared {
    fn uri_text(&self) -> String {
        match &self.uri.address {
            uri::Address::Unix(p) => {
                format!("nbd+unix:///{}?socket={}", self.uri.export, p.display())
            }
            uri::Address::Tcp { host, port } => format!(
                "{}://{host}:{port}/{}",
                if self.uri.tls { "nbds" } else { "nbd" },
                self.uri.export
            ),
        }
    }
}

/// The outcomes of a `detached` client's requests, by cookie: a read's
/// bytes, or the errno (`None` for an error without one).
#[cfg(any(test, feature = "fuzzing"))]
type Outcome = Result<Vec<u8>, Option<i32>>;
#[cfg(any(test, feature = "fuzzing"))]
type Outcomes = Arc<Mutex<BTreeMap<u64, Outcome>>>;

/// A client with no connection and `requests` (command, offset, length)
/// in flight as cookies 0, 1, …, whose read buffers hold `fill` bytes
/// (standing in for a pooled buffer's old contents). For feeding it a
/// server's replies with `link::read_reply` (fuzzing and tests).
#[cfg(any(test, feature = "fuzzing"))]
fn detached(structured: bool, requests: &[(Command, u64, u32)], fill: u8) -> (Shared, Outcomes) {
    let shared = Shared {
        uri: NbdUri::parse("nbd+unix:///?socket=/nonexistent")
            .unwrap_or_else(|e| panic!("a fixed URI: {e}")),
        options: RemoteOptions::default(),
        info: ExportInfo {
            size: 1 << 20,
            flags: TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH,
            min_block: 1,
            preferred_block: 4096,
            max_block: 1 << 20,
            structured,
        },
        state: Mutex::new(State {
            up: vec![Some(1)],
            dirty: vec![0],
            ..State::default()
        }),
        changed: Condvar::new(),
        links: vec![Link::default()],
        closing: AtomicBool::new(false),
        counters: Counters::default(),
        on_loss: Mutex::new(None),
    };
    let outcomes = Outcomes::default();
    {
        let mut state = shared.lock();
        for (cookie, &(command, offset, length)) in requests.iter().enumerate() {
            let cookie = cookie as u64;
            let seen = outcomes.clone();
            let done: Done = Box::new(move |r| {
                let r = r.map(|b| b.to_vec()).map_err(|e| e.raw_os_error());
                seen.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(cookie, r);
            });
            let buf = (command == Command::Read).then(|| {
                let mut b = IoBuf::new(length as usize);
                b.fill(fill);
                b
            });
            state.pending.insert(
                cookie,
                Pending {
                    command,
                    flags: 0,
                    offset,
                    length,
                    payload: None,
                    buf,
                    sent_on: Some((0, 1)),
                    since: Instant::now(),
                    done: Some(done),
                    error: None,
                    covered: coverage::Coverage::default(),
                    ever_sent: true,
                    covers: 0,
                    losses: 0,
                },
            );
        }
    }
    (shared, outcomes)
}

/// Fuzzing (`fuzz/fuzz_targets/client.rs`): what a server sends, fed to
/// the client. The first byte's low bit picks the phase: 0 = the
/// handshake (greeting and option replies) for `negotiate`; 1 = replies
/// to four requests in flight (reads of 512 bytes at 0 and 64 KiB at
/// 4096, a write, a flush), read until the stream fails; bit 1 says
/// structured replies were negotiated.
///
/// The oracle: the replies are fed twice, to read buffers holding
/// different old contents. A read that succeeds must return exactly its
/// length, and the same bytes both times: every byte of it came from the
/// server (data, or zeros for a hole), none from the buffer's past.
#[cfg(feature = "fuzzing")]
pub(crate) fn fuzz(data: &[u8]) {
    struct Peer<'a>(&'a [u8]);
    impl io::Read for Peer<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            io::Read::read(&mut self.0, buf)
        }
    }
    impl io::Write for Peer<'_> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        let _ = negotiate::negotiate(&mut Peer(rest), "fuzz");
        return;
    }
    let requests = [
        (Command::Read, 0u64, 512u32),
        (Command::Read, 4096, 65536),
        (Command::Write, 0, 4096),
        (Command::Flush, 0, 0),
    ];
    let run = |fill: u8| {
        let (shared, outcomes) = detached(mode & 2 != 0, &requests, fill);
        let mut stream = rest;
        while link::read_reply(&shared, &mut stream, mode & 2 != 0).is_ok() {}
        let outcomes = std::mem::take(&mut *outcomes.lock().unwrap_or_else(|p| p.into_inner()));
        for (cookie, outcome) in &outcomes {
            let (command, _, length) = requests[*cookie as usize];
            if let (Command::Read, Ok(bytes)) = (command, outcome) {
                assert_eq!(bytes.len(), length as usize, "a read of the wrong length");
            }
        }
        outcomes
    };
    let first = run(0xa5);
    let second = run(0x5a);
    assert_eq!(
        first, second,
        "a read's outcome depends on its buffer's old contents"
    );
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<NbdClient>();
    is::<Stream>();
}

/// The committed fuzz seeds through the fuzz entry point and its oracle
/// (`cargo test --features fuzzing`), for machines without cargo-fuzz.
#[cfg(all(test, feature = "fuzzing"))]
mod fuzz_seeds {
    #[test]
    fn client_seeds_pass_the_oracle() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/seeds/client");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).expect("fuzz/seeds/client") {
            let path = entry.expect("a seed").path();
            super::fuzz(&std::fs::read(&path).expect("read a seed"));
            seen += 1;
        }
        assert!(seen > 0);
    }
}

/// Durability across lost connections (crafted replies fed to a detached
/// client), and the handshake's deadline (a real socket).
#[cfg(test)]
mod tests {
    use super::*;

    fn simple_ok(cookie: u64) -> Vec<u8> {
        let mut out = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out
    }

    /// Feeds the server's simple OK replies to `cookies`.
    fn ok(shared: &Shared, cookies: &[u64]) {
        let bytes: Vec<u8> = cookies.iter().flat_map(|&c| simple_ok(c)).collect();
        let mut r = &bytes[..];
        while !r.is_empty() {
            link::read_reply(shared, &mut r, false).expect("a framed reply");
        }
    }

    /// Submits a request as `dispatch_new` would (what it covers and the
    /// losses so far), already sent on the one connection.
    fn submit(shared: &Shared, outcomes: &Outcomes, cookie: u64, command: Command, flags: u16) {
        let seen = outcomes.clone();
        let mut state = shared.lock();
        let (covers, losses) = (state.acked, state.losses);
        state.pending.insert(
            cookie,
            Pending {
                command,
                flags,
                offset: 0,
                length: if command == Command::Flush { 0 } else { 512 },
                payload: None,
                buf: None,
                sent_on: Some((0, 1)),
                since: Instant::now(),
                done: Some(Box::new(move |r| {
                    let r = r.map(|b| b.to_vec()).map_err(|e| e.raw_os_error());
                    seen.lock().unwrap().insert(cookie, r);
                })),
                error: None,
                covered: coverage::Coverage::default(),
                ever_sent: true,
                covers,
                losses,
            },
        );
    }

    fn lose_connection(shared: &Shared) -> Option<DurabilityLost> {
        let mut state = shared.lock();
        shared.connection_lost(&mut state, 0)
    }

    #[test]
    fn unflushed_writes_on_a_lost_connection_are_a_loss() {
        let (shared, outcomes) = detached(false, &[], 0);
        submit(&shared, &outcomes, 0, Command::Write, 0);
        ok(&shared, &[0]);
        assert_eq!(
            lose_connection(&shared),
            Some(DurabilityLost::Unflushed { writes: 1 })
        );
        // Counted once: the next connection starts clean.
        assert_eq!(lose_connection(&shared), None);
    }

    #[test]
    fn flushed_and_fua_writes_are_not_a_loss() {
        let (shared, outcomes) = detached(false, &[], 0);
        submit(&shared, &outcomes, 0, Command::Write, 0);
        ok(&shared, &[0]);
        submit(&shared, &outcomes, 1, Command::Flush, 0);
        ok(&shared, &[1]);
        submit(&shared, &outcomes, 2, Command::Write, CMD_FLAG_FUA);
        ok(&shared, &[2]);
        assert_eq!(lose_connection(&shared), None);
        assert_eq!(outcomes.lock().unwrap()[&1], Ok(vec![]));
        // A FLUSH submitted before a write was acknowledged does not cover it.
        submit(&shared, &outcomes, 3, Command::Flush, 0);
        submit(&shared, &outcomes, 4, Command::Write, 0);
        ok(&shared, &[4, 3]);
        assert_eq!(
            lose_connection(&shared),
            Some(DurabilityLost::Unflushed { writes: 1 })
        );
    }

    #[test]
    fn a_flush_in_flight_across_a_loss_fails() {
        let (shared, outcomes) = detached(false, &[], 0);
        submit(&shared, &outcomes, 0, Command::Write, 0);
        ok(&shared, &[0]);
        submit(&shared, &outcomes, 1, Command::Flush, 0);
        assert!(lose_connection(&shared).is_some());
        // Re-sent after the reconnect and answered by a server that lost
        // the write: the FLUSH must not vouch for it.
        ok(&shared, &[1]);
        assert_eq!(outcomes.lock().unwrap()[&1], Err(None));
        // A FLUSH submitted after the loss fails too, in the client
        // itself: the backing's record of the loss (`io/write_back.rs`)
        // may come a moment later, and this FLUSH must not win that race.
        submit(&shared, &outcomes, 2, Command::Flush, 0);
        ok(&shared, &[2]);
        assert_eq!(outcomes.lock().unwrap()[&2], Err(None));
    }

    #[test]
    fn writes_in_flight_on_a_lost_connection_are_a_loss() {
        let (shared, outcomes) = detached(false, &[], 0);
        submit(&shared, &outcomes, 0, Command::Write, CMD_FLAG_FUA);
        assert_eq!(
            lose_connection(&shared),
            Some(DurabilityLost::InFlight { writes: 1 })
        );
        // Reads in flight are not.
        let (shared, outcomes) = detached(false, &[(Command::Read, 0, 512)], 0);
        drop(outcomes);
        assert_eq!(lose_connection(&shared), None);
    }

    #[test]
    fn the_hook_hears_of_a_loss_even_one_before_it_was_installed() {
        let (shared, outcomes) = detached(false, &[], 0);
        submit(&shared, &outcomes, 0, Command::Write, 0);
        ok(&shared, &[0]);
        let loss = lose_connection(&shared).expect("a loss");
        shared.report_loss(&loss);
        let client = NbdClient {
            shared: Arc::new(shared),
        };
        let heard = Arc::new(Mutex::new(Vec::new()));
        let h = heard.clone();
        client.on_durability_lost(Arc::new(move |l| h.lock().unwrap().push(l.clone())));
        assert_eq!(*heard.lock().unwrap(), vec![loss]);
        assert!(client
            .status()
            .last_error
            .unwrap()
            .contains("not yet flushed"));
    }

    /// A server that accepts and then sends a valid greeting and option
    /// replies one byte every `pace`, for as long as the client listens.
    fn trickling_server(path: &std::path::Path, pace: Duration) {
        let listener = std::os::unix::net::UnixListener::bind(path).expect("bind");
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                std::thread::spawn(move || {
                    use std::io::Write;
                    let mut bytes = NBDMAGIC.to_be_bytes().to_vec();
                    bytes.extend_from_slice(&IHAVEOPT.to_be_bytes());
                    bytes.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
                    for _ in 0..1000 {
                        bytes.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
                        bytes.extend_from_slice(&OPT_STRUCTURED_REPLY.to_be_bytes());
                        bytes.extend_from_slice(&REP_ACK.to_be_bytes());
                        bytes.extend_from_slice(&0u32.to_be_bytes());
                    }
                    for b in bytes {
                        // The server's own pace, not a test's synchronisation.
                        std::thread::sleep(pace);
                        if conn.write_all(&[b]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
    }

    #[test]
    fn a_trickling_handshake_fails_within_the_deadline() {
        let dir = std::env::temp_dir().join(format!("hostcrypt-trickle-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let socket = dir.join("nbd.sock");
        trickling_server(&socket, Duration::from_millis(50));
        let timeout = Duration::from_secs(1);
        let uri = format!("nbd+unix:///?socket={}", socket.display());
        let options = RemoteOptions {
            connections: 4,
            timeout,
            tls_certificates: None,
        };
        let started = Instant::now();
        // In a thread, so a regression fails the test instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(NbdClient::connect(&uri, options).map(drop));
        });
        let outcome = rx
            .recv_timeout(timeout * 5)
            .expect("connect returned within five times its deadline");
        let elapsed = started.elapsed();
        match outcome {
            Err(ClientError::HandshakeTimedOut { after, .. }) => assert_eq!(after, timeout),
            other => panic!("{other:?}"),
        }
        assert!(elapsed < timeout * 2, "took {elapsed:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
