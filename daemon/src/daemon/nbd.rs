//! The NBD frontend as the config describes it: the listeners (bound
//! here, or passed in by systemd), the TLS credentials and the gate they
//! admit through. The frontend itself never reads the config.

use std::sync::Arc;

use crate::config::Config;
use crate::control::protocol::ListenerStatus;
use crate::frontend::nbd::gate::Gate;
use crate::frontend::nbd::Listener;
use crate::frontend::tls::TlsMode;
use crate::service::systemd::ActivatedSockets;
use crate::service::ServiceError;

/// The listeners systemd passed, or else the configured ones, bound now.
pub async fn listeners(
    config: &Config,
    activated: &mut ActivatedSockets,
) -> Result<Vec<Listener>, ServiceError> {
    if activated.unix.is_empty() && activated.tcp.is_empty() {
        return bind(config).await;
    }
    let mut listeners = Vec::new();
    let from_systemd = |source| ServiceError::Bind {
        what: "a socket from systemd".into(),
        source,
    };
    for (socket, path) in std::mem::take(&mut activated.unix) {
        listeners.push(Listener::from_std_unix(socket, path).map_err(from_systemd)?);
    }
    for socket in std::mem::take(&mut activated.tcp) {
        check_activated_tcp(config, &socket)?;
        listeners.push(Listener::from_std_tcp(socket).map_err(from_systemd)?);
    }
    Ok(listeners)
}

/// Logs each listener and returns what `status` shows of it.
pub fn log_listeners(config: &Config, listeners: &[Listener]) -> Vec<ListenerStatus> {
    listeners
        .iter()
        .map(|l| {
            let tls = if l.is_tcp() {
                config.nbd.tls
            } else {
                TlsMode::Off
            };
            let shown = if l.is_tcp() {
                tls.to_string()
            } else {
                "unix (SO_PEERCRED)".into()
            };
            tracing::info!(listener = l.describe(), tls = shown, "listening");
            ListenerStatus {
                address: l.describe(),
                tls,
            }
        })
        .collect()
}

/// Binds the configured listeners.
async fn bind(config: &Config) -> Result<Vec<Listener>, ServiceError> {
    let mut listeners = Vec::new();
    if let Some(path) = &config.nbd.unix {
        listeners.push(
            Listener::bind_unix(path).map_err(|source| ServiceError::Bind {
                what: format!("unix:{}", path.display()),
                source,
            })?,
        );
    }
    if let Some(addr) = &config.nbd.tcp {
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

/// The gate every NBD connection passes: limits and TLS credentials.
pub fn open_gate(config: &Config) -> Result<Arc<Gate>, ServiceError> {
    Ok(Gate::new(
        config.nbd.gate(),
        crate::service::load_tls(config)?,
    ))
}

/// Refuses a TCP socket handed over by systemd that other hosts can reach
/// when the config would serve it in plaintext: the same rule the config
/// applies to `tcp = ...`.
pub fn check_activated_tcp(
    config: &Config,
    socket: &std::net::TcpListener,
) -> Result<(), ServiceError> {
    let addr = socket.local_addr().map_err(|source| ServiceError::Bind {
        what: "a TCP socket from systemd".into(),
        source,
    })?;
    if addr.ip().is_loopback()
        || config.nbd.tls == TlsMode::Require
        || config.nbd.insecure_plaintext_tcp
    {
        return Ok(());
    }
    Err(ServiceError::Bind {
        what: format!("tcp:{addr} (from systemd)"),
        source: std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "reachable from other hosts without tls = \"require\"; set tls = \"require\" with tls_certificates, or insecure_plaintext_tcp = true",
        ),
    })
}
