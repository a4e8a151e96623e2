//! Talking to the running daemon: one request over the control socket
//! (`control` in `[server]`), with the exit code for an unreachable daemon.

use crate::Exit;
use anyhow::bail;
use hostcryptd::config::Config;
use hostcryptd::control::client::{self, ClientError};
use hostcryptd::control::{Request, Response};
use std::path::Path;
use std::time::Duration;

/// Key operations may wait on a remote provider's retries.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(120);

/// Sends one request to the daemon named by the config's `control`.
pub fn control(config_path: &Path, request: &Request) -> anyhow::Result<serde_json::Value> {
    let config = Config::load(config_path)?;
    let Some(socket) = &config.server.control else {
        bail!(
            "{} sets no `control` socket in [server]; add e.g. control = \"/run/hostcrypt/control.sock\" and restart hostcryptd",
            config_path.display()
        );
    };
    let response: Response =
        client::call(socket, request, CONTROL_TIMEOUT).map_err(|e| match e {
            e @ ClientError::Connect { .. } => anyhow::Error::new(Exit::Unreachable(e)),
            e => anyhow::Error::new(e),
        })?;
    if !response.ok {
        bail!(
            "{}",
            response
                .error
                .unwrap_or_else(|| "the daemon refused the request".into())
        );
    }
    Ok(response.result)
}
