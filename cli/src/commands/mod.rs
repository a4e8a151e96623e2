//! One module per command group, each with the functions `main.rs`
//! dispatches to; `main.rs` only parses arguments and dispatches.

pub mod attach;
pub mod audit;
pub mod create;
pub mod header;
pub mod inspect;
pub mod keys;
pub mod reencrypt;
pub mod reload;
pub mod status;

use std::path::Path;

use anyhow::Context;
use hostcryptd::config::{Config, VolumeConfig};

/// The `[[volume]]` named `name`, or an error listing the configured ones.
pub fn volume_config<'a>(
    config: &'a Config,
    config_path: &Path,
    name: &str,
) -> anyhow::Result<&'a VolumeConfig> {
    config.volume(name).with_context(|| {
        let known: Vec<_> = config
            .volumes
            .iter()
            .map(|v| v.name.get_ref().as_str())
            .collect();
        format!(
            "no volume {name:?} in {}; configured: {}",
            config_path.display(),
            known.join(", ")
        )
    })
}
