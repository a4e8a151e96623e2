//! `hostcrypt status` and `hostcrypt volumes`: what the running daemon
//! serves, its listeners, connections, and each volume's key state.

use super::reencrypt::reencrypt_line;
use crate::control::ask;
use hostcryptd::control::protocol::Status;
use hostcryptd::control::ControlRequest;
use std::path::Path;
use std::time::Duration;

pub fn status(config_path: &Path, json: bool) -> anyhow::Result<()> {
    let status: Status = ask(config_path, &ControlRequest::Status)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    println!(
        "hostcryptd {}, up {}, engine {}",
        status.version,
        humantime::format_duration(Duration::from_secs(status.uptime_secs)),
        status.engine
    );
    for l in &status.listeners {
        let tls = if l.address.starts_with("unix:") {
            "peers identified by SO_PEERCRED".to_string()
        } else {
            format!("tls {}", l.tls)
        };
        println!("  listening on {}  ({tls})", l.address);
    }
    if let Some(tls) = &status.tls {
        println!(
            "  TLS certificate {:?} until {}, from {}; client certificates {}{}",
            tls.server_subject,
            tls.server_not_after,
            tls.dir.display(),
            if tls.verify_peer {
                "required"
            } else {
                "optional"
            },
            tls.crl_revoked
                .map(|n| format!(", CRL revokes {n}"))
                .unwrap_or_default()
        );
    }
    let c = &status.connections;
    println!(
        "  connections: {} open (max {}, {} per peer); refused: {} over a limit, {} without TLS, {} failed TLS, {} bad handshakes",
        c.open,
        c.max,
        c.max_per_peer,
        c.refused_limit,
        c.refused_tls_required,
        c.tls_failures,
        c.handshake_failures
    );
    for a in &status.attached {
        let users = if a.users.is_empty() {
            String::new()
        } else {
            format!(" ({})", a.users.join(", "))
        };
        println!(
            "  attached {} as {} → {} via {}{users}",
            a.volume,
            a.name.display(),
            a.device.display(),
            a.via
        );
    }
    for v in &status.volumes {
        if let Some(u) = &v.unavailable {
            println!("  {:<16} {:<17} {}", v.name, u.state, u.error);
            continue;
        }
        let key = match &v.key {
            Some(k) => format!(
                "{:<17} kek {} ({} {} v{}){}{}",
                k.state,
                k.kek_name,
                k.kek.provider,
                k.kek.key_id,
                k.kek.key_version,
                k.inner
                    .as_ref()
                    .map(|i| format!(" + inner kek {} v{}", i.kek_name, i.kek.key_version))
                    .unwrap_or_default(),
                k.last_error
                    .as_ref()
                    .map(|e| format!("  last error: {e}"))
                    .unwrap_or_default()
            ),
            None => "serving           ephemeral key".to_string(),
        };
        println!("  {:<16} {:<6} {:>14} bytes  {key}", v.name, v.role, v.size);
        for w in v.key.iter().flat_map(|k| &k.warnings) {
            println!("  {:<16} warning: {w}", "");
        }
        if let Some(r) = &v.reencrypt {
            println!("  {:<16} re-encrypting: {}", "", reencrypt_line(r));
        }
        if let Some(b) = &v.backing {
            println!(
                "  {:<16} remote backing {}: {}/{} connection(s), {} in flight, {} reconnect(s), {} re-sent, {} timed out, {} error(s){}",
                "",
                b.state,
                b.connections_up,
                b.connections,
                b.in_flight,
                b.reconnects,
                b.resent,
                b.timeouts,
                b.errors,
                b.last_error
                    .as_ref()
                    .map(|e| format!("; last: {e}"))
                    .unwrap_or_default()
            );
        }
        let allow = match &v.allow {
            Some(list) => format!("allow {}", list.join(", ")),
            None => "allow anyone who can connect".into(),
        };
        println!("  {:<16} {allow}; {} refused", "", v.refused);
        println!(
            "  {:<16} {} connection(s), {} in flight; read {} ops {} bytes, write {} ops {} bytes, {} errors",
            "",
            v.io.connections,
            v.io.in_flight,
            v.io.read_ops,
            v.io.read_bytes,
            v.io.write_ops,
            v.io.write_bytes,
            v.io.errors
        );
        for c in &v.clients {
            let queues = c
                .queues
                .map(|q| format!(", {q} queues"))
                .unwrap_or_default();
            println!(
                "  {:<16} client {} {}{queues}, connected {}",
                "",
                c.frontend,
                c.peer,
                since(c.since)
            );
        }
    }
    Ok(())
}

/// How long ago `epoch_secs` was, as `N s ago`.
fn since(epoch_secs: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{} s ago", now.saturating_sub(epoch_secs))
}

pub fn volumes(config_path: &Path, json: bool) -> anyhow::Result<()> {
    let status: Status = ask(config_path, &ControlRequest::Status)?;
    if json {
        let list: Vec<_> = status
            .volumes
            .iter()
            .map(|v| {
                serde_json::json!({
                    "name": v.name,
                    "role": v.role,
                    "size": v.size,
                    "sector_size": v.sector_size,
                    "state": v.key.as_ref().map_or("serving", |k| k.state.as_str()),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    for v in &status.volumes {
        println!(
            "{}\t{}\t{}\t{}",
            v.name,
            v.role,
            v.size,
            v.key.as_ref().map_or("serving", |k| k.state.as_str())
        );
    }
    Ok(())
}
