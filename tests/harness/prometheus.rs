//! A real Prometheus for the alerting-rule test: `prometheus` (Debian's
//! package, which the test script installs) on a free 127.0.0.1 port, its
//! TSDB in the fixture's directory, scraping one hostcryptd every second as
//! job `hostcrypt` and evaluating the given rule files every second. Its
//! HTTP API says which alerts are pending or firing. Killed when dropped.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::bao::free_port;
use crate::wait_until;

pub struct Prometheus {
    child: Child,
    /// `127.0.0.1:PORT` of its web UI and API.
    pub addr: String,
    log: PathBuf,
}

impl Prometheus {
    /// Whether `prometheus` is on PATH; when it is not, the caller skips
    /// (`crate::skip`), which CI counts as a failure.
    pub fn available() -> bool {
        crate::on_path("prometheus")
    }

    /// Starts Prometheus with its files in `dir`, scraping
    /// `http://TARGET/metrics` (`target` is `127.0.0.1:PORT`) and loading
    /// `rules`; returns once it is ready (`/-/ready`), which it is only
    /// after the rule files loaded.
    pub fn start(dir: &Path, target: &str, rules: &[PathBuf]) -> Prometheus {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let rule_files: String = rules
            .iter()
            .map(|r| format!("  - \"{}\"\n", r.display()))
            .collect();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n{rule_files}\
                 scrape_configs:\n  - job_name: hostcrypt\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .expect("write prometheus config");
        let log = dir.join("prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("prometheus-data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("prometheus log"))
            .spawn()
            .expect("spawn prometheus");
        let mut prometheus = Prometheus { child, addr, log };
        wait_until("prometheus ready", Duration::from_secs(30), || {
            if let Ok(Some(status)) = prometheus.child.try_wait() {
                panic!("prometheus exited ({status}):\n{}", prometheus.log());
            }
            matches!(http_get(&prometheus.addr, "/-/ready"), Ok((200, _)))
        });
        prometheus
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /api/v1/PATH`: the answer's `data`, or `None` while the API
    /// cannot answer.
    pub fn api(&self, path: &str) -> Option<serde_json::Value> {
        let (status, body) = http_get(&self.addr, &format!("/api/v1/{path}")).ok()?;
        let answer: serde_json::Value = serde_json::from_str(&body).ok()?;
        assert!(
            status == 200 && answer["status"] == "success",
            "prometheus answered {status} to {path}: {body}"
        );
        Some(answer["data"].clone())
    }

    /// The health (`up`, `down`, `unknown`) of the scrape target.
    pub fn target_health(&self) -> String {
        self.api("targets")
            .and_then(|d| d["activeTargets"][0]["health"].as_str().map(String::from))
            .unwrap_or_default()
    }

    /// The value of an instant query's one sample, if it has one.
    pub fn query_one(&self, promql: &str) -> Option<f64> {
        let data = self.api(&format!("query?query={}", percent_encode(promql)))?;
        let result = data["result"].as_array()?;
        assert!(result.len() <= 1, "{promql}: {data}");
        result.first()?["value"][1].as_str()?.parse().ok()
    }

    /// Every alert pending or firing now: (alertname, labels, state).
    pub fn alerts(&self) -> Vec<(String, serde_json::Value, String)> {
        let Some(data) = self.api("alerts") else {
            return Vec::new();
        };
        data["alerts"]
            .as_array()
            .map(|alerts| {
                alerts
                    .iter()
                    .map(|a| {
                        (
                            a["labels"]["alertname"]
                                .as_str()
                                .unwrap_or_default()
                                .to_string(),
                            a["labels"].clone(),
                            a["state"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The state (`pending`, `firing`) of alert `name` for `volume`, or
    /// `None` when it is not active.
    pub fn alert_state(&self, name: &str, volume: Option<&str>) -> Option<String> {
        self.alerts()
            .into_iter()
            .find(|(n, labels, _)| n == name && volume.is_none_or(|v| labels["volume"] == v))
            .map(|(_, _, state)| state)
    }

    /// Waits until alert `name` (for `volume`, if given) is pending or
    /// firing: Prometheus makes it pending at the first evaluation after
    /// its condition holds, whatever its `for:`.
    pub fn wait_alert_active(&self, name: &str, volume: Option<&str>, deadline: Duration) {
        wait_until(&format!("alert {name} pending or firing"), deadline, || {
            self.alert_state(name, volume).is_some()
        });
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.0 GET to `addr` (`HOST:PORT`): (status, body).
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}

/// `text` for a URL's query string: unreserved characters as they are,
/// every other byte as %XX.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
