//! `hostcrypt create`: format the backing of a configured cache volume,
//! audited like every key operation.

use anyhow::{bail, Context};
use hostcryptd::config::{ByteSize, Config};
use hostcryptd::kek::audit::Event;
use hostcryptd::volume::{self, Geometry, Header, Role};
use std::path::Path;

pub fn create(
    config_path: &Path,
    name: &str,
    size: Option<ByteSize>,
    sector_size: Option<String>,
    force: bool,
) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let v = super::volume_config(&config, config_path, name)?;
    if v.role == Role::Temp {
        bail!("{name:?} is a temp volume: hostcryptd recreates it with a fresh key at every start; nothing to create");
    }
    let size = match (size, v.size_bytes()) {
        (Some(s), Some(c)) if s.0 != c => {
            bail!("--size {} disagrees with size = {} in the config", s.0, c)
        }
        (Some(s), _) => s.0,
        (None, Some(c)) => c,
        (None, None) => bail!("give --size (e.g. --size 8G) or set size in the config"),
    };
    let sector_size = match sector_size {
        Some(s) => s.parse().context("sector size")?,
        None => v.sector_size,
    };
    let kek_name = v
        .kek
        .as_ref()
        .map(|k| k.get_ref().clone())
        .unwrap_or_default();
    let Some(kek_config) = config.kek.get(&kek_name) else {
        bail!("volume {name:?} names KEK {kek_name:?}, which is not configured");
    };
    let kek = hostcryptd::service::open_provider(&kek_name, kek_config)?;
    let inner = match &v.kek_inner {
        Some(inner_name) => {
            let inner_name = inner_name.get_ref();
            let Some(inner_config) = config.kek.get(inner_name) else {
                bail!("volume {name:?} names inner KEK {inner_name:?}, which is not configured");
            };
            Some(hostcryptd::service::open_provider(
                inner_name,
                inner_config,
            )?)
        }
        None => None,
    };
    let backing = v.backing.get_ref();
    let inner_cipher = v
        .inner_cipher
        .as_ref()
        .map(|c| *c.get_ref())
        .unwrap_or_default();
    let created = volume::create(
        backing,
        Geometry { size, sector_size },
        kek.as_ref(),
        inner.as_deref().map(|p| (p, inner_cipher)),
        force,
        Some(&volume::Records::new(&config.daemon.state_dir).volume(name)),
    );
    audit_create(&config, name, &kek_name, &created);
    let header = created?;
    let inner_note = inner
        .as_ref()
        .map(|i| {
            format!(
                "; double-encrypted, inner layer {inner_cipher} with its DEK wrapped by {}",
                i.describe()
            )
        })
        .unwrap_or_default();
    println!(
        "created cache volume {name:?} on {}: {} bytes, {}-byte sectors, uuid {}, DEK wrapped by {}{inner_note}",
        backing.display(),
        header.size,
        header.sector_size,
        header.uuid,
        kek.describe()
    );
    Ok(())
}

/// Records the DEK's first wrap in the daemon's audit log, if configured.
pub fn audit_create(
    config: &Config,
    volume: &str,
    kek_name: &str,
    created: &Result<Header, volume::VolumeError>,
) {
    let audit = match hostcryptd::service::open_audit(config) {
        Ok(audit) => audit,
        Err(e) => {
            eprintln!(
                "hostcrypt: warning: {}",
                hostcryptd::report::error_chain(&e)
            );
            return;
        }
    };
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let slot = created
        .as_ref()
        .ok()
        .and_then(|h| h.active_keyslot().map(|s| s.wrapped.kek.clone()));
    let mut event = Event::new(volume, "wrap", if created.is_ok() { "ok" } else { "error" })
        .detail(format!("create with kek {kek_name}"))
        .uid(Some(uid));
    if let Some(kek) = &slot {
        event = event.key(kek);
    }
    if let Err(e) = created {
        event = event.error(e);
    }
    audit.record(&event);
}
