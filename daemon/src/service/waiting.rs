//! Volumes that are configured but not open: at start or at a reload their
//! key could not be unwrapped (or their backing could not be opened). One
//! such volume never stops the daemon or the other volumes: it stays
//! listed to clients with the reason (`export::Unavailable`), shows in status
//! and the metrics, and is retried with backoff, from 1 s up to its
//! `key_check_interval`, until it opens (`Reloader::retry_waiting`).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use super::ServiceError;
use crate::config::{Config, VolumeConfig};
use crate::export::access::AllowList;
use crate::export::{Unavailable, UnavailableState};
use crate::kek::audit::{AuditLog, Event};
use crate::service::registry::Registry;

const FIRST_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub struct Waiting {
    entries: Mutex<BTreeMap<String, Entry>>,
}

#[derive(Debug)]
struct Entry {
    state: UnavailableState,
    error: String,
    since: SystemTime,
    next: Instant,
    delay: Duration,
}

/// `connecting` for a remote volume not tried yet, `waiting-for-key` when
/// the key is the problem, `open-failed` otherwise.
fn state_of(error: &ServiceError) -> UnavailableState {
    if matches!(error, ServiceError::Connecting) {
        return UnavailableState::Connecting;
    }
    let key_related = match error {
        ServiceError::Kek { .. } => true,
        ServiceError::Volume { source, .. } => source.is_key_error(),
        _ => false,
    };
    if key_related {
        UnavailableState::WaitingForKey
    } else {
        UnavailableState::OpenFailed
    }
}

impl Waiting {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a failed open of `volume`: the first failure (or a new
    /// reason) is logged and audited, and the next try backs off.
    pub fn record(&self, volume: &VolumeConfig, error: &ServiceError, audit: &AuditLog) {
        let name = volume.name.get_ref().clone();
        let text = crate::report::error_chain(error);
        let state = state_of(error);
        let mut entries = self.lock();
        let cap = volume.key_check_interval.max(FIRST_RETRY);
        let changed = entries.get(&name).is_none_or(|e| e.error != text);
        let entry = entries.entry(name.clone()).or_insert_with(|| Entry {
            state,
            error: String::new(),
            since: SystemTime::now(),
            next: Instant::now(),
            delay: FIRST_RETRY / 2,
        });
        if state == UnavailableState::Connecting {
            // Not a failure: the first try is due now.
            entry.next = Instant::now();
            entry.state = state;
            entry.error = text;
            tracing::info!(volume = %name, "remote volume: connecting off the start-up path");
            return;
        }
        entry.delay = (entry.delay * 2).min(cap);
        entry.next = Instant::now() + entry.delay;
        entry.state = state;
        entry.error = text.clone();
        if changed {
            tracing::error!(volume = %name, state = state.as_str(), "volume not served: {text}; retrying, the other volumes serve meanwhile");
            audit.record(&Event::new(&name, "open", "error").detail(format!("{state}: {text}")));
        }
    }

    pub fn remove(&self, name: &str) -> bool {
        self.lock().remove(name).is_some()
    }

    /// Names whose next try is due.
    pub fn due(&self) -> Vec<String> {
        let now = Instant::now();
        self.lock()
            .iter()
            .filter(|(_, e)| e.next <= now)
            .map(|(n, _)| n.clone())
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Keeps only volumes that are still configured.
    pub fn retain_configured(&self, config: &Config) {
        self.lock().retain(|name, _| config.volume(name).is_some());
    }

    /// Shows the waiting volumes to NBD clients, with their allow lists.
    pub fn publish(&self, registry: &Registry, config: &Config) {
        let list = self
            .lock()
            .iter()
            .map(|(name, e)| Unavailable {
                name: name.clone(),
                state: e.state,
                reason: e.error.clone(),
                allow: config
                    .volume(name)
                    .and_then(|v| v.allow_list().ok())
                    .unwrap_or_else(AllowList::nobody),
                since: e
                    .since
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            })
            .collect();
        registry.set_unavailable(list);
    }
}
