//! SIGTERM, SIGINT and SIGHUP, caught from the moment they are installed:
//! the first two stop the daemon, SIGHUP reloads the config (like
//! `hostcrypt reload`) and keeps serving.

use std::sync::Arc;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;

use crate::service::{reload::Reloader, systemd};

pub struct StopSignals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl StopSignals {
    pub fn install() -> std::io::Result<Self> {
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Returns on SIGTERM, SIGINT or a stop request; reloads on SIGHUP.
    pub async fn wait(&mut self, reloader: &Arc<Reloader>, requested: &mut watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = self.term.recv() => return,
                _ = self.int.recv() => return,
                _ = requested.wait_for(|stop| *stop) => return,
                _ = self.hup.recv() => reload(reloader.clone()).await,
            }
        }
    }
}

async fn reload(reloader: Arc<Reloader>) {
    tracing::info!("SIGHUP: reloading the config");
    systemd::reloading();
    match tokio::task::spawn_blocking(move || reloader.reload()).await {
        Ok(Ok(report)) => systemd::status(&format!(
            "reloaded: {} added, {} removed, {} not applied",
            report.added.len(),
            report.removed.len(),
            report.not_applied.len()
        )),
        Ok(Err(e)) => {
            tracing::error!(
                "reload failed, nothing changed: {}",
                crate::report::error_chain(&e)
            );
            systemd::status("reload failed; serving the previous config");
        }
        Err(e) => tracing::error!("reload task failed: {e}"),
    }
    systemd::ready_again();
}
