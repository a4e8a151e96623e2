//! Per-export request metrics, kept beside the export (as Firecracker keeps
//! device metrics beside the device): requests, bytes and errors by the
//! kind of request (the `volume::Op` it became, whatever frontend it came
//! from), latency histograms, requests in flight and open connections.
//! Plain atomics, so the hot path pays one relaxed add per counter and never
//! a lock; `control/metrics.rs` turns them into Prometheus/OpenMetrics text
//! at scrape time. Crypto time is the data area's (`volume/data/`), key
//! checks the key lifecycle's (`volume/keys.rs`).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::volume::OpKind;

/// What a frontend counts a request as: the kind of `volume::Op` it
/// became, a prefetch hint answered without one (NBD CACHE), or anything
/// else (a refused or unknown request, a block-status query).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Op(OpKind),
    Prefetch,
    Other,
}

/// Kinds we count, in the order of [`KIND_NAMES`]; the names are the
/// metrics' `command` label.
pub const KIND_NAMES: [&str; 7] = [
    "read",
    "write",
    "flush",
    "trim",
    "cache",
    "write_zeroes",
    "other",
];

/// Latency buckets (upper bounds, seconds): 25 µs to 1 s.
pub const LATENCY_BOUNDS: [f64; 12] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.1, 1.0,
];

fn kind_index(kind: RequestKind) -> usize {
    match kind {
        RequestKind::Op(OpKind::Read) => 0,
        RequestKind::Op(OpKind::Write) => 1,
        RequestKind::Op(OpKind::Flush) => 2,
        RequestKind::Op(OpKind::Trim) => 3,
        RequestKind::Prefetch => 4,
        RequestKind::Op(OpKind::WriteZeroes) => 5,
        RequestKind::Op(OpKind::Allocation) | RequestKind::Other => 6,
    }
}

/// A latency histogram over [`LATENCY_BOUNDS`] plus +Inf.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let i = LATENCY_BOUNDS
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(LATENCY_BOUNDS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
    }

    /// (sum in seconds, count, per-bucket counts with their upper bounds;
    /// the last bound is +Inf).
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let buckets: Vec<(f64, u64)> = LATENCY_BOUNDS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        (sum, count, buckets)
    }
}

#[derive(Debug, Default)]
pub struct ExportMetrics {
    requests: [AtomicU64; KIND_NAMES.len()],
    bytes: [AtomicU64; KIND_NAMES.len()],
    errors: [AtomicU64; KIND_NAMES.len()],
    latency: [Histogram; KIND_NAMES.len()],
    in_flight: AtomicI64,
    connections: AtomicI64,
    /// Clients refused by the volume's allow list.
    refused: AtomicU64,
}

/// One counted command's totals.
pub struct CommandTotals {
    pub name: &'static str,
    pub requests: u64,
    pub bytes: u64,
    pub errors: u64,
}

impl ExportMetrics {
    /// A request arrived; pair with [`ExportMetrics::end`] (the request
    /// context does so when it drops, whatever path it took).
    pub fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub fn end(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Counts one answered request; `failed` when it got an error.
    pub fn complete(&self, kind: RequestKind, length: u64, failed: bool, elapsed: Duration) {
        let i = kind_index(kind);
        self.requests[i].fetch_add(1, Ordering::Relaxed);
        if failed {
            self.errors[i].fetch_add(1, Ordering::Relaxed);
        } else if matches!(
            kind,
            RequestKind::Op(OpKind::Read | OpKind::Write | OpKind::WriteZeroes | OpKind::Trim)
        ) {
            self.bytes[i].fetch_add(length, Ordering::Relaxed);
        }
        self.latency[i].observe(elapsed);
    }

    /// Counts an open connection until the guard drops.
    pub fn connect(&self) -> Connection<'_> {
        self.connections.fetch_add(1, Ordering::Relaxed);
        Connection(self)
    }

    pub fn commands(&self) -> impl Iterator<Item = CommandTotals> + '_ {
        KIND_NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| CommandTotals {
                name,
                requests: self.requests[i].load(Ordering::Relaxed),
                bytes: self.bytes[i].load(Ordering::Relaxed),
                errors: self.errors[i].load(Ordering::Relaxed),
            })
    }

    pub fn latency(&self, command: usize) -> &Histogram {
        &self.latency[command]
    }

    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a client the allow list turned away.
    pub fn refuse(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    pub fn connections(&self) -> i64 {
        self.connections.load(Ordering::Relaxed)
    }
}

pub struct Connection<'a>(&'a ExportMetrics);

impl Drop for Connection<'_> {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_bytes_errors_and_buckets() {
        let m = ExportMetrics::default();
        {
            m.begin();
            let _c = m.connect();
            assert_eq!((m.in_flight(), m.connections()), (1, 1));
            m.end();
        }
        assert_eq!((m.in_flight(), m.connections()), (0, 0));
        let read = RequestKind::Op(OpKind::Read);
        m.complete(read, 4096, false, Duration::from_micros(30));
        m.complete(read, 4096, true, Duration::from_secs(2));
        let read = m.commands().next().unwrap();
        assert_eq!((read.requests, read.bytes, read.errors), (2, 4096, 1));
        let (sum, count, buckets) = m.latency(0).snapshot();
        assert_eq!(count, 2);
        assert!((sum - 2.00003).abs() < 1e-6);
        assert_eq!(buckets[1], (0.00005, 1));
        assert_eq!(buckets.last().unwrap(), &(f64::INFINITY, 1));
    }
}
