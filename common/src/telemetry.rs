//! The Prometheus endpoint any batchq process serves when `BATCHQ_METRICS_ADDR` is set (the
//! reducer serves one by default).

use std::net::SocketAddr;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// Bucket bounds of every `_seconds` histogram, the same in every process so histograms
/// aggregate across replicas: 100 µs to 30 min, about 2.5× apart for operations, and at most
/// 1.5× apart from 10 s to 2 min, where fragments end (batchq sizes them to about half their
/// lifespan, 30 s at the default 60 s): a fragment-duration quantile reads within a bucket of
/// that, not between 10 s and 10 min as before.
pub const SECONDS_BUCKETS: [f64; 25] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 600.0, 1800.0,
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

#[cfg(test)]
mod tests {
    use super::SECONDS_BUCKETS;

    #[test]
    fn buckets_rise_and_are_fine_where_fragments_end() {
        for pair in SECONDS_BUCKETS.windows(2) {
            let ratio = pair[1] / pair[0];
            assert!(ratio > 1.0, "{pair:?} must rise");
            if pair[0] >= 10.0 && pair[1] <= 120.0 {
                assert!(ratio <= 1.5, "{pair:?}: too coarse where fragments end");
            }
        }
        // The longest lifespan a JobSpec may ask for (a third of RabbitMQ's default 30 min
        // consumer timeout) falls inside the buckets, not in +Inf.
        assert!(SECONDS_BUCKETS.contains(&600.0));
        assert!(SECONDS_BUCKETS[SECONDS_BUCKETS.len() - 1] > 600.0);
    }
}
