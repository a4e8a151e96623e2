//! Double encryption (`kek_inner`): two independent XTS layers whose DEKs
//! two different KEKs wrap. The data needs both keys (OpenSSL checks the
//! composition), losing either key stops I/O, each layer rotates on its own,
//! and the config must say which KEK holds the inner layer.

use std::process::Command;

use crate::breakglass::openssl_decrypt_sector;
use hostcrypt_e2e::softhsm::SoftHsm;
use hostcrypt_e2e::*;
use hostcryptd::kek::{KeyProvider, LocalKek};
use hostcryptd::volume::{self, Layer};

/// A fixture with a second local KEK, `[kek.second]`, for inner layers.
fn fixture_with_second_kek() -> (Fixture, std::path::PathBuf) {
    let mut fx = Fixture::new();
    let second = fx.add_local_kek("second");
    (fx, second)
}

/// Break-glass: the header and both layers' DEKs, unwrapped with the two
/// local KEK files.
fn unwrap_both(
    fx: &Fixture,
    second: &std::path::Path,
    backing: &std::path::Path,
) -> (
    volume::Header,
    hostcryptd::crypto::Dek,
    hostcryptd::crypto::Dek,
) {
    let copies = volume::read_headers(backing).unwrap();
    let header = volume::current_header(backing, &copies).unwrap();
    let unwrap = |kek: &std::path::Path, layer| {
        LocalKek::load(kek)
            .unwrap()
            .unwrap(&header.active_slot(layer).unwrap().wrapped)
            .unwrap()
    };
    let (outer, inner) = (unwrap(&fx.kek, Layer::Outer), unwrap(second, Layer::Inner));
    (header, outer, inner)
}

#[test]
fn double_encrypted_data_needs_both_keys() {
    require_tool("nbdcopy");
    let (mut fx, second) = fixture_with_second_kek();
    let backing = fx.volume("dbl", "cache", "kek_inner = \"second\"");
    fx.create("dbl", "8M", 4096);
    let report = inspect_json(&backing);
    let layers: Vec<_> = report["keyslots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["layer"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(layers, ["outer", "inner"], "{report}");

    let d = fx.start();
    let mut data = vec![0u8; 8 << 20];
    getrandom::fill(&mut data).unwrap();
    let input = fx.path("in.bin");
    std::fs::write(&input, &data).unwrap();
    run_ok(Command::new("nbdcopy").arg(&input).arg(fx.uri("dbl")));
    assert!(d.stderr().contains("layers=2"), "{}", d.stderr());
    assert_eq!(d.stop(), 0);

    // Break-glass with both KEKs: outer layer off first, then inner.
    let (header, outer, inner) = unwrap_both(&fx, &second, &backing);
    let raw = std::fs::read(&backing).unwrap();
    let area = &raw[header.data_offset as usize..];
    for (i, (ct, pt)) in area.chunks(4096).zip(data.chunks(4096)).enumerate() {
        let outer_off = openssl_decrypt_sector(outer.expose(), ct, i as u64);
        assert_ne!(outer_off, pt, "one key alone must not reveal sector {i}");
        assert_eq!(
            openssl_decrypt_sector(inner.expose(), &outer_off, i as u64),
            pt,
            "sector {i}"
        );
    }

    // The daemon reads it back.
    let d = fx.start();
    let output = fx.path("out.bin");
    run_ok(Command::new("nbdcopy").arg(fx.uri("dbl")).arg(&output));
    assert_eq!(sha256_file(&output), sha256_file(&input));
    assert_eq!(d.stop(), 0);

    // Without kek_inner the daemon says what is missing and touches nothing.
    let text = std::fs::read_to_string(&fx.config).unwrap();
    std::fs::write(&fx.config, text.replace("kek_inner = \"second\"", "")).unwrap();
    let d = fx.start_with_unavailable("dbl");
    assert!(d.stderr().contains("double-encrypted"), "{}", d.stderr());
    assert_eq!(d.stop(), 0);
    assert_eq!(std::fs::read(&backing).unwrap(), raw);
}

#[test]
fn inner_layer_on_an_hsm_rotates_alone_and_its_loss_stops_io() {
    let mut fx = Fixture::new();
    let hsm = SoftHsm::new(fx.dir.path(), "dbl");
    hsm.aes_key("inner:v1");
    fx.env.push(hsm.env());
    fx.kek_tables.push(hsm.kek_table("hsm", "inner", ""));
    fx.volume(
        "v",
        "cache",
        "kek_inner = \"hsm\"\nkey_check_interval = \"1s\"",
    );
    fx.write_config(&format!(
        "control = \"{}\"",
        fx.path("control.sock").display()
    ));
    fx.create("v", "16M", 512);
    let d = fx.start();
    let uri = fx.uri("v");
    qemu_io(&uri, &["write -P 0x2d 0 1M"]);
    let status = fx.status();
    assert_eq!(
        status["volumes"][0]["key"]["inner"]["kek_name"], "hsm",
        "{status}"
    );

    hsm.aes_key("inner:v2");
    let out = fx.cli(&["rotate-kek", "v", "--inner"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = inspect_json(&fx.path("v.img"));
    let slot = |layer: &str| {
        report["keyslots"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["layer"] == layer)
            .unwrap()
            .clone()
    };
    assert_eq!(slot("inner")["key_version"], "2", "{report}");
    assert_eq!(slot("outer")["provider"], "local", "{report}");
    qemu_io(&uri, &["read -P 0x2d 0 1M"]);

    // Both layers under one KEK would defeat the point.
    let out = fx.cli(&["rekey", "v", "--kek", "hsm"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("two different KEKs"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Losing the inner key is key loss, even with the outer key fine.
    hsm.delete("secrkey", "inner:v2");
    fx.wait_key_state("v", "key-lost");
    read_fails_with_eio(&uri);
    assert_eq!(d.stop(), 0);
}

/// `inner_cipher = "adiantum"`: the inner layer is Adiantum, not XTS. A
/// 256 MiB nbdcopy round trip; decrypting the outer XTS layer with OpenSSL
/// leaves data that is not the plaintext, and Adiantum (plain64 tweaks)
/// with the inner DEK then gives the plaintext back.
#[test]
fn adiantum_inner_layer_round_trips_and_needs_both_keys() {
    require_tool("nbdcopy");
    let (mut fx, second) = fixture_with_second_kek();
    let backing = fx.volume(
        "adi",
        "cache",
        "kek_inner = \"second\"\ninner_cipher = \"adiantum\"",
    );
    fx.write_config(&fx.control_and_audit());
    fx.create("adi", "256M", 4096);
    assert_eq!(inspect_json(&backing)["inner_cipher"], "adiantum");

    let d = fx.start();
    assert!(d.stderr().contains("inner=adiantum"), "{}", d.stderr());
    let mut data = vec![0u8; 256 << 20];
    getrandom::fill(&mut data).unwrap();
    let input = fx.path("in.bin");
    std::fs::write(&input, &data).unwrap();
    run_ok(Command::new("nbdcopy").arg(&input).arg(fx.uri("adi")));
    let output = fx.path("out.bin");
    run_ok(Command::new("nbdcopy").arg(fx.uri("adi")).arg(&output));
    assert_eq!(sha256_file(&output), sha256_file(&input));
    // Re-encryption under new DEKs keeps the inner layer Adiantum.
    let out = fx.cli(&["reencrypt", "adi"]);
    assert!(out.status.success(), "{}", output_text(&out));
    std::fs::remove_file(&output).unwrap();
    run_ok(Command::new("nbdcopy").arg(fx.uri("adi")).arg(&output));
    assert_eq!(sha256_file(&output), sha256_file(&input));
    assert_eq!(d.stop(), 0);
    assert_eq!(inspect_json(&backing)["inner_cipher"], "adiantum");

    let (header, outer, inner) = unwrap_both(&fx, &second, &backing);
    let adiantum = hostcryptd::crypto::AdiantumSectorCipher::new(&inner, 4096);
    let raw = std::fs::read(&backing).unwrap();
    let area = &raw[header.data_offset as usize..];
    // Every 97th sector: OpenSSL is the outer-layer oracle.
    for i in (0..(256 << 20) / 4096).step_by(97) {
        let at = i * 4096;
        let mut layer = openssl_decrypt_sector(outer.expose(), &area[at..at + 4096], i as u64);
        assert_ne!(
            layer,
            data[at..at + 4096],
            "the outer key alone revealed sector {i}"
        );
        adiantum.decrypt(&mut layer, i as u64);
        assert_eq!(layer, data[at..at + 4096], "sector {i}");
    }
}
