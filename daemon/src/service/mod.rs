//! The daemon's volumes and keys: opening the key providers and every
//! configured volume into exports (`registry.rs`), retrying the ones that
//! wait (`waiting.rs`), reload (`reload.rs`), the key-check monitor
//! (`keys.rs`), the shutdown signal (`shutdown.rs`), systemd's protocols
//! (`systemd.rs`) and the embedded demo (`demo.rs`). Starting and
//! stopping the whole daemon, frontends included, is `daemon/`.

pub mod demo;
pub mod keys;
pub mod registry;
pub mod reload;
pub mod shutdown;
pub mod systemd;
pub mod waiting;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::config::{Config, KekConfig};
use crate::export::Export;
use crate::frontend::tls::{TlsContext, TlsMode};
use crate::io::engine::Engine;
use crate::kek::audit::{AuditLog, Event};
use crate::kek::{AzureKek, KekError, KeyProvider, LocalKek, Pkcs11Kek, VaultKek};
use crate::volume::{self, Geometry, KeyPolicy, Layer, LayerKek, Role, VolumeError, VolumeKeys};
use registry::{Registry, Served};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("KEK {name:?}: {source}")]
    Kek {
        name: String,
        #[source]
        source: KekError,
    },
    #[error("volume {name:?}: {source}")]
    Volume {
        name: String,
        #[source]
        source: Box<VolumeError>,
    },
    #[error("volume {volume:?} names KEK {kek:?}, which is not configured")]
    UnknownKek { volume: String, kek: String },
    #[error("audit log {path}: {source}")]
    Audit {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reload: {0}")]
    Reload(String),
    #[error("connecting to its remote backing (remote volumes open off the start-up path)")]
    Connecting,
    #[error("volume {volume:?}: allow: {source}")]
    Allow {
        volume: String,
        #[source]
        source: crate::export::access::RuleError,
    },
    #[error("TLS certificates: {0}")]
    Tls(#[from] crate::frontend::tls::TlsError),
    #[error("cannot listen on {what}: {source}")]
    Bind {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Loads the key providers the config defines.
pub fn open_providers(
    config: &Config,
) -> Result<BTreeMap<String, Arc<dyn KeyProvider>>, ServiceError> {
    config
        .kek
        .iter()
        .map(|(name, kek)| Ok((name.clone(), open_provider(name, kek)?)))
        .collect()
}

/// Loads one key provider (the CLI opens only the one it needs).
pub fn open_provider(name: &str, kek: &KekConfig) -> Result<Arc<dyn KeyProvider>, ServiceError> {
    let provider: Result<Arc<dyn KeyProvider>, KekError> = match kek {
        KekConfig::Local { path } => LocalKek::load(path).map(|k| Arc::new(k) as _),
        KekConfig::Vault(vault) => VaultKek::new(vault.clone()).map(|k| Arc::new(k) as _),
        KekConfig::Pkcs11(p) => Pkcs11Kek::new(p.clone()).map(|k| Arc::new(k) as _),
        KekConfig::Azure(a) => AzureKek::new(a.clone()).map(|k| Arc::new(k) as _),
    };
    provider.map_err(|source| ServiceError::Kek {
        name: name.to_owned(),
        source,
    })
}

/// Proves one KEK works end to end: wraps a fresh random key and unwraps it
/// again (for `hostcryptd --check`). Returns what the provider wrapped
/// under (key and version).
pub fn prove_provider(provider: &dyn KeyProvider) -> Result<crate::kek::KekRef, KekError> {
    let dek = crate::crypto::Dek::generate().map_err(KekError::Random)?;
    let wrapped = provider.wrap(&dek)?;
    let back = provider.unwrap(&wrapped)?;
    if back.expose() != dek.expose() {
        return Err(KekError::UnwrapFailed {
            provider: provider.describe(),
        });
    }
    Ok(wrapped.kek)
}

/// Opens the audit log the config names (or a tracing-only one).
pub fn open_audit(config: &Config) -> Result<AuditLog, ServiceError> {
    match &config.daemon.audit_log {
        Some(path) => AuditLog::open(path).map_err(|source| ServiceError::Audit {
            path: path.clone(),
            source,
        }),
        None => Ok(AuditLog::disabled()),
    }
}

/// The provider that holds one layer's DEK: the configured one, or — after
/// `hostcrypt rekey` moved the DEK and the config was not yet updated — the
/// configured provider that owns the header's keyslot.
fn provider_for(
    volume: &str,
    header: Option<&volume::Header>,
    layer: Layer,
    configured: &str,
    providers: &BTreeMap<String, Arc<dyn KeyProvider>>,
) -> LayerKek {
    let default = LayerKek {
        name: configured.to_owned(),
        provider: providers[configured].clone(),
    };
    let Some(slot_kek) = header
        .and_then(|h| h.active_slot(layer))
        .map(|s| s.wrapped.kek.clone())
    else {
        return default;
    };
    if default.provider.owns(&slot_kek) {
        return default;
    }
    match providers.iter().find(|(_, p)| p.owns(&slot_kek)) {
        Some((name, provider)) => {
            let key = match layer {
                Layer::Outer => "kek",
                Layer::Inner => "kek_inner",
            };
            tracing::warn!(
                volume,
                configured,
                wrapped_by = %name,
                "the {layer} DEK is wrapped by KEK {name:?} (moved by `hostcrypt rekey`); using it — set {key} = {name:?} for this volume in the config"
            );
            LayerKek {
                name: name.clone(),
                provider: provider.clone(),
            }
        }
        None => default,
    }
}

fn configured_kek<'a>(
    volume: &str,
    kek: Option<&'a toml::Spanned<String>>,
    providers: &BTreeMap<String, Arc<dyn KeyProvider>>,
) -> Result<&'a str, ServiceError> {
    let name = kek.map(|k| k.get_ref().as_str()).unwrap_or("");
    if !providers.contains_key(name) {
        return Err(ServiceError::UnknownKek {
            volume: volume.to_owned(),
            kek: name.to_string(),
        });
    }
    Ok(name)
}

/// Opens every local volume in the config. One that cannot open (its key
/// cannot be unwrapped, its backing is missing) does not stop the others:
/// it comes back in the second list, loudly, and `waiting.rs` keeps
/// retrying it. Remote volumes come back there too, as `Connecting`: they
/// are opened by the waiting-volume thread, off the start-up path.
pub fn open_volumes(
    config: &Config,
    providers: &BTreeMap<String, Arc<dyn KeyProvider>>,
    audit: &AuditLog,
    engine: &Arc<Engine>,
) -> (Registry, Vec<(String, ServiceError)>) {
    let mut opened = Vec::new();
    let mut failed = Vec::new();
    for v in &config.volumes {
        // A remote backend that is slow, or hostile, must not hold up the
        // listeners and the local volumes: the waiting-volume thread opens
        // it at once, and status shows it as connecting meanwhile.
        if crate::io::is_remote(v.backing.get_ref()) {
            failed.push((v.name.get_ref().clone(), ServiceError::Connecting));
            continue;
        }
        match open_volume(v, providers, audit, &config.daemon.state_dir, engine) {
            Ok(export) => opened.push(export),
            Err(e) => failed.push((v.name.get_ref().clone(), e)),
        }
    }
    let registry = Registry::new(opened);
    for served in registry.iter() {
        served.start();
    }
    (registry, failed)
}

/// Opens one configured volume as an export; cache volumes are checked
/// against their anti-rollback records in `state_dir`.
pub fn open_volume(
    v: &crate::config::VolumeConfig,
    providers: &BTreeMap<String, Arc<dyn KeyProvider>>,
    audit: &AuditLog,
    state_dir: &std::path::Path,
    engine: &Arc<Engine>,
) -> Result<Served, ServiceError> {
    let name = v.name.get_ref().clone();
    let io = volume::IoSetup {
        engine: engine.clone(),
        direct: v.direct,
    };
    let backing = v.backing.get_ref();
    let wrap = |source| ServiceError::Volume {
        name: name.clone(),
        source: Box::new(source),
    };
    // Only a remote backing carries an owner record (`volume/claim.rs`).
    let claimant = match v.is_remote() {
        true => volume::Claimant::load(state_dir, v.take_over())
            .map_err(|e| wrap(volume::VolumeError::Claim(e)))?,
        false => volume::Claimant::local(),
    };
    let mut keys = None;
    let opened = match v.role {
        Role::Cache => {
            // Read once to find which configured KEKs own the keyslots.
            let header = volume::read_headers(backing)
                .ok()
                .and_then(|copies| volume::current_header(backing, &copies).ok());
            let configured = configured_kek(&name, v.kek.as_ref(), providers)?;
            let outer = provider_for(&name, header.as_ref(), Layer::Outer, configured, providers);
            let inner = match &v.kek_inner {
                Some(k) => {
                    let configured = configured_kek(&name, Some(k), providers)?;
                    Some(provider_for(
                        &name,
                        header.as_ref(),
                        Layer::Inner,
                        configured,
                        providers,
                    ))
                }
                None => None,
            };
            let records = volume::Records::new(state_dir);
            let opened = volume::open_cache(
                &name,
                backing,
                v.size_bytes(),
                outer.provider.as_ref(),
                inner.as_ref().map(|k| k.provider.as_ref()),
                &io,
                &records,
                &claimant,
            );
            let kek_names = match &inner {
                Some(i) => format!("keks {} (outer) and {} (inner)", outer.name, i.name),
                None => format!("kek {}", outer.name),
            };
            let mut event =
                Event::new(&name, "unwrap", if opened.is_ok() { "ok" } else { "error" })
                    .detail(format!("open with {kek_names}"));
            if let Err(e) = &opened {
                event = event.error(e);
            }
            let slot_kek = opened
                .as_ref()
                .ok()
                .and_then(|(_, header, _)| header.active_keyslot())
                .map(|s| s.wrapped.kek.clone());
            if let Some(k) = &slot_kek {
                event = event.key(k);
            }
            audit.record(&event);
            let (opened, header, header_keys) = opened.map_err(wrap)?;
            let volume_keys = Arc::new(VolumeKeys::new(
                backing,
                &opened,
                header,
                header_keys,
                records.volume(&name),
                outer,
                inner,
                KeyPolicy {
                    on_key_loss: v.on_key_loss,
                    on_key_unreachable: v.on_key_unreachable,
                    unreachable_grace: v.key_unreachable_grace,
                    auto_rotate: v.auto_rotate,
                    check_interval: v.key_check_interval,
                },
                audit.clone(),
            ));
            volume_keys.refresh_warnings();
            keys = Some(volume_keys);
            opened
        }
        Role::Temp => {
            let geometry = Geometry {
                size: v.size_bytes().unwrap_or(0),
                sector_size: v.sector_size,
            };
            volume::open_temp(&name, backing, geometry, &io, &claimant).map_err(wrap)?
        }
    };
    opened
        .data
        .backing()
        .set_cache_large_writes(v.cache_large_writes);
    tracing::info!(
        volume = %name,
        role = %opened.role,
        size = opened.data.size(),
        sector_size = opened.data.sector_size(),
        xts = opened.data.cipher_kernel(),
        layers = opened.data.layers(),
        inner = %if opened.data.layers() > 1 { opened.data.inner_cipher().to_string() } else { "-".into() },
        direct = v.direct,
        uncached_large_writes = opened.data.backing().uncached_large_writes(),
        backing = %backing.display(),
        "volume open"
    );
    let description = v.description.clone().unwrap_or_else(|| {
        format!(
            "hostcrypt {} volume, XTS-AES-256, {}-byte sectors",
            opened.role,
            opened.data.sector_size()
        )
    });
    let allow = v.allow_list().map_err(|source| ServiceError::Allow {
        volume: name.clone(),
        source,
    })?;
    let export = Arc::new(Export::new(opened, description, v.allow_discards, allow));
    Ok(Served { export, keys })
}

/// Loads the TLS credentials `[nbd]` names (none when `tls = "off"`).
pub fn load_tls(config: &Config) -> Result<Option<TlsContext>, ServiceError> {
    match (config.nbd.tls, config.nbd.tls_dir()) {
        (TlsMode::Off, _) | (_, None) => Ok(None),
        (_, Some(dir)) => Ok(Some(TlsContext::load(
            dir,
            config.nbd.tls_verify_peer,
            config.nbd.tls_crl_expired,
        )?)),
    }
}

/// Flushes one volume the daemon lets go of, then releases a remote
/// backing's owner record, but only after a flush that succeeded: after a
/// failed one, writes the backend may still apply are out there, and a
/// successor must come in with `take_over` and its grace. Either way the
/// instance writes no more.
pub fn flush_and_release(served: &Served) {
    let volume = &served.export.volume;
    let name = served.export.name();
    match volume.data.flush() {
        Ok(()) => {
            tracing::info!(volume = name, "flushed");
            if let Err(e) = volume.release_claim(served.keys.as_deref()) {
                tracing::error!(volume = name, "the remote backing's owner record was not released: {e}; another daemon will need take_over = true");
            }
        }
        Err(e) => {
            tracing::error!(volume = name, "flush failed: {e}");
            volume.end_writes("the volume's final flush failed");
            if volume.claim.is_some() {
                tracing::error!(volume = name, "the remote backing's owner record stays (writes the backend may still apply are out there); another daemon will need take_over = true");
            }
        }
    }
}

/// Flushes every served volume (at stop, once the frontends drained),
/// then releases the owner records of remote cache volumes that flushed
/// (`volume/claim.rs`).
pub async fn flush_all(registry: &Registry) {
    for served in registry.iter() {
        let (export, keys) = (served.export, served.keys);
        let flushed =
            tokio::task::spawn_blocking(move || flush_and_release(&Served { export, keys })).await;
        if let Err(e) = flushed {
            tracing::error!("flush task failed: {e}");
        }
    }
}

/// The socket paths a config will create, for messages.
pub fn unix_socket(config: &Config) -> Option<PathBuf> {
    config.nbd.unix.clone()
}
