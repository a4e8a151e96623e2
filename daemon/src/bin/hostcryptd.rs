//! `hostcryptd`: serve encrypted volumes. Argument parsing only; the
//! daemon itself is `hostcryptd::daemon::Daemon`.
//!
//! Without `--config` it runs the embedded demo (local KEK, sparse 1 GiB
//! volume, Unix socket under ./hostcrypt-demo). SIGTERM/SIGINT drain
//! in-flight requests, flush and exit 0; SIGHUP reloads the config.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use hostcryptd::config::Config;
use hostcryptd::daemon::{self, Daemon, Settings};
use hostcryptd::service::demo;

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
    daemon::logging::init(args.log.as_deref());
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

fn run(args: Args) -> anyhow::Result<()> {
    let demo = args.config.is_none();
    let config_path = match args.config {
        Some(p) => p,
        None => demo::prepare(&args.demo_dir).context("preparing the demo set-up")?,
    };
    let config = Config::load(&config_path)?;
    if args.check {
        daemon::check::check(&config, &config_path, args.offline, &mut std::io::stdout())?;
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let settings = Settings {
            config_path,
            config: config.clone(),
            handle_signals: true,
        };
        let mut daemon = Daemon::start(settings).await?;
        if demo {
            demo::print_help(&config);
        }
        daemon.wait_for_stop().await;
        daemon.drain().await?;
        Ok(())
    })
}
