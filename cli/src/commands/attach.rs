//! `hostcrypt attach`, `detach` and `attached`: a volume as a kernel block
//! device on this host (`/dev/hostcrypt/VOLUME`), made by the daemon.

use std::path::Path;

use crate::control::ask;
use hostcryptd::control::ControlRequest;
use hostcryptd::frontend::attach::{Attached, Via};

pub fn attach(
    config_path: &Path,
    volume: String,
    via: Option<Via>,
    json: bool,
) -> anyhow::Result<()> {
    let attached: Vec<Attached> = ask(config_path, &ControlRequest::Attach { volume, via })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&attached)?);
        return Ok(());
    }
    for a in attached {
        // The device alone, so a script can take it: `dev=$(hostcrypt attach v)`.
        println!("{}", a.name.display());
        eprintln!(
            "{} attached as {} via {}",
            a.volume,
            a.device.display(),
            a.via
        );
    }
    Ok(())
}

pub fn detach(config_path: &Path, volume: String, force: bool) -> anyhow::Result<()> {
    let detached: Vec<Attached> = ask(config_path, &ControlRequest::Detach { volume, force })?;
    for a in detached {
        println!("{} detached ({} removed)", a.volume, a.device.display());
    }
    Ok(())
}

pub fn attached(config_path: &Path, json: bool) -> anyhow::Result<()> {
    let list: Vec<Attached> = ask(config_path, &ControlRequest::Attached)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    if list.is_empty() {
        println!("no volume is attached");
        return Ok(());
    }
    println!(
        "{:<16} {:<5} {:<12} {:<24} USED BY",
        "VOLUME", "VIA", "DEVICE", "NAME"
    );
    for a in list {
        let users = if a.users.is_empty() {
            "-".to_string()
        } else {
            a.users.join(", ")
        };
        println!(
            "{:<16} {:<5} {:<12} {:<24} {}",
            a.volume,
            a.via,
            a.device.display(),
            a.name.display(),
            users
        );
    }
    Ok(())
}
