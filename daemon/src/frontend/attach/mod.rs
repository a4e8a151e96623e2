//! Attachments: a volume as a kernel block device on this host, made by
//! the daemon itself (`hostcrypt attach`), so an operator mounts
//! `/dev/hostcrypt/VOLUME` as a dm-crypt user mounts `/dev/mapper/NAME`.
//! Through ublk (`ublk.rs`, over the `libublk` crate) or the kernel's
//! NBD client (`kernel_nbd.rs` over `netlink.rs`); the device's name and
//! users are `device.rs`.
//!
//! A restart of the daemon, kill -9 included, leaves the device in place:
//! the kernel holds its I/O (ublk: the device is quiesced until a daemon
//! recovers it; NBD: for the dead-connection timeout), and the new daemon
//! finds the device by the identifier it carries at start
//! ([`Attacher::resume_all`]) and serves it again. A mounted filesystem
//! pauses, then carries on.
//!
//! Here: the attachments of this daemon, the verbs (attach, detach, list)
//! and the frontend contract. The control socket calls the verbs
//! (`control/server.rs`); nothing here reads the config.

mod device;
mod kernel_nbd;
mod netlink;
mod ublk;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};

pub use kernel_nbd::{parse_backend_identifier, Plumbing};
pub use ublk::UblkPlumbing;

use crate::export::Exports;
use crate::frontend::{Context, Frontend, Running};

/// How a volume reaches the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Via {
    /// The kernel's NBD client (module `nbd`).
    Nbd,
    /// ublk (module `ublk_drv`, Linux 6.0 and later).
    Ublk,
}

impl Via {
    /// What `auto` (or no choice) means here: ublk where the kernel has
    /// it, else the kernel's NBD client.
    pub fn best_available() -> Via {
        if UblkPlumbing::available() {
            Via::Ublk
        } else {
            Via::Nbd
        }
    }
}

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Via::Nbd => "nbd",
            Via::Ublk => "ublk",
        })
    }
}

/// One attached volume, as `hostcrypt attached` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attached {
    pub volume: String,
    pub via: Via,
    /// The kernel's device (`/dev/nbd0`) and its index.
    pub device: PathBuf,
    pub index: u32,
    /// Its stable name (`/dev/hostcrypt/VOLUME`).
    pub name: PathBuf,
    /// Unix seconds when this daemon attached (or resumed) it.
    pub since: u64,
    /// Mounts and holders, when asked for.
    #[serde(default)]
    pub users: Vec<String>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AttachError {
    #[error("no volume named {0:?} is served")]
    NoVolume(String),
    #[error("{0} is already attached as {1}")]
    Already(String, String),
    #[error("{0} is not attached")]
    NotAttached(String),
    #[error("{0} is in use ({1}); unmount it first, or detach --force")]
    InUse(String, String),
    #[error("{0:?} cannot name a device: use letters, digits, '_', '.', '-' (64 at most)")]
    BadName(String),
    #[error("flushing {0} failed ({1}); nothing was detached (detach --force drops what it held)")]
    Flush(String, String),
    #[error("the handshake on the daemon's own socket failed: {0}")]
    Handshake(String),
    #[error("{0}")]
    Netlink(String),
    #[error("{0}")]
    Io(String),
}

/// This daemon's attachments.
pub struct Attacher {
    exports: Exports,
    plumbing: Plumbing,
    ublk: UblkPlumbing,
    /// Where the stable names go (`/dev/hostcrypt`).
    names: PathBuf,
    attached: Mutex<BTreeMap<String, Attached>>,
    /// Volumes whose config says `attach` (`None`: auto): attached at
    /// start, detached at stop when nothing uses them.
    configured: Mutex<Vec<(String, Option<Via>)>>,
    /// Held through each attach, detach and resume: two at once would
    /// connect one volume twice, or detach what is being attached.
    operation: Mutex<()>,
    /// Volumes detached here: a device still configured after a forced
    /// detach (held open) is not resumed behind the operator's back.
    detached: Mutex<std::collections::BTreeSet<String>>,
}

impl Attacher {
    pub fn new(
        exports: Exports,
        plumbing: Plumbing,
        ublk: UblkPlumbing,
        names: PathBuf,
    ) -> Arc<Self> {
        Arc::new(Attacher {
            exports,
            plumbing,
            ublk,
            names,
            attached: Mutex::new(BTreeMap::new()),
            configured: Mutex::new(Vec::new()),
            operation: Mutex::new(()),
            detached: Mutex::default(),
        })
    }

    fn exclusive(&self) -> std::sync::MutexGuard<'_, ()> {
        self.operation
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The volumes the config attaches (`attach = ...`).
    pub fn set_configured(&self, volumes: Vec<(String, Option<Via>)>) {
        *self
            .configured
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = volumes;
    }

    fn configured(&self) -> Vec<(String, Option<Via>)> {
        self.configured
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// At start: drops names left pointing at devices that are not this
    /// daemon's volumes any more, resumes what an earlier daemon left
    /// attached, then attaches what the config asks for.
    pub fn start(&self) {
        self.prune_names();
        self.resume_all();
        for (volume, via) in self.configured() {
            if self.lock().contains_key(&volume) {
                continue;
            }
            if let Err(e) = self.attach(&volume, via) {
                let via = via.map_or("auto".to_string(), |v| v.to_string());
                tracing::error!(volume, "attach = {via}: {e}");
            }
        }
    }

    /// Before the daemon stops (while it still serves): a temp volume's
    /// device is detached (its data is erased at stop and a new temp
    /// volume is a different disk: a filesystem must not carry on onto
    /// it); so is a configured one that nothing uses. A device in use
    /// stays, and the next daemon resumes it.
    pub fn before_stop(&self) {
        let configured: Vec<String> = self.configured().into_iter().map(|(v, _)| v).collect();
        let attached: Vec<Attached> = self.lock().values().cloned().collect();
        for a in attached {
            let temp = self
                .exports
                .find(&a.volume)
                .is_some_and(|e| e.volume.role == crate::volume::Role::Temp);
            let result = if temp {
                self.detach(&a.volume, true)
            } else if configured.contains(&a.volume) {
                match self.detach(&a.volume, false) {
                    Err(AttachError::InUse(device, users)) => {
                        tracing::info!(
                            volume = a.volume,
                            "{device} stays attached ({users}); the next daemon resumes it"
                        );
                        continue;
                    }
                    other => other,
                }
            } else {
                continue;
            };
            if let Err(e) = result {
                tracing::warn!(volume = a.volume, "detach at stop: {e}");
            }
        }
        // A last look for orphans the ticks have not removed yet.
        {
            let _one_at_a_time = self.exclusive();
            for export in self.exports.iter() {
                self.remove_orphans(export.name(), &export.volume.uuid);
            }
        }
        // ublk devices left attached: from here on their requests wait in
        // the kernel for the next daemon, and none is served after the
        // final flush.
        if !self.ublk.park(PARK_WITHIN) {
            tracing::warn!("ublk requests still being served after {PARK_WITHIN:?}");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Attached>> {
        self.attached.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Attaches `volume` (blocking: handshakes, netlink, ublk's control
    /// commands) `via` one way (`None`: the best available) and names it.
    pub fn attach(&self, volume: &str, via: Option<Via>) -> Result<Attached, AttachError> {
        let _one_at_a_time = self.exclusive();
        let via = via.unwrap_or_else(Via::best_available);
        if !device::valid_name(volume) {
            return Err(AttachError::BadName(volume.to_owned()));
        }
        let export = self
            .exports
            .find(volume)
            .ok_or_else(|| AttachError::NoVolume(volume.to_owned()))?;
        if let Some(a) = self.lock().get(volume) {
            return Err(AttachError::Already(
                volume.to_owned(),
                a.device.display().to_string(),
            ));
        }
        self.detached
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(volume);
        let index = match via {
            Via::Nbd => self.plumbing.attach(volume, &export.volume.uuid)?,
            Via::Ublk => self.ublk.attach(volume, &export.volume.uuid)?,
        };
        self.record(volume, via, index).inspect_err(|_| {
            // Connected but not named or recorded: nobody could detach it.
            let _ = self.disconnect(via, index);
        })
    }

    fn disconnect(&self, via: Via, index: u32) -> Result<(), AttachError> {
        match via {
            Via::Nbd => self.plumbing.disconnect(index),
            Via::Ublk => self.ublk.disconnect(index),
        }
    }

    fn device(&self, via: Via, index: u32) -> PathBuf {
        match via {
            Via::Nbd => self.plumbing.device(index),
            Via::Ublk => self.ublk.device(index),
        }
    }

    fn record(&self, volume: &str, via: Via, index: u32) -> Result<Attached, AttachError> {
        let device = self.device(via, index);
        let name = device::link(&self.names, volume, &device)?;
        let attached = Attached {
            volume: volume.to_owned(),
            via,
            device,
            index,
            name,
            since: unix_now(),
            users: Vec::new(),
        };
        self.lock().insert(volume.to_owned(), attached.clone());
        tracing::info!(
            volume,
            device = %attached.device.display(),
            name = %attached.name.display(),
            "attached"
        );
        Ok(attached)
    }

    /// Detaches `volume`: refused while it is mounted or held, unless
    /// `force`; flushed, disconnected, its name removed.
    pub fn detach(&self, volume: &str, force: bool) -> Result<Attached, AttachError> {
        let _one_at_a_time = self.exclusive();
        let attached = self
            .lock()
            .get(volume)
            .cloned()
            .ok_or_else(|| AttachError::NotAttached(volume.to_owned()))?;
        let shown = attached.device.display().to_string();
        // Exclusive: refused while anything has it mounted or held, and
        // nothing can claim it between the flush and the disconnect.
        let claim = match device::claim(&attached.device) {
            Ok(file) => Some(file),
            Err(_) if force => None,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                let users = self.users(&attached);
                let why = if users.is_empty() {
                    "open exclusively elsewhere".to_string()
                } else {
                    users.join(", ")
                };
                return Err(AttachError::InUse(shown, why));
            }
            Err(e) => return Err(AttachError::Io(format!("{shown}: {e}"))),
        };
        let flushed = match &claim {
            Some(file) => file.sync_all(),
            None => device::flush(&attached.device),
        };
        if let Err(e) = flushed {
            if !force {
                return Err(AttachError::Flush(shown, e.to_string()));
            }
            tracing::warn!(volume, "flushing {shown} before a forced detach: {e}");
        }
        self.disconnect(attached.via, attached.index)?;
        drop(claim);
        self.detached
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(volume.to_owned());
        device::unlink(&self.names, volume);
        self.lock().remove(volume);
        tracing::info!(volume, device = %attached.device.display(), "detached");
        Ok(attached)
    }

    /// Every attachment, with what uses it.
    pub fn list(&self) -> Vec<Attached> {
        let list: Vec<Attached> = self.lock().values().cloned().collect();
        list.into_iter()
            .map(|mut a| {
                a.users = self.users(&a);
                a
            })
            .collect()
    }

    /// Removes each symlink in the names directory whose device does not
    /// carry the identifier of the served volume of that name (a daemon
    /// killed between disconnect and unlink, or a device released while
    /// none ran): the kernel may give that index to another volume.
    fn prune_names(&self) {
        let Ok(entries) = std::fs::read_dir(&self.names) else {
            return;
        };
        for entry in entries.flatten() {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let is_link = entry.file_type().is_ok_and(|t| t.is_symlink());
            if !is_link || name.starts_with('.') {
                continue;
            }
            let current = self.exports.find(&name).map(|e| e.volume.uuid);
            let backend = std::fs::read_link(entry.path())
                .ok()
                .and_then(|target| index_of(&target))
                .and_then(|(via, index)| match via {
                    Via::Nbd => self.plumbing.backend_of(index),
                    Via::Ublk => self.ublk.backend_of(index),
                });
            let ours = match (current, backend) {
                (Some(uuid), Some(b)) => b == kernel_nbd::backend_identifier(&name, &uuid),
                _ => false,
            };
            if !ours {
                device::unlink(&self.names, &name);
                tracing::info!(volume = name, "removed a stale /dev/hostcrypt name");
            }
        }
    }

    fn users(&self, attached: &Attached) -> Vec<String> {
        let sys = match attached.via {
            Via::Nbd => self.plumbing.sys_dir(attached.index),
            Via::Ublk => self.ublk.sys_dir(attached.index),
        };
        device::users(&attached.device, &sys)
    }

    /// Removes the devices left attached for an earlier volume named
    /// `volume` (another UUID: a temp volume before a restart) whose
    /// server is gone. A ublk device counts once the kernel has quiesced
    /// it, which may take a while after its server died: `resume_all`
    /// looks again on every tick, and `before_stop` once more.
    fn remove_orphans(&self, volume: &str, uuid: &uuid::Uuid) {
        let orphans = [
            (Via::Nbd, self.plumbing.disconnect_orphans(volume, uuid)),
            (Via::Ublk, self.ublk.disconnect_orphans(volume, uuid)),
        ];
        for (via, index) in orphans
            .into_iter()
            .flat_map(|(via, list)| list.into_iter().map(move |i| (via, i)))
        {
            tracing::warn!(
                volume,
                "removed {}: attached for an earlier volume of this name \
                 (a temp volume before a restart); its data is gone",
                self.device(via, index).display()
            );
        }
    }

    /// Every served volume not attached here whose device an earlier
    /// daemon left attached is served again (NBD: fresh sockets; ublk:
    /// user recovery) and gets its name back. Run at
    /// start and then every few seconds: a volume that opens late (its
    /// key server was slow, a reload added it back) is resumed as soon as
    /// it serves, within the kernel's dead-connection timeout.
    pub fn resume_all(&self) {
        let _one_at_a_time = self.exclusive();
        for export in self.exports.iter() {
            let volume = export.name();
            let detached_here = self
                .detached
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(volume);
            let uuid = &export.volume.uuid;
            // Whether or not the volume is attached here: an orphan's
            // ublk device may only quiesce after this daemon attached the
            // volume anew (its dead server's io_uring is torn down late).
            self.remove_orphans(volume, uuid);
            if detached_here || self.lock().contains_key(volume) {
                continue;
            }
            for via in [Via::Ublk, Via::Nbd] {
                let resumed = match via {
                    Via::Nbd => self.plumbing.resume(volume, uuid),
                    Via::Ublk => self.ublk.resume(volume, uuid),
                };
                match resumed {
                    Ok(Some(index)) => {
                        match self.record(volume, via, index) {
                            Ok(_) => tracing::info!(volume, "{via} attachment resumed"),
                            Err(e) => tracing::warn!(volume, "{via} attachment resumed, but: {e}"),
                        }
                        break;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(volume, "a {via} attachment left by an earlier daemon: {e}")
                    }
                }
            }
        }
    }
}

/// The kind and index a `/dev/hostcrypt` link's target names
/// (`/dev/nbdN`, `/dev/ublkbN`).
fn index_of(device: &std::path::Path) -> Option<(Via, u32)> {
    let name = device.file_name()?.to_str()?;
    match name.strip_prefix("ublkb") {
        Some(n) => Some((Via::Ublk, n.parse().ok()?)),
        None => Some((Via::Nbd, name.strip_prefix("nbd")?.parse().ok()?)),
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// How long the daemon's stop waits for ublk requests being served.
const PARK_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

/// How often volumes that opened late are looked for among the devices
/// an earlier daemon left: a few seconds of the kernel's dead-connection
/// timeout at most.
const RESUME_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// The frontend: at start, takes over what an earlier daemon attached and
/// attaches what the config asks for ([`Attacher::start`]). What happens
/// at stop runs before the connections drain ([`Attacher::before_stop`],
/// called by the daemon); devices left attached keep their I/O waiting
/// for the next daemon, within the dead-connection timeout.
pub struct AttachFrontend(pub Arc<Attacher>);

impl Frontend for AttachFrontend {
    fn name(&self) -> &'static str {
        "attach"
    }

    fn start(self: Box<Self>, context: Context) -> Running {
        let attacher = self.0;
        let mut shutdown = context.shutdown;
        Running::new(
            "attach",
            tokio::spawn(async move {
                let first = attacher.clone();
                let _ = tokio::task::spawn_blocking(move || first.start()).await;
                let mut tick = tokio::time::interval(RESUME_EVERY);
                loop {
                    tokio::select! {
                        _ = shutdown.changed() => return,
                        _ = tick.tick() => {
                            let again = attacher.clone();
                            let _ = tokio::task::spawn_blocking(move || again.resume_all()).await;
                        }
                    }
                }
            }),
        )
    }
}
