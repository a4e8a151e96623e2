//! Live config reload (`hostcrypt reload`, SIGHUP): re-read the config file
//! and add or remove volumes without touching the others.
//!
//! A volume counts as the same when every setting that shapes it (backing,
//! role, KEKs, size, sector size, discards, O_DIRECT, key policy,
//! description) is unchanged; such volumes keep serving untouched. New names
//! are opened (a failure to open one is reported and nothing else changes);
//! vanished names leave the export list, so new connections cannot reach
//! them, their connections are closed and then they are flushed
//! (`Served::retire`). A changed volume is left as it is and reported:
//! applying it means removing it in one reload and adding it back in the
//! next. The re-added volume opens only once the old instance has let go
//! of the backing (`io/owner.rs`), so one name never serves two instances. Allow lists and the TLS
//! certificate files (CRL included) are re-read at every reload and apply
//! to new connections; open connections keep serving. Other `[daemon]` and `[nbd]`
//! changes need a restart and are reported. Reloading the same file twice
//! changes nothing the second time.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::{open_provider, open_volume, ServiceError};
use crate::config::{Config, VolumeConfig};
use crate::frontend::nbd::gate::Gate;
use crate::io::engine::Engine;
use crate::kek::audit::AuditLog;
use crate::kek::KeyProvider;
use crate::service::registry::Registry;

/// What a reload did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReloadReport {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub unchanged: Vec<String>,
    /// Whether TLS credentials were re-read.
    #[serde(default)]
    pub tls_reloaded: bool,
    /// Changes seen but not applied, each with what to do.
    pub not_applied: Vec<String>,
    /// Added volumes that could not open yet, with why; they are retried.
    #[serde(default)]
    pub waiting: Vec<String>,
}

/// Frontends whose sockets follow the config (vhost-user): called with
/// the config before and after a reload commits; returns what it could
/// not apply, each with what to do.
pub type SocketsHook = Box<dyn Fn(&Config, &Config) -> Vec<String> + Send + Sync>;

/// What a [`Reloader`] starts from: the daemon's state after start-up.
pub struct Started {
    pub config_path: PathBuf,
    pub config: Config,
    pub providers: BTreeMap<String, Arc<dyn KeyProvider>>,
    pub registry: Registry,
    pub gate: Arc<Gate>,
    pub audit: AuditLog,
    /// Volumes that did not open at start-up, with why.
    pub failed: Vec<(String, ServiceError)>,
    /// The engine volumes opened later (retried, added) run on.
    pub engine: Arc<Engine>,
    /// The vhost-user sockets' reload, if the daemon serves any frontend
    /// with per-volume sockets.
    pub sockets: Option<SocketsHook>,
}

/// The running daemon's view of its config, for reloads.
pub struct Reloader {
    config_path: PathBuf,
    registry: Registry,
    gate: Arc<Gate>,
    audit: AuditLog,
    engine: Arc<Engine>,
    sockets: Option<SocketsHook>,
    state: Mutex<State>,
    /// Configured volumes that are not open yet.
    waiting: super::waiting::Waiting,
    /// Set (under `state`) when the daemon stops: nothing joins the
    /// registry after its final flush has begun.
    stopping: std::sync::atomic::AtomicBool,
}

struct State {
    config: Config,
    providers: BTreeMap<String, Arc<dyn KeyProvider>>,
}

impl Reloader {
    pub fn new(started: Started) -> Self {
        let Started {
            config_path,
            config,
            providers,
            registry,
            gate,
            audit,
            failed,
            engine,
            sockets,
        } = started;
        let waiting = super::waiting::Waiting::default();
        for (name, error) in &failed {
            if let Some(v) = config.volume(name) {
                waiting.record(v, error, &audit);
            }
        }
        waiting.publish(&registry, &config);
        Reloader {
            config_path,
            registry,
            gate,
            audit,
            engine,
            sockets,
            state: Mutex::new(State { config, providers }),
            waiting,
            stopping: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Tries again to open the volumes whose retry is due; one that opens
    /// joins the registry. Called by the key monitor every second.
    pub fn retry_waiting(&self) {
        if self.waiting.is_empty() {
            return;
        }
        let due = self.waiting.due();
        if due.is_empty() {
            return;
        }
        for name in due {
            if self.stopping() {
                return;
            }
            // Opened without the reloader's lock: a provider that hangs
            // must not hold up a reload.
            let (volume, providers, state_dir) = {
                let state = self.lock();
                (
                    state.config.volume(&name).cloned(),
                    state.providers.clone(),
                    state.config.daemon.state_dir.clone(),
                )
            };
            let Some(v) = volume else {
                self.waiting.remove(&name);
                continue;
            };
            match open_volume(&v, &providers, &self.audit, &state_dir, &self.engine) {
                Ok(export) => {
                    // Still configured the same way? A reload may have
                    // removed or changed it meanwhile.
                    let state = self.lock();
                    let current = state.config.volume(&name);
                    let wanted = !self.stopping()
                        && current.is_some_and(|c| fingerprint(c) == fingerprint(&v))
                        && self.registry.find(&name).is_none();
                    if !wanted {
                        drop(state);
                        // Flushed and its owner record released: nothing
                        // else will (the daemon's final flush has begun,
                        // or the config moved on).
                        super::flush_and_release(&export);
                        continue;
                    }
                    {
                        self.registry.add(export.clone());
                        export.start();
                        self.waiting.remove(&name);
                        tracing::warn!(volume = %name, "volume opened; serving it now");
                        self.audit.record(
                            &crate::kek::audit::Event::new(&name, "open", "ok")
                                .detail("the volume opened after waiting; serving it now"),
                        );
                    }
                }
                Err(e) => self.waiting.record(&v, &e, &self.audit),
            }
        }
        let state = self.lock();
        self.waiting.publish(&self.registry, &state.config);
    }

    /// From now on no volume joins the registry (the daemon is stopping);
    /// waits for a reload in progress.
    pub fn begin_stop(&self) {
        let _state = self.lock();
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The provider configured under `name` now.
    pub fn provider(&self, name: &str) -> Option<Arc<dyn KeyProvider>> {
        self.lock().providers.get(name).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Re-reads the config file and applies volume additions and removals.
    pub fn reload(&self) -> Result<ReloadReport, ServiceError> {
        let new =
            Config::load(&self.config_path).map_err(|e| ServiceError::Reload(e.to_string()))?;
        let mut state = self.lock();
        if self.stopping() {
            return Err(ServiceError::Reload("the daemon is stopping".into()));
        }
        let mut report = ReloadReport::default();
        // Everything that can fail is read before anything changes.
        // Certificates come from the running [nbd] (a changed [nbd]
        // needs a restart), allow lists from the new file.
        let tls = super::load_tls(&state.config)?;
        let mut allow = BTreeMap::new();
        for v in &new.volumes {
            let list = v.allow_list().map_err(|source| ServiceError::Allow {
                volume: v.name.get_ref().clone(),
                source,
            })?;
            allow.insert(v.name.get_ref().clone(), list);
        }
        let daemon_wide = |c: &Config| format!("{:?}{:?}", c.daemon, c.nbd);
        if daemon_wide(&state.config) != daemon_wide(&new) {
            report
                .not_applied
                .push("[daemon] or [nbd] changed: restart hostcryptd to apply it".into());
        }

        // Providers: keep the live object for an unchanged [kek.NAME] table
        // (volumes hold it), open the new and the changed ones.
        let mut providers = BTreeMap::new();
        for (name, kek) in &new.kek {
            let same = state
                .config
                .kek
                .get(name)
                .is_some_and(|old| format!("{old:?}") == format!("{kek:?}"));
            let provider = match (same, state.providers.get(name)) {
                (true, Some(p)) => p.clone(),
                _ => open_provider(name, kek)?,
            };
            providers.insert(name.clone(), provider);
        }

        let old_volumes: BTreeMap<&str, &VolumeConfig> = state
            .config
            .volumes
            .iter()
            .map(|v| (v.name.get_ref().as_str(), v))
            .collect();
        let mut list = Vec::new();
        let mut kept_config = Vec::new();
        for v in &new.volumes {
            let name = v.name.get_ref().as_str();
            match old_volumes.get(name) {
                // Not open yet: nothing to keep, the new settings apply
                // at the next try.
                Some(_) if self.registry.find(name).is_none() => {
                    report.unchanged.push(name.into());
                }
                Some(old) if fingerprint(old) == fingerprint(v) => {
                    list.extend(self.registry.find(name));
                    report.unchanged.push(name.into());
                }
                Some(_) => {
                    list.extend(self.registry.find(name));
                    report.not_applied.push(format!(
                        "volume {name:?} changed: remove it, reload, then add it back and reload again"
                    ));
                }
                // The state directory is the one the daemon started with.
                None => {
                    match open_volume(
                        v,
                        &providers,
                        &self.audit,
                        &state.config.daemon.state_dir,
                        &self.engine,
                    ) {
                        Ok(export) => {
                            list.push(export);
                            report.added.push(name.into());
                        }
                        Err(e) => {
                            report
                                .waiting
                                .push(format!("{name}: {}", crate::report::error_chain(&e)));
                            self.waiting.record(v, &e, &self.audit);
                        }
                    }
                }
            }
            kept_config.push(name.to_owned());
        }
        let removed: Vec<_> = self
            .registry
            .iter()
            .filter(|e| !kept_config.iter().any(|n| n == e.name()))
            .collect();
        for export in &list {
            if let Some(new_allow) = allow.remove(export.name()) {
                if **export.allow.load() != new_allow {
                    tracing::info!(volume = export.name(), allow = ?new_allow.describe(), "allow list changed");
                }
                export.allow.store(Arc::new(new_allow));
            }
        }
        let added: Vec<_> = list
            .iter()
            .filter(|s| report.added.iter().any(|n| n == s.name()))
            .cloned()
            .collect();
        self.registry.replace(list);
        self.registry.watch_retired(&removed);
        if let Some(tls) = tls {
            tracing::info!(
                subject = %tls.info.server_subject,
                not_after = %tls.info.server_not_after,
                crl_revoked = ?tls.info.crl_revoked,
                "TLS certificates reloaded"
            );
            self.gate.replace_tls(tls);
            report.tls_reloaded = true;
        }
        for served in &added {
            served.start();
        }
        for export in &removed {
            report.removed.push(export.name().to_owned());
        }
        // Changed volumes stay as they were: keep their old settings, so the
        // next reload still sees the difference.
        let mut config = new;
        for v in config.volumes.iter_mut() {
            let name = v.name.get_ref().clone();
            if let Some(old) = state
                .config
                .volumes
                .iter()
                .position(|o| o.name.get_ref() == &name)
            {
                let open = self.registry.find(&name).is_some();
                if open && fingerprint(&state.config.volumes[old]) != fingerprint(v) {
                    std::mem::swap(v, &mut state.config.volumes[old]);
                }
            }
        }
        config.daemon = std::mem::replace(&mut state.config.daemon, config.daemon);
        config.nbd = std::mem::replace(&mut state.config.nbd, config.nbd);
        let before = std::mem::replace(&mut state.config, config);
        // Sockets follow the committed config (a changed volume kept its
        // old settings above, and so keeps its socket).
        if let Some(sockets) = &self.sockets {
            report.not_applied.extend(sockets(&before, &state.config));
        }
        state.providers = providers;
        self.waiting.retain_configured(&state.config);
        self.waiting.publish(&self.registry, &state.config);
        // Outside the reloader's lock, all at once: a removed volume may
        // wait up to its drain time for its connections, which must hold
        // up neither status nor the other removals.
        drop(state);
        std::thread::scope(|scope| {
            for export in &removed {
                scope.spawn(move || {
                    if let Err(e) = export.retire() {
                        tracing::error!(
                            volume = export.name(),
                            "flush of a removed volume failed: {e}"
                        );
                    }
                });
            }
        });
        tracing::info!(
            added = ?report.added,
            removed = ?report.removed,
            not_applied = ?report.not_applied,
            "config reloaded"
        );
        Ok(report)
    }
}

/// Every setting that shapes a served volume, without source positions.
fn fingerprint(v: &VolumeConfig) -> String {
    format!(
        "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{}|{}|{}|{}|{:?}|{:?}|{:?}|{:?}|{}|{:?}",
        v.backing.get_ref(),
        v.role,
        v.kek.as_ref().map(|k| k.get_ref()),
        v.kek_inner.as_ref().map(|k| k.get_ref()),
        v.size_bytes(),
        v.sector_size,
        v.allow_discards,
        v.direct,
        v.cache_large_writes,
        v.auto_rotate,
        v.on_key_loss,
        v.on_key_unreachable,
        v.key_unreachable_grace,
        v.key_check_interval,
        v.description.clone().unwrap_or_default(),
        v.name.get_ref(),
    )
}
