//! The daemon's TOML configuration: its shape (serde, unknown keys refused)
//! and the checks serde cannot express, each reported with the key and the
//! line it is on. One file per section: `[daemon]` (`daemon.rs`), `[nbd]`
//! (`nbd.rs`), `[[volume]]` and `[kek.NAME]` (`volume.rs`). A `[server]`
//! section, the form before `[daemon]` and `[nbd]` existed, is split into
//! them here (`migrate_server`), with a warning. The reference pages
//! (hostcryptd.toml(5), docs/config.md) are rendered from the section
//! types' doc comments in `reference.rs`, through their JSON schema
//! (`schema.rs` for what serde's types do not say).

mod daemon;
mod nbd;
pub mod reference;
mod schema;
mod size;
mod volume;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use daemon::{DaemonConfig, KEYS as DAEMON_KEYS};
pub use nbd::NbdConfig;
pub use size::ByteSize;
pub use volume::{KekConfig, VolumeConfig};

use crate::volume::Role;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}, line {line}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
}

#[derive(Debug, Clone)]
pub struct Config {
    pub daemon: DaemonConfig,
    pub nbd: NbdConfig,
    pub kek: BTreeMap<String, KekConfig>,
    pub volumes: Vec<VolumeConfig>,
    /// A `[server]` section this config still has (the form before
    /// `[daemon]` and `[nbd]`): accepted, with a warning, and shown
    /// migrated by `hostcryptd --check`.
    pub legacy_server: Option<toml::Table>,
}

/// The file as written: `[server]` is the deprecated form of `[daemon]`
/// plus `[nbd]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    server: Option<toml::Table>,
    daemon: Option<DaemonConfig>,
    nbd: Option<NbdConfig>,
    #[serde(default)]
    kek: BTreeMap<String, KekConfig>,
    #[serde(default, rename = "volume")]
    volumes: Vec<VolumeConfig>,
}

/// `"90s"`, `"1m"`, `"500ms"` (humantime) or a number of seconds; at least 1 s.
pub(crate) fn duration<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<std::time::Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Seconds(u64),
        Text(String),
    }
    let value = match Raw::deserialize(d)? {
        Raw::Seconds(s) => std::time::Duration::from_secs(s),
        Raw::Text(t) => humantime::parse_duration(&t).map_err(serde::de::Error::custom)?,
    };
    if value < std::time::Duration::from_secs(1) {
        return Err(serde::de::Error::custom("must be at least 1s"));
    }
    Ok(value)
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates; `path` only labels errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let parse_error = |message: String| ConfigError::Parse {
            path: path.to_owned(),
            message: message.trim_end().to_string(),
        };
        let raw: Raw = toml::from_str(text).map_err(|e| parse_error(e.to_string()))?;
        let (daemon, nbd) = match (raw.server.clone(), raw.daemon, raw.nbd) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                return Err(parse_error(
                    "[server] is the old form of [daemon] and [nbd]: use one or the other, not both (`hostcryptd --check` prints the migrated form)".into(),
                ))
            }
            (Some(server), None, None) => {
                migrate_server(server).map_err(|e| parse_error(format!("[server]: {e}")))?
            }
            (None, daemon, nbd) => (daemon.unwrap_or_default(), nbd.unwrap_or_default()),
        };
        let config = Config {
            daemon,
            nbd,
            kek: raw.kek,
            volumes: raw.volumes,
            legacy_server: raw.server,
        };
        config.validate(text, path)?;
        // Every later open of a remote backing (daemon or CLI) finds its
        // options by URI.
        for v in config.volumes.iter().filter(|v| v.is_remote()) {
            crate::io::remote::configure(
                &v.backing.get_ref().to_string_lossy(),
                v.remote_options(),
            );
        }
        Ok(config)
    }

    pub fn volume(&self, name: &str) -> Option<&VolumeConfig> {
        self.volumes.iter().find(|v| v.name.get_ref() == name)
    }

    fn validate(&self, text: &str, path: &Path) -> Result<(), ConfigError> {
        let invalid =
            |span: std::ops::Range<usize>, key: &str, message: String| ConfigError::Invalid {
                path: path.to_owned(),
                line: line_of(text, span.start),
                key: key.to_string(),
                message,
            };
        if let Some((key, message)) = self.nbd.problem() {
            return Err(invalid(0..0, key, message));
        }
        if !self.daemon.state_dir.is_absolute() {
            return Err(invalid(
                0..0,
                "state_dir",
                format!(
                    "{} is not an absolute path; the anti-rollback records need a fixed place (default /var/lib/hostcrypt/state)",
                    self.daemon.state_dir.display()
                ),
            ));
        }
        if self.volumes.is_empty() {
            return Err(invalid(
                0..0,
                "volume",
                "no [[volume]] is configured".into(),
            ));
        }
        let mut names = HashSet::new();
        let mut backings = HashSet::new();
        let mut vhost_sockets = HashSet::new();
        for v in &self.volumes {
            let name = v.name.get_ref();
            if name.is_empty() || name.len() > 256 || name.contains('\0') {
                return Err(invalid(
                    v.name.span(),
                    "name",
                    "export names are 1 to 256 bytes".into(),
                ));
            }
            if !names.insert(name.clone()) {
                return Err(invalid(
                    v.name.span(),
                    "name",
                    format!("volume {name:?} is defined twice"),
                ));
            }
            if !backings.insert(v.backing.get_ref().clone()) {
                return Err(invalid(
                    v.backing.span(),
                    "backing",
                    format!(
                        "{} is the backing of another volume",
                        v.backing.get_ref().display()
                    ),
                ));
            }
            if v.is_remote() {
                let uri = v.backing.get_ref().to_string_lossy();
                match crate::io::remote::client::NbdUri::parse(&uri) {
                    Err(e) => return Err(invalid(v.backing.span(), "backing", e.to_string())),
                    Ok(u)
                        if u.tls
                            && u.tls_certificates.is_none()
                            && v.backing_tls_certificates.is_none() =>
                    {
                        return Err(invalid(
                            v.backing.span(),
                            "backing",
                            "an nbds:// backing needs backing_tls_certificates = \"DIR\"".into(),
                        ))
                    }
                    Ok(_) => {}
                }
                if v.direct {
                    return Err(invalid(
                        v.backing.span(),
                        "direct",
                        "direct = true applies to local backings, not to a remote export".into(),
                    ));
                }
                if let Some(c) = &v.backing_connections {
                    if !(1..=64).contains(c.get_ref()) {
                        return Err(invalid(
                            c.span(),
                            "backing_connections",
                            "backing_connections is 1 to 64".into(),
                        ));
                    }
                }
            } else {
                let remote_only = [
                    (
                        "backing_connections",
                        v.backing_connections.as_ref().map(|c| c.span()),
                    ),
                    (
                        "backing_tls_certificates",
                        v.backing_tls_certificates.as_ref().map(|c| c.span()),
                    ),
                    ("take_over", v.take_over.as_ref().map(|t| t.span())),
                ];
                for (key, span) in remote_only {
                    if let Some(span) = span {
                        return Err(invalid(
                            span,
                            key,
                            format!(
                                "{key} applies only to a remote backing (backing = \"nbd://…\")"
                            ),
                        ));
                    }
                }
            }
            if let (Some(Err(e)), Some(key)) = (v.attach_via(), &v.attach) {
                return Err(invalid(key.span(), "attach", e));
            }
            match &v.vhost_user {
                Some(socket) => {
                    let path = socket.get_ref();
                    let taken = [&self.nbd.unix, &self.daemon.control]
                        .into_iter()
                        .flatten()
                        .any(|p| p == path);
                    if taken || !vhost_sockets.insert(path.clone()) {
                        return Err(invalid(
                            socket.span(),
                            "vhost_user",
                            format!("{} is another socket of this config", path.display()),
                        ));
                    }
                    if let Some(q) = &v.vhost_user_queues {
                        let max = crate::frontend::vhost_user::MAX_QUEUES;
                        if !(1..=max).contains(&usize::from(*q.get_ref())) {
                            return Err(invalid(
                                q.span(),
                                "vhost_user_queues",
                                format!("vhost_user_queues is 1 to {max}"),
                            ));
                        }
                    }
                    if let Some(m) = &v.vhost_user_mode {
                        if let Err(e) = volume::parse_mode(m.get_ref()) {
                            return Err(invalid(m.span(), "vhost_user_mode", e));
                        }
                    }
                    if let Some(g) = &v.vhost_user_group {
                        if crate::export::access::resolve_id(g.get_ref(), "/etc/group").is_none() {
                            return Err(invalid(
                                g.span(),
                                "vhost_user_group",
                                format!("no group named {:?} in /etc/group", g.get_ref()),
                            ));
                        }
                    }
                }
                None => {
                    let vhost_only = [
                        (
                            "vhost_user_queues",
                            v.vhost_user_queues.as_ref().map(|k| k.span()),
                        ),
                        (
                            "vhost_user_group",
                            v.vhost_user_group.as_ref().map(|k| k.span()),
                        ),
                        (
                            "vhost_user_mode",
                            v.vhost_user_mode.as_ref().map(|k| k.span()),
                        ),
                        (
                            "vhost_user_read_only",
                            v.vhost_user_read_only.as_ref().map(|k| k.span()),
                        ),
                    ];
                    if let Some((key, Some(span))) =
                        vhost_only.into_iter().find(|(_, s)| s.is_some())
                    {
                        return Err(invalid(
                            span,
                            key,
                            format!("{key} applies only with a vhost-user socket (vhost_user = \"PATH\")"),
                        ));
                    }
                }
            }
            for entry in v.allow.iter().flatten() {
                if let Err(e) = crate::export::access::Rule::parse(entry.get_ref()) {
                    return Err(invalid(entry.span(), "allow", e.to_string()));
                }
            }
            match (v.role, &v.kek) {
                (Role::Cache, None) => {
                    return Err(invalid(v.name.span(), "kek", format!("cache volume {name:?} needs `kek = \"NAME\"` naming a [kek.NAME] table")));
                }
                (Role::Cache, Some(kek)) if !self.kek.contains_key(kek.get_ref()) => {
                    return Err(invalid(
                        kek.span(),
                        "kek",
                        format!("no [kek.{}] table is defined", kek.get_ref()),
                    ));
                }
                (Role::Temp, Some(kek)) => {
                    return Err(invalid(
                        kek.span(),
                        "kek",
                        "temp volumes use a fresh in-memory key at every start and take no KEK"
                            .into(),
                    ));
                }
                _ => {}
            }
            if let (Some(cipher), None) = (&v.inner_cipher, &v.kek_inner) {
                return Err(invalid(
                    cipher.span(),
                    "inner_cipher",
                    "inner_cipher applies to the inner layer of a double-encrypted volume: set kek_inner too".into(),
                ));
            }
            if let Some(inner) = &v.kek_inner {
                let problem = if v.role == Role::Temp {
                    Some("temp volumes take no KEK, so no inner KEK either".to_string())
                } else if !self.kek.contains_key(inner.get_ref()) {
                    Some(format!("no [kek.{}] table is defined", inner.get_ref()))
                } else if v.kek.as_ref().map(|k| k.get_ref()) == Some(inner.get_ref()) {
                    Some("kek_inner must name a different KEK than kek: double encryption needs two independent keys".to_string())
                } else {
                    None
                };
                if let Some(problem) = problem {
                    return Err(invalid(inner.span(), "kek_inner", problem));
                }
            }
            match (&v.size, v.role) {
                (None, Role::Temp) => {
                    return Err(invalid(
                        v.name.span(),
                        "size",
                        format!("temp volume {name:?} needs a size, e.g. size = \"8G\""),
                    ));
                }
                (Some(size), _)
                    if size.get_ref().0 == 0
                        || size.get_ref().0 % u64::from(v.sector_size) != 0 =>
                {
                    return Err(invalid(
                        size.span(),
                        "size",
                        format!(
                            "must be a non-zero multiple of the sector size {}",
                            v.sector_size
                        ),
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Splits a `[server]` table into `[daemon]` and `[nbd]`: the keys
/// `[daemon]` knows go there, the rest to `[nbd]`, whose parser refuses
/// what it does not know either.
fn migrate_server(server: toml::Table) -> Result<(DaemonConfig, NbdConfig), toml::de::Error> {
    let (daemon, nbd) = split_server(server);
    Ok((daemon.try_into()?, nbd.try_into()?))
}

fn split_server(server: toml::Table) -> (toml::Table, toml::Table) {
    server
        .into_iter()
        .partition(|(key, _)| daemon::KEYS.contains(&key.as_str()))
}

impl Config {
    /// The `[daemon]` and `[nbd]` sections that replace this config's
    /// `[server]` section, as TOML text; `None` when it has none.
    pub fn migrated_server(&self) -> Option<String> {
        let (daemon, nbd) = split_server(self.legacy_server.clone()?);
        let mut text = String::new();
        for (name, table) in [("daemon", daemon), ("nbd", nbd)] {
            if table.is_empty() {
                continue;
            }
            let mut section = toml::Table::new();
            section.insert(name.into(), toml::Value::Table(table));
            text.push_str(&toml::to_string(&section).unwrap_or_default());
            text.push('\n');
        }
        Some(text.trim_end().to_string() + "\n")
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

#[cfg(test)]
mod tests;
