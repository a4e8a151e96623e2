//! Header damage, wrong keys, bad configs and CLI refusals: each gives a
//! clear error and writes nothing it should not.

use std::os::unix::fs::FileExt;
use std::process::Command;

use hostcrypt_e2e::*;
use hostcryptd::volume::{BACKUP_AT, PRIMARY_AT};

fn corrupt(path: &std::path::Path, at: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&[0xff; 200], at + 100).unwrap();
}

#[test]
fn corrupt_primary_is_repaired_from_backup_and_data_survives() {
    let mut fx = Fixture::new();
    let backing = fx.volume("h", "cache", "");
    fx.create("h", "16M", 4096);
    let d = fx.start();
    qemu_io(&fx.uri("h"), &["write -P 0x61 0 64k"]);
    assert_eq!(d.stop(), 0);

    corrupt(&backing, PRIMARY_AT);
    let report = inspect_json(&backing);
    assert!(
        report["header_copies"]["primary"]
            .as_str()
            .unwrap()
            .starts_with("INVALID"),
        "{report}"
    );

    let d = fx.start();
    qemu_io(&fx.uri("h"), &["read -P 0x61 0 64k"]);
    let log = d.stderr();
    assert!(
        log.contains("primary header copy is invalid") && log.contains("repairing"),
        "{log}"
    );
    assert_eq!(d.stop(), 0);
    let report = inspect_json(&backing);
    assert!(
        report["header_copies"]["primary"]
            .as_str()
            .unwrap()
            .starts_with("valid"),
        "{report}"
    );
}

#[test]
fn both_headers_corrupt_is_refused_and_nothing_written() {
    let mut fx = Fixture::new();
    let backing = fx.volume("h", "cache", "");
    fx.create("h", "16M", 4096);
    corrupt(&backing, PRIMARY_AT);
    corrupt(&backing, BACKUP_AT);
    let before = sha256_file(&backing);
    let d = fx.start_with_unavailable("h");
    assert!(
        d.stderr().contains("both header copies are corrupt"),
        "{}",
        d.stderr()
    );
    assert_eq!(d.stop(), 0);
    assert_eq!(sha256_file(&backing), before);
    let out = Command::new(bin("hostcrypt"))
        .args(["inspect"])
        .arg(&backing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("both header copies are corrupt"));
}

#[test]
fn wrong_kek_is_refused_naming_both_keys_and_nothing_written() {
    let mut fx = Fixture::new();
    let backing = fx.volume("h", "cache", "");
    fx.create("h", "16M", 4096);
    // Damage the primary too: a wrong key must not even trigger the repair.
    corrupt(&backing, PRIMARY_AT);
    let before = sha256_file(&backing);
    std::fs::remove_file(&fx.kek).unwrap();
    run_ok(
        Command::new(bin("hostcrypt"))
            .args(["kek", "init-local"])
            .arg(&fx.kek),
    );
    let d = fx.start_with_unavailable("h");
    let log = d.stderr();
    assert_eq!(d.stop(), 0);
    assert!(
        log.contains("the data key was wrapped by local key")
            && log.contains("but the configured KEK is local key"),
        "{log}"
    );
    assert_eq!(sha256_file(&backing), before);
    assert!(!fx.socket.exists());
}

/// Runs `hostcryptd --check`, expects exit code 1, returns stderr.
fn check_fails(fx: &Fixture) -> String {
    let out = fx.check();
    assert_eq!(out.status.code(), Some(1));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_config_names_key_and_line() {
    let mut fx = Fixture::new();
    fx.volume("h", "cache", "sector_size = 1000");
    let err = check_fails(&fx);
    assert!(
        err.contains("sector_size must be 512 or 4096") && err.contains("line"),
        "{err}"
    );

    std::fs::write(
        &fx.config,
        std::fs::read_to_string(&fx.config)
            .unwrap()
            .replace("sector_size = 1000", "colour = \"blue\""),
    )
    .unwrap();
    let err = check_fails(&fx);
    assert!(err.contains("colour") && err.contains("line"), "{err}");
}

#[test]
fn create_refuses_existing_volume_and_nonempty_file_without_force() {
    let mut fx = Fixture::new();
    let backing = fx.volume("h", "cache", "");
    fx.create("h", "16M", 4096);
    let create = |force: bool| {
        let mut c = Command::new(bin("hostcrypt"));
        c.arg("--config")
            .arg(&fx.config)
            .args(["create", "h", "--size", "16M"]);
        if force {
            c.arg("--force");
        }
        c.output().unwrap()
    };
    let out = create(false);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("already holds a hostcrypt volume"));
    // The CLI says it once, in its own words: no audit event as a log line.
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        !stderr.contains("WARN") && !stderr.contains("audit"),
        "{stderr}"
    );

    std::fs::write(&backing, b"precious data").unwrap();
    let out = create(false);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not empty"));
    assert_eq!(std::fs::read(&backing).unwrap(), b"precious data");

    assert!(create(true).status.success());
    let report = inspect_json(&backing);
    assert_eq!(report["size"], 16 << 20);
    assert_eq!(report["keyslots"][0]["provider"], "local");
    let text = report.to_string();
    assert!(
        !text.contains("blob"),
        "inspect must not print wrapped key bytes: {text}"
    );
}

/// `hostcrypt header restore BACKING FILE`.
fn restore(
    fx: &Fixture,
    backing: &std::path::Path,
    file: &std::path::Path,
) -> std::process::Output {
    fx.cli(&[
        "header",
        "restore",
        &backing.to_string_lossy(),
        &file.to_string_lossy(),
    ])
}

/// Both header copies destroyed: a header backup brings everything back
/// (SHA-256 of the data equal), while the daemon runs on; restoring
/// another volume's backup is refused without --force.
#[test]
fn header_restore_from_backup_brings_back_all_data() {
    let mut fx = Fixture::new();
    let backing = fx.volume("h", "cache", "key_check_interval = \"1s\"");
    let other = fx.volume("o", "cache", "");
    fx.write_config(&fx.control_and_audit());
    fx.create("h", "16M", 4096);
    fx.create("o", "16M", 4096);
    let d = fx.start();
    let input = fx.path("in.bin");
    let mut data = vec![0u8; 8 << 20];
    getrandom::fill(&mut data).unwrap();
    std::fs::write(&input, &data).unwrap();
    run_ok(
        Command::new("nbdcopy")
            .arg(&input)
            .arg(fx.uri("h"))
            .arg("--flush"),
    );
    let file = fx.path("h.hdr");
    let out = fx.cli(&["header", "backup", "h", &file.to_string_lossy()]);
    assert!(out.status.success(), "{}", output_text(&out));
    let raw = std::fs::read(&file).unwrap();
    assert!(memchr::memmem::find(&raw, &data[..32]).is_none());
    // Restoring over a volume the daemon serves is refused.
    let out = restore(&fx, &backing, &file);
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("is serving"),
        "{}",
        output_text(&out)
    );
    assert_eq!(d.stop(), 0);

    corrupt(&backing, PRIMARY_AT);
    corrupt(&backing, BACKUP_AT);
    let d = fx.start_with_unavailable("h");
    assert_eq!(fx.key_state("h"), "open-failed");
    let out = restore(&fx, &backing, &file);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("unwrapped by KEK main"),
        "{}",
        output_text(&out)
    );
    // The running daemon opens it at its next try.
    fx.wait_key_state("h", "serving");
    let output = fx.path("out.bin");
    run_ok(Command::new("nbdcopy").arg(fx.uri("h")).arg(&output));
    let mut head = std::fs::read(&output).unwrap();
    head.truncate(8 << 20);
    assert!(head == data, "data differs after the restore");
    assert!(std::fs::read_to_string(fx.audit_log())
        .unwrap()
        .contains("\"header-restore\""));

    assert_eq!(d.stop(), 0);

    // Another volume's backup: refused, nothing written.
    let before = sha256_file(&other);
    let out = restore(&fx, &other, &file);
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("--force"),
        "{}",
        output_text(&out)
    );
    assert_eq!(sha256_file(&other), before);
}

/// `hostcrypt erase`: refused without --yes and while served; then both
/// header copies are gone, the volume refuses to open, and the audit log
/// says who erased it.
#[test]
fn erase_destroys_the_headers_and_the_volume_refuses_to_open() {
    let mut fx = Fixture::new();
    let backing = fx.volume("e", "cache", "");
    fx.write_config(&fx.control_and_audit());
    fx.create("e", "16M", 4096);
    let d = fx.start();
    qemu_io(&fx.uri("e"), &["write -P 0x7e 0 1M"]);
    let out = fx.cli(&["erase", "e"]);
    assert!(!out.status.success());
    assert!(output_text(&out).contains("--yes"), "{}", output_text(&out));
    let out = fx.cli(&["erase", "e", "--yes"]);
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("is serving"),
        "{}",
        output_text(&out)
    );
    assert_eq!(d.stop(), 0);

    let out = fx.cli(&["erase", "e", "--yes"]);
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("unreadable without a header backup"),
        "{text}"
    );
    let raw = std::fs::read(&backing).unwrap();
    assert!(
        raw[..1 << 20].iter().all(|&b| b == 0),
        "header area not overwritten"
    );
    let out = Command::new(bin("hostcrypt"))
        .arg("inspect")
        .arg(&backing)
        .output()
        .unwrap();
    assert!(
        output_text(&out).contains("not a hostcrypt volume"),
        "{}",
        output_text(&out)
    );
    let d = fx.start_with_unavailable("e");
    assert!(
        d.stderr().contains("not a hostcrypt volume"),
        "{}",
        d.stderr()
    );
    assert_eq!(d.stop(), 0);
    let audit = std::fs::read_to_string(fx.audit_log()).unwrap();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"erase\"") && l.contains("\"ok\"")),
        "{audit}"
    );
}
