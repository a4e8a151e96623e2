//! ublk attachments (module `ublk_drv`, Linux 6.0 and later) through the
//! `libublk` crate: the kernel hands each request of `/dev/ublkbN` to a
//! queue thread of this daemon over io_uring, and the answer goes back
//! the same way. One queue per core; each queue thread parses the
//! kernel's descriptor and submits to the volume's data area, the same
//! submit point NBD and vhost-user use; completions come back to the
//! queue's own ring through an eventfd (libublk's rings are the queue
//! thread's own and cannot be completed from elsewhere).
//!
//! Restarts: devices are added with `UBLK_F_USER_RECOVERY_REISSUE`. When
//! the daemon goes away, kill -9 included, the kernel keeps the device
//! and its queued I/O (quiesced) and reissues what the dead daemon had
//! taken; the next daemon finds the device by the identifier it left in
//! libublk's run file (`/run/ublksrvd/N.json`, target data `hostcrypt`)
//! and serves it again (START/END_USER_RECOVERY). A mounted filesystem
//! pauses, then carries on.
//!
//! Copies: a read's decrypted data is copied once into the request's
//! buffer (the kernel copies it into the page cache); a write is copied
//! once from it into the buffer that is encrypted. Zero copy
//! (`UBLK_F_AUTO_BUF_REG`) would lend the kernel's pages to an io_uring
//! the backing is read on; the engine's rings are not the queue's, so it
//! is not used (see BENCHMARKS.md for what is measured where).
//!
//! What lives elsewhere: the verbs and names (`mod.rs`, `device.rs`), the
//! kernel's NBD client (`kernel_nbd.rs`).

use std::collections::BTreeMap;
use std::io;
use std::mem::ManuallyDrop;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::{BufDescList, UblkDev, UblkIOCtx, UblkQueue};
use libublk::{sys, BufDesc, UblkFlags, UblkIORes};
use vmm_sys_util::eventfd::EventFd;

use super::kernel_nbd::backend_identifier;
use super::AttachError;
use crate::export::metrics::RequestKind;
use crate::export::{Export, Exports};
use crate::io::IoBuf;
use crate::volume::{Op, OpKind, Outcome};

/// The ublk driver's control device: there when the module is loaded.
const CONTROL: &str = "/dev/ublk-control";
/// Requests in flight per queue (each has a MAX_IO buffer).
const DEPTH: u16 = 64;
/// Queues per device, at most.
const MAX_QUEUES: usize = 8;
/// Largest request, bytes: the device's max_sectors.
const MAX_IO: u32 = 512 * 1024;
/// The tag of the queue's wake-up read (past every request tag).
const WAKE_TAG: u16 = u16::MAX;
/// How long a new or recovered device may take to start serving.
const START_WITHIN: Duration = Duration::from_secs(30);
/// The key of this daemon's identifier in libublk's run file.
const TARGET_KEY: &str = "hostcrypt";

/// What the ublk attachments of one daemon share.
pub struct UblkPlumbing {
    pub exports: Exports,
    /// Queues per new device.
    pub queues: usize,
    /// Where block devices appear (`/dev`).
    pub dev: PathBuf,
    /// Where the kernel describes them (`/sys/block`).
    pub sys_block: PathBuf,
    served: Mutex<BTreeMap<u32, Served>>,
    gate: Arc<Gate>,
}

/// What every queue thread of this daemon checks: parked once the daemon
/// stops (requests are then left to the kernel, which reissues them to
/// the next daemon), and how many requests are being served.
#[derive(Default)]
struct Gate {
    parked: std::sync::atomic::AtomicBool,
    serving: std::sync::atomic::AtomicUsize,
}

/// A device this daemon serves: its control handle (never dropped by
/// accident: libublk deletes a device it added when the handle drops,
/// and a device must outlive a daemon that stops while it is mounted)
/// and the thread that runs its queues.
struct Served {
    ctrl: Arc<ManuallyDrop<UblkCtrl>>,
    thread: JoinHandle<()>,
}

fn ublk_error(what: &str, e: impl std::fmt::Display) -> AttachError {
    AttachError::Io(format!("ublk {what}: {e}"))
}

/// libublk sends control commands on a ring of the calling thread's own,
/// made by the thread that built the control handle; any other thread
/// that sends one (the queue runner, a later detach) needs its own.
fn ensure_control_ring() -> Result<(), AttachError> {
    libublk::ctrl::ublk_init_ctrl_task_ring(|ring| {
        if ring.is_none() {
            let made = io_uring::IoUring::<io_uring::squeue::Entry128>::builder()
                .build(16)
                .map_err(libublk::UblkError::IOError)?;
            *ring = Some(made);
        }
        Ok(())
    })
    .map_err(|e| ublk_error("control ring", e))
}

/// What every device of ours is made or recovered with: recovery with
/// reissue, so a daemon's death never fails the device's I/O.
fn builder(id: i32, queues: u16, depth: u16) -> UblkCtrlBuilder<'static> {
    UblkCtrlBuilder::default()
        .name("hostcrypt")
        .id(id)
        .nr_queues(queues)
        .depth(depth)
        .io_buf_bytes(MAX_IO)
        .ctrl_flags(u64::from(
            sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE,
        ))
}

/// The tag a device added for `identifier` carries in the kernel: its
/// `ublksrv_flags`, set at ADD_DEV and never changed after. The run file
/// libublk keeps under /run/ublksrvd is only a hint to which identifier
/// to check: the kernel's copy is what proves a device ours.
fn identity_tag(identifier: &str) -> u64 {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(identifier.as_bytes());
    let mut tag = [0u8; 8];
    tag.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(tag)
}

/// What the kernel says of device `id`.
struct Known {
    state: u32,
    tag: u64,
    /// Made by root, not as an unprivileged device.
    root_made: bool,
    /// The process serving it, or the last one (`-1`: none).
    server_pid: i32,
    queues: u16,
    depth: u16,
}

fn known(id: u32) -> Option<Known> {
    let info = UblkCtrl::new_simple(i32::try_from(id).ok()?)
        .ok()?
        .dev_info();
    Some(Known {
        state: u32::from(info.state),
        tag: info.ublksrv_flags,
        root_made: info.owner_uid == 0 && info.flags & u64::from(sys::UBLK_F_UNPRIVILEGED_DEV) == 0,
        server_pid: info.ublksrv_pid,
        queues: info.nr_hw_queues,
        depth: info.queue_depth,
    })
}

/// Device `id`'s identifier and record, if it is proven ours: root made
/// it and its kernel tag matches the identifier its run file names.
fn proven(id: u32) -> Option<(String, Known)> {
    let identifier = run_file_identifier(id)?;
    let device = known(id)?;
    (device.root_made && device.tag == identity_tag(&identifier)).then_some((identifier, device))
}

fn alive(pid: i32) -> bool {
    pid > 0 && Path::new(&format!("/proc/{pid}")).exists()
}

/// The identifier libublk's run file for device `id` names: opened
/// without following links or blocking, a regular file of root's, at
/// most 64 KiB. Only a hint (see [`identity_tag`]).
fn run_file_identifier(id: u32) -> Option<String> {
    read_identifier(
        Path::new(&format!("{}/{id:04}.json", UblkCtrl::run_dir())),
        0,
    )
}

/// [`run_file_identifier`] on `path`, which must belong to `owner`.
fn read_identifier(path: &Path, owner: u32) -> Option<String> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() || meta.uid() != owner || meta.len() > 64 * 1024 {
        return None;
    }
    let mut text = String::new();
    file.take(64 * 1024).read_to_string(&mut text).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let identifier = json.get("target_data")?.get(TARGET_KEY)?.as_str()?;
    Some(identifier.to_owned())
}

/// libublk's run directory, made root's and private before libublk
/// writes to it (libublk makes it world-writable): entries that are not
/// regular files of root's are removed.
fn secure_run_dir() {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let dir = PathBuf::from(UblkCtrl::run_dir());
    let _ = std::fs::DirBuilder::new().mode(0o700).create(&dir);
    let Ok(meta) = dir.symlink_metadata() else {
        return;
    };
    if !meta.is_dir() {
        tracing::warn!(
            "{} is not a directory: ublk attachments cannot recover",
            dir.display()
        );
        return;
    }
    if meta.uid() != 0 {
        let _ = std::os::unix::fs::lchown(&dir, Some(0), Some(0));
    }
    let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let ours = entry
                .path()
                .symlink_metadata()
                .is_ok_and(|m| m.is_file() && m.uid() == 0);
            if !ours {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

impl UblkPlumbing {
    pub fn new(exports: Exports, queues: usize, dev: PathBuf, sys_block: PathBuf) -> Self {
        UblkPlumbing {
            exports,
            queues: queues.clamp(1, MAX_QUEUES),
            dev,
            sys_block,
            served: Mutex::default(),
            gate: Arc::default(),
        }
    }

    fn served(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, Served>> {
        self.served.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the kernel can make ublk devices here.
    pub fn available() -> bool {
        Path::new(CONTROL).exists()
    }

    /// A new device for `volume`, or the one an earlier daemon left for
    /// it, served. Returns its number.
    pub fn attach(&self, volume: &str, uuid: &uuid::Uuid) -> Result<u32, AttachError> {
        if let Some(id) = self.resume(volume, uuid)? {
            return Ok(id);
        }
        if !Self::available() {
            return Err(AttachError::Io(format!(
                "no {CONTROL}: load the ublk_drv module (modprobe ublk_drv; Linux 6.0 or later), \
                 or use --via nbd"
            )));
        }
        let export = self
            .exports
            .find(volume)
            .ok_or_else(|| AttachError::NoVolume(volume.to_owned()))?;
        secure_run_dir();
        let identifier = backend_identifier(volume, uuid);
        let ctrl = builder(-1, self.queues as u16, DEPTH)
            .ctrl_target_flags(identity_tag(&identifier))
            .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
            .build()
            .map_err(|e| ublk_error("add", e))?;
        self.serve(ctrl, export, identifier, true)
    }

    /// Serves the device behind `ctrl` on a thread of its own (libublk
    /// runs one thread per queue under it) and waits until it serves. A
    /// device this call `added` that does not start is deleted; one being
    /// recovered is left as the kernel holds it (a later resume tries
    /// again; deleting it would fail a mounted filesystem's I/O).
    fn serve(
        &self,
        ctrl: UblkCtrl,
        export: Arc<Export>,
        identifier: String,
        added: bool,
    ) -> Result<u32, AttachError> {
        let id = ctrl.dev_info().dev_id;
        let ctrl = Arc::new(ManuallyDrop::new(ctrl));
        let (started_tx, started_rx) = mpsc::channel::<Result<u32, String>>();
        let failed_tx = started_tx.clone();
        let runner = ctrl.clone();
        let params = Params::of(&export);
        let queue_export = export.clone();
        let gate = self.gate.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ublk{id}"))
            .spawn(move || {
                if let Err(e) = ensure_control_ring() {
                    let _ = failed_tx.send(Err(e.to_string()));
                    return;
                }
                let result = runner.run_target(
                    move |dev: &mut UblkDev| {
                        params.apply(dev);
                        dev.set_target_json(serde_json::json!({ TARGET_KEY: identifier }));
                        Ok(())
                    },
                    move |queue: u16, dev: &UblkDev| serve_queue(queue, dev, &queue_export, &gate),
                    move |ctrl: &UblkCtrl| {
                        let _ = started_tx.send(Ok(ctrl.dev_info().dev_id));
                    },
                );
                if let Err(e) = result {
                    let _ = failed_tx.send(Err(e.to_string()));
                }
            })
            .map_err(|e| ublk_error("queue thread", e))?;
        let outcome = match started_rx.recv_timeout(START_WITHIN) {
            Ok(Ok(id)) => Ok(id),
            Ok(Err(e)) => Err(ublk_error("start", e)),
            Err(_) => Err(AttachError::Io(format!(
                "ublk device {id} did not start within {START_WITHIN:?}"
            ))),
        };
        match outcome {
            Ok(id) => {
                tracing::info!(volume = export.name(), device = id, "ublk device serving");
                self.served().insert(id, Served { ctrl, thread });
                Ok(id)
            }
            Err(e) => {
                // Through a handle of this thread's own: the runner may
                // still hold `ctrl`'s lock. Its threads are left to end
                // with the device.
                if added {
                    if let Ok(fresh) = UblkCtrl::new_simple(id as i32) {
                        let _ = fresh.kill_dev();
                        delete(&fresh, id);
                    }
                }
                Err(e)
            }
        }
    }

    /// Serves again the device an earlier daemon left for `volume` (the
    /// kernel holds its I/O meanwhile); `None` when there is none, or
    /// when another live process serves it.
    pub fn resume(&self, volume: &str, uuid: &uuid::Uuid) -> Result<Option<u32>, AttachError> {
        let identifier = backend_identifier(volume, uuid);
        let Some(id) = self.find(&identifier) else {
            return Ok(None);
        };
        if self.served().contains_key(&id) {
            return Ok(Some(id));
        }
        let export = self
            .exports
            .find(volume)
            .ok_or_else(|| AttachError::NoVolume(volume.to_owned()))?;
        let Some(device) = known(id) else {
            return Ok(None);
        };
        if device.state != sys::UBLK_S_DEV_QUIESCED {
            // Live under another process, or not yet quiesced after its
            // server died (the kernel notices within seconds): not ours
            // to take now; the resume loop looks again.
            return Ok(None);
        }
        secure_run_dir();
        ensure_control_ring()?;
        // libublk hands a refusal back as a negative errno in `Ok` (an
        // EBUSY it has retried for 30 s, among others).
        let begun = UblkCtrl::new_simple(id as i32)
            .and_then(|c| c.start_user_recover())
            .map_err(|e| ublk_error("start recovery", e))?;
        if begun < 0 {
            return Err(ublk_error(
                "start recovery",
                io::Error::from_raw_os_error(-begun),
            ));
        }
        // The kernel's shape, not this host's core count: the queues are
        // the device's.
        let ctrl = builder(id as i32, device.queues, device.depth)
            .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
            .build()
            .map_err(|e| ublk_error("recover", e))?;
        self.serve(ctrl, export, identifier, false).map(Some)
    }

    /// Stops and deletes device `id`: its queues end, the kernel fails
    /// what is still queued, `/dev/ublkbN` goes.
    pub fn disconnect(&self, id: u32) -> Result<(), AttachError> {
        ensure_control_ring()?;
        let served = self.served().remove(&id);
        match served {
            Some(Served { ctrl, thread }) => {
                let begun = Instant::now();
                ctrl.kill_dev().map_err(|e| ublk_error("stop", e))?;
                tracing::debug!(device = id, "ublk stopped after {:?}", begun.elapsed());
                let _ = thread.join();
                tracing::debug!(device = id, "ublk queues ended after {:?}", begun.elapsed());
                if delete(&ctrl, id) {
                    // Deleted: dropping the handle now deletes nothing more.
                    if let Ok(ctrl) = Arc::try_unwrap(ctrl) {
                        drop(ManuallyDrop::into_inner(ctrl));
                    }
                }
                tracing::debug!(device = id, "ublk deleted after {:?}", begun.elapsed());
                Ok(())
            }
            None => {
                let ctrl = UblkCtrl::new_simple(id as i32).map_err(|e| ublk_error("open", e))?;
                let _ = ctrl.kill_dev();
                delete(&ctrl, id);
                Ok(())
            }
        }
    }

    /// Devices left for an earlier volume named `volume` (another UUID:
    /// a temp volume before a restart) whose server is gone: deleted,
    /// rather than left holding their I/O forever. A device another live
    /// process serves, or one caught in its own restart, is left alone.
    pub fn disconnect_orphans(&self, volume: &str, uuid: &uuid::Uuid) -> Vec<u32> {
        let prefix = format!("hostcrypt:{volume}:");
        let current = backend_identifier(volume, uuid);
        let mut gone = Vec::new();
        for (id, identifier, device) in self.devices() {
            if !identifier.starts_with(&prefix) || identifier == current {
                continue;
            }
            let orphaned = device.state == sys::UBLK_S_DEV_QUIESCED && !alive(device.server_pid);
            if orphaned && !self.served().contains_key(&id) && self.disconnect(id).is_ok() {
                gone.push(id);
            }
        }
        gone
    }

    /// Before the daemon's final flush: new requests are left to the
    /// kernel (parked; it reissues them to the next daemon), and those
    /// being served finish, within `limit`. Returns whether they did.
    pub fn park(&self, limit: Duration) -> bool {
        use std::sync::atomic::Ordering;
        self.gate.parked.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + limit;
        while self.gate.serving.load(Ordering::SeqCst) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// `/dev/ublkbN`.
    pub fn device(&self, id: u32) -> PathBuf {
        self.dev.join(format!("ublkb{id}"))
    }

    /// `/sys/block/ublkbN`.
    pub fn sys_dir(&self, id: u32) -> PathBuf {
        self.sys_block.join(format!("ublkb{id}"))
    }

    /// The device carrying `identifier`.
    pub fn find(&self, identifier: &str) -> Option<u32> {
        self.devices()
            .into_iter()
            .find_map(|(id, i, _)| (i == identifier).then_some(id))
    }

    /// The identifier device `id` carries, if it is one of ours.
    pub fn backend_of(&self, id: u32) -> Option<String> {
        proven(id).map(|(identifier, _)| identifier)
    }

    /// Every ublk device proven ours (root made it, its kernel tag
    /// matches the identifier its run file names), with that identifier.
    fn devices(&self) -> Vec<(u32, String, Known)> {
        let Ok(entries) = std::fs::read_dir("/sys/class/ublk-char") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let id = e
                    .file_name()
                    .to_str()?
                    .strip_prefix("ublkc")?
                    .parse()
                    .ok()?;
                let (identifier, device) = proven(id)?;
                Some((id, identifier, device))
            })
            .collect()
    }
}

/// Deletes a stopped device without waiting for its last opener (the
/// detach's own claim, a forced detach's mount): DEL_DEV_ASYNC. A kernel
/// without it gets the waiting DEL_DEV, on a thread of its own. Returns
/// whether `ctrl` itself deleted it.
fn delete(ctrl: &UblkCtrl, id: u32) -> bool {
    if ctrl.del_dev_async().is_ok() {
        return true;
    }
    let spawned = std::thread::Builder::new()
        .name(format!("ublk{id}-del"))
        .spawn(move || {
            let deleted = ensure_control_ring()
                .and_then(|()| UblkCtrl::new_simple(id as i32).map_err(|e| ublk_error("open", e)))
                .and_then(|c| c.del_dev().map_err(|e| ublk_error("delete", e)));
            if let Err(e) = deleted {
                tracing::warn!(device = id, "{e}");
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(device = id, "ublk delete: {e}");
    }
    false
}

/// The device's shape, from the volume: its sector size is the logical
/// block size; discards where the volume allows them.
#[derive(Clone, Copy)]
struct Params {
    size: u64,
    sector_shift: u8,
    discards: bool,
}

impl Params {
    fn of(export: &Export) -> Self {
        let sector = export.volume.data.sector_size().max(512);
        Params {
            size: export.size(),
            sector_shift: sector.trailing_zeros() as u8,
            discards: export.allow_discards,
        }
    }

    fn apply(self, dev: &mut UblkDev) {
        let max_sectors = dev.dev_info.max_io_buf_bytes >> 9;
        dev.tgt.dev_size = self.size;
        let mut params = sys::ublk_params {
            types: sys::UBLK_PARAM_TYPE_BASIC,
            basic: sys::ublk_param_basic {
                attrs: sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA,
                logical_bs_shift: self.sector_shift,
                physical_bs_shift: self.sector_shift.max(12),
                io_opt_shift: self.sector_shift.max(12),
                io_min_shift: self.sector_shift,
                max_sectors,
                dev_sectors: self.size >> 9,
                ..Default::default()
            },
            ..Default::default()
        };
        if self.discards {
            params.types |= sys::UBLK_PARAM_TYPE_DISCARD;
            params.discard = sys::ublk_param_discard {
                discard_granularity: 1 << self.sector_shift,
                max_discard_sectors: max_sectors,
                max_write_zeroes_sectors: max_sectors,
                max_discard_segments: 1,
                ..Default::default()
            };
        }
        dev.tgt.params = params;
    }
}

/// A request's answer, on its way back to the queue's thread.
struct Completion {
    tag: u16,
    kind: RequestKind,
    len: u64,
    started: Instant,
    result: io::Result<Option<IoBuf>>,
}

/// One queue: fetch commands for every tag, then parse, submit and
/// answer until the device stops (the queue's commands come back
/// aborted and libublk returns).
fn serve_queue(queue: u16, dev: &UblkDev, export: &Arc<Export>, gate: &Arc<Gate>) {
    // A queue that cannot start must say so, or libublk's start waits
    // for its buffers forever (holding the control handle's lock).
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        tracing::error!(volume = export.name(), queue, "ublk queue {what}: {e}");
        dev.notify_buffer_registration_complete(true);
    };
    let wake = match EventFd::new(0) {
        Ok(fd) => Arc::new(fd),
        Err(e) => return failed("eventfd", &e),
    };
    let mut bufs = dev.alloc_queue_io_bufs();
    let ring = match UblkQueue::new(queue, dev)
        .and_then(|q| q.submit_fetch_commands_unified(BufDescList::Slices(Some(&bufs))))
    {
        Ok(q) => q,
        Err(e) => return failed("set-up", &e),
    };
    let (done_tx, done_rx) = mpsc::channel::<Completion>();
    // The wake-up read may still be pending in the queue's ring (which
    // lives as long as this thread) after this function returns: its
    // target outlives both.
    let counter: &'static mut [u8; 8] = Box::leak(Box::new([0u8; 8]));
    arm_wake(&ring, &wake, counter);
    ring.wait_and_handle_io(|q, tag, ctx| {
        if ctx.is_tgt_io() {
            while let Ok(done) = done_rx.try_recv() {
                answer(q, &mut bufs, export, done);
                gate.serving
                    .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            }
            if ctx.result() >= 0 || ctx.result() == -libc::EINTR {
                arm_wake(q, &wake, counter);
            } else {
                tracing::error!(
                    volume = export.name(),
                    "ublk queue wake-up read failed ({}): requests of this queue stall",
                    ctx.result()
                );
            }
            return;
        }
        let Some(buf) = bufs.get(usize::from(tag)) else {
            return;
        };
        // Counted before the check: `park` then waits for this one, or
        // this one sees the gate parked and leaves the request to the
        // kernel (never answered here; reissued to the next daemon).
        gate.serving
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if gate.parked.load(std::sync::atomic::Ordering::SeqCst) {
            gate.serving
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            return;
        }
        start(q, tag, buf, export, &done_tx, &wake);
    });
}

/// Queues a read of the wake-up eventfd on the queue's ring.
fn arm_wake(q: &UblkQueue, wake: &EventFd, counter: &mut [u8; 8]) {
    use std::os::fd::AsRawFd;
    let sqe = io_uring::opcode::Read::new(
        io_uring::types::Fd(wake.as_raw_fd()),
        counter.as_mut_ptr(),
        8,
    )
    .build()
    .user_data(UblkIOCtx::build_user_data(WAKE_TAG, 0, 0, true));
    if let Err(e) = q.ublk_submit_sqe_sync(sqe) {
        tracing::error!("ublk queue wake-up read: {e}");
    }
}

/// A request as the kernel's descriptor gives it, checked.
#[derive(Debug, PartialEq, Eq)]
enum Decoded {
    Flush,
    Read {
        offset: u64,
        len: u64,
    },
    Write {
        offset: u64,
        len: u64,
        fua: bool,
    },
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        fua: bool,
        punch: bool,
    },
}

/// The kind a descriptor's op counts as (`None`: not one we serve).
fn kind_of(op_flags: u32) -> Option<OpKind> {
    match op_flags & 0xff {
        sys::UBLK_IO_OP_READ => Some(OpKind::Read),
        sys::UBLK_IO_OP_WRITE => Some(OpKind::Write),
        sys::UBLK_IO_OP_FLUSH => Some(OpKind::Flush),
        sys::UBLK_IO_OP_DISCARD => Some(OpKind::Trim),
        sys::UBLK_IO_OP_WRITE_ZEROES => Some(OpKind::WriteZeroes),
        _ => None,
    }
}

/// Checks a descriptor against the device: the kernel keeps requests
/// within it, but its fields are read from shared memory, so the range
/// is checked with checked arithmetic, data fits the request's buffer
/// (`max_data`), and what the device did not offer is refused. A flush
/// names no range (its sector may be anything). Errors are errnos.
fn decode(
    op_flags: u32,
    start_sector: u64,
    nr_sectors: u32,
    size: u64,
    allow_discards: bool,
    max_data: usize,
) -> Result<Decoded, i32> {
    let kind = kind_of(op_flags).ok_or(libc::EOPNOTSUPP)?;
    if kind == OpKind::Flush {
        return Ok(Decoded::Flush);
    }
    let fua = op_flags & sys::UBLK_IO_F_FUA != 0;
    let len = u64::from(nr_sectors) << 9;
    let offset = start_sector.checked_mul(512).ok_or(libc::EIO)?;
    let end = offset.checked_add(len).ok_or(libc::EIO)?;
    if end > size {
        return Err(libc::EIO);
    }
    if len == 0 {
        return Err(libc::EINVAL);
    }
    let carries_data = matches!(kind, OpKind::Read | OpKind::Write);
    if carries_data && len > max_data as u64 {
        return Err(libc::EINVAL);
    }
    Ok(match kind {
        OpKind::Read => Decoded::Read { offset, len },
        OpKind::Write => Decoded::Write { offset, len, fua },
        OpKind::Trim if allow_discards => Decoded::Trim { offset, len, fua },
        OpKind::WriteZeroes => Decoded::WriteZeroes {
            offset,
            len,
            fua,
            // Holes only where the volume allows discards, as NBD.
            punch: op_flags & sys::UBLK_IO_F_NOUNMAP == 0 && allow_discards,
        },
        _ => return Err(libc::EOPNOTSUPP),
    })
}

/// Decodes the kernel's descriptor for `tag` and submits it; the answer
/// comes back through `done` and `wake`.
fn start(
    q: &UblkQueue,
    tag: u16,
    buf: &libublk::helpers::IoBuf<u8>,
    export: &Arc<Export>,
    done: &mpsc::Sender<Completion>,
    wake: &Arc<EventFd>,
) {
    let iod = q.get_iod(tag);
    let kind = kind_of(iod.op_flags);
    let decoded = decode(
        iod.op_flags,
        iod.start_sector,
        iod.nr_sectors,
        export.size(),
        export.allow_discards,
        buf.len(),
    );
    let len = u64::from(iod.nr_sectors) << 9;
    let started = Instant::now();
    export.metrics.begin();
    let reply = {
        let done = done.clone();
        let wake = wake.clone();
        move |result: io::Result<Option<IoBuf>>| {
            let _ = done.send(Completion {
                tag,
                kind: kind.map_or(RequestKind::Other, RequestKind::Op),
                len,
                started,
                result,
            });
            // Never fails but at a counter's end, which still wakes.
            let _ = wake.write(1);
        }
    };
    let decoded = match decoded {
        Ok(decoded) => decoded,
        Err(errno) => return reply(Err(io::Error::from_raw_os_error(errno))),
    };
    let area = export.volume.data.clone();
    match decoded {
        Decoded::Flush => area.submit(Op::Flush, move |o| reply(o.map(|_| None))),
        Decoded::Read { offset, len } => area.submit(
            Op::Read {
                offset,
                len: len as usize,
            },
            move |outcome| {
                reply(match outcome {
                    Ok(Outcome::Data(data)) => Ok(Some(data)),
                    Ok(_) => Err(io::Error::other("a read returned no data")),
                    Err(e) => Err(e),
                })
            },
        ),
        Decoded::Write { offset, len, fua } => {
            // `decode` kept `len` within the buffer.
            let source = &buf.as_slice()[..len as usize];
            let mut data = IoBuf::new(source.len());
            data.copy_from_slice(source);
            area.submit(
                Op::Write {
                    offset,
                    data: data.into(),
                    fua,
                },
                move |o| reply(o.map(|_| None)),
            )
        }
        Decoded::Trim { offset, len, fua } => area
            .submit(Op::Trim { offset, len, fua }, move |o| {
                reply(o.map(|_| None))
            }),
        Decoded::WriteZeroes {
            offset,
            len,
            fua,
            punch,
        } => area.submit(
            Op::WriteZeroes {
                offset,
                len,
                punch,
                fua,
            },
            move |o| reply(o.map(|_| None)),
        ),
    }
}

/// Answers one request on the queue's thread: a read's data into the
/// request's buffer, then the result (bytes done, or -errno).
fn answer(
    q: &UblkQueue,
    bufs: &mut [libublk::helpers::IoBuf<u8>],
    export: &Export,
    done: Completion,
) {
    let Completion {
        tag,
        kind,
        len,
        started,
        result,
    } = done;
    let Some(buf) = bufs.get_mut(usize::from(tag)) else {
        return;
    };
    let res = match result {
        Ok(Some(data)) => match buf.as_mut_slice().get_mut(..data.len()) {
            Some(target) if data.len() as u64 == len => {
                target.copy_from_slice(&data);
                len as i32
            }
            _ => -libc::EIO,
        },
        Ok(None) if kind == RequestKind::Op(OpKind::Flush) => 0,
        Ok(None) => len as i32,
        Err(e) => {
            tracing::debug!(volume = export.name(), tag, "ublk request failed: {e}");
            -e.raw_os_error().filter(|&n| n > 0).unwrap_or(libc::EIO)
        }
    };
    export
        .metrics
        .complete(kind, len, res < 0, started.elapsed());
    export.metrics.end();
    if let Err(e) = q.complete_io_cmd_unified(
        tag,
        BufDesc::Slice(buf.as_slice()),
        Ok(UblkIORes::Result(res)),
    ) {
        tracing::warn!(volume = export.name(), tag, "ublk completion: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const BUF: usize = 512 * 1024;

    #[test]
    fn reads_and_writes_within_the_device_decode() {
        assert_eq!(
            decode(sys::UBLK_IO_OP_READ, 8, 8, MIB, false, BUF),
            Ok(Decoded::Read {
                offset: 4096,
                len: 4096
            })
        );
        assert_eq!(
            decode(
                sys::UBLK_IO_OP_WRITE | sys::UBLK_IO_F_FUA,
                2040,
                8,
                MIB,
                false,
                BUF
            ),
            Ok(Decoded::Write {
                offset: MIB - 4096,
                len: 4096,
                fua: true
            })
        );
    }

    #[test]
    fn ranges_past_the_end_or_overflowing_are_refused() {
        let read = sys::UBLK_IO_OP_READ;
        assert_eq!(decode(read, 2041, 8, MIB, false, BUF), Err(libc::EIO));
        assert_eq!(decode(read, u64::MAX, 8, MIB, false, BUF), Err(libc::EIO));
        assert_eq!(
            decode(read, u64::MAX / 512, u32::MAX, MIB, false, BUF),
            Err(libc::EIO)
        );
        assert_eq!(decode(read, 0, 0, MIB, false, BUF), Err(libc::EINVAL));
    }

    #[test]
    fn data_larger_than_the_request_buffer_is_refused() {
        let sectors = (BUF / 512) as u32;
        for o in [sys::UBLK_IO_OP_READ, sys::UBLK_IO_OP_WRITE] {
            assert!(decode(o, 0, sectors, 1 << 30, false, BUF).is_ok());
            assert_eq!(
                decode(o, 0, sectors + 1, 1 << 30, false, BUF),
                Err(libc::EINVAL)
            );
        }
        // Discards and write-zeroes carry no data.
        assert!(decode(
            sys::UBLK_IO_OP_WRITE_ZEROES,
            0,
            sectors * 4,
            1 << 30,
            false,
            BUF
        )
        .is_ok());
    }

    /// The run file is a hint a local user may have planted: a link, a
    /// FIFO (which would block an open), another owner's file or a huge
    /// one is not read; a well-formed one of the right owner is.
    #[test]
    fn a_planted_run_file_is_not_read() {
        let dir = std::env::temp_dir().join(format!("hc-ublk-run-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let me = unsafe { libc::geteuid() };
        let good = dir.join("good.json");
        std::fs::write(&good, r#"{"target_data":{"hostcrypt":"hostcrypt:v:x"}}"#).unwrap();
        assert_eq!(read_identifier(&good, me).as_deref(), Some("hostcrypt:v:x"));
        assert_eq!(
            read_identifier(&good, me.wrapping_add(1)),
            None,
            "another owner's"
        );
        let link = dir.join("link.json");
        std::os::unix::fs::symlink(&good, &link).unwrap();
        assert_eq!(read_identifier(&link, me), None, "a symbolic link");
        let fifo = dir.join("fifo.json");
        let name = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        assert_eq!(read_identifier(&fifo, me), None, "a FIFO");
        let huge = dir.join("huge.json");
        let padding = " ".repeat(70 * 1024);
        std::fs::write(
            &huge,
            format!(r#"{{"target_data":{{"hostcrypt":"hostcrypt:v:x"}}}}{padding}"#),
        )
        .unwrap();
        assert_eq!(read_identifier(&huge, me), None, "past 64 KiB");
        for bad in ["not json", r#"{"target_data":{"hostcrypt":7}}"#, r#"{}"#] {
            std::fs::write(&good, bad).unwrap();
            assert_eq!(read_identifier(&good, me), None, "{bad}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_flush_names_no_range() {
        assert_eq!(
            decode(sys::UBLK_IO_OP_FLUSH, u64::MAX, 0, MIB, false, BUF),
            Ok(Decoded::Flush)
        );
    }

    #[test]
    fn discards_follow_allow_discards_and_unknown_ops_are_refused() {
        let discard = sys::UBLK_IO_OP_DISCARD;
        assert_eq!(
            decode(discard, 0, 8, MIB, false, BUF),
            Err(libc::EOPNOTSUPP)
        );
        assert!(matches!(
            decode(discard, 0, 8, MIB, true, BUF),
            Ok(Decoded::Trim { .. })
        ));
        let zeroes = sys::UBLK_IO_OP_WRITE_ZEROES;
        for (flags, allow, punch) in [
            (0, true, true),
            (sys::UBLK_IO_F_NOUNMAP, true, false),
            (0, false, false),
        ] {
            assert!(matches!(
                decode(zeroes | flags, 0, 8, MIB, allow, BUF),
                Ok(Decoded::WriteZeroes { punch: p, .. }) if p == punch
            ));
        }
        for unknown in [
            sys::UBLK_IO_OP_WRITE_SAME,
            sys::UBLK_IO_OP_ZONE_APPEND,
            0xff,
        ] {
            assert_eq!(decode(unknown, 0, 8, MIB, true, BUF), Err(libc::EOPNOTSUPP));
        }
    }
}
