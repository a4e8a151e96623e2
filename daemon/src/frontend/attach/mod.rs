//! Attachments: a volume as a kernel block device on this host, made by
//! the daemon itself (`hostcrypt attach`), so an operator mounts
//! `/dev/hostcrypt/VOLUME` as a dm-crypt user mounts `/dev/mapper/NAME`.
//! Today through the kernel's NBD client (`kernel_nbd.rs` over
//! `netlink.rs`); the device's name and users are `device.rs`.
//!
//! A restart of the daemon, kill -9 included, leaves the device in place:
//! its connections die with the old process, the kernel holds the I/O
//! for the dead-connection timeout, and the new daemon finds the device
//! by its backend identifier at start ([`Attacher::resume_all`]) and gives
//! it fresh sockets. A mounted filesystem pauses, then carries on.
//!
//! Here: the attachments of this daemon, the verbs (attach, detach, list)
//! and the frontend contract. The control socket calls the verbs
//! (`control/server.rs`); nothing here reads the config.

mod device;
mod kernel_nbd;
mod netlink;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};

pub use kernel_nbd::Plumbing;

use crate::export::Exports;
use crate::frontend::{Context, Frontend, Running};

/// How a volume reaches the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Via {
    /// The kernel's NBD client (module `nbd`).
    Nbd,
    /// ublk (module `ublk_drv`): not built yet.
    Ublk,
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
    /// The kernel's device (`/dev/nbd0`).
    pub device: PathBuf,
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
    #[error("ublk is not built yet; use --via nbd")]
    UblkUnavailable,
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
    /// Where the stable names go (`/dev/hostcrypt`).
    names: PathBuf,
    attached: Mutex<BTreeMap<String, Attached>>,
    /// Volumes whose config says `attach`: attached at start, detached
    /// at stop when nothing uses them.
    configured: Mutex<Vec<(String, Via)>>,
}

impl Attacher {
    pub fn new(exports: Exports, plumbing: Plumbing, names: PathBuf) -> Arc<Self> {
        Arc::new(Attacher {
            exports,
            plumbing,
            names,
            attached: Mutex::new(BTreeMap::new()),
            configured: Mutex::new(Vec::new()),
        })
    }

    /// The volumes the config attaches (`attach = ...`).
    pub fn set_configured(&self, volumes: Vec<(String, Via)>) {
        *self
            .configured
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = volumes;
    }

    fn configured(&self) -> Vec<(String, Via)> {
        self.configured
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// At start: resumes what an earlier daemon left attached, then
    /// attaches what the config asks for and is not attached yet.
    pub fn start(&self) {
        self.resume_all();
        for (volume, via) in self.configured() {
            if self.lock().contains_key(&volume) {
                continue;
            }
            if let Err(e) = self.attach(&volume, Some(via)) {
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
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Attached>> {
        self.attached.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Attaches `volume` (blocking: handshakes and netlink) and names it.
    pub fn attach(&self, volume: &str, via: Option<Via>) -> Result<Attached, AttachError> {
        let via = via.unwrap_or(Via::Nbd);
        if via == Via::Ublk {
            return Err(AttachError::UblkUnavailable);
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
        let index = self.plumbing.attach(volume, &export.volume.uuid)?;
        self.record(volume, index)
    }

    fn record(&self, volume: &str, index: u32) -> Result<Attached, AttachError> {
        let device = self.plumbing.device(index);
        let name = device::link(&self.names, volume, &device)?;
        let attached = Attached {
            volume: volume.to_owned(),
            via: Via::Nbd,
            device,
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
        let attached = self
            .lock()
            .get(volume)
            .cloned()
            .ok_or_else(|| AttachError::NotAttached(volume.to_owned()))?;
        let users = self.users(&attached);
        if !users.is_empty() && !force {
            return Err(AttachError::InUse(
                attached.device.display().to_string(),
                users.join(", "),
            ));
        }
        if let Err(e) = device::flush(&attached.device) {
            tracing::warn!(
                volume,
                "flushing {} before detach: {e}",
                attached.device.display()
            );
        }
        let index = index_of(&attached.device)
            .ok_or_else(|| AttachError::Io(format!("{}: no index", attached.device.display())))?;
        self.plumbing.disconnect(index)?;
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

    fn users(&self, attached: &Attached) -> Vec<String> {
        let sys = attached
            .device
            .file_name()
            .map(|n| self.plumbing.sys_block.join(n))
            .unwrap_or_default();
        device::users(&attached.device, &sys)
    }

    /// At start: every served volume whose device an earlier daemon left
    /// attached gets fresh sockets and its name back.
    pub fn resume_all(&self) {
        for export in self.exports.iter() {
            let volume = export.name();
            for index in self
                .plumbing
                .disconnect_orphans(volume, &export.volume.uuid)
            {
                tracing::warn!(
                    volume,
                    "disconnected /dev/nbd{index}: attached for an earlier volume of this name \
                     (a temp volume before a restart); its data is gone"
                );
            }
            match self.plumbing.resume(volume, &export.volume.uuid) {
                Ok(Some(index)) => match self.record(volume, index) {
                    Ok(_) => tracing::info!(volume, "attachment resumed with fresh sockets"),
                    Err(e) => tracing::warn!(volume, "attachment resumed, but: {e}"),
                },
                Ok(None) => {}
                Err(e) => tracing::warn!(volume, "an attachment left by an earlier daemon: {e}"),
            }
        }
    }
}

fn index_of(device: &std::path::Path) -> Option<u32> {
    device
        .file_name()?
        .to_str()?
        .strip_prefix("nbd")?
        .parse()
        .ok()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

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

    fn start(self: Box<Self>, _context: Context) -> Running {
        let attacher = self.0;
        let task = tokio::task::spawn_blocking(move || attacher.start());
        Running::new(
            "attach",
            tokio::spawn(async move {
                let _ = task.await;
            }),
        )
    }
}
