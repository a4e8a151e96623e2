//! The vhost-user-blk device behind one connection: vhost-user-backend's
//! [`VhostUserBackend`], whose worker threads (one per virtqueue) call
//! [`BlockBackend::handle_event`] when the guest kicks a queue. Each
//! descriptor chain is parsed (`request.rs`), becomes a `volume::Op`
//! submitted through the one submit point, and completes on whichever
//! thread finished it: data into guest memory, the status byte, the used
//! ring, a notification when the guest wants one (EVENT_IDX).
//!
//! Copies: a read's decrypted data is copied once, from the data area's
//! result into the guest's buffers; a write is copied once, from guest
//! memory into a bounce buffer that is encrypted and written (the guest may
//! change its buffer while the write is in flight, and XTS needs the whole
//! sector at once).
//!
//! What lives elsewhere: the socket, the peer check and the connection's
//! life (`socket.rs`); features and configuration space (`device.rs`);
//! the vhost-user protocol itself (the `vhost` and `vhost-user-backend`
//! crates).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringMutex, VringState, VringT};
use virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::device::{Device, QUEUE_SIZE};
use super::request::{self, Command, Rejection, Request, Segment};
use crate::export::metrics::RequestKind;
use crate::export::Export;
use crate::io::IoBuf;
use crate::volume::{Op, OpKind, Outcome};

/// How long stopping a queue waits for its requests.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Guest memory as vhost-user-backend maps it (no dirty-page bitmap: no
/// live migration through this backend).
pub type GuestMemory = GuestMemoryMmap<()>;
pub type Memory = GuestMemoryAtomic<GuestMemory>;
pub type Vring = VringMutex<Memory>;

/// The device behind one vhost-user connection.
pub struct BlockBackend {
    export: Arc<Export>,
    device: Device,
    memory: Memory,
    event_idx: AtomicBool,
    in_flight: Arc<InFlight>,
    /// For log lines: the peer, as `socket.rs` identified it.
    peer: String,
}

impl BlockBackend {
    pub fn new(export: Arc<Export>, device: Device, memory: Memory, peer: String) -> Self {
        BlockBackend {
            export,
            device,
            memory,
            event_idx: AtomicBool::new(false),
            in_flight: Arc::new(InFlight::default()),
            peer,
        }
    }

    /// Waits up to `limit` for the requests still running (their
    /// completions write into guest memory this backend still maps);
    /// whether they all finished.
    pub fn drain(&self, limit: Duration) -> bool {
        self.in_flight.wait_idle(limit)
    }

    /// Takes every available chain off `vring`, parses and submits each.
    /// With EVENT_IDX, notifications stay off while it drains the ring and
    /// it goes again if the guest added chains before they were back on.
    fn process(&self, vring: &Vring) {
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        loop {
            let memory = self.memory.memory();
            // The lock is not held while submitting: a request that
            // completes at once (a cached read) takes it to add_used.
            let chains = {
                let mut state = vring.get_mut();
                if event_idx {
                    let _ = state.disable_notification();
                }
                let queue = state.get_queue_mut();
                let mut chains = Vec::new();
                while let Some(chain) = queue.pop_descriptor_chain(memory.clone()) {
                    chains.push(chain);
                }
                chains
            };
            for chain in chains {
                let head = chain.head_index();
                let parsed = request::parse(chain, &*memory, &self.device.limits());
                let done = Done {
                    vring: vring.clone(),
                    memory: memory.clone().into_inner(),
                    head,
                    export: self.export.clone(),
                    _in_flight: self.in_flight.begin(),
                    started: Instant::now(),
                };
                match parsed {
                    Ok(request) => self.run(request, done),
                    Err(rejection) => self.reject(rejection, done),
                }
            }
            if !event_idx {
                return;
            }
            match vring.get_mut().enable_notification() {
                Ok(true) => continue,
                _ => return,
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
            ),
            None => done.finish_without_status(),
        }
    }

    fn run(&self, request: Request, done: Done) {
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
                let memory = done.memory.clone();
                area.submit(
                    Op::Read {
                        offset,
                        len: len as usize,
                    },
                    move |outcome| {
                        let result = match outcome {
                            Ok(Outcome::Data(buf)) => scatter(&memory, &data, &buf[..]),
                            Ok(_) => Err(io::Error::other("a read returned no data")),
                            Err(e) => Err(e),
                        };
                        let used = len as u32 + 1;
                        done.finish_io(RequestKind::Op(OpKind::Read), len, result, status, used)
                    },
                );
            }
            Command::Write { offset } => {
                let mut buf = IoBuf::new(len as usize);
                if let Err(e) = gather(&done.memory, &data, &mut buf[..]) {
                    return done.finish_io(RequestKind::Op(OpKind::Write), len, Err(e), status, 1);
                }
                area.submit(
                    Op::Write {
                        offset,
                        data: buf,
                        fua: false,
                    },
                    move |outcome| {
                        done.finish_io(
                            RequestKind::Op(OpKind::Write),
                            len,
                            outcome.map(drop),
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
                    outcome.map(drop),
                    status,
                    1,
                )
            }),
            Command::GetId => {
                let serial = &self.device.serial;
                let result = scatter(&done.memory, &data, serial);
                let written = (len as usize).min(serial.len()) as u32;
                done.finish_io(RequestKind::Other, 0, result, status, written + 1)
            }
            Command::Discard { offset, len } => area.submit(
                Op::Trim {
                    offset,
                    len,
                    fua: false,
                },
                move |outcome| {
                    done.finish_io(
                        RequestKind::Op(OpKind::Trim),
                        len,
                        outcome.map(drop),
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
                        fua: false,
                    },
                    move |outcome| {
                        done.finish_io(
                            RequestKind::Op(OpKind::WriteZeroes),
                            len,
                            outcome.map(drop),
                            status,
                            1,
                        )
                    },
                )
            }
        }
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
    Ok(())
}

/// What completing one request needs, on whichever thread it finishes.
struct Done {
    vring: Vring,
    /// The guest memory the request's addresses refer to, kept mapped
    /// until it completes even if the frontend replaces the table.
    memory: Arc<GuestMemory>,
    head: u16,
    export: Arc<Export>,
    /// Counts the request as running until it completes.
    _in_flight: Running,
    started: Instant,
}

impl Done {
    /// Completes with an I/O result: OK, or IOERR with the error logged.
    fn finish_io(
        self,
        kind: RequestKind,
        len: u64,
        result: io::Result<()>,
        status: GuestAddress,
        used: u32,
    ) {
        let result = result.map_err(|e| {
            tracing::warn!(
                export = self.export.name(),
                "vhost-user request failed: {e}"
            );
            virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8
        });
        // A failed request wrote no data the guest may use.
        let used = if result.is_ok() { used } else { 1 };
        self.finish(kind, len, result, status, used)
    }

    /// Writes the status byte, counts the request, puts the chain on the
    /// used ring and notifies the guest if it wants to be.
    fn finish(
        self,
        kind: RequestKind,
        len: u64,
        result: Result<(), u8>,
        status: GuestAddress,
        used: u32,
    ) {
        let code = match result {
            Ok(()) => VIRTIO_BLK_S_OK as u8,
            Err(code) => code,
        };
        // In range: the parser checked the status byte's address.
        let _ = self.memory.write_slice(&[code], status);
        let metrics = &self.export.metrics;
        metrics.complete(kind, len, result.is_err(), self.started.elapsed());
        metrics.end();
        self.complete(used);
    }

    /// A chain without a status byte: returned to the guest unwritten.
    fn finish_without_status(self) {
        self.export
            .metrics
            .complete(RequestKind::Other, 0, true, self.started.elapsed());
        self.export.metrics.end();
        self.complete(0);
    }

    fn complete(self, used: u32) {
        let mut state = self.vring.get_mut();
        if state.add_used(self.head, used).is_err() {
            return;
        }
        if notify_wanted(&mut state) {
            let _ = state.signal_used_queue();
        }
    }
}

/// Whether the guest wants an interrupt now (always without EVENT_IDX).
fn notify_wanted(state: &mut VringState<Memory>) -> bool {
    state.needs_notification().unwrap_or(true)
}

/// Requests of one connection still running.
#[derive(Default)]
struct InFlight {
    count: Mutex<usize>,
    idle: Condvar,
}

impl InFlight {
    fn begin(self: &Arc<Self>) -> Running {
        *self.count.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        Running(self.clone())
    }

    fn wait_idle(&self, limit: Duration) -> bool {
        let count = self.count.lock().unwrap_or_else(|p| p.into_inner());
        let (count, _) = self
            .idle
            .wait_timeout_while(count, limit, |n| *n > 0)
            .unwrap_or_else(|p| p.into_inner());
        *count == 0
    }
}

/// One running request; dropping it (whatever path it took) counts it done.
struct Running(Arc<InFlight>);

impl Drop for Running {
    fn drop(&mut self) {
        let mut count = self.0.count.lock().unwrap_or_else(|p| p.into_inner());
        *count -= 1;
        if *count == 0 {
            self.0.idle.notify_all();
        }
    }
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

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.device.config_range(offset, size)
    }

    /// GET_VRING_BASE (the frontend stops the queue, e.g. to migrate or
    /// reset): the connection's requests complete first, so the
    /// used ring the frontend reads back is final.
    fn stop_vring(&self, _queue_index: u32) -> io::Result<()> {
        if self.drain(STOP_TIMEOUT) {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("requests still running after {STOP_TIMEOUT:?}"),
            ))
        }
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
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!(
                "unexpected epoll event {evset:?} on vhost-user queue event {device_event}"
            )));
        }
        // Each thread serves one queue: its only vring.
        match vrings.get(usize::from(device_event)) {
            Some(vring) => {
                self.process(vring);
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

    #[test]
    fn scatter_and_gather_follow_the_segments() {
        let memory =
            GuestMemory::from_ranges(&[(GuestAddress(0x1000), 0x4000)]).expect("guest memory");
        let segments = [
            Segment {
                addr: GuestAddress(0x1000),
                len: 3,
            },
            Segment {
                addr: GuestAddress(0x3000),
                len: 5,
            },
        ];
        scatter(&memory, &segments, b"abcdefgh").unwrap();
        let mut back = [0u8; 8];
        gather(&memory, &segments, &mut back).unwrap();
        assert_eq!(&back, b"abcdefgh");
        // A buffer outside guest memory fails, never panics.
        let outside = [Segment {
            addr: GuestAddress(0x4ffe),
            len: 4,
        }];
        assert!(scatter(&memory, &outside, b"abcd").is_err());
        assert!(gather(&memory, &outside, &mut back[..4]).is_err());
    }

    #[test]
    fn in_flight_waits_for_running_requests() {
        let in_flight = Arc::new(InFlight::default());
        let running = in_flight.begin();
        assert!(!in_flight.wait_idle(Duration::from_millis(10)));
        drop(running);
        assert!(in_flight.wait_idle(Duration::from_millis(10)));
    }
}
