//! Header damage, wrong keys, bad configs and CLI refusals: each gives a
//! clear error and writes nothing it should not.

use std::os::unix::fs::FileExt;
use std::process::Command;

use hostcrypt_e2e::*;
use hostcryptd::crypto::Dek;
use hostcryptd::kek::{KeyProvider, LocalKek};
use hostcryptd::volume::header::{Reencrypt, HEADER_SIZE};
use hostcryptd::volume::{Header, Keyslot, Layer, BACKUP_AT, PRIMARY_AT};
use sha2::{Digest, Sha256};

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

// Header authentication: each test below performs an attack by writing the
// backing as someone who holds neither the KEK's secret nor the DEK, and
// expects the daemon to refuse the volume, name it, and write nothing.

/// Rewrites both header copies as an attacker can: decode, change, bump
/// the sequence, re-encode (the SHA-256 checksum needs no secret; the MAC
/// is left as it was unless `change` replaces it).
fn rewrite_header(path: &std::path::Path, change: impl FnOnce(&mut Header)) {
    let mut raw = vec![0u8; HEADER_SIZE];
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    f.read_exact_at(&mut raw, PRIMARY_AT).unwrap();
    let mut header = Header::decode(&raw).unwrap();
    change(&mut header);
    header.sequence += 1;
    let encoded = header.encode().unwrap();
    f.write_all_at(&encoded[..], PRIMARY_AT).unwrap();
    f.write_all_at(&encoded[..], BACKUP_AT).unwrap();
}

fn header_area(path: &std::path::Path) -> Vec<u8> {
    let mut raw = std::fs::read(path).unwrap();
    raw.truncate(1 << 20);
    raw
}

fn put_header_area(path: &std::path::Path, area: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(area, 0).unwrap();
}

/// Starts the daemon expecting `volume` refused for `what`; checks the
/// backing is untouched and the refusal names the volume.
fn refused_at_start(fx: &Fixture, backing: &std::path::Path, volume: &str, what: &str) {
    let before = sha256_file(backing);
    let d = fx.start_with_unavailable(volume);
    let log = d.stderr();
    assert_eq!(d.stop(), 0);
    assert!(
        log.contains(what) && log.contains(&format!("volume {volume:?}")),
        "expected a refusal of {volume:?} for {what:?}:\n{log}"
    );
    assert_eq!(
        sha256_file(backing),
        before,
        "a refused volume was written to"
    );
}

/// Attack 1: a DEK of the attacker's choosing as the target of a
/// re-encryption "in progress" (with an RSA KEK its public part is all
/// this takes; the local KEK file stands in for it here). Refused by the
/// MAC and the record; the data is never moved to the attacker's key.
#[test]
fn forged_reencryption_target_is_refused() {
    let mut fx = Fixture::new();
    let backing = fx.volume("h", "cache", "");
    fx.create("h", "16M", 4096);
    let d = fx.start();
    qemu_io(&fx.uri("h"), &["write -P 0x61 0 1M"]);
    assert_eq!(d.stop(), 0);
    let kek = LocalKek::load(&fx.kek).unwrap();
    let mine = Dek::generate().unwrap();
    let wrapped = kek.wrap(&mine).unwrap();
    rewrite_header(&backing, |h| {
        h.keyslots.push(Keyslot {
            generation: 2,
            layer: Layer::Outer,
            wrapped,
        });
        h.reencrypt = Some(Reencrypt {
            checkpoint: 0,
            target_generation: 2,
        });
        if let Some(a) = h.auth.as_mut() {
            a.target_key_check = Some([0; 32]);
        }
    });
    refused_at_start(&fx, &backing, "h", "was not started by this daemon");
    // Without the record (state directory lost), the MAC still refuses it.
    std::fs::remove_dir_all(fx.state_dir()).unwrap();
    refused_at_start(&fx, &backing, "h", "MAC does not verify");
}

/// Attack 2: after a re-encryption to a new DEK generation, the header
/// saved before it is written back: refused as a rollback.
#[test]
fn rolled_back_header_is_refused() {
    let mut fx = Fixture::new();
    let backing = fx.volume("h", "cache", "");
    fx.write_config(&fx.control_and_audit());
    fx.create("h", "16M", 4096);
    let old = header_area(&backing);
    let d = fx.start();
    qemu_io(&fx.uri("h"), &["write -P 0x62 0 1M"]);
    let out = fx.cli(&["reencrypt", "h"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(d.stop(), 0);
    assert_eq!(inspect_json(&backing)["dek_generation"], 2);
    put_header_area(&backing, &old);
    refused_at_start(&fx, &backing, "h", "a rollback");
}

/// Attack 3: another volume's keyslot under the same KEK pasted into
/// this header: its DEK unwraps, but is not this volume's.
#[test]
fn pasted_keyslot_of_another_volume_is_refused() {
    let mut fx = Fixture::new();
    let backing = fx.volume("h", "cache", "");
    let other = fx.volume("o", "cache", "");
    fx.create("h", "16M", 4096);
    fx.create("o", "16M", 4096);
    let mut raw = vec![0u8; HEADER_SIZE];
    std::fs::File::open(&other)
        .unwrap()
        .read_exact_at(&mut raw, PRIMARY_AT)
        .unwrap();
    let theirs = Header::decode(&raw).unwrap().keyslots[0].clone();
    rewrite_header(&backing, |h| h.keyslots[0] = theirs);
    refused_at_start(&fx, &backing, "h", "not this volume's");
}

/// Attack 4: a journal record for the window at the header's checkpoint,
/// forged to claim the whole next window (under a MAC key of the
/// attacker's choosing): refused, no sector and no checkpoint moves.
#[test]
fn forged_reencryption_journal_is_refused() {
    let mut fx = Fixture::new();
    let backing = fx.volume("h", "cache", "");
    fx.write_config(&fx.control_and_audit());
    fx.create("h", "64M", 4096);
    let d = fx.start();
    qemu_io(&fx.uri("h"), &["write -P 0x63 0 8M"]);
    let out = fx.cli(&["reencrypt", "h", "--rate", "1", "--no-wait"]);
    assert!(out.status.success(), "{}", output_text(&out));
    wait_until(
        "the re-encryption passes its first window",
        std::time::Duration::from_secs(30),
        || {
            let out = fx.cli(&["reencrypt", "h", "--status", "--json"]);
            let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            s["checkpoint"].as_u64().unwrap_or(0) > 0
        },
    );
    assert_eq!(d.stop(), 0);
    let mut raw = vec![0u8; HEADER_SIZE];
    std::fs::File::open(&backing)
        .unwrap()
        .read_exact_at(&mut raw, PRIMARY_AT)
        .unwrap();
    let header = Header::decode(&raw).unwrap();
    let r = header.reencrypt.expect("stopped mid-re-encryption");
    let sectors = 256usize;
    let table = vec![0u8; sectors * 32];
    let mut rec = vec![0u8; 4096];
    rec[..8].copy_from_slice(b"HCJRNL\x00\x03");
    rec[8..24].copy_from_slice(header.uuid.as_bytes());
    rec[24..32].copy_from_slice(&r.checkpoint.to_le_bytes());
    rec[32..40].copy_from_slice(&((sectors * 4096) as u64).to_le_bytes());
    rec[40..44].copy_from_slice(&r.target_generation.to_le_bytes());
    rec[44..48].copy_from_slice(&4096u32.to_le_bytes());
    rec[48..80].copy_from_slice(&Sha256::digest(&table));
    let sum = Sha256::digest(&rec[..80]);
    rec[80..112].copy_from_slice(&sum);
    rec[112..144].copy_from_slice(&[0x66; 32]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&backing)
        .unwrap();
    f.write_all_at(&table, (512 << 10) + 4096).unwrap();
    f.write_all_at(&rec, 512 << 10).unwrap();
    drop(f);
    refused_at_start(&fx, &backing, "h", "MAC that does not verify");
}

/// Attack 5: a version-1 header (as an older hostcryptd wrote it) is
/// upgraded in place at the first open; writing the old header back is
/// then refused as a downgrade.
#[test]
fn version_1_header_is_upgraded_and_the_downgrade_refused() {
    let mut fx = Fixture::new();
    let backing = fx.volume("h", "cache", "");
    fx.create("h", "16M", 4096);
    // As an older version left it: no MAC, format version 1, no record.
    rewrite_header(&backing, |h| h.auth = None);
    std::fs::remove_dir_all(fx.state_dir()).unwrap();
    let legacy = header_area(&backing);
    assert_eq!(u16::from_le_bytes([legacy[8], legacy[9]]), 1);
    let d = fx.start();
    qemu_io(&fx.uri("h"), &["write -P 0x64 0 1M"]);
    let log = d.stderr();
    assert_eq!(d.stop(), 0);
    assert!(log.contains("upgrading it in place"), "{log}");
    let upgraded = header_area(&backing);
    for at in [PRIMARY_AT as usize, BACKUP_AT as usize] {
        assert_eq!(u16::from_le_bytes([upgraded[at + 8], upgraded[at + 9]]), 3);
    }
    let d = fx.start();
    qemu_io(&fx.uri("h"), &["read -P 0x64 0 1M"]);
    assert_eq!(d.stop(), 0);
    put_header_area(&backing, &legacy);
    refused_at_start(&fx, &backing, "h", "downgrade");
}

/// Attack 1 as it was found, on a real token: an RSA KEK on SoftHSM2,
/// whose public key anyone reads without a PIN. The attacker wraps a DEK
/// of their own with RSA-OAEP (python3 `cryptography`, no hostcrypt
/// code), writes it into the header as the target of a re-encryption
/// marked in progress, with the key check that DEK really has (derivable
/// by anyone who holds it); only the header MAC, keyed by the volume's
/// own DEK, is beyond them. Refused, naming the volume; nothing written.
#[test]
fn forged_rsa_reencryption_target_on_softhsm_is_refused() {
    use hostcrypt_e2e::softhsm::{SoftHsm, MODULE};
    let mut fx = Fixture::new();
    let hsm = SoftHsm::new(fx.dir.path(), "hc");
    fx.env.push(hsm.env());
    fx.kek_tables
        .push(hsm.kek_table("hsm", "hcr", "oaep_hash = \"sha1\""));
    fx.default_kek = "hsm".into();
    let backing = fx.volume("h", "cache", "");
    hsm.rsa_key("hcr:v1");
    fx.create("h", "16M", 4096);
    let d = fx.start();
    qemu_io(&fx.uri("h"), &["write -P 0x61 0 1M"]);
    assert_eq!(d.stop(), 0);

    // The attacker: no PIN, no login.
    let public = fx.path("attacker.pub.der");
    run_ok(
        Command::new("pkcs11-tool")
            .env("SOFTHSM2_CONF", &hsm.conf)
            .args(["--module", MODULE, "--token-label", "hc"])
            .args(["--read-object", "--type", "pubkey", "--label", "hcr:v1"])
            .arg("--output-file")
            .arg(&public),
    );
    let mine = Dek::generate().unwrap();
    let wrap = "import sys\n\
        from cryptography.hazmat.primitives import hashes, serialization\n\
        from cryptography.hazmat.primitives.asymmetric import padding\n\
        key = serialization.load_der_public_key(open(sys.argv[1], 'rb').read())\n\
        dek = bytes.fromhex(sys.argv[2])\n\
        oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)\n\
        sys.stdout.write(key.encrypt(dek, oaep).hex())\n";
    let out = Command::new("python3")
        .args(["-c", wrap])
        .arg(&public)
        .arg(hex::encode(mine.expose()))
        .output()
        .expect("python3");
    assert!(out.status.success(), "{}", output_text(&out));
    let blob = hex::decode(String::from_utf8(out.stdout).unwrap().trim()).unwrap();
    assert_eq!(blob.len(), 256);

    rewrite_header(&backing, |h| {
        let mut wrapped = h.keyslots[0].wrapped.clone();
        assert_eq!(wrapped.kek.provider, "pkcs11");
        wrapped.blob = blob;
        h.keyslots.push(Keyslot {
            generation: 2,
            layer: Layer::Outer,
            wrapped,
        });
        h.reencrypt = Some(Reencrypt {
            checkpoint: 0,
            target_generation: 2,
        });
        let check = hostcryptd::volume::GenerationKeys::derive(h.uuid, 2, &mine, None).key_check;
        if let Some(a) = h.auth.as_mut() {
            a.target_key_check = Some(check);
        }
    });
    refused_at_start(&fx, &backing, "h", "was not started by this daemon");
    // Without the anti-rollback record, the MAC alone refuses it.
    std::fs::remove_dir_all(fx.state_dir()).unwrap();
    refused_at_start(&fx, &backing, "h", "MAC does not verify");
}
