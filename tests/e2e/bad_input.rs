//! Malformed and hostile NBD traffic: each bad client gets an error reply or
//! loses its own connection, and a well-behaved client is served meanwhile.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use hostcrypt_e2e::*;

const IHAVEOPT: u64 = 0x4948_4156_454F_5054;

fn connect(fx: &Fixture) -> UnixStream {
    let s = UnixStream::connect(&fx.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Reads the server greeting and sends fixed-newstyle + no-zeroes flags.
fn greet(s: &mut UnixStream) {
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).unwrap();
}

fn send_option(s: &mut UnixStream, option: u32, data: &[u8]) {
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m).unwrap();
}

/// Returns (option, reply type, payload).
fn read_reply(s: &mut UnixStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut body = vec![0u8; len as usize];
    s.read_exact(&mut body).unwrap();
    (option, kind, body)
}

/// The server closed the connection: a read returns EOF (or a reset).
fn assert_closed(s: &mut UnixStream) {
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => continue,
        }
    }
}

fn good_client_works(fx: &Fixture) {
    qemu_io(
        &fx.uri("v"),
        &["write -P 0x33 4096 4096", "read -P 0x33 4096 4096"],
    );
}

fn go(s: &mut UnixStream, name: &str) {
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    send_option(s, 7, &data);
    loop {
        let (_, kind, _) = read_reply(s);
        if kind == 1 {
            return;
        }
        assert_eq!(kind, 3, "expected NBD_REP_INFO or ACK");
    }
}

fn request(kind: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut m = 0x2560_9513u32.to_be_bytes().to_vec();
    m.extend_from_slice(&0u16.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    m
}

fn setup() -> (Fixture, Daemon) {
    let mut fx = Fixture::new();
    fx.volume("v", "cache", "");
    // Larger than the 32 MiB maximum request, so an oversized request can
    // be in range.
    fx.create("v", "64M", 4096);
    let d = fx.start();
    (fx, d)
}

#[test]
fn garbage_handshake_drops_only_that_client() {
    let (fx, d) = setup();
    let mut bad = connect(&fx);
    greet(&mut bad);
    bad.write_all(b"this is not an NBD option at all, just noise")
        .unwrap();
    // While the bad client is being thrown out, a good one is served.
    good_client_works(&fx);
    assert_closed(&mut bad);

    let mut flags = connect(&fx);
    let mut hello = [0u8; 18];
    flags.read_exact(&mut hello).unwrap();
    flags.write_all(&0xffff_0000u32.to_be_bytes()).unwrap();
    assert_closed(&mut flags);

    // An option longer than the server reads is answered with
    // NBD_REP_ERR_TOO_BIG before the connection closes.
    let mut huge = connect(&fx);
    greet(&mut huge);
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&7u32.to_be_bytes());
    m.extend_from_slice(&u32::MAX.to_be_bytes());
    huge.write_all(&m).unwrap();
    let (option, kind, _) = read_reply(&mut huge);
    assert_eq!((option, kind), (7, 0x8000_0009), "NBD_REP_ERR_TOO_BIG");
    assert_closed(&mut huge);

    good_client_works(&fx);
    assert!(d.stderr().contains("handshake failed"), "{}", d.stderr());
}

#[test]
fn unknown_option_gets_err_unsup_and_negotiation_continues() {
    let (fx, _d) = setup();
    let mut s = connect(&fx);
    greet(&mut s);
    send_option(&mut s, 0x7777, b"whatever");
    let (option, kind, _) = read_reply(&mut s);
    assert_eq!((option, kind), (0x7777, 0x8000_0001));
    send_option(&mut s, 5, b""); // STARTTLS, not configured
    assert_eq!(read_reply(&mut s).1, 0x8000_0001);
    // OPT_INFO for an unknown export: ERR_UNKNOWN.
    let mut data = 4u32.to_be_bytes().to_vec();
    data.extend_from_slice(b"nope");
    data.extend_from_slice(&0u16.to_be_bytes());
    send_option(&mut s, 6, &data);
    assert_eq!(read_reply(&mut s).1, 0x8000_0006);
    // OPT_LIST names the export, then the client can still GO.
    send_option(&mut s, 3, b"");
    let (_, kind, body) = read_reply(&mut s);
    assert_eq!(kind, 2);
    assert_eq!(&body[4..], b"v");
    assert_eq!(read_reply(&mut s).1, 1);
    go(&mut s, "v");
    s.write_all(&request(0, 42, 0, 512)).unwrap();
    let mut reply = [0u8; 16 + 512];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(u32::from_be_bytes(reply[4..8].try_into().unwrap()), 0);
    assert_eq!(u64::from_be_bytes(reply[8..16].try_into().unwrap()), 42);
}

/// Strings the server sends are capped at 4096 bytes (the spec's limit),
/// even when they would echo a client's 65,000-byte export name; the log
/// gets a shortened name too.
#[test]
fn long_export_name_gets_a_bounded_error_message() {
    let (fx, d) = setup();
    let mut s = connect(&fx);
    greet(&mut s);
    let name = "n".repeat(65_000);
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    send_option(&mut s, 7, &data);
    let (_, kind, body) = read_reply(&mut s);
    assert_eq!(kind, 0x8000_0006, "NBD_REP_ERR_UNKNOWN");
    assert!(body.len() <= 4096, "{} bytes", body.len());
    // EXPORT_NAME with that name: closed, and the log line stays short.
    send_option(&mut s, 1, name.as_bytes());
    assert_closed(&mut s);
    good_client_works(&fx);
    wait_until("the refusal is logged", Duration::from_secs(10), || {
        d.stderr().contains("unknown export")
    });
    let log = d.stderr();
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 2048, "a log line of {longest} bytes");
}

/// `max_connections` is enforced: with a limit of 1024, connection 1025
/// is closed at once (no greeting) while the first 1024 are all served a
/// greeting, and a slot frees when one leaves.
#[test]
fn connection_over_the_limit_is_refused_while_the_others_are_served() {
    let mut fx = Fixture::new();
    fx.volume("v", "cache", "");
    // Idle handshakes must outlive the test: a long handshake timeout.
    fx.write_config(&format!(
        "{}\nmax_connections = 1024\nmax_connections_per_peer = 2048\nmax_handshakes = 1024\nhandshake_timeout = \"300s\"",
        fx.control_and_audit()
    ));
    fx.create("v", "16M", 4096);
    let d = fx.start();
    raise_fd_limit(2200);
    let mut open = Vec::new();
    for _ in 0..1024 {
        let mut s = connect(&fx);
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[..8], b"NBDMAGIC");
        open.push(s);
    }
    let mut extra = connect(&fx);
    let mut buf = [0u8; 18];
    assert!(
        matches!(extra.read(&mut buf), Ok(0) | Err(_)),
        "connection 1025 was greeted"
    );
    wait_until("the refusal is logged", Duration::from_secs(10), || {
        d.stderr().contains("max_connections (1024) reached")
    });
    assert_eq!(fx.status()["connections"]["refused_limit"], 1);
    // One leaves: a new client is served in its slot.
    drop(open.pop());
    wait_until("a slot frees", Duration::from_secs(10), || {
        fx.status()["connections"]["open"] == 1023
    });
    good_client_works(&fx);
    drop(open);
}

/// Raises this test process's soft open-file limit (the test holds
/// over a thousand sockets).
fn raise_fd_limit(want: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write only the struct we pass.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        assert!(
            limit.rlim_max >= want,
            "hard fd limit {} < {want}",
            limit.rlim_max
        );
        limit.rlim_cur = limit.rlim_cur.max(want);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
}

#[test]
fn truncated_request_and_bad_magic_close_only_that_connection() {
    let (fx, d) = setup();
    let mut s = connect(&fx);
    greet(&mut s);
    go(&mut s, "v");
    // Half a request header, then hang up on our side of the write.
    s.write_all(&request(0, 1, 0, 4096)[..13]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_closed(&mut s);

    let mut s = connect(&fx);
    greet(&mut s);
    go(&mut s, "v");
    // A write whose payload never fully arrives.
    s.write_all(&request(1, 2, 0, 8192)).unwrap();
    s.write_all(&[0u8; 100]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_closed(&mut s);

    let mut s = connect(&fx);
    greet(&mut s);
    go(&mut s, "v");
    let mut bad = request(0, 3, 0, 4096);
    bad[0] = 0;
    s.write_all(&bad).unwrap();
    assert_closed(&mut s);

    good_client_works(&fx);
    assert!(d.stderr().contains("bad request magic"), "{}", d.stderr());
}

/// Protocol-level errors through libnbd with strict mode off, so the client
/// library sends what we ask instead of refusing locally.
#[test]
fn out_of_range_and_oversized_requests_get_errors_libnbd() {
    let (fx, _d) = setup();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/bad_requests.py");
    let out = run_ok(
        Command::new("/usr/bin/python3")
            .arg(script)
            .arg(fx.uri("v")),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ALL OK"), "{text}");
    good_client_works(&fx);
}

/// TRIM past the end is EINVAL (only writes and write-zeroes get ENOSPC).
#[test]
fn trim_past_the_end_is_einval() {
    let mut fx = Fixture::new();
    fx.volume("d", "temp", "size = \"8M\"\nallow_discards = true");
    let _d = fx.start();
    let script = r#"
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
size = h.get_size()
try:
    h.trim(8192, size - 4096)
    sys.exit("trim past the end succeeded")
except nbd.Error as e:
    assert errno_of(e) == errno.EINVAL, e
h.trim(4096, size - 4096)
print("OK")
"#;
    python_nbd(script, &fx.uri("d"));
}

/// Old clients pick an export with NBD_OPT_EXPORT_NAME instead of OPT_GO;
/// an unknown name there can only be answered by closing the connection.
#[test]
fn export_name_fallback_enters_transmission() {
    let (fx, _d) = setup();
    let mut s = connect(&fx);
    greet(&mut s); // negotiates NO_ZEROES: the reply is size + flags only
    send_option(&mut s, 1, b"v");
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), 64 << 20);
    let flags = u16::from_be_bytes(reply[8..].try_into().unwrap());
    assert_eq!(
        flags & 0x0101,
        0x0101,
        "HAS_FLAGS and CAN_MULTI_CONN: {flags:#x}"
    );
    let mut write = request(1, 9, 4096, 4);
    write.extend_from_slice(b"abcd");
    s.write_all(&write).unwrap();
    let mut ack = [0u8; 16];
    s.read_exact(&mut ack).unwrap();
    assert_eq!(u32::from_be_bytes(ack[4..8].try_into().unwrap()), 0);
    s.write_all(&request(0, 10, 4096, 4)).unwrap();
    let mut data = [0u8; 20];
    s.read_exact(&mut data).unwrap();
    assert_eq!(&data[16..], b"abcd");
    s.write_all(&request(2, 11, 0, 0)).unwrap(); // NBD_CMD_DISC
    assert_closed(&mut s);

    let mut s = connect(&fx);
    greet(&mut s);
    send_option(&mut s, 1, b"no-such-export");
    assert_closed(&mut s);
}
