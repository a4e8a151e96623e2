//! `hostcrypt reencrypt`: start, pause, resume or follow an online
//! re-encryption (a progress bar on a terminal, plain lines otherwise).

use crate::control::ask;
use anyhow::bail;
use hostcryptd::control::ControlRequest;
use hostcryptd::volume::{ReencryptAction, ReencryptState, ReencryptStatus};
use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

pub fn reencrypt(
    config_path: &Path,
    volume: String,
    action: ReencryptAction,
    rate_mbps: Option<f64>,
    follow: bool,
    json: bool,
) -> anyhow::Result<()> {
    // JSON has no NaN or infinity (they would arrive as "no rate"); the
    // daemon checks the range of finite ones.
    if let Some(rate) = rate_mbps.filter(|r| !r.is_finite()) {
        anyhow::bail!("--rate {rate}: give 0 (unlimited) or a rate in MB/s");
    }
    let request = |action| ControlRequest::Reencrypt {
        volume: volume.clone(),
        action,
        rate_mbps,
    };
    let mut status: ReencryptStatus = ask(config_path, &request(action))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    if !follow {
        println!("{}", reencrypt_line(&status));
        return Ok(());
    }
    let terminal = std::io::stderr().is_terminal();
    let bar = terminal.then(|| {
        let bar = indicatif::ProgressBar::new(status.size);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(format!("re-encrypting {volume}"));
        bar
    });
    let mut last_line = Instant::now();
    loop {
        match &bar {
            Some(bar) => bar.set_position(status.checkpoint),
            None if last_line.elapsed() >= Duration::from_secs(2) => {
                println!("{}", reencrypt_line(&status));
                last_line = Instant::now();
            }
            None => {}
        }
        match status.state {
            ReencryptState::Done | ReencryptState::Idle => break,
            ReencryptState::Failed => {
                if let Some(bar) = &bar {
                    bar.abandon();
                }
                bail!(
                    "re-encryption of {volume} stopped: {}; fix the cause, then `hostcrypt reencrypt {volume} --resume`",
                    status.error.unwrap_or_default()
                );
            }
            ReencryptState::Paused => {
                if let Some(bar) = &bar {
                    bar.abandon_with_message(format!("{volume} paused"));
                }
                println!("{}", reencrypt_line(&status));
                return Ok(());
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(250));
        status = ask(config_path, &request(ReencryptAction::Status))?;
    }
    if let Some(bar) = &bar {
        bar.finish_with_message(format!("{volume} re-encrypted"));
    }
    println!("{}", reencrypt_line(&status));
    Ok(())
}

pub fn reencrypt_line(s: &ReencryptStatus) -> String {
    let percent = if s.size > 0 {
        s.checkpoint as f64 * 100.0 / s.size as f64
    } else {
        100.0
    };
    let mut line = format!(
        "{}: {} {:.1}% ({} of {} bytes), DEK generation {}",
        s.volume, s.state, percent, s.checkpoint, s.size, s.generation
    );
    if let Some(t) = s.target_generation {
        line.push_str(&format!(" -> {t}"));
    }
    if s.rate_mbps > 0.0 {
        line.push_str(&format!(", {:.1} MB/s", s.rate_mbps));
    }
    if let Some(limit) = s.rate_limit_mbps {
        line.push_str(&format!(" (limit {limit} MB/s)"));
    }
    if let Some(e) = &s.error {
        line.push_str(&format!(", error: {e}"));
    }
    line
}
