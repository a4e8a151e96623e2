//! Talking to the running daemon: one request over the control socket
//! (`control` in `[daemon]`), with the exit code for an unreachable daemon.

use crate::Exit;
use anyhow::bail;
use hostcryptd::config::Config;
use hostcryptd::control::client::{self, ControlClientError};
use hostcryptd::control::protocol::ControlReply;
use hostcryptd::control::{ControlRequest, ControlResponse};
use std::path::Path;
use std::time::Duration;

/// Key operations may wait on a remote provider's retries.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(120);

/// Sends one request and decodes the answer as `T` (`Status`,
/// `Vec<CheckResult>`, ...): the daemon's and the CLI's types are one.
pub fn ask<T: TryFrom<ControlReply, Error = ControlReply>>(
    config_path: &Path,
    request: &ControlRequest,
) -> anyhow::Result<T> {
    control(config_path, request)?.try_into().map_err(|other: ControlReply| {
        anyhow::anyhow!(
            "the daemon answered with {} where {} was expected (is hostcryptd the same version as hostcrypt?)",
            other.kind(),
            std::any::type_name::<T>()
        )
    })
}

/// Sends one request to the daemon named by the config's `control`.
pub fn control(config_path: &Path, request: &ControlRequest) -> anyhow::Result<ControlReply> {
    let config = Config::load(config_path)?;
    let Some(socket) = &config.daemon.control else {
        bail!(
            "{} sets no `control` socket in [daemon]; add e.g. control = \"/run/hostcrypt/control.sock\" and restart hostcryptd",
            config_path.display()
        );
    };
    let response: ControlResponse =
        client::call(socket, request, CONTROL_TIMEOUT).map_err(|e| match e {
            e @ ControlClientError::Connect { .. } => anyhow::Error::new(Exit::Unreachable(e)),
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
    response
        .result
        .ok_or_else(|| anyhow::anyhow!("the daemon answered without a result"))
}
