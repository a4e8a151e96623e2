//! Data integrity through each real client: nbdcopy, qemu-io, fio.

use std::process::Command;
use std::time::Duration;

use hostcrypt_e2e::*;

#[test]
fn nbdcopy_256m_round_trip_and_no_plaintext_on_disk() {
    require_tool("nbdcopy");
    let mut fx = Fixture::new();
    let backing = fx.volume("cache0", "cache", "");
    fx.create("cache0", "256M", 4096);
    let daemon = fx.start();

    // Random data with a recognisable marker at the start of every MiB, so
    // we can prove no plaintext reaches the backing file.
    let mut data = vec![0u8; 256 << 20];
    getrandom::fill(&mut data).unwrap();
    let marker = b"HOSTCRYPT-PLAINTEXT-MARKER-0123456789";
    for chunk in data.chunks_mut(1 << 20) {
        chunk[..marker.len()].copy_from_slice(marker);
    }
    let input = fx.path("in.bin");
    std::fs::write(&input, &data).unwrap();
    run_ok(Command::new("nbdcopy").arg(&input).arg(fx.uri("cache0")));
    let output = fx.path("out.bin");
    run_ok(Command::new("nbdcopy").arg(fx.uri("cache0")).arg(&output));
    assert_eq!(sha256_file(&input), sha256_file(&output));

    assert_eq!(daemon.stop(), 0);
    let raw = std::fs::read(&backing).unwrap();
    assert!(
        memchr::memmem::find(&raw, marker).is_none(),
        "plaintext marker found in the backing file"
    );
    assert!(memchr::memmem::find(&raw, &data[4096..4096 + 64]).is_none());
}

#[test]
fn qemu_io_aligned_and_unaligned_patterns() {
    require_tool("qemu-io");
    for (sector, direct) in [(512u32, false), (4096, false), (512, true), (4096, true)] {
        let mut fx = Fixture::new();
        fx.volume("v", "cache", &format!("direct = {direct}"));
        fx.create("v", "64M", sector);
        let _daemon = fx.start();
        let uri = fx.uri("v");
        qemu_io(
            &uri,
            &[
                "write -P 0xa5 0 1M",
                "write -P 0x3c 333 1000",
                "write -P 0x77 8191 2",
                "write -P 0x42 65536 4096",
                "read -P 0xa5 0 333",
                "read -P 0x3c 333 1000",
                "read -P 0xa5 1333 6858",
                "read -P 0x77 8191 2",
                "read -P 0xa5 8193 57343",
                "read -P 0x42 65536 4096",
                "read -P 0 1048576 4096",
                "flush",
            ],
        );
        // The same bytes must still be there from a fresh connection.
        qemu_io(&uri, &["read -P 0x3c 333 1000", "read -P 0x77 8191 2"]);
    }
}

#[test]
fn fio_verify_two_connections_qd16() {
    fio_verify("");
}

#[test]
fn fio_verify_two_connections_qd16_o_direct() {
    fio_verify("direct = true");
}

fn fio_verify(volume_options: &str) {
    require_tool("fio");
    let mut fx = Fixture::new();
    fx.volume("fio", "cache", volume_options);
    fx.create("fio", "128M", 4096);
    let daemon = fx.start();
    if volume_options.contains("direct = true") {
        assert!(
            daemon.stderr().contains("direct=true"),
            "{}",
            daemon.stderr()
        );
    }
    let out = run_ok(Command::new("fio").args(fio_verify_args(&fx.uri("fio"), "32M", "64M")));
    let jobs = fio_jobs(&out);
    assert_eq!(jobs.len(), 2);
    for job in jobs {
        assert!(
            job["write"]["io_bytes"].as_u64().unwrap() >= 32 << 20,
            "{job}"
        );
        assert!(
            job["read"]["io_bytes"].as_u64().unwrap() >= 32 << 20,
            "verify pass did not read: {job}"
        );
    }
}

/// Bytes of `path` resident in the host page cache (util-linux fincore).
fn cached_bytes(path: &std::path::Path) -> u64 {
    let out = run_ok(
        Command::new("fincore")
            .args(["--bytes", "--noheadings", "--output", "RES"])
            .arg(path),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("fincore said {text:?}"))
}

/// With `cache_large_writes = false`, writes of 128 KiB and more leave the
/// host page cache once written back (RWF_DONTCACHE), so later small
/// writes do not land in large folios; by default they stay, and small
/// writes stay cached either way. The data reads back the same in every case.
#[test]
fn large_writes_leave_the_page_cache_unless_configured_to_stay() {
    require_tool("fincore");
    for (options, large_cached) in [("", true), ("cache_large_writes = false", false)] {
        let mut fx = Fixture::new();
        let backing = fx.volume("v", "cache", options);
        fx.create("v", "64M", 4096);
        let daemon = fx.start();
        let log = daemon.stderr();
        assert!(
            log.contains(&format!("uncached_large_writes={}", !large_cached)),
            "{options:?}: the open log names the write cache policy:\n{log}"
        );
        let uri = fx.uri("v");
        let before = cached_bytes(&backing);
        // 32 MiB in 1 MiB requests, then 64 small writes elsewhere.
        let mut commands: Vec<String> = (0..32)
            .map(|i| format!("write -P 0x5a {}M 1M", i))
            .collect();
        commands.extend((0..64).map(|i| format!("write -P 0x3c {} 4k", (40 << 20) + i * 8192)));
        commands.push("flush".into());
        qemu_io(&uri, &commands);
        let small = 64 * 4096;
        if large_cached {
            let cached = cached_bytes(&backing);
            assert!(
                cached >= before + (32 << 20),
                "{options:?}: {cached} bytes cached"
            );
        } else {
            // Dropped as each folio's writeback ends, which the flush waited for.
            wait_until(
                "large writes to leave the page cache",
                Duration::from_secs(20),
                || cached_bytes(&backing) < before + (4 << 20),
            );
            let cached = cached_bytes(&backing);
            assert!(
                cached >= small,
                "{options:?}: small writes stay cached ({cached} bytes)"
            );
        }
        qemu_io(
            &uri,
            &[
                "read -P 0x5a 0 32M",
                "read -P 0x3c 41943040 4k",
                "read -P 0 41947136 4k",
            ],
        );
    }
}
