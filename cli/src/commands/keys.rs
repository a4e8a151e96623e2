//! `hostcrypt check-key`, `rotate-kek` and `rekey`: key operations the
//! running daemon carries out.

use crate::control::ask;
use crate::Exit;
use hostcryptd::control::protocol::{CheckResult, KeyChange};
use hostcryptd::control::ControlRequest;
use std::path::Path;

pub fn check_key(config_path: &Path, volume: Option<String>, json: bool) -> anyhow::Result<()> {
    let checks: Vec<CheckResult> = ask(config_path, &ControlRequest::CheckKey { volume })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        for c in &checks {
            match &c.error {
                None => println!("{}: key ok ({})", c.volume, c.state),
                Some(e) => println!("{}: KEY CHECK FAILED ({}): {e}", c.volume, c.state),
            }
            for w in &c.warnings {
                println!("{}: warning: {w}", c.volume);
            }
        }
    }
    let failed: Vec<_> = checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| c.volume.as_str())
        .collect();
    if !failed.is_empty() {
        return Err(Exit::KeyLost(format!(
            "key check failed for {}; restore access to the KEK (token, policy, key state) and the daemon resumes at its next check",
            failed.join(", ")
        ))
        .into());
    }
    Ok(())
}

pub fn key_change(
    config_path: &Path,
    request: ControlRequest,
    verb: &str,
    json: bool,
) -> anyhow::Result<()> {
    let change: KeyChange = ask(config_path, &request)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&change)?);
        return Ok(());
    }
    println!(
        "{}: {verb}; {} DEK now wrapped by {} key {} version {}",
        change.volume, change.layer, change.kek.provider, change.kek.key_id, change.kek.key_version
    );
    Ok(())
}
