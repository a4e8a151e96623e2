//! A minimal vhost-user-blk driver for the tests: the `vhost` crate's
//! frontend speaks the protocol, "guest memory" is a memfd this process
//! maps and shares, and the split virtqueues in it are written by hand, so
//! a test can put any descriptor chain on a queue, well-formed or hostile
//! (addresses outside memory, loops, wrong directions). Requests are
//! polled on the used ring with a deadline: a device that never answers
//! fails the test instead of hanging it.
//!
//! Layout of the shared memory (guest-physical addresses = offsets):
//! queue `q`'s descriptor table, available and used rings in the first
//! 64 KiB at `q * 16 KiB`, then buffers. The libblkio driver
//! (`e2e/vhost_user.rs`) is the well-behaved client; this one is for what
//! a well-behaved client never sends, and for what qemu does across a
//! daemon restart (INFLIGHT_SHMFD: it keeps the inflight region and
//! reconnects with each queue based at its used index), where the test
//! can also write the state a killed daemon leaves behind. With
//! `hostile_kicks`, each kick fd is handed over with its counter full
//! while a thread keeps clearing O_NONBLOCK on it, so a device that
//! writes its kick fd blocks. `scribble` rewrites a buffer from another
//! thread while the device works on it.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

pub const QUEUE_SIZE: u16 = 64;
const QUEUE_STRIDE: u64 = 16 << 10;
/// Where buffers start.
pub const BUFFERS: u64 = 1 << 20;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

/// One descriptor as a test writes it.
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

struct Queue {
    next_avail: u16,
    last_used: u16,
    kick: EventFd,
    call: EventFd,
}

/// A connected, started vhost-user-blk device.
pub struct BlkClient {
    frontend: Option<Frontend>,
    memfd: File,
    base: *mut u8,
    len: usize,
    queues: Vec<Queue>,
    pub features: u64,
    /// The configuration space as the device reported it (60 bytes).
    pub config: Vec<u8>,
    /// With INFLIGHT_SHMFD: the region the device made, as a VMM keeps it.
    pub inflight: Option<(File, VhostUserInflight)>,
    /// The next session's kick fds are hostile (see the module doc); its
    /// kicks must then not be written by the test either.
    pub hostile_kicks: bool,
    /// Threads taking this session's kick counts (`steal_kicks`).
    stealers: Vec<Stealer>,
}

// SAFETY: `base` points at a shared mapping this client owns for its
// whole life; the client is used from one thread at a time (&mut self).
unsafe impl Send for BlkClient {}

/// What went wrong, as text (the tests only print it).
pub type Error = String;

fn text(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl BlkClient {
    /// Connects to `socket` and sets up `queues` virtqueues over `memory`
    /// bytes of shared memory.
    pub fn connect(socket: &Path, queues: usize, memory: usize) -> Result<Self, Error> {
        Self::connect_over(socket, queues, memory, memory)
    }

    /// As `connect`, but the memfd behind the `memory` bytes offered is
    /// only `file_len` long: what a hostile frontend may send to make the
    /// daemon touch a mapping past the end of its file (SIGBUS).
    pub fn connect_over(
        socket: &Path,
        queues: usize,
        memory: usize,
        file_len: usize,
    ) -> Result<Self, Error> {
        Self::connect_with(socket, queues, memory, file_len, false)
    }

    /// As `connect`, with INFLIGHT_SHMFD (and REPLY_ACK) negotiated: the
    /// device's inflight region is asked for and kept, as qemu does.
    pub fn connect_inflight(socket: &Path, queues: usize, memory: usize) -> Result<Self, Error> {
        Self::connect_with(socket, queues, memory, memory, true)
    }

    fn connect_with(
        socket: &Path,
        queues: usize,
        memory: usize,
        file_len: usize,
        inflight: bool,
    ) -> Result<Self, Error> {
        // SAFETY: memfd_create with a valid C string; the fd is checked.
        let fd = unsafe { libc::memfd_create(c"vhost-test".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        // SAFETY: a fresh fd we own.
        let memfd = unsafe { File::from_raw_fd(fd) };
        memfd.set_len(file_len as u64).map_err(text)?;
        let base = map_shared(&memfd, memory)?;
        let mut client = BlkClient {
            frontend: None,
            memfd,
            base,
            len: memory,
            queues: Vec::new(),
            features: 0,
            config: Vec::new(),
            inflight: None,
            hostile_kicks: false,
            stealers: Vec::new(),
        };
        client.session(socket, queues, inflight)?;
        Ok(client)
    }

    /// Connects again after the device went away (a daemon restart), as
    /// qemu's reconnecting chardev does: the same memory and rings, the
    /// inflight region handed back, each queue based at its used index
    /// (what qemu restores when it could not ask a lost backend).
    pub fn reconnect(&mut self, socket: &Path) -> Result<(), Error> {
        self.frontend = None;
        let inflight = self.inflight.is_some();
        self.session(socket, self.queues.len(), inflight)
    }

    fn session(&mut self, socket: &Path, queues: usize, inflight: bool) -> Result<(), Error> {
        let mut frontend = Frontend::connect(socket, queues as u64).map_err(text)?;
        let offered = frontend.get_features().map_err(text)?;
        let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if offered & protocol == 0 {
            return Err("no PROTOCOL_FEATURES".into());
        }
        let mut wanted = VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ;
        if inflight {
            wanted |=
                VhostUserProtocolFeatures::INFLIGHT_SHMFD | VhostUserProtocolFeatures::REPLY_ACK;
        }
        let offered_protocol = frontend.get_protocol_features().map_err(text)?;
        if !offered_protocol.contains(wanted) {
            return Err(format!(
                "protocol features {offered_protocol:?}, wanted {wanted:?}"
            ));
        }
        frontend.set_protocol_features(wanted).map_err(text)?;
        let device_queues = frontend.get_queue_num().map_err(text)? as usize;
        if device_queues < queues {
            return Err(format!("the device has {device_queues} queues"));
        }
        frontend.set_owner().map_err(text)?;
        frontend.set_features(offered).map_err(text)?;
        let (_, config) = frontend
            .get_config(0, 60, VhostUserConfigFlags::empty(), &[0u8; 60])
            .map_err(text)?;
        if inflight {
            if self.inflight.is_none() {
                let ask = VhostUserInflight::new(0, 0, queues as u16, QUEUE_SIZE);
                let (info, file) = frontend.get_inflight_fd(&ask).map_err(text)?;
                self.inflight = Some((file, info));
            }
            if let Some((file, info)) = &self.inflight {
                frontend
                    .set_inflight_fd(info, file.as_raw_fd())
                    .map_err(text)?;
            }
        }
        let base = self.base;
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: self.len as u64,
            userspace_addr: base as u64,
            mmap_offset: 0,
            mmap_handle: self.memfd.as_raw_fd(),
        };
        frontend.set_mem_table(&[region]).map_err(text)?;
        let mut hostile = Vec::new();
        for q in 0..queues {
            let (desc, avail, used) = Self::rings(q);
            let used_idx = self.read_u16(used + 2);
            frontend.set_vring_num(q, QUEUE_SIZE).map_err(text)?;
            frontend
                .set_vring_addr(
                    q,
                    &VringConfigData {
                        queue_max_size: QUEUE_SIZE,
                        queue_size: QUEUE_SIZE,
                        flags: 0,
                        desc_table_addr: base as u64 + desc,
                        used_ring_addr: base as u64 + used,
                        avail_ring_addr: base as u64 + avail,
                        log_addr: None,
                    },
                )
                .map_err(text)?;
            frontend.set_vring_base(q, used_idx).map_err(text)?;
            let call = EventFd::new(libc::EFD_NONBLOCK).map_err(text)?;
            let kick = EventFd::new(libc::EFD_NONBLOCK).map_err(text)?;
            if self.hostile_kicks {
                hostile.push(Blocker::start(&kick)?);
            }
            frontend.set_vring_call(q, &call).map_err(text)?;
            frontend.set_vring_kick(q, &kick).map_err(text)?;
            match self.queues.get_mut(q) {
                Some(queue) => {
                    queue.kick = kick;
                    queue.call = call;
                }
                None => self.queues.push(Queue {
                    next_avail: 0,
                    last_used: 0,
                    kick,
                    call,
                }),
            }
        }
        // As qemu does: every queue is set up before any is enabled, so a
        // device that looks at a started queue only once finds it off.
        for q in 0..queues {
            frontend.set_vring_enable(q, true).map_err(text)?;
        }
        if !hostile.is_empty() {
            // The messages are not acknowledged: give the device time to
            // start the queues while the kick fds stay blocking.
            std::thread::sleep(Duration::from_millis(500));
        }
        drop(hostile);
        self.frontend = Some(frontend);
        self.features = offered;
        self.config = config;
        Ok(())
    }

    /// Byte offset of `head`'s entry for queue `q` in the inflight region
    /// (the split-ring layout libvhost-user defines: per queue a 16-byte
    /// header, then 16 bytes per descriptor, rounded up to 64 bytes).
    fn inflight_entry(q: usize, head: u16) -> u64 {
        let area = (16 + 16 * u64::from(QUEUE_SIZE)).next_multiple_of(64);
        q as u64 * area + 16 + 16 * u64::from(head)
    }

    fn inflight_write(&self, at: u64, bytes: &[u8]) {
        let (file, _) = self.inflight.as_ref().expect("no inflight region");
        file.write_all_at(bytes, at).expect("inflight region write");
    }

    /// As a device records a head it took off queue `q` (the `counter`
    /// orders resubmission).
    pub fn log_pending(&self, q: usize, head: u16, counter: u64) {
        let at = Self::inflight_entry(q, head);
        self.inflight_write(at + 8, &counter.to_le_bytes());
        self.inflight_write(at, &[1]);
    }

    /// As a device that completed `head` on queue `q`: the used entry
    /// written and the used index advanced (as the device it plays, not
    /// as the driver: `wait_used` then returns it), its log entry cleared.
    pub fn complete_as_device(&mut self, q: usize, head: u16) {
        let (_, _, used) = Self::rings(q);
        let idx = self.read_u16(used + 2);
        let slot = u64::from(idx % QUEUE_SIZE);
        let mut entry = [0u8; 8];
        entry[0..4].copy_from_slice(&u32::from(head).to_le_bytes());
        self.write(used + 4 + 8 * slot, &entry);
        self.write_u16(used + 2, idx.wrapping_add(1));
        let area = Self::inflight_entry(q, 0) - 16;
        self.inflight_write(area + 12, &head.to_le_bytes());
        self.inflight_write(Self::inflight_entry(q, head), &[0]);
        self.inflight_write(area + 14, &idx.wrapping_add(1).to_le_bytes());
    }

    /// Guest-physical addresses of queue `q`'s descriptor table, available
    /// and used rings.
    fn rings(q: usize) -> (u64, u64, u64) {
        let at = q as u64 * QUEUE_STRIDE;
        (at, at + 4096, at + 8192)
    }

    pub fn memory_len(&self) -> u64 {
        self.len as u64
    }

    /// Writes `data` at guest-physical `gpa` (inside the shared memory).
    pub fn write(&self, gpa: u64, data: &[u8]) {
        assert!(gpa as usize + data.len() <= self.len);
        // SAFETY: in bounds of the mapping (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.base.add(gpa as usize), data.len())
        }
    }

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        assert!(gpa as usize + len <= self.len);
        let mut out = vec![0u8; len];
        // SAFETY: in bounds of the mapping (checked above).
        unsafe { std::ptr::copy_nonoverlapping(self.base.add(gpa as usize), out.as_mut_ptr(), len) }
        out
    }

    fn read_u16(&self, gpa: u64) -> u16 {
        fence(Ordering::SeqCst);
        // SAFETY: aligned and in bounds (ring fields).
        unsafe { std::ptr::read_volatile(self.base.add(gpa as usize).cast::<u16>()) }
    }

    fn write_u16(&self, gpa: u64, value: u16) {
        // SAFETY: aligned and in bounds (ring fields).
        unsafe { std::ptr::write_volatile(self.base.add(gpa as usize).cast::<u16>(), value) }
        fence(Ordering::SeqCst);
    }

    /// Puts `chain` in queue `q`'s descriptor table from index `first`
    /// (as given: flags and `next` fields untouched) and makes `first` the
    /// head of a new available entry; kicks the device.
    pub fn submit_raw(&mut self, q: usize, first: u16, chain: &[Desc]) {
        self.submit_repeated(q, first, chain, 1);
    }

    /// Puts one chain on queue `q` and posts its head `times` times in the
    /// available ring, then kicks once: with `times` over 1, a driver that
    /// reuses a head still in flight.
    pub fn submit_repeated(&mut self, q: usize, first: u16, chain: &[Desc], times: u16) {
        self.post_repeated(q, first, chain, times);
        let _ = self.queues[q].kick.write(1);
    }

    /// As `submit_repeated`, without the kick.
    fn post_repeated(&mut self, q: usize, first: u16, chain: &[Desc], times: u16) {
        let (desc, avail, _) = Self::rings(q);
        for (i, d) in chain.iter().enumerate() {
            let index = (first as usize + i) % QUEUE_SIZE as usize;
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&d.addr.to_le_bytes());
            raw[8..12].copy_from_slice(&d.len.to_le_bytes());
            raw[12..14].copy_from_slice(&d.flags.to_le_bytes());
            raw[14..16].copy_from_slice(&d.next.to_le_bytes());
            self.write(desc + index as u64 * 16, &raw);
        }
        for _ in 0..times {
            let queue = &mut self.queues[q];
            let slot = queue.next_avail % QUEUE_SIZE;
            let next_avail = queue.next_avail.wrapping_add(1);
            queue.next_avail = next_avail;
            self.write_u16(avail + 4 + 2 * slot as u64, first);
            self.write_u16(avail + 2, next_avail);
        }
    }

    /// Sets queue `q`'s available index to `index` (what a hostile
    /// driver may write, however far past the ring) and kicks.
    pub fn set_avail_index(&mut self, q: usize, index: u16) {
        let (_, avail, _) = Self::rings(q);
        self.write_u16(avail + 2, index);
        self.kick(q);
    }

    /// Makes queue `q`'s call fd hostile: blocking (on the file
    /// description the device shares) with its counter as full as an
    /// eventfd's gets, so the device's next interrupt write blocks.
    pub fn block_call(&mut self, q: usize) {
        // A message with a reply: the device has handled the set-up
        // before it, SET_VRING_CALL included (which makes the fd
        // non-blocking again).
        self.frontend().get_features().expect("GET_FEATURES");
        let call = &self.queues[q].call;
        // Filled while no write can block: any interrupt the device sends
        // from here on finds the counter full. One it sends between the
        // read and the fill makes the fill fail: empty it and try again.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let _ = call.read();
            if call.write(0xffff_ffff_ffff_fffe).is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "could not fill the call fd");
        }
        clear_nonblock(call.as_raw_fd());
    }

    /// Makes every kick fd hostile another way: O_NONBLOCK cleared again
    /// and again, and a thread of the test blocked in read(2) on it, so
    /// it takes most counts before the device's queue worker can. A
    /// device that reads a kick fd in blocking mode then sleeps in read
    /// for good. The threads end when the client is dropped.
    pub fn steal_kicks(&mut self) -> Result<(), Error> {
        for queue in &self.queues {
            self.stealers.push(Stealer::start(&queue.kick)?);
        }
        Ok(())
    }

    /// Gives queue `q` a new kick fd (a semaphore eventfd if
    /// `semaphore`) while it runs, as SET_VRING_KICK on a started queue;
    /// returns the old one, which the frontend still holds. The device
    /// may refuse it and end the connection.
    pub fn replace_kick(&mut self, q: usize, semaphore: bool) -> EventFd {
        let flags = libc::EFD_NONBLOCK | if semaphore { libc::EFD_SEMAPHORE } else { 0 };
        let kick = EventFd::new(flags).expect("eventfd");
        let _ = self.frontend().set_vring_kick(q, &kick);
        std::mem::replace(&mut self.queues[q].kick, kick)
    }

    /// Kick counts `steal_kicks`'s threads took.
    pub fn stolen_kicks(&self) -> u64 {
        self.stealers
            .iter()
            .map(|s| s.stolen.load(Ordering::Relaxed))
            .sum()
    }

    /// Kicks queue `q` with nothing new on it.
    pub fn kick(&self, q: usize) {
        self.kick_with(q, 1);
    }

    /// Adds `count` to queue `q`'s kick counter (what fits).
    pub fn kick_with(&self, q: usize, count: u64) {
        let _ = self.queues[q].kick.write(count);
    }

    /// Whether the device interrupted queue `q` (wrote its call fd)
    /// within `deadline`; takes the interrupt.
    pub fn take_interrupt(&self, q: usize, deadline: Duration) -> bool {
        use std::os::fd::AsRawFd;
        let call = &self.queues[q].call;
        let mut poll = libc::pollfd {
            fd: call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(deadline.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one pollfd this function owns, for one fd `call` keeps open.
        let ready = unsafe { libc::poll(&mut poll, 1, ms) };
        ready == 1 && call.read().is_ok()
    }

    /// Waits for the next used entry of queue `q`: (head, length written).
    pub fn wait_used(&mut self, q: usize, deadline: Duration) -> Result<(u16, u32), Error> {
        let (_, _, used) = Self::rings(q);
        let start = Instant::now();
        loop {
            let idx = self.read_u16(used + 2);
            let queue = &mut self.queues[q];
            if idx != queue.last_used {
                let slot = queue.last_used % QUEUE_SIZE;
                queue.last_used = queue.last_used.wrapping_add(1);
                let entry = self.read(used + 4 + 8 * slot as u64, 8);
                let id = u32::from_le_bytes(entry[0..4].try_into().unwrap());
                let len = u32::from_le_bytes(entry[4..8].try_into().unwrap());
                return Ok((id as u16, len));
            }
            if start.elapsed() > deadline {
                return Err(format!("queue {q}: no completion within {deadline:?}"));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// A well-formed request on queue `q`: its header and status byte at
    /// the given addresses, the `data` buffers (address, length; device-
    /// writable for reads and GET_ID) between. Its descriptors take `q`'s
    /// table from `first`; returns the head to wait for.
    pub fn submit(
        &mut self,
        q: usize,
        first: u16,
        kind: u32,
        sector: u64,
        data: &[(u64, u32)],
        place: (u64, u64),
    ) -> u16 {
        self.post(q, first, kind, sector, data, place);
        let _ = self.queues[q].kick.write(1);
        first
    }

    /// As `submit`, without the kick: the request waits on the ring.
    pub fn post(
        &mut self,
        q: usize,
        first: u16,
        kind: u32,
        sector: u64,
        data: &[(u64, u32)],
        place: (u64, u64),
    ) -> u16 {
        let chain = self.request_chain(first, kind, sector, data, place);
        self.post_repeated(q, first, &chain, 1);
        first
    }

    fn request_chain(
        &mut self,
        first: u16,
        kind: u32,
        sector: u64,
        data: &[(u64, u32)],
        (header, status): (u64, u64),
    ) -> Vec<Desc> {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.write(header, &h);
        self.write(status, &[0xff]);
        let writes = matches!(kind, T_IN | T_GET_ID);
        let mut chain = vec![Desc {
            addr: header,
            len: 16,
            flags: 0,
            next: 0,
        }];
        for &(addr, len) in data {
            chain.push(Desc {
                addr,
                len,
                flags: if writes { F_WRITE } else { 0 },
                next: 0,
            });
        }
        chain.push(Desc {
            addr: status,
            len: 1,
            flags: F_WRITE,
            next: 0,
        });
        let n = chain.len();
        for (i, d) in chain.iter_mut().enumerate() {
            if i + 1 < n {
                d.flags |= F_NEXT;
                d.next = (first + i as u16 + 1) % QUEUE_SIZE;
            }
        }
        chain
    }

    /// One request, waited for: (status byte, used length).
    pub fn request(
        &mut self,
        q: usize,
        kind: u32,
        sector: u64,
        data: &[(u64, u32)],
    ) -> Result<(u8, u32), Error> {
        let (header, status) = (BUFFERS, BUFFERS + 64);
        let head = self.submit(q, 0, kind, sector, data, (header, status));
        let (id, len) = self.wait_used(q, Duration::from_secs(30))?;
        if id != head {
            return Err(format!("used id {id}, expected {head}"));
        }
        Ok((self.read(status, 1)[0], len))
    }

    /// A discard or write-zeroes segment at `at`.
    pub fn segment(&self, at: u64, sector: u64, sectors: u32, flags: u32) {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&sectors.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        self.write(at, &s);
    }

    /// The device's capacity in bytes and its block size.
    pub fn geometry(&self) -> (u64, u32) {
        let capacity = u64::from_le_bytes(self.config[0..8].try_into().unwrap()) * 512;
        let block = u32::from_le_bytes(self.config[20..24].try_into().unwrap());
        (capacity, block)
    }

    /// The vhost-user connection, for protocol-level checks.
    pub fn frontend(&mut self) -> &mut Frontend {
        self.frontend.as_mut().expect("connected")
    }
}

/// A guest changing a buffer while the device works on it: a thread that
/// fills `len` bytes at a guest-physical address with one byte value,
/// then the other, again and again until dropped, through a mapping of
/// its own of the shared memory (so it needs no borrow of the client).
pub struct Scribbler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl BlkClient {
    /// Starts a `Scribbler` over `len` bytes at `gpa`, alternating `bytes`.
    pub fn scribble(&self, gpa: u64, len: usize, bytes: [u8; 2]) -> Result<Scribbler, Error> {
        assert!(gpa as usize + len <= self.len);
        let map_len = self.len;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        // The mapping outlives the client's fd, if need be.
        let base = map_shared(&self.memfd, map_len)? as usize;
        let thread = std::thread::spawn(move || {
            let at = (base + gpa as usize) as *mut u8;
            let mut rounds = 0u64;
            while !stopped.load(Ordering::SeqCst) {
                // SAFETY: in bounds of this thread's own mapping (asserted
                // above), unmapped only below, after the loop.
                unsafe { std::ptr::write_bytes(at, bytes[(rounds % 2) as usize], len) };
                std::hint::black_box(at);
                rounds += 1;
            }
            // SAFETY: the mapping made above, no longer used.
            unsafe { libc::munmap(base as *mut libc::c_void, map_len) };
            rounds
        });
        Ok(Scribbler {
            stop,
            thread: Some(thread),
        })
    }
}

impl Scribbler {
    /// Stops the thread; how many times it filled the buffer.
    pub fn stop(mut self) -> u64 {
        self.finish()
    }

    fn finish(&mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().map_or(0, |t| t.join().unwrap_or(0))
    }
}

impl Drop for Scribbler {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A shared, writable mapping of the first `len` bytes of `file`.
fn map_shared(file: &File, len: usize) -> Result<*mut u8, Error> {
    // SAFETY: a new mapping, no pointer of ours passed in; checked below.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error().to_string());
    }
    Ok(base.cast::<u8>())
}

/// Keeps a kick fd hostile: its counter filled to the most an eventfd
/// holds, O_NONBLOCK cleared again and again (the device sets it on the
/// description it shares) until dropped.
struct Blocker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Blocker {
    fn start(kick: &EventFd) -> Result<Self, Error> {
        kick.write(0xffff_ffff_ffff_fffe).map_err(text)?;
        // The same file description, on an fd of the thread's own.
        let own = kick.try_clone().map_err(text)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                clear_nonblock(own.as_raw_fd());
            }
        });
        Ok(Blocker {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Blocker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Clears O_NONBLOCK on `fd`'s file description (which the device
/// shares, and may set it on again), if it is set.
fn clear_nonblock(fd: std::os::fd::RawFd) {
    // SAFETY: fcntl with no pointer argument; a closed fd only fails.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 && flags & libc::O_NONBLOCK != 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
}

/// A thread that takes a kick fd's counts in blocking reads (see
/// `BlkClient::steal_kicks`).
struct Stealer {
    stop: Arc<AtomicBool>,
    /// Counts it took.
    stolen: Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The signal that ends a stealer's blocked read: a count written to wake
/// it could be taken by a device whose queue worker is stuck in its own
/// read, and would hide that.
fn stealer_signal() -> libc::c_int {
    libc::SIGRTMIN() + 3
}

extern "C" fn ignore_signal(_signal: libc::c_int) {}

impl Stealer {
    fn start(kick: &EventFd) -> Result<Self, Error> {
        static HANDLER: std::sync::Once = std::sync::Once::new();
        HANDLER.call_once(|| {
            // SAFETY: a zeroed sigaction is "no flags (no SA_RESTART), empty
            // mask"; the handler does nothing.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = ignore_signal as extern "C" fn(libc::c_int) as usize;
                libc::sigemptyset(&mut action.sa_mask);
                libc::sigaction(stealer_signal(), &action, std::ptr::null_mut());
            }
        });
        let own = kick.try_clone().map_err(text)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let stolen = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let taken = stolen.clone();
        let thread = std::thread::spawn(move || {
            let fd = own.as_raw_fd();
            let mut count = [0u8; 8];
            while !stopped.load(Ordering::Relaxed) {
                clear_nonblock(fd);
                // SAFETY: a read into a live 8-byte array from an fd this
                // thread owns (`own`).
                if unsafe { libc::read(fd, count.as_mut_ptr().cast(), count.len()) } == 8 {
                    taken.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Ok(Stealer {
            stop,
            stolen,
            thread: Some(thread),
        })
    }
}

impl Drop for Stealer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let Some(thread) = self.thread.take() else {
            return;
        };
        // Its read may be blocked: interrupted (EINTR), again and again
        // in case a signal comes just before the read, until it has seen
        // `stop`.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !thread.is_finished() && Instant::now() < deadline {
            use std::os::unix::thread::JoinHandleExt;
            // SAFETY: the thread is not joined (we hold its handle); the
            // signal's handler does nothing.
            unsafe { libc::pthread_kill(thread.as_pthread_t(), stealer_signal()) };
            std::thread::park_timeout(Duration::from_millis(1));
        }
        if thread.is_finished() {
            let _ = thread.join();
        } else if !std::thread::panicking() {
            panic!("a kick stealer did not end");
        }
    }
}

impl Drop for BlkClient {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `connect`, used by no one after.
        unsafe {
            libc::munmap(self.base.cast(), self.len);
        }
    }
}
