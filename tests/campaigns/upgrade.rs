//! (f) kill -9 while the daemon upgrades an old header at open. Each trial
//! makes a fresh 16 MiB volume, fills it with random data through the
//! daemon (flushed), then rewrites its header as an older hostcryptd left
//! it (`hostcrypt_e2e::legacy`, written without hostcryptd's code: format
//! version 1, or alternately version 2 with its Adiantum inner layer) and
//! removes the anti-rollback record (older versions kept none). The next
//! start upgrades the header in place to version 3: primary copy, sync,
//! backup copy, sync, then the record (temp file, fsync, rename, fsync of
//! the directory).
//!
//! One uninterrupted start under strace counts those disk syscalls
//! (pwrite64, fdatasync, fsync, rename); each trial then kills the daemon
//! on entering one of them, or, with the same chance as each of them,
//! once it serves the volume (after the upgrade). Every crash state of the
//! start-up is reached: nothing on disk changes between two of these calls.
//! The first trial of each version is held to entering the second pwrite64
//! (primary upgraded, backup old), so the suite's 5 trials see that state
//! for both versions every run.
//!
//! After the restart: the volume opens (no MAC failure, no rollback or
//! downgrade refusal), both copies are the same valid version-3 header,
//! the record names its UUID, generation, sequence and key check, and
//! every byte reads back. The campaign fails if no kill landed between the
//! two copies' writes, so it cannot pass without testing the torn upgrade.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use hostcrypt_e2e::*;
use hostcryptd::volume::{Header, Records, BACKUP_AT, PRIMARY_AT};

use crate::{kill_9, random_u64, syscall_counts, trials, Figures, KillPoint, Tracer};

/// What an upgrade at open writes to disk, in order of the first call.
const SYSCALLS: [&str; 4] = ["pwrite64", "fdatasync", "fsync", "rename"];
const SIZE: usize = 16 << 20;
const VOLUME: &str = "v";

/// A fixture whose volume an older hostcryptd of format `version` made:
/// single-layer XTS for version 1, an Adiantum inner layer for version 2.
fn fixture(version: u16) -> Fixture {
    let mut fx = Fixture::new();
    let extra = if version == 2 {
        fx.add_local_kek("second");
        "kek_inner = \"second\"\ninner_cipher = \"adiantum\""
    } else {
        ""
    };
    fx.volume(VOLUME, "cache", extra);
    fx.write_config(&fx.control_and_audit());
    fx
}

/// A fresh volume holding `data` (written and flushed through the
/// daemon), its header as format `version` left it, and no record.
fn old_volume(fx: &Fixture, version: u16, data: &Path) {
    let backing = fx.path(&format!("{VOLUME}.img"));
    let _ = std::fs::remove_file(&backing);
    let _ = std::fs::remove_dir_all(fx.state_dir());
    fx.create(VOLUME, "16M", 4096);
    let d = fx.start();
    run_ok(
        Command::new("nbdcopy")
            .arg(data)
            .arg(fx.uri(VOLUME))
            .arg("--flush"),
    );
    assert_eq!(d.stop(), 0);
    legacy::write_old_header(&backing, version);
    std::fs::remove_dir_all(fx.state_dir()).expect("remove the state directory");
    // hostcryptd's own encoder writes the same bytes for that version.
    let [primary, _] = legacy::read_copies(&backing);
    let decoded = Header::decode(&primary).expect("the old header decodes");
    assert!(decoded.auth.is_none());
    assert!(
        decoded.encode().expect("encode")[..] == primary[..],
        "hostcryptd encodes this version-{version} header differently"
    );
    assert_eq!(
        legacy::copy_versions(&backing),
        [Some(version), Some(version)]
    );
}

/// Waits until the daemon has opened the volume (a refusal fails the
/// test, naming `what`); returns whether it opened. With `died`, a daemon
/// that exits first also ends the wait (it was killed).
fn wait_open(d: &mut Daemon, died: bool, what: &str) -> bool {
    let open = format!("volume open volume={VOLUME} ");
    let mut opened = false;
    wait_until(
        "the volume open or refused",
        Duration::from_secs(60),
        || {
            let log = d.stderr();
            opened = log.contains(&open);
            let refused = log.contains("volume not served");
            assert!(!refused || opened, "{what}: the volume was refused:\n{log}");
            opened || (died && d.child.try_wait().ok().flatten().is_some())
        },
    );
    opened
}

/// The disk syscalls of one uninterrupted upgrade at start-up.
fn measure(fx: &Fixture, version: u16, data: &Path) -> Vec<(&'static str, usize)> {
    old_volume(fx, version, data);
    let held = fx.spawn_held();
    let log = fx.path("strace.log");
    let tracer = Tracer::attach_tracing(held.pid(), &SYSCALLS, None, &log);
    let mut d = held.release();
    assert!(wait_open(&mut d, false, "the measured start"));
    tracer.detach();
    assert!(
        d.stderr().contains("upgrading it in place"),
        "{}",
        d.stderr()
    );
    assert_eq!(d.stop(), 0);
    let counts = syscall_counts(&log, &SYSCALLS);
    let count = |s: &str| counts.iter().find(|(n, _)| *n == s).map_or(0, |(_, c)| *c);
    assert!(
        count("pwrite64") >= 2 && count("rename") >= 1,
        "an upgrade writes two header copies and renames a record: {counts:?}"
    );
    counts
}

/// Where the kill left the header: both old, one upgraded, both upgraded.
fn classify(backing: &Path, version: u16, figures: &mut Figures) {
    let copies = legacy::copy_versions(backing);
    let old = copies.iter().filter(|&&c| c == Some(version)).count();
    let new = copies.iter().filter(|&&c| c == Some(3)).count();
    match (old, new) {
        (2, 0) => figures.count("killed_before_upgrade"),
        (1, 1) => figures.count("killed_mid_upgrade"),
        (0, 2) => figures.count("killed_after_upgrade"),
        _ => figures.count("killed_with_a_torn_copy"),
    }
}

/// After the restart: both copies the same valid version-3 header, and
/// the record agrees with it.
fn check_upgraded(fx: &Fixture, backing: &Path, what: &str) {
    assert_eq!(
        legacy::copy_versions(backing),
        [Some(3), Some(3)],
        "{what}: not both copies upgraded"
    );
    let [primary, backup] = legacy::read_copies(backing);
    assert!(primary == backup, "{what}: the copies differ");
    assert_eq!(legacy::COPIES, [PRIMARY_AT, BACKUP_AT]);
    let header = Header::decode(&primary).expect("decode the upgraded header");
    let auth = header.auth.as_ref().expect("an authenticated header");
    let record = Records::new(&fx.state_dir())
        .volume(VOLUME)
        .load()
        .expect("read the record")
        .unwrap_or_else(|| panic!("{what}: no anti-rollback record"));
    assert_eq!(
        (
            record.uuid,
            record.generation,
            record.sequence,
            record.key_check.as_str(),
            record.target.is_none(),
        ),
        (
            header.uuid,
            header.dek_generation,
            header.sequence,
            hex::encode(auth.key_check).as_str(),
            true,
        ),
        "{what}: the record disagrees with the header"
    );
}

#[test]
fn kill_9_during_header_upgrade() {
    require_tool("nbdcopy");
    let fixtures = [(1u16, fixture(1)), (2u16, fixture(2))];
    let data = fixtures[0].1.path("data.bin");
    let measured: Vec<_> = fixtures
        .iter()
        .map(|(version, fx)| {
            let mut bytes = vec![0u8; SIZE];
            getrandom::fill(&mut bytes).expect("getrandom");
            std::fs::write(&data, &bytes).expect("write the data");
            measure(fx, *version, &data)
        })
        .collect();
    let mut figures = Figures::new("header upgrade");
    for trial in 0..trials() {
        let (version, fx) = &fixtures[trial % 2];
        let (version, counts) = (*version, &measured[trial % 2]);
        let backing = fx.path(&format!("{VOLUME}.img"));
        let mut bytes = vec![0u8; SIZE];
        getrandom::fill(&mut bytes).expect("getrandom");
        std::fs::write(&data, &bytes).expect("write the data");
        old_volume(fx, version, &data);

        // Uniform over the upgrade's disk syscalls and "once served".
        let total: usize = counts.iter().map(|(_, c)| c).sum();
        let kill_at = if trial < 2 {
            Some(KillPoint {
                syscall: "pwrite64",
                n: 2,
            })
        } else if random_u64() % (total as u64 + 1) == total as u64 {
            None
        } else {
            Some(KillPoint::random(counts))
        };
        let held = fx.spawn_held();
        let tracer = Tracer::attach_tracing(held.pid(), &SYSCALLS, kill_at, &fx.path("strace.log"));
        let what = format!("trial {trial} (version {version}, kill at {kill_at:?})");
        let mut d = held.release();
        if wait_open(&mut d, true, &what) {
            figures.completed += 1;
        }
        kill_9(&mut d);
        tracer.detach();
        classify(&backing, version, &mut figures);

        let mut d = fx.start();
        assert!(wait_open(&mut d, false, &format!("{what}, restarted")));
        let log = d.stderr();
        for refusal in ["does not verify", "rollback", "downgrade", "refusing"] {
            assert!(
                !log.contains(refusal),
                "{what}: {refusal:?} after the restart:\n{log}"
            );
        }
        if log.contains("upgrading it in place") {
            figures.count("upgraded_at_restart");
        }
        figures.saw_open(&log);
        let status = fx.status();
        assert!(
            status["volumes"][0]["unavailable"].is_null(),
            "{what}: {status}\n{log}"
        );
        let out = fx.path("out.bin");
        let _ = std::fs::remove_file(&out);
        run_ok(Command::new("nbdcopy").arg(fx.uri(VOLUME)).arg(&out));
        let got = std::fs::read(&out).expect("read what the volume holds");
        if let Some(block) = (0..SIZE / 4096)
            .find(|&i| got.get(i * 4096..(i + 1) * 4096) != Some(&bytes[i * 4096..(i + 1) * 4096]))
        {
            panic!("{what}: block {block} differs after the restart");
        }
        figures.durable_writes_checked += SIZE / 4096;
        assert_eq!(d.stop(), 0);
        check_upgraded(fx, &backing, &what);
        figures.trials += 1;
    }
    assert!(
        figures.counted("killed_mid_upgrade") > 0,
        "no kill landed between the two copies' upgrades: {figures:?}"
    );
    assert!(figures.durable_writes_checked > 0);
    figures.report();
}
