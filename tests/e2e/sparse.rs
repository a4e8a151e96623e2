//! Structured replies and `base:allocation` block status: libnbd sees the
//! holes of a volume exactly, `nbdinfo --map` and `qemu-img map` list
//! them, and `nbdcopy` copies only the data (the copy equals a full one);
//! QEMU negotiates extended headers and zeroes 6 GiB in one request.

use std::process::Command;

use hostcrypt_e2e::*;

/// A 1 GiB cache volume with [1 MiB, +64 KiB) and [8 MiB, +1 MiB) written.
fn setup() -> (Fixture, Daemon) {
    let mut fx = Fixture::new();
    fx.volume("v", "cache", "allow_discards = true");
    fx.write_config("");
    fx.create("v", "1G", 4096);
    let d = fx.start();
    qemu_io(
        &fx.uri("v"),
        &["write -P 0x5c 1M 64k", "write -P 0x5c 8M 1M"],
    );
    (fx, d)
}

#[test]
fn block_status_reports_holes_with_structured_replies_libnbd() {
    let (fx, _d) = setup();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/structured.py");
    let out = run_ok(
        Command::new("/usr/bin/python3")
            .arg(script)
            .arg(fx.uri("v")),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ALL OK"), "{text}");
}

#[test]
fn nbdinfo_map_lists_data_and_holes_and_trim_makes_a_hole() {
    require_tool("nbdinfo");
    let (fx, _d) = setup();
    let map = |fx: &Fixture| {
        let out = run_ok(Command::new("nbdinfo").args(["--map", &fx.uri("v")]));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .filter(|f| f.len() >= 3)
            .map(|f| (f[0].clone(), f[1].clone(), f[2].clone()))
            .collect::<Vec<_>>()
    };
    let data = |m: &[(String, String, String)]| {
        m.iter()
            .filter(|(_, _, t)| t == "0")
            .map(|(o, l, _)| (o.clone(), l.clone()))
            .collect::<Vec<_>>()
    };
    let before = map(&fx);
    assert_eq!(
        data(&before),
        [
            ("1048576".to_string(), "65536".to_string()),
            ("8388608".to_string(), "1048576".to_string())
        ],
        "{before:?}"
    );
    // TRIM punches a hole: it shows at once.
    qemu_io(&fx.uri("v"), &["discard 8M 1M"]);
    let after = map(&fx);
    assert_eq!(
        data(&after),
        [("1048576".to_string(), "65536".to_string())],
        "{after:?}"
    );
    // qemu-img sees the same data (qemu probes the first block itself).
    let out =
        run_ok(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &fx.uri("v")]));
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).expect("qemu-img map JSON");
    assert!(
        map.as_array().is_some_and(|a| a
            .iter()
            .any(|e| e["start"] == 1048576 && e["length"] == 65536 && e["data"] == true)),
        "{map}"
    );
}

#[test]
fn nbdcopy_copies_only_data_and_equals_a_full_copy() {
    require_tool("nbdcopy");
    let (fx, _d) = setup();
    let sparse = fx.path("sparse.img");
    let full = fx.path("full.img");
    run_ok(Command::new("nbdcopy").arg(fx.uri("v")).arg(&sparse));
    run_ok(
        Command::new("nbdcopy")
            .arg("--no-extents")
            .arg(fx.uri("v"))
            .arg(&full),
    );
    assert_eq!(sha256_file(&sparse), sha256_file(&full));
    // The extent-aware copy left the holes as holes: only ~1 MiB allocated.
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&sparse).expect("stat").blocks() * 512;
    assert!(
        allocated < 8 << 20,
        "sparse copy allocated {allocated} bytes"
    );
}

/// QEMU's client negotiates extended headers (64-bit lengths, 32-byte
/// replies) where the server offers them: its view of the export, reads,
/// writes, zeroing past 4 GiB in one request, discards and the
/// block-status map all go through them.
#[test]
fn qemu_negotiates_extended_headers_and_sees_the_same_volume() {
    require_tool("qemu-nbd");
    let mut fx = Fixture::new();
    fx.volume("v", "cache", "allow_discards = true");
    let port = hostcrypt_e2e::bao::free_port();
    fx.write_config(&format!("metrics = \"127.0.0.1:{port}\""));
    fx.create("v", "8G", 4096);
    let _d = fx.start();
    let socket = fx.socket.to_string_lossy().into_owned();
    let out = run_ok(Command::new("qemu-nbd").args(["--list", "-k", &socket]));
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains("transaction size: 64-bit"),
        "extended headers not negotiated:\n{listing}"
    );
    let io = qemu_io(
        &fx.uri("v"),
        &[
            "write -P 0x5c 1M 64k",
            "write -P 0x11 2G 3M",
            "write -P 0x22 6G 1M",
            "write -P 0x33 7G 1M",
            "read -P 0x11 2G 3M",
            // One zeroing request of 6 GiB, past what 32 bits can say.
            "write -n -z -u 1G 6G",
            "read -P 0 2G 3M",
            "read -P 0 6G 1M",
            "read -P 0x33 7G 1M",
            "discard 7G 512k",
            "read -P 0 7G 512k",
            "read -P 0x33 7516717056 512k",
        ],
    );
    assert!(
        !io.contains("error") && !io.contains("Pattern verification failed"),
        "{io}"
    );
    // The 6 GiB zeroing arrived as one request: compact headers would
    // have needed at least two.
    let metrics = http_get(port, "/metrics");
    let line = "hostcrypt_requests_total{volume=\"v\",command=\"write_zeroes\"} 1";
    assert!(metrics.contains(line), "{metrics}");
    let out =
        run_ok(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &fx.uri("v")]));
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).expect("qemu-img map JSON");
    let data: Vec<(u64, u64)> = map
        .as_array()
        .expect("a map")
        .iter()
        .filter(|e| e["data"] == true && e["start"].as_u64() != Some(0))
        .map(|e| {
            (
                e["start"].as_u64().unwrap_or(0),
                e["length"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        data,
        [(1 << 20, 64 << 10), ((7 << 30) + (512 << 10), 512 << 10)],
        "{map}"
    );
}

/// The response to a plain HTTP GET to 127.0.0.1:`port`, once the
/// endpoint listens.
fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = None;
    wait_until(
        "the metrics endpoint",
        std::time::Duration::from_secs(10),
        || {
            stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok();
            stream.is_some()
        },
    );
    let mut stream = stream.expect("connected above");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    response
}
