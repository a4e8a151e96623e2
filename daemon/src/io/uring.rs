//! The io_uring engine: one worker thread per core, each owning a ring.
//! Requests are handed to a worker as closures; a closure submits reads,
//! writes and fsyncs to that worker's ring and names a continuation, which
//! runs on the same thread when the completion arrives (decrypting in place,
//! then replying). Many operations are in flight per worker and every
//! wake-up submits all queued work with one `io_uring_enter`.
//!
//! Built on the `io-uring` crate (0.7) directly. Not `tokio-uring`: it has
//! had no release since 2024, pins io-uring 0.6, and its `UnixListener::bind`
//! fails on current kernels (SO_REUSEPORT on AF_UNIX). Not `compio`: we only
//! need positional file I/O on our own threads, and owning the loop lets
//! the cipher run where the completion lands.
//!
//! A job submitted from a ring's own thread (a continuation, or a
//! connection served on that ring, `frontend/nbd/ring_reader.rs`) stays on that
//! ring: it is queued thread-locally and run before the thread next
//! sleeps, with no channel, no eventfd and no other core involved.
//!
//! Besides file I/O a ring runs socket receives (`Ring::recv`), so a
//! connection's requests arrive on the same thread that reads, decrypts
//! and replies.
//!
//! A ring that runs out of work polls for more for a short while
//! (`ring_idle_poll`, `poll_for_work`) before it sleeps: on a VM, waking
//! a halted vCPU was most of a QD1 request's latency.
//!
//! Each ring registers a bounded arena of buffers (`fixed.rs`); reads the
//! ring allocates take a slot when one fits and is free, and any op whose
//! buffer is this ring's slot goes out as READ_FIXED / WRITE_FIXED. If
//! registration is refused (a low RLIMIT_MEMLOCK without CAP_IPC_LOCK),
//! the ring runs on pooled buffers only.
//!
//! Soundness: an operation's buffer (`IoBuf`: pooled heap pages or a
//! registered slot, neither of which moves when the `IoBuf` value moves) and its file descriptor (kept open by the
//! `Arc` the continuation holds) live in the pending table until the kernel
//! reports the completion, so the kernel never touches freed memory.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::ops::ControlFlow;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};

use super::fixed::{FixedArena, FIXED_SLOTS, FIXED_SLOT_BYTES};
use super::IoBuf;

/// Runs when an operation completes, on the ring's thread.
pub type Continuation = Box<dyn FnOnce(&mut Ring, io::Result<IoBuf>) + Send>;
/// Runs when a receive completes: the byte count (0 at end of stream)
/// and the buffer back.
pub type RecvContinuation = Box<dyn FnOnce(&mut Ring, io::Result<usize>, IoBuf) + Send>;
type Job = Box<dyn FnOnce(&mut Ring) + Send>;

thread_local! {
    /// On a ring's thread: jobs submitted from that thread, run before it
    /// next sleeps. `None` on every other thread.
    static LOCAL_JOBS: RefCell<Option<VecDeque<Job>>> = const { RefCell::new(None) };
    /// A thread that serves requests of its own as a ring's thread does
    /// (`serves_requests`): it may lend an idle ring too.
    static SERVES_REQUESTS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks the calling thread as one that serves requests of its own, as a
/// ring's thread does (a vhost-user queue's worker): `lend_idle_ring`
/// then lends it a ring no connection lives on.
pub fn serves_requests() {
    SERVES_REQUESTS.set(true);
}

const RING_ENTRIES: u32 = 512;
const WAKE_TAG: u64 = u64::MAX;
/// `IORING_RECVSEND_POLL_FIRST` (linux/io_uring.h, 5.19).
const RECVSEND_POLL_FIRST: u16 = 1;

#[derive(Clone, Copy, Debug)]
enum Op {
    Read,
    Write,
    Fsync,
    /// A socket receive into `buf[done..]`; completes after one receive.
    Recv,
}

enum Then {
    Io(Continuation),
    Recv(RecvContinuation),
}

struct Pending {
    op: Op,
    fd: RawFd,
    buf: IoBuf,
    offset: u64,
    done: usize,
    cont: Then,
}

/// One worker's ring and its table of operations in flight.
pub struct Ring {
    ring: IoUring,
    pending: Vec<Option<Pending>>,
    free: Vec<usize>,
    /// Registered with the ring; `None` when registration was refused.
    arena: Option<Arc<FixedArena>>,
    /// Receives may wait for data before their first try (POLL_FIRST,
    /// 5.19; older kernels refuse the flag). Without it a receive tries
    /// at once and is polled on EAGAIN, which cost sequential 1 MiB reads
    /// a few per cent here.
    poll_first: bool,
}

impl Ring {
    fn new() -> io::Result<Self> {
        // Built on the one thread that will ever submit to it and reap it,
        // which enters the kernel between every batch: completion work
        // then waits for that thread instead of interrupting it
        // (SINGLE_ISSUER + DEFER_TASKRUN, 6.1; else COOP_TASKRUN, 5.19;
        // else neither). A kernel that takes either is 5.19 or later, so
        // its receives also take POLL_FIRST, and it flags deferred
        // completion work in the SQ ring (TASKRUN_FLAG), which the idle
        // poll watches (`poll_for_work`).
        let (ring, poll_first) = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .build(RING_ENTRIES)
            .or_else(|_| {
                IoUring::builder()
                    .setup_coop_taskrun()
                    .setup_taskrun_flag()
                    .build(RING_ENTRIES)
            })
            .map(|ring| (ring, true))
            .or_else(|_| IoUring::new(RING_ENTRIES).map(|ring| (ring, false)))?;
        let arena = FixedArena::new(FIXED_SLOTS, FIXED_SLOT_BYTES);
        let iovecs = arena.iovecs();
        // SAFETY: every iovec covers a disjoint slot of `arena`'s memory,
        // which the ring keeps alive (its `Arc`) for as long as the
        // registration lasts: until the ring itself is dropped.
        let arena = match unsafe { ring.submitter().register_buffers(&iovecs) } {
            Ok(()) => Some(arena),
            Err(e) => {
                tracing::info!("io_uring: registered buffers refused ({e}); using pooled buffers");
                None
            }
        };
        Ok(Ring {
            ring,
            pending: Vec::new(),
            free: Vec::new(),
            arena,
            poll_first,
        })
    }

    /// A buffer for an op on this ring: a registered slot when one is free
    /// and large enough, otherwise a pooled buffer.
    pub fn buffer(&self, len: usize) -> IoBuf {
        self.arena
            .as_ref()
            .and_then(|arena| IoBuf::fixed(arena, len))
            .unwrap_or_else(|| IoBuf::new(len))
    }

    /// `data` copied into a registered slot, when one is free and large
    /// enough: for O_DIRECT writes, a copy of a few KiB costs less than
    /// pinning the caller's pages for every write.
    pub fn fixed_copy(&self, data: &[u8]) -> Option<IoBuf> {
        let mut buf = IoBuf::fixed(self.arena.as_ref()?, data.len())?;
        buf.copy_from_slice(data);
        Some(buf)
    }

    /// Reads `buf.len()` bytes at `offset`; bytes past end of file read as zeros.
    pub fn read(&mut self, fd: RawFd, buf: IoBuf, offset: u64, cont: Continuation) {
        self.start(Op::Read, fd, buf, offset, 0, Then::Io(cont));
    }

    /// Writes all of `buf` at `offset`.
    pub fn write(&mut self, fd: RawFd, buf: IoBuf, offset: u64, cont: Continuation) {
        self.start(Op::Write, fd, buf, offset, 0, Then::Io(cont));
    }

    /// fdatasync; the continuation gets back an empty buffer.
    pub fn fsync(&mut self, fd: RawFd, cont: Continuation) {
        self.start(Op::Fsync, fd, IoBuf::new(0), 0, 0, Then::Io(cont));
    }

    /// One receive from socket `fd` into `buf[from..]` (at least one byte
    /// of room): waits for data, then takes what is there.
    pub fn recv(&mut self, fd: RawFd, buf: IoBuf, from: usize, cont: RecvContinuation) {
        debug_assert!(from < buf.len());
        self.start(Op::Recv, fd, buf, 0, from, Then::Recv(cont));
    }

    fn in_flight(&self) -> usize {
        self.pending.len() - self.free.len()
    }

    fn start(&mut self, op: Op, fd: RawFd, buf: IoBuf, offset: u64, from: usize, cont: Then) {
        let slot = match self.free.pop() {
            Some(i) => i,
            None => {
                self.pending.push(None);
                self.pending.len() - 1
            }
        };
        self.pending[slot] = Some(Pending {
            op,
            fd,
            buf,
            offset,
            done: from,
            cont,
        });
        self.submit_slot(slot);
    }

    /// Queues the (remaining part of the) operation in `slot`.
    fn submit_slot(&mut self, slot: usize) {
        let Some(p) = self.pending[slot].as_mut() else {
            return;
        };
        let rest = p.buf.len() - p.done;
        let len = u32::try_from(rest).unwrap_or(u32::MAX);
        let at = p.offset + p.done as u64;
        let fd = types::Fd(p.fd);
        let fixed = self.arena.as_ref().and_then(|a| p.buf.fixed_index(a));
        // SAFETY: `p.done <= p.buf.len()`, so the pointer stays inside the
        // buffer (for a fixed op also inside registered buffer `index`,
        // which the kernel checks); an fsync's empty buffer is never read.
        let ptr = unsafe { p.buf.as_mut_ptr().add(p.done) };
        let entry = match (p.op, fixed) {
            (Op::Read, Some(index)) => opcode::ReadFixed::new(fd, ptr, len, index)
                .offset(at)
                .build(),
            (Op::Read, None) => opcode::Read::new(fd, ptr, len).offset(at).build(),
            (Op::Write, Some(index)) => opcode::WriteFixed::new(fd, ptr, len, index)
                .offset(at)
                .build(),
            (Op::Write, None) => opcode::Write::new(fd, ptr, len).offset(at).build(),
            (Op::Fsync, _) => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            // Wait for data before the first try where the kernel allows:
            // the reader only receives once it has taken everything already
            // there. Elsewhere the ring polls a socket with no data yet
            // (fast poll, which `UringEngine::receives_sockets` checks).
            (Op::Recv, _) => opcode::Recv::new(fd, ptr, len)
                .ioprio(if self.poll_first {
                    RECVSEND_POLL_FIRST
                } else {
                    0
                })
                .build(),
        }
        .user_data(slot as u64);
        loop {
            // SAFETY: the entry's buffer and descriptor stay valid until its
            // completion is reaped (see the module comment).
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            // Submission queue full: hand the queued entries to the kernel.
            if let Err(e) = self.ring.submit() {
                if e.raw_os_error() != Some(libc::EBUSY) && e.kind() != io::ErrorKind::Interrupted {
                    self.fail(slot, e);
                    return;
                }
                self.reap();
            }
        }
    }

    fn fail(&mut self, slot: usize, err: io::Error) {
        if let Some(p) = self.pending[slot].take() {
            self.free.push(slot);
            match p.cont {
                Then::Io(cont) => cont(self, Err(err)),
                Then::Recv(cont) => cont(self, Err(err), p.buf),
            }
        }
    }

    /// Handles one completion.
    fn complete(&mut self, slot: usize, result: i32) {
        let Some(p) = self.pending.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if result < 0 {
            let err = io::Error::from_raw_os_error(-result);
            if err.kind() == io::ErrorKind::Interrupted {
                return self.submit_slot(slot);
            }
            return self.fail(slot, err);
        }
        let n = result as usize;
        match p.op {
            Op::Recv => {
                if let Some(p) = self.pending[slot].take() {
                    self.free.push(slot);
                    if let Then::Recv(cont) = p.cont {
                        cont(self, Ok(n), p.buf);
                    }
                }
                return;
            }
            Op::Fsync => {}
            Op::Read if n == 0 => {
                let done = p.done;
                p.buf[done..].fill(0);
                p.done = p.buf.len();
            }
            Op::Write if n == 0 => {
                return self.fail(slot, io::ErrorKind::WriteZero.into());
            }
            Op::Read | Op::Write => p.done += n,
        }
        if !matches!(p.op, Op::Fsync) && p.done < p.buf.len() {
            return self.submit_slot(slot);
        }
        if let Some(p) = self.pending[slot].take() {
            self.free.push(slot);
            if let Then::Io(cont) = p.cont {
                cont(self, Ok(p.buf));
            }
        }
    }

    /// Collects and handles every completion that is ready.
    fn reap(&mut self) -> bool {
        let ready: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        let mut woken = false;
        for (tag, result) in ready {
            if tag == WAKE_TAG {
                woken = true;
            } else {
                self.complete(tag as usize, result);
            }
        }
        woken
    }
}

struct Worker {
    jobs: Sender<Job>,
    wake: OwnedFd,
    /// True while the worker is (about to be) blocked in the kernel; only
    /// then does a new job need an eventfd write to wake it.
    sleeping: Arc<AtomicBool>,
    /// Connections living on this ring (`Placement`s not yet dropped).
    connections: Arc<AtomicUsize>,
}

/// A connection's place on one ring; the ring counts it until this drops.
pub struct Placement {
    pub worker: usize,
    count: Arc<AtomicUsize>,
}

impl Drop for Placement {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The set of ring workers.
pub struct UringEngine {
    workers: Vec<Worker>,
    next: AtomicUsize,
    /// The kernel polls a socket with no data for a receive
    /// (IORING_FEAT_FAST_POLL, 5.7); before that a receive on a
    /// non-blocking socket failed with EAGAIN.
    fast_poll: bool,
    idle_poll: std::time::Duration,
}

impl UringEngine {
    /// Starts one worker per core; fails if io_uring is not permitted here.
    /// Each worker polls for up to `idle_poll` before it sleeps
    /// (`poll_for_work`; zero never polls).
    pub fn start(threads: usize, idle_poll: std::time::Duration) -> io::Result<Self> {
        let mut workers = Vec::with_capacity(threads);
        let mut fast_poll = true;
        for i in 0..threads.max(1) {
            // SAFETY: eventfd takes integers and returns a new descriptor or -1.
            let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `raw` is a fresh descriptor we exclusively own.
            let wake = unsafe { OwnedFd::from_raw_fd(raw) };
            let (tx, rx) = channel();
            let wake_fd = wake.as_raw_fd();
            let sleeping = Arc::new(AtomicBool::new(false));
            let flag = sleeping.clone();
            let (started, ready) = std::sync::mpsc::sync_channel(1);
            std::thread::Builder::new()
                .name(format!("hostcrypt-uring-{i}"))
                .spawn(move || match Ring::new() {
                    Ok(ring) => {
                        let _ = started.send(Ok(ring.ring.params().is_feature_fast_poll()));
                        worker_loop(ring, rx, wake_fd, &flag, idle_poll)
                    }
                    Err(e) => {
                        let _ = started.send(Err(e));
                    }
                })?;
            fast_poll &= ready
                .recv()
                .map_err(|_| io::Error::other("an io_uring worker died while starting"))??;
            workers.push(Worker {
                jobs: tx,
                wake,
                sleeping,
                connections: Arc::default(),
            });
        }
        Ok(UringEngine {
            workers,
            next: AtomicUsize::new(0),
            fast_poll,
            idle_poll,
        })
    }

    /// Whether rings can receive from sockets, so that connections can
    /// live on them (`frontend/nbd/ring_reader.rs`).
    pub fn receives_sockets(&self) -> bool {
        self.fast_poll
    }

    /// How long a ring polls for work before it sleeps.
    pub fn idle_poll(&self) -> std::time::Duration {
        self.idle_poll
    }

    /// Runs `job` on a ring: the calling thread's own when it is a ring
    /// thread, otherwise the next worker (round robin).
    pub fn submit(&self, job: impl FnOnce(&mut Ring) + Send + 'static) {
        let job: Job = Box::new(job);
        let job = LOCAL_JOBS.with_borrow_mut(|local| match local {
            Some(queue) => {
                queue.push_back(job);
                None
            }
            None => Some(job),
        });
        if let Some(job) = job {
            self.submit_to(self.place(), job);
        }
    }

    /// The worker that should take the next job: round robin.
    fn place(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len()
    }

    /// The ring a new connection should live on: the one with fewest
    /// connections, so two connections get two cores. (Sharing the job
    /// counter put both of a benchmark's connections on one ring at times.)
    pub fn place_connection(&self) -> Placement {
        let (worker, least) = self
            .workers
            .iter()
            .enumerate()
            .min_by_key(|(_, w)| w.connections.load(Ordering::Relaxed))
            .map(|(i, w)| (i, w.connections.clone()))
            .unwrap_or_default();
        least.fetch_add(1, Ordering::Relaxed);
        Placement {
            worker,
            count: least,
        }
    }

    /// Runs `job` on a ring that no connection lives on, when the calling
    /// thread is itself a ring thread (or `serves_requests`) and such a
    /// ring exists: a connection
    /// borrowing a core no other connection uses (`volume/submit/shared_read.rs`).
    /// `false`, with `job` dropped unrun, otherwise.
    pub fn lend_idle_ring(&self, job: impl FnOnce(&mut Ring) + Send + 'static) -> bool {
        let on_a_ring = LOCAL_JOBS.with_borrow(|local| local.is_some()) || SERVES_REQUESTS.get();
        let idle = self
            .workers
            .iter()
            .position(|w| w.connections.load(Ordering::Relaxed) == 0);
        match idle {
            Some(i) if on_a_ring => {
                self.submit_to(i, job);
                true
            }
            _ => false,
        }
    }

    /// Runs `job` on worker `i` (as numbered by `place_connection`).
    pub fn submit_to(&self, i: usize, job: impl FnOnce(&mut Ring) + Send + 'static) {
        let worker = &self.workers[i % self.workers.len()];
        if worker.jobs.send(Box::new(job)).is_err() {
            return;
        }
        // Pairs with the fence in `worker_loop`: either the worker sees this
        // job before it sleeps, or we see that it sleeps and wake it.
        fence(Ordering::SeqCst);
        if worker.sleeping.swap(false, Ordering::SeqCst) {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a live array to our eventfd.
            unsafe { libc::write(worker.wake.as_raw_fd(), one.as_ptr().cast(), 8) };
        }
    }
}

/// Runs the jobs this thread queued for itself (and any they queue) until
/// none is left.
fn run_local_jobs(ring: &mut Ring) {
    while let Some(job) = LOCAL_JOBS.with_borrow_mut(|local| local.as_mut()?.pop_front()) {
        job(ring);
    }
}

/// Before sleeping, a worker that just had work polls for more for up to
/// `window`: its completions (through the TASKRUN flag, since deferred
/// completion work runs only when the thread enters the kernel) and its
/// job queues. On a VM a sleeping vCPU halts, and waking it costs an exit
/// to the host, most of a QD1 read's latency where the guest does not
/// poll before halting (benches/results/history.md, "Idle polling on the rings"). A busy ring never
/// reaches the poll; an idle one polls once per burst, then sleeps.
/// `true` when there is work to do (or the engine is closing), `false`
/// when the window passed without any.
fn poll_for_work(ring: &mut Ring, jobs: &Receiver<Job>, window: std::time::Duration) -> bool {
    if window.is_zero() || ring.ring.submit().is_err() {
        return false;
    }
    super::idle::poll_for(window, || {
        // A failed enter is met again, and reported, by the sleeping wait.
        if ring.ring.submission().taskrun() && ring.ring.submit().is_err() {
            return ControlFlow::Break(false);
        }
        if !ring.ring.completion().is_empty() {
            return ControlFlow::Break(true);
        }
        if LOCAL_JOBS.with_borrow(|local| local.as_ref().is_some_and(|q| !q.is_empty())) {
            return ControlFlow::Break(true);
        }
        match jobs.try_recv() {
            Ok(job) => {
                job(ring);
                ControlFlow::Break(true)
            }
            Err(TryRecvError::Disconnected) => ControlFlow::Break(true),
            Err(TryRecvError::Empty) => ControlFlow::Continue(()),
        }
    })
}

fn worker_loop(
    mut ring: Ring,
    jobs: Receiver<Job>,
    wake: RawFd,
    sleeping: &AtomicBool,
    idle_poll: std::time::Duration,
) {
    LOCAL_JOBS.with_borrow_mut(|local| *local = Some(VecDeque::new()));
    // The wake-up read's target must outlive any read the kernel may still
    // complete as the ring shuts down, so it is never freed.
    let wake_buf: &'static mut [u8; 8] = Box::leak(Box::new([0u8; 8]));
    let arm = |ring: &mut Ring, buf: *mut u8| {
        let entry = opcode::Read::new(types::Fd(wake), buf, 8)
            .build()
            .user_data(WAKE_TAG);
        // SAFETY: `buf` is the leaked 8-byte array; the eventfd lives as long
        // as the engine, which outlives this thread's useful work.
        while unsafe { ring.ring.submission().push(&entry) }.is_err() {
            let _ = ring.ring.submit();
        }
    };
    let buf_ptr = wake_buf.as_mut_ptr();
    arm(&mut ring, buf_ptr);
    let mut closing = false;
    loop {
        let drain = |ring: &mut Ring| loop {
            run_local_jobs(ring);
            match jobs.try_recv() {
                Ok(job) => job(ring),
                Err(TryRecvError::Empty) => return false,
                Err(TryRecvError::Disconnected) => return true,
            }
        };
        closing |= drain(&mut ring);
        if closing && ring.in_flight() == 0 {
            return;
        }
        if poll_for_work(&mut ring, &jobs, idle_poll) {
            if ring.reap() {
                arm(&mut ring, buf_ptr);
            }
            continue;
        }
        // Announce the sleep, then look once more: a job sent before the
        // announcement is seen here, one sent after it finds the flag set.
        sleeping.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        closing |= drain(&mut ring);
        if closing && ring.in_flight() == 0 {
            return;
        }
        match ring.ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => {
                tracing::error!("io_uring wait failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        sleeping.store(false, Ordering::SeqCst);
        if ring.reap() {
            arm(&mut ring, buf_ptr);
        }
    }
}

#[cfg(test)]
mod tests;
