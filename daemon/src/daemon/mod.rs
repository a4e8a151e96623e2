//! The daemon's wiring, as vhost-user-backend's `VhostUserDaemon`:
//! [`Daemon::start`] opens the volumes, starts the engine, binds the
//! control socket and starts every configured frontend, the metrics
//! endpoint, the key-check thread and the systemd watchdog;
//! [`Daemon::wait_for_stop`] waits for SIGTERM/SIGINT (SIGHUP reloads) or
//! [`Daemon::stop`]; [`Daemon::drain`] stops everything in order. The
//! binary only parses arguments (`bin/hostcryptd.rs`); tests can run a
//! daemon in-process.
//!
//! What lives elsewhere: opening volumes, reload and the key monitor
//! (`service/`); what each frontend does (`frontend/`); the NBD listeners
//! and gate built from the config (`nbd.rs`); the vhost-user-blk sockets
//! (`vhost_user.rs`); `--check` (`check.rs`);
//! logging set-up (`logging.rs`).

pub mod check;
pub mod logging;
mod nbd;
mod signals;
pub mod vhost_user;

use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use crate::config::Config;
use crate::control;
use crate::frontend::{self, Frontend};
use crate::io::engine::Engine;
use crate::service::{
    self, registry::Registry, reload::Reloader, shutdown::Shutdown, ServiceError,
};
use signals::StopSignals;

pub use nbd::check_activated_tcp;
pub use service::load_tls;

/// Seconds the kernel holds an attached device's I/O while no daemon
/// serves it (a restart): long enough for a restart that waits on a key
/// server, short enough that a daemon gone for good fails the I/O
/// instead of hanging it.
const ATTACH_DEAD_CONN_TIMEOUT: u64 = 120;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error("{0} answers: another hostcryptd serves this config; stop it first")]
    AlreadyServed(PathBuf),
    #[error("starting the io_uring engine (set io_engine = \"threads\" where io_uring is not allowed): {0}")]
    Engine(#[source] std::io::Error),
    #[error("reading the sockets passed by systemd (LISTEN_FDS): {0}")]
    Activation(#[source] std::io::Error),
    #[error(transparent)]
    VhostUser(#[from] crate::frontend::vhost_user::VhostUserError),
    #[error("installing the signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("{what}: {source}")]
    Control {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics endpoint {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the key-check thread: {0}")]
    KeyChecks(#[source] std::io::Error),
    #[error("the start-up task (volumes, keys, engine) failed: {0}")]
    Startup(String),
    #[error("state_dir {path}: {source}; each hostcryptd needs a state_dir of its own (its anti-rollback records and daemon identity)")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How to start: the config, where it came from (reload reads it again),
/// and whether this process owns SIGTERM/SIGINT/SIGHUP.
pub struct Settings {
    pub config_path: PathBuf,
    pub config: Config,
    /// Off for a daemon run inside a test, which stops it with
    /// [`Daemon::stop`] instead.
    pub handle_signals: bool,
}

/// A started daemon.
pub struct Daemon {
    shutdown: Shutdown,
    signals: Option<StopSignals>,
    stop_request: watch::Sender<bool>,
    registry: Registry,
    reloader: Arc<Reloader>,
    engine: Arc<Engine>,
    frontends: Vec<frontend::Running>,
    attacher: Arc<frontend::attach::Attacher>,
    control: Option<(tokio::task::JoinHandle<()>, PathBuf, bool)>,
    metrics: Option<std::thread::JoinHandle<()>>,
    watchdog: Option<tokio::task::JoinHandle<()>>,
    monitor: service::keys::Monitor,
    summary: String,
    /// The lock on `state_dir` (see `lock_state_dir`), held while running.
    _state_lock: std::fs::File,
}

impl Daemon {
    /// Starts serving; runs inside a multi-threaded tokio runtime.
    pub async fn start(settings: Settings) -> Result<Daemon, DaemonError> {
        let Settings {
            config_path,
            config,
            handle_signals,
        } = settings;
        if config.legacy_server.is_some() {
            tracing::warn!(
                config = %config_path.display(),
                "the [server] section is deprecated: its keys now live in [daemon] and [nbd]; `hostcryptd --check` prints the migrated form"
            );
        }
        // Providers, volumes and the engine block (key servers, disks,
        // blocking HTTP clients): off the async workers.
        let opened = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || open(&config))
                .await
                .map_err(|e| DaemonError::Startup(e.to_string()))??
        };
        let Opened {
            providers,
            gate,
            audit,
            registry,
            failed,
            engine,
            mut activated,
            state_lock,
        } = opened;
        // Signal handlers before any socket exists: whoever sees a socket
        // may send SIGTERM at once, and it must drain, not kill, the daemon.
        let signals = if handle_signals {
            Some(StopSignals::install().map_err(DaemonError::Signals)?)
        } else {
            None
        };
        // The control socket is bound before the NBD listeners: whoever
        // sees NBD accepting (a script, a test, an orchestrator) can use the
        // control socket at once, never a stale file from a killed run.
        let gid = resolve_group("control_group", config.daemon.control_group.as_deref())?;
        let read_gid = resolve_group(
            "control_read_group",
            config.daemon.control_read_group.as_deref(),
        )?;
        let control_socket = match (activated.control.take(), &config.daemon.control) {
            (Some((socket, path)), _) => {
                let listener = socket
                    .set_nonblocking(true)
                    .and_then(|()| tokio::net::UnixListener::from_std(socket))
                    .map_err(|source| DaemonError::Control {
                        what: format!("control socket {} (from systemd)", path.display()),
                        source,
                    })?;
                Some((listener, path, false))
            }
            (None, Some(path)) => Some((
                control::server::bind(path, gid, read_gid.is_some()).map_err(|source| {
                    DaemonError::Control {
                        what: format!("control socket {}", path.display()),
                        source,
                    }
                })?,
                path.clone(),
                true,
            )),
            (None, None) => None,
        };
        // vhost-user sockets first: once an NBD listener answers (what
        // clients and tests wait for), every socket is in place.
        let vhost = vhost_user::frontend(&config)?;
        let listeners = nbd::listeners(&config, &mut activated).await?;
        let mut listener_status = nbd::log_listeners(&config, &listeners);
        for socket in vhost.describe() {
            tracing::info!(listener = socket, "listening");
            listener_status.push(control::protocol::ListenerStatus {
                address: socket,
                tls: crate::frontend::tls::TlsMode::Off,
            });
        }
        let summary = format!(
            "serving {} volume(s) on {}",
            registry.iter().count(),
            listeners
                .iter()
                .map(|l| l.describe())
                .chain(vhost.describe())
                .collect::<Vec<_>>()
                .join(", ")
        );
        // One shutdown: every task and thread below holds its signal.
        let shutdown = Shutdown::new();
        let reloader = Arc::new(Reloader::new(service::reload::Started {
            config_path,
            config: config.clone(),
            providers,
            registry: registry.clone(),
            gate: gate.clone(),
            audit,
            failed,
            engine: engine.clone(),
            sockets: Some(vhost_user::reload_hook(vhost.sockets())),
        }));
        let retry = reloader.clone();
        let checked = registry.clone();
        let monitor =
            service::keys::spawn_monitor(registry.clone(), shutdown.signal(), move || {
                service::registry::check_backings(&checked);
                retry.retry_waiting()
            })
            .map_err(DaemonError::KeyChecks)?;
        // Volumes attached as kernel block devices: served like NBD
        // connections, through the same gate.
        let attacher = frontend::attach::Attacher::new(
            registry.exports().clone(),
            frontend::attach::Plumbing {
                server: Arc::new(frontend::nbd::Server {
                    exports: registry.exports().clone(),
                    gate: gate.clone(),
                    engine: engine.clone(),
                }),
                runtime: tokio::runtime::Handle::current(),
                shutdown: shutdown.signal().watch(),
                connections: std::thread::available_parallelism().map_or(1, |n| n.get().min(16)),
                dead_conn_timeout: ATTACH_DEAD_CONN_TIMEOUT,
                dev: "/dev".into(),
                sys_block: "/sys/block".into(),
            },
            frontend::attach::UblkPlumbing::new(
                registry.exports().clone(),
                std::thread::available_parallelism().map_or(1, |n| n.get()),
                "/dev".into(),
                "/sys/block".into(),
            ),
            "/dev/hostcrypt".into(),
        );
        let control = control_socket.map(|(listener, path, owned)| {
            tracing::info!(control = %path.display(), "control socket ready");
            let state = Arc::new(control::server::ControlState {
                started: Instant::now(),
                engine: engine.name(),
                registry: registry.clone(),
                reloader: reloader.clone(),
                allowed_gid: gid,
                read_gid,
                gate: gate.clone(),
                listeners: listener_status,
                attacher: attacher.clone(),
            });
            let task = tokio::spawn(control::server::run(
                listener,
                state,
                shutdown.signal().watch(),
            ));
            (task, path, owned)
        });
        let metrics = match config.daemon.metrics {
            Some(addr) => {
                let collector = control::metrics::DaemonCollector {
                    registry: registry.clone(),
                    gate: gate.clone(),
                    engine: engine.name(),
                    started: Instant::now(),
                };
                let thread = control::metrics::spawn(addr, collector, shutdown.signal())
                    .map_err(|source| DaemonError::Metrics { addr, source })?;
                tracing::info!(%addr, "metrics endpoint ready (GET /metrics)");
                Some(thread)
            }
            None => None,
        };
        let mut configured: Vec<Box<dyn Frontend>> =
            vec![Box::new(frontend::nbd::NbdFrontend { listeners, gate })];
        // Even without sockets: a reload may add one.
        configured.push(Box::new(vhost));
        attacher.set_configured(
            config
                .volumes
                .iter()
                .filter_map(|v| Some((v.name.get_ref().clone(), v.attach_via()?.ok()?)))
                .collect(),
        );
        configured.push(Box::new(frontend::attach::AttachFrontend(attacher.clone())));
        let frontends = configured
            .into_iter()
            .map(|f| {
                f.start(frontend::Context {
                    exports: registry.exports().clone(),
                    engine: engine.clone(),
                    shutdown: shutdown.signal().watch(),
                })
            })
            .collect();
        service::systemd::ready(&summary);
        let watchdog = service::systemd::watchdog_interval().map(|every| {
            let mut stop = shutdown.signal().watch();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tokio::select! {
                        _ = tick.tick() => service::systemd::watchdog(),
                        _ = stop.changed() => return,
                    }
                }
            })
        });
        let (stop_request, _) = watch::channel(false);
        Ok(Daemon {
            shutdown,
            signals,
            stop_request,
            registry,
            reloader,
            engine,
            frontends,
            attacher,
            control,
            metrics,
            watchdog,
            monitor,
            summary,
            _state_lock: state_lock,
        })
    }

    /// "serving N volume(s) on ...", as told to systemd.
    pub fn summary(&self) -> &str {
        &self.summary
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn reloader(&self) -> &Arc<Reloader> {
        &self.reloader
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Asks [`Daemon::wait_for_stop`] to return, as SIGTERM does.
    pub fn stop(&self) {
        self.stop_request.send_replace(true);
    }

    /// Waits for SIGTERM, SIGINT or [`Daemon::stop`]; SIGHUP reloads the
    /// config (like `hostcrypt reload`) and keeps waiting.
    pub async fn wait_for_stop(&mut self) {
        let mut requested = self.stop_request.subscribe();
        match self.signals.as_mut() {
            Some(signals) => signals.wait(&self.reloader, &mut requested).await,
            None => {
                let _ = requested.wait_for(|stop| *stop).await;
            }
        }
    }

    /// Stops in order: no volume joins any more, frontends close their
    /// listeners and drain their connections, re-encryptions stop between
    /// windows, every volume is flushed (and a remote one's owner record
    /// released), then the control socket, the watchdog, metrics and key
    /// checks end.
    pub async fn drain(self) -> Result<(), DaemonError> {
        tracing::info!("stopping: draining in-flight requests");
        service::systemd::stopping();
        // While the volumes still serve: attached devices that should not
        // outlive the daemon are flushed and detached.
        let attacher = self.attacher.clone();
        let _ = tokio::task::spawn_blocking(move || attacher.before_stop()).await;
        self.shutdown.trigger();
        // No volume joins the registry from here on: one still opening
        // is flushed and released by whoever opened it (`Reloader`).
        let reloader = self.reloader.clone();
        let _ = tokio::task::spawn_blocking(move || reloader.begin_stop()).await;
        for running in self.frontends {
            running.stopped().await;
        }
        // Re-encryptions stop between windows (the header records where)
        // before the flush, which releases remote owner records last: a
        // released record means this daemon writes no more.
        let registry = self.registry.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for export in registry.iter() {
                if let Some(keys) = &export.keys {
                    keys.stop_reencrypt();
                }
            }
        })
        .await;
        service::flush_all(&self.registry).await;
        if let Some((control, path, owned)) = self.control {
            let _ = control.await;
            if owned {
                let _ = std::fs::remove_file(path);
            }
        }
        if let Some(watchdog) = self.watchdog {
            let _ = watchdog.await;
        }
        if let Some(metrics) = self.metrics {
            let _ = tokio::task::spawn_blocking(move || metrics.join()).await;
        }
        // A check in progress finishes first (bounded by the provider's timeouts).
        let monitor = self.monitor;
        let _ = tokio::task::spawn_blocking(move || monitor.join()).await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// What start-up opens before anything listens.
struct Opened {
    providers: std::collections::BTreeMap<String, Arc<dyn crate::kek::KeyProvider>>,
    gate: Arc<crate::frontend::nbd::gate::Gate>,
    audit: crate::kek::audit::AuditLog,
    registry: Registry,
    failed: Vec<(String, ServiceError)>,
    engine: Arc<Engine>,
    activated: service::systemd::ActivatedSockets,
    state_lock: std::fs::File,
}

/// One daemon per state directory: its records and its identity
/// (`volume/claim.rs`) would otherwise be shared by two daemons, and a
/// remote backing's owner record could not tell them apart.
fn lock_state_dir(dir: &std::path::Path) -> Result<std::fs::File, DaemonError> {
    let failed = |source| DaemonError::StateDir {
        path: dir.to_owned(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(failed)?;
    crate::io::open_claimed(&dir.join("daemon.lock"), true).map_err(failed)
}

fn open(config: &Config) -> Result<Opened, DaemonError> {
    raise_fd_limit();
    let providers = service::open_providers(config)?;
    let gate = nbd::open_gate(config)?;
    let audit = service::open_audit(config)?;
    // A second daemon on this config stops before it opens anything: a
    // remote backing has no lock to stop it (local ones do). Sockets
    // that systemd passes answer because systemd holds them.
    let activated_by_systemd = std::env::var_os("LISTEN_FDS").is_some();
    for socket in [&config.daemon.control, &config.nbd.unix]
        .into_iter()
        .flatten()
        .filter(|_| !activated_by_systemd)
    {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Err(DaemonError::AlreadyServed(socket.clone()));
        }
    }
    let state_lock = lock_state_dir(&config.daemon.state_dir)?;
    let engine = crate::io::engine::start(config.daemon.io_engine, config.daemon.ring_idle_poll)
        .map_err(DaemonError::Engine)?;
    let (registry, failed) = service::open_volumes(config, &providers, &audit, &engine);
    tracing::info!(
        engine = engine.name(),
        ring_idle_poll = ?config.daemon.ring_idle_poll,
        "I/O engine ready"
    );
    let activated = service::systemd::activated_sockets(config.daemon.control.as_deref())
        .map_err(DaemonError::Activation)?;
    if !activated.is_empty() {
        tracing::info!(
            nbd = activated.unix.len() + activated.tcp.len(),
            control = activated.control.is_some(),
            "socket activation: using the sockets systemd passed"
        );
    }
    Ok(Opened {
        providers,
        gate,
        audit,
        registry,
        failed,
        engine,
        activated,
        state_lock,
    })
}

fn resolve_group(key: &str, group: Option<&str>) -> Result<Option<u32>, DaemonError> {
    group
        .map(|g| {
            control::server::resolve_group(g).map_err(|source| DaemonError::Control {
                what: format!("{key} {g:?}"),
                source,
            })
        })
        .transpose()
}

/// Raises the soft open-file limit to the hard one: every connection is a
/// descriptor, and `max_connections` (1024 by default) should be what
/// limits them, not a soft limit of 1024 set for select()-era programs.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass, which
    // lives on this stack frame for the duration of each call.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::debug!("could not raise the open-file limit");
            }
        }
    }
}
