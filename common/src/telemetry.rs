//! The Prometheus endpoint any batchq process serves when `BATCHQ_METRICS_ADDR` is set (the
//! reducer serves one by default).

use std::net::SocketAddr;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// Bucket bounds of every `_seconds` histogram: 100 µs to 10 min, about 2.5× apart, the same in
/// every process so histograms aggregate across replicas.
pub const SECONDS_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0, 600.0,
];

/// A Prometheus exporter that will serve `GET /metrics` on `addr`, with batchq's buckets for
/// `_seconds` histograms; call `install()` on it (after any settings of your own).
pub fn prometheus_builder(addr: &str) -> Result<PrometheusBuilder, String> {
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| format!("{addr:?} is not an address: {e}"))?;
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), &SECONDS_BUCKETS)
        .map_err(|e| e.to_string())
}

/// Serves `GET /metrics` on `addr` unless it is empty or `off`.
pub fn serve_prometheus(addr: Option<&str>) -> Result<(), String> {
    match addr {
        None | Some("" | "off") => Ok(()),
        Some(addr) => prometheus_builder(addr)?
            .install()
            .map_err(|e| format!("cannot serve metrics on {addr}: {e}")),
    }
}
