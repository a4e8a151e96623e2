//! Test harness for the end-to-end suite: builds configs in a temporary
//! directory, starts and stops real `hostcryptd` processes, runs real client
//! tools, and waits for conditions with deadlines (never bare sleeps).
//! Every process a test starts is killed when its handle drops.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod azure;
pub mod bao;
pub mod flaky;
pub mod legacy;
pub mod prometheus;
pub mod remote;
pub mod softhsm;
pub mod tls;
pub mod vhost;

/// Directory holding the workspace's built binaries (`target/<profile>`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HOSTCRYPT_BIN_DIR") {
        return dir.into();
    }
    // target/<profile>/deps/e2e-<hash> → target/<profile>
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile> directory")
        .to_owned()
}

pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (the test script does)",
        path.display()
    );
    path
}

/// Polls `cond` until it holds or `deadline` passes.
pub fn wait_until(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    let mut pause = Duration::from_millis(5);
    while !cond() {
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Runs a command to completion and returns its output, failing the test
/// with its stderr when it does not succeed.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A scratch directory with a local KEK and a config describing volumes.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub kek: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    /// The `[kek.NAME]` cache volumes added from now on use (default `main`).
    pub default_kek: String,
    /// Extra `[kek.NAME]` tables written into the config.
    pub kek_tables: Vec<String>,
    /// Environment for every `hostcrypt`/`hostcryptd` the fixture runs
    /// (e.g. `SOFTHSM2_CONF`; tests run in parallel, so never the test's own).
    pub env: Vec<(String, String)>,
    volumes: Vec<String>,
    /// `io_engine` for this fixture's daemon (default: the suite's).
    engine: String,
}

impl Default for Fixture {
    fn default() -> Self {
        Self::new()
    }
}

impl Fixture {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("hostcrypt-e2e-")
            .tempdir()
            .expect("temp dir");
        let kek = dir.path().join("kek.key");
        run_ok(
            Command::new(bin("hostcrypt"))
                .args(["kek", "init-local"])
                .arg(&kek),
        );
        Fixture {
            socket: dir.path().join("nbd.sock"),
            config: dir.path().join("hostcryptd.toml"),
            kek,
            dir,
            default_kek: "main".into(),
            kek_tables: Vec::new(),
            env: Vec::new(),
            volumes: Vec::new(),
            engine: io_engine(),
        }
    }

    /// Makes a second local KEK file and its `[kek.NAME]` table; returns
    /// the file's path.
    pub fn add_local_kek(&mut self, name: &str) -> PathBuf {
        let path = self.path(&format!("{name}.key"));
        run_ok(
            Command::new(bin("hostcrypt"))
                .args(["kek", "init-local"])
                .arg(&path),
        );
        self.kek_tables.push(format!(
            "[kek.{name}]\nprovider = \"local\"\npath = \"{}\"\n",
            path.display()
        ));
        path
    }

    /// Runs this fixture's daemon on `engine` whatever the suite's is.
    pub fn set_io_engine(&mut self, engine: &str) {
        self.engine = engine.to_owned();
        self.write_config("");
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Adds a `[[volume]]` table; `extra` is appended verbatim (e.g. `size = "64M"`).
    pub fn volume(&mut self, name: &str, role: &str, extra: &str) -> PathBuf {
        let backing = self.path(&format!("{name}.img"));
        self.volume_at(name, role, &backing, extra);
        backing
    }

    /// Forgets the configured volumes (their backings stay), so a test
    /// can configure them again with other settings.
    pub fn clear_volumes(&mut self) {
        self.volumes.clear();
    }

    /// Like [`Fixture::volume`] with the backing at `backing`.
    pub fn volume_at(&mut self, name: &str, role: &str, backing: &Path, extra: &str) {
        let kek = if role == "cache" {
            format!("kek = \"{}\"\n", self.default_kek)
        } else {
            String::new()
        };
        self.volumes.push(format!(
            "[[volume]]\nname = \"{name}\"\nbacking = \"{}\"\nrole = \"{role}\"\n{kek}{extra}\n",
            backing.display()
        ));
        self.write_config("");
    }

    /// The names of the configured volumes whose backing is an NBD URI.
    fn remote_volumes(&self) -> Vec<String> {
        self.volumes
            .iter()
            .filter(|v| v.contains("backing = \"nbd"))
            .filter_map(|v| {
                let rest = v.split("name = \"").nth(1)?;
                Some(rest.split('"').next()?.to_owned())
            })
            .collect()
    }

    /// `[daemon]` lines for a control socket and an audit log in the
    /// fixture's directory (see [`Fixture::audit_log`]).
    pub fn control_and_audit(&self) -> String {
        format!(
            "control = \"{}\"\naudit_log = \"{}\"",
            self.path("control.sock").display(),
            self.audit_log().display()
        )
    }

    pub fn audit_log(&self) -> PathBuf {
        self.path("audit.log")
    }

    /// The daemon's state directory (anti-rollback records).
    pub fn state_dir(&self) -> PathBuf {
        self.path("state")
    }

    /// Drops a `[[volume]]` from the config (call `write_config` after).
    pub fn remove_volume(&mut self, name: &str) {
        let head = format!("[[volume]]\nname = \"{name}\"\n");
        self.volumes.retain(|v| !v.starts_with(&head));
    }

    /// (Re)writes the config; each `server_extra` line goes into
    /// `[daemon]` or `[nbd]` by its key, as `hostcryptd` splits a legacy
    /// `[server]` section (`config::migrate_server`).
    /// `HOSTCRYPT_E2E_IO_ENGINE` (auto, uring, threads) picks the I/O
    /// engine, so the whole suite can run once per engine;
    /// `HOSTCRYPT_E2E_RING_CONNECTIONS=0` keeps plaintext connections on
    /// tokio tasks (`ring_connections = false`; on rings is the default).
    pub fn write_config(&self, server_extra: &str) {
        // Anti-rollback records in the fixture's directory (see
        // [`Fixture::state_dir`]), never the system's.
        let state_dir = if server_extra.contains("state_dir") {
            String::new()
        } else {
            format!("state_dir = \"{}\"\n", self.state_dir().display())
        };
        let (daemon_extra, nbd_extra) = split_server_lines(server_extra);
        let text = format!(
            "[daemon]\nio_engine = \"{}\"\n{state_dir}{daemon_extra}\n[nbd]\nunix = \"{}\"\n{}{nbd_extra}\n[kek.main]\nprovider = \"local\"\npath = \"{}\"\n\n{}\n{}",
            self.engine,
            self.socket.display(),
            if server_extra.contains("ring_connections") {
                ""
            } else {
                ring_connections()
            },
            self.kek.display(),
            self.kek_tables.join("\n"),
            self.volumes.join("\n")
        );
        std::fs::write(&self.config, text).expect("write config");
    }

    /// Formats a cache volume with the CLI.
    pub fn create(&self, name: &str, size: &str, sector_size: u32) {
        run_ok(
            Command::new(bin("hostcrypt"))
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .arg("--config")
                .arg(&self.config)
                .args(["create", name, "--size", size, "--sector-size"])
                .arg(sector_size.to_string()),
        );
    }

    /// Runs `hostcrypt --config CONFIG ARGS`; returns the output whatever the outcome.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("hostcrypt"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()
            .expect("run hostcrypt")
    }

    /// `hostcrypt status --json` from the running daemon.
    pub fn status(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        assert!(
            out.status.success(),
            "hostcrypt status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// The key state (`serving`, `key-lost`, ...) of one volume.
    pub fn key_state(&self, volume: &str) -> String {
        let status = self.status();
        status["volumes"]
            .as_array()
            .and_then(|vs| vs.iter().find(|v| v["name"] == volume))
            .and_then(|v| {
                v["key"]["state"]
                    .as_str()
                    .or_else(|| v["unavailable"]["state"].as_str())
            })
            .unwrap_or_default()
            .to_string()
    }

    /// Waits (up to 20 s: a few 1 s key-check intervals plus provider
    /// retries) until a volume's key state is `state`.
    pub fn wait_key_state(&self, volume: &str, state: &str) {
        wait_until(
            &format!("{volume}: key state {state}"),
            Duration::from_secs(20),
            || self.key_state(volume) == state,
        );
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// Starts the daemon and waits until it accepts connections.
    pub fn start(&self) -> Daemon {
        let mut daemon = self.spawn();
        let socket = self.socket.clone();
        let started = Instant::now();
        loop {
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                // Remote volumes open off the start-up path: wait until
                // each has opened or failed, as a test expects of a start.
                let remote = self.remote_volumes();
                wait_until("remote volumes tried", Duration::from_secs(60), || {
                    let log = daemon.stderr();
                    remote.iter().all(|name| {
                        let me = format!("volume={name} ");
                        log.lines().any(|l| {
                            (l.contains("volume open") || l.contains("volume not served"))
                                && (l.contains(&me) || l.ends_with(&format!("volume={name}")))
                        })
                    })
                });
                return daemon;
            }
            if let Some(status) = daemon.child.try_wait().expect("try_wait") {
                panic!("hostcryptd exited early ({status}):\n{}", daemon.stderr());
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "hostcryptd did not listen within 30 s:\n{}",
                daemon.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `hostcryptd --config CONFIG --check`, whatever the outcome.
    pub fn check(&self) -> Output {
        Command::new(bin("hostcryptd"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .arg("--config")
            .arg(&self.config)
            .arg("--check")
            .output()
            .expect("run hostcryptd --check")
    }

    /// Starts the daemon for a config with a volume that cannot open: the
    /// daemon runs on (other volumes would serve) and logs why; returns
    /// once `volume` is reported as not served.
    pub fn start_with_unavailable(&self, volume: &str) -> Daemon {
        let d = self.start();
        wait_until(
            &format!("{volume} reported as not served"),
            Duration::from_secs(30),
            || {
                let log = d.stderr();
                log.contains("volume not served") && log.contains(&format!("volume={volume}"))
            },
        );
        d
    }

    /// Starts the daemon without waiting (for start-up failure tests).
    pub fn spawn(&self) -> Daemon {
        let log = self.path(&format!("hostcryptd-{}.log", unique()));
        let child = Command::new(bin("hostcryptd"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .arg("--config")
            .arg(&self.config)
            .args(["--log", "debug"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn hostcryptd");
        Daemon { child, log }
    }

    /// Like [`Fixture::spawn`], but held before `hostcryptd` runs: a shell
    /// waits for [`HeldDaemon::release`], then `exec`s the daemon under the
    /// same pid. A tracer attached meanwhile sees the daemon's first
    /// syscall (its start-up, a header upgrade at open). Dropped without a
    /// release, the shell exits and no daemon ever starts.
    pub fn spawn_held(&self) -> HeldDaemon {
        let log = self.path(&format!("hostcryptd-{}.log", unique()));
        let mut child = Command::new("/bin/sh")
            .arg("-c")
            .arg("read go && exec \"$0\" \"$@\" </dev/null")
            .arg(bin("hostcryptd"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .arg("--config")
            .arg(&self.config)
            .args(["--log", "debug"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn a held hostcryptd");
        let go = child.stdin.take().expect("the held shell's stdin");
        HeldDaemon {
            daemon: Daemon { child, log },
            go,
        }
    }
}

/// The `ring_connections` line the suite's configs carry, if any.
fn ring_connections() -> &'static str {
    match std::env::var("HOSTCRYPT_E2E_RING_CONNECTIONS").as_deref() {
        Ok("0") => "ring_connections = false\n",
        Ok("1") => "ring_connections = true\n",
        _ => "",
    }
}

/// The I/O engine the suite runs with (`HOSTCRYPT_E2E_IO_ENGINE`, default auto).
pub fn io_engine() -> String {
    std::env::var("HOSTCRYPT_E2E_IO_ENGINE").unwrap_or_else(|_| "auto".into())
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A running `hostcryptd`; killed on drop if still running.
pub struct Daemon {
    pub child: Child,
    log: PathBuf,
}

impl Daemon {
    pub fn stderr(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// SIGTERM, then wait (bounded) for a clean exit; returns the exit code.
    pub fn stop(mut self) -> i32 {
        // SAFETY: kill(2) with our own child's pid and a valid signal number.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        self.wait(Duration::from_secs(30))
    }

    /// Waits for the process to exit by itself; returns the exit code.
    pub fn wait(&mut self, deadline: Duration) -> i32 {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code().unwrap_or(-1);
            }
            assert!(
                start.elapsed() < deadline,
                "hostcryptd did not exit within {deadline:?}:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A `hostcryptd` not started yet (see [`Fixture::spawn_held`]).
pub struct HeldDaemon {
    daemon: Daemon,
    go: std::process::ChildStdin,
}

impl HeldDaemon {
    /// The pid the daemon will have.
    pub fn pid(&self) -> u32 {
        self.daemon.child.id()
    }

    /// Lets the daemon start; returns without waiting for it.
    pub fn release(mut self) -> Daemon {
        use std::io::Write;
        self.go.write_all(b"go\n").expect("release the held daemon");
        drop(self.go);
        self.daemon
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs qemu-io on `uri` with one `-c` per command; fails the test if
/// qemu-io fails or any `read -P` finds a different pattern. Returns stdout.
pub fn qemu_io(uri: &str, commands: &[impl AsRef<str>]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in commands {
        cmd.args(["-c", c.as_ref()]);
    }
    let out = run_ok(cmd.arg(uri));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!text.contains("verification failed"), "{uri}: {text}");
    text
}

/// Runs a Python libnbd script with the connection URI as argv[1] and an
/// `errno_of(e)` helper in scope (libnbd reports errno as a name in some
/// versions, a number in others); the script must print OK.
pub fn python_nbd(script: &str, uri: &str) -> String {
    let prelude = "import errno, sys, nbd\n\
def errno_of(e):\n    \
return e.errno if isinstance(e.errno, int) else getattr(errno, str(e.errno), None)\n";
    let out = run_ok(
        Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(format!("{prelude}{script}"))
            .arg(uri),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.lines()
            .any(|l| l.trim() == "OK" || l.trim() == "ALL OK"),
        "{text}"
    );
    text
}

/// stdout followed by stderr, for assertions on what a command said.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// qemu-io against an export whose key is gone: the read must fail with EIO.
pub fn read_fails_with_eio(uri: &str) {
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 64k", uri])
        .output()
        .expect("qemu-io");
    let text = output_text(&out);
    assert!(text.contains("Input/output error"), "{text}");
}

/// Arguments for a fio verify run on `uri`: two jobs of random writes
/// (4k-64k, QD16), each `size` long and `offset_increment` apart, read back
/// and checked with crc32c; JSON output for [`fio_jobs`].
pub fn fio_verify_args(uri: &str, size: &str, offset_increment: &str) -> Vec<String> {
    [
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bsrange=4k-64k",
        "--iodepth=16",
        "--numjobs=2",
        &format!("--size={size}"),
        &format!("--offset_increment={offset_increment}"),
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--output-format=json",
    ]
    .map(String::from)
    .to_vec()
}

/// The per-job reports of a `fio --output-format=json` run, each checked
/// for `error == 0` (fio may print engine notices before the JSON).
pub fn fio_jobs(out: &Output) -> Vec<serde_json::Value> {
    let start = out
        .stdout
        .iter()
        .position(|&b| b == b'{')
        .expect("fio printed no JSON");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout[start..]).expect("fio JSON");
    let jobs = report["jobs"].as_array().expect("jobs").clone();
    for job in &jobs {
        assert_eq!(job["error"], 0, "{job}");
    }
    jobs
}

/// qemu-io against an export that is not served (waiting for its key):
/// opening it must fail, and nothing is read.
pub fn read_fails_with_eio_or_refused(uri: &str) {
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 64k", uri])
        .output()
        .expect("qemu-io");
    let text = output_text(&out);
    assert!(
        text.contains("Input/output error")
            || text.contains("not available")
            || !out.status.success(),
        "{text}"
    );
    assert!(!text.contains("read 65536/65536"), "{text}");
}

/// `hostcrypt inspect --json BACKING`.
pub fn inspect_json(backing: &Path) -> serde_json::Value {
    let out = run_ok(
        Command::new(bin("hostcrypt"))
            .args(["inspect", "--json"])
            .arg(backing),
    );
    serde_json::from_slice(&out.stdout).expect("inspect JSON")
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> String {
    let out = run_ok(Command::new("sha256sum").arg(path));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Whether a tool is on PATH; tests that need it fail loudly when it is not,
/// because the test script installs every tool.
pub fn require_tool(tool: &str) {
    assert!(
        on_path(tool),
        "{tool} is not installed; run scripts/test.sh, which installs the test tools"
    );
}

/// Whether `tool` is a file in a directory of PATH.
pub fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// Whether the tests run as root (mounts, loop devices, other users).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Marks the calling test as skipped, with why, in the log that
/// `scripts/test.sh` counts (`HOSTCRYPT_SKIP_LOG`). With `CI=true` a skip
/// fails the test instead: a skipped test is not a passed test. The caller
/// returns right after.
pub fn skip(reason: &str) {
    let test = std::thread::current()
        .name()
        .unwrap_or("unnamed test")
        .to_owned();
    assert!(
        std::env::var("CI").map_or(true, |v| v != "true"),
        "{test} cannot run here ({reason}); CI=true requires every test to run"
    );
    eprintln!("skipped: {reason}");
    if let Some(log) = std::env::var_os("HOSTCRYPT_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let _ = writeln!(f, "{test}: {reason}");
        }
    }
}

/// `true` when root; otherwise records a skip for `why` and returns false.
pub fn require_root(why: &str) -> bool {
    if is_root() {
        return true;
    }
    skip(&format!("{why} needs root"));
    false
}

/// Splits `key = value` lines into (`[daemon]` lines, `[nbd]` lines).
fn split_server_lines(lines: &str) -> (String, String) {
    let (mut daemon, mut nbd) = (String::new(), String::new());
    for line in lines.lines().filter(|l| !l.trim().is_empty()) {
        let key = line.split('=').next().unwrap_or("").trim();
        let to = if hostcryptd::config::DAEMON_KEYS.contains(&key) {
            &mut daemon
        } else {
            &mut nbd
        };
        to.push_str(line);
        to.push('\n');
    }
    (daemon, nbd)
}

/// Runs `command` and returns its output, running it again while exec
/// failed with "Text file busy": a binary copied a moment ago (for another
/// user to run) can be held open for writing by a child another test
/// thread has forked but not yet exec'd. Gives up after 10 s.
pub fn output_when_not_busy(command: &mut Command) -> Output {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let out = command.output().expect("run command");
        let busy = out.status.code() == Some(126) && output_text(&out).contains("Text file busy");
        if !busy || std::time::Instant::now() >= deadline {
            return out;
        }
        std::thread::yield_now();
    }
}
