//! Remote backings: hostcryptd in front of real NBD servers (nbdkit with
//! its file and memory plugins and its blocksize-policy, error and delay
//! filters; qemu-nbd), driven by real clients. The backend never sees
//! plaintext; its faults reach clients as stalls or EIO on the affected
//! requests only, and the volume recovers by itself.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use hostcrypt_e2e::remote::{sparse_image, Backend};
use hostcrypt_e2e::tls::{free_port, Certs};
use hostcrypt_e2e::*;

const MIB: usize = 1 << 20;

/// A fixture with cache volume `r` on `backend` (created, `size`) and a
/// control socket; `extra` goes into the volume's table.
fn remote_fixture(fx: &mut Fixture, backend: &str, size: &str, extra: &str) {
    fx.volume_at("r", "cache", Path::new(backend), extra);
    let control = format!("control = \"{}\"", fx.path("control.sock").display());
    fx.write_config(&control);
    fx.create("r", size, 4096);
}

fn remote_status(fx: &Fixture) -> serde_json::Value {
    let status = fx.status();
    let v = status["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == "r"))
        .cloned()
        .expect("volume r in status");
    v["backing"].clone()
}

/// Every 4 KiB sector of `plain`, looked for at every 4 KiB boundary of
/// the backend's bytes: none may appear.
fn assert_no_plaintext(backend_bytes: &[u8], plain: &[u8]) {
    let sectors: HashSet<&[u8]> = plain
        .chunks_exact(4096)
        .filter(|s| s.iter().any(|&b| b != 0))
        .collect();
    assert!(!sectors.is_empty());
    let leaked = backend_bytes
        .chunks_exact(4096)
        .filter(|s| sectors.contains(s))
        .count();
    assert_eq!(leaked, 0, "plaintext sectors found on the backend");
}

fn round_trip(fx: &Fixture, d: &Daemon, backend_file: &Path) {
    let mut data = vec![0u8; 256 * MIB];
    getrandom::fill(&mut data).expect("getrandom");
    let input = fx.path("in.bin");
    std::fs::write(&input, &data).expect("write input");
    run_ok(Command::new("nbdcopy").arg(&input).arg(fx.uri("r")));
    let output = fx.path("out.bin");
    run_ok(Command::new("nbdcopy").arg(fx.uri("r")).arg(&output));
    assert_eq!(sha256_file(&output), sha256_file(&input), "{}", d.stderr());
    let on_backend = std::fs::read(backend_file).expect("read the backend's file");
    assert_no_plaintext(&on_backend, &data);
}

#[test]
fn nbdkit_file_backend_round_trips_256m_and_never_sees_plaintext() {
    require_tool("nbdcopy");
    let mut fx = Fixture::new();
    let image = sparse_image(&fx, "backend.img", 260);
    let backend = Backend::nbdkit_file(&fx, "be", &image);
    remote_fixture(&mut fx, &backend.uri(), "256M", "");
    let d = fx.start();
    round_trip(&fx, &d, &image);
    let b = remote_status(&fx);
    assert_eq!(b["state"], "up", "{b}");
    assert_eq!(b["errors"], 0, "{b}");
}

#[test]
fn qemu_nbd_backend_round_trips_256m_and_never_sees_plaintext() {
    require_tool("nbdcopy");
    let mut fx = Fixture::new();
    let image = sparse_image(&fx, "backend.img", 260);
    let backend = Backend::qemu_nbd(&fx, "be", &image);
    remote_fixture(&mut fx, &backend.uri(), "256M", "");
    // The volume format is the same as on a file: inspect reads it remotely.
    let out = fx.cli(&["inspect", &backend.uri(), "--json"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let d = fx.start();
    round_trip(&fx, &d, &image);
}

#[test]
fn fio_verify_on_two_connections_over_four_backend_connections() {
    require_tool("fio");
    let mut fx = Fixture::new();
    let backend = Backend::nbdkit(&fx, "be", &["memory", "140M"]);
    remote_fixture(&mut fx, &backend.uri(), "128M", "backing_connections = 4");
    let _d = fx.start();
    let out = run_ok(Command::new("fio").args(fio_verify_args(&fx.uri("r"), "32M", "64M")));
    let jobs = fio_jobs(&out);
    assert_eq!(jobs.len(), 2);
    for job in &jobs {
        assert!(
            job["read"]["io_bytes"].as_u64().unwrap() >= 32 << 20,
            "{job}"
        );
    }
    // nbdkit's memory plugin allows multi-conn: all four are used.
    let b = remote_status(&fx);
    assert_eq!(b["connections"], 4, "{b}");
    assert_eq!(b["connections_up"], 4, "{b}");
}

#[test]
fn backend_with_64k_minimum_block_takes_unaligned_writes() {
    let mut fx = Fixture::new();
    let backend = Backend::nbdkit(
        &fx,
        "be",
        &[
            "--filter=blocksize-policy",
            "memory",
            "80M",
            "blocksize-minimum=65536",
            "blocksize-preferred=65536",
            "blocksize-maximum=1M",
            "blocksize-error-policy=error",
        ],
    );
    remote_fixture(&mut fx, &backend.uri(), "64M", "");
    let _d = fx.start();
    let b = remote_status(&fx);
    assert_eq!(b["min_block"], 65536, "{b}");
    let uri = fx.uri("r");
    qemu_io(
        &uri,
        &[
            "write -P 0x11 0 4M",
            "write -P 0x22 4096 4096",
            "write -P 0x33 70000 333",
            "write -P 0x44 3M 2M",
        ],
    );
    qemu_io(
        &uri,
        &[
            "read -P 0x11 0 4096",
            "read -P 0x22 4096 4096",
            "read -P 0x11 8192 61808",
            "read -P 0x33 70000 333",
            "read -P 0x11 70333 2M",
            "read -P 0x44 3M 2M",
        ],
    );
    assert_eq!(remote_status(&fx)["errors"], 0);
}

#[test]
fn backend_errors_fail_only_the_affected_requests() {
    let mut fx = Fixture::new();
    let trigger = fx.path("fail-writes");
    let backend = Backend::nbdkit(
        &fx,
        "be",
        &[
            "--filter=error",
            "memory",
            "80M",
            "error=EIO",
            "error-pwrite-rate=100%",
            &format!("error-pwrite-file={}", trigger.display()),
        ],
    );
    remote_fixture(&mut fx, &backend.uri(), "64M", "");
    // A second, local volume on the same daemon.
    fx.volume("local", "cache", "");
    fx.write_config(&format!(
        "control = \"{}\"",
        fx.path("control.sock").display()
    ));
    fx.create("local", "16M", 4096);
    let _d = fx.start();
    let uri = fx.uri("r");
    qemu_io(&uri, &["write -P 0x5a 0 1M"]);
    std::fs::write(&trigger, b"").expect("arm the error filter");
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x66 0 64k", &uri])
        .output()
        .expect("qemu-io");
    let text = output_text(&out);
    assert!(text.contains("Input/output error"), "{text}");
    // Reads of this volume and everything on the other one carry on.
    qemu_io(&uri, &["read -P 0x5a 0 1M"]);
    qemu_io(
        &fx.uri("local"),
        &["write -P 0x77 0 64k", "read -P 0x77 0 64k"],
    );
    std::fs::remove_file(&trigger).expect("disarm");
    qemu_io(
        &uri,
        &[
            "write -P 0x66 0 64k",
            "read -P 0x66 0 64k",
            "read -P 0x5a 64k 960k",
        ],
    );
    let b = remote_status(&fx);
    assert!(b["errors"].as_u64().unwrap() >= 1, "{b}");
    assert_eq!(b["state"], "up", "{b}");
}

#[test]
fn random_read_errors_fail_some_reads_and_no_data_changes() {
    let mut fx = Fixture::new();
    let trigger = fx.path("fail-reads");
    let backend = Backend::nbdkit(
        &fx,
        "be",
        &[
            "--filter=error",
            "memory",
            "80M",
            "error=EIO",
            "error-pread-rate=30%",
            &format!("error-pread-file={}", trigger.display()),
        ],
    );
    remote_fixture(&mut fx, &backend.uri(), "64M", "");
    let _d = fx.start();
    qemu_io(&fx.uri("r"), &["write -P 0x3c 0 1M"]);
    std::fs::write(&trigger, b"").expect("arm the error filter");
    let script = r"
h = nbd.NBD()
h.connect_uri(sys.argv[1])
failed = ok = 0
for i in range(200):
    try:
        assert h.pread(4096, (i % 256) * 4096) == b'\x3c' * 4096
        ok += 1
    except nbd.Error as e:
        assert errno_of(e) == errno.EIO, e
        failed += 1
print(ok, failed)
assert failed > 0 and ok > 0
print('OK')
";
    let out = python_nbd(script, &fx.uri("r"));
    assert!(out.contains("OK"), "{out}");
    std::fs::remove_file(&trigger).expect("disarm");
    qemu_io(&fx.uri("r"), &["read -P 0x3c 0 1M"]);
    let b = remote_status(&fx);
    assert!(b["errors"].as_u64().unwrap() > 0, "{b}");
    assert_eq!(b["state"], "up", "{b}");
}

#[test]
fn slow_backend_is_slow_not_failing() {
    let mut fx = Fixture::new();
    let backend = Backend::nbdkit(
        &fx,
        "be",
        &[
            "--filter=delay",
            "memory",
            "80M",
            "rdelay=200ms",
            "wdelay=200ms",
        ],
    );
    remote_fixture(&mut fx, &backend.uri(), "64M", "backing_timeout = \"2s\"");
    let _d = fx.start();
    let started = Instant::now();
    qemu_io(&fx.uri("r"), &["write -P 0x21 0 64k", "read -P 0x21 0 64k"]);
    assert!(started.elapsed() >= Duration::from_millis(400));
    let b = remote_status(&fx);
    assert_eq!(b["timeouts"], 0, "{b}");
    assert_eq!(b["errors"], 0, "{b}");
}

#[test]
fn backend_killed_mid_fio_and_restarted_within_the_timeout() {
    require_tool("fio");
    let mut fx = Fixture::new();
    let image = sparse_image(&fx, "backend.img", 140);
    let mut backend = Backend::nbdkit_file(&fx, "be", &image);
    remote_fixture(&mut fx, &backend.uri(), "128M", "backing_timeout = \"30s\"");
    let d = fx.start();
    let mut args = fio_verify_args(&fx.uri("r"), "32M", "64M");
    args.push("--rate=8m".into());
    let fio = Command::new("fio")
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start fio");
    wait_until("fio to be writing", Duration::from_secs(30), || {
        fx.status()["volumes"][0]["io"]["write_ops"]
            .as_u64()
            .unwrap_or(0)
            > 50
    });
    backend.kill();
    wait_until(
        "the backing to be seen down",
        Duration::from_secs(10),
        || remote_status(&fx)["state"] == "down",
    );
    backend.restart();
    let out = fio.wait_with_output().expect("fio");
    assert!(
        out.status.success(),
        "{}\n{}",
        output_text(&out),
        d.stderr()
    );
    let jobs = fio_jobs(&out);
    assert_eq!(jobs.len(), 2);
    let b = remote_status(&fx);
    assert!(b["reconnects"].as_u64().unwrap() >= 1, "{b}");
    assert_eq!(b["timeouts"], 0, "{b}");
}

#[test]
fn backend_down_past_the_timeout_is_eio_then_recovers() {
    let mut fx = Fixture::new();
    let image = sparse_image(&fx, "backend.img", 80);
    let mut backend = Backend::nbdkit_file(&fx, "be", &image);
    remote_fixture(&mut fx, &backend.uri(), "64M", "backing_timeout = \"2s\"");
    let _d = fx.start();
    let uri = fx.uri("r");
    qemu_io(&uri, &["write -P 0x42 0 1M", "flush"]);
    backend.kill();
    let started = Instant::now();
    read_fails_with_eio(&uri);
    // The request stalled for the timeout before failing.
    assert!(started.elapsed() >= Duration::from_millis(1500));
    let b = remote_status(&fx);
    assert_eq!(b["state"], "down", "{b}");
    assert!(b["timeouts"].as_u64().unwrap() >= 1, "{b}");
    backend.restart();
    wait_until("the backing to come back", Duration::from_secs(10), || {
        remote_status(&fx)["state"] == "up"
    });
    qemu_io(&uri, &["read -P 0x42 0 1M"]);
}

#[test]
fn nbds_backend_with_client_certificate() {
    let mut fx = Fixture::new();
    let certs = Certs::make(&fx);
    let port = free_port();
    let mut args = vec![
        "--foreground".to_string(),
        "--port".into(),
        port.to_string(),
        "--ipaddr".into(),
        "127.0.0.1".into(),
        "--tls=require".into(),
        format!("--tls-certificates={}", certs.dir("server").display()),
        "--tls-verify-peer".into(),
        "memory".into(),
        "80M".into(),
    ];
    require_tool("nbdkit");
    let log = std::fs::File::create(fx.path("nbdkit.log")).expect("log");
    let mut child = Command::new("nbdkit")
        .args(args.drain(..))
        .stderr(log)
        .spawn()
        .expect("nbdkit");
    wait_until("nbdkit to listen", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let uri = format!("nbds://localhost:{port}/");
    remote_fixture(
        &mut fx,
        &uri,
        "64M",
        &format!(
            "backing_tls_certificates = \"{}\"",
            certs.dir("client").display()
        ),
    );
    let _d = fx.start();
    qemu_io(&fx.uri("r"), &["write -P 0x19 0 4M", "read -P 0x19 0 4M"]);
    // Without a client certificate the server refuses.
    let anonymous = format!("{uri}?tls-certificates={}", certs.dir("nocert").display());
    let out = fx.cli(&["inspect", &anonymous]);
    assert!(!out.status.success(), "{}", output_text(&out));
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn temp_volume_on_a_remote_backing_reads_zeros_after_every_start() {
    let mut fx = Fixture::new();
    let backend = Backend::nbdkit(&fx, "be", &["memory", "80M"]);
    fx.volume_at("t", "temp", Path::new(&backend.uri()), "size = \"64M\"");
    let d = fx.start();
    qemu_io(&fx.uri("t"), &["write -P 0x44 0 1M", "read -P 0x44 0 1M"]);
    assert_eq!(d.stop(), 0);
    // The old ciphertext is still on the export; under the new key it
    // must read as zeros, not as garbage.
    let _d = fx.start();
    qemu_io(&fx.uri("t"), &["read -P 0 0 1M"]);
}

#[test]
fn header_backup_and_restore_on_a_remote_backing() {
    let mut fx = Fixture::new();
    let backend = Backend::nbdkit(&fx, "be", &["memory", "80M"]);
    remote_fixture(&mut fx, &backend.uri(), "64M", "");
    let backup = fx.path("r.hdr");
    let out = fx.cli(&["header", "backup", "r", &backup.display().to_string()]);
    assert!(out.status.success(), "{}", output_text(&out));
    {
        let _d = fx.start();
        qemu_io(&fx.uri("r"), &["write -P 0x6d 1M 1M"]);
    }
    // Both header copies wiped on the export (64 KiB at 0 and at 256 KiB).
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -z 0 64k",
        "-c",
        "write -z 256k 64k",
        &backend.uri(),
    ]));
    let out = fx.cli(&["inspect", &backend.uri()]);
    assert!(!out.status.success(), "{}", output_text(&out));
    let out = fx.cli(&[
        "header",
        "restore",
        &backend.uri(),
        &backup.display().to_string(),
    ]);
    assert!(out.status.success(), "{}", output_text(&out));
    let _d = fx.start();
    qemu_io(&fx.uri("r"), &["read -P 0x6d 1M 1M"]);
}

#[test]
fn hung_backend_times_out_then_recovers() {
    let mut fx = Fixture::new();
    let backend = Backend::nbdkit(&fx, "be", &["memory", "80M"]);
    remote_fixture(&mut fx, &backend.uri(), "64M", "backing_timeout = \"2s\"");
    let d = fx.start();
    let uri = fx.uri("r");
    qemu_io(&uri, &["write -P 0x2f 0 1M"]);
    // A server that stops reading: large writes fill the socket and the
    // sender blocks; the watchdog must still fail them and break the
    // connection.
    backend.signal(libc::SIGSTOP);
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x30 0 16M", &uri])
        .output()
        .expect("qemu-io");
    let text = output_text(&out);
    assert!(text.contains("Input/output error"), "{text}");
    let b = remote_status(&fx);
    assert!(b["timeouts"].as_u64().unwrap() >= 1, "{b}");
    backend.signal(libc::SIGCONT);
    wait_until("the backing to come back", Duration::from_secs(20), || {
        remote_status(&fx)["state"] == "up"
    });
    // The timed-out FUA writes may or may not have reached the backend's
    // disk: FLUSH and FUA keep failing (reads work) until the volume is
    // reopened, and then everything works again.
    qemu_io(&uri, &["read 0 1M"]);
    d.stop();
    let _d = fx.start();
    qemu_io(&uri, &["write -P 0x31 2M 1M", "read -P 0x31 2M 1M"]);
}

#[test]
fn backend_down_at_start_is_retried_until_the_volume_opens() {
    let mut fx = Fixture::new();
    let image = sparse_image(&fx, "backend.img", 80);
    let mut backend = Backend::nbdkit_file(&fx, "be", &image);
    remote_fixture(
        &mut fx,
        &backend.uri(),
        "64M",
        "key_check_interval = \"2s\"",
    );
    {
        let _d = fx.start();
        qemu_io(&fx.uri("r"), &["write -P 0x7e 0 1M", "flush"]);
    }
    // The storage node is down while the host boots: the daemon serves
    // (the volume listed as not served, with why) and keeps trying.
    backend.kill();
    let _d = fx.start_with_unavailable("r");
    let status = fx.status();
    let error = status["volumes"][0]["unavailable"]["error"].to_string();
    assert!(error.contains("cannot connect"), "{status}");
    backend.restart();
    wait_until("the volume to open", Duration::from_secs(20), || {
        fx.status()["volumes"][0]["unavailable"].is_null()
    });
    qemu_io(&fx.uri("r"), &["read -P 0x7e 0 1M"]);
}

/// `python_nbd`'s prelude, for scripts whose failure is inspected here.
const NBD_PRELUDE: &str = "import errno, sys, nbd\n\
def errno_of(e):\n    \
return e.errno if isinstance(e.errno, int) else getattr(errno, str(e.errno), None)\n";

/// The status of volume `name`'s remote backing.
fn backing_status(fx: &Fixture, name: &str) -> serde_json::Value {
    fx.status()["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == name))
        .map(|v| v["backing"].clone())
        .unwrap_or_else(|| panic!("volume {name} in status"))
}

/// A backend that answers reads wrongly (`py/hostile_nbd.py`) sits behind
/// cache volume `m`, beside local cache volume `b` holding a marker that
/// has just passed through the daemon's pooled buffers. Writes to `m`
/// that need read-modify-write (partial sectors, and sectors smaller than
/// the backend's 64 KiB block) must fail with EIO whatever the server
/// answers, and nothing the server receives may contain `b`'s plaintext.
#[test]
fn hostile_backend_never_receives_another_volumes_plaintext() {
    let mut fx = Fixture::new();
    // Local reads on the thread pool use pooled buffers (the ring engine
    // may use its own arena instead), which is what could leak.
    fx.set_io_engine("threads");
    let mode = fx.path("hostile.mode");
    let record = fx.path("hostile.writes");
    let backend = Backend::hostile(&fx, "be", 80 << 20, &mode, &record);
    fx.volume("b", "cache", "");
    fx.volume_at(
        "m",
        "cache",
        Path::new(&backend.uri()),
        "backing_timeout = \"2s\"",
    );
    fx.write_config(&format!(
        "control = \"{}\"",
        fx.path("control.sock").display()
    ));
    fx.create("b", "16M", 4096);
    fx.create("m", "64M", 4096);
    let d = fx.start();
    assert_eq!(backing_status(&fx, "m")["min_block"], 65536);
    // Sectors of `m` that hold data, so a read-modify-write has something
    // to keep.
    qemu_io(&fx.uri("m"), &["write -P 0x5c 0 1M"]);
    let marker = b"TENANT-B-SECRET-";
    let spread = r"
h = nbd.NBD()
h.connect_uri(sys.argv[1])
secret = b'TENANT-B-SECRET-' * 65536
if len(sys.argv) < 3:
    h.pwrite(secret, 0)
    h.flush()
# Reads of every size a remote read-modify-write uses, so the pool's
# buffers of those sizes hold the plaintext when they are lent again.
for size in (4096, 65536, 131072, 1 << 20):
    for at in range(0, 1 << 20, size):
        assert h.pread(size, at) == secret[at:at + size]
print('OK')
";
    python_nbd(spread, &fx.uri("b"));
    let expect_eio = r"
h = nbd.NBD()
h.connect_uri(sys.argv[1])
tries = [
    ('partial-sector write', lambda: h.pwrite(b'\x11' * 512, 4096 + 100)),
    ('whole-sector write', lambda: h.pwrite(b'\x22' * 4096, 8192)),
    ('read', lambda: h.pread(4096, 0)),
]
for what, op in tries:
    try:
        op()
    except nbd.Error as e:
        assert errno_of(e) == errno.EIO, (what, e)
        continue
    raise SystemExit(what + ' succeeded')
print('OK')
";
    for how in [
        "none-done",
        "short",
        "overlap",
        "out-of-range",
        "unnegotiated",
        "wrong-cookie",
    ] {
        // The pool holds `b`'s plaintext again before each misbehaviour.
        let out = Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(format!(
                "import sys, nbd\nsys.argv.append('read-only')\n{spread}"
            ))
            .arg(fx.uri("b"))
            .output()
            .expect("python3");
        assert!(output_text(&out).contains("OK"), "{}", output_text(&out));
        std::fs::write(&mode, how).expect("set the backend's mode");
        let out = Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(format!("{NBD_PRELUDE}{expect_eio}"))
            .arg(fx.uri("m"))
            .output()
            .expect("python3");
        let log = d.stderr();
        assert!(
            output_text(&out).contains("OK"),
            "{how}: {}\n{}\n{}",
            output_text(&out),
            &log[log.len().saturating_sub(20_000)..],
            backend.log()
        );
        std::fs::write(&mode, "good").expect("set the backend's mode");
        wait_until(
            &format!("the backing to be up after {how}"),
            Duration::from_secs(20),
            || backing_status(&fx, "m")["state"] == "up",
        );
        // Nothing was written, and the volume works again.
        qemu_io(
            &fx.uri("m"),
            &[
                "read -P 0x5c 0 1M",
                "write -P 0x33 2M 4096",
                "read -P 0x33 2M 4096",
            ],
        );
    }
    let b = backing_status(&fx, "m");
    assert!(b["errors"].as_u64().unwrap_or(0) >= 4, "{b}");
    let received = std::fs::read(&record).expect("the backend's record");
    assert!(!received.is_empty());
    let leaked = received.windows(marker.len()).any(|w| w == marker);
    assert!(!leaked, "the hostile backend received volume b's plaintext");
    let log = d.stderr();
    for why in [
        "before filling the read",
        "reply chunks overlap",
        "lies outside its request",
        "a structured reply on a connection that did not negotiate them",
        "a reply chunk for unknown request",
    ] {
        assert!(log.contains(why), "{why}:\n{log}");
    }
}

/// The write-back error of volume `name`, as status shows it.
fn write_back_error(fx: &Fixture, name: &str) -> String {
    fx.status()["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == name))
        .map(|v| {
            v["write_back_error"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .unwrap_or_else(|| panic!("volume {name} in status"))
}

/// A backend with a volatile write-back cache (nbdkit's cache filter
/// over a file) crashes and restarts with acknowledged writes unflushed:
/// they are gone, and hostcryptd has reconnected. The client's next FLUSH
/// must fail (not vouch for lost data), status must say why, and reopening
/// the volume makes it work again.
#[test]
fn backend_that_lost_unflushed_writes_fails_the_next_flush() {
    use std::io::{BufRead, BufReader, Write};
    let mut fx = Fixture::new();
    let image = sparse_image(&fx, "backend.img", 80);
    let mut backend = Backend::nbdkit_writeback_cache(&fx, "be", &image);
    remote_fixture(&mut fx, &backend.uri(), "64M", "backing_timeout = \"10s\"");
    let d = fx.start();
    let uri = fx.uri("r");
    qemu_io(&uri, &["write -P 0x42 0 1M", "flush"]);
    // Writes, acknowledged; then waits for the crash before flushing.
    let script = r"
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(b'\x43' * (1 << 20), 0)
print('written', flush=True)
sys.stdin.readline()
try:
    h.flush()
except nbd.Error as e:
    assert errno_of(e) == errno.EIO, e
    print('OK', flush=True)
    raise SystemExit(0)
print('the flush succeeded over lost writes', flush=True)
";
    let mut client = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(format!("{NBD_PRELUDE}{script}"))
        .arg(&uri)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut lines = BufReader::new(client.stdout.take().expect("stdout")).lines();
    let first = lines.next().and_then(Result::ok).unwrap_or_default();
    assert_eq!(first, "written", "{}", d.stderr());
    let reconnects = remote_status(&fx)["reconnects"].as_u64().unwrap_or(0);
    backend.kill();
    backend.restart();
    wait_until("the backing to reconnect", Duration::from_secs(20), || {
        let b = remote_status(&fx);
        b["state"] == "up" && b["reconnects"].as_u64().unwrap_or(0) > reconnects
    });
    let why = write_back_error(&fx, "r");
    assert!(why.contains("not yet flushed"), "{why}");
    writeln!(client.stdin.take().expect("stdin"), "flush").expect("tell the client");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = client.wait().expect("python3");
    assert!(
        status.success() && rest.iter().any(|l| l == "OK"),
        "{rest:?}\n{}",
        d.stderr()
    );
    // FUA is refused too, until the volume is reopened.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -f -P 0x45 2M 64k", &uri])
        .output()
        .expect("qemu-io");
    assert!(
        output_text(&out).contains("Input/output error"),
        "{}",
        output_text(&out)
    );
    assert!(
        d.stderr().contains("acknowledged writes not yet flushed"),
        "{}",
        d.stderr()
    );
    assert_eq!(d.stop(), 0);
    // The backend did lose them (the fixture is what it claims): the
    // flushed data is what it holds. And the reopened volume works.
    let _d = fx.start();
    qemu_io(
        &uri,
        &[
            "read -P 0x42 0 1M",
            "write -P 0x44 2M 1M",
            "flush",
            "read -P 0x44 2M 1M",
        ],
    );
    assert_eq!(write_back_error(&fx, "r"), "");
}

/// A write the backend holds past the timeout (EIO to the client) and
/// applies only later (`py/hostile_nbd.py`'s stale-write). A newer write
/// to the same block must not be acknowledged and then silently replaced:
/// the range is fenced (EIO) while writes elsewhere go on, the FLUSH fails
/// (durability is gone once a write may still land), and status says why.
#[test]
fn timed_out_write_cannot_silently_overwrite_a_flushed_one() {
    let mut fx = Fixture::new();
    let mode = fx.path("hostile.mode");
    let record = fx.path("hostile.writes");
    let backend = Backend::hostile(&fx, "be", 80 << 20, &mode, &record);
    remote_fixture(&mut fx, &backend.uri(), "64M", "backing_timeout = \"2s\"");
    let d = fx.start();
    let uri = fx.uri("r");
    qemu_io(&uri, &["write -P 0x11 0 1M"]);
    std::fs::write(&mode, "stale-write").expect("set the backend's mode");
    let script = r"
h = nbd.NBD()
h.connect_uri(sys.argv[1])
try:
    h.pwrite(b'\xaa' * 4096, 0)
    raise SystemExit('the held write succeeded')
except nbd.Error as e:
    assert errno_of(e) == errno.EIO, e
try:
    h.pwrite(b'\xbb' * 4096, 0)
    raise SystemExit('a write over the timed-out one was accepted')
except nbd.Error as e:
    assert errno_of(e) == errno.EIO, e
h.pwrite(b'\xcc' * 4096, 1 << 20)
assert h.pread(4096, 1 << 20) == b'\xcc' * 4096
try:
    h.flush()
    flushed = True
except nbd.Error as e:
    assert errno_of(e) == errno.EIO, e
    flushed = False
print('flushed' if flushed else 'flush failed')
print('OK')
";
    let out = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(format!("{NBD_PRELUDE}{script}"))
        .arg(&uri)
        .output()
        .expect("python3");
    let text = output_text(&out);
    assert!(
        text.contains("OK") && text.contains("flush failed"),
        "{text}\n{}\n{}",
        d.stderr(),
        backend.log()
    );
    let why = write_back_error(&fx, "r");
    assert!(why.contains("timed out"), "{why}");
    std::fs::write(&mode, "good").expect("set the backend's mode");
    assert_eq!(d.stop(), 0);
    let _d = fx.start();
    qemu_io(
        &uri,
        &["write -P 0x22 2M 64k", "flush", "read -P 0x22 2M 64k"],
    );
}

/// The `failed` reason `status` gives for volume `r`, if any.
fn failure(fx: &Fixture) -> String {
    fx.status()["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == "r"))
        .and_then(|v| v["failed"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// A second fixture whose daemon reaches `first`'s remote volume `r`
/// (same KEK, its own socket, control socket and state directory: another
/// hostcryptd, as on another host); `extra` goes into the volume's table.
fn second_daemon_fixture(first: &Fixture, backend: &str, extra: &str) -> Fixture {
    let mut fx = Fixture::new();
    std::fs::copy(first.path("kek.key"), fx.path("kek.key")).expect("share the KEK");
    fx.volume_at("r", "cache", Path::new(backend), extra);
    let control = format!("control = \"{}\"", fx.path("control.sock").display());
    fx.write_config(&control);
    fx
}

/// One owner per remote backing (`volume/claim.rs`): a second daemon is
/// refused while the first serves; `take_over = true` takes it over, and
/// the first stops I/O within seconds instead of writing on; the first's
/// stop does not write over the new owner's header; a clean stop releases
/// the backing; the CLI refuses to format a served one; and a daemon
/// killed with -9 reopens its own backing without `take_over`.
#[test]
fn a_remote_backing_has_one_owner() {
    let mut fx = Fixture::new();
    let image = sparse_image(&fx, "backend.img", 80);
    let backend = Backend::nbdkit_file(&fx, "be", &image);
    remote_fixture(&mut fx, &backend.uri(), "64M", "");
    let first = fx.start();
    let uri = fx.uri("r");
    qemu_io(&uri, &["write -P 0x5a 0 1M", "flush"]);

    // Another daemon: refused, naming the owner; the first serves on.
    let other = second_daemon_fixture(&fx, &backend.uri(), "");
    let refused = other.start_with_unavailable("r");
    let log = refused.stderr();
    assert!(
        log.contains("served by another hostcryptd") && log.contains("take_over"),
        "{log}"
    );
    assert_eq!(refused.stop(), 0);
    let out = fx.cli(&["create", "r", "--size", "64M", "--force"]);
    let text = output_text(&out);
    assert!(
        !out.status.success(),
        "create --force on a served remote backing: {text}"
    );
    assert!(text.contains("a hostcryptd serves it"), "{text}");
    qemu_io(&uri, &["read -P 0x5a 0 1M"]);

    // take_over = true: the second serves the data, the first stops.
    let taker = second_daemon_fixture(&fx, &backend.uri(), "take_over = true");
    let second = taker.start();
    let taken_uri = taker.uri("r");
    qemu_io(
        &taken_uri,
        &["read -P 0x5a 0 1M", "write -P 0x6b 1M 1M", "flush"],
    );
    wait_until(
        "the first daemon to see the take-over",
        Duration::from_secs(10),
        || failure(&fx).contains("taken over"),
    );
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x77 1M 4k", &uri])
        .output()
        .expect("qemu-io");
    assert!(
        output_text(&out).contains("Input/output error"),
        "the replaced owner still writes: {}",
        output_text(&out)
    );
    // Its stop writes nothing over the new owner's header.
    first.stop();
    qemu_io(
        &taken_uri,
        &[
            "read -P 0x5a 0 1M",
            "read -P 0x6b 1M 1M",
            "write -P 0x6c 2M 4k",
            "flush",
        ],
    );
    assert_eq!(failure(&taker), "", "{}", second.stderr());

    // A clean stop releases it: the first daemon opens it without take_over.
    assert_eq!(second.stop(), 0);
    let owner = inspect_json(Path::new(&backend.uri()))["owner"].clone();
    assert_eq!(owner["released"], true, "{owner}");
    assert_eq!(inspect_json(Path::new(&backend.uri()))["format_version"], 3);
    let first = fx.start();
    qemu_io(&uri, &["read -P 0x6b 1M 1M", "read -P 0x6c 2M 4k"]);
    assert_eq!(failure(&fx), "");

    // kill -9: its own record, not released, is still its own to reopen.
    drop(first); // SIGKILL (the harness's Drop)
    let _first = fx.start();
    qemu_io(&uri, &["read -P 0x6b 1M 1M"]);
    assert_eq!(failure(&fx), "");
}

/// The write lease (`io/remote/client/lease.rs`): a daemon cut off from
/// the storage (its path to it frozen, so whatever it sends lands later)
/// holds the writes its clients send once its lease runs out instead of
/// sending them. Another daemon takes the volume over (through its own
/// path to the same storage) and writes; when the frozen path comes back,
/// the first daemon reads the new record, fails the held write and its
/// volume, and the new owner's data stays. Without the lease, the first
/// daemon's write would have sat in the frozen server's socket and landed
/// over the new owner's.
#[test]
fn a_daemon_cut_off_from_the_storage_sends_no_write_after_its_lease() {
    let mut fx = Fixture::new();
    let image = sparse_image(&fx, "backend.img", 80);
    // Two servers of one image: two hosts' paths to the same storage.
    let path_a = Backend::nbdkit_file(&fx, "path-a", &image);
    let path_b = Backend::nbdkit_file(&fx, "path-b", &image);
    // The watchdog must not end the stall first.
    remote_fixture(&mut fx, &path_a.uri(), "64M", "backing_timeout = \"120s\"");
    let _first = fx.start();
    let uri = fx.uri("r");
    qemu_io(&uri, &["write -P 0x5a 0 1M", "flush"]);
    assert_eq!(remote_status(&fx)["write_lease"], "valid");

    path_a.pause();
    wait_until(
        "the first daemon's write lease to run out",
        Duration::from_secs(20),
        || remote_status(&fx)["write_lease"] == "held",
    );
    let late_write = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x77 0 64k", &uri])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("qemu-io");
    wait_until("the late write to be held", Duration::from_secs(20), || {
        remote_status(&fx)["writes_held"].as_u64() > Some(0)
    });

    let taker = second_daemon_fixture(&fx, &path_b.uri(), "take_over = true");
    let _second = taker.start();
    let taken_uri = taker.uri("r");
    qemu_io(
        &taken_uri,
        &["read -P 0x5a 0 1M", "write -P 0x6b 0 1M", "flush"],
    );

    path_a.resume();
    wait_until(
        "the first daemon to see the take-over",
        Duration::from_secs(20),
        || failure(&fx).contains("taken over"),
    );
    let out = late_write.wait_with_output().expect("qemu-io");
    assert!(
        output_text(&out).contains("Input/output error"),
        "the held write: {}",
        output_text(&out)
    );
    assert_eq!(remote_status(&fx)["write_lease"], "revoked");
    qemu_io(&taken_uri, &["read -P 0x6b 0 1M"]);
    assert_eq!(failure(&taker), "");
}
