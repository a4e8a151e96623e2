//! `hostcrypt`: the operator CLI. Formats volumes, creates local KEKs and
//! inspects headers; it reads the same config file as the daemon and uses
//! the daemon's library, so both agree on formats and errors.
//!
//! Exit codes: 0 success, 1 any error (the message says what to do next),
//! 2 usage error (from clap).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use hostcryptd::config::{ByteSize, Config, KekConfig};
use hostcryptd::kek::{KeyProvider, LocalKek};
use hostcryptd::volume::{self, Geometry, Header, HeaderCopies, HeaderError, Role};

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
enum KekCommand {
    /// Create a local KEK file (32 random bytes, mode 0600).
    InitLocal { path: PathBuf },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hostcrypt: {e:#}");
            std::process::ExitCode::FAILURE
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
    }
}

fn create(
    config_path: &Path,
    name: &str,
    size: Option<ByteSize>,
    sector_size: Option<String>,
    force: bool,
) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let Some(v) = config.volume(name) else {
        let known: Vec<_> = config
            .volumes
            .iter()
            .map(|v| v.name.get_ref().as_str())
            .collect();
        bail!(
            "no volume {name:?} in {}; configured: {}",
            config_path.display(),
            known.join(", ")
        );
    };
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
    let kek: Box<dyn KeyProvider> = match config.kek.get(&kek_name) {
        Some(KekConfig::Local { path }) => Box::new(LocalKek::load(path)?),
        None => bail!("volume {name:?} names KEK {kek_name:?}, which is not configured"),
    };
    let backing = v.backing.get_ref();
    let header = volume::create(backing, Geometry { size, sector_size }, kek.as_ref(), force)?;
    println!(
        "created cache volume {name:?} on {}: {} bytes, {}-byte sectors, uuid {}, DEK wrapped by {}",
        backing.display(),
        header.size,
        header.sector_size,
        header.uuid,
        kek.describe()
    );
    Ok(())
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
            "keyslot:        generation {}, {} ({} wrapped bytes)",
            slot.generation,
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
            "provider": k.wrapped.kek.provider,
            "key_id": k.wrapped.kek.key_id,
            "key_version": k.wrapped.kek.key_version,
            "wrapped_len": k.wrapped.blob.len(),
        })).collect::<Vec<_>>(),
    })
}
