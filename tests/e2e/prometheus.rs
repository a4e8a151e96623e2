//! The alerting rules (`contrib/prometheus/hostcrypt.rules.yml`) in a real
//! Prometheus scraping a real hostcryptd whose volume's KEK is an OpenBao
//! transit key: every rule evaluates without error against the daemon's
//! metrics, none is active while all is well, and the key, volume and
//! daemon alerts become active when OpenBao is sealed, the key may be
//! deleted and then is, and the daemon restarts and stops. Their `for:` durations are minutes,
//! so the test waits for an alert to be pending (or firing), which it is
//! at the first evaluation after its condition holds. The promtool unit
//! tests beside the rules cover the rest.

use std::path::Path;
use std::time::Duration;

use hostcrypt_e2e::bao::free_port;
use hostcrypt_e2e::prometheus::Prometheus;
use hostcrypt_e2e::*;

use crate::vault::VaultFixture;

/// Scrapes and evaluations run every second; a key check every second
/// plus OpenBao's retries; then one scrape and one evaluation.
const WITHIN: Duration = Duration::from_secs(30);

#[test]
fn prometheus_raises_key_volume_and_daemon_alerts_for_an_openbao_key() {
    if !Prometheus::available() {
        skip("prometheus is not installed; scripts/test.sh installs it");
        return;
    }
    // A 5-minute grace: less than the 10 minutes HostcryptKeyGraceEnding
    // warns about, so sealing OpenBao raises it at once.
    let vf = VaultFixture::new(
        "aes256-gcm96",
        "bao",
        "key_check_interval = \"1s\"\nkey_unreachable_grace = \"5m\"",
    );
    let port = free_port();
    let target = format!("127.0.0.1:{port}");
    vf.fx.write_config(&format!(
        "{}\nmetrics = \"{target}\"",
        vf.fx.control_and_audit()
    ));
    let d = vf.fx.start();
    let rules =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/prometheus/hostcrypt.rules.yml");
    let prom = Prometheus::start(vf.fx.dir.path(), &target, &[rules]);

    // Healthy: the daemon is scraped, every rule has been evaluated
    // without an error, and no alert is active.
    wait_until("the daemon scraped", WITHIN, || {
        prom.target_health() == "up"
    });
    wait_until("every rule evaluated", WITHIN, || {
        let Some(groups) = prom.api("rules") else {
            return false;
        };
        let rules: Vec<&serde_json::Value> = groups["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        for r in &rules {
            assert!(
                r["health"] != "err",
                "rule {} fails: {}",
                r["name"],
                r["lastError"]
            );
        }
        !rules.is_empty() && rules.iter().all(|r| r["health"] == "ok")
    });
    assert_eq!(
        prom.query_one("hostcrypt_key_lost{job=\"hostcrypt\",volume=\"v\"}"),
        Some(0.0)
    );
    // The first evaluations may precede the first scrape (no `up` yet).
    wait_until("no alert on a healthy daemon", WITHIN, || {
        prom.alerts().is_empty()
    });

    // OpenBao sealed: an outage, so the volume serves on its grace.
    vf.bao.ok(&["operator", "seal"]);
    prom.wait_alert_active("HostcryptKeyUnreachable", Some("v"), WITHIN);
    prom.wait_alert_active("HostcryptKeyGraceEnding", Some("v"), WITHIN);
    let left = prom
        .query_one("hostcrypt_key_grace_remaining_seconds{volume=\"v\"}")
        .expect("the grace remaining while OpenBao is sealed");
    assert!(left > 0.0 && left <= 300.0, "{left}");
    assert_eq!(prom.alert_state("HostcryptKeyLost", Some("v")), None);

    // Unsealed: both resolve, and the grace series goes away.
    vf.bao.ok(&["operator", "unseal", &vf.bao.unseal_key()]);
    wait_until("the key alerts resolved", WITHIN, || {
        prom.alerts().is_empty()
    });
    wait_until("no grace series once OpenBao answers", WITHIN, || {
        prom.query_one("hostcrypt_key_grace_remaining_seconds{volume=\"v\"}")
            .is_none()
    });

    // Deletion allowed: a key-safety warning, one step from the loss.
    let key = format!("transit/keys/{}", vf.key);
    vf.bao
        .ok(&["write", &format!("{key}/config"), "deletion_allowed=true"]);
    prom.wait_alert_active("HostcryptKeySafetyWarning", Some("v"), WITHIN);

    // The key deleted: key loss at once, not an outage.
    vf.bao.ok(&["delete", &key]);
    prom.wait_alert_active("HostcryptKeyLost", Some("v"), WITHIN);
    assert_eq!(vf.fx.key_state("v"), "key-lost");
    assert_eq!(prom.alert_state("HostcryptKeyUnreachable", Some("v")), None);

    // Restarted without its key, the volume waits for it.
    assert_eq!(d.stop(), 0);
    let d = vf.fx.start();
    prom.wait_alert_active("HostcryptVolumeWaitingForKey", Some("v"), WITHIN);

    // Stopped: the scrape fails. A scrape that failed during the restart
    // above may have left this alert pending until the next evaluation, so
    // the failed scrape of the stopped daemon comes first.
    assert_eq!(d.stop(), 0);
    wait_until("the stopped daemon's scrape failed", WITHIN, || {
        prom.target_health() == "down"
    });
    prom.wait_alert_active("HostcryptDaemonDown", None, WITHIN);
}
