//! Structured replies and `base:allocation` block status: libnbd sees the
//! holes of a volume exactly, `nbdinfo --map` and `qemu-img map` list
//! them, and `nbdcopy` copies only the data (the copy equals a full one).

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
