//! `hostcrypt audit tail`: the last lines of the audit log, optionally
//! following it, as text or raw JSON.

use anyhow::{bail, Context};
use hostcryptd::config::Config;
use std::path::Path;
use std::time::Duration;

/// Prints audit lines; follows the file (polling, and reopening it if
/// it is rotated) with `follow`.
pub fn audit_tail(
    config_path: &Path,
    lines: usize,
    follow: bool,
    json: bool,
) -> anyhow::Result<()> {
    use std::io::{BufRead, Seek};
    let config = Config::load(config_path)?;
    let Some(path) = &config.daemon.audit_log else {
        bail!(
            "{} sets no `audit_log` in [daemon]; add e.g. audit_log = \"/var/log/hostcrypt/audit.jsonl\"",
            config_path.display()
        );
    };
    let print = |line: &str| {
        if json {
            println!("{line}");
        } else {
            println!("{}", audit_line(line));
        }
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the audit log {}", path.display()))?;
    let all: Vec<&str> = text.lines().collect();
    for line in &all[all.len().saturating_sub(lines)..] {
        print(line);
    }
    if !follow {
        return Ok(());
    }
    let mut file = std::fs::File::open(path)?;
    let mut at = file.seek(std::io::SeekFrom::End(0))?;
    let mut reader = std::io::BufReader::new(file);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? > 0 && line.ends_with('\n') {
            at += line.len() as u64;
            print(line.trim_end());
            continue;
        }
        // Nothing new (or half a line): wait, and reopen after rotation.
        reader.seek(std::io::SeekFrom::Start(at))?;
        std::thread::sleep(Duration::from_millis(250));
        if std::fs::metadata(path).is_ok_and(|m| m.len() < at) {
            reader = std::io::BufReader::new(std::fs::File::open(path)?);
            at = 0;
        }
    }
}

/// One audit line for people: time, volume, operation, outcome, key, error.
pub fn audit_line(line: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
        return line.to_string();
    };
    let field = |k: &str| v[k].as_str().unwrap_or("").to_string();
    let mut out = format!(
        "{}  {:<12} {:<12} {:<6}",
        field("time"),
        field("volume"),
        field("operation"),
        field("outcome")
    );
    if !field("provider").is_empty() {
        out.push_str(&format!(
            " {} {} v{}",
            field("provider"),
            field("key_id"),
            field("key_version")
        ));
    }
    if let Some(uid) = v["uid"].as_u64() {
        out.push_str(&format!(" uid={uid}"));
    }
    for k in ["detail", "error"] {
        if !field(k).is_empty() {
            out.push_str(&format!("  {k}: {}", field(k)));
        }
    }
    out
}
