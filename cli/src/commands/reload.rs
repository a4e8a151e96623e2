//! `hostcrypt reload`: re-read the config in the running daemon.

use crate::control::control;
use hostcryptd::control::Request;
use std::path::Path;

pub fn reload(config_path: &Path, json: bool) -> anyhow::Result<()> {
    let result = control(config_path, &Request::Reload)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&result)?);
        return Ok(());
    }
    let report: hostcryptd::service::reload::ReloadReport = serde_json::from_value(result)?;
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
