//! (e) kill -9 during `hostcrypt header restore`: the primary header copy
//! is damaged first (the backup copy still opens the volume), the restore
//! runs under strace and is killed on entering one of its disk syscalls
//! (pwrite64, fdatasync; counted in one uninterrupted run, picked
//! uniformly), and the daemon must then open the
//! volume from whatever the restore left, repair the other copy, and read
//! back the data.

use std::process::{Command, Stdio};

use hostcrypt_e2e::*;
use hostcryptd::volume::PRIMARY_AT;

use crate::{both_headers_valid, disk_syscalls, random_u64, trials, Figures, KillPoint};

fn damage_primary(backing: &std::path::Path) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(backing)
        .expect("open the backing");
    let mut junk = [0u8; 64];
    getrandom::fill(&mut junk).expect("getrandom");
    let at = PRIMARY_AT + 64 + random_u64() % 3000;
    file.write_all_at(&junk, at)
        .expect("damage the primary copy");
}

#[test]
fn kill_9_during_header_restore() {
    let mut fx = Fixture::new();
    let backing = fx.volume("h", "cache", "");
    fx.write_config(&fx.control_and_audit());
    fx.create("h", "16M", 4096);
    let d = fx.start();
    qemu_io(&fx.uri("h"), &["write -P 0x6d 1M 1M", "flush"]);
    let file = fx.path("h.hdr");
    let out = fx.cli(&["header", "backup", "h", &file.to_string_lossy()]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(d.stop(), 0);

    let restore = |kill_at: Option<KillPoint>, log: &std::path::Path| {
        let mut cmd = Command::new("strace");
        cmd.args(["-f", "-qq", "-e", "trace=pwrite64,fdatasync", "-o"])
            .arg(log);
        if let Some(k) = kill_at {
            cmd.arg("-e")
                .arg(format!("inject={}:signal=KILL:when={}", k.syscall, k.n));
        }
        cmd.arg(bin("hostcrypt"))
            .arg("--config")
            .arg(&fx.config)
            .args(["header", "restore"])
            .arg(&backing)
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run the restore under strace")
    };
    require_tool("strace");
    damage_primary(&backing);
    let log = fx.path("strace.log");
    assert!(restore(None, &log).success());
    let counts = disk_syscalls(&log);
    let mut figures = Figures::new("header restore");
    for trial in 0..trials() {
        damage_primary(&backing);
        if restore(Some(KillPoint::random(&counts)), &log).success() {
            figures.completed += 1;
        }
        let d = fx.start();
        let status = fx.status();
        assert!(
            status["volumes"][0]["unavailable"].is_null(),
            "trial {trial}: the volume did not open after a killed restore: {status}\n{}",
            d.stderr()
        );
        qemu_io(&fx.uri("h"), &["read -P 0x6d 1M 1M"]);
        // Volumes open after the socket listens: read the log once served.
        figures.saw_open(&d.stderr());
        assert!(both_headers_valid(&backing));
        assert_eq!(d.stop(), 0);
        figures.trials += 1;
    }
    figures.require(
        "kills that landed before the operation finished",
        figures.trials - figures.completed,
    );
    figures.report();
}
