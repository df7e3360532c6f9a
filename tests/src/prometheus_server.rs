//! A real Prometheus for the tests: the `prometheus` program (Debian's package; `.ci/run`
//! installs it) on a free port, with a configuration and a storage folder of its own, so it
//! never depends on nor disturbs a system service on :9090. Queried through its HTTP API;
//! killed when dropped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::prometheus::free_port;

/// Set (to anything but `0`), a missing `prometheus` program fails the tests that need it
/// instead of skipping them. `.ci/run` sets it.
pub const REQUIRE_VAR: &str = "BATCHQ_TEST_REQUIRE_PROMETHEUS";

/// How long Prometheus may take to load its configuration and open its storage.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one HTTP request to Prometheus may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The `prometheus` program on `PATH`. `None`, after a line on stderr naming `test`, when it
/// is missing and [`REQUIRE_VAR`] is unset; an error when it is missing and the run requires
/// it, so CI never skips the test.
pub fn find_prometheus(test: &str) -> Result<Option<PathBuf>> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("prometheus"))
            .find(|candidate| candidate.is_file())
    });
    if found.is_some() {
        return Ok(found);
    }
    let required = std::env::var(REQUIRE_VAR).is_ok_and(|v| !v.trim().is_empty() && v != "0");
    if required {
        bail!("the prometheus program is not on PATH, and {REQUIRE_VAR} is set");
    }
    eprintln!(
        "SKIPPED: test {test}: the prometheus program is not on PATH (Debian: apt-get install \
         prometheus; .ci/run installs it). {REQUIRE_VAR}=1 fails instead."
    );
    Ok(None)
}

/// One series of a query's answer: its labels, and its value (instant query) or values
/// (range query) in time order.
#[derive(Debug, Clone)]
pub struct Series {
    pub labels: BTreeMap<String, String>,
    pub values: Vec<f64>,
}

/// A Prometheus process of the test's own.
pub struct PrometheusServer {
    child: Child,
    port: u16,
    log: PathBuf,
    /// Configuration, storage and log; deleted after the process is killed.
    _dir: tempfile::TempDir,
}

impl PrometheusServer {
    /// Starts `program` with `config` (a `prometheus.yml`) on a free port of 127.0.0.1 and
    /// waits until it is ready to answer queries.
    pub async fn start(program: &Path, config: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("batchq-prometheus-")
            .tempdir()?;
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let log = dir.path().join("prometheus.log");
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let port = free_port()?;
        let child = Command::new(program)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let mut server = Self {
            child,
            port,
            log,
            _dir: dir,
        };
        server.wait_ready().await?;
        Ok(server)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "prometheus exited ({status}) before it was ready; its log:\n{}",
                    self.log_tail()
                );
            }
            if let Ok((200, _)) = self.get("/-/ready").await {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "prometheus not ready on port {} after {READY_TIMEOUT:?}; its log:\n{}",
                self.port,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The last lines of Prometheus's own log, for a failure message.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// `expr` evaluated now (`/api/v1/query`). An error carries what Prometheus said.
    pub async fn query(&self, expr: &str) -> Result<Vec<Series>> {
        self.api(&format!("/api/v1/query?query={}", url_encode(expr)))
            .await
    }

    /// `expr` evaluated every `step` seconds from `start` to `end` (Unix seconds), as Grafana
    /// asks for a time series panel (`/api/v1/query_range`).
    pub async fn query_range(
        &self,
        expr: &str,
        start: f64,
        end: f64,
        step: f64,
    ) -> Result<Vec<Series>> {
        self.api(&format!(
            "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step={step}",
            url_encode(expr)
        ))
        .await
    }

    async fn api(&self, path: &str) -> Result<Vec<Series>> {
        let (code, body) = self.get(path).await?;
        let answer: Value = serde_json::from_str(&body)
            .with_context(|| format!("HTTP {code}, not JSON: {body}"))?;
        ensure!(
            answer["status"] == "success",
            "Prometheus answered {} ({}): {}",
            answer["status"],
            answer["errorType"],
            answer["error"]
        );
        let result = answer["data"]["result"]
            .as_array()
            .with_context(|| format!("no result in {body}"))?;
        result.iter().map(series).collect()
    }

    /// A plain HTTP/1.0 GET on 127.0.0.1: status code and body.
    async fn get(&self, path: &str) -> Result<(u16, String)> {
        let request = async {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await?;
            stream
                .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
                .await?;
            let mut response = String::new();
            stream.read_to_string(&mut response).await?;
            anyhow::Ok(response)
        };
        let response = tokio::time::timeout(REQUEST_TIMEOUT, request)
            .await
            .with_context(|| format!("GET {path}: no answer within {REQUEST_TIMEOUT:?}"))??;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .context("no HTTP header end")?;
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .with_context(|| format!("no status code in {head:?}"))?;
        Ok((code, body.to_owned()))
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One element of a vector (`value`) or matrix (`values`) result.
fn series(element: &Value) -> Result<Series> {
    let labels = element["metric"]
        .as_object()
        .with_context(|| format!("no labels in {element}"))?
        .iter()
        .map(|(name, value)| (name.clone(), value.as_str().unwrap_or_default().to_owned()))
        .collect();
    let samples = match element.get("values") {
        Some(values) => values.as_array().cloned().unwrap_or_default(),
        None => vec![element["value"].clone()],
    };
    // A sample is `[unix_seconds, "value"]`; the value is a string ("NaN" and "+Inf" too).
    let values = samples
        .iter()
        .map(|sample| {
            sample[1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("bad sample {sample} in {element}"))
        })
        .collect::<Result<_>>()?;
    Ok(Series { labels, values })
}

/// `text` percent-encoded for a query string: everything but RFC 3986's unreserved characters.
fn url_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_percent_encoded() {
        assert_eq!(
            url_encode(r#"sum by (job_id) (x{a="b"}[1m]) > 0"#),
            "sum%20by%20%28job_id%29%20%28x%7Ba%3D%22b%22%7D%5B1m%5D%29%20%3E%200"
        );
        assert_eq!(url_encode("é+"), "%C3%A9%2B");
    }

    #[test]
    fn vectors_and_matrices_are_read() -> Result<()> {
        let vector = serde_json::json!({"metric": {"job_id": "a"}, "value": [1.5, "2"]});
        let read = series(&vector)?;
        assert_eq!(read.labels["job_id"], "a");
        assert_eq!(read.values, vec![2.0]);
        let matrix = serde_json::json!({"metric": {}, "values": [[1, "1"], [2, "NaN"]]});
        let read = series(&matrix)?;
        assert_eq!(read.values.len(), 2);
        assert!(read.values[1].is_nan());
        Ok(())
    }
}
