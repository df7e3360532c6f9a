//! The Grafana dashboard (`docs/grafana/batchq.json`) is valid and only asks for series the
//! reducer serves: a renamed metric or a typo breaks this test, not an operator's dashboard.
//! No broker needed.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

/// Grafana's grid is 24 columns wide.
const GRID_COLUMNS: u64 = 24;

/// Suffixes Prometheus adds to a histogram's name in the exposition.
const HISTOGRAM_SUFFIXES: [&str; 3] = ["_bucket", "_sum", "_count"];

/// The macros of the `metrics` crate whose first argument names a series.
const NAMING_MACROS: [&str; 6] = [
    "describe_counter!(",
    "describe_gauge!(",
    "describe_histogram!(",
    "counter!(",
    "gauge!(",
    "histogram!(",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// What the reducer serves, read from its source.
#[derive(Debug, Default)]
struct Served {
    /// Names given literally to a naming macro.
    names: BTreeSet<String>,
    /// Those of them that are histograms, exposed as `_bucket`, `_sum` and `_count`.
    histograms: BTreeSet<String>,
    /// Fixed beginnings of names built at run time (`format!("batchq_user_{}_total", …)`),
    /// which the operations' own metrics share.
    prefixes: BTreeSet<String>,
}

impl Served {
    fn from_source(source: &str) -> Self {
        let mut served = Served::default();
        for naming in NAMING_MACROS {
            for (at, _) in source.match_indices(naming) {
                // `counter!(` also matches inside `describe_counter!(`: harmless, same name.
                if let Some(name) = leading_string_literal(&source[at + naming.len()..])
                    .filter(|name| name.starts_with("batchq_"))
                {
                    served.names.insert(name.to_owned());
                    if naming.ends_with("histogram!(") {
                        served.histograms.insert(name.to_owned());
                    }
                }
            }
        }
        for (at, _) in source.match_indices("format!(") {
            if let Some(template) = leading_string_literal(&source[at + "format!(".len()..])
                && template.starts_with("batchq_")
                && let Some(brace) = template.find('{')
            {
                served.prefixes.insert(template[..brace].to_owned());
            }
        }
        served
    }

    /// Whether `metric`, as an expression names it, is a series the reducer serves. A bare
    /// prefix (`batchq_user_` from `{__name__=~"batchq_user_.+_total"}`) stands for the names
    /// built from it.
    fn serves(&self, metric: &str) -> bool {
        if self.names.contains(metric) || self.prefixes.contains(metric) {
            return true;
        }
        HISTOGRAM_SUFFIXES.iter().any(|suffix| {
            metric
                .strip_suffix(suffix)
                .is_some_and(|base| self.histograms.contains(base))
        })
    }
}

/// The string literal a macro call starts with, if it starts with one.
fn leading_string_literal(call: &str) -> Option<&str> {
    let rest = call.trim_start().strip_prefix('"')?;
    let end = rest.find('"')?;
    Some(&rest[..end])
}

fn served_metrics() -> Result<Served> {
    let path = repo().join("reducer/src/monitor.rs");
    let source =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let served = Served::from_source(&source);
    ensure!(
        served.names.len() >= 10,
        "too few metric names found in {}: {:?}",
        path.display(),
        served.names
    );
    Ok(served)
}

/// The `batchq_…` identifiers a PromQL expression uses as metric names: outside quotes, or
/// inside the value of a `__name__` matcher. Label values (`queue="batchq.dead"`) are not
/// metric names and are skipped.
fn metrics_in(expr: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut scan = |text: &str| {
        let mut from = 0;
        while let Some(at) = text[from..].find("batchq_").map(|i| from + i) {
            let tail = &text[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(tail.len());
            let starts_a_word = !text[..at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
            if starts_a_word {
                found.push(tail[..end].to_owned());
            }
            from = at + end;
        }
    };
    let mut rest = expr;
    while let Some(open) = rest.find(['"', '\'', '`']) {
        let (outside, quoted) = rest.split_at(open);
        scan(outside);
        let quote = quoted.chars().next().unwrap_or('"');
        let body = &quoted[1..];
        let close = body.find(quote).unwrap_or(body.len());
        let matcher = outside.trim_end_matches(['=', '~', ' ']).trim_end();
        if matcher.ends_with("__name__") {
            scan(&body[..close]);
        }
        rest = body.get(close + 1..).unwrap_or("");
    }
    scan(rest);
    found
}

/// Every panel of the dashboard, those inside collapsed rows too.
fn all_panels(dashboard: &Value) -> Result<Vec<&Value>> {
    let mut panels = Vec::new();
    for panel in dashboard["panels"].as_array().context("no panels")? {
        panels.push(panel);
        if let Some(nested) = panel["panels"].as_array() {
            panels.extend(nested);
        }
    }
    Ok(panels)
}

/// The datasource variables (type `datasource`) and import inputs the dashboard declares, as
/// panels refer to them (`${name}`).
fn declared_datasources(dashboard: &Value) -> BTreeSet<String> {
    let variables = dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["type"] == "datasource" && v["query"] == "prometheus");
    let inputs = dashboard["__inputs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["type"] == "datasource" && i["pluginId"] == "prometheus");
    variables
        .chain(inputs)
        .filter_map(|v| v["name"].as_str())
        .map(|name| format!("${{{name}}}"))
        .collect()
}

/// Checks a dashboard against what the reducer serves; the error names the panel at fault.
fn check(dashboard: &Value, served: &Served) -> Result<()> {
    ensure!(
        dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion {} is older than Grafana 9",
        dashboard["schemaVersion"]
    );
    let datasources = declared_datasources(dashboard);
    ensure!(
        !datasources.is_empty(),
        "no Prometheus datasource variable or input: the dashboard would only work where a \
         datasource happens to have the uid it names"
    );
    let uses_declared = |what: &str, datasource: &Value| -> Result<()> {
        let uid = datasource["uid"].as_str().unwrap_or_default();
        ensure!(
            datasources.contains(uid),
            "{what}: datasource {datasource} is not one of {datasources:?}"
        );
        Ok(())
    };

    let panels = all_panels(dashboard)?;
    let mut ids = BTreeSet::new();
    let mut cells: BTreeSet<(u64, u64)> = BTreeSet::new();
    let mut queries = 0;
    for panel in &panels {
        let id = panel["id"]
            .as_u64()
            .context("a panel without a numeric id")?;
        let title = format!(
            "panel {id} {:?}",
            panel["title"].as_str().unwrap_or_default()
        );
        ensure!(ids.insert(id), "{title}: duplicate id");

        let grid = &panel["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| grid[k].as_u64());
        let (Some(x), Some(y), Some(w), Some(h)) = (x, y, w, h) else {
            bail!("{title}: gridPos {grid} lacks x, y, w or h");
        };
        ensure!(w > 0 && h > 0, "{title}: empty gridPos {grid}");
        ensure!(
            x + w <= GRID_COLUMNS,
            "{title}: gridPos {grid} is wider than the grid"
        );
        for column in x..x + w {
            for row in y..y + h {
                ensure!(
                    cells.insert((column, row)),
                    "{title}: gridPos {grid} overlaps another panel"
                );
            }
        }

        if panel["type"] == "row" {
            ensure!(
                panel.get("targets").is_none(),
                "{title}: a row holds no queries"
            );
            continue;
        }
        uses_declared(&title, &panel["datasource"])?;
        let targets = panel["targets"]
            .as_array()
            .with_context(|| format!("{title}: no targets"))?;
        ensure!(!targets.is_empty(), "{title}: no query");
        for target in targets {
            let ref_id = target["refId"].as_str().unwrap_or("?");
            let expr = target["expr"]
                .as_str()
                .with_context(|| format!("{title} {ref_id}: no expr"))?;
            if target.get("datasource").is_some() {
                uses_declared(&format!("{title} {ref_id}"), &target["datasource"])?;
            }
            let metrics = metrics_in(expr);
            ensure!(
                !metrics.is_empty(),
                "{title} {ref_id}: {expr:?} queries no batchq series"
            );
            for metric in metrics {
                ensure!(
                    served.serves(&metric),
                    "{title} {ref_id}: {metric} is not a series the reducer serves \
                     (it serves {:?}, and names beginning {:?})",
                    served.names,
                    served.prefixes
                );
            }
            queries += 1;
        }
    }
    ensure!(queries > 0, "a dashboard without queries");
    Ok(())
}

fn dashboard() -> Result<Value> {
    let path = repo().join("docs/grafana/batchq.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

/// Every `expr` of the dashboard, for the checks of what it shows.
fn exprs(dashboard: &Value) -> Result<Vec<String>> {
    Ok(all_panels(dashboard)?
        .into_iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect())
}

#[test]
fn dashboard_panels_query_series_the_reducer_serves() -> Result<()> {
    check(&dashboard()?, &served_metrics()?)
}

#[test]
fn dashboard_shows_what_the_monitoring_issue_asks_for() -> Result<()> {
    let exprs = exprs(&dashboard()?)?;
    let shows = |wanted: &str| exprs.iter().any(|e| e.contains(wanted));
    for wanted in [
        "batchq_jobs",
        "rate(batchq_operations_total[1m])",
        "sum by (outcome) (rate(batchq_operations_total[1m]))",
        "sum by (operation) (rate(batchq_operations_total[1m]))",
        "histogram_quantile(0.5, sum by (le, operation) (rate(batchq_operation_duration_seconds_bucket",
        "histogram_quantile(0.9, sum by (le, operation) (rate(batchq_operation_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (le, operation) (rate(batchq_operation_duration_seconds_bucket",
        "histogram_quantile(0.9, sum by (le, operation) (rate(batchq_fragment_duration_seconds_bucket",
        "batchq_queue_messages_ready",
        "batchq_queue_messages_unacked",
        "batchq_queue_consumers",
        "batchq_workers_live",
        "batchq_job_operations{outcome=\"total\"}",
    ] {
        ensure!(shows(wanted), "no panel queries {wanted}");
    }
    // One dashboard for any namespace: the queue names carry it, so no query pins one.
    for expr in &exprs {
        ensure!(
            !expr.contains("queue=\"batchq.") && !expr.contains("namespace"),
            "{expr:?} is tied to one namespace"
        );
    }
    Ok(())
}

#[test]
fn a_typo_in_a_metric_name_is_caught() -> Result<()> {
    let served = served_metrics()?;
    let good = dashboard()?;
    // The typo goes into the first query that names the series, as an editor would make it.
    let with_typo = |of: &str, typo: &str| -> Result<Value> {
        let mut bad = good.clone();
        let panels = bad["panels"].as_array_mut().context("panels")?;
        for panel in panels {
            // `get_mut`, not indexing: indexing would give a row a `targets: null`.
            let targets = panel.get_mut("targets").and_then(Value::as_array_mut);
            for target in targets.into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str().filter(|e| e.contains(of)) {
                    target["expr"] = Value::from(expr.replacen(of, typo, 1));
                    return Ok(bad);
                }
            }
        }
        bail!("no query names {of}")
    };
    for (typo, of) in [
        ("batchq_worker_live", "batchq_workers_live"),
        (
            "batchq_operations_total_bucket",
            "batchq_operation_duration_seconds_bucket",
        ),
        ("batchq_job_operation{", "batchq_job_operations{"),
        ("batchq_usr_", "batchq_user_"),
    ] {
        let bad = with_typo(of, typo)?;
        let error = match check(&bad, &served) {
            Ok(()) => bail!("a dashboard querying {typo} instead of {of} passed the check"),
            Err(e) => e.to_string(),
        };
        let named = format!("{} is not a series", typo.trim_end_matches('{'));
        ensure!(error.contains(&named), "the error names the typo: {error}");
    }
    Ok(())
}

#[test]
fn overlapping_panels_and_duplicate_ids_are_caught() -> Result<()> {
    let served = served_metrics()?;
    let mut dashboard = dashboard()?;
    let panels = dashboard["panels"].as_array_mut().context("panels")?;
    let last = panels.last().context("a panel")?.clone();
    let mut twin = last.clone();
    twin["id"] = Value::from(9_999);
    panels.push(twin);
    let overlap = check(&dashboard, &served)
        .err()
        .context("an overlap passed")?;
    ensure!(overlap.to_string().contains("overlaps"), "{overlap}");

    let panels = dashboard["panels"].as_array_mut().context("panels")?;
    let twin = panels.last_mut().context("a panel")?;
    twin["gridPos"]["y"] = Value::from(1_000);
    twin["id"] = last["id"].clone();
    let duplicate = check(&dashboard, &served)
        .err()
        .context("a duplicate id passed")?;
    ensure!(
        duplicate.to_string().contains("duplicate id"),
        "{duplicate}"
    );
    Ok(())
}

#[test]
fn served_names_come_from_the_naming_macros() {
    let source = r#"
        describe_counter!("batchq_a_total", "help");
        describe_histogram!(
            "batchq_b_seconds",
            Unit::Seconds,
            "help"
        );
        metrics::gauge!("batchq_c", "queue" => queue.clone()).set(1.0);
        let name = format!("batchq_user_{}_total", metric_name(name));
        metrics::counter!(name, "operation" => op.clone()).increment(1);
        let unrelated = "batchq_not_a_metric";
    "#;
    let served = Served::from_source(source);
    assert_eq!(
        served.names,
        BTreeSet::from(["batchq_a_total", "batchq_b_seconds", "batchq_c"].map(String::from))
    );
    assert_eq!(served.prefixes, BTreeSet::from(["batchq_user_".to_owned()]));
    assert!(served.serves("batchq_b_seconds_bucket"));
    assert!(served.serves("batchq_b_seconds_count"));
    assert!(!served.serves("batchq_c_bucket"), "a gauge has no buckets");
    assert!(!served.serves("batchq_not_a_metric"));
}

#[test]
fn metric_names_are_found_in_expressions() {
    assert_eq!(
        metrics_in(
            "sum by (le) (rate(batchq_operation_duration_seconds_bucket[5m])) / batchq_jobs"
        ),
        vec!["batchq_operation_duration_seconds_bucket", "batchq_jobs"]
    );
    // Label values are not metric names; a `__name__` matcher's value is.
    assert_eq!(
        metrics_in(r#"batchq_queue_messages_ready{queue="batchq_x.dead", job='batchq_y'}"#),
        vec!["batchq_queue_messages_ready"]
    );
    assert_eq!(
        metrics_in(r#"rate({__name__=~"batchq_user_.+_total", operation="batchq_z"}[1m])"#),
        vec!["batchq_user_"]
    );
    // Part of a longer identifier is not a batchq name.
    assert_eq!(
        metrics_in("not_batchq_jobs + xbatchq_jobs"),
        Vec::<String>::new()
    );
}
