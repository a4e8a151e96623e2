//! `hostcryptd`: serve encrypted volumes over NBD.
//!
//! Without `--config` it runs the embedded demo (local KEK, sparse 1 GiB
//! volume, Unix socket under ./hostcrypt-demo). SIGTERM/SIGINT drain
//! in-flight requests, flush and exit 0.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use hostcryptd::config::Config;
use hostcryptd::{control, service};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser, Debug)]
#[command(
    name = "hostcryptd",
    version,
    about = "Encryption at host: encrypted volumes served over NBD"
)]
struct Args {
    /// Configuration file (TOML). Without it, the embedded demo set-up is used.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Validate the configuration, the TLS credentials, and that every
    /// configured KEK wraps and unwraps a key; then exit.
    #[arg(long)]
    check: bool,
    /// With --check: validate the configuration and local files only,
    /// without contacting key providers.
    #[arg(long, requires = "check")]
    offline: bool,
    /// Directory for the demo set-up (used when --config is absent).
    #[arg(long, default_value = "hostcrypt-demo")]
    demo_dir: PathBuf,
    /// Log filter, e.g. `info`, `debug`, `hostcryptd=trace` (overrides RUST_LOG).
    #[arg(long)]
    log: Option<String>,
}

fn main() -> std::process::ExitCode {
    // Before any key exists: a crash must not write one into a core file.
    if let Err(e) = hostcryptd::hardening::keep_keys_out_of_core_dumps() {
        eprintln!("hostcryptd: cannot keep keys out of core dumps: {e}");
        return std::process::ExitCode::FAILURE;
    }
    let args = Args::parse();
    init_logging(args.log.as_deref());
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let report = hostcryptd::report::error_chain(e.as_ref());
            tracing::error!("{report}");
            eprintln!("hostcryptd: {report}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Human format on a terminal; under systemd (JOURNAL_STREAM set) the
/// native journal protocol, so each line keeps its priority and fields;
/// otherwise plain lines without timestamps (the supervisor stamps them).
fn init_logging(filter: Option<&str>) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::EnvFilter;
    let filter = match filter {
        Some(f) => EnvFilter::new(f),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journald) = tracing_journald::layer() {
            tracing_subscriber::registry()
                .with(filter)
                .with(journald.with_syslog_identifier("hostcryptd".into()))
                .init();
            return;
        }
    }
    let terminal = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(terminal);
    if terminal {
        builder.init();
    } else {
        builder.without_time().init();
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let demo = args.config.is_none();
    let config_path = match args.config {
        Some(p) => p,
        None => service::demo::prepare(&args.demo_dir).context("preparing the demo set-up")?,
    };
    let config = Config::load(&config_path)?;
    if args.check {
        if let Some(tls) = service::load_tls(&config)? {
            let info = &tls.info;
            println!(
                "TLS ({}): server certificate {:?} valid until {}{}{}",
                config.server.tls,
                info.server_subject,
                info.server_not_after,
                match &info.ca_subject {
                    Some(ca) => format!(", signed by CA {ca:?}"),
                    None => String::new(),
                },
                match info.crl_revoked {
                    Some(n) => format!(", CRL revokes {n}"),
                    None => String::new(),
                }
            );
        }
        // Allow lists were checked with the config (Config::load).
        if !args.offline {
            let providers = service::open_providers(&config)?;
            let mut failed = Vec::new();
            for (name, provider) in &providers {
                match service::prove_provider(provider.as_ref()) {
                    Ok(kek) => println!("KEK {name}: OK, wraps and unwraps ({kek})"),
                    Err(e) => {
                        println!("KEK {name}: FAILED: {e}");
                        failed.push(name.clone());
                    }
                }
            }
            if !failed.is_empty() {
                anyhow::bail!(
                    "KEK(s) {} cannot wrap and unwrap a key (see above); --check --offline validates the config alone",
                    failed.join(", ")
                );
            }
        }
        println!(
            "{}: OK ({} volume(s))",
            config_path.display(),
            config.volumes.len()
        );
        return Ok(());
    }
    raise_fd_limit();
    let providers = service::open_providers(&config)?;
    let gate = service::open_gate(&config)?;
    let audit = service::open_audit(&config)?;
    // A second daemon on this config stops before it opens anything: a
    // remote backing has no lock to stop it (local ones do). Sockets that
    // systemd passes answer because systemd holds them, not a daemon.
    let activated_by_systemd = std::env::var_os("LISTEN_FDS").is_some();
    for socket in [&config.server.control, &config.server.unix]
        .into_iter()
        .flatten()
        .filter(|_| !activated_by_systemd)
    {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            anyhow::bail!(
                "{} answers: another hostcryptd serves this config; stop it first",
                socket.display()
            );
        }
    }
    let (registry, failed) = service::open_volumes(&config, &providers, &audit);
    let engine = hostcryptd::io::engine::init(
        config.server.io_engine,
        config.server.ring_idle_poll,
    )
    .context(
        "starting the io_uring engine (set io_engine = \"threads\" where io_uring is not allowed)",
    )?;
    tracing::info!(
        engine = engine.name(),
        ring_idle_poll = ?config.server.ring_idle_poll,
        "I/O engine ready"
    );
    let mut activated = service::systemd::activated_sockets(config.server.control.as_deref())
        .context("reading the sockets passed by systemd (LISTEN_FDS)")?;
    if !activated.is_empty() {
        tracing::info!(
            nbd = activated.unix.len() + activated.tcp.len(),
            control = activated.control.is_some(),
            "socket activation: using the sockets systemd passed"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        // Signal handlers before any socket exists: whoever sees a socket
        // may send SIGTERM at once, and it must drain, not kill, the daemon.
        let signals = StopSignals::install()?;
        // The control socket is bound before the NBD listeners: whoever
        // sees NBD accepting (a script, a test, an orchestrator) can use
        // the control socket at once, never a stale file from a killed run.
        let gid = match &config.server.control_group {
            Some(g) => Some(
                control::server::resolve_group(g)
                    .with_context(|| format!("control_group {g:?}"))?,
            ),
            None => None,
        };
        let read_gid = match &config.server.control_read_group {
            Some(g) => Some(
                control::server::resolve_group(g)
                    .with_context(|| format!("control_read_group {g:?}"))?,
            ),
            None => None,
        };
        let control_socket = match (activated.control.take(), &config.server.control) {
            (Some((socket, path)), _) => {
                socket.set_nonblocking(true)?;
                Some((tokio::net::UnixListener::from_std(socket)?, path, false))
            }
            (None, Some(path)) => Some((
                control::server::bind(path, gid, read_gid.is_some())
                    .with_context(|| format!("control socket {}", path.display()))?,
                path.clone(),
                true,
            )),
            (None, None) => None,
        };
        let listeners = if activated.unix.is_empty() && activated.tcp.is_empty() {
            service::bind(&config).await?
        } else {
            let mut listeners = Vec::new();
            for (socket, path) in std::mem::take(&mut activated.unix) {
                listeners.push(service::Listener::from_std_unix(socket, path)?);
            }
            for socket in std::mem::take(&mut activated.tcp) {
                service::check_activated_tcp(&config, &socket)?;
                listeners.push(service::Listener::from_std_tcp(socket)?);
            }
            listeners
        };
        for l in &listeners {
            let tls = if l.is_tcp() {
                config.server.tls.to_string()
            } else {
                "unix (SO_PEERCRED)".into()
            };
            tracing::info!(listener = l.describe(), tls, "listening");
        }
        let listener_status: Vec<_> = listeners
            .iter()
            .map(|l| control::protocol::ListenerStatus {
                address: l.describe(),
                tls: if l.is_tcp() {
                    config.server.tls
                } else {
                    hostcryptd::nbd::tls::TlsMode::Off
                },
            })
            .collect();
        if demo {
            print_demo_help(&config);
        }
        // One shutdown: every task and thread below holds its signal.
        let shutdown = service::shutdown::Shutdown::new();
        let reloader = std::sync::Arc::new(service::reload::Reloader::new(
            config_path.clone(),
            config.clone(),
            providers,
            registry.clone(),
            gate.clone(),
            audit.clone(),
            failed,
        ));
        let retry = reloader.clone();
        let checked = registry.clone();
        let monitor =
            service::keys::spawn_monitor(registry.clone(), shutdown.signal(), move || {
                service::registry::check_backings(&checked);
                retry.retry_waiting()
            })
            .context("starting the key-check thread")?;
        let control = match control_socket {
            Some((listener, path, owned)) => {
                tracing::info!(control = %path.display(), "control socket ready");
                let state = std::sync::Arc::new(control::server::ControlState {
                    started: std::time::Instant::now(),
                    engine: engine.name(),
                    registry: registry.clone(),
                    reloader: reloader.clone(),
                    allowed_gid: gid,
                    read_gid,
                    gate: gate.clone(),
                    listeners: listener_status,
                });
                let task = tokio::spawn(control::server::run(
                    listener,
                    state,
                    shutdown.signal().watch(),
                ));
                Some((task, path, owned))
            }
            None => None,
        };
        let metrics = match config.server.metrics {
            Some(addr) => {
                let collector = control::metrics::DaemonCollector {
                    registry: registry.clone(),
                    gate: gate.clone(),
                    engine: engine.name(),
                    started: std::time::Instant::now(),
                };
                let thread = control::metrics::spawn(addr, collector, shutdown.signal())
                    .with_context(|| format!("metrics endpoint {addr}"))?;
                tracing::info!(%addr, "metrics endpoint ready (GET /metrics)");
                Some(thread)
            }
            None => None,
        };
        let summary = format!(
            "serving {} volume(s) on {}",
            registry.iter().count(),
            listeners
                .iter()
                .map(|l| l.describe())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let registry_for_shutdown = registry.clone();
        let server = tokio::spawn(service::serve(
            listeners,
            registry,
            gate,
            shutdown.signal().watch(),
        ));
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
        wait_for_stop_signal(signals, reloader).await?;
        // The stop order: NBD listeners close and connections drain, then
        // re-encryptions stop between windows, then the control socket,
        // the watchdog, metrics and key checks end.
        tracing::info!("stopping: draining in-flight requests");
        service::systemd::stopping();
        shutdown.trigger();
        let registry_at_stop = registry_for_shutdown.clone();
        server.await.context("server task")?;
        // Re-encryptions stop between windows; the header records where.
        let _ = tokio::task::spawn_blocking(move || {
            for export in registry_at_stop.iter() {
                if let Some(keys) = &export.keys {
                    keys.stop_reencrypt();
                }
            }
        })
        .await;
        if let Some((control, path, owned)) = control {
            let _ = control.await;
            if owned {
                let _ = std::fs::remove_file(path);
            }
        }
        if let Some(watchdog) = watchdog {
            let _ = watchdog.await;
        }
        if let Some(metrics) = metrics {
            let _ = tokio::task::spawn_blocking(move || metrics.join()).await;
        }
        // A check in progress finishes first (bounded by the provider's timeouts).
        let _ = tokio::task::spawn_blocking(move || monitor.join()).await;
        tracing::info!("stopped");
        Ok(())
    })
}

/// Waits for SIGTERM/SIGINT; SIGHUP reloads the config (like `hostcrypt
/// reload`) and keeps waiting.
/// SIGTERM, SIGINT and SIGHUP, caught from the moment they are installed.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<Self> {
        Ok(StopSignals {
            term: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("installing SIGHUP handler")?,
        })
    }
}

async fn wait_for_stop_signal(
    signals: StopSignals,
    reloader: std::sync::Arc<service::reload::Reloader>,
) -> anyhow::Result<()> {
    let StopSignals {
        mut term,
        mut int,
        mut hup,
    } = signals;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the config");
                service::systemd::reloading();
                let reloader = reloader.clone();
                match tokio::task::spawn_blocking(move || reloader.reload()).await {
                    Ok(Ok(report)) => service::systemd::status(&format!(
                        "reloaded: {} added, {} removed, {} not applied",
                        report.added.len(),
                        report.removed.len(),
                        report.not_applied.len()
                    )),
                    Ok(Err(e)) => {
                        tracing::error!("reload failed, nothing changed: {}", hostcryptd::report::error_chain(&e));
                        service::systemd::status("reload failed; serving the previous config");
                    }
                    Err(e) => tracing::error!("reload task failed: {e}"),
                }
                service::systemd::ready_again();
            }
        }
    }
}

/// Raises the soft open-file limit to the hard one: every NBD connection
/// is a descriptor, and `max_connections` (1024 by default) should be what
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

fn print_demo_help(config: &Config) {
    let Some(sock) = service::unix_socket(config) else {
        return;
    };
    let sock = sock.display();
    let name = service::demo::DEMO_VOLUME;
    println!(
        "\nhostcryptd is serving the encrypted demo volume {name:?} on {sock}\n\
         Try, from another terminal:\n  \
         nbdinfo 'nbd+unix:///{name}?socket={sock}'\n  \
         qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' 'nbd+unix:///{name}?socket={sock}'\n\
         Stop with Ctrl-C (or SIGTERM).\n"
    );
}
