//! Running the daemon: open every configured volume, bind the listeners,
//! serve until told to stop, then drain connections and flush volumes.
//! The embedded demo defaults live in `demo.rs`.

pub mod demo;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;

use crate::config::{Config, KekConfig};
use crate::kek::{KekError, KeyProvider, LocalKek};
use crate::nbd::{Export, Exports, Listener};
use crate::volume::{self, Geometry, Role, VolumeError};

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
    let mut providers: BTreeMap<String, Arc<dyn KeyProvider>> = BTreeMap::new();
    for (name, kek) in &config.kek {
        let provider: Arc<dyn KeyProvider> = match kek {
            KekConfig::Local { path } => {
                Arc::new(LocalKek::load(path).map_err(|source| ServiceError::Kek {
                    name: name.clone(),
                    source,
                })?)
            }
        };
        providers.insert(name.clone(), provider);
    }
    Ok(providers)
}

/// Opens every volume in the config. Any failure aborts start-up: a daemon
/// that silently serves fewer volumes than configured hides a key problem.
pub fn open_exports(config: &Config) -> Result<Exports, ServiceError> {
    let providers = open_providers(config)?;
    let mut exports = Vec::new();
    for v in &config.volumes {
        let name = v.name.get_ref().clone();
        let backing = v.backing.get_ref();
        let wrap = |source| ServiceError::Volume {
            name: name.clone(),
            source: Box::new(source),
        };
        let opened = match v.role {
            Role::Cache => {
                let kek_name = v.kek.as_ref().map(|k| k.get_ref().as_str()).unwrap_or("");
                let kek = providers
                    .get(kek_name)
                    .ok_or_else(|| ServiceError::UnknownKek {
                        volume: name.clone(),
                        kek: kek_name.to_string(),
                    })?;
                volume::open_cache(&name, backing, v.size_bytes(), kek.as_ref(), v.direct)
                    .map_err(wrap)?
            }
            Role::Temp => {
                let geometry = Geometry {
                    size: v.size_bytes().unwrap_or(0),
                    sector_size: v.sector_size,
                };
                volume::open_temp(&name, backing, geometry, v.direct).map_err(wrap)?
            }
        };
        tracing::info!(
            volume = %name,
            role = %opened.role,
            size = opened.header.size,
            sector_size = opened.header.sector_size,
            xts = opened.data.cipher_kernel(),
            direct = v.direct,
            backing = %backing.display(),
            "volume open"
        );
        let description = v.description.clone().unwrap_or_else(|| {
            format!(
                "hostcrypt {} volume, XTS-AES-256, {}-byte sectors",
                opened.role, opened.header.sector_size
            )
        });
        exports.push(Arc::new(Export {
            volume: opened,
            description,
            allow_discards: v.allow_discards,
        }));
    }
    Ok(Exports::new(exports))
}

/// Binds the configured listeners.
pub async fn bind(config: &Config) -> Result<Vec<Listener>, ServiceError> {
    let mut listeners = Vec::new();
    if let Some(path) = &config.server.unix {
        listeners.push(
            Listener::bind_unix(path).map_err(|source| ServiceError::Bind {
                what: format!("unix:{}", path.display()),
                source,
            })?,
        );
    }
    if let Some(addr) = &config.server.tcp {
        listeners.push(
            Listener::bind_tcp(addr)
                .await
                .map_err(|source| ServiceError::Bind {
                    what: format!("tcp:{addr}"),
                    source,
                })?,
        );
    }
    Ok(listeners)
}

/// Serves until `shutdown` turns true, then drains and flushes every volume.
pub async fn serve(listeners: Vec<Listener>, exports: Exports, shutdown: watch::Receiver<bool>) {
    crate::nbd::run(listeners, exports.clone(), shutdown).await;
    for export in exports.iter() {
        let export = export.clone();
        let flushed =
            tokio::task::spawn_blocking(move || export.volume.data.flush().map(|_| export)).await;
        match flushed {
            Ok(Ok(export)) => tracing::info!(volume = export.name(), "flushed"),
            Ok(Err(e)) => tracing::error!("flush at shutdown failed: {e}"),
            Err(e) => tracing::error!("flush task failed: {e}"),
        }
    }
}

/// The socket paths a config will create, for messages.
pub fn unix_socket(config: &Config) -> Option<PathBuf> {
    config.server.unix.clone()
}
