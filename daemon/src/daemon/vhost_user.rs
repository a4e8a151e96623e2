//! The vhost-user-blk frontend as the config describes it: one socket per
//! volume that has `vhost_user = PATH`, bound here with its group and
//! mode before the daemon says it is ready, and changed by a reload
//! (`reload_hook`). The frontend itself (`frontend/vhost_user/`) never
//! reads the config.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::Config;
use crate::frontend::vhost_user::{
    SocketSpec, VhostUserError, VhostUserFrontend, VhostUserSockets,
};
use crate::service::reload::SocketsHook;

/// How long a reload waits for a removed socket's file to go before it
/// binds a changed socket at the same path.
const REPLACE_WITHIN: Duration = Duration::from_secs(5);

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

/// A reload's sockets: those the old config had and the new one does not
/// are removed (their clients' connections end), new ones are bound, and
/// a changed one (group, mode, queues, read-only) is removed and bound
/// again. Returns what could not be applied.
pub fn reload_hook(sockets: VhostUserSockets) -> SocketsHook {
    Box::new(move |old: &Config, new: &Config| {
        let by_path = |c: &Config| -> Result<BTreeMap<PathBuf, SocketSpec>, VhostUserError> {
            Ok(specs(c)?.into_iter().map(|s| (s.path.clone(), s)).collect())
        };
        let (old, new) = match (by_path(old), by_path(new)) {
            (Ok(old), Ok(new)) => (old, new),
            (Err(e), _) | (_, Err(e)) => {
                return vec![format!("{e}: vhost-user sockets left as they were")]
            }
        };
        let mut problems = Vec::new();
        for (path, spec) in &old {
            if new.get(path) != Some(spec) && !sockets.remove(path, REPLACE_WITHIN) {
                problems.push(format!(
                    "vhost-user socket {} did not go within {REPLACE_WITHIN:?}",
                    path.display()
                ));
            }
        }
        for (path, spec) in new {
            if old.get(&path) != Some(&spec) {
                if let Err(e) = sockets.add(spec) {
                    problems.push(format!("{e}: not added; fix it and reload"));
                }
            }
        }
        problems
    })
}
