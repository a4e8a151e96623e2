//! The `azure` KEK provider against the strict local Key Vault / IMDS /
//! Entra ID stand-in (`tests/py/azure_kv.py`): wrap and unwrap with
//! RSA-OAEP-256, current-version and pinned-version rotation, IMDS retries,
//! client credentials, and 401/403/disabled/deleted as key loss with
//! recovery.

use std::path::PathBuf;
use std::time::Duration;

use hostcrypt_e2e::azure::{self, AzureKv};
use hostcrypt_e2e::bao::write_secret;
use hostcrypt_e2e::*;

struct AzureFixture {
    fx: Fixture,
    kv: AzureKv,
    audit: PathBuf,
}

impl AzureFixture {
    /// Key `kek` with one version; `[kek.akv]` with `kek_extra` lines
    /// (endpoints point at the stand-in); volume `v` on it.
    fn new(kek_extra: &str, volume_extra: &str) -> (AzureFixture, String) {
        let mut fx = Fixture::new();
        let kv = AzureKv::start(fx.dir.path());
        let v1 = kv.new_version("kek");
        fx.kek_tables.push(format!(
            "[kek.akv]\nprovider = \"azure\"\nvault_url = \"{url}\"\nkey_name = \"kek\"\nimds_endpoint = \"{url}\"\nauthority = \"{url}\"\ntimeout_secs = 5\n{kek_extra}\n",
            url = kv.url()
        ));
        fx.default_kek = "akv".into();
        fx.volume(
            "v",
            "cache",
            &format!("key_check_interval = \"1s\"\n{volume_extra}"),
        );
        let audit = fx.audit_log();
        fx.write_config(&fx.control_and_audit());
        (AzureFixture { fx, kv, audit }, v1)
    }

    fn slot(&self) -> serde_json::Value {
        inspect_json(&self.fx.path("v.img"))["keyslots"][0].clone()
    }

    fn version(&self) -> String {
        self.slot()["key_version"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    fn wait_state(&self, state: &str) {
        self.fx.wait_key_state("v", state);
    }
}

#[test]
fn azure_managed_identity_wraps_and_follows_the_current_version() {
    let (af, v1) = AzureFixture::new("", "");
    af.fx.create("v", "16M", 4096);
    let slot = af.slot();
    assert_eq!(slot["provider"], "azure");
    assert_eq!(slot["key_version"], v1.as_str());
    assert_eq!(slot["wrapped_len"], 256, "RSA-2048 OAEP output");

    let d = af.fx.start();
    let uri = af.fx.uri("v");
    qemu_io(&uri, &["write -P 0x41 0 1M"]);
    let v2 = af.kv.new_version("kek");
    let out = af.fx.cli(&["rotate-kek", "v"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(af.version(), v2);
    qemu_io(&uri, &["read -P 0x41 0 1M"]);
    assert_eq!(d.stop(), 0);
    let d = af.fx.start();
    qemu_io(&uri, &["read -P 0x41 0 1M"]);
    let log = d.stderr();
    assert_eq!(d.stop(), 0);

    // Every Key Vault call carried a bearer token and api-version 7.4; the
    // token came from IMDS.
    let requests = af.kv.requests();
    let vault_calls: Vec<_> = requests
        .iter()
        .filter(|r| r["path"].as_str().is_some_and(|p| p.starts_with("/keys/")))
        .collect();
    assert!(vault_calls.len() >= 4, "{requests:?}");
    for r in &vault_calls {
        assert_eq!(r["api_version"], "7.4", "{r}");
        assert_eq!(r["authorization"], "Bearer", "{r}");
    }
    assert!(vault_calls.iter().any(|r| r["path"]
        .as_str()
        .is_some_and(|p| p.ends_with(&format!("{v2}/unwrapkey")))));
    assert!(requests
        .iter()
        .any(|r| r["path"] == "/metadata/identity/oauth2/token"));
    assert!(!log.contains("eyJ0eXAi"), "a bearer token reached the log");
    let audit = std::fs::read_to_string(&af.audit).unwrap_or_default();
    assert!(audit.contains("\"rotate\"") && !audit.contains("eyJ0eXAi"));
}

#[test]
fn azure_pinned_version_is_kept_until_asked() {
    let (mut af, v1) = AzureFixture::new("", "auto_rotate = true");
    af.fx.kek_tables[0].push_str(&format!("key_version = \"{v1}\"\n"));
    af.fx.write_config(&af.fx.control_and_audit());
    af.fx.create("v", "16M", 4096);
    let d = af.fx.start();
    let v2 = af.kv.new_version("kek");
    let out = af.fx.cli(&["rotate-kek", "v"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(af.version(), v1, "a pinned version is not rotated away");
    let out = af.fx.cli(&["rotate-kek", "v", "--to-version", &v2]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(af.version(), v2);
    assert_eq!(d.stop(), 0);
}

#[test]
fn azure_imds_transient_failures_are_retried() {
    let (af, _) = AzureFixture::new("", "");
    af.kv
        .control("/_test/imds-failures", r#"{"statuses": [410, 429, 500]}"#);
    let out = af.fx.cli(&["create", "v", "--size", "16M"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let imds = af
        .kv
        .requests()
        .iter()
        .filter(|r| r["path"] == "/metadata/identity/oauth2/token")
        .count();
    assert_eq!(imds, 4, "three failures, then success");

    // Failures beyond the attempts: a clear error, nothing written.
    af.kv.control(
        "/_test/imds-failures",
        r#"{"statuses": [404, 404, 404, 404, 404]}"#,
    );
    let out = af.fx.cli(&["create", "v", "--size", "16M", "--force"]);
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("after 4 attempts"),
        "{}",
        output_text(&out)
    );
}

#[test]
fn azure_client_credentials_and_a_wrong_secret() {
    let (mut af, _) = AzureFixture::new("", "");
    let secret = af.fx.path("client.secret");
    write_secret(&secret, azure::CLIENT_SECRET);
    af.fx.kek_tables[0].push_str(&format!(
        "auth = \"client-credentials\"\ntenant_id = \"{}\"\nclient_id = \"{}\"\nclient_secret_file = \"{}\"\n",
        azure::TENANT,
        azure::CLIENT_ID,
        secret.display()
    ));
    af.fx.write_config("");
    af.fx.create("v", "16M", 4096);
    let d = af.fx.start();
    qemu_io(
        &af.fx.uri("v"),
        &["write -P 0x11 0 64k", "read -P 0x11 0 64k"],
    );
    assert_eq!(d.stop(), 0);
    assert!(af
        .kv
        .requests()
        .iter()
        .any(|r| r["path"] == format!("/{}/oauth2/v2.0/token", azure::TENANT)));

    write_secret(&secret, "wrong-secret");
    let out = af.fx.cli(&["create", "v", "--size", "16M", "--force"]);
    assert!(!out.status.success());
    let text = output_text(&out);
    assert!(
        text.contains("AADSTS7000215") && text.contains("denied"),
        "{text}"
    );
    assert!(
        !text.contains("wrong-secret"),
        "the secret reached the error"
    );
}

#[test]
fn azure_forbidden_disabled_deleted_are_key_loss_and_recover() {
    let (af, v1) = AzureFixture::new("attempts = 2", "");
    af.fx.create("v", "16M", 4096);
    let d = af.fx.start();
    let uri = af.fx.uri("v");
    qemu_io(&uri, &["write -P 0x66 0 64k"]);

    // RBAC denial (403).
    af.kv.control("/_test/forbid", "{}");
    af.wait_state("key-lost");
    read_fails_with_eio(&uri);
    let check = af.fx.cli(&["check-key", "v"]);
    assert_eq!(check.status.code(), Some(4));
    assert!(
        output_text(&check).contains("ForbiddenByRbac"),
        "{}",
        output_text(&check)
    );
    af.kv.control("/_test/allow", "{}");
    af.wait_state("serving");
    qemu_io(&uri, &["read -P 0x66 0 64k"]);

    // Revoked tokens (401): one fresh token from IMDS and the volume carries on.
    af.kv.control("/_test/revoke-tokens", "{}");
    let check = af.fx.cli(&["check-key", "v"]);
    assert!(check.status.success(), "{}", output_text(&check));

    // Tokens the vault keeps rejecting (401 even after a fresh one): key loss.
    af.kv.control("/_test/reject-tokens", r#"{"reject": true}"#);
    af.wait_state("key-lost");
    let check = af.fx.cli(&["check-key", "v"]);
    assert_eq!(check.status.code(), Some(4));
    assert!(
        output_text(&check).contains("401"),
        "{}",
        output_text(&check)
    );
    af.kv
        .control("/_test/reject-tokens", r#"{"reject": false}"#);
    af.wait_state("serving");

    // A disabled version, then a deleted key.
    af.kv.control(
        "/_test/keys/kek/disable",
        &format!(r#"{{"version": "{v1}"}}"#),
    );
    af.wait_state("key-lost");
    assert!(output_text(&af.fx.cli(&["check-key", "v"])).contains("disabled"));
    af.kv.control("/_test/keys/kek/enable", "{}");
    af.wait_state("serving");
    af.kv.control("/_test/keys/kek/delete", "{}");
    af.wait_state("key-lost");
    assert!(output_text(&af.fx.cli(&["check-key", "v"])).contains("KeyNotFound"));
    af.kv.control("/_test/keys/kek/recover", "{}");
    af.wait_state("serving");
    qemu_io(&uri, &["read -P 0x66 0 64k"]);
    assert_eq!(d.stop(), 0);
    let audit = std::fs::read_to_string(&af.audit).unwrap_or_default();
    for operation in ["\"unwrap\"", "\"check\"", "\"key-loss\"", "\"recovery\""] {
        assert!(
            audit.contains(operation),
            "{operation} not audited:\n{audit}"
        );
    }
}

#[test]
fn azure_strict_server_rejects_an_unknown_api_version() {
    let (af, _) = AzureFixture::new("api_version = \"2016-10-01\"", "");
    let out = af.fx.cli(&["create", "v", "--size", "16M"]);
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("is not recognized"),
        "{}",
        output_text(&out)
    );
}

fn warnings(fx: &Fixture) -> String {
    fx.status()["volumes"][0]["key"]["warnings"].to_string()
}

/// Key-safety warnings from the Key Vault stand-in's attributes: a
/// purgeable key, a current version that is disabled, an expiry within 30
/// days, key_ops without unwrapKey. None of them stops I/O.
#[test]
fn azure_key_safety_warnings_follow_the_key_attributes() {
    let (af, _v1) = AzureFixture::new("", "");
    af.fx.create("v", "16M", 4096);
    let d = af.fx.start();
    let fx = &af.fx;
    wait_until("purgeable warning", Duration::from_secs(20), || {
        warnings(fx).contains("can be purged for good")
    });
    af.kv
        .set_attributes("kek", r#""recoveryLevel": "Recoverable""#);
    wait_until("purge warning cleared", Duration::from_secs(20), || {
        warnings(fx) == "null"
    });
    let soon = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 10 * 24 * 3600;
    af.kv.set_attributes(
        "kek",
        &format!(r#""exp": {soon}, "key_ops": ["wrapKey", "encrypt"]"#),
    );
    wait_until(
        "expiry and key_ops warnings",
        Duration::from_secs(20),
        || {
            let w = warnings(fx);
            w.contains("expires at") && w.contains("does not allow unwrapKey")
        },
    );
    // A newer version that is disabled: the volume's own version still
    // unwraps, and the warning says the current one is disabled.
    let v2 = af
        .kv
        .new_version_with("kek", r#""recoveryLevel": "Recoverable""#);
    af.kv.control(
        "/_test/keys/kek/disable",
        &format!(r#"{{"version": "{v2}"}}"#),
    );
    wait_until("disabled warning", Duration::from_secs(20), || {
        warnings(fx).contains("key kek is disabled")
    });
    qemu_io(&fx.uri("v"), &["write -P 0x3c 0 64k", "read -P 0x3c 0 64k"]);
    let out = fx.cli(&["check-key"]);
    assert!(
        output_text(&out).contains("warning: KEK akv: key kek is disabled"),
        "{}",
        output_text(&out)
    );
    assert_eq!(d.stop(), 0);
}

/// RSA-3072 and RSA-4096 Key Vault keys wrap, unwrap and rotate; an
/// RSA-1024 version is refused for new wraps, naming its size.
#[test]
fn azure_rsa_3072_and_4096_work_and_1024_is_refused() {
    let (af, _v1) = AzureFixture::new("", "");
    af.kv.new_version_with("kek", r#""key_size": 3072"#);
    af.fx.create("v", "16M", 4096);
    let d = af.fx.start();
    let uri = af.fx.uri("v");
    qemu_io(&uri, &["write -P 0x30 0 64k"]);
    let v4096 = af.kv.new_version_with("kek", r#""key_size": 4096"#);
    let out = af.fx.cli(&["rotate-kek", "v"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(af.version(), v4096);
    qemu_io(&uri, &["read -P 0x30 0 64k"]);
    af.kv.new_version_with("kek", r#""key_size": 1024"#);
    let out = af.fx.cli(&["rotate-kek", "v"]);
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("1024 bits") && text.contains("2048"),
        "{text}"
    );
    assert_eq!(af.version(), v4096, "nothing changed");
    qemu_io(&uri, &["read -P 0x30 0 64k"]);
    assert_eq!(d.stop(), 0);
}

/// 429 and 503 with Retry-After: the provider waits as long as the server
/// asks (not its own shorter backoff) and then succeeds.
#[test]
fn azure_throttling_honours_retry_after() {
    let (af, _v1) = AzureFixture::new("", "");
    af.kv.control(
        "/_test/throttle",
        r#"{"statuses": [429, 503], "retry_after": 1}"#,
    );
    af.fx.create("v", "16M", 4096);
    let times: Vec<f64> = af
        .kv
        .requests()
        .iter()
        .filter(|r| r["path"].as_str().is_some_and(|p| p.starts_with("/keys/")))
        .filter_map(|r| r["time"].as_f64())
        .collect();
    assert!(times.len() >= 4, "{times:?}");
    for pair in times[..3].windows(2) {
        assert!(
            pair[1] - pair[0] >= 0.95,
            "retried before Retry-After: {times:?}"
        );
    }
}
