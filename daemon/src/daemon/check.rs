//! `hostcryptd --check`: the config (already parsed and validated by
//! `Config::load`), the TLS credentials, and, unless offline, that every
//! configured KEK wraps and unwraps a fresh key. Prints one line per
//! finding, as operators read it.

use std::io::Write;
use std::path::Path;

use crate::config::Config;
use crate::service;

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Service(#[from] service::ServiceError),
    #[error("KEK(s) {0} cannot wrap and unwrap a key (see above); --check --offline validates the config alone")]
    Keks(String),
    #[error("writing the report: {0}")]
    Output(#[from] std::io::Error),
}

/// Checks `config` (loaded from `path`) and writes the report to `out`.
pub fn check(
    config: &Config,
    path: &Path,
    offline: bool,
    out: &mut dyn Write,
) -> Result<(), CheckError> {
    if let Some(migrated) = config.migrated_server() {
        writeln!(
            out,
            "warning: [server] is deprecated; replace it with these sections (same settings):\n\n{migrated}"
        )?;
    }
    if let Some(tls) = super::load_tls(config)? {
        let info = &tls.info;
        writeln!(
            out,
            "TLS ({}): server certificate {:?} valid until {}{}{}",
            config.nbd.tls,
            info.server_subject,
            info.server_not_after,
            match &info.ca_subject {
                Some(ca) => format!(", signed by CA {ca:?}"),
                None => String::new(),
            },
            match info.crl_revoked {
                Some(n) => format!(", CRL revokes {n}"),
                None => String::new(),
            }
        )?;
    }
    if !offline {
        let providers = service::open_providers(config)?;
        let mut failed = Vec::new();
        for (name, provider) in &providers {
            match service::prove_provider(provider.as_ref()) {
                Ok(kek) => writeln!(out, "KEK {name}: OK, wraps and unwraps ({kek})")?,
                Err(e) => {
                    writeln!(out, "KEK {name}: FAILED: {e}")?;
                    failed.push(name.clone());
                }
            }
        }
        if !failed.is_empty() {
            return Err(CheckError::Keks(failed.join(", ")));
        }
    }
    for v in &config.volumes {
        match v.vhost_user_socket() {
            Some(Ok(spec)) => writeln!(
                out,
                "vhost-user {}: {}, {} queue(s), mode {:04o}{}{}",
                spec.volume,
                spec.path.display(),
                spec.queues,
                spec.mode,
                spec.group.map(|g| format!(", gid {g}")).unwrap_or_default(),
                if spec.read_only { ", read-only" } else { "" },
            )?,
            Some(Err(e)) => writeln!(out, "vhost-user {}: {e}", v.name.get_ref())?,
            None => {}
        }
    }
    writeln!(
        out,
        "{}: OK ({} volume(s))",
        path.display(),
        config.volumes.len()
    )?;
    Ok(())
}
