//! The vhost-user-blk device behind one connection: vhost-user-backend's
//! [`VhostUserBackend`], whose worker threads (one per virtqueue) call
//! [`BlockBackend::handle_event`] when the guest kicks a queue. Each
//! descriptor chain is parsed (`request.rs`), becomes a `volume::Op`
//! submitted through the one submit point, and completes on whichever
//! thread finished it: data into guest memory, the status byte, the used
//! ring, a notification when the guest wants one (EVENT_IDX).
//!
//! What a connection may have in flight, and what a late completion may
//! write, is `inflight.rs`'s to decide: a worker waits there when the
//! connection's budget is spent, and a queue whose driver posts a head
//! that is still in flight is stopped.
//!
//! Restarts (INFLIGHT_SHMFD): each head taken off a queue is recorded in
//! the inflight log the VMM keeps (`inflight_log.rs`) until it is on the
//! used ring. When a queue starts, the ring is taken up where the guest's
//! used index stands and what the log says is pending is resubmitted
//! first, oldest first (`resubmit.rs` finds those chains), so a guest
//! whose requests were running when the daemon died gets them answered
//! by the next one. Not before the requests an earlier connection or an
//! earlier start of the queue left running have finished: a resubmitted
//! write must not race its own stale original. The queue's worker is
//! then woken through an eventfd of the daemon's own (`restarts`), never
//! by writing the frontend's kick fd, whose writes the frontend can make
//! block. The inflight region cannot be replaced while a queue runs.
//!
//! Copies: a read asks for its sectors sealed (`Op::ReadSealed`) and
//! decrypts them from the data area's buffer straight into the guest's
//! buffers when it completes, under the request's `Ticket` like every
//! other write into guest memory: no copy of plaintext, and the guest
//! never sees ciphertext nor gets bytes of its own decrypted (XTS only
//! stores to guest memory). A write larger than `GATHER_MAX` is
//! encrypted straight from guest memory into a bounce buffer of the
//! volume's, when the volume runs it (`WriteData::Client`): no copy of
//! the plaintext first (a smaller one is copied into the bounce buffer
//! as it is taken, before its admission, and encrypted there: cheaper),
//! and each guest byte is read once, so a guest that changes its buffer
//! meanwhile only changes what it wrote. No write stores guest memory
//! read after its queue was stopped (the guest's memory may then hold
//! anything): a large write reads through its request's `QueueGate`,
//! and a stop waits for a read under way; a small one is dropped at its
//! admission when its queue was stopped since it was taken.
//!
//! What lives elsewhere: the socket, the peer check and the connection's
//! life (`socket.rs`); features and configuration space (`device.rs`);
//! the vhost-user protocol itself (the `vhost` and `vhost-user-backend`
//! crates).

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::ops::ControlFlow;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringState, VringT};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_S_OK};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryLoadGuard};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::EventFd;

use super::device::{Device, QUEUE_SIZE};
use super::guest::{GuestMemory, Memory, Vring};
use super::inflight::{InFlight, QueueGate, Refusal, Ticket, BUDGET};
use super::inflight_log::{InflightLog, QueueLog, Shape};
use super::notify::Notifier;
use super::request::{self, Command, Rejection, Request, Segment};
use super::resubmit;
use crate::export::metrics::RequestKind;
use crate::export::Export;
use crate::io::IoBuf;
use crate::volume::{
    ClientPlaintext, Destination, MemoryGate, Op, OpKind, Outcome, SealedRead, WriteData,
};

/// Writes up to this size are copied out of guest memory on the queue's
/// worker, as they are taken (`gather`); larger ones are encrypted
/// straight from it (`in_guest`). For a small write the copy costs less
/// than reading guest memory later through the queue's gate. At most the
/// volume's inline write size (`INLINE_WRITE_MAX`), so that a write
/// encrypted from guest memory never runs on the queue's worker itself.
const GATHER_MAX: usize = 64 * 1024;

/// How long stopping a queue waits for its requests.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The device behind one vhost-user connection.
pub struct BlockBackend {
    export: Arc<Export>,
    device: Device,
    memory: Memory,
    event_idx: AtomicBool,
    /// The virtio features the driver acknowledged.
    acked: AtomicU64,
    in_flight: Arc<InFlight>,
    /// Queues stopped for a driver that broke the ring's rules.
    broken: Box<[AtomicBool]>,
    notifier: Arc<Notifier>,
    /// The inflight log, once the frontend set one up (INFLIGHT_SHMFD).
    log: RwLock<Option<Arc<InflightLog>>>,
    /// Per queue: heads the log said were pending when it started,
    /// resubmitted before anything new is taken off the ring; emptied
    /// when the queue stops.
    resubmit: Box<[Mutex<VecDeque<u16>>]>,
    /// Per queue: started (its kick fd set) and not stopped since. The
    /// inflight region is not replaced under a running queue.
    started: Box<[AtomicBool]>,
    /// Per queue: wakes its worker when the queue starts (on each
    /// worker's epoll, `register_restarts`). Ours, non-blocking: a write
    /// from the message thread can never block, as one to the
    /// frontend's kick fd could.
    restarts: Box<[EventFd]>,
    /// Earlier connections to this socket whose requests may still run:
    /// a queue resubmits nothing before they have finished.
    earlier: Vec<Arc<InFlight>>,
    /// For log lines: the peer, as `socket.rs` identified it.
    peer: String,
    /// How long a queue's worker looks at its available ring for more
    /// before it asks the guest to kick (`idle_poll`).
    idle_poll: Duration,
}

/// A chain to run: taken off the available ring, or named by the
/// inflight log after a restart.
enum Taken<C> {
    Popped(C),
    Again {
        head: u16,
        table: GuestAddress,
        size: u16,
    },
}

impl BlockBackend {
    /// The device for one connection; `earlier` are the connections
    /// before it whose requests may still be running.
    pub fn new(
        export: Arc<Export>,
        device: Device,
        memory: Memory,
        peer: String,
        earlier: Vec<Arc<InFlight>>,
        idle_poll: Duration,
    ) -> io::Result<Self> {
        let restarts = (0..device.queues)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))
            .collect::<io::Result<_>>()?;
        Ok(BlockBackend {
            export,
            memory,
            event_idx: AtomicBool::new(false),
            acked: AtomicU64::new(0),
            in_flight: InFlight::new(usize::from(device.queues), QUEUE_SIZE, BUDGET),
            broken: (0..device.queues).map(|_| AtomicBool::new(false)).collect(),
            notifier: Notifier::start(usize::from(device.queues), idle_poll)?,
            log: RwLock::new(None),
            resubmit: (0..device.queues).map(|_| Mutex::default()).collect(),
            started: (0..device.queues).map(|_| AtomicBool::new(false)).collect(),
            restarts,
            earlier,
            device,
            peer,
            idle_poll,
        })
    }

    /// Waits up to `limit` for the requests still running (their
    /// completions write into guest memory this backend still maps);
    /// whether they all finished.
    pub fn drain(&self, limit: Duration) -> bool {
        self.in_flight.wait_idle(limit)
    }

    /// What this connection has in flight, for the connections after it
    /// (`socket.rs` hands it on).
    pub fn in_flight(&self) -> Arc<InFlight> {
        self.in_flight.clone()
    }

    /// Puts each queue's restart eventfd on the epoll of the worker that
    /// serves the queue (`handlers`, one per queue, as
    /// `queues_per_thread` asks), where `handle_event` sees it as event
    /// `restart_event()`.
    pub fn register_restarts<T: VhostUserBackend>(
        &self,
        handlers: &[Arc<VringEpollHandler<T>>],
    ) -> io::Result<()> {
        if handlers.len() != self.restarts.len() {
            return Err(io::Error::other(format!(
                "{} queue workers for {} queues",
                handlers.len(),
                self.restarts.len()
            )));
        }
        for (handler, restart) in handlers.iter().zip(self.restarts.iter()) {
            handler.register_listener(
                restart.as_raw_fd(),
                EventSet::IN,
                u64::from(self.restart_event()),
            )?;
        }
        Ok(())
    }

    /// The epoll data of the restart events: past the queues and the
    /// exit event, which vhost-user-backend reserves (0..=queues).
    fn restart_event(&self) -> u16 {
        self.device.queues + 1
    }

    /// The connection has ended: nothing more is admitted, requests
    /// still running complete without writing into guest memory, and
    /// nothing is left to resubmit.
    pub fn close(&self) {
        self.in_flight.close();
        self.notifier.stop();
        for queue in 0..self.resubmit.len() {
            self.stopped(queue);
        }
    }

    /// Queue `queue` no longer runs: no resubmission is left for it.
    fn stopped(&self, queue: usize) {
        if let Some(started) = self.started.get(queue) {
            started.store(false, Ordering::Release);
        }
        self.set_resubmit(queue, VecDeque::new());
    }

    fn set_resubmit(&self, queue: usize, heads: VecDeque<u16>) {
        if let Some(slot) = self.resubmit.get(queue) {
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = heads;
        }
    }

    /// Refuses a new inflight region while a queue runs: its requests
    /// are recorded in the region it started with.
    fn check_no_queue_started(&self) -> io::Result<()> {
        match self.started.iter().position(|s| s.load(Ordering::Acquire)) {
            Some(queue) => Err(io::Error::other(format!(
                "the inflight region cannot change while queue {queue} runs"
            ))),
            None => Ok(()),
        }
    }

    /// Waits (up to STOP_TIMEOUT in all) until no request an earlier
    /// start of queue `index`, or an earlier connection, left running is
    /// still running: a resubmitted write must not be overtaken by its
    /// stale original landing later.
    fn wait_for_earlier(&self, index: usize) -> io::Result<()> {
        let deadline = Instant::now() + STOP_TIMEOUT;
        let left = || deadline.saturating_duration_since(Instant::now());
        let idle = self.in_flight.wait_queue_idle(index, left())
            && self.earlier.iter().all(|earlier| earlier.wait_idle(left()));
        if idle {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "requests of an earlier connection or queue start still running after {STOP_TIMEOUT:?}; nothing resubmitted"
                ),
            ))
        }
    }

    /// Writes reach the backing before they complete when the driver did
    /// not negotiate FLUSH (virtio: the device is then write-through).
    fn write_through(&self) -> bool {
        self.acked.load(Ordering::Relaxed) & (1 << VIRTIO_BLK_F_FLUSH) == 0
    }

    fn inflight_log(&self) -> Option<Arc<InflightLog>> {
        self.log
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn next_resubmitted(&self, index: usize) -> Option<u16> {
        self.resubmit
            .get(index)?
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front()
    }

    /// `start_vring`'s work on the ring: its indices, and the heads to
    /// resubmit, set under the vring's lock so a worker sees both or
    /// neither.
    fn take_up(&self, index: usize, vring: &Vring) -> io::Result<()> {
        let log = self.inflight_log();
        if log.is_some() {
            self.wait_for_earlier(index)?;
        }
        let memory = self.memory.memory();
        let mut state = vring.get_mut();
        let used = state
            .get_queue()
            .used_idx(&*memory, Ordering::Acquire)
            .map_err(io::Error::other)?
            .0;
        state.get_queue_mut().set_next_used(used);
        let mut pending = VecDeque::new();
        if let Some(queue) = log.as_ref().and_then(|l| l.queue(index)) {
            match queue.recover(used, state.get_queue().size()) {
                Ok(recovery) => {
                    let taken = u16::try_from(recovery.pending.len()).unwrap_or(u16::MAX);
                    state
                        .get_queue_mut()
                        .set_next_avail(used.wrapping_add(taken));
                    pending = recovery.pending.into();
                }
                Err(why) => tracing::warn!(
                    export = self.export.name(),
                    peer = self.peer,
                    queue = index,
                    "vhost-user inflight log: {why}"
                ),
            }
        }
        tracing::debug!(
            export = self.export.name(),
            peer = self.peer,
            queue = index,
            used,
            pending = pending.len(),
            "vhost-user queue taken up"
        );
        if !pending.is_empty() {
            tracing::info!(
                export = self.export.name(),
                peer = self.peer,
                queue = index,
                "vhost-user: resubmitting {} requests left pending by an earlier connection",
                pending.len()
            );
        }
        self.set_resubmit(index, pending);
        Ok(())
    }

    /// Looks at the queue's available index for up to `idle_poll`, with
    /// notifications off; whether the guest posted something meanwhile.
    fn idle_poll_avail(&self, index: usize, vring: &Vring, memory: &GuestMemory) -> bool {
        let broken = self.broken.get(index);
        crate::io::idle::poll_for(self.idle_poll, || {
            let state = vring.get_ref();
            let queue = state.get_queue();
            if !queue.ready() || broken.is_none_or(|b| b.load(Ordering::Relaxed)) {
                return ControlFlow::Break(false);
            }
            match queue.avail_idx(memory, Ordering::Acquire) {
                Ok(avail) if avail.0 != queue.next_avail() => ControlFlow::Break(true),
                Ok(_) => ControlFlow::Continue(()),
                Err(_) => ControlFlow::Break(false),
            }
        })
    }

    /// Takes the available chains off queue `index` one at a time,
    /// parses and submits each; waits in `InFlight::admit` while the
    /// connection's budget is spent. With EVENT_IDX, notifications stay
    /// off while it drains the ring and it goes again if the guest added
    /// chains before they were back on, or while it polled.
    fn process(&self, index: usize, vring: &Vring) {
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let Some(broken) = self.broken.get(index) else {
            return;
        };
        // Since the last chain taken: whether the ring was polled, and
        // whether notifications were turned back on and the ring looked
        // at again. Each happens once: a pop may find nothing although
        // the guest's index says more (a queue that is stopped, or an
        // avail index the guest set past the ring, which virtio-queue
        // refuses).
        let mut polled = false;
        let mut rechecked = false;
        let log = self.inflight_log();
        let limits = self.device.limits();
        loop {
            if broken.load(Ordering::Relaxed) {
                return;
            }
            let mut memory = self.memory.memory();
            // The lock is not held while submitting: a request that
            // completes at once (a cached read) takes it to add_used.
            let (taking, taken, table, size) = {
                let mut state = vring.get_mut();
                // Under the vring's lock, before the pop: the generation
                // is that of the ring the chain comes from (a chain of a
                // ring started since is not refused as retired), and a
                // GET_VRING_BASE waits for the chain until it is admitted.
                let taking = self.in_flight.begin_take(index);
                if event_idx {
                    let _ = state.disable_notification();
                }
                // Resubmitted only while the queue runs, as
                // pop_descriptor_chain only pops then.
                let again = if state.get_queue().ready() {
                    self.next_resubmitted(index)
                } else {
                    None
                };
                let table = GuestAddress(state.get_queue().desc_table());
                let size = state.get_queue().size();
                let taken = match again {
                    Some(head) => Some(Taken::Again { head, table, size }),
                    None => state
                        .get_queue_mut()
                        .pop_descriptor_chain(memory.clone())
                        .map(Taken::Popped),
                };
                (taking, taken, table, size)
            };
            let Some(taken) = taken else {
                drop(taking);
                if !event_idx || rechecked {
                    return;
                }
                // The guest does not kick while notifications stay off:
                // a request posted within the window costs it no
                // syscall and us no wake-up.
                if !polled {
                    polled = true;
                    if self.idle_poll_avail(index, vring, &memory) {
                        continue;
                    }
                }
                rechecked = true;
                match vring.get_mut().enable_notification() {
                    Ok(true) => continue,
                    _ => return,
                }
            };
            polled = false;
            rechecked = false;
            let (head, mut parsed) = match taken {
                Taken::Popped(chain) => {
                    let head = chain.head_index();
                    // Pending from here until it is on the used ring.
                    if let Some(queue) = log.as_ref().and_then(|log| log.queue(index)) {
                        queue.taken(head);
                    }
                    (head, request::parse(chain, &*memory, &limits))
                }
                Taken::Again { head, table, size } => {
                    let chain = resubmit::chain_at(&*memory, table, size, head);
                    (head, request::parse(chain, &*memory, &limits))
                }
            };
            let place = (table, size, head);
            parsed = read_again_if_moved(parsed, &mut memory, &self.memory, place, &limits);
            let bytes = match &parsed {
                Ok(request) => match request.command {
                    Command::Read { .. } | Command::Write { .. } => request.len,
                    _ => 0,
                },
                Err(_) => 0,
            };
            // Between the generation read with the pop and the admission's
            // check of it: a small write admitted was read while its queue
            // was current, at no cost of the queue's lock (a read that a
            // retirement overtakes, after a stop's timeout, a reset or the
            // connection's end, is dropped with its request).
            let gathered = match &parsed {
                Ok(request) if small_write(request) => Some(gather_write(&memory, request)),
                _ => None,
            };
            let admitted = self
                .in_flight
                .admit(index, head, bytes, taking.generation());
            drop(taking);
            let ticket = match admitted {
                Ok(ticket) => ticket,
                // The connection ends, or the queue was retired since the
                // chain was taken (a reset, or a stop that timed out): no
                // I/O for it.
                Err(Refusal::Closing | Refusal::Retired) => return,
                Err(refusal) => {
                    // The ring can no longer be trusted: answering this
                    // chain would put one head on the used ring twice.
                    broken.store(true, Ordering::Relaxed);
                    tracing::error!(
                        export = self.export.name(),
                        peer = self.peer,
                        queue = index,
                        "vhost-user queue stopped: {refusal}"
                    );
                    return;
                }
            };
            let done = Done {
                vring: vring.clone(),
                queue: index,
                log: log.clone(),
                notifier: self.notifier.clone(),
                memory: memory.clone().into_inner(),
                head,
                export: self.export.clone(),
                ticket,
                started: Instant::now(),
            };
            match parsed {
                Ok(request) => self.run(request, gathered, done),
                Err(rejection) => self.reject(rejection, done),
            }
        }
    }

    fn reject(&self, rejection: Rejection, done: Done) {
        if crate::export::peer::may_log_refusal() {
            tracing::warn!(
                export = self.export.name(),
                peer = self.peer,
                "vhost-user request refused: {}",
                rejection.error
            );
        }
        self.export.metrics.begin();
        match rejection.status {
            Some(status) => done.finish(
                RequestKind::Other,
                0,
                Err(rejection.error.status()),
                status,
                1,
                |_| virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8,
            ),
            None => done.finish_without_status(),
        }
    }

    /// Runs `request`; `gathered`: a small write's data, read as it was
    /// taken (`gather_write`).
    fn run(&self, request: Request, gathered: Option<io::Result<IoBuf>>, done: Done) {
        self.export.metrics.begin();
        let Request {
            command,
            data,
            len,
            status,
        } = request;
        let area = self.export.volume.data.clone();
        match command {
            Command::Read { offset } => {
                area.submit(
                    Op::ReadSealed {
                        offset,
                        len: len as usize,
                    },
                    move |outcome| {
                        let used = len as u32 + 1;
                        let kind = RequestKind::Op(OpKind::Read);
                        match outcome {
                            Ok(Outcome::Sealed(read)) => {
                                let fill = Some((&data[..], Source::Read(&read)));
                                done.finish_io(kind, len, Ok(fill), status, used)
                            }
                            Ok(Outcome::Data(buf)) => {
                                let fill = Some((&data[..], Source::Bytes(&buf[..])));
                                done.finish_io(kind, len, Ok(fill), status, used)
                            }
                            Ok(_) => {
                                let e = io::Error::other("a read returned no data");
                                done.finish_io(kind, len, Err(e), status, used)
                            }
                            Err(e) => done.finish_io(kind, len, Err(e), status, used),
                        }
                    },
                );
            }
            Command::Write { offset } => {
                let plaintext = match gathered {
                    Some(gathered) => gathered.map(WriteData::Buffer),
                    None => {
                        let gate = Box::new(done.ticket.gate());
                        in_guest(&done.memory, &data, len as usize, gate).map(WriteData::Client)
                    }
                };
                let plaintext = match plaintext {
                    Ok(plaintext) => plaintext,
                    Err(e) => {
                        return done.finish_io(
                            RequestKind::Op(OpKind::Write),
                            len,
                            Err(e),
                            status,
                            1,
                        )
                    }
                };
                area.submit(
                    Op::Write {
                        offset,
                        data: plaintext,
                        fua: self.write_through(),
                    },
                    move |outcome| {
                        done.finish_io(
                            RequestKind::Op(OpKind::Write),
                            len,
                            outcome.map(|_| None),
                            status,
                            1,
                        )
                    },
                );
            }
            Command::Flush => area.submit(Op::Flush, move |outcome| {
                done.finish_io(
                    RequestKind::Op(OpKind::Flush),
                    0,
                    outcome.map(|_| None),
                    status,
                    1,
                )
            }),
            Command::GetId => {
                let serial = &self.device.serial;
                let written = (len as usize).min(serial.len()) as u32;
                done.finish_io(
                    RequestKind::Other,
                    0,
                    Ok(Some((&data[..], Source::Bytes(&serial[..])))),
                    status,
                    written + 1,
                )
            }
            Command::Discard { offset, len } => area.submit(
                Op::Trim {
                    offset,
                    len,
                    fua: self.write_through(),
                },
                move |outcome| {
                    done.finish_io(
                        RequestKind::Op(OpKind::Trim),
                        len,
                        outcome.map(|_| None),
                        status,
                        1,
                    )
                },
            ),
            Command::WriteZeroes { offset, len, unmap } => {
                // As NBD: holes only where the volume allows discards.
                let punch = unmap && self.export.allow_discards;
                area.submit(
                    Op::WriteZeroes {
                        offset,
                        len,
                        punch,
                        fua: self.write_through(),
                    },
                    move |outcome| {
                        done.finish_io(
                            RequestKind::Op(OpKind::WriteZeroes),
                            len,
                            outcome.map(|_| None),
                            status,
                            1,
                        )
                    },
                )
            }
        }
    }
}

impl Drop for BlockBackend {
    /// A session that never started (or ended without `close`) must not
    /// leave its notifier thread waiting.
    fn drop(&mut self) {
        self.notifier.stop();
    }
}

/// Copies `source` into the guest buffers `data`, in order, as far as
/// both go.
fn scatter(memory: &GuestMemory, data: &[Segment], source: &[u8]) -> io::Result<()> {
    let mut at = 0usize;
    for segment in data {
        if at >= source.len() {
            break;
        }
        let n = (segment.len as usize).min(source.len() - at);
        memory
            .write_slice(&source[at..at + n], segment.addr)
            .map_err(io::Error::other)?;
        at += n;
    }
    Ok(())
}

/// Opens `read` into the guest buffers `data`, in order, as far as both
/// go: its sectors are decrypted straight into guest memory, which is
/// only ever stored to (`SealedRead::open_to`), so the guest sees
/// plaintext only, and bytes it puts there meanwhile never reach the
/// cipher. No dirty-page bitmap to mark (`guest.rs`).
fn open_into_guest(memory: &GuestMemory, data: &[Segment], read: &SealedRead) -> io::Result<()> {
    let mut destinations = Vec::with_capacity(data.len());
    // Keep each slice mapped until the read is open (with the `xen`
    // mappings vm-memory can have; plain mmap regions stay anyway).
    let mut guards = Vec::with_capacity(data.len());
    let mut at = 0usize;
    for segment in data {
        if at >= read.len() {
            break;
        }
        let n = (segment.len as usize).min(read.len() - at);
        // One slice per guest memory region the segment crosses.
        for slice in memory.get_slices(segment.addr, n) {
            let slice = slice.map_err(io::Error::other)?;
            let guard = slice.ptr_guard_mut();
            destinations.push(Destination {
                at,
                ptr: guard.as_ptr(),
                len: slice.len(),
            });
            guards.push(guard);
            at += slice.len();
        }
    }
    // SAFETY: each destination is `len` bytes of guest memory that
    // `memory` and `guards` keep mapped for this call, written only;
    // together they are the read's first `at <= len()` bytes, in order.
    unsafe { read.open_to_all(&destinations) };
    drop(guards);
    Ok(())
}

/// A chain refused in `memory`, the snapshot it was taken in (its
/// descriptor table, the table's size and its head in `place`), read
/// again in the memory of now if the frontend's memory changed since; then
/// `memory` is that of now. A region the frontend added while the queue
/// ran (libblkio maps its buffers after it started the device, qemu on
/// memory hotplug) may be newer than the snapshot, and the chain posted
/// after the region was acknowledged. A chain whose status byte was in a
/// region removed since is then refused without one.
fn read_again_if_moved(
    parsed: Result<Request, Rejection>,
    memory: &mut GuestMemoryLoadGuard<GuestMemory>,
    current: &Memory,
    (table, size, head): (GuestAddress, u16, u16),
    limits: &request::Limits,
) -> Result<Request, Rejection> {
    if parsed.is_ok() {
        return parsed;
    }
    let now = current.memory();
    if std::ptr::eq::<GuestMemory>(&*now, &**memory) {
        return parsed;
    }
    *memory = now;
    request::parse(
        resubmit::chain_at(&**memory, table, size, head),
        &**memory,
        limits,
    )
}

/// Whether `request` is a write small enough to be gathered as it is
/// taken (`GATHER_MAX`).
fn small_write(request: &Request) -> bool {
    matches!(request.command, Command::Write { .. }) && request.len <= GATHER_MAX as u64
}

/// A small write's data, copied out of guest memory.
fn gather_write(memory: &GuestMemory, request: &Request) -> io::Result<IoBuf> {
    let mut buf = IoBuf::new(request.len as usize);
    gather(memory, &request.data, &mut buf)?;
    Ok(buf)
}

/// Copies the guest buffers `data` into `target` (their total length).
fn gather(memory: &GuestMemory, data: &[Segment], target: &mut [u8]) -> io::Result<()> {
    let mut at = 0usize;
    for segment in data {
        let n = segment.len as usize;
        let end = at
            .checked_add(n)
            .filter(|end| *end <= target.len())
            .ok_or_else(|| io::Error::other("guest buffers longer than the request"))?;
        memory
            .read_slice(&mut target[at..end], segment.addr)
            .map_err(io::Error::other)?;
        at = end;
    }
    if at != target.len() {
        return Err(io::Error::other("guest buffers shorter than the request"));
    }
    Ok(())
}

/// A write's guest buffers are read only while its queue is current
/// (`inflight.rs`).
impl MemoryGate for QueueGate {
    fn read(&self, read: &mut dyn FnMut()) -> bool {
        QueueGate::read(self, read)
    }
}

/// The guest buffers `data` (`len` bytes in all) as a write's
/// plaintext, left where it is: the volume encrypts it from guest memory
/// into a buffer of its own in one pass (`WriteData::Client`) when it
/// runs the write, through `gate`; no copy of the plaintext is made
/// first. An address outside guest memory is an error here, before
/// anything is submitted.
fn in_guest(
    memory: &Arc<GuestMemory>,
    data: &[Segment],
    len: usize,
    gate: Box<dyn MemoryGate>,
) -> io::Result<ClientPlaintext> {
    let mut pieces = Vec::with_capacity(data.len());
    let mut total = 0usize;
    for segment in data {
        // One slice per guest memory region the segment crosses.
        for slice in memory.get_slices(segment.addr, segment.len as usize) {
            let slice = slice.map_err(io::Error::other)?;
            pieces.push((slice.ptr_guard().as_ptr(), slice.len()));
            total = total
                .checked_add(slice.len())
                .filter(|total| *total <= len)
                .ok_or_else(|| io::Error::other("guest buffers longer than the request"))?;
        }
    }
    if total != len {
        return Err(io::Error::other("guest buffers shorter than the request"));
    }
    let mapped: Arc<dyn std::any::Any + Send + Sync> = memory.clone();
    // SAFETY: each piece lies in a region of `memory` (`get_slices`
    // checked it), which `mapped` keeps mapped (plain mmap regions: no
    // `xen` mappings, whose pointers only last as long as a guard); this
    // process never writes guest memory through a reference.
    unsafe { ClientPlaintext::new(pieces, mapped, gate) }
        .ok_or_else(|| io::Error::other("guest buffers longer than the request"))
}

/// What completing one request needs, on whichever thread it finishes.
struct Done {
    vring: Vring,
    queue: usize,
    /// Where the request is recorded as pending (the log it was taken
    /// under, kept mapped until it completes).
    log: Option<Arc<InflightLog>>,
    notifier: Arc<Notifier>,
    /// The guest memory the request's addresses refer to, kept mapped
    /// until it completes even if the frontend replaces the table.
    memory: Arc<GuestMemory>,
    head: u16,
    export: Arc<Export>,
    /// Its admission: counts it as running until it completes, and says
    /// whether its queue may still be written.
    ticket: Ticket,
    started: Instant,
}

/// Data a completion writes into guest buffers: the buffers, and what
/// goes into them.
type Fill<'a> = Option<(&'a [Segment], Source<'a>)>;

/// What a completion writes into the guest's buffers.
enum Source<'a> {
    Bytes(&'a [u8]),
    /// A read, opened straight into them.
    Read(&'a SealedRead),
}

impl Done {
    /// Completes with an I/O result (and data for the guest's buffers):
    /// OK, or IOERR with the error logged.
    fn finish_io(
        self,
        kind: RequestKind,
        len: u64,
        result: io::Result<Fill<'_>>,
        status: GuestAddress,
        used: u32,
    ) {
        let export = self.export.clone();
        let failed = |e: io::Error| {
            tracing::warn!(export = export.name(), "vhost-user request failed: {e}");
            virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8
        };
        match result {
            Ok(fill) => self.finish(kind, len, Ok(fill), status, used, failed),
            Err(e) => self.finish(kind, len, Err(failed(e)), status, 1, failed),
        }
    }

    /// Copies the data and writes the status byte, puts the chain on the
    /// used ring and notifies the guest if it wants to be, all only while
    /// the request's queue is still the one it came from; counts it.
    fn finish(
        self,
        kind: RequestKind,
        len: u64,
        result: Result<Fill<'_>, u8>,
        status: GuestAddress,
        used: u32,
        failed: impl FnOnce(io::Error) -> u8,
    ) {
        let Done {
            vring,
            queue,
            log,
            notifier,
            memory,
            head,
            export,
            ticket,
            started,
        } = self;
        let mut ok = result.is_ok();
        ticket.complete(|release_head| {
            let code = match result {
                Ok(Some((segments, source))) => {
                    let written = match source {
                        Source::Bytes(bytes) => scatter(&memory, segments, bytes),
                        Source::Read(read) => open_into_guest(&memory, segments, read),
                    };
                    match written {
                        Ok(()) => Ok(used),
                        Err(e) => Err(failed(e)),
                    }
                }
                Ok(None) => Ok(used),
                Err(code) => Err(code),
            };
            // A failed request wrote no data the guest may use.
            let (code, used) = match code {
                Ok(used) => (VIRTIO_BLK_S_OK as u8, used),
                Err(code) => {
                    ok = false;
                    (code, 1)
                }
            };
            // In range: the parser checked the status byte's address.
            let _ = memory.write_slice(&[code], status);
            put_used(
                &vring,
                head,
                used,
                pending(&log, queue),
                release_head,
                || notifier.signal(queue, &vring),
            );
        });
        let metrics = &export.metrics;
        metrics.complete(kind, len, !ok, started.elapsed());
        metrics.end();
    }

    /// A chain without a status byte: returned to the guest unwritten.
    fn finish_without_status(self) {
        self.export
            .metrics
            .complete(RequestKind::Other, 0, true, self.started.elapsed());
        self.export.metrics.end();
        let Done {
            vring,
            queue,
            log,
            notifier,
            head,
            ticket,
            ..
        } = self;
        ticket.complete(|release_head| {
            put_used(&vring, head, 0, pending(&log, queue), release_head, || {
                notifier.signal(queue, &vring)
            })
        });
    }
}

/// The log's records of `queue`, if there is a log.
fn pending(log: &Option<Arc<InflightLog>>, queue: usize) -> Option<QueueLog<'_>> {
    log.as_deref()?.queue(queue)
}

/// Puts `head` on the used ring (clearing its record in the inflight
/// log, if any, in the order a restart can tell apart) and, if the guest
/// wants an interrupt, asks for one (`notify.rs` sends it, off this
/// thread). `release_head` frees the head for the guest to post again,
/// under the vring's lock, just before the entry that tells it so.
fn put_used(
    vring: &Vring,
    head: u16,
    used: u32,
    log: Option<QueueLog<'_>>,
    release_head: &dyn Fn(),
    interrupt: impl FnOnce(),
) {
    let wanted = {
        let mut state = vring.get_mut();
        release_head();
        if let Some(log) = &log {
            log.completing(head);
        }
        if state.add_used(head, used).is_err() {
            return;
        }
        if let Some(log) = &log {
            log.completed(head, state.get_queue().next_used());
        }
        notify_wanted(&mut state)
    };
    if wanted {
        interrupt();
    }
}

/// Whether the guest wants an interrupt now (always without EVENT_IDX).
fn notify_wanted(state: &mut VringState<Memory>) -> bool {
    state.needs_notification().unwrap_or(true)
}

impl VhostUserBackend for BlockBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.device.queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        self.device.features()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.device.protocol_features()
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::Relaxed);
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.device.config_range(offset, size)
    }

    /// GET_VRING_BASE (the frontend stops the queue, e.g. to migrate or
    /// reset): the queue's own requests complete first, so the used ring
    /// the frontend reads back is final; the other queues' requests do
    /// not hold it up (they write into their own rings).
    /// Either way the queue is retired: what completes later writes
    /// nothing into the ring the frontend may set up next, and what it
    /// had left to resubmit is dropped (the next start reads the log).
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let queue = queue_index as usize;
        self.stopped(queue);
        // The handler cleared the ring's ready flag first: no chain is
        // taken any more, and one taken already is admitted (then waited
        // for as running) or refused before the queue is retired.
        let deadline = Instant::now() + STOP_TIMEOUT;
        let taken = self.in_flight.wait_queue_taken(queue, STOP_TIMEOUT);
        let left = deadline.saturating_duration_since(Instant::now());
        let drained = self.in_flight.wait_queue_idle(queue, left);
        self.in_flight.retire_queue(queue);
        if let Some(broken) = self.broken.get(queue) {
            broken.store(false, Ordering::Relaxed);
        }
        match (taken, drained) {
            (true, true) => Ok(()),
            (false, _) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("a request still being taken off the queue after {STOP_TIMEOUT:?}"),
            )),
            (true, false) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("requests still running after {STOP_TIMEOUT:?}"),
            )),
        }
    }

    /// GET_INFLIGHT_FD: a new log for the frontend's queues, in use from
    /// now on (the frontend hands it back with SET_INFLIGHT_FD). Refused
    /// while a queue runs.
    fn get_inflight_fd(&self, asked: &VhostUserInflight) -> io::Result<(VhostUserInflight, File)> {
        self.check_no_queue_started()?;
        if asked.num_queues > self.device.queues {
            return Err(io::Error::other(format!(
                "inflight region for {} queues; the device has {}",
                asked.num_queues, self.device.queues
            )));
        }
        let (log, file, shape) =
            InflightLog::create(asked.num_queues, asked.queue_size).map_err(io::Error::other)?;
        *self.log.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(log));
        let reply = VhostUserInflight::new(
            shape.mmap_size,
            shape.mmap_offset,
            shape.queues,
            shape.queue_size,
        );
        Ok((reply, file))
    }

    /// SET_INFLIGHT_FD: the log to record in, perhaps one an earlier
    /// daemon filled. Refused while a queue runs.
    fn set_inflight_fd(&self, given: &VhostUserInflight, file: File) -> io::Result<()> {
        self.check_no_queue_started()?;
        if given.num_queues > self.device.queues {
            return Err(io::Error::other(format!(
                "inflight region for {} queues; the device has {}",
                given.num_queues, self.device.queues
            )));
        }
        let shape = Shape {
            mmap_size: given.mmap_size,
            mmap_offset: given.mmap_offset,
            queues: given.num_queues,
            queue_size: given.queue_size,
        };
        let log = InflightLog::open(&file, shape).map_err(io::Error::other)?;
        *self.log.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(log));
        Ok(())
    }

    /// A queue starts: it carries on from the used index in guest memory
    /// (a restarted daemon's ring stands where the last one left it, not
    /// at 0), and with an inflight log, after the requests still pending
    /// there, which are resubmitted first once what earlier connections
    /// or an earlier start of the queue left running has finished (past
    /// STOP_TIMEOUT, an error: the connection ends, the VMM reconnects).
    /// Then its worker is woken through the queue's restart eventfd: the
    /// guest may be waiting for those and post nothing new. And the guest
    /// is interrupted once (if its call fd is set; `vring_call_set`
    /// otherwise): an earlier daemon may have put requests on the used
    /// ring and died, or been disconnected, before their interrupt got
    /// out. Those are in no inflight log, so nothing else would tell the
    /// guest, which waits for them and posts nothing new.
    fn start_vring(&self, queue_index: u32, vring: &Vring) -> io::Result<()> {
        let index = queue_index as usize;
        if let Err(e) = self.take_up(index, vring) {
            self.stopped(index);
            return Err(e);
        }
        if let Some(started) = self.started.get(index) {
            started.store(true, Ordering::Release);
        }
        if let Some(restart) = self.restarts.get(index) {
            // Never blocks (ours, non-blocking); a full counter already
            // wakes the worker.
            let _ = restart.write(1);
        }
        self.notifier.signal(index, vring);
        Ok(())
    }

    /// SET_VRING_ENABLE: a started queue turned on is looked at again
    /// (its restart eventfd). qemu enables a queue after setting its kick
    /// fd, so the look `start_vring` asked for may have found it still
    /// off; what the guest posted while no daemon served it was kicked
    /// into qemu and would otherwise wait for the guest's next kick,
    /// which never comes while it waits for those requests.
    fn enable_vring(&self, queue_index: u32, enabled: bool) {
        let index = queue_index as usize;
        let started = self
            .started
            .get(index)
            .is_some_and(|s| s.load(Ordering::Acquire));
        if enabled && started {
            if let Some(restart) = self.restarts.get(index) {
                let _ = restart.write(1);
            }
        }
    }

    /// SET_VRING_CALL: a started queue's guest is interrupted once on
    /// its new call fd. After a reconnect qemu may set a queue's call fd
    /// after its kick fd; what was completed in between (resubmitted
    /// requests, or ones the guest posted while no daemon ran)
    /// interrupted nobody. A spurious interrupt costs the guest a look
    /// at its used ring.
    fn vring_call_set(&self, queue_index: u32, vring: &Vring) {
        let index = queue_index as usize;
        if self
            .started
            .get(index)
            .is_some_and(|s| s.load(Ordering::Acquire))
        {
            self.notifier.signal(index, vring);
        }
    }

    /// RESET_DEVICE (vhost-user-backend has disabled the rings first):
    /// every queue is retired and none is left stopped as broken, so
    /// requests from before the reset write nothing into the rings the
    /// frontend sets up next, and those rings start served. Nothing
    /// waits: a reset discards what was in flight, and what was left to
    /// resubmit; the queues count as stopped. Features return to
    /// what they are before the first SET_FEATURES, as the handler's do.
    /// Unreachable while `device.rs` does not offer the RESET_DEVICE
    /// protocol feature (vhost refuses the message then): ready if it does.
    fn reset_device(&self) {
        for (queue, broken) in self.broken.iter().enumerate() {
            self.in_flight.retire_queue(queue);
            broken.store(false, Ordering::Relaxed);
            self.stopped(queue);
        }
        self.acked.store(0, Ordering::Relaxed);
        self.event_idx.store(false, Ordering::Relaxed);
    }

    fn update_memory(&self, _memory: Memory) -> io::Result<()> {
        // `self.memory` is the same GuestMemoryAtomic, already updated.
        Ok(())
    }

    /// One worker thread per queue.
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.device.queues).map(|i| 1u64 << i).collect()
    }

    /// Each worker thread's exit event; vhost-user-backend signals it
    /// when the connection's handler is dropped.
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!(
                "unexpected epoll event {evset:?} on vhost-user queue event {device_event}"
            )));
        }
        // This queue's own thread: a large read may borrow an idle core.
        crate::io::uring::serves_requests();
        // Each thread serves one queue (`queues_per_thread`): `vrings` is
        // that queue alone, `device_event` its index there (0) or its
        // restart event, and the thread's number is the queue's.
        if device_event == self.restart_event() {
            if let Some(restart) = self.restarts.get(thread_id) {
                // Nothing to read (EAGAIN): woken already.
                let _ = restart.read();
            }
            // As for a kick, which vhost-user-backend ignores on a
            // disabled ring: enabling it looks again (`enable_vring`).
            return match vrings.first() {
                Some(vring) if vring.get_ref().is_enabled() => {
                    self.process(thread_id, vring);
                    Ok(())
                }
                _ => Ok(()),
            };
        }
        match vrings.get(usize::from(device_event)) {
            Some(vring) => {
                self.process(thread_id, vring);
                Ok(())
            }
            None => Err(io::Error::other(format!(
                "unknown vhost-user event {device_event}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chain refused in the snapshot it was taken in, its data in a
    /// region the frontend added since, is read again in the memory of
    /// now and accepted; in unchanged memory the refusal stands.
    #[test]
    fn a_chain_refused_in_older_memory_is_read_again_in_the_memory_of_now() {
        use virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT;
        use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
        use virtio_queue::desc::split::Descriptor;

        let (table, header, status, data) = (0x1000u64, 0x2000u64, 0x3000u64, 0x10_0000u64);
        let first = GuestMemory::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let next = VRING_DESC_F_NEXT as u16;
        let chain = [
            Descriptor::new(header, 16, next, 1),
            Descriptor::new(data, 4096, next, 2),
            Descriptor::new(status, 1, VRING_DESC_F_WRITE as u16, 0),
        ];
        for (i, desc) in chain.iter().enumerate() {
            first
                .write_obj(*desc, GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        first.write_slice(&h, GuestAddress(header)).unwrap();
        let limits = request::Limits {
            capacity: 1 << 20,
            max_data: 1 << 20,
            read_only: false,
            discard: false,
            max_segments: 4,
            max_zero_sectors: 1 << 10,
        };
        let place = (GuestAddress(table), 8, 0);
        let parse = |memory: &GuestMemory| {
            request::parse(
                resubmit::chain_at(memory, GuestAddress(table), 8, 0),
                memory,
                &limits,
            )
        };
        let current = Memory::new(first);
        let mut snapshot = current.memory();
        let refused = parse(&snapshot);
        assert!(refused.is_err(), "the data lies outside the first memory");
        // Unchanged memory: refused again, not re-read.
        let again = read_again_if_moved(refused.clone(), &mut snapshot, &current, place, &limits);
        assert!(again.is_err());
        // The frontend adds the region holding the data.
        let added = Arc::new(
            vm_memory::GuestRegionMmap::from_range(GuestAddress(data), 0x1_0000, None).unwrap(),
        );
        let grown = snapshot.insert_region(added).unwrap();
        current.lock().unwrap().replace(grown);
        let read = read_again_if_moved(refused, &mut snapshot, &current, place, &limits);
        let request = read.expect("accepted in the memory of now");
        assert!(matches!(request.command, Command::Write { .. }));
        assert_eq!(request.len, 4096);
        assert_eq!(snapshot.num_regions(), 2, "the snapshot is that of now");
    }

    #[test]
    fn scatter_gather_and_the_guest_plaintext_follow_the_segments() {
        // Two regions, adjacent in guest addresses: a segment may cross.
        let memory = Arc::new(
            GuestMemory::from_ranges(&[
                (GuestAddress(0x1000), 0x4000),
                (GuestAddress(0x5000), 0x1000),
            ])
            .expect("guest memory"),
        );
        let open = || Box::new(crate::volume::AlwaysReadable);
        let segment = |addr, len| Segment {
            addr: GuestAddress(addr),
            len,
        };
        let segments = [segment(0x1000, 3), segment(0x3000, 5), segment(0x4ffe, 4)];
        scatter(&memory, &segments, b"abcdefghijkl").unwrap();
        let plaintext = in_guest(&memory, &segments, 12, open()).unwrap();
        assert_eq!(
            &WriteData::Client(plaintext).into_plaintext().unwrap()[..],
            b"abcdefghijkl"
        );
        let mut back = [0u8; 12];
        gather(&memory, &segments, &mut back).unwrap();
        assert_eq!(&back, b"abcdefghijkl");
        // Buffers that do not add up to the request fail.
        assert!(gather(&memory, &segments, &mut [0u8; 11]).is_err());
        assert!(gather(&memory, &segments, &mut [0u8; 13]).is_err());
        assert!(in_guest(&memory, &segments, 11, open()).is_err());
        assert!(in_guest(&memory, &segments, 13, open()).is_err());
        // A buffer outside guest memory fails, never panics.
        let outside = [segment(0x5ffe, 4)];
        assert!(scatter(&memory, &outside, b"abcd").is_err());
        assert!(in_guest(&memory, &outside, 4, open()).is_err());
        assert!(gather(&memory, &outside, &mut back[..4]).is_err());
        let huge = [segment(0x1000, u32::MAX)];
        assert!(in_guest(&memory, &huge, 4, open()).is_err());
    }
}
