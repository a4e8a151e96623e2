//! Real NBD servers as remote backings: nbdkit (with its filters) and
//! qemu-nbd on a Unix socket (or TCP for TLS), and a deliberately hostile
//! one (`py/hostile_nbd.py`), killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{require_tool, wait_until, Fixture};

/// A running NBD server that can be killed and started again with the
/// same arguments.
pub struct Backend {
    program: &'static str,
    args: Vec<String>,
    child: Option<Child>,
    pub socket: PathBuf,
    log: PathBuf,
}

impl Backend {
    /// `nbdkit --foreground --unix SOCKET ARGS…` (filters and plugin).
    pub fn nbdkit(fx: &Fixture, name: &str, args: &[&str]) -> Backend {
        require_tool("nbdkit");
        let socket = fx.path(&format!("{name}.nbd.sock"));
        let mut full = vec![
            "--foreground".to_string(),
            "--unix".into(),
            socket.display().to_string(),
        ];
        full.extend(args.iter().map(|a| a.to_string()));
        Self::start("nbdkit", full, socket, fx.path(&format!("{name}.nbd.log")))
    }

    /// `nbdkit file IMAGE`.
    pub fn nbdkit_file(fx: &Fixture, name: &str, image: &Path) -> Backend {
        Self::nbdkit(fx, name, &["file", &image.display().to_string()])
    }

    /// `nbdkit --filter=cache file IMAGE cache=writeback`: a backend with a
    /// volatile cache, which loses writes it acknowledged but had not
    /// flushed when it is killed.
    pub fn nbdkit_writeback_cache(fx: &Fixture, name: &str, image: &Path) -> Backend {
        Self::nbdkit(
            fx,
            name,
            &[
                "--filter=cache",
                "file",
                &image.display().to_string(),
                "cache=writeback",
            ],
        )
    }

    /// `qemu-nbd` serving `image` (raw) to several clients.
    pub fn qemu_nbd(fx: &Fixture, name: &str, image: &Path) -> Backend {
        require_tool("qemu-nbd");
        let socket = fx.path(&format!("{name}.nbd.sock"));
        let args = vec![
            "--socket".to_string(),
            socket.display().to_string(),
            "--format=raw".into(),
            "--shared=16".into(),
            "--persistent".into(),
            "--cache=writeback".into(),
            image.display().to_string(),
        ];
        Self::start(
            "qemu-nbd",
            args,
            socket,
            fx.path(&format!("{name}.nbd.log")),
        )
    }

    /// `tests/py/hostile_nbd.py`: an export of `size` bytes whose read
    /// replies misbehave as the file `mode` says (read at every request),
    /// with every written payload appended to `record`.
    pub fn hostile(fx: &Fixture, name: &str, size: u64, mode: &Path, record: &Path) -> Backend {
        let socket = fx.path(&format!("{name}.nbd.sock"));
        let args = vec![
            concat!(env!("CARGO_MANIFEST_DIR"), "/py/hostile_nbd.py").to_string(),
            socket.display().to_string(),
            size.to_string(),
            mode.display().to_string(),
            record.display().to_string(),
        ];
        Self::start(
            "/usr/bin/python3",
            args,
            socket,
            fx.path(&format!("{name}.nbd.log")),
        )
    }

    fn start(program: &'static str, args: Vec<String>, socket: PathBuf, log: PathBuf) -> Backend {
        let mut b = Backend {
            program,
            args,
            child: None,
            socket,
            log,
        };
        b.restart();
        b
    }

    /// The URI hostcryptd's config names this backend by.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// Starts the server (again) and waits until it accepts connections.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "{} is still running", self.program);
        let _ = std::fs::remove_file(&self.socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("backend log");
        let child = Command::new(self.program)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.program));
        self.child = Some(child);
        let socket = self.socket.clone();
        wait_until(
            &format!("{} to listen", self.program),
            Duration::from_secs(20),
            || std::os::unix::net::UnixStream::connect(&socket).is_ok(),
        );
    }

    /// Freezes the server (SIGSTOP): the kernel still takes what is sent,
    /// nothing answers, and it all lands at `resume`, as on a storage path
    /// that hangs and comes back.
    pub fn pause(&self) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) with our own child's pid and a valid signal.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGSTOP);
            }
        }
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn resume(&self) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) with our own child's pid and a valid signal.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGCONT);
            }
        }
    }

    /// SIGKILL, as a crash or a storage node going away.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (SIGSTOP: a server that hangs; SIGCONT: it resumes).
    pub fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) with a pid we spawned and still hold (not yet
            // reaped, so it cannot have been reused) and a plain signal number.
            unsafe { libc::kill(child.id() as i32, signal) };
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A sparse file of `mib` MiB in the fixture's directory, for a file backend.
pub fn sparse_image(fx: &Fixture, name: &str, mib: u64) -> PathBuf {
    let image = fx.path(name);
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(mib << 20))
        .expect("backend image");
    image
}
