//! `hostcrypt reload`: re-read the config in the running daemon.

use crate::control::ask;
use hostcryptd::control::ControlRequest;
use std::path::Path;

pub fn reload(config_path: &Path, json: bool) -> anyhow::Result<()> {
    let report: hostcryptd::service::reload::ReloadReport =
        ask(config_path, &ControlRequest::Reload)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let list = |names: &[String]| {
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    };
    println!("added:     {}", list(&report.added));
    println!("removed:   {}", list(&report.removed));
    println!("unchanged: {}", list(&report.unchanged));
    for note in &report.not_applied {
        println!("not applied: {note}");
    }
    Ok(())
}
