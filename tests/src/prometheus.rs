//! Reading a process's Prometheus endpoint the way Prometheus does.

use std::collections::HashMap;

use anyhow::{Context, Result, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use crate::ports::free_port;

/// `GET /metrics`, parsed as the Prometheus text exposition: series (name with its labels, as
/// written) → value. Fails on a line that is not a comment or `series value`.
pub async fn scrape(port: u16) -> Result<HashMap<String, f64>> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("no HTTP header end")?;
    ensure!(head.starts_with("HTTP/1."), "not HTTP: {head}");
    ensure!(head.contains(" 200 "), "not 200: {head}");
    let mut series = HashMap::new();
    for line in body.lines().filter(|l| !l.is_empty()) {
        if let Some(comment) = line.strip_prefix('#') {
            ensure!(
                comment.starts_with(" HELP ") || comment.starts_with(" TYPE "),
                "bad comment {line:?}"
            );
            continue;
        }
        let (name, value) = line.rsplit_once(' ').context("no value")?;
        let value: f64 = value
            .parse()
            .with_context(|| format!("bad value in {line:?}"))?;
        let metric = name.split('{').next().unwrap_or_default();
        ensure!(
            !metric.is_empty()
                && metric
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        if name.contains('{') {
            ensure!(name.ends_with('}'), "unterminated labels in {line:?}");
        }
        series.insert(name.to_owned(), value);
    }
    Ok(series)
}
