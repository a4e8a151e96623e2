//! The metrics endpoint (`metrics = "127.0.0.1:9310"` in `[daemon]`):
//! `GET /metrics` answers OpenMetrics text, which Prometheus scrapes.
//!
//! The `prometheus-client` crate does the encoding through a collector that
//! reads the daemon's own atomics at scrape time (`export/metrics.rs`, the data
//! area's crypto time, the key lifecycle's counters), so serving I/O never
//! touches a registry or a lock. `tiny_http` serves the one endpoint on its
//! own thread: a scrape never competes with the NBD runtime.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::export::metrics::{CommandTotals, KIND_NAMES};
use crate::service::registry::{Registry as Volumes, Served};
use crate::volume::ReencryptState;

/// Reads every export's counters at scrape time.
#[derive(Debug)]
pub struct DaemonCollector {
    pub registry: Volumes,
    pub gate: std::sync::Arc<crate::frontend::nbd::gate::Gate>,
    pub engine: &'static str,
    pub started: Instant,
}

type Labels<'a> = Vec<(&'static str, &'a str)>;
/// A per-command counter: name, help, which commands have it, how to read it.
type CommandCounter = (
    &'static str,
    &'static str,
    fn(&str) -> bool,
    fn(&CommandTotals) -> u64,
);
/// A per-volume gauge: name, help, how to read it.
type VolumeGauge = (&'static str, &'static str, fn(&Served) -> f64);

impl Collector for DaemonCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let version = env!("CARGO_PKG_VERSION");
        let info: Labels = vec![("version", version), ("engine", self.engine)];
        ConstGauge::new(1i64).encode(
            encoder
                .encode_descriptor(
                    "hostcrypt_info",
                    "Daemon version and I/O engine",
                    None,
                    MetricType::Gauge,
                )?
                .encode_family(&info)?,
        )?;
        ConstGauge::new(self.started.elapsed().as_secs_f64()).encode(
            encoder.encode_descriptor(
                "hostcrypt_uptime_seconds",
                "Seconds since the daemon started",
                None,
                MetricType::Gauge,
            )?,
        )?;

        let per_command: [CommandCounter; 3] = [
            (
                "hostcrypt_requests",
                "NBD requests answered, by volume and command",
                |_| true,
                |c| c.requests,
            ),
            (
                "hostcrypt_request_errors",
                "NBD requests answered with an error, by volume and command",
                |_| true,
                |c| c.errors,
            ),
            (
                "hostcrypt_request_bytes",
                "Bytes read, written, zeroed or trimmed by successful requests",
                |name| matches!(name, "read" | "write" | "trim" | "write_zeroes"),
                |c| c.bytes,
            ),
        ];
        for (name, help, counted, value) in per_command {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for e in self.registry.iter() {
                for c in e.metrics.commands().filter(|c| counted(c.name)) {
                    let labels: Labels = vec![("volume", e.name()), ("command", c.name)];
                    ConstCounter::new(value(&c)).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        let mut family = encoder.encode_descriptor(
            "hostcrypt_request_duration_seconds",
            "Time from a request's arrival to its reply being queued",
            None,
            MetricType::Histogram,
        )?;
        for e in self.registry.iter() {
            for (i, name) in KIND_NAMES.iter().enumerate() {
                let (sum, count, buckets) = e.metrics.latency(i).snapshot();
                let labels: Labels = vec![("volume", e.name()), ("command", name)];
                family
                    .encode_family(&labels)?
                    .encode_histogram::<Labels>(sum, count, &buckets, None)?;
            }
        }
        let gauges: [VolumeGauge; 8] = [
            (
                "hostcrypt_requests_in_flight",
                "Requests received and not yet answered",
                |e| e.metrics.in_flight() as f64,
            ),
            ("hostcrypt_connections", "Open NBD connections", |e| {
                e.metrics.connections() as f64
            }),
            (
                "hostcrypt_volume_size_bytes",
                "Logical size of the volume",
                |e| e.size() as f64,
            ),
            (
                "hostcrypt_reencrypt_progress_ratio",
                "Share of the data area under the new DEK during a re-encryption (0 when none runs)",
                reencrypt_progress,
            ),
            (
                "hostcrypt_write_back_failed",
                "1 once a sync of the volume's backing has failed: FLUSH and FUA fail until it is reopened",
                |e| f64::from(u8::from(e.volume.data.backing().write_back_error().is_some())),
            ),
            (
                "hostcrypt_key_lost",
                "1 while the volume's key is lost (I/O stopped or serving until restart)",
                |e| f64::from(u8::from(e.keys.as_ref().is_some_and(|k| k.is_lost()))),
            ),
            (
                "hostcrypt_key_unreachable",
                "1 while the volume's KEK provider cannot be reached and the volume serves from memory on grace",
                |e| f64::from(u8::from(e.keys.as_ref().is_some_and(|k| k.is_unreachable()))),
            ),
            (
                "hostcrypt_key_warnings",
                "Key-safety warnings of the volume's KEKs (deletion allowed, purgeable, exportable, expiring, ...)",
                |e| e.keys.as_ref().map_or(0.0, |k| k.warning_count() as f64),
            ),
        ];
        for (name, help, value) in gauges {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for e in self.registry.iter() {
                let labels: Labels = vec![("volume", e.name())];
                ConstGauge::new(value(&e)).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "hostcrypt_key_grace_remaining_seconds",
            "Seconds left of key_unreachable_grace while the volume's KEK provider cannot be reached (no series otherwise); then the key is lost",
            None,
            MetricType::Gauge,
        )?;
        for e in self.registry.iter() {
            let Some(left) = e.keys.as_ref().and_then(|k| k.grace_remaining()) else {
                continue;
            };
            let labels: Labels = vec![("volume", e.name())];
            ConstGauge::new(left.as_secs_f64()).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "hostcrypt_reencrypt_state",
            "1 for the state the volume's re-encryption is in (idle, running, paused, waiting-for-key, failed, done), 0 for the others",
            None,
            MetricType::Gauge,
        )?;
        for e in self.registry.iter() {
            let Some(keys) = &e.keys else { continue };
            let now = keys.reencrypt_status().state;
            for state in ReencryptState::ALL {
                let labels: Labels = vec![("volume", e.name()), ("state", state.as_str())];
                ConstGauge::new(i64::from(state == now)).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "hostcrypt_crypto_seconds",
            "CPU time spent in XTS encryption and decryption",
            None,
            MetricType::Counter,
        )?;
        for e in self.registry.iter() {
            let labels: Labels = vec![("volume", e.name())];
            ConstCounter::new(e.volume.data.crypto_seconds())
                .encode(family.encode_family(&labels)?)?;
        }
        let remotes: Vec<_> = self
            .registry
            .iter()
            .filter_map(|e| {
                let status = e.volume.data.backing().remote().map(|r| r.status())?;
                Some((e.name().to_owned(), status))
            })
            .collect();
        let mut family = encoder.encode_descriptor(
            "hostcrypt_backing_connections_up",
            "Live connections to a volume's remote (NBD) backing",
            None,
            MetricType::Gauge,
        )?;
        for (name, b) in &remotes {
            let labels: Labels = vec![("volume", name)];
            ConstGauge::new(b.connections_up as i64).encode(family.encode_family(&labels)?)?;
        }
        type Field = fn(&crate::io::remote::client::RemoteStatus) -> u64;
        let remote_counters: [(&str, &str, Field); 4] = [
            (
                "hostcrypt_backing_reconnects",
                "Reconnections to a remote backing",
                |b| b.reconnects,
            ),
            (
                "hostcrypt_backing_resent",
                "Requests re-sent after a remote backing's connection broke",
                |b| b.resent,
            ),
            (
                "hostcrypt_backing_timeouts",
                "Requests failed because a remote backing did not answer within backing_timeout",
                |b| b.timeouts,
            ),
            (
                "hostcrypt_backing_errors",
                "Errors a remote backing returned",
                |b| b.errors,
            ),
        ];
        for (name, help, value) in remote_counters {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (volume, b) in &remotes {
                let labels: Labels = vec![("volume", volume)];
                ConstCounter::new(value(b)).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "hostcrypt_volume_unavailable",
            "1 for a configured volume that is not open (waiting for its key, or failed to open); retried",
            None,
            MetricType::Gauge,
        )?;
        for u in self.registry.unavailable().iter() {
            let labels: Labels = vec![("volume", &u.name), ("state", u.state.as_str())];
            ConstGauge::new(1i64).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "hostcrypt_access_refused",
            "Clients a volume's allow list turned away",
            None,
            MetricType::Counter,
        )?;
        for e in self.registry.iter() {
            let labels: Labels = vec![("volume", e.name())];
            ConstCounter::new(e.metrics.refused()).encode(family.encode_family(&labels)?)?;
        }
        let counters = &self.gate.counters;
        let mut family = encoder.encode_descriptor(
            "hostcrypt_connections_refused",
            "NBD connections closed before transmission, by reason",
            None,
            MetricType::Counter,
        )?;
        for (reason, counter) in [
            ("limit", &counters.refused_limit),
            ("tls_required", &counters.tls_required),
            ("tls_failed", &counters.tls_failures),
            ("handshake", &counters.handshake_failures),
        ] {
            let labels: Labels = vec![("reason", reason)];
            ConstCounter::new(counter.load(std::sync::atomic::Ordering::Relaxed))
                .encode(family.encode_family(&labels)?)?;
        }
        ConstGauge::new(self.gate.open_connections() as i64).encode(encoder.encode_descriptor(
            "hostcrypt_open_connections",
            "NBD connections open now, over all listeners and volumes",
            None,
            MetricType::Gauge,
        )?)?;
        let replies = &self.gate.replies;
        ConstGauge::new(replies.pending_bytes() as i64).encode(encoder.encode_descriptor(
            "hostcrypt_reply_bytes_pending",
            "Bytes reserved by read replies not yet sent, over all connections",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(replies.limit_bytes() as i64).encode(encoder.encode_descriptor(
            "hostcrypt_reply_memory_bytes",
            "The budget for read replies not yet sent (reply_memory)",
            None,
            MetricType::Gauge,
        )?)?;
        let mut family = encoder.encode_descriptor(
            "hostcrypt_key_checks",
            "Key checks by outcome",
            None,
            MetricType::Counter,
        )?;
        for e in self.registry.iter() {
            let Some(keys) = &e.keys else { continue };
            let (ok, failed) = keys.check_counts();
            for (outcome, n) in [("ok", ok), ("failed", failed)] {
                let labels: Labels = vec![("volume", e.name()), ("outcome", outcome)];
                ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

fn reencrypt_progress(export: &Served) -> f64 {
    export.keys.as_ref().map_or(0.0, |keys| {
        let status = keys.reencrypt_status();
        match status.target_generation {
            Some(_) if status.size > 0 => status.checkpoint as f64 / status.size as f64,
            _ => 0.0,
        }
    })
}

/// Serves `GET /metrics` on `addr` from a thread until `stop` is dropped or sends.
pub fn spawn(
    addr: SocketAddr,
    collector: DaemonCollector,
    stop: crate::service::shutdown::StopSignal,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let server = tiny_http::Server::http(addr).map_err(std::io::Error::other)?;
    let mut registry = Registry::default();
    registry.register_collector(Box::new(collector));
    let registry = Arc::new(registry);
    std::thread::Builder::new()
        .name("hostcrypt-metrics".into())
        .spawn(move || loop {
            if stop.is_stopped() {
                return;
            }
            let request = match server.recv_timeout(Duration::from_millis(200)) {
                Ok(Some(r)) => r,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!("metrics endpoint: {e}");
                    continue;
                }
            };
            let response = answer(&registry, request.method(), request.url());
            let _ = request.respond(response);
        })
}

fn answer(
    registry: &Registry,
    method: &tiny_http::Method,
    url: &str,
) -> tiny_http::Response<std::io::Cursor<Vec<u8>>> {
    let path = url.split('?').next().unwrap_or("");
    if *method != tiny_http::Method::Get || path != "/metrics" {
        return tiny_http::Response::from_string("only GET /metrics is served here\n")
            .with_status_code(404);
    }
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, registry) {
        return tiny_http::Response::from_string(format!("encoding failed: {e}\n"))
            .with_status_code(500);
    }
    let content_type = tiny_http::Header::from_bytes(
        &b"Content-Type"[..],
        &b"application/openmetrics-text; version=1.0.0; charset=utf-8"[..],
    );
    let mut response = tiny_http::Response::from_string(text);
    if let Ok(header) = content_type {
        response = response.with_header(header);
    }
    response
}
