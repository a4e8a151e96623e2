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
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds a hostcrypt volume"));

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
