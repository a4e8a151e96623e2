//! `hostcrypt header backup VOLUME FILE`, `hostcrypt header restore BACKING
//! FILE` and `hostcrypt erase VOLUME --yes`: cryptsetup's
//! luksHeaderBackup / luksHeaderRestore / erase for hostcrypt volumes. The
//! file formats and checks on the bytes are the library's
//! (`volume/backup.rs`); here: which volume, which KEK must unwrap a
//! restored key, refusing volumes the daemon is serving, the audit line.

use std::path::Path;

use anyhow::{bail, Context};
use hostcryptd::config::Config;
use hostcryptd::control::protocol::Status;
use hostcryptd::control::ControlRequest;
use hostcryptd::crypto::Dek;
use hostcryptd::kek::audit::Event;
use hostcryptd::volume::backup;
use hostcryptd::volume::{GenerationKeys, Header, HeaderKeys, Layer, Records};

/// Whether the running daemon (if any) serves `volume` now.
fn served(config_path: &Path, volume: &str) -> anyhow::Result<bool> {
    let config = Config::load(config_path)?;
    if config.daemon.control.is_none() {
        return Ok(false);
    }
    let status: Status = match crate::control::ask(config_path, &ControlRequest::Status) {
        Ok(result) => result,
        // No daemon running: nothing serves it.
        Err(e) if matches!(e.downcast_ref(), Some(crate::Exit::Unreachable(_))) => {
            return Ok(false)
        }
        Err(e) => return Err(e),
    };
    Ok(status
        .volumes
        .iter()
        .any(|v| v.name == volume && v.unavailable.is_none()))
}

fn refuse_if_served(config_path: &Path, volume: &str, what: &str) -> anyhow::Result<()> {
    if served(config_path, volume)? {
        bail!("hostcryptd is serving {volume:?}; {what} only a volume it does not serve: remove the volume from the config and run `hostcrypt reload` (or stop hostcryptd) first");
    }
    Ok(())
}

fn audit(config: &Config, volume: &str, operation: &str, outcome: &str, detail: String) {
    match hostcryptd::service::open_audit(config) {
        Ok(log) => {
            // SAFETY: getuid has no preconditions and cannot fail.
            let uid = unsafe { libc::getuid() };
            log.record(
                &Event::new(volume, operation, outcome)
                    .detail(detail)
                    .uid(Some(uid)),
            );
        }
        Err(e) => eprintln!(
            "hostcrypt: warning: {}",
            hostcryptd::report::error_chain(&e)
        ),
    }
}

pub fn backup(config_path: &Path, volume: &str, file: &Path) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let v = super::volume_config(&config, config_path, volume)?;
    let header = backup::backup(v.backing.get_ref(), file)?;
    audit(
        &config,
        volume,
        "header-backup",
        "ok",
        format!("to {}", file.display()),
    );
    println!(
        "header of {volume:?} (volume {}, DEK generation {}) saved to {} (mode 0600). It holds only wrapped keys: restoring it needs the KEK that wrapped them.",
        header.uuid,
        header.dek_generation,
        file.display()
    );
    Ok(())
}

/// Every configured KEK needed by the header's active keys must unwrap
/// them: a restored header nobody can open is no restore. Returns what was
/// proven, and the keys the restored header is sealed with.
fn check_unwraps(config: &Config, header: &Header) -> anyhow::Result<(Vec<String>, HeaderKeys)> {
    let providers = hostcryptd::service::open_providers(config)?;
    let mut proven = Vec::new();
    let mut deks: Vec<(Layer, Dek)> = Vec::new();
    for layer in [Layer::Outer, Layer::Inner] {
        let Some(slot) = header.active_slot(layer) else {
            continue;
        };
        let Some((name, provider)) = providers.iter().find(|(_, p)| p.owns(&slot.wrapped.kek))
        else {
            bail!(
                "no configured KEK holds {} (the backup's {layer} key); add its [kek.NAME] table to the config",
                slot.wrapped.kek
            );
        };
        let dek = provider.unwrap(&slot.wrapped).with_context(|| {
            format!("KEK {name:?} cannot unwrap the backup's {layer} key; nothing was written")
        })?;
        deks.push((layer, dek));
        proven.push(format!("{layer} key unwrapped by KEK {name}"));
    }
    let find = |layer| deks.iter().find(|(l, _)| *l == layer).map(|(_, d)| d);
    let Some(outer) = find(Layer::Outer) else {
        bail!(
            "the backup holds no outer key for its DEK generation {}",
            header.dek_generation
        );
    };
    let keys = HeaderKeys {
        current: GenerationKeys::derive(
            header.uuid,
            header.dek_generation,
            outer,
            find(Layer::Inner),
        ),
        target: None,
    };
    Ok((proven, keys))
}

pub fn restore(config_path: &Path, backing: &Path, file: &Path, force: bool) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let header = backup::read_backup(file)?;
    let volume = config
        .volumes
        .iter()
        .find(|v| v.backing.get_ref() == backing)
        .map(|v| v.name.get_ref().clone());
    if let Some(name) = &volume {
        refuse_if_served(config_path, name, "a header restore may touch")?;
    }
    let (proven, keys) = check_unwraps(&config, &header)?;
    let label = volume
        .clone()
        .unwrap_or_else(|| backing.display().to_string());
    let records = Records::new(&config.daemon.state_dir);
    let record = volume.as_deref().map(|name| records.volume(name));
    match backup::restore(backing, &header, &keys, record.as_ref(), force) {
        Ok(()) => {
            audit(
                &config,
                &label,
                "header-restore",
                "ok",
                format!("from {}; {}", file.display(), proven.join(", ")),
            );
            println!(
                "restored the header of volume {} to {} from {} ({}){}",
                header.uuid,
                backing.display(),
                file.display(),
                proven.join(", "),
                if volume.is_some() {
                    "; a running hostcryptd opens it at its next try"
                } else {
                    ""
                }
            );
            Ok(())
        }
        Err(e) => {
            audit(&config, &label, "header-restore", "error", e.to_string());
            Err(e.into())
        }
    }
}

pub fn erase(config_path: &Path, volume: &str, yes: bool, take_over: bool) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let v = super::volume_config(&config, config_path, volume)?;
    if !yes {
        bail!("erase destroys both header copies of {volume:?}: its data becomes unreadable for good unless you hold a header backup (hostcrypt header backup). Pass --yes to do it");
    }
    refuse_if_served(config_path, volume, "erase destroys")?;
    let backing = v.backing.get_ref();
    if take_over {
        eprintln!("warning: --take-over: erasing {} even if its owner record names a daemon that has not released it; that daemon must be stopped or cut off from the storage", backing.display());
    }
    match backup::erase(backing, take_over) {
        Ok(uuid) => {
            audit(
                &config,
                volume,
                "erase",
                "ok",
                format!("volume {uuid}: both header copies and the journal overwritten"),
            );
            println!(
                "erased {volume:?} (volume {uuid}): both header copies and the journal of {} are overwritten and synced. The data area is still there, but unreadable without a header backup and its KEK.",
                backing.display()
            );
            Ok(())
        }
        Err(e) => {
            audit(&config, volume, "erase", "error", e.to_string());
            Err(e.into())
        }
    }
}
