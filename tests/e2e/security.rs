//! What the daemon refuses (issue "Distrust what it reads"): a local user
//! reaching a volume over loopback TCP, and key material in core dumps.
//! Each test performs the attack. The remote-backing doors are in
//! `remote.rs` and `durability.rs`.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use hostcrypt_e2e::tls::free_port;
use hostcrypt_e2e::*;

/// Loopback is not a trust boundary: `nobody` on the same host connects to
/// 127.0.0.1 and is refused by a volume that has no allow list, while the
/// Unix socket (root's) still serves it, and an allow entry naming the
/// address opens it.
#[test]
fn a_local_user_gets_nothing_over_loopback_tcp_without_an_allow_entry() {
    if !require_root("running a client as nobody") {
        return;
    }
    require_tool("setpriv");
    let port = free_port();
    let mut fx = Fixture::new();
    fx.volume("v", "cache", "");
    fx.write_config(&format!("tcp = \"127.0.0.1:{port}\""));
    fx.create("v", "16M", 4096);
    let d = fx.start();
    qemu_io(&fx.uri("v"), &["write -P 0x42 0 64k"]);
    let uri = format!("nbd://127.0.0.1:{port}/v");
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(args)
            .output()
            .expect("setpriv")
    };
    for attempt in [
        vec!["nbdinfo", uri.as_str()],
        vec![
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "read -P 0x42 0 64k",
            uri.as_str(),
        ],
    ] {
        let out = as_nobody(&attempt);
        let text = output_text(&out);
        assert!(!out.status.success(), "nobody read the volume: {text}");
        assert!(!text.contains("export-size"), "{text}");
    }
    wait_until("the refusal is logged", Duration::from_secs(10), || {
        d.stderr()
            .contains("a TCP peer without a verified client certificate")
    });
    assert_eq!(d.stop(), 0);

    // Named, it is served.
    fx.remove_volume("v");
    fx.volume("v", "cache", "allow = [\"127.0.0.1\"]");
    fx.write_config(&format!("tcp = \"127.0.0.1:{port}\""));
    let _d = fx.start();
    let out = as_nobody(&["qemu-io", "-f", "raw", "-c", "read -P 0x42 0 64k", &uri]);
    assert!(out.status.success(), "{}", output_text(&out));
}

/// A crash with core dumps enabled leaves no core file (which would hold
/// the local KEK and every DEK): the daemon makes itself non-dumpable and
/// its core limit zero before it loads a key.
#[test]
fn a_crash_leaves_no_core_file_holding_keys() {
    let pattern = std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap_or_default();
    let pattern = pattern.trim();
    let mut fx = Fixture::new();
    fx.volume("v", "cache", "");
    fx.write_config("");
    fx.create("v", "16M", 4096);
    let cores = fx.path("cores");
    std::fs::create_dir(&cores).unwrap();
    let mut command = Command::new(bin("hostcryptd"));
    command
        .arg("--config")
        .arg(&fx.config)
        .current_dir(&cores)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setrlimit is async-signal-safe and touches only a local.
    unsafe {
        command.pre_exec(|| {
            let unlimited = libc::rlimit {
                rlim_cur: libc::RLIM_INFINITY,
                rlim_max: libc::RLIM_INFINITY,
            };
            if libc::setrlimit(libc::RLIMIT_CORE, &unlimited) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().expect("spawn hostcryptd");
    wait_until("the daemon listens", Duration::from_secs(30), || {
        std::os::unix::net::UnixStream::connect(&fx.socket).is_ok()
    });
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let core_line = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap_or_default()
        .to_owned();
    // SAFETY: kill(2) with our own child's pid and a valid signal number.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGABRT);
    }
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGABRT), "{status}");
    assert!(
        core_line.split_whitespace().filter(|w| *w == "0").count() == 2,
        "core limit not zero: {core_line}"
    );
    // Where the kernel writes cores into the working directory, look.
    if pattern.starts_with('|') || pattern.starts_with('/') {
        skip(&format!(
            "core_pattern {pattern:?} does not write into the working directory"
        ));
        return;
    }
    let left: Vec<_> = std::fs::read_dir(&cores)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "a core file was written: {left:?}");
}

/// Every number in a control request is bounded: a re-encryption rate the
/// pacing cannot turn into a duration (1e-20 MB/s, NaN) is refused with a
/// message, instead of panicking the worker and leaving the job "running"
/// for ever.
#[test]
fn an_absurd_reencryption_rate_is_refused() {
    let mut fx = Fixture::new();
    fx.volume("v", "cache", "");
    fx.write_config(&fx.control_and_audit());
    fx.create("v", "16M", 4096);
    let d = fx.start();
    qemu_io(&fx.uri("v"), &["write -P 0x5a 0 4M"]);
    for rate in ["1e-20", "NaN", "inf"] {
        let out = fx.cli(&["reencrypt", "v", "--rate", rate]);
        let text = output_text(&out);
        assert!(!out.status.success(), "--rate {rate} accepted: {text}");
        assert!(text.contains("MB/s"), "--rate {rate}: {text}");
    }
    let status = fx.cli(&["reencrypt", "v", "--status"]);
    assert!(
        !output_text(&status).contains("running"),
        "{}",
        output_text(&status)
    );
    qemu_io(&fx.uri("v"), &["read -P 0x5a 0 4M"]);
    assert!(!d.stderr().contains("panicked"), "{}", d.stderr());
}

/// `control_read_group` may read and nothing else: a member (by a
/// supplementary group, which the daemon reads with SO_PEERGROUPS rather
/// than from /proc after accept) gets `status` and `check-key`, and is
/// refused `reload`, `rotate-kek` and starting a re-encryption; a user in
/// neither group gets nothing.
#[test]
fn the_read_only_control_role_reads_and_changes_nothing() {
    require_tool("setpriv");
    if !require_root("running clients as other users") {
        return;
    }
    let mut fx = Fixture::new();
    fx.volume("c", "cache", "");
    fx.write_config(&format!(
        "{}\ncontrol_read_group = \"65534\"",
        fx.control_and_audit()
    ));
    fx.create("c", "16M", 4096);
    let d = fx.start();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(fx.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&fx.config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cli = fx.path("hostcrypt");
    std::fs::copy(bin("hostcrypt"), &cli).unwrap();
    std::fs::set_permissions(&cli, std::fs::Permissions::from_mode(0o755)).unwrap();
    // uid 65534 whose primary group is 1 and supplementary group 65534.
    let run = |ids: &[&str], args: &[&str]| {
        let out = output_when_not_busy(
            Command::new("setpriv")
                .args(ids)
                .arg(&cli)
                .arg("--config")
                .arg(&fx.config)
                .args(args),
        );
        (out.status.code(), output_text(&out))
    };
    let reader = ["--reuid=65534", "--regid=1", "--groups=65534"];
    for args in [
        &["status"][..],
        &["check-key", "c"],
        &["reencrypt", "c", "--status"],
    ] {
        let (code, text) = run(&reader, args);
        assert_eq!(code, Some(0), "{args:?}: {text}");
    }
    for args in [&["reload"][..], &["rotate-kek", "c"], &["reencrypt", "c"]] {
        let (code, text) = run(&reader, args);
        assert_ne!(code, Some(0), "{args:?} allowed: {text}");
        assert!(
            text.contains("control_read_group may only read"),
            "{args:?}: {text}"
        );
    }
    let stranger = ["--reuid=65534", "--regid=1", "--clear-groups"];
    let (code, text) = run(&stranger, &["status"]);
    assert_ne!(code, Some(0), "{text}");
    assert!(text.contains("permission denied"), "{text}");
    assert!(!d.stderr().contains("panicked"));
    // Nothing changed: no re-encryption, no rotation in the audit log.
    let audit = std::fs::read_to_string(fx.audit_log()).unwrap_or_default();
    assert!(!audit.contains("\"reencrypt\""), "{audit}");
    assert!(!audit.contains("\"rotate\""), "{audit}");
}

/// A remote backend that accepts and then says nothing (or trickles its
/// handshake) does not hold up the daemon: the listeners bind and the
/// local volume serves at once, while `status` shows the remote volume
/// as connecting. It used to leave the daemon without a socket for as
/// long as the backend stalled.
#[test]
fn a_silent_remote_backend_does_not_hold_up_the_start() {
    let mut fx = Fixture::new();
    let silent = fx.path("silent.sock");
    let _server = Killed(
        Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(
                "import socket, sys, time\n\
s = socket.socket(socket.AF_UNIX)\n\
s.bind(sys.argv[1])\n\
s.listen(8)\n\
held = []\n\
while True:\n    held.append(s.accept()[0])\n",
            )
            .arg(&silent)
            .spawn()
            .expect("python3"),
    );
    wait_until("the silent server listens", Duration::from_secs(10), || {
        silent.exists()
    });
    fx.volume("local", "cache", "");
    let uri = format!("nbd+unix:///x?socket={}", silent.display());
    fx.volume_at("far", "cache", std::path::Path::new(&uri), "size = \"64M\"");
    fx.write_config(&format!(
        "control = \"{}\"",
        fx.path("control.sock").display()
    ));
    fx.create("local", "16M", 4096);
    let d = fx.spawn();
    wait_until("the daemon listens", Duration::from_secs(10), || {
        std::os::unix::net::UnixStream::connect(&fx.socket).is_ok()
    });
    qemu_io(
        &fx.uri("local"),
        &["write -P 0x5a 0 64k", "read -P 0x5a 0 64k"],
    );
    let far = fx.status()["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "far")
        .cloned()
        .unwrap();
    assert_eq!(far["unavailable"]["state"], "connecting", "{far}");
    assert!(d.stderr().contains("connecting off the start-up path"));
}

/// Idle TCP sockets from several loopback addresses, as many as
/// `max_connections`, cannot lock out a Unix-socket client: TCP peers never
/// take the Unix listener's reserve, and connections still in the
/// handshake have a pool of their own. They used to hold every slot.
#[test]
fn a_tcp_flood_does_not_lock_out_a_unix_client() {
    let port = free_port();
    let mut fx = Fixture::new();
    fx.volume("v", "cache", "allow = [\"127.0.0.0/8\", \"uid:0\"]");
    fx.write_config(&format!(
        "tcp = \"127.0.0.1:{port}\"\nmax_connections = 4\nmax_handshakes = 3"
    ));
    fx.create("v", "16M", 4096);
    let d = fx.start();
    let mut flood = Vec::new();
    for i in 1..=6u8 {
        let socket = socket2_connect([127, 0, 0, i], port);
        flood.push(socket);
    }
    let refused = || {
        d.stderr()
            .lines()
            // The harness's own probe of the Unix socket may still hold a
            // slot, so the refusal may name the total as well.
            .filter(|l| l.contains("refused: ") && l.contains("peer=tcp"))
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while refused() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the flood was not refused past the TCP share:\n{}",
            d.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    qemu_io(&fx.uri("v"), &["write -P 0x5a 0 64k", "read -P 0x5a 0 64k"]);
    drop(flood);
}

/// A TCP connection from `source` (any 127/8 address is local) that sends
/// nothing.
fn socket2_connect(source: [u8; 4], port: u16) -> std::net::TcpStream {
    // std cannot bind before connect; libc can.
    use std::os::fd::FromRawFd;
    // SAFETY: a fresh socket; every pointer below is to a live local of
    // the size passed; the descriptor is owned by the TcpStream returned.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let addr = |ip: [u8; 4], port: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(ip),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let from = addr(source, 0);
        assert_eq!(
            libc::bind(fd, (&from as *const libc::sockaddr_in).cast(), len),
            0
        );
        let to = addr([127, 0, 0, 1], port);
        assert_eq!(
            libc::connect(fd, (&to as *const libc::sockaddr_in).cast(), len),
            0
        );
        std::net::TcpStream::from_raw_fd(fd)
    }
}

/// A key file that another user owns is refused, whatever its mode: its
/// owner could chmod it or swap the key under the daemon.
#[test]
fn a_key_file_owned_by_another_user_is_refused() {
    if !require_root("giving a file to another user") {
        return;
    }
    let mut fx = Fixture::new();
    fx.volume("v", "cache", "");
    fx.write_config("");
    fx.create("v", "16M", 4096);
    std::os::unix::fs::chown(&fx.kek, Some(65534), None).unwrap();
    let out = fx.check();
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("owned by uid 65534"), "{text}");
    std::os::unix::fs::chown(&fx.kek, Some(0), None).unwrap();
    let out = fx.check();
    assert!(out.status.success(), "{}", output_text(&out));
}

/// A Vault address in plain http is refused unless the config says so:
/// the token and every unwrapped DEK would cross the network in clear.
#[test]
fn a_plain_http_vault_address_is_refused_unless_allowed() {
    let mut fx = Fixture::new();
    let token = fx.path("bao.token");
    std::fs::write(&token, "s.dev").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let table = |extra: &str| {
        format!(
            "[kek.bao]\nprovider = \"vault\"\naddress = \"http://127.0.0.1:1\"\nkey = \"k\"\ntoken_file = \"{}\"\n{extra}",
            token.display()
        )
    };
    fx.kek_tables.push(table(""));
    fx.volume("v", "cache", "");
    fx.write_config("");
    let check = fx.check();
    let text = output_text(&check);
    assert!(!check.status.success(), "{text}");
    assert!(text.contains("use https://"), "{text}");
    // Allowed: the address is accepted (the dev server is not running, so
    // the provider is then merely unreachable, not refused as insecure).
    fx.kek_tables = vec![table("insecure_http = true\n")];
    fx.write_config("");
    let check = fx.check();
    assert!(
        !output_text(&check).contains("use https://"),
        "{}",
        output_text(&check)
    );
}

/// A volume a client may not open answers GO, INFO and META_CONTEXT the
/// way a missing one does, so a client cannot learn which names exist (it
/// used to get ERR_POLICY for one and ERR_UNKNOWN for the other).
#[test]
fn a_refused_export_cannot_be_told_from_a_missing_one() {
    let mut fx = Fixture::new();
    fx.volume("v", "cache", "allow = [\"uid:12345\"]");
    fx.write_config("");
    fx.create("v", "16M", 4096);
    let _d = fx.start();
    let script = "\nimport socket, struct\n\
def ask(option, name):\n    \
s = socket.socket(socket.AF_UNIX)\n    \
s.connect(sys.argv[1])\n    \
assert s.recv(18, socket.MSG_WAITALL)[:8] == b'NBDMAGIC'\n    \
s.sendall(struct.pack('>I', 3))\n    \
if option == 10:\n        \
s.sendall(struct.pack('>QII', 0x49484156454F5054, 8, 0))\n        \
_, _, ack, length = struct.unpack('>QIII', s.recv(20, socket.MSG_WAITALL))\n        \
assert ack == 1 and length == 0, (ack, length)\n        \
data = struct.pack('>I', len(name)) + name + struct.pack('>I', 1) + struct.pack('>I', 15) + b'base:allocation'\n    \
else:\n        \
data = struct.pack('>I', len(name)) + name + struct.pack('>H', 0)\n    \
s.sendall(struct.pack('>QII', 0x49484156454F5054, option, len(data)) + data)\n    \
_, _, kind, length = struct.unpack('>QIII', s.recv(20, socket.MSG_WAITALL))\n    \
message = s.recv(length, socket.MSG_WAITALL).decode()\n    \
return kind, message.replace(name.decode(), 'NAME')\n\
for option in (6, 7, 10):\n    \
refused, missing = ask(option, b'v'), ask(option, b'w')\n    \
assert refused == missing, (option, refused, missing)\n    \
assert refused[0] == (1 << 31) | 6, hex(refused[0])\n\
print('OK')\n";
    python_nbd(script, &fx.socket.display().to_string());
}

/// A CRL past its nextUpdate may be missing revocations: it is refused
/// unless the config says to warn (then the daemon starts and says so).
#[test]
fn a_stale_crl_is_refused_unless_the_config_says_warn() {
    let mut fx = Fixture::new();
    let certs = hostcrypt_e2e::tls::Certs::make(&fx);
    fx.volume("v", "cache", "");
    let port = free_port();
    let server = |extra: &str| {
        format!(
            "tcp = \"127.0.0.1:{port}\"\ntls = \"require\"\ntls_certificates = \"{}\"\n{extra}",
            certs.dir("stalecrl").display()
        )
    };
    fx.write_config(&server(""));
    fx.create("v", "16M", 4096);
    let out = fx.check();
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("nextUpdate"), "{text}");
    fx.write_config(&server("tls_crl_expired = \"warn\""));
    let d = fx.start();
    wait_until(
        "the stale CRL is warned about",
        Duration::from_secs(10),
        || d.stderr().contains("the CRL has expired"),
    );
}

/// The empty export name selects the volume only when it is the only one
/// configured; otherwise a reconnecting client could land on whichever
/// volume a reload left first.
#[test]
fn the_empty_export_name_selects_only_a_sole_volume() {
    let mut fx = Fixture::new();
    fx.volume("only", "temp", "size = \"16M\"");
    fx.write_config("");
    let d = fx.start();
    let bare = format!("nbd+unix:///?socket={}", fx.socket.display());
    let out = Command::new("nbdinfo")
        .arg("--size")
        .arg(&bare)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        (16u64 << 20).to_string()
    );
    drop(d);
    fx.volume("second", "temp", "size = \"8M\"");
    fx.write_config("");
    let _d = fx.start();
    let out = Command::new("nbdinfo")
        .arg("--size")
        .arg(&bare)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", output_text(&out));
}

/// A client that sends requests and never reads the replies holds at most
/// its connection's byte budget, and only for `reply_timeout`: then the
/// connection is closed and what it held is freed. Replies used to have no
/// write timeout, so such a client pinned up to 64 MiB for ever.
#[test]
fn a_client_that_never_reads_is_disconnected() {
    let mut fx = Fixture::new();
    fx.volume("v", "cache", "");
    fx.write_config(&format!(
        "control = \"{}\"\nreply_timeout = \"2s\"",
        fx.path("control.sock").display()
    ));
    fx.create("v", "64M", 4096);
    let d = fx.start();
    qemu_io(&fx.uri("v"), &["write -P 0x5a 0 64M"]);
    let _client = Killed(
        Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(
                "import socket, struct, sys, time\n\
s = socket.socket(socket.AF_UNIX)\n\
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)\n\
s.connect(sys.argv[1])\n\
assert s.recv(18, socket.MSG_WAITALL)[:8] == b'NBDMAGIC'\n\
s.sendall(struct.pack('>I', 3))\n\
s.sendall(struct.pack('>QII', 0x49484156454F5054, 1, 1) + b'v')\n\
s.recv(10, socket.MSG_WAITALL)\n\
for i in range(8):\n    \
s.sendall(struct.pack('>IHHQQI', 0x25609513, 0, 0, i, 0, 32 << 20))\n\
time.sleep(600)\n",
            )
            .arg(&fx.socket)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("python3"),
    );
    let connections = |fx: &Fixture| {
        fx.status()["volumes"][0]["io"]["connections"]
            .as_i64()
            .unwrap_or(-1)
    };
    wait_until("the reader connected", Duration::from_secs(20), || {
        connections(&fx) == 1
    });
    wait_until(
        "the non-reader is disconnected",
        Duration::from_secs(30),
        || connections(&fx) == 0,
    );
    assert!(
        d.stderr().contains("the client is not reading"),
        "{}",
        d.stderr()
    );
    qemu_io(&fx.uri("v"), &["read -P 0x5a 0 1M"]);
}

/// A client on the Unix socket that asks for `reads` reads of 32 MiB
/// and never reads a reply (a 4 KiB receive buffer).
fn non_reader(fx: &Fixture, reads: u32) -> Killed {
    Killed(
        Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(
                "import socket, struct, sys, time\n\
s = socket.socket(socket.AF_UNIX)\n\
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)\n\
s.connect(sys.argv[1])\n\
assert s.recv(18, socket.MSG_WAITALL)[:8] == b'NBDMAGIC'\n\
s.sendall(struct.pack('>I', 3))\n\
s.sendall(struct.pack('>QII', 0x49484156454F5054, 1, 1) + b'v')\n\
s.recv(10, socket.MSG_WAITALL)\n\
for i in range(int(sys.argv[2])):\n    \
s.sendall(struct.pack('>IHHQQI', 0x25609513, 0, 0, i, (i % 2) << 25, 32 << 20))\n\
time.sleep(600)\n",
            )
            .arg(&fx.socket)
            .arg(reads.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3"),
    )
}

/// Several clients that ask for big reads and never read the replies
/// pin at most `reply_memory` between them, not a connection budget
/// (64 MiB) each: the daemon reserves a read's bytes before it allocates
/// them, and a connection that cannot reserve stops taking requests. One
/// after another the stuck ones are closed by `reply_timeout`, and a
/// well-behaved client waiting behind them is then served.
#[test]
fn clients_that_never_read_share_one_reply_memory_budget() {
    const BUDGET: i64 = 64 << 20;
    let mut fx = Fixture::new();
    fx.volume("v", "cache", "");
    fx.write_config(&format!(
        "control = \"{}\"\nreply_timeout = \"3s\"\nreply_memory = \"64M\"",
        fx.path("control.sock").display()
    ));
    fx.create("v", "64M", 4096);
    let d = fx.start();
    qemu_io(&fx.uri("v"), &["write -P 0x5a 0 64M"]);
    let status = |fx: &Fixture| {
        let s = fx.status();
        let pending = s["connections"]["reply_bytes_pending"].as_i64().unwrap();
        assert_eq!(s["connections"]["reply_memory"].as_i64(), Some(BUDGET));
        let connections = s["volumes"][0]["io"]["connections"].as_i64().unwrap();
        (pending, connections)
    };

    // Three connections of eight 32 MiB reads: 192 MiB of replies owed
    // within their connection budgets, three times `reply_memory`.
    let stuck: Vec<Killed> = (0..3).map(|_| non_reader(&fx, 8)).collect();
    let mut most = 0;
    wait_until(
        "the stuck clients to connect and fill the budget",
        Duration::from_secs(30),
        || {
            let (pending, connections) = status(&fx);
            most = most.max(pending);
            assert!(pending <= BUDGET, "{pending} bytes of replies pending");
            connections == 3 && pending >= 32 << 20
        },
    );

    // A well-behaved client queues behind them and is served once the
    // stuck ones are timed out; the budget is never exceeded meanwhile.
    let uri = fx.uri("v");
    let good = std::thread::spawn(move || qemu_io(&uri, &["read -P 0x5a 0 4M"]));
    wait_until(
        "the well-behaved client to be served",
        Duration::from_secs(90),
        || {
            let (pending, _) = status(&fx);
            most = most.max(pending);
            assert!(pending <= BUDGET, "{pending} bytes of replies pending");
            good.is_finished()
        },
    );
    good.join().expect("the well-behaved read");
    assert!(most >= 32 << 20, "the stuck clients never held budget");
    wait_until(
        "every stuck client to be disconnected",
        Duration::from_secs(60),
        || status(&fx) == (0, 0),
    );
    let log = d.stderr();
    assert!(
        log.matches("the client is not reading").count() >= 1,
        "{log}"
    );
    drop(stuck);
}

/// A helper process (a misbehaving peer) killed and reaped when the test
/// ends, however it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
