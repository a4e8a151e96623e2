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
use hostcryptd::service;
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
    /// Validate the configuration and exit.
    #[arg(long)]
    check: bool,
    /// Directory for the demo set-up (used when --config is absent).
    #[arg(long, default_value = "hostcrypt-demo")]
    demo_dir: PathBuf,
    /// Log filter, e.g. `info`, `debug`, `hostcryptd=trace` (overrides RUST_LOG).
    #[arg(long)]
    log: Option<String>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    init_logging(args.log.as_deref());
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("hostcryptd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging(filter: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = match filter {
        Some(f) => EnvFilter::new(f),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let terminal = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(terminal);
    // Under systemd the journal stamps every line; do not stamp twice.
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
        service::open_providers(&config)?;
        println!(
            "{}: OK ({} volume(s))",
            config_path.display(),
            config.volumes.len()
        );
        return Ok(());
    }
    let exports = service::open_exports(&config)?;
    let engine = hostcryptd::io::engine::init(config.server.io_engine).context(
        "starting the io_uring engine (set io_engine = \"threads\" where io_uring is not allowed)",
    )?;
    tracing::info!(engine = engine.name(), "I/O engine ready");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listeners = service::bind(&config).await?;
        for l in &listeners {
            tracing::info!(listener = l.describe(), "listening");
        }
        if demo {
            print_demo_help(&config);
        }
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let server = tokio::spawn(service::serve(listeners, exports, stop_rx));
        wait_for_stop_signal().await?;
        tracing::info!("stopping: draining in-flight requests");
        let _ = stop_tx.send(true);
        server.await.context("server task")?;
        tracing::info!("stopped");
        Ok(())
    })
}

async fn wait_for_stop_signal() -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => tracing::warn!("SIGHUP: live config reload is not available in this version; restart to apply changes"),
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
