//! `hostcrypt`: the operator CLI. Formats volumes, creates local KEKs and
//! inspects headers; it reads the same config file as the daemon and uses
//! the daemon's library, so both agree on formats and errors.
//!
//! This file parses arguments and dispatches; each command group lives in
//! `commands/` (one module each), the control-socket client in
//! `control.rs`. Commands that act on a running daemon (`status`,
//! `check-key`, `rotate-kek`, `rekey`, `reload`, `reencrypt`) talk to its
//! control socket (`control` in `[daemon]`); the rest work on files.
//!
//! Exit codes, for scripts: 0 success; 1 any error (the message says what
//! to do next); 2 usage error (from clap); 3 the daemon cannot be reached;
//! 4 a key check failed (a volume's key is lost).

mod commands;
mod control;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hostcryptd::config::ByteSize;
use hostcryptd::control::client::ControlClientError;
use hostcryptd::control::ControlRequest;
use hostcryptd::kek::LocalKek;
use hostcryptd::volume::{Layer, ReencryptAction};

#[derive(Parser, Debug)]
#[command(
    name = "hostcrypt",
    version,
    about = "Operate hostcrypt encrypted volumes"
)]
struct Cli {
    /// Daemon configuration file.
    #[arg(
        long,
        short,
        global = true,
        default_value = "/etc/hostcrypt/hostcryptd.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Key-encryption-key helpers.
    Kek {
        #[command(subcommand)]
        command: KekCommand,
    },
    /// Format the backing of a cache volume named in the config.
    Create {
        /// Volume name (the `name` of a [[volume]] in the config).
        volume: String,
        /// Logical size, e.g. 8G; defaults to the config's `size`.
        #[arg(long)]
        size: Option<ByteSize>,
        /// Encryption sector size; defaults to the config's `sector_size`.
        #[arg(long, value_parser = ["512", "4096"])]
        sector_size: Option<String>,
        /// Overwrite an existing volume or non-empty backing (destroys its data).
        #[arg(long)]
        force: bool,
    },
    /// Daemon and per-volume state, from the running daemon.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Verify now that the KEK still unwraps each volume's DEK (exit 4 if not).
    CheckKey {
        /// Only this volume.
        volume: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Rewrap a volume's DEK under the newest (or given) KEK version, online.
    RotateKek {
        volume: String,
        /// Target KEK version (e.g. 3 for vault:v3); default the newest.
        #[arg(long)]
        to_version: Option<String>,
        /// Act on the inner layer of a double-encrypted volume (kek_inner).
        #[arg(long)]
        inner: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Move a volume's DEK under another configured KEK, online.
    Rekey {
        volume: String,
        /// Name of the target [kek.NAME] table.
        #[arg(long)]
        kek: String,
        /// Move the inner layer's DEK of a double-encrypted volume.
        #[arg(long)]
        inner: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-encrypt a volume's data under a new DEK, online; shows progress
    /// until done (a bar on a terminal, plain lines otherwise).
    Reencrypt {
        volume: String,
        /// Limit to this many MB/s (0 = unlimited) so the workload is not starved.
        #[arg(long)]
        rate: Option<f64>,
        /// Only show where it stands.
        #[arg(long, conflicts_with_all = ["pause", "resume"])]
        status: bool,
        /// Pause it (it stays paused until --resume; a restart resumes it).
        #[arg(long, conflicts_with = "resume")]
        pause: bool,
        /// Resume a paused or failed re-encryption.
        #[arg(long)]
        resume: bool,
        /// Return at once instead of following the progress.
        #[arg(long)]
        no_wait: bool,
        /// Print the status as JSON (and do not follow the progress).
        #[arg(long)]
        json: bool,
    },
    /// Re-read the config in the running daemon: add and remove volumes,
    /// leave the others serving (same as SIGHUP).
    Reload {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The volumes the running daemon serves.
    Volumes {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the audit log (`audit_log` in [daemon]).
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Write man pages (hostcrypt.1 and one per command) into DIR.
    Man { dir: PathBuf },
    /// Back up or restore a volume's header (wrapped keys only).
    Header {
        #[command(subcommand)]
        command: HeaderCommand,
    },
    /// Crypto-erase a volume: overwrite both header copies and the journal.
    /// Its data becomes unreadable unless you hold a header backup.
    Erase {
        volume: String,
        /// Confirm: this cannot be undone without a header backup.
        #[arg(long)]
        yes: bool,
        /// Erase a remote backing whose owner record says another daemon
        /// serves it. Only when that daemon is gone for good (for example
        /// its key is lost and it can never release the record).
        #[arg(long)]
        take_over: bool,
    },
    /// Show a volume header (never a secret).
    Inspect {
        /// Backing file or block device.
        backing: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// The last lines of the audit log, optionally following it.
    Tail {
        /// How many lines.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
        /// Keep printing lines as they are appended.
        #[arg(short, long)]
        follow: bool,
        /// Print the raw JSON lines.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum HeaderCommand {
    /// Save the header of a configured volume to FILE (mode 0600, never
    /// overwritten; it holds only wrapped keys).
    Backup { volume: String, file: PathBuf },
    /// Write a header backup to BACKING, after checking that a configured
    /// KEK unwraps its keys.
    Restore {
        backing: PathBuf,
        file: PathBuf,
        /// Restore onto a different volume or DEK generation anyway.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
enum KekCommand {
    /// Create a local KEK file (32 random bytes, mode 0600).
    InitLocal { path: PathBuf },
}

/// An error with a documented exit code.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Exit {
    #[error("{0}")]
    Unreachable(ControlClientError),
    #[error("{0}")]
    KeyLost(String),
}

fn main() -> ExitCode {
    // Die quietly on a closed pipe (`hostcrypt audit tail | head`) like
    // other Unix tools, instead of panicking in println!.
    // SAFETY: called first thing, before any thread exists; SIG_DFL is a
    // valid disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // The CLI unwraps and wraps DEKs too (create, rekey, header restore).
    if let Err(e) = hostcryptd::hardening::keep_keys_out_of_core_dumps() {
        eprintln!("hostcrypt: cannot keep keys out of core dumps: {e}");
        return ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // The CLI prints its own messages; audit events go to the
                // audit log, not to the operator's terminal as log lines.
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new("warn,hostcryptd::audit=off")
                }),
        )
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hostcrypt: {}", hostcryptd::report::error_chain(e.as_ref()));
            match e.downcast_ref::<Exit>() {
                Some(Exit::Unreachable(_)) => ExitCode::from(3),
                Some(Exit::KeyLost(_)) => ExitCode::from(4),
                None => ExitCode::FAILURE,
            }
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Kek {
            command: KekCommand::InitLocal { path },
        } => {
            let kek = LocalKek::init(&path)?;
            println!(
                "created local KEK {} (key id {})",
                path.display(),
                kek.key_id()
            );
            Ok(())
        }
        Command::Create {
            volume,
            size,
            sector_size,
            force,
        } => commands::create::create(&cli.config, &volume, size, sector_size, force),
        Command::Inspect { backing, json } => commands::inspect::inspect(&backing, json),
        Command::Header {
            command: HeaderCommand::Backup { volume, file },
        } => commands::header::backup(&cli.config, &volume, &file),
        Command::Header {
            command:
                HeaderCommand::Restore {
                    backing,
                    file,
                    force,
                },
        } => commands::header::restore(&cli.config, &backing, &file, force),
        Command::Erase {
            volume,
            yes,
            take_over,
        } => commands::header::erase(&cli.config, &volume, yes, take_over),
        Command::Volumes { json } => commands::status::volumes(&cli.config, json),
        Command::Reload { json } => commands::reload::reload(&cli.config, json),
        Command::Reencrypt {
            volume,
            rate,
            status,
            pause,
            resume,
            no_wait,
            json,
        } => {
            let action = if status {
                ReencryptAction::Status
            } else if pause {
                ReencryptAction::Pause
            } else if resume {
                ReencryptAction::Resume
            } else {
                ReencryptAction::Start
            };
            let follow = matches!(action, ReencryptAction::Start | ReencryptAction::Resume)
                && !no_wait
                && !json;
            commands::reencrypt::reencrypt(&cli.config, volume, action, rate, follow, json)
        }
        Command::Audit {
            command:
                AuditCommand::Tail {
                    lines,
                    follow,
                    json,
                },
        } => commands::audit::audit_tail(&cli.config, lines, follow, json),
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "hostcrypt", &mut std::io::stdout());
            Ok(())
        }
        Command::Man { dir } => man_pages(&dir),
        Command::Status { json } => commands::status::status(&cli.config, json),
        Command::CheckKey { volume, json } => commands::keys::check_key(&cli.config, volume, json),
        Command::RotateKek {
            volume,
            to_version,
            inner,
            json,
        } => commands::keys::key_change(
            &cli.config,
            ControlRequest::RotateKek {
                volume,
                to_version,
                layer: layer(inner),
            },
            "rotated",
            json,
        ),
        Command::Rekey {
            volume,
            kek,
            inner,
            json,
        } => commands::keys::key_change(
            &cli.config,
            ControlRequest::Rekey {
                volume,
                kek,
                layer: layer(inner),
            },
            "rekeyed",
            json,
        ),
    }
}

fn layer(inner: bool) -> Layer {
    if inner {
        Layer::Inner
    } else {
        Layer::Outer
    }
}

/// Writes hostcrypt.1 and hostcrypt-COMMAND.1 pages from the clap definitions.
fn man_pages(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let command = <Cli as clap::CommandFactory>::command();
    clap_mangen::generate_to(command, dir)
        .with_context(|| format!("writing man pages into {}", dir.display()))?;
    println!("man pages written to {}", dir.display());
    Ok(())
}
