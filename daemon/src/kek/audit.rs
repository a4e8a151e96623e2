//! The audit log: one JSON object per line for every key operation (wrap,
//! unwrap, rewrap, check, key loss, recovery, rotation, rekey), appended and
//! fsync'd before the operation is reported done. Never holds a secret or a
//! ciphertext: only names, key ids, versions, outcomes and error texts (which
//! the providers build without secrets).
//!
//! Without `audit_log` configured, events still go to the tracing log.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::KekRef;

/// One audit event.
#[derive(Debug, Clone, Serialize)]
pub struct Event<'a> {
    pub volume: &'a str,
    pub operation: &'a str,
    /// `ok`, `error`, or a state such as `lost` / `recovered`.
    pub outcome: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_version: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For control-socket requests: the requesting uid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl<'a> Event<'a> {
    pub fn new(volume: &'a str, operation: &'a str, outcome: &'a str) -> Self {
        Event {
            volume,
            operation,
            outcome,
            provider: None,
            key_id: None,
            key_version: None,
            error: None,
            uid: None,
            detail: None,
        }
    }

    pub fn key(mut self, kek: &'a KekRef) -> Self {
        self.provider = Some(&kek.provider);
        self.key_id = Some(&kek.key_id);
        self.key_version = Some(&kek.key_version);
        self
    }

    pub fn error(mut self, e: impl std::fmt::Display) -> Self {
        self.error = Some(e.to_string());
        self
    }

    pub fn detail(mut self, d: impl Into<String>) -> Self {
        self.detail = Some(d.into());
        self
    }

    pub fn uid(mut self, uid: Option<u32>) -> Self {
        self.uid = uid;
        self
    }
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    #[serde(flatten)]
    event: &'a Event<'a>,
}

/// The audit sink shared by every volume.
#[derive(Debug, Clone, Default)]
pub struct AuditLog {
    file: Option<Arc<Mutex<File>>>,
    path: Option<PathBuf>,
}

impl AuditLog {
    /// Opens (creating with mode 0600) the log for appending.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)?;
        Ok(AuditLog {
            file: Some(Arc::new(Mutex::new(file))),
            path: Some(path.to_owned()),
        })
    }

    /// A log that only forwards to tracing.
    pub fn disabled() -> Self {
        Self::default()
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Appends and fsyncs one event. A failing audit log is reported loudly
    /// but does not stop key operations that protect data (a key loss must
    /// still stop I/O even when the log's disk is full).
    pub fn record(&self, event: &Event<'_>) {
        let line = Line {
            time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            event,
        };
        let Ok(mut text) = serde_json::to_string(&line) else {
            return;
        };
        if event.outcome == "ok" {
            tracing::info!(target: "hostcryptd::audit", "{text}");
        } else {
            tracing::warn!(target: "hostcryptd::audit", "{text}");
        }
        let Some(file) = &self.file else { return };
        text.push('\n');
        let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = f.write_all(text.as_bytes()).and_then(|()| f.sync_data()) {
            tracing::error!(
                "audit log {}: {e}",
                self.path.as_deref().unwrap_or(Path::new("?")).display()
            );
        }
    }
}
