//! The embedded default set-up behind a bare `hostcryptd`: a local KEK file,
//! a 1 GiB sparse cache volume and a Unix socket, all under one directory
//! (`./hostcrypt-demo` unless `--demo-dir` says otherwise). It writes a real
//! config file there, so the demo is also a template for a real deployment.

use std::path::{Path, PathBuf};

use crate::kek::LocalKek;
use crate::volume::{self, Geometry};

pub const DEMO_VOLUME: &str = "demo";
pub const DEMO_SIZE: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Kek(#[from] crate::kek::KekError),
    #[error(transparent)]
    Volume(#[from] crate::volume::VolumeError),
}

/// Creates (once) the demo KEK, volume and config under `dir`; returns the
/// config path. Existing files are reused, so restarting keeps the data.
pub fn prepare(dir: &Path) -> Result<PathBuf, DemoError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| DemoError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let dir = dir.canonicalize().map_err(io(dir))?;
    let kek_path = dir.join("kek.key");
    let backing = dir.join("demo.img");
    let socket = dir.join("nbd.sock");
    let config_path = dir.join("hostcryptd.toml");

    let kek = if kek_path.exists() {
        LocalKek::load(&kek_path)?
    } else {
        LocalKek::init(&kek_path)?
    };
    if !backing.exists() {
        volume::create(
            &backing,
            Geometry {
                size: DEMO_SIZE,
                sector_size: 4096,
            },
            &kek,
            None,
            false,
            Some(&volume::Records::new(&dir.join("state")).volume(DEMO_VOLUME)),
        )?;
    }
    let config = format!(
        r#"# Written by `hostcryptd` (demo mode). Copy and edit it for a real set-up.
[daemon]
state_dir = "{state}"

[nbd]
unix = "{socket}"

[kek.demo]
provider = "local"
path = "{kek}"

[[volume]]
name = "{DEMO_VOLUME}"
backing = "{backing}"
role = "cache"
kek = "demo"
"#,
        socket = socket.display(),
        state = dir.join("state").display(),
        kek = kek_path.display(),
        backing = backing.display(),
    );
    std::fs::write(&config_path, config).map_err(io(&config_path))?;
    Ok(config_path)
}

/// What to try next, printed when the demo starts serving.
pub fn print_help(config: &crate::config::Config) {
    let Some(sock) = config.nbd.unix.as_ref() else {
        return;
    };
    let sock = sock.display();
    let name = DEMO_VOLUME;
    println!(
        "\nhostcryptd is serving the encrypted demo volume {name:?} on {sock}\n\
         Try, from another terminal:\n  \
         nbdinfo 'nbd+unix:///{name}?socket={sock}'\n  \
         qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' 'nbd+unix:///{name}?socket={sock}'\n\
         Stop with Ctrl-C (or SIGTERM).\n"
    );
}
