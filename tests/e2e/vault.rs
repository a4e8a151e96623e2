//! The `vault` KEK provider against a real OpenBao dev server: rotation by
//! hand and automatic, key loss (too-old version, revoked token, soft
//! delete, sealed server) with both `on_key_loss` policies, recovery
//! without restart, migration from a local KEK, the audit log, and proof
//! that no DEK or token reaches any log.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hostcrypt_e2e::bao::{write_secret, Bao};
use hostcrypt_e2e::*;

/// Key checks run every second in these tests; a state change must show
/// within a few intervals (plus provider retries).
const WITHIN: Duration = Duration::from_secs(20);

/// Also used by the alerting-rule test (`prometheus.rs`).
pub(crate) struct VaultFixture {
    pub(crate) fx: Fixture,
    pub(crate) bao: Bao,
    token_file: PathBuf,
    token: String,
    audit: PathBuf,
    pub(crate) key: String,
}

impl VaultFixture {
    /// A config with `[kek.bao]` on transit key `key` (created with
    /// `key_type`), control socket and audit log; one cache volume `v`
    /// using KEK `volume_kek` with the given extra volume settings.
    pub(crate) fn new(key_type: &str, volume_kek: &str, volume_extra: &str) -> VaultFixture {
        let mut fx = Fixture::new();
        let bao = Bao::start(fx.dir.path());
        let key = "hostcrypt".to_string();
        bao.create_key(&key, key_type);
        let token_file = fx.path("bao.token");
        let token = bao.key_token(&key, &token_file);
        fx.kek_tables.push(format!(
            "[kek.bao]\nprovider = \"vault\"\naddress = \"{}\"\nkey = \"{key}\"\ntoken_file = \"{}\"\nattempts = 2\ntimeout_secs = 5\ninsecure_http = true\n",
            bao.addr,
            token_file.display()
        ));
        fx.default_kek = volume_kek.into();
        fx.volume("v", "cache", volume_extra);
        let audit = fx.audit_log();
        let vf = VaultFixture {
            fx,
            bao,
            token_file,
            token,
            audit,
            key,
        };
        vf.write_config();
        vf.fx.create("v", "16M", 4096);
        vf
    }

    fn write_config(&self) {
        self.fx.write_config(&self.fx.control_and_audit());
    }

    fn backing(&self) -> PathBuf {
        self.fx.path("v.img")
    }

    fn header(&self) -> serde_json::Value {
        inspect_json(&self.backing())
    }

    fn header_version(&self) -> String {
        self.header()["keyslots"][0]["key_version"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    fn audit_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect()
    }

    /// Whether the audit log has a line with this operation and outcome.
    fn audited(&self, operation: &str, outcome: &str) -> bool {
        self.audit_lines()
            .iter()
            .any(|l| l["operation"] == operation && l["outcome"] == outcome)
    }

    fn wait_state(&self, state: &str) {
        self.fx.wait_key_state("v", state);
    }

    fn set_config(&self, key_setting: &str) {
        self.bao.ok(&[
            "write",
            &format!("transit/keys/{}/config", self.key),
            key_setting,
        ]);
    }
}

fn no_secret_in(path: &Path, secrets: &[&str]) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    for secret in secrets {
        assert!(
            !text.contains(secret),
            "{} contains a secret",
            path.display()
        );
    }
}

#[test]
fn vault_rotation_online_rewraps_and_keeps_data() {
    let vf = VaultFixture::new("aes256-gcm96", "bao", "key_check_interval = \"1s\"");
    assert_eq!(vf.header_version(), "1");
    assert_eq!(vf.header()["keyslots"][0]["provider"], "vault");
    // `hostcrypt create` audits the first wrap, with the operator's uid.
    let wrap = vf
        .audit_lines()
        .into_iter()
        .find(|l| l["operation"] == "wrap")
        .expect("create audited");
    assert_eq!(wrap["outcome"], "ok");
    assert_eq!(wrap["key_version"], "1");
    assert!(wrap["uid"].is_u64() && wrap["time"].is_string(), "{wrap}");
    let d = vf.fx.start();
    let uri = vf.fx.uri("v");
    qemu_io(&uri, &["write -P 0x5a 0 1M"]);

    vf.bao.rotate_key(&vf.key);
    let out = vf.fx.cli(&["rotate-kek", "v"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("version 2"),
        "{}",
        output_text(&out)
    );
    assert_eq!(vf.header_version(), "2");
    // Serving went on across the rewrap; a second rotation is a no-op.
    qemu_io(&uri, &["read -P 0x5a 0 1M", "write -P 0x5b 1M 64k"]);
    let again = vf.fx.cli(&["rotate-kek", "v", "--json"]);
    assert!(again.status.success(), "{}", output_text(&again));
    assert_eq!(vf.header_version(), "2");
    assert!(vf.audited("rotate", "ok"));
    let rotate = vf
        .audit_lines()
        .into_iter()
        .find(|l| l["operation"] == "rotate" && l["key_version"] == "2")
        .expect("rotate audited with the new version");
    assert_eq!(rotate["provider"], "vault");

    // Back to an older version on request, then forward again.
    let out = vf.fx.cli(&["rotate-kek", "v", "--to-version", "1"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(vf.header_version(), "1");
    let out = vf.fx.cli(&["rotate-kek", "v"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(vf.header_version(), "2");

    assert_eq!(d.stop(), 0);
    // A restart unwraps the v2 wrapping; data intact.
    let d = vf.fx.start();
    qemu_io(&uri, &["read -P 0x5a 0 1M", "read -P 0x5b 1M 64k"]);
    assert!(vf.audited("unwrap", "ok"));
    let log = d.stderr();
    assert_eq!(d.stop(), 0);

    // No DEK and no token anywhere in our logs.
    let ciphertext =
        String::from_utf8(wrapped_blob(&vf.backing())).expect("vault ciphertext is text");
    let dek_b64 = vf.bao.decrypt(&vf.key, &ciphertext);
    let dek_hex = hex_of_b64(&dek_b64);
    let log_file = vf.fx.path("daemon.log");
    std::fs::write(&log_file, log).expect("save log");
    for path in [&vf.audit, &log_file] {
        no_secret_in(path, &[&dek_b64, &dek_hex, &vf.token]);
    }
}

/// The wrapped blob of the active keyslot (a `vault:vN:...` string).
fn wrapped_blob(backing: &Path) -> Vec<u8> {
    let copies = hostcryptd::volume::read_headers(backing).expect("headers");
    let header = hostcryptd::volume::current_header(backing, &copies).expect("header");
    header
        .active_keyslot()
        .expect("keyslot")
        .wrapped
        .blob
        .clone()
}

fn hex_of_b64(b64: &str) -> String {
    let out = run_ok(Command::new("sh").arg("-c").arg(format!(
        "printf %s '{b64}' | base64 -d | od -An -tx1 | tr -d ' \\n'"
    )));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn vault_auto_rotate_follows_new_versions() {
    let vf = VaultFixture::new(
        "aes256-gcm96",
        "bao",
        "key_check_interval = \"1s\"\nauto_rotate = true",
    );
    let d = vf.fx.start();
    qemu_io(&vf.fx.uri("v"), &["write -P 0x33 0 256k"]);
    vf.bao.rotate_key(&vf.key);
    wait_until("auto-rotation to v2", WITHIN, || vf.header_version() == "2");
    vf.bao.rotate_key(&vf.key);
    wait_until("auto-rotation to v3", WITHIN, || vf.header_version() == "3");
    assert!(vf.audited("auto-rotate", "ok"));
    qemu_io(&vf.fx.uri("v"), &["read -P 0x33 0 256k"]);
    assert_eq!(d.stop(), 0);
}

#[test]
fn vault_rsa_key_wraps_and_rotates() {
    let vf = VaultFixture::new("rsa-2048", "bao", "key_check_interval = \"1s\"");
    let d = vf.fx.start();
    qemu_io(&vf.fx.uri("v"), &["write -P 0x44 0 128k"]);
    vf.bao.rotate_key(&vf.key);
    let out = vf.fx.cli(&["rotate-kek", "v"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(vf.header_version(), "2");
    assert_eq!(d.stop(), 0);
    let d = vf.fx.start();
    qemu_io(&vf.fx.uri("v"), &["read -P 0x44 0 128k"]);
    assert_eq!(d.stop(), 0);
}

/// Two volumes on one KEK version cost one provider call per interval:
/// counted in OpenBao's own audit log against hostcryptd's check lines.
#[test]
fn volumes_on_one_kek_share_one_provider_call_per_interval() {
    let mut vf = VaultFixture::new("aes256-gcm96", "bao", "key_check_interval = \"1s\"");
    vf.fx.volume("w", "cache", "key_check_interval = \"1s\"");
    vf.write_config();
    vf.fx.create("w", "8M", 4096);
    let checks = |vf: &VaultFixture| {
        vf.audit_lines()
            .iter()
            .filter(|l| l["operation"] == "check" && l["outcome"] == "ok")
            .count()
    };
    let d = vf.fx.start();
    wait_until(
        "ten checks over both volumes",
        Duration::from_secs(30),
        || checks(&vf) >= 10,
    );
    assert_eq!(d.stop(), 0);
    let ours = checks(&vf);
    let shared = vf
        .audit_lines()
        .iter()
        .filter(|l| {
            l["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("shared with volume"))
        })
        .count();
    let bao_log = std::fs::read_to_string(&vf.bao.audit_log).unwrap_or_default();
    let rewraps = bao_log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| {
            l["type"] == "response"
                && l["request"]["path"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("transit/rewrap/"))
        })
        .count();
    assert!(
        rewraps >= 3,
        "OpenBao's audit log shows {rewraps} rewraps: not read right?"
    );
    assert!(shared * 2 + 2 >= ours, "checks {ours}, shared {shared}");
    assert!(
        rewraps * 2 <= ours + 2,
        "{rewraps} provider calls for {ours} volume checks"
    );
}

/// RSA-3072 and RSA-4096 transit keys wrap, serve and rotate too.
#[test]
fn vault_rsa_3072_and_4096_keys_serve_and_rotate() {
    for key_type in ["rsa-3072", "rsa-4096"] {
        let vf = VaultFixture::new(key_type, "bao", "");
        let d = vf.fx.start();
        qemu_io(&vf.fx.uri("v"), &["write -P 0x45 0 64k"]);
        vf.bao.rotate_key(&vf.key);
        let out = vf.fx.cli(&["rotate-kek", "v"]);
        assert!(out.status.success(), "{key_type}: {}", output_text(&out));
        assert_eq!(vf.header_version(), "2");
        qemu_io(&vf.fx.uri("v"), &["read -P 0x45 0 64k"]);
        assert_eq!(d.stop(), 0);
    }
}

#[test]
fn vault_too_old_version_is_key_loss_until_allowed_again() {
    let vf = VaultFixture::new("aes256-gcm96", "bao", "key_check_interval = \"1s\"");
    let d = vf.fx.start();
    let uri = vf.fx.uri("v");
    qemu_io(&uri, &["write -P 0x21 0 64k"]);
    vf.bao.rotate_key(&vf.key);
    vf.bao.rotate_key(&vf.key);
    // The header still holds v1; v1 may no longer decrypt.
    vf.set_config("min_decryption_version=3");
    vf.wait_state("key-lost");
    read_fails_with_eio(&uri);
    let check = vf.fx.cli(&["check-key", "v"]);
    assert_eq!(check.status.code(), Some(4), "{}", output_text(&check));
    assert!(
        output_text(&check).contains("too old"),
        "{}",
        output_text(&check)
    );
    assert!(vf.audited("key-loss", "lost"));

    vf.set_config("min_decryption_version=1");
    vf.wait_state("serving");
    qemu_io(&uri, &["read -P 0x21 0 64k"]);
    assert!(vf.audited("recovery", "ok"));
    assert_eq!(d.stop(), 0);
}

#[test]
fn vault_revoked_token_stops_io_and_a_new_token_resumes_it() {
    let vf = VaultFixture::new("aes256-gcm96", "bao", "key_check_interval = \"1s\"");
    let d = vf.fx.start();
    let uri = vf.fx.uri("v");
    qemu_io(&uri, &["write -P 0x77 0 64k"]);

    vf.bao.ok(&["token", "revoke", &vf.token]);
    vf.wait_state("key-lost");
    read_fails_with_eio(&uri);
    let status = vf.fx.status();
    let error = status["volumes"][0]["key"]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(error.contains("revoked"), "{status}");

    // A fresh token in the token file: back without a restart.
    let new_token = vf.bao.key_token(&vf.key, &vf.token_file);
    vf.wait_state("serving");
    qemu_io(&uri, &["read -P 0x77 0 64k"]);
    let log = d.stderr();
    assert_eq!(d.stop(), 0);
    for t in [&vf.token, &new_token] {
        assert!(!log.contains(t.as_str()), "a token reached the daemon log");
        no_secret_in(&vf.audit, &[t]);
    }
}

#[test]
fn vault_policy_without_decrypt_is_reported_as_policy_not_revocation() {
    let vf = VaultFixture::new("aes256-gcm96", "bao", "key_check_interval = \"1s\"");
    // A valid token whose policy lacks the transit paths.
    let bare = vf
        .bao
        .ok(&["token", "create", "-field=token", "-policy=default"]);
    write_secret(&vf.token_file, &bare);
    let d = vf.fx.start_with_unavailable("v");
    let log = d.stderr();
    assert!(log.contains("policy does not allow"), "{log}");
    assert!(!log.contains(&bare), "the token reached the log");
}

#[test]
fn vault_soft_delete_is_key_loss_and_restore_recovers() {
    let vf = VaultFixture::new("aes256-gcm96", "bao", "key_check_interval = \"1s\"");
    let d = vf.fx.start();
    let uri = vf.fx.uri("v");
    qemu_io(&uri, &["write -P 0x19 0 64k"]);
    vf.bao
        .ok(&["delete", &format!("transit/keys/{}/soft-delete", vf.key)]);
    vf.wait_state("key-lost");
    read_fails_with_eio(&uri);
    vf.bao.ok(&[
        "write",
        "-f",
        &format!("transit/keys/{}/soft-delete-restore", vf.key),
    ]);
    vf.wait_state("serving");
    qemu_io(&uri, &["read -P 0x19 0 64k"]);
    assert_eq!(d.stop(), 0);
}

/// An outage is not a revocation: a sealed OpenBao is unreachable, so the
/// volume serves from memory during `key_unreachable_grace`, stops after
/// it, and serves again once OpenBao answers.
#[test]
fn vault_sealed_server_serves_on_grace_then_stops_until_unsealed() {
    let vf = VaultFixture::new(
        "aes256-gcm96",
        "bao",
        "key_check_interval = \"1s\"\nkey_unreachable_grace = \"4s\"",
    );
    let d = vf.fx.start();
    let uri = vf.fx.uri("v");
    qemu_io(&uri, &["write -P 0x42 0 64k"]);
    vf.bao.ok(&["operator", "seal"]);
    vf.wait_state("key-unreachable-serving");
    // Within the grace: I/O goes on.
    qemu_io(&uri, &["read -P 0x42 0 64k", "write -P 0x43 64k 64k"]);
    assert!(vf.audited("key-unreachable", "serving"));
    let status = vf.fx.status();
    assert!(
        status["volumes"][0]["key"]["unreachable_since"]
            .as_u64()
            .is_some(),
        "{status}"
    );
    // After it: key loss, I/O stops.
    vf.wait_state("key-lost");
    read_fails_with_eio(&uri);
    let log = d.stderr();
    assert!(log.contains("retrying"), "{log}");
    assert!(log.contains("after 2 attempts"), "{log}");

    vf.bao.ok(&["operator", "unseal", &vf.bao.unseal_key()]);
    vf.wait_state("serving");
    qemu_io(&uri, &["read -P 0x42 0 64k", "read -P 0x43 64k 64k"]);
    assert_eq!(d.stop(), 0);
}

/// `on_key_unreachable = "stop"`: an unreachable provider is key loss at once.
#[test]
fn vault_sealed_server_with_stop_policy_is_key_loss_at_once() {
    let vf = VaultFixture::new(
        "aes256-gcm96",
        "bao",
        "key_check_interval = \"1s\"\non_key_unreachable = \"stop\"",
    );
    let d = vf.fx.start();
    let uri = vf.fx.uri("v");
    qemu_io(&uri, &["write -P 0x44 0 64k"]);
    vf.bao.ok(&["operator", "seal"]);
    vf.wait_state("key-lost");
    read_fails_with_eio(&uri);
    vf.bao.ok(&["operator", "unseal", &vf.bao.unseal_key()]);
    vf.wait_state("serving");
    qemu_io(&uri, &["read -P 0x44 0 64k"]);
    assert_eq!(d.stop(), 0);
}

/// A revoked token is a denial, not an outage: I/O stops within one
/// interval although the (default, 24 h) grace for outages has not run out.
#[test]
fn vault_revoked_token_stops_io_inside_the_unreachable_grace() {
    let vf = VaultFixture::new("aes256-gcm96", "bao", "key_check_interval = \"1s\"");
    let d = vf.fx.start();
    let uri = vf.fx.uri("v");
    qemu_io(&uri, &["write -P 0x45 0 64k"]);
    vf.bao.ok(&["token", "revoke", &vf.token]);
    vf.wait_state("key-lost");
    read_fails_with_eio(&uri);
    assert!(!vf.audited("key-unreachable", "serving"));
    assert_eq!(d.stop(), 0);
}

/// Key-safety: a transit key that may be deleted is a warning in status,
/// `check-key` and the log; turning deletion off clears it at the next check.
#[test]
fn vault_deletable_key_is_a_warning_until_deletion_is_disallowed() {
    let vf = VaultFixture::new("aes256-gcm96", "bao", "key_check_interval = \"1s\"");
    let d = vf.fx.start();
    let warnings = |fx: &Fixture| fx.status()["volumes"][0]["key"]["warnings"].clone();
    assert_eq!(
        warnings(&vf.fx),
        serde_json::Value::Null,
        "a fresh transit key is safe"
    );
    vf.set_config("deletion_allowed=true");
    wait_until("the deletion warning", Duration::from_secs(20), || {
        warnings(&vf.fx)
            .to_string()
            .contains("deletion_allowed = true")
    });
    let out = vf.fx.cli(&["check-key"]);
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("warning: KEK bao: transit key hostcrypt has deletion_allowed"),
        "{text}"
    );
    assert!(d.stderr().contains("key safety"), "{}", d.stderr());
    vf.set_config("deletion_allowed=false");
    wait_until("the warning clears", Duration::from_secs(20), || {
        warnings(&vf.fx) == serde_json::Value::Null
    });
    assert_eq!(d.stop(), 0);
}

/// `hostcryptd --check` proves every KEK wraps and unwraps, and names the
/// one that does not; `--check --offline` validates the config alone.
#[test]
fn check_proves_each_kek_and_offline_checks_the_config_alone() {
    let vf = VaultFixture::new("aes256-gcm96", "bao", "");
    let out = vf.fx.check();
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("KEK bao: OK") && text.contains("KEK main: OK"),
        "{text}"
    );
    vf.bao.ok(&["operator", "seal"]);
    let out = vf.fx.check();
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("KEK bao: FAILED") && text.contains("KEK main: OK"),
        "{text}"
    );
    assert!(text.contains("KEK(s) bao cannot"), "{text}");
    let out = Command::new(bin("hostcryptd"))
        .arg("--config")
        .arg(&vf.fx.config)
        .args(["--check", "--offline"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        !output_text(&out).contains("KEK bao"),
        "{}",
        output_text(&out)
    );
}

/// A provider that accepts connections and never answers (OpenBao frozen
/// with SIGSTOP) holds up only its own volumes' checks: the local KEK's
/// checks go on, `hostcrypt status` and `hostcrypt reload` answer at once.
#[test]
fn hanging_provider_does_not_delay_other_keks_status_or_reload() {
    let mut vf = VaultFixture::new("aes256-gcm96", "bao", "key_check_interval = \"1s\"");
    vf.fx.default_kek = "main".into();
    vf.fx
        .volume("local", "cache", "key_check_interval = \"1s\"");
    vf.write_config();
    vf.fx.create("local", "8M", 4096);
    let d = vf.fx.start();
    vf.wait_state("serving");
    let last_check = |fx: &Fixture, name: &str| {
        fx.status()["volumes"]
            .as_array()
            .and_then(|vs| vs.iter().find(|v| v["name"] == name).cloned())
            .and_then(|v| v["key"]["last_check"].as_u64())
            .unwrap_or(0)
    };
    vf.bao.pause();
    let paused_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // The bao check hangs (5 s timeout x 2 attempts); the local volume's
    // checks keep coming, and every status call answers quickly.
    let mut slowest = Duration::ZERO;
    wait_until(
        "local checks continue while bao hangs",
        Duration::from_secs(20),
        || {
            let started = std::time::Instant::now();
            let seen = last_check(&vf.fx, "local");
            slowest = slowest.max(started.elapsed());
            seen >= paused_at + 4
        },
    );
    assert!(slowest < Duration::from_secs(2), "status took {slowest:?}");
    let started = std::time::Instant::now();
    let out = vf.fx.cli(&["reload"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "reload took {:?}",
        started.elapsed()
    );
    qemu_io(
        &vf.fx.uri("local"),
        &["write -P 0x61 0 64k", "read -P 0x61 0 64k"],
    );

    vf.bao.resume();
    vf.wait_state("serving");
    assert_eq!(d.stop(), 0);
}

/// OpenBao down at start: the local and temp volumes serve, the vault
/// volume is listed but refused with its state (the reason goes to the log); once OpenBao answers it
/// opens by itself within one interval, no restart, data intact.
#[test]
fn vault_down_at_start_waits_for_its_key_while_other_volumes_serve() {
    let mut vf = VaultFixture::new("aes256-gcm96", "bao", "key_check_interval = \"1s\"");
    vf.fx.default_kek = "main".into();
    vf.fx.volume("local", "cache", "");
    vf.fx.volume("scratch", "temp", "size = \"8M\"");
    vf.write_config();
    vf.fx.create("local", "8M", 4096);
    let d = vf.fx.start();
    let uri = vf.fx.uri("v");
    qemu_io(&uri, &["write -P 0x51 0 64k"]);
    assert_eq!(d.stop(), 0);

    vf.bao.ok(&["operator", "seal"]);
    let d = vf.fx.start();
    wait_until("v waits for its key", Duration::from_secs(30), || {
        vf.fx.key_state("v") == "waiting-for-key"
    });
    qemu_io(
        &vf.fx.uri("local"),
        &["write -P 0x52 0 64k", "read -P 0x52 0 64k"],
    );
    qemu_io(
        &vf.fx.uri("scratch"),
        &["write -P 0x53 0 64k", "read -P 0x53 0 64k"],
    );
    // Listed, refused with the reason.
    let script = r#"
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(sys.argv[1])
names = []
h.opt_list(lambda name, description: names.append(name))
assert "v" in names and "local" in names, names
print("OK")
"#;
    python_nbd(script, &vf.fx.uri(""));
    // GO is refused with the reason (raw, since libnbd does not print it).
    let script = r#"
import socket, struct
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
assert s.recv(18, socket.MSG_WAITALL)[:8] == b"NBDMAGIC"
s.sendall(struct.pack(">I", 3))
data = struct.pack(">I", 1) + b"v" + struct.pack(">H", 0)
s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(data)) + data)
_, _, kind, length = struct.unpack(">QIII", s.recv(20, socket.MSG_WAITALL))
message = s.recv(length, socket.MSG_WAITALL).decode()
assert kind == (1 << 31) | 6, hex(kind)
assert "waiting-for-key" in message and "unavailable" not in message, message
print("OK")
"#;
    python_nbd(script, &vf.fx.socket.to_string_lossy());
    read_fails_with_eio_or_refused(&uri);
    assert!(vf.audited("open", "error"));

    vf.bao.ok(&["operator", "unseal", &vf.bao.unseal_key()]);
    vf.wait_state("serving");
    qemu_io(&uri, &["read -P 0x51 0 64k"]);
    assert!(vf.audited("open", "ok"));
    assert!(
        d.stderr().contains("volume opened; serving it now"),
        "{}",
        d.stderr()
    );
    assert_eq!(d.stop(), 0);
}

#[test]
fn vault_until_restart_keeps_serving_then_waits_after_restart() {
    let vf = VaultFixture::new(
        "aes256-gcm96",
        "bao",
        "key_check_interval = \"1s\"\non_key_loss = \"until-restart\"",
    );
    let d = vf.fx.start();
    let uri = vf.fx.uri("v");
    qemu_io(&uri, &["write -P 0x64 0 64k"]);
    vf.bao.ok(&["token", "revoke", &vf.token]);
    vf.wait_state("key-lost-serving");
    // Still serving from the in-memory key.
    qemu_io(&uri, &["read -P 0x64 0 64k", "write -P 0x65 64k 64k"]);
    assert_eq!(d.stop(), 0);

    // After a restart the key is needed again, and it is gone: the volume
    // waits for it (the daemon runs), and says why.
    let d = vf.fx.start();
    wait_until("v waits for its key", Duration::from_secs(30), || {
        vf.fx.key_state("v") == "waiting-for-key"
    });
    let log = d.stderr();
    assert!(log.contains("revoked") || log.contains("denied"), "{log}");
    assert!(vf.audited("unwrap", "error"));
    read_fails_with_eio_or_refused(&uri);
}

#[test]
fn rekey_moves_a_local_volume_to_vault_online() {
    let vf = VaultFixture::new("aes256-gcm96", "main", "key_check_interval = \"1s\"");
    assert_eq!(vf.header()["keyslots"][0]["provider"], "local");
    let d = vf.fx.start();
    let uri = vf.fx.uri("v");
    qemu_io(&uri, &["write -P 0x3c 0 1M"]);
    let out = vf.fx.cli(&["rekey", "v", "--kek", "bao"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(vf.header()["keyslots"][0]["provider"], "vault");
    qemu_io(&uri, &["read -P 0x3c 0 1M"]);
    let status = vf.fx.status();
    assert_eq!(status["volumes"][0]["key"]["kek_name"], "bao", "{status}");
    assert!(vf.audited("rekey", "ok"));
    assert_eq!(d.stop(), 0);

    // The config still names the local KEK: the daemon finds the provider
    // that owns the keyslot and says how to update the config.
    let d = vf.fx.start();
    qemu_io(&uri, &["read -P 0x3c 0 1M"]);
    let log = d.stderr();
    assert!(log.contains("set kek = \"bao\""), "{log}");
    assert_eq!(d.stop(), 0);
}

#[test]
fn control_commands_report_unknown_volumes_and_missing_daemon() {
    let vf = VaultFixture::new("aes256-gcm96", "bao", "");
    // No daemon: exit code 3 and a hint.
    let out = vf.fx.cli(&["status"]);
    assert_eq!(out.status.code(), Some(3), "{}", output_text(&out));
    assert!(output_text(&out).contains("is hostcryptd running"));
    let d = vf.fx.start();
    let out = vf.fx.cli(&["rotate-kek", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        output_text(&out).contains("no volume \"nope\""),
        "{}",
        output_text(&out)
    );
    let out = vf.fx.cli(&["rekey", "v", "--kek", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        output_text(&out).contains("no [kek.nope]"),
        "{}",
        output_text(&out)
    );
    let out = vf.fx.cli(&["status"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("serving"),
        "{}",
        output_text(&out)
    );
    let out = vf.fx.cli(&["check-key"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(d.stop(), 0);
}

/// The vhost-user-blk export under the same key rules as NBD: a revoked
/// token fails the guest's requests with VIRTIO_BLK_S_IOERR (not a hang,
/// not a reset), and a fresh token brings them back with the data
/// written before, without a restart or a new connection.
#[test]
fn vault_revoked_token_fails_vhost_user_requests_and_a_new_token_resumes_them() {
    use hostcrypt_e2e::vhost::{BlkClient, BUFFERS, S_IOERR, S_OK, T_IN, T_OUT};
    let mut vf = VaultFixture::new("aes256-gcm96", "bao", "key_check_interval = \"1s\"");
    let socket = vf.fx.path("v.vhost");
    vf.fx.clear_volumes();
    vf.fx.volume(
        "v",
        "cache",
        &format!(
            "key_check_interval = \"1s\"\nvhost_user = \"{}\"\nvhost_user_queues = 1\n",
            socket.display()
        ),
    );
    vf.write_config();
    let d = vf.fx.start();
    let mut c = BlkClient::connect(&socket, 1, 4 << 20).expect("vhost-user-blk set-up");
    let (data, back) = (BUFFERS + 4096, BUFFERS + 8192);
    c.write(data, &[0x5c; 4096]);
    assert_eq!(c.request(0, T_OUT, 8, &[(data, 4096)]).unwrap().0, S_OK);

    vf.bao.ok(&["token", "revoke", &vf.token]);
    vf.wait_state("key-lost");
    for kind in [T_IN, T_OUT] {
        let (status, _) = c
            .request(0, kind, 8, &[(back, 4096)])
            .expect("an answer, not a hang");
        assert_eq!(status, S_IOERR, "request type {kind} with the key lost");
    }

    let new_token = vf.bao.key_token(&vf.key, &vf.token_file);
    vf.wait_state("serving");
    c.write(back, &[0; 4096]);
    assert_eq!(c.request(0, T_IN, 8, &[(back, 4096)]).unwrap().0, S_OK);
    assert_eq!(c.read(back, 4096), vec![0x5c; 4096]);
    drop(c);
    let log = d.stderr();
    assert_eq!(d.stop(), 0);
    assert!(
        !log.contains(new_token.as_str()),
        "a token reached the daemon log"
    );
}
