//! The vhost-user-blk frontend as the config describes it: one socket per
//! volume that has `vhost_user = PATH`, bound here with its group and
//! mode before the daemon says it is ready. The frontend itself
//! (`frontend/vhost_user/`) never reads the config.

use crate::config::Config;
use crate::frontend::vhost_user::{SocketSpec, VhostUserError, VhostUserFrontend};

/// The sockets the config asks for, bound.
pub fn frontend(config: &Config) -> Result<VhostUserFrontend, VhostUserError> {
    VhostUserFrontend::bind(specs(config)?)
}

/// Every volume's vhost-user socket settings, names resolved now.
pub fn specs(config: &Config) -> Result<Vec<SocketSpec>, VhostUserError> {
    config
        .volumes
        .iter()
        .filter_map(|v| {
            v.vhost_user_socket().map(|spec| {
                spec.map_err(|message| VhostUserError::Config {
                    path: v
                        .vhost_user
                        .as_ref()
                        .map(|p| p.get_ref().clone())
                        .unwrap_or_default(),
                    message,
                })
            })
        })
        .collect()
}
