//! What clients see of the protocol: negotiated flags and block sizes, the
//! TCP transport, and discards when a volume opts in.

use std::process::Command;

use hostcrypt_e2e::*;

fn nbdinfo_json(uri: &str) -> serde_json::Value {
    let out = run_ok(Command::new("nbdinfo").arg("--json").arg(uri));
    serde_json::from_slice(&out.stdout).expect("nbdinfo JSON")
}

#[test]
fn nbdinfo_sees_block_sizes_and_flags() {
    require_tool("nbdinfo");
    let mut fx = Fixture::new();
    fx.volume("plain", "cache", "description = \"build cache\"");
    fx.volume(
        "disc",
        "temp",
        "size = \"8M\"\nsector_size = 512\nallow_discards = true",
    );
    fx.create("plain", "16M", 4096);
    let _d = fx.start();

    let info = nbdinfo_json(&fx.uri("plain"));
    let export = &info["exports"][0];
    assert_eq!(export["export-size"], 16 << 20);
    assert_eq!(export["description"], "build cache");
    assert_eq!(export["block_size_minimum"], 1);
    assert_eq!(export["block_size_preferred"], 4096);
    assert_eq!(export["block_size_maximum"], 32 << 20);
    assert_eq!(export["can_multi_conn"], true);
    assert_eq!(export["can_flush"], true);
    assert_eq!(export["can_fua"], true);
    assert_eq!(export["can_zero"], true);
    assert_eq!(
        export["can_trim"], false,
        "TRIM must be off unless allow_discards"
    );

    let info = nbdinfo_json(&fx.uri("disc"));
    assert_eq!(info["exports"][0]["can_trim"], true);
    assert_eq!(info["exports"][0]["block_size_preferred"], 512);

    // With several volumes the empty export name selects none: which is
    // "first" changes with a reload, and a reconnecting client must not
    // land on another volume.
    let out = Command::new("nbdinfo")
        .arg("--size")
        .arg(format!("nbd+unix:///?socket={}", fx.socket.display()))
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", output_text(&out));
    let out = run_ok(
        Command::new("nbdinfo")
            .arg("--list")
            .arg(format!("nbd+unix://?socket={}", fx.socket.display())),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("plain") && text.contains("disc"), "{text}");
}

#[test]
fn discards_punch_holes_and_read_back_as_zeros() {
    let mut fx = Fixture::new();
    let backing = fx.volume("disc", "temp", "size = \"16M\"\nallow_discards = true");
    let _d = fx.start();
    let script = r#"
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(b"\xee" * (8 << 20), 0)
h.flush()
h.trim(2 << 20, 4 << 20)
h.zero(1000, 1 << 20)
assert h.pread(2 << 20, 4 << 20) == b"\0" * (2 << 20)
assert h.pread(1 << 20, 1 << 20) == b"\0" * 1000 + b"\xee" * ((1 << 20) - 1000)
assert h.pread(1 << 20, 0) == b"\xee" * (1 << 20)
h.flush()
print("OK")
"#;
    python_nbd(script, &fx.uri("disc"));
    // The trimmed 2 MiB really became a hole: fewer blocks than 8 MiB of data.
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&backing).unwrap().blocks() * 512;
    assert!(
        allocated < (7 << 20),
        "backing still holds {allocated} bytes after trim"
    );
}

#[test]
fn tcp_listener_serves_qemu() {
    require_tool("qemu-io");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut fx = Fixture::new();
    // Loopback is not a trust boundary: the address must be allowed.
    fx.volume("net", "cache", "allow = [\"127.0.0.1\", \"uid:0\"]");
    fx.write_config(&format!("tcp = \"127.0.0.1:{port}\""));
    fx.create("net", "16M", 4096);
    let _d = fx.start();
    wait_until("TCP listener", std::time::Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let uri = format!("nbd://127.0.0.1:{port}/net");
    qemu_io(
        &uri,
        &["write -P 0x19 12345 100000", "read -P 0x19 12345 100000"],
    );
    // The same data through the Unix socket: one volume, two transports.
    qemu_io(&fx.uri("net"), &["read -P 0x19 12345 100000"]);
}

/// Whether this kernel lets this process set up an io_uring (seccomp,
/// `kernel.io_uring_disabled` and old kernels refuse it), probed here
/// independently of the daemon.
pub(crate) fn kernel_allows_io_uring() -> bool {
    // io_uring_setup(2) with one entry and zeroed params; 425 on x86_64.
    let mut params = [0u8; 120];
    // SAFETY: the params buffer is larger than struct io_uring_params (120
    // bytes) and lives across the call; a returned fd is closed at once.
    let fd = unsafe { libc::syscall(425, 1u32, params.as_mut_ptr()) };
    if fd < 0 {
        return false;
    }
    // SAFETY: fd is a descriptor this function just opened and owns.
    unsafe { libc::close(fd as i32) };
    true
}

#[test]
fn runs_on_the_configured_io_engine() {
    let mut fx = Fixture::new();
    fx.volume("e", "temp", "size = \"8M\"");
    let d = fx.start();
    qemu_io(&fx.uri("e"), &["write -P 0x44 0 64k", "read -P 0x44 0 64k"]);
    let log = d.stderr();
    let expected = match io_engine().as_str() {
        // auto prefers io_uring: it may fall back only where the kernel
        // refuses io_uring, which the test checks for itself.
        "auto" | "uring" if kernel_allows_io_uring() => "uring",
        "auto" => "threads",
        "uring" => {
            skip("this kernel refuses io_uring");
            return;
        }
        other => other,
    }
    .to_string();
    assert!(log.contains(&format!("engine=\"{expected}\"")), "{log}");
}

/// A forced `io_engine = "uring"` really runs on io_uring (whatever the
/// suite's engine), serving real I/O: `auto` cannot hide a fallback here.
#[test]
fn forced_uring_engine_runs_on_io_uring() {
    if !kernel_allows_io_uring() {
        skip("this kernel refuses io_uring");
        return;
    }
    let mut fx = Fixture::new();
    fx.set_io_engine("uring");
    fx.volume("u", "temp", "size = \"8M\"");
    let d = fx.start();
    qemu_io(
        &fx.uri("u"),
        &["write -P 0x45 4097 65536", "read -P 0x45 4097 65536"],
    );
    let log = d.stderr();
    assert!(log.contains("engine=\"uring\""), "{log}");
    assert!(!log.contains("io_uring is not available"), "{log}");
}

/// Plaintext connections live on a ring by default and with
/// `ring_connections = true`, on a tokio task with `false`: the connect
/// line names the reader.
#[test]
fn plaintext_connections_live_on_a_ring_unless_configured_off() {
    if !kernel_allows_io_uring() {
        skip("this kernel refuses io_uring");
        return;
    }
    for (extra, reader) in [
        // Names the option only so that the harness adds no line of its
        // own (HOSTCRYPT_E2E_RING_CONNECTIONS): the default is tested.
        ("# ring_connections: the default\n", "ring"),
        ("ring_connections = true\n", "ring"),
        ("ring_connections = false\n", "task"),
    ] {
        let mut fx = Fixture::new();
        fx.set_io_engine("uring");
        fx.volume("r", "temp", "size = \"8M\"");
        fx.write_config(extra);
        let d = fx.start();
        qemu_io(
            &fx.uri("r"),
            &["write -P 0x52 0 1M", "read -P 0x52 0 1M", "read -P 0 1M 1M"],
        );
        let log = d.stderr();
        assert!(
            log.contains(&format!("reader=\"{reader}\"")),
            "{extra}: {log}"
        );
    }
}
