//! `hostcrypt`: the operator CLI. Formats volumes, creates local KEKs and
//! inspects headers; it reads the same config file as the daemon and uses
//! the daemon's library, so both agree on formats and errors.
//!
//! Commands that act on a running daemon (`status`, `check-key`,
//! `rotate-kek`, `rekey`) talk to its control socket (`control` in
//! `[server]`); the rest work on files directly.
//!
//! Exit codes, for scripts: 0 success; 1 any error (the message says what
//! to do next); 2 usage error (from clap); 3 the daemon cannot be reached;
//! 4 a key check failed (a volume's key is lost).

mod commands;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use hostcryptd::config::{ByteSize, Config};
use hostcryptd::control::client::{self, ClientError};
use hostcryptd::control::protocol::{CheckResult, KeyChange, Status};
use hostcryptd::control::{Request, Response};
use hostcryptd::kek::audit::Event;
use hostcryptd::kek::LocalKek;
use hostcryptd::volume::{
    self, Geometry, Header, HeaderCopies, HeaderError, Layer, ReencryptAction, ReencryptStatus,
    Role,
};

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
    /// Show the audit log (`audit_log` in [server]).
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
    Unreachable(ClientError),
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
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
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
        } => create(&cli.config, &volume, size, sector_size, force),
        Command::Inspect { backing, json } => inspect(&backing, json),
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
        Command::Erase { volume, yes } => commands::header::erase(&cli.config, &volume, yes),
        Command::Volumes { json } => volumes(&cli.config, json),
        Command::Reload { json } => reload(&cli.config, json),
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
            reencrypt(&cli.config, volume, action, rate, follow, json)
        }
        Command::Audit {
            command:
                AuditCommand::Tail {
                    lines,
                    follow,
                    json,
                },
        } => audit_tail(&cli.config, lines, follow, json),
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "hostcrypt", &mut std::io::stdout());
            Ok(())
        }
        Command::Man { dir } => man_pages(&dir),
        Command::Status { json } => status(&cli.config, json),
        Command::CheckKey { volume, json } => check_key(&cli.config, volume, json),
        Command::RotateKek {
            volume,
            to_version,
            inner,
            json,
        } => key_change(
            &cli.config,
            Request::RotateKek {
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
        } => key_change(
            &cli.config,
            Request::Rekey {
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

/// Key operations may wait on a remote provider's retries.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(120);

/// Sends one request to the daemon named by the config's `control`.
pub(crate) fn control(config_path: &Path, request: &Request) -> anyhow::Result<serde_json::Value> {
    let config = Config::load(config_path)?;
    let Some(socket) = &config.server.control else {
        bail!(
            "{} sets no `control` socket in [server]; add e.g. control = \"/run/hostcrypt/control.sock\" and restart hostcryptd",
            config_path.display()
        );
    };
    let response: Response =
        client::call(socket, request, CONTROL_TIMEOUT).map_err(|e| match e {
            e @ ClientError::Connect { .. } => anyhow::Error::new(Exit::Unreachable(e)),
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
    Ok(response.result)
}

fn status(config_path: &Path, json: bool) -> anyhow::Result<()> {
    let result = control(config_path, &Request::Status)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&result)?);
        return Ok(());
    }
    let status: Status = serde_json::from_value(result)?;
    println!(
        "hostcryptd {}, up {}, engine {}",
        status.version,
        humantime::format_duration(Duration::from_secs(status.uptime_secs)),
        status.engine
    );
    for l in &status.listeners {
        let tls = if l.address.starts_with("unix:") {
            "peers identified by SO_PEERCRED".to_string()
        } else {
            format!("tls {}", l.tls)
        };
        println!("  listening on {}  ({tls})", l.address);
    }
    if let Some(tls) = &status.tls {
        println!(
            "  TLS certificate {:?} until {}, from {}; client certificates {}{}",
            tls.server_subject,
            tls.server_not_after,
            tls.dir.display(),
            if tls.verify_peer {
                "required"
            } else {
                "optional"
            },
            tls.crl_revoked
                .map(|n| format!(", CRL revokes {n}"))
                .unwrap_or_default()
        );
    }
    let c = &status.connections;
    println!(
        "  connections: {} open (max {}, {} per peer); refused: {} over a limit, {} without TLS, {} failed TLS, {} bad handshakes",
        c.open,
        c.max,
        c.max_per_peer,
        c.refused_limit,
        c.refused_tls_required,
        c.tls_failures,
        c.handshake_failures
    );
    for v in &status.volumes {
        if let Some(u) = &v.unavailable {
            println!("  {:<16} {:<17} {}", v.name, u.state, u.error);
            continue;
        }
        let key = match &v.key {
            Some(k) => format!(
                "{:<17} kek {} ({} {} v{}){}{}",
                k.state,
                k.kek_name,
                k.kek.provider,
                k.kek.key_id,
                k.kek.key_version,
                k.inner
                    .as_ref()
                    .map(|i| format!(" + inner kek {} v{}", i.kek_name, i.kek.key_version))
                    .unwrap_or_default(),
                k.last_error
                    .as_ref()
                    .map(|e| format!("  last error: {e}"))
                    .unwrap_or_default()
            ),
            None => "serving           ephemeral key".to_string(),
        };
        println!("  {:<16} {:<6} {:>14} bytes  {key}", v.name, v.role, v.size);
        for w in v.key.iter().flat_map(|k| &k.warnings) {
            println!("  {:<16} warning: {w}", "");
        }
        if let Some(r) = &v.reencrypt {
            println!("  {:<16} re-encrypting: {}", "", reencrypt_line(r));
        }
        let allow = match &v.allow {
            Some(list) => format!("allow {}", list.join(", ")),
            None => "allow anyone who can connect".into(),
        };
        println!("  {:<16} {allow}; {} refused", "", v.refused);
        println!(
            "  {:<16} {} connection(s), {} in flight; read {} ops {} bytes, write {} ops {} bytes, {} errors",
            "",
            v.io.connections,
            v.io.in_flight,
            v.io.read_ops,
            v.io.read_bytes,
            v.io.write_ops,
            v.io.write_bytes,
            v.io.errors
        );
    }
    Ok(())
}

fn reencrypt(
    config_path: &Path,
    volume: String,
    action: ReencryptAction,
    rate_mbps: Option<f64>,
    follow: bool,
    json: bool,
) -> anyhow::Result<()> {
    let request = |action| Request::Reencrypt {
        volume: volume.clone(),
        action,
        rate_mbps,
    };
    let mut status: ReencryptStatus =
        serde_json::from_value(control(config_path, &request(action))?)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    if !follow {
        println!("{}", reencrypt_line(&status));
        return Ok(());
    }
    let terminal = std::io::stderr().is_terminal();
    let bar = terminal.then(|| {
        let bar = indicatif::ProgressBar::new(status.size);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(format!("re-encrypting {volume}"));
        bar
    });
    let mut last_line = Instant::now();
    loop {
        match &bar {
            Some(bar) => bar.set_position(status.checkpoint),
            None if last_line.elapsed() >= Duration::from_secs(2) => {
                println!("{}", reencrypt_line(&status));
                last_line = Instant::now();
            }
            None => {}
        }
        match status.state.as_str() {
            "done" | "idle" => break,
            "failed" => {
                if let Some(bar) = &bar {
                    bar.abandon();
                }
                bail!(
                    "re-encryption of {volume} stopped: {}; fix the cause, then `hostcrypt reencrypt {volume} --resume`",
                    status.error.unwrap_or_default()
                );
            }
            "paused" => {
                if let Some(bar) = &bar {
                    bar.abandon_with_message(format!("{volume} paused"));
                }
                println!("{}", reencrypt_line(&status));
                return Ok(());
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(250));
        status = serde_json::from_value(control(config_path, &request(ReencryptAction::Status))?)?;
    }
    if let Some(bar) = &bar {
        bar.finish_with_message(format!("{volume} re-encrypted"));
    }
    println!("{}", reencrypt_line(&status));
    Ok(())
}

fn reencrypt_line(s: &ReencryptStatus) -> String {
    let percent = if s.size > 0 {
        s.checkpoint as f64 * 100.0 / s.size as f64
    } else {
        100.0
    };
    let mut line = format!(
        "{}: {} {:.1}% ({} of {} bytes), DEK generation {}",
        s.volume, s.state, percent, s.checkpoint, s.size, s.generation
    );
    if let Some(t) = s.target_generation {
        line.push_str(&format!(" -> {t}"));
    }
    if s.rate_mbps > 0.0 {
        line.push_str(&format!(", {:.1} MB/s", s.rate_mbps));
    }
    if let Some(limit) = s.rate_limit_mbps {
        line.push_str(&format!(" (limit {limit} MB/s)"));
    }
    if let Some(e) = &s.error {
        line.push_str(&format!(", error: {e}"));
    }
    line
}

fn reload(config_path: &Path, json: bool) -> anyhow::Result<()> {
    let result = control(config_path, &Request::Reload)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&result)?);
        return Ok(());
    }
    let report: hostcryptd::service::reload::ReloadReport = serde_json::from_value(result)?;
    let list = |names: &[String]| {
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    };
    println!("added:     {}", list(&report.added));
    println!("removed:   {}", list(&report.removed));
    println!("unchanged: {}", list(&report.unchanged));
    for note in &report.not_applied {
        println!("not applied: {note}");
    }
    Ok(())
}

fn volumes(config_path: &Path, json: bool) -> anyhow::Result<()> {
    let status: Status = serde_json::from_value(control(config_path, &Request::Status)?)?;
    if json {
        let list: Vec<_> = status
            .volumes
            .iter()
            .map(|v| {
                serde_json::json!({
                    "name": v.name,
                    "role": v.role,
                    "size": v.size,
                    "sector_size": v.sector_size,
                    "state": v.key.as_ref().map_or("serving", |k| k.state.as_str()),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    for v in &status.volumes {
        println!(
            "{}\t{}\t{}\t{}",
            v.name,
            v.role,
            v.size,
            v.key.as_ref().map_or("serving", |k| k.state.as_str())
        );
    }
    Ok(())
}

/// Prints audit lines; follows the file (polling, and reopening it if
/// it is rotated) with `follow`.
fn audit_tail(config_path: &Path, lines: usize, follow: bool, json: bool) -> anyhow::Result<()> {
    use std::io::{BufRead, Seek};
    let config = Config::load(config_path)?;
    let Some(path) = &config.server.audit_log else {
        bail!(
            "{} sets no `audit_log` in [server]; add e.g. audit_log = \"/var/log/hostcrypt/audit.jsonl\"",
            config_path.display()
        );
    };
    let print = |line: &str| {
        if json {
            println!("{line}");
        } else {
            println!("{}", audit_line(line));
        }
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the audit log {}", path.display()))?;
    let all: Vec<&str> = text.lines().collect();
    for line in &all[all.len().saturating_sub(lines)..] {
        print(line);
    }
    if !follow {
        return Ok(());
    }
    let mut file = std::fs::File::open(path)?;
    let mut at = file.seek(std::io::SeekFrom::End(0))?;
    let mut reader = std::io::BufReader::new(file);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? > 0 && line.ends_with('\n') {
            at += line.len() as u64;
            print(line.trim_end());
            continue;
        }
        // Nothing new (or half a line): wait, and reopen after rotation.
        reader.seek(std::io::SeekFrom::Start(at))?;
        std::thread::sleep(Duration::from_millis(250));
        if std::fs::metadata(path).is_ok_and(|m| m.len() < at) {
            reader = std::io::BufReader::new(std::fs::File::open(path)?);
            at = 0;
        }
    }
}

/// One audit line for people: time, volume, operation, outcome, key, error.
fn audit_line(line: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
        return line.to_string();
    };
    let field = |k: &str| v[k].as_str().unwrap_or("").to_string();
    let mut out = format!(
        "{}  {:<12} {:<12} {:<6}",
        field("time"),
        field("volume"),
        field("operation"),
        field("outcome")
    );
    if !field("provider").is_empty() {
        out.push_str(&format!(
            " {} {} v{}",
            field("provider"),
            field("key_id"),
            field("key_version")
        ));
    }
    if let Some(uid) = v["uid"].as_u64() {
        out.push_str(&format!(" uid={uid}"));
    }
    for k in ["detail", "error"] {
        if !field(k).is_empty() {
            out.push_str(&format!("  {k}: {}", field(k)));
        }
    }
    out
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

fn check_key(config_path: &Path, volume: Option<String>, json: bool) -> anyhow::Result<()> {
    let result = control(config_path, &Request::CheckKey { volume })?;
    let checks: Vec<CheckResult> = serde_json::from_value(result.clone())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        for c in &checks {
            match &c.error {
                None => println!("{}: key ok ({})", c.volume, c.state),
                Some(e) => println!("{}: KEY CHECK FAILED ({}): {e}", c.volume, c.state),
            }
            for w in &c.warnings {
                println!("{}: warning: {w}", c.volume);
            }
        }
    }
    let failed: Vec<_> = checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| c.volume.as_str())
        .collect();
    if !failed.is_empty() {
        return Err(Exit::KeyLost(format!(
            "key check failed for {}; restore access to the KEK (token, policy, key state) and the daemon resumes at its next check",
            failed.join(", ")
        ))
        .into());
    }
    Ok(())
}

fn key_change(config_path: &Path, request: Request, verb: &str, json: bool) -> anyhow::Result<()> {
    let result = control(config_path, &request)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&result)?);
        return Ok(());
    }
    let change: KeyChange = serde_json::from_value(result)?;
    println!(
        "{}: {verb}; {} DEK now wrapped by {} key {} version {}",
        change.volume, change.layer, change.kek.provider, change.kek.key_id, change.kek.key_version
    );
    Ok(())
}

fn create(
    config_path: &Path,
    name: &str,
    size: Option<ByteSize>,
    sector_size: Option<String>,
    force: bool,
) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let v = commands::volume_config(&config, config_path, name)?;
    if v.role == Role::Temp {
        bail!("{name:?} is a temp volume: hostcryptd recreates it with a fresh key at every start; nothing to create");
    }
    let size = match (size, v.size_bytes()) {
        (Some(s), Some(c)) if s.0 != c => {
            bail!("--size {} disagrees with size = {} in the config", s.0, c)
        }
        (Some(s), _) => s.0,
        (None, Some(c)) => c,
        (None, None) => bail!("give --size (e.g. --size 8G) or set size in the config"),
    };
    let sector_size = match sector_size {
        Some(s) => s.parse().context("sector size")?,
        None => v.sector_size,
    };
    let kek_name = v
        .kek
        .as_ref()
        .map(|k| k.get_ref().clone())
        .unwrap_or_default();
    let Some(kek_config) = config.kek.get(&kek_name) else {
        bail!("volume {name:?} names KEK {kek_name:?}, which is not configured");
    };
    let kek = hostcryptd::service::open_provider(&kek_name, kek_config)?;
    let inner = match &v.kek_inner {
        Some(inner_name) => {
            let inner_name = inner_name.get_ref();
            let Some(inner_config) = config.kek.get(inner_name) else {
                bail!("volume {name:?} names inner KEK {inner_name:?}, which is not configured");
            };
            Some(hostcryptd::service::open_provider(
                inner_name,
                inner_config,
            )?)
        }
        None => None,
    };
    let backing = v.backing.get_ref();
    let created = volume::create(
        backing,
        Geometry { size, sector_size },
        kek.as_ref(),
        inner.as_deref(),
        force,
    );
    audit_create(&config, name, &kek_name, &created);
    let header = created?;
    let inner_note = inner
        .as_ref()
        .map(|i| format!("; double-encrypted, inner DEK wrapped by {}", i.describe()))
        .unwrap_or_default();
    println!(
        "created cache volume {name:?} on {}: {} bytes, {}-byte sectors, uuid {}, DEK wrapped by {}{inner_note}",
        backing.display(),
        header.size,
        header.sector_size,
        header.uuid,
        kek.describe()
    );
    Ok(())
}

/// Records the DEK's first wrap in the daemon's audit log, if configured.
fn audit_create(
    config: &Config,
    volume: &str,
    kek_name: &str,
    created: &Result<Header, volume::VolumeError>,
) {
    let audit = match hostcryptd::service::open_audit(config) {
        Ok(audit) => audit,
        Err(e) => {
            eprintln!(
                "hostcrypt: warning: {}",
                hostcryptd::report::error_chain(&e)
            );
            return;
        }
    };
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let slot = created
        .as_ref()
        .ok()
        .and_then(|h| h.active_keyslot().map(|s| s.wrapped.kek.clone()));
    let mut event = Event::new(volume, "wrap", if created.is_ok() { "ok" } else { "error" })
        .detail(format!("create with kek {kek_name}"))
        .uid(Some(uid));
    if let Some(kek) = &slot {
        event = event.key(kek);
    }
    if let Err(e) = created {
        event = event.error(e);
    }
    audit.record(&event);
}

fn inspect(path: &Path, json: bool) -> anyhow::Result<()> {
    let copies = volume::read_headers(path)?;
    let header = volume::current_header(path, &copies)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&header_json(path, &header, &copies))?
        );
        return Ok(());
    }
    println!("backing:        {}", path.display());
    println!("uuid:           {}", header.uuid);
    println!("format version: {}", volume::header::FORMAT_VERSION);
    println!("role:           {}", header.role);
    println!("size:           {} bytes", header.size);
    println!("sector size:    {}", header.sector_size);
    println!("data offset:    {}", header.data_offset);
    println!("DEK generation: {}", header.dek_generation);
    match header.reencrypt {
        Some(r) => println!(
            "re-encryption:  to generation {} at byte {}",
            r.target_generation, r.checkpoint
        ),
        None => println!("re-encryption:  none"),
    }
    println!(
        "header copies:  primary {}, backup {}",
        copy_state(&copies.primary),
        copy_state(&copies.backup)
    );
    for slot in &header.keyslots {
        println!(
            "keyslot:        generation {}, {} layer, {} ({} wrapped bytes)",
            slot.generation,
            slot.layer,
            slot.wrapped.kek,
            slot.wrapped.blob.len()
        );
    }
    Ok(())
}

fn copy_state(copy: &Result<Header, HeaderError>) -> String {
    match copy {
        Ok(h) => format!("valid (sequence {})", h.sequence),
        Err(e) => format!("INVALID ({e})"),
    }
}

fn header_json(path: &Path, header: &Header, copies: &HeaderCopies) -> serde_json::Value {
    serde_json::json!({
        "backing": path,
        "uuid": header.uuid,
        "format_version": volume::header::FORMAT_VERSION,
        "role": header.role,
        "size": header.size,
        "sector_size": header.sector_size,
        "data_offset": header.data_offset,
        "dek_generation": header.dek_generation,
        "reencrypt": header.reencrypt.map(|r| serde_json::json!({
            "checkpoint": r.checkpoint,
            "target_generation": r.target_generation,
        })),
        "header_copies": {
            "primary": copy_state(&copies.primary),
            "backup": copy_state(&copies.backup),
        },
        "keyslots": header.keyslots.iter().map(|k| serde_json::json!({
            "generation": k.generation,
            "layer": k.layer,
            "provider": k.wrapped.kek.provider,
            "key_id": k.wrapped.kek.key_id,
            "key_version": k.wrapped.kek.key_version,
            "wrapped_len": k.wrapped.blob.len(),
        })).collect::<Vec<_>>(),
    })
}
