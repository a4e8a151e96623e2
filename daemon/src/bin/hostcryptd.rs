//! `hostcryptd`: serve encrypted volumes. Argument parsing only; the
//! daemon itself is `hostcryptd::daemon::Daemon`.
//!
//! Without `--config` it runs the embedded demo (local KEK, sparse 1 GiB
//! volume, Unix socket under ./hostcrypt-demo). SIGTERM/SIGINT drain
//! in-flight requests, flush and exit 0; SIGHUP reloads the config.
//!
//! Two hidden options print the pages built from the sources:
//! `--print-man-page` (hostcryptd(8), from these arguments) and
//! `--print-config-reference man|markdown` (hostcryptd.toml(5) and
//! docs/config.md, `config/reference.rs`); `scripts/gen-docs` commits them.

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
    about = "Encryption at host: encrypted volumes served over NBD",
    long_about = "Encryption at host: encrypted volumes served over NBD.\n\n\
        hostcryptd serves the volumes its configuration file names \
        (hostcryptd.toml(5)) as NBD exports, encrypting every sector with \
        XTS-AES-256 under a data key that a key-encryption key (a local \
        file, OpenBao/Vault, PKCS#11 or Azure Key Vault) wraps. Under \
        systemd it runs as hostcryptd.service (Type=notify) or is started \
        by hostcryptd.socket. SIGTERM and SIGINT drain in-flight requests, \
        flush and exit 0; SIGHUP reloads the configuration like \
        `hostcrypt reload`. Operate it with hostcrypt(8).",
    after_long_help = "Files: /etc/hostcrypt/hostcryptd.toml (the configuration), \
        /var/lib/hostcrypt (volumes and the anti-rollback records by default), \
        /run/hostcrypt (the NBD and control sockets). See also: \
        hostcryptd.toml(5), hostcrypt(8)."
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
    /// Print the configuration reference (hostcryptd.toml(5)) and exit.
    #[arg(long, hide = true, value_enum, value_name = "FORMAT")]
    print_config_reference: Option<ReferenceFormat>,
    /// Print this program's man page, hostcryptd(8), and exit.
    #[arg(long, hide = true)]
    print_man_page: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum ReferenceFormat {
    /// roff, for man.
    Man,
    /// docs/config.md.
    Markdown,
}

/// hostcryptd(8), from the arguments above.
fn man_page() -> anyhow::Result<Vec<u8>> {
    let mut page = Vec::new();
    clap_mangen::Man::new(<Args as clap::CommandFactory>::command())
        .section("8")
        .manual("hostcrypt")
        .render(&mut page)
        .context("rendering the man page")?;
    Ok(page)
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
    use std::io::Write;
    if args.print_man_page {
        std::io::stdout().write_all(&man_page()?)?;
        return Ok(());
    }
    if let Some(format) = args.print_config_reference {
        let text = match format {
            ReferenceFormat::Man => hostcryptd::config::reference::man_page(),
            ReferenceFormat::Markdown => hostcryptd::config::reference::markdown(),
        };
        std::io::stdout().write_all(text.as_bytes())?;
        return Ok(());
    }
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

#[cfg(test)]
mod tests {
    #[test]
    fn the_committed_man_page_matches_the_arguments() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/man/hostcryptd.8");
        let committed = std::fs::read(&path).unwrap_or_default();
        assert!(
            committed == super::man_page().unwrap(),
            "{} differs from hostcryptd's arguments: run scripts/gen-docs",
            path.display()
        );
    }
}
