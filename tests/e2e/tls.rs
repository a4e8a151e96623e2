//! NBD over TLS and per-volume access control, with real clients: qemu-io
//! with tls-creds-x509, nbdinfo/nbdcopy/fio with `nbds://` URIs, and raw
//! probes for what those clients hide. Every refusal runs while a good
//! client is being served, and checks the refused client saw no data.

use std::process::Command;
use std::time::Duration;

use hostcrypt_e2e::tls::{free_port, Certs};
use hostcrypt_e2e::*;

const ALLOWED_DN: &str = "dn:CN=vm-17,O=Example";

/// A TLS fixture: volume `v` (cache, 64 MiB) on a `require` listener,
/// allowed to the `client` certificate and to root on the Unix socket.
fn setup(extra_server: &str) -> (Fixture, Certs, u16, Daemon) {
    let mut fx = Fixture::new();
    let certs = Certs::make(&fx);
    let port = free_port();
    fx.volume(
        "v",
        "cache",
        &format!("allow = [\"{ALLOWED_DN}\", \"uid:0\"]"),
    );
    fx.volume(
        "w",
        "temp",
        "size = \"16M\"\nallow = [\"dn:CN=vm-99,O=Example\"]",
    );
    fx.write_config(&format!(
        "{}{}\n{extra_server}",
        certs.server_lines(port, "require"),
        fx.control_and_audit()
    ));
    fx.create("v", "64M", 4096);
    let d = fx.start();
    (fx, certs, port, d)
}

/// The good client (`client` certificate) reads back a pattern it wrote.
fn good_client_works(certs: &Certs, port: u16, pattern: u8) {
    let uri = certs.uri(port, "v", "client");
    let script = format!(
        "h = nbd.NBD()\nh.set_uri_allow_local_file(True)\nh.connect_uri(sys.argv[1])\nh.pwrite(bytes([{pattern}]) * 65536, 1 << 20)\nassert h.pread(65536, 1 << 20) == bytes([{pattern}]) * 65536\nh.shutdown()\nprint('OK')\n"
    );
    python_nbd(&script, &uri);
}

fn nbdinfo_fails(uri: &str) -> String {
    let out = Command::new("nbdinfo")
        .arg(uri)
        .output()
        .expect("run nbdinfo");
    let text = output_text(&out);
    assert!(!out.status.success(), "nbdinfo succeeded: {text}");
    assert!(
        !text.contains("export-size"),
        "refused client saw the export: {text}"
    );
    text
}

fn probe(args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/tls_probe.py");
    let out = run_ok(Command::new("/usr/bin/python3").arg(script).args(args));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.lines().any(|l| l == "OK"), "{text}");
    text
}

#[test]
fn qemu_io_over_tls_aligned_and_unaligned() {
    require_tool("qemu-io");
    let (_fx, certs, port, _d) = setup("");
    let image = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=v,tls-creds=tls0"
    );
    let object = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        certs.dir("client").display()
    );
    let commands = [
        "write -P 0xa5 0 1M",
        "write -P 0x5a 1000 3333",
        "write -P 0x77 8191 2",
        "read -P 0xa5 0 1000",
        "read -P 0x5a 1000 3333",
        "read -P 0xa5 4333 3858",
        "read -P 0x77 8191 2",
        "read -P 0xa5 8193 1040383",
        "flush",
    ];
    let mut cmd = Command::new("qemu-io");
    cmd.args(["--object", &object, "--image-opts"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = run_ok(cmd.arg(&image));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("verification failed"), "{text}");
    assert_eq!(text.matches("read ").count(), 5, "{text}");
}

#[test]
fn nbdcopy_256m_round_trip_over_tls() {
    require_tool("nbdcopy");
    let mut fx = Fixture::new();
    let certs = Certs::make(&fx);
    let port = free_port();
    fx.volume("big", "cache", &format!("allow = [\"{ALLOWED_DN}\"]"));
    fx.write_config(&certs.server_lines(port, "require"));
    fx.create("big", "256M", 4096);
    let _d = fx.start();
    let uri = certs.uri(port, "big", "client");
    let out = run_ok(Command::new("nbdinfo").arg("--json").arg(&uri));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nbdinfo JSON");
    assert_eq!(info["TLS"], true, "{info}");
    assert_eq!(info["exports"][0]["export-size"], 256 << 20);

    let input = fx.path("in.bin");
    let mut data = vec![0u8; 256 << 20];
    getrandom::fill(&mut data).unwrap();
    std::fs::write(&input, &data).unwrap();
    drop(data);
    run_ok(Command::new("nbdcopy").arg(&input).arg(&uri));
    let output = fx.path("out.bin");
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&output));
    assert_eq!(sha256_file(&input), sha256_file(&output));
}

/// fio's nbd engine refuses `tls-certificates=` in a URI (libnbd's local
/// file rule), so it runs as `nobody` with the client credentials where
/// libnbd looks by default for non-root users: `$HOME/.pki/libnbd`.
#[test]
fn fio_verify_over_tls_two_connections() {
    require_tool("fio");
    require_tool("setpriv");
    let (fx, certs, port, _d) = setup("");
    let home = fx.path("fio-home");
    let pki = home.join(".pki/libnbd");
    std::fs::create_dir_all(&pki).unwrap();
    for file in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
        std::fs::copy(certs.dir("client").join(file), pki.join(file)).unwrap();
    }
    run_ok(Command::new("chown").args(["-R", "65534:65534"]).arg(&home));
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(fx.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = run_ok(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "fio"])
            .env("HOME", &home)
            .current_dir(&home)
            .args(fio_verify_args(
                &format!("nbds://localhost:{port}/v"),
                "16M",
                "32M",
            )),
    );
    let jobs = fio_jobs(&out);
    assert_eq!(jobs.len(), 2);
    for job in jobs {
        assert!(
            job["read"]["io_bytes"].as_u64().unwrap() >= 16 << 20,
            "{job}"
        );
    }
}

/// Every kind of unwelcome client is turned away before it sees an
/// export, each is logged with its identity, and the good client is
/// served between them.
#[test]
fn refused_clients_see_nothing_while_a_good_client_is_served() {
    let (fx, certs, port, d) = setup("");
    let port_s = port.to_string();
    good_client_works(&certs, port, 0x11);

    // Plaintext against `require`: every option but STARTTLS/ABORT is
    // answered NBD_REP_ERR_TLS_REQD; nothing is listed or opened.
    let seen = probe(&["plaintext", "127.0.0.1", &port_s]);
    for line in [
        "LIST ERR_TLS_REQD",
        "INFO ERR_TLS_REQD",
        "GO ERR_TLS_REQD",
        "ABORT ACK",
    ] {
        assert!(seen.contains(line), "{line}: {seen}");
    }
    nbdinfo_fails(&format!("nbd://127.0.0.1:{port}/v"));
    good_client_works(&certs, port, 0x12);

    for client in ["nocert", "rogue", "expired", "revoked"] {
        nbdinfo_fails(&certs.uri(port, "v", client));
        good_client_works(&certs, port, 0x13);
    }
    let log = d.stderr();
    assert!(log.contains("peer sent no certificates"), "{log}");
    assert!(log.contains("certificate expired"), "{log}");
    assert!(log.contains("Revoked"), "{log}");

    // A valid certificate whose DN is not in the allow list: ERR_POLICY,
    // and the volume is absent from its OPT_LIST (w, which allows it, is there).
    let text = nbdinfo_fails(&certs.uri(port, "v", "other"));
    assert!(text.contains("opt_go"), "{text}");
    let other = probe(&[
        "list",
        "127.0.0.1",
        &port_s,
        &certs.dir("other").to_string_lossy(),
    ]);
    assert!(other.contains("EXPORTS w\n"), "{other}");
    let good = probe(&[
        "list",
        "127.0.0.1",
        &port_s,
        &certs.dir("client").to_string_lossy(),
    ]);
    assert!(good.contains("EXPORTS v\n"), "{good}");
    assert!(good.contains("STARTTLS_AGAIN ERR_INVALID"), "{good}");
    wait_until("the DN refusal is logged", Duration::from_secs(10), || {
        d.stderr()
            .contains("refused: the peer is not in this volume's allow list")
            && d.stderr().contains("dn=\"CN=vm-99,O=Example\"")
    });

    // Garbage instead of a ClientHello: closed, counted.
    let garbage = probe(&["garbage", "127.0.0.1", &port_s]);
    assert!(garbage.contains("CLOSED"), "{garbage}");
    good_client_works(&certs, port, 0x14);

    let status = fx.status();
    let c = &status["connections"];
    assert!(c["refused_tls_required"].as_u64().unwrap() >= 2, "{c}");
    assert!(c["tls_failures"].as_u64().unwrap() >= 5, "{c}");
    let v = status["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "v")
        .unwrap()
        .clone();
    assert!(v["refused"].as_u64().unwrap() >= 1, "{v}");
    assert_eq!(
        v["allow"],
        serde_json::json!(["dn:CN=vm-17,O=Example", "uid:0"])
    );
    assert_eq!(status["listeners"][1]["tls"], "require", "{status}");
    assert_eq!(status["tls"]["server_subject"], "CN=hostcrypt,O=Example");
}

/// A client that stops mid-handshake holds nothing: the handshake
/// deadline closes it, and others are served meanwhile.
#[test]
fn stalled_tls_handshake_is_closed_by_the_deadline() {
    let (_fx, certs, port, d) = setup("handshake_timeout = \"2s\"");
    let port_s = port.to_string();
    let stall = std::thread::spawn(move || probe(&["stall", "127.0.0.1", &port_s]));
    good_client_works(&certs, port, 0x21);
    let seen = stall.join().expect("probe thread");
    let secs: f64 = seen
        .lines()
        .find_map(|l| l.strip_prefix("CLOSED "))
        .and_then(|s| s.parse().ok())
        .expect("CLOSED line");
    assert!(secs < 30.0, "closed after {secs} s: {seen}");
    assert!(d.stderr().contains("handshake timed out"), "{}", d.stderr());
}

/// Unix peers are identified by SO_PEERCRED: `nobody` is not in the
/// allow list and is refused, root is.
#[test]
fn unix_peer_outside_the_allow_list_is_refused() {
    require_tool("setpriv");
    let (fx, _certs, _port, d) = setup("");
    // Let `nobody` reach the socket at all: the allow list must be what stops it.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(fx.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&fx.socket, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "nbdinfo",
        ])
        .arg(fx.uri("v"))
        .output()
        .expect("setpriv nbdinfo");
    let text = output_text(&out);
    assert!(!out.status.success(), "nobody opened the volume: {text}");
    assert!(!text.contains("export-size"), "{text}");
    wait_until("the uid refusal is logged", Duration::from_secs(10), || {
        d.stderr().contains("peer=unix uid=65534")
    });
    let out = run_ok(Command::new("nbdinfo").arg("--size").arg(fx.uri("v")));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        (64u64 << 20).to_string()
    );
}

#[test]
fn daemon_refuses_plaintext_beyond_loopback_and_a_readable_key() {
    let mut fx = Fixture::new();
    let certs = Certs::make(&fx);
    fx.volume("t", "temp", "size = \"16M\"");
    let port = free_port();
    fx.write_config(&format!("tcp = \"0.0.0.0:{port}\""));
    let mut d = fx.spawn();
    assert_ne!(d.wait(Duration::from_secs(30)), 0);
    let log = d.stderr();
    assert!(
        log.contains("0.0.0.0")
            && log.contains("tls = \"require\"")
            && log.contains("insecure_plaintext_tcp"),
        "{log}"
    );
    // The explicit opt-out works.
    fx.write_config(&format!(
        "tcp = \"0.0.0.0:{port}\"\ninsecure_plaintext_tcp = true"
    ));
    let d = fx.start();
    assert_eq!(d.stop(), 0);

    use std::os::unix::fs::PermissionsExt;
    let key = certs.dir("server").join("server-key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    fx.write_config(&certs.server_lines(port, "require"));
    let mut d = fx.spawn();
    assert_ne!(d.wait(Duration::from_secs(30)), 0);
    let log = d.stderr();
    assert!(
        log.contains(&key.display().to_string()) && log.contains("0644"),
        "{log}"
    );
    let out = fx.check();
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("chmod 600"),
        "{}",
        output_text(&out)
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = fx.check();
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("CN=hostcrypt,O=Example") && text.contains("CRL revokes 1"),
        "{text}"
    );
}

/// `hostcrypt reload` re-reads the certificates and the allow lists: a new
/// connection sees the new server certificate and the new list, while a
/// connection opened before keeps reading correct data.
#[test]
fn reload_swaps_certificate_and_allow_list_and_open_connections_keep_serving() {
    let (mut fx, certs, port, _d) = setup("");
    let port_s = port.to_string();
    let client_dir = certs.dir("client").to_string_lossy().into_owned();
    let before = probe(&["list", "127.0.0.1", &port_s, &client_dir]);
    assert!(before.contains("SERVER_CN hostcrypt\n"), "{before}");

    // An open connection: writes, then keeps reading through the reload.
    let uri = certs.uri(port, "v", "client");
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let reader = std::thread::spawn(move || {
        let script = "h = nbd.NBD()\nh.set_uri_allow_local_file(True)\nh.connect_uri(sys.argv[1])\nh.pwrite(b'\\x42' * 1048576, 0)\nprint('READY', flush=True)\nsys.stdin.readline()\nfor i in range(50):\n    assert h.pread(1048576, 0) == b'\\x42' * 1048576\nh.shutdown()\nprint('OK')\n";
        let prelude = "import sys, nbd\n";
        let mut child = Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(format!("{prelude}{script}"))
            .arg(&uri)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python reader");
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
        assert_eq!(line.trim(), "READY");
        ready_tx.send(()).unwrap();
        go_rx.recv().unwrap();
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"go\n").unwrap();
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        rest
    });
    ready_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("reader connected");

    // New server certificate in place, and `v` now allowed to vm-99 only.
    for file in ["server-cert.pem", "server-key.pem"] {
        std::fs::copy(
            certs.dir("server2").join(file),
            certs.dir("server").join(file),
        )
        .unwrap();
    }
    fx.remove_volume("v");
    fx.remove_volume("w");
    fx.volume("v", "cache", "allow = [\"dn:CN=vm-99,O=Example\"]");
    fx.volume(
        "w",
        "temp",
        "size = \"16M\"\nallow = [\"dn:CN=vm-99,O=Example\"]",
    );
    fx.write_config(&format!(
        "{}{}\n",
        certs.server_lines(port, "require"),
        fx.control_and_audit()
    ));
    let out = fx.cli(&["reload"]);
    assert!(out.status.success(), "{}", output_text(&out));

    let after = probe(&["list", "127.0.0.1", &port_s, &client_dir]);
    assert!(after.contains("SERVER_CN hostcrypt-2\n"), "{after}");
    assert!(after.contains("EXPORTS \n"), "vm-17 still sees v: {after}");
    let other = probe(&[
        "list",
        "127.0.0.1",
        &port_s,
        &certs.dir("other").to_string_lossy(),
    ]);
    assert!(other.contains("EXPORTS v,w\n"), "{other}");

    go_tx.send(()).unwrap();
    let seen = reader.join().expect("reader thread");
    assert!(seen.contains("OK"), "{seen}");
}
