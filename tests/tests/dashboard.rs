//! The Grafana dashboard (`docs/grafana/batchq.json`) is valid and only asks for series the
//! reducer serves: a renamed metric breaks this test, not an operator's dashboard.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `batchq_…` name the reducer's monitor module records or describes.
fn served_metrics() -> Result<BTreeSet<String>> {
    let source = std::fs::read_to_string(repo().join("reducer/src/monitor.rs"))?;
    let mut names = BTreeSet::new();
    for piece in source.split('"').skip(1).step_by(2) {
        if piece.starts_with("batchq_")
            && piece.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            names.insert(piece.to_owned());
        }
    }
    ensure!(names.len() >= 10, "too few metric names found: {names:?}");
    Ok(names)
}

/// The `batchq_…` identifiers an expression uses.
fn metrics_in(expr: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("batchq_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        found.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    found
}

#[test]
fn dashboard_panels_query_series_the_reducer_serves() -> Result<()> {
    let path = repo().join("docs/grafana/batchq.json");
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let dashboard: Value = serde_json::from_str(&text)?;
    let served = served_metrics()?;
    let panels = dashboard["panels"].as_array().context("panels")?;
    ensure!(panels.len() >= 8, "a dashboard of {} panels", panels.len());
    let mut ids = BTreeSet::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or_default();
        ensure!(
            ids.insert(panel["id"].as_u64().context("panel id")?),
            "duplicate id in {title}"
        );
        ensure!(
            panel["gridPos"]["w"].as_u64().is_some(),
            "{title}: no gridPos"
        );
        let targets = panel["targets"].as_array().context("targets")?;
        ensure!(!targets.is_empty(), "{title}: no query");
        for target in targets {
            let expr = target["expr"].as_str().context("expr")?;
            for metric in metrics_in(expr) {
                // batchq_user_… is a prefix the operations' own metrics share.
                if metric == "batchq_user_" {
                    continue;
                }
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| metric.strip_suffix(suffix))
                    .filter(|base| served.contains(*base))
                    .unwrap_or(&metric);
                ensure!(
                    served.contains(base),
                    "{title}: {metric} is not a series the reducer serves ({served:?})"
                );
            }
        }
    }
    // What the monitoring issue asks the dashboard to show.
    for wanted in [
        "batchq_jobs",
        "batchq_operations_total",
        "batchq_operation_duration_seconds_bucket",
        "batchq_queue_messages_ready",
        "batchq_workers_live",
    ] {
        ensure!(
            text.contains(wanted),
            "the dashboard does not show {wanted}"
        );
    }
    Ok(())
}

#[test]
fn metric_names_are_found_in_expressions() {
    assert_eq!(
        metrics_in(
            "sum by (le) (rate(batchq_operation_duration_seconds_bucket[5m])) / batchq_jobs"
        ),
        vec!["batchq_operation_duration_seconds_bucket", "batchq_jobs"]
    );
}
