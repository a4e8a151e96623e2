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
    /// Attach a volume as a block device on this host and print its
    /// stable name (/dev/hostcrypt/VOLUME), to mount like a dm-crypt
    /// device. It survives a restart of hostcryptd, kill -9 included.
    Attach {
        volume: String,
        /// How the kernel reaches it: ublk (module ublk_drv, Linux 6.0 and
        /// later) or the kernel's NBD client (module nbd). Default: ublk
        /// where the kernel has it, else nbd.
        #[arg(long, value_enum)]
        via: Option<AttachVia>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Detach an attached volume: flushed, then the device goes away.
    /// Refused while it is mounted or held (dm, LVM), unless --force.
    Detach {
        volume: String,
        /// Detach even while mounted: the filesystem then gets I/O errors.
        #[arg(long)]
        force: bool,
    },
    /// The attached volumes: device, stable name, and what uses each.
    Attached {
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
    /// For udev (systemd/60-hostcrypt.rules): the volume and UUID an
    /// attached device's backend identifier names, as KEY=value lines.
    #[command(hide = true)]
    UdevEnv { backend: String },
    /// Write the man pages into DIR: hostcrypt.8, one per command
    /// (hostcrypt-create.8, ...) and the config reference hostcryptd.toml.5.
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
        Command::Attach { volume, via, json } => {
            commands::attach::attach(&cli.config, volume, via.map(AttachVia::into), json)
        }
        Command::Detach { volume, force } => commands::attach::detach(&cli.config, volume, force),
        Command::Attached { json } => commands::attach::attached(&cli.config, json),
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
        Command::UdevEnv { backend } => {
            // Nothing for a device that is not ours: udev imports no keys.
            if let Some((volume, uuid)) =
                hostcryptd::frontend::attach::parse_backend_identifier(&backend)
            {
                println!("HOSTCRYPT_VOLUME={volume}\nHOSTCRYPT_UUID={uuid}");
            }
            Ok(())
        }
        Command::Completions { shell } => {
            use std::io::Write;
            std::io::stdout().write_all(&completions(shell))?;
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

/// Writes the pages of [`pages`] into `dir`.
fn man_pages(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, text) in pages()? {
        let path = dir.join(&name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("man pages written to {}", dir.display());
    Ok(())
}

/// The man pages, by file name: hostcrypt.8 and hostcrypt-COMMAND.8 from
/// the clap definitions (section 8: the commands are root's), and the
/// config reference hostcryptd.toml.5 from the daemon's config types.
fn pages() -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    fn walk(command: clap::Command, out: &mut Vec<(String, Vec<u8>)>) -> std::io::Result<()> {
        for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
            walk(sub.clone(), out)?;
        }
        let man = clap_mangen::Man::new(command)
            .section("8")
            .manual("hostcrypt");
        let mut text = Vec::new();
        man.render(&mut text)?;
        out.push((man.get_filename(), text));
        Ok(())
    }
    let mut command = <Cli as clap::CommandFactory>::command().disable_help_subcommand(true);
    command.build();
    let mut out = Vec::new();
    walk(command, &mut out).context("rendering the man pages")?;
    out.push((
        "hostcryptd.toml.5".into(),
        hostcryptd::config::reference::man_page().into_bytes(),
    ));
    out.sort();
    Ok(out)
}

/// The completion script for `shell`, as `hostcrypt completions` prints it.
fn completions(shell: clap_complete::Shell) -> Vec<u8> {
    let mut command = <Cli as clap::CommandFactory>::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut command, "hostcrypt", &mut out);
    out
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    fn docs() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs")
    }

    use super::*;

    /// The Debian package ships docs/man and docs/completions; they must
    /// be what the CLI generates now (scripts/gen-docs rewrites them).
    #[test]
    fn committed_man_pages_and_completions_match_the_cli() {
        let fresh = pages().unwrap();
        let mut committed: Vec<String> = std::fs::read_dir(docs().join("man"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("hostcrypt-") || n == "hostcrypt.8")
                    .collect()
            })
            .unwrap_or_default();
        committed.sort();
        let generated: Vec<String> = fresh
            .iter()
            .map(|(n, _)| n.clone())
            .filter(|n| n.starts_with("hostcrypt-") || n == "hostcrypt.8")
            .collect();
        assert_eq!(
            committed, generated,
            "docs/man is stale: run scripts/gen-docs"
        );
        for (name, text) in &fresh {
            let on_disk = std::fs::read(docs().join("man").join(name)).unwrap_or_default();
            assert!(
                &on_disk == text,
                "docs/man/{name} is stale: run scripts/gen-docs"
            );
        }
        for (shell, file) in [
            (clap_complete::Shell::Bash, "hostcrypt.bash"),
            (clap_complete::Shell::Zsh, "_hostcrypt"),
            (clap_complete::Shell::Fish, "hostcrypt.fish"),
        ] {
            let on_disk = std::fs::read(docs().join("completions").join(file)).unwrap_or_default();
            assert!(
                on_disk == completions(shell),
                "docs/completions/{file} is stale: run scripts/gen-docs"
            );
        }
    }
}

/// `--via` for `attach`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum AttachVia {
    Nbd,
    Ublk,
}

impl From<AttachVia> for hostcryptd::frontend::attach::Via {
    fn from(via: AttachVia) -> Self {
        match via {
            AttachVia::Nbd => hostcryptd::frontend::attach::Via::Nbd,
            AttachVia::Ublk => hostcryptd::frontend::attach::Via::Ublk,
        }
    }
}
