//! The `pkcs11` KEK provider against a real SoftHSM2 token: AES key wrap
//! with padding and RSA-OAEP, rotation to a new key object, a deleted key
//! object as key loss, a wrong PIN (refused, not hammered, recovered when
//! the file is fixed), and the OAEP-hash hint for SoftHSM2.

use std::path::PathBuf;
use std::time::Duration;

use hostcrypt_e2e::bao::write_secret;
use hostcrypt_e2e::softhsm::SoftHsm;
use hostcrypt_e2e::*;

const WITHIN: Duration = Duration::from_secs(20);

struct HsmFixture {
    fx: Fixture,
    hsm: SoftHsm,
    audit: PathBuf,
}

impl HsmFixture {
    /// Token `hc`; `[kek.hsm]` on `key_label` (`extra` added to the table);
    /// one cache volume `v` on it, checked every second.
    fn new(key_label: &str, kek_extra: &str, volume_extra: &str) -> HsmFixture {
        let mut fx = Fixture::new();
        let hsm = SoftHsm::new(fx.dir.path(), "hc");
        fx.env.push(hsm.env());
        fx.kek_tables
            .push(hsm.kek_table("hsm", key_label, kek_extra));
        fx.default_kek = "hsm".into();
        fx.volume(
            "v",
            "cache",
            &format!("key_check_interval = \"1s\"\n{volume_extra}"),
        );
        let audit = fx.audit_log();
        fx.write_config(&fx.control_and_audit());
        HsmFixture { fx, hsm, audit }
    }

    fn header_slot(&self) -> serde_json::Value {
        inspect_json(&self.fx.path("v.img"))["keyslots"][0].clone()
    }

    fn wait_state(&self, state: &str) {
        self.fx.wait_key_state("v", state);
    }

    fn audit_text(&self) -> String {
        std::fs::read_to_string(&self.audit).unwrap_or_default()
    }
}

#[test]
fn pkcs11_aes_kwp_rotates_to_a_new_key_object_and_loses_a_deleted_one() {
    let hf = HsmFixture::new("hck", "", "");
    hf.hsm.aes_key("hck:v1");
    hf.fx.create("v", "16M", 4096);
    let slot = hf.header_slot();
    assert_eq!(slot["provider"], "pkcs11");
    assert_eq!(slot["key_id"], "hc/hck");
    assert_eq!(slot["key_version"], "1");
    // RFC 5649 wrapping of a 64-byte DEK: 64 + 8 bytes.
    assert_eq!(slot["wrapped_len"], 72);

    let d = hf.fx.start();
    let uri = hf.fx.uri("v");
    qemu_io(&uri, &["write -P 0x61 0 1M"]);
    hf.hsm.aes_key("hck:v2");
    let out = hf.fx.cli(&["rotate-kek", "v"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(hf.header_slot()["key_version"], "2");
    qemu_io(&uri, &["read -P 0x61 0 1M"]);

    // The old object can go once nothing uses it.
    hf.hsm.delete("secrkey", "hck:v1");
    let out = hf.fx.cli(&["check-key", "v"]);
    assert!(out.status.success(), "{}", output_text(&out));

    // Deleting the one in use is key loss: I/O stops.
    hf.hsm.delete("secrkey", "hck:v2");
    hf.wait_state("key-lost");
    read_fails_with_eio(&uri);
    let out = hf.fx.cli(&["check-key", "v"]);
    assert_eq!(out.status.code(), Some(4), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("hck:v2"),
        "{}",
        output_text(&out)
    );
    assert!(hf.audit_text().contains("\"key-loss\""));
    let log = d.stderr();
    assert_eq!(d.stop(), 0);
    assert!(!log.contains(hf.hsm.pin()), "the PIN reached the log");
    assert!(
        !hf.audit_text().contains(hf.hsm.pin()),
        "the PIN reached the audit log"
    );
}

#[test]
fn pkcs11_rsa_oaep_sha1_serves_across_restarts() {
    let hf = HsmFixture::new("hcr", "oaep_hash = \"sha1\"", "");
    hf.hsm.rsa_key("hcr:v1");
    hf.fx.create("v", "16M", 512);
    assert_eq!(hf.header_slot()["wrapped_len"], 256);
    let d = hf.fx.start();
    qemu_io(&hf.fx.uri("v"), &["write -P 0x72 0 256k"]);
    assert_eq!(d.stop(), 0);
    let d = hf.fx.start();
    qemu_io(&hf.fx.uri("v"), &["read -P 0x72 0 256k"]);
    assert_eq!(d.stop(), 0);
}

#[test]
fn pkcs11_rsa_oaep_sha256_refused_by_softhsm_says_what_to_set() {
    let hf = HsmFixture::new("hcr", "", "");
    hf.hsm.rsa_key("hcr:v1");
    let out = hf.fx.cli(&["create", "v", "--size", "16M"]);
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("oaep_hash = \"sha1\""),
        "{}",
        output_text(&out)
    );
    // Nothing was written.
    assert!(
        !hf.fx.path("v.img").exists() || std::fs::metadata(hf.fx.path("v.img")).unwrap().len() == 0
    );
}

#[test]
fn pkcs11_wrong_pin_stops_io_is_not_retried_and_a_fixed_pin_resumes() {
    let hf = HsmFixture::new("hck", "", "");
    hf.hsm.aes_key("hck:v1");
    hf.fx.create("v", "16M", 4096);
    let d = hf.fx.start();
    let uri = hf.fx.uri("v");
    qemu_io(&uri, &["write -P 0x50 0 64k"]);

    write_secret(&hf.hsm.pin_file, "00000000");
    hf.wait_state("key-lost");
    read_fails_with_eio(&uri);
    wait_until("the daemon stops trying the bad PIN", WITHIN, || {
        hf.fx.status()["volumes"][0]["key"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("not trying it again"))
    });

    write_secret(&hf.hsm.pin_file, hf.hsm.pin());
    hf.wait_state("serving");
    qemu_io(&uri, &["read -P 0x50 0 64k"]);
    assert_eq!(d.stop(), 0);

    // At start-up a wrong PIN is a clear refusal.
    write_secret(&hf.hsm.pin_file, "00000000");
    let mut d = hf.fx.spawn();
    assert_ne!(d.wait(Duration::from_secs(30)), 0);
    let log = d.stderr();
    assert!(log.contains("PIN is incorrect"), "{log}");
}

/// Key-safety on a token: a sensitive, non-extractable key gives no
/// warning; a newer version that is extractable and not sensitive does.
#[test]
fn pkcs11_extractable_key_is_a_warning() {
    let hf = HsmFixture::new("hck", "", "");
    hf.hsm.aes_key("hck:v1");
    hf.fx.create("v", "16M", 4096);
    let d = hf.fx.start();
    let warnings = || hf.fx.status()["volumes"][0]["key"]["warnings"].to_string();
    assert_eq!(warnings(), "null");
    hf.hsm.aes_key_with("hck:v2", &["--extractable"]);
    wait_until(
        "extractable warning",
        std::time::Duration::from_secs(20),
        || {
            let w = warnings();
            w.contains("hck:v2 is extractable") && w.contains("not sensitive")
        },
    );
    qemu_io(
        &hf.fx.uri("v"),
        &["write -P 0x11 0 64k", "read -P 0x11 0 64k"],
    );
    assert_eq!(d.stop(), 0);
}

/// RSA-3072 and RSA-4096 key pairs on SoftHSM2 serve; RSA-1024 is refused
/// when wrapping, naming its size, and nothing is written.
#[test]
fn pkcs11_rsa_3072_and_4096_work_and_1024_is_refused() {
    for (bits, ok) in [(1024, false), (3072, true), (4096, true)] {
        let hf = HsmFixture::new("hcr", "oaep_hash = \"sha1\"", "");
        hf.hsm.rsa_key_bits("hcr:v1", bits);
        let out = hf.fx.cli(&["create", "v", "--size", "16M"]);
        let text = output_text(&out);
        if !ok {
            assert!(!out.status.success(), "RSA-{bits}: {text}");
            assert!(
                text.contains("1024 bits") && text.contains("2048"),
                "{text}"
            );
            continue;
        }
        assert!(out.status.success(), "RSA-{bits}: {text}");
        assert_eq!(hf.header_slot()["wrapped_len"], bits / 8);
        let d = hf.fx.start();
        qemu_io(
            &hf.fx.uri("v"),
            &["write -P 0x40 0 64k", "read -P 0x40 0 64k"],
        );
        assert_eq!(d.stop(), 0);
    }
}
