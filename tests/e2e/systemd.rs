//! systemd integration: the shipped units pass `systemd-analyze verify` and
//! score ≤ 3.0 on `systemd-analyze security`; readiness, status, watchdog
//! and stopping reach a test NOTIFY_SOCKET; socket activation through
//! `systemd-socket-activate` serves NBD and the control socket on the
//! sockets it passes.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hostcrypt_e2e::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The shipped units with ExecStart pointing at the built binary (verify
/// checks that the executable exists).
fn units_in(dir: &Path) -> (PathBuf, PathBuf) {
    let service = std::fs::read_to_string(repo().join("systemd/hostcryptd.service"))
        .unwrap()
        .replace(
            "/usr/sbin/hostcryptd",
            &bin("hostcryptd").display().to_string(),
        );
    let service_path = dir.join("hostcryptd.service");
    std::fs::write(&service_path, service).unwrap();
    let socket_path = dir.join("hostcryptd.socket");
    std::fs::copy(repo().join("systemd/hostcryptd.socket"), &socket_path).unwrap();
    (service_path, socket_path)
}

#[test]
fn units_verify_and_score_at_most_3_on_security() {
    require_tool("systemd-analyze");
    let dir = tempfile::tempdir().unwrap();
    let (service, socket) = units_in(dir.path());
    // --man=no: the man pages of Documentation= are installed by the
    // package (tests/package.sh verifies the installed unit with them).
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&service)
        .arg(&socket)
        .output()
        .unwrap();
    let text = output_text(&out);
    assert!(out.status.success() && text.trim().is_empty(), "{text}");

    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&service)
        .output()
        .unwrap();
    let text = output_text(&out);
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("hostcryptd.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    assert!(score <= 3.0, "exposure {score} > 3.0:\n{text}");
}

/// Collects sd_notify datagrams until `pred` holds for one of them.
fn wait_message(
    socket: &UnixDatagram,
    seen: &mut Vec<String>,
    what: &str,
    pred: impl Fn(&str) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 4096];
    while !seen.iter().any(|m| pred(m)) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no {what} among {seen:?}");
        socket.set_read_timeout(Some(left)).unwrap();
        if let Ok(n) = socket.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
}

#[test]
fn notify_socket_gets_ready_status_watchdog_and_stopping() {
    let mut fx = Fixture::new();
    fx.volume("n", "cache", "");
    fx.create("n", "16M", 4096);
    let notify_path = fx.path("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    fx.env
        .push(("NOTIFY_SOCKET".into(), notify_path.display().to_string()));
    fx.env.push(("WATCHDOG_USEC".into(), "200000".into()));
    let d = fx.start();
    let mut seen = Vec::new();
    wait_message(&notify, &mut seen, "READY=1", |m| {
        m.lines().any(|l| l == "READY=1")
    });
    let ready = seen.iter().find(|m| m.contains("READY=1")).unwrap();
    assert!(
        ready.contains("STATUS=serving 1 volume(s) on unix:"),
        "{ready}"
    );
    // Readiness means serving: a client gets through right away.
    qemu_io(&fx.uri("n"), &["write -P 0x5 0 4k", "read -P 0x5 0 4k"]);
    wait_message(&notify, &mut seen, "WATCHDOG=1", |m| {
        m.lines().any(|l| l == "WATCHDOG=1")
    });
    // SAFETY: kill(2) with our own child's pid and a valid signal number.
    unsafe {
        libc::kill(d.child.id() as i32, libc::SIGTERM);
    }
    wait_message(&notify, &mut seen, "STOPPING=1", |m| {
        m.lines().any(|l| l == "STOPPING=1")
    });
    let mut d = d;
    assert_eq!(d.wait(Duration::from_secs(30)), 0);
}

#[test]
fn socket_activation_serves_nbd_and_control_on_passed_sockets() {
    require_tool("systemd-socket-activate");
    let mut fx = Fixture::new();
    fx.volume("act", "cache", "");
    let control = fx.path("control.sock");
    fx.write_config(&format!("control = \"{}\"", control.display()));
    fx.create("act", "16M", 4096);
    let log = fx.path("activated.log");
    let mut activator = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&fx.socket)
        .arg("-l")
        .arg(&control)
        .arg("--fdname=nbd:control")
        .arg(bin("hostcryptd"))
        .arg("--config")
        .arg(&fx.config)
        .args(["--log", "debug"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let pid = activator.id() as i32;
    wait_until("the activator to listen", Duration::from_secs(30), || {
        if let Ok(Some(status)) = activator.try_wait() {
            panic!(
                "systemd-socket-activate exited {status}: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        fx.socket.exists() && control.exists()
    });
    let activator = Reap(activator);
    // The first connection starts the daemon, which serves it.
    qemu_io(
        &fx.uri("act"),
        &["write -P 0x61 0 64k", "read -P 0x61 0 64k"],
    );
    let status = fx.status();
    assert_eq!(status["volumes"][0]["name"], "act", "{status}");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("socket activation"), "{text}");
    // systemd-socket-activate execs the daemon, so this pid is now hostcryptd.
    // SAFETY: kill(2) with our own child's pid and a valid signal number.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let mut activator = activator;
    wait_until("the daemon to exit", Duration::from_secs(30), || {
        matches!(activator.0.try_wait(), Ok(Some(_)))
    });
    // The sockets belong to the activator: the daemon leaves them in place.
    assert!(fx.socket.exists() && control.exists());
}

/// The README's fstab line for an attached volume, through the real
/// systemd-fstab-generator: the mount requires hostcryptd.service and is
/// ordered after it, waits up to 2 min for /dev/hostcrypt/NAME, and is
/// only wanted (not required) by local-fs.target, so a boot whose key
/// server is down goes on without it.
#[test]
fn the_readme_fstab_line_orders_the_mount_after_the_daemon_without_blocking_boot() {
    let generator = Path::new("/usr/lib/systemd/system-generators/systemd-fstab-generator");
    if !generator.exists() {
        skip("no systemd-fstab-generator here");
        return;
    }
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let line = readme
        .lines()
        .find(|l| l.starts_with("/dev/hostcrypt/"))
        .expect("an fstab line in the README");
    let dir = tempfile::tempdir().unwrap();
    let fstab = dir.path().join("fstab");
    std::fs::write(&fstab, format!("{line}\n")).unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let run = Command::new(generator)
        .args([&out, &out, &out])
        .env("SYSTEMD_FSTAB", &fstab)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", output_text(&run));
    let mount = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "mount"))
        .expect("a .mount unit");
    let unit = std::fs::read_to_string(&mount).unwrap();
    for want in ["Requires=hostcryptd.service", "After=hostcryptd.service"] {
        assert!(unit.lines().any(|l| l == want), "{want} missing:\n{unit}");
    }
    assert!(
        !unit.contains("Before=local-fs.target"),
        "blocks boot:\n{unit}"
    );
    let name = mount.file_name().unwrap();
    assert!(
        out.join("local-fs.target.wants").join(name).exists(),
        "not wanted by local-fs.target"
    );
    assert!(
        !out.join("local-fs.target.requires").join(name).exists(),
        "required by local-fs.target"
    );
    let timeout = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".device.d"))
        .flat_map(|e| std::fs::read_dir(e.path()).unwrap().flatten())
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect::<String>();
    assert!(
        timeout.contains("JobRunningTimeoutSec=2min"),
        "device timeout: {timeout}"
    );
}
