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
//! fdatasync on a local backing. The second hazard also fences the stale
//! write's range (`fence.rs`): a newer write there fails at once instead
//! of being acknowledged and then overwritten by the stale one. Replaying
//! unflushed writes instead would need a copy of every write until the
//! next FLUSH, and would still not stop a stale write the server applies
//! late.
//!
//! Completions run on the reader thread as callbacks (`Done`), so many
//! requests are in flight without a thread each; the blocking calls
//! (`call`) wait for such a callback. Hand-written, as the server side
//! is: no maintained Rust NBD client speaks OPT_GO, structured replies and
//! out-of-order completion (the `nbd` crate speaks EXPORT_NAME only).
//! Block-size alignment and splitting are the caller's (`io/remote/mod.rs`).

mod coverage;
#[cfg(any(test, feature = "fuzzing"))]
mod detached;
mod durability;
mod fence;
mod lease;
#[cfg(feature = "fuzzing")]
pub(crate) use detached::fuzz;
#[cfg(test)]
use detached::{detached, Outcome, Outcomes};
mod link;
pub mod negotiate;
mod socket;
mod tls;
pub mod uri;
mod watchdog;

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
    /// Ranges a timed-out or cut-off write may still reach (`fence.rs`).
    fence: fence::Fence,
    /// Whether writes may go out now (`lease.rs`).
    lease: lease::WriteLease,
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
    /// The write lease (`lease.rs`): `none`, `held` (run out: writes
    /// wait), `valid` or `revoked`.
    #[serde(default)]
    pub write_lease: String,
    /// Writes waiting for the lease.
    #[serde(default)]
    pub writes_held: usize,
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
            .spawn(move || watchdog::watchdog(&watched))
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
            write_lease: match state.lease.allows(Instant::now()) {
                Ok(true) if matches!(state.lease, lease::WriteLease::Unrestricted) => "none",
                Ok(true) => "valid",
                Ok(false) => "held",
                Err(_) => "revoked",
            }
            .to_string(),
            writes_held: state
                .pending
                .values()
                .filter(|p| p.writes() && p.sent_on.is_none())
                .count(),
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
        let mut held = false;
        if pending.writes() {
            if let Some((start, end)) = state.fence.overlap(pending.offset, pending.length) {
                drop(state);
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                return fail(pending, fenced(start, end));
            }
            match state.lease.allows(Instant::now()) {
                Ok(allowed) => held = !allowed,
                Err(reason) => {
                    drop(state);
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                    return fail(pending, io::Error::other(reason));
                }
            }
        }
        let cookie = state.next_cookie;
        state.next_cookie += 1;
        pending.covers = state.acked;
        pending.losses = state.losses;
        state.pending.insert(cookie, pending);
        // A held write waits, unassigned, for the lease (`lease.rs`).
        let target = match held {
            true => None,
            false => assign(&mut state, cookie),
        };
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
        let (header, payload, write) = {
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
            let first_send = !p.ever_sent;
            p.ever_sent = true;
            let write = p.writes().then_some(link::OutgoingWrite {
                cookie,
                slot: target.0,
                first_send,
            });
            (request_header(p, cookie), p.payload.clone(), write)
        };
        self.links[target.0].send(self, target.1, header, payload, write);
    }

    /// Re-sends (in first-sent order) the requests that were on a lost
    /// connection or waiting for one.
    fn redispatch(&self, lost: Option<usize>) {
        let mut refused = Vec::new();
        let moves: Vec<(u64, (usize, u64))> = {
            let mut state = self.lock();
            let lease = state.lease.allows(Instant::now());
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
                if state.pending.get(&cookie).is_some_and(Pending::writes) {
                    match &lease {
                        Ok(true) => {}
                        Ok(false) => {
                            if let Some(p) = state.pending.get_mut(&cookie) {
                                p.sent_on = None;
                            }
                            continue;
                        }
                        Err(reason) => {
                            refused
                                .extend(state.pending.remove(&cookie).map(|p| (p, reason.clone())));
                            continue;
                        }
                    }
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
        for (p, reason) in refused {
            fail(p, io::Error::other(reason));
        }
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

/// The error a write into a fenced range gets (`fence.rs`).
fn fenced(start: u64, end: u64) -> io::Error {
    io::Error::other(format!(
        "bytes {start}..{end} of the remote backing are fenced: an earlier write there timed out or was cut off and the backend may still apply it; writes there fail until the volume is reopened"
    ))
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
mod tests;
