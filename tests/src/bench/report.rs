//! The figures of one run: the table printed at the end and the same figures as JSON.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::procfs::CpuUsage;

/// What a figure is held against: its measured limit (a ceiling, an ideal) or the issue's
/// absolute target.
#[derive(Debug, Clone, Serialize)]
pub struct Limit {
    pub value: f64,
    /// `broker ceiling`, `compute ceiling`, `ideal`, `target`.
    pub source: String,
    /// The limit's own unit (`msg/s` for the broker ceiling of a `fragments/s` figure).
    pub unit: String,
}

/// The target for a figure (for reference: nothing is asserted on it).
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Target {
    /// The ratio to the limit at least this.
    RatioAtLeast(f64),
    /// The value at least this.
    AtLeast(f64),
    /// The value at most this.
    AtMost(f64),
    /// A reference figure, not a goal.
    None,
}

#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub part: String,
    pub name: String,
    pub value: f64,
    pub unit: String,
    pub limit: Option<Limit>,
    /// `value / limit`.
    pub ratio: Option<f64>,
    pub target: Target,
    /// Whether the target is met (`None`: no target, or no limit to compare with).
    pub met: Option<bool>,
}

impl Figure {
    pub fn new(part: &str, name: impl Into<String>, value: f64, unit: &str) -> Self {
        Self {
            part: part.to_owned(),
            name: name.into(),
            value,
            unit: unit.to_owned(),
            limit: None,
            ratio: None,
            target: Target::None,
            met: None,
        }
    }

    /// Held against a measured limit of the figure's unit, with a target on the ratio.
    pub fn against(self, limit: Option<f64>, source: &str, target: Target) -> Self {
        let unit = self.unit.clone();
        self.against_in(limit, &unit, source, target)
    }

    /// Held against a measured limit of another unit (messages for fragments).
    pub fn against_in(
        mut self,
        limit: Option<f64>,
        unit: &str,
        source: &str,
        target: Target,
    ) -> Self {
        self.target = target;
        if let Some(limit) = limit.filter(|l| *l > 0.0) {
            self.limit = Some(Limit {
                value: limit,
                source: source.to_owned(),
                unit: unit.to_owned(),
            });
            self.ratio = Some(self.value / limit);
        }
        self.met = match (target, self.ratio) {
            (Target::RatioAtLeast(min), Some(ratio)) => Some(ratio >= min),
            (Target::AtLeast(min), _) => Some(self.value >= min),
            (Target::AtMost(max), _) => Some(self.value <= max),
            _ => None,
        };
        self
    }

    /// Held against an absolute target, which is also its limit.
    pub fn target(self, target: Target) -> Self {
        let limit = match target {
            Target::AtLeast(v) | Target::AtMost(v) => Some(v),
            _ => None,
        };
        self.against(limit, "target", target)
    }
}

/// CPU use of the processes while one measured job ran.
#[derive(Debug, Clone, Serialize)]
pub struct CpuRow {
    pub part: String,
    pub job: String,
    pub usage: CpuUsage,
}

/// The settings of one part, as printed.
#[derive(Debug, Clone, Serialize)]
pub struct PartInfo {
    pub part: String,
    pub settings: String,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    pub profile: String,
    pub broker_pid: Option<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub mode: String,
    pub started_at: String,
    pub machine: Machine,
    pub parts: Vec<PartInfo>,
    pub figures: Vec<Figure>,
    pub cpu: Vec<CpuRow>,
    pub seconds: f64,
}

impl Report {
    pub fn write_json(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
    }

    /// The figures as an aligned text table.
    pub fn table(&self) -> String {
        let mut rows = vec![[
            "figure".to_owned(),
            "value".to_owned(),
            "limit".to_owned(),
            "ratio".to_owned(),
            "target".to_owned(),
            "met".to_owned(),
        ]];
        for f in &self.figures {
            rows.push([
                f.name.clone(),
                format!("{} {}", number(f.value), f.unit),
                f.limit.as_ref().map_or("—".to_owned(), |l| {
                    format!("{} {} ({})", number(l.value), l.unit, l.source)
                }),
                f.ratio.map_or("—".to_owned(), |r| format!("{r:.2}")),
                target_text(f.target, &f.unit),
                match f.met {
                    Some(true) => "yes".to_owned(),
                    Some(false) => "NO".to_owned(),
                    None => "".to_owned(),
                },
            ]);
        }
        align(&rows)
    }

    /// CPU use per measured job, in percent of one core (`postgres`: the server processes of
    /// a PostgreSQL deployment's connections).
    pub fn cpu_table(&self) -> String {
        let mut rows = vec![[
            "job".to_owned(),
            "secs".to_owned(),
            "splitter".to_owned(),
            "reducer".to_owned(),
            "workers".to_owned(),
            "broker".to_owned(),
            "postgres".to_owned(),
            "bench".to_owned(),
            "machine".to_owned(),
        ]];
        let percent = |v: Option<f64>| v.map_or("—".to_owned(), |c| format!("{:.0}%", c * 100.0));
        for row in &self.cpu {
            let u = &row.usage;
            rows.push([
                format!("{}: {}", row.part, row.job),
                format!("{:.1}", u.seconds),
                percent(u.cores_of("splitter")),
                percent(u.cores_of("reducer")),
                percent(u.cores_of("worker")),
                percent(u.cores_of("broker")),
                percent(u.cores_of("postgres")),
                percent(u.cores_of("bench")),
                percent(u.machine_cores),
            ]);
        }
        align(&rows)
    }
}

fn target_text(target: Target, unit: &str) -> String {
    match target {
        Target::RatioAtLeast(min) => format!("ratio ≥ {min}"),
        Target::AtLeast(min) => format!("≥ {} {unit}", number(min)),
        Target::AtMost(max) => format!("≤ {} {unit}", number(max)),
        Target::None => "—".to_owned(),
    }
}

/// Large figures as integers with thousands separators, small ones with three significant
/// digits.
pub fn number(value: f64) -> String {
    if !value.is_finite() {
        return format!("{value}");
    }
    if value.abs() >= 100.0 {
        let digits = format!("{:.0}", value.abs());
        let mut grouped = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                grouped.push(',');
            }
            grouped.push(c);
        }
        if value < 0.0 {
            grouped.insert(0, '-');
        }
        grouped
    } else if value.abs() >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

fn align<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        let mut line = String::new();
        for (w, cell) in widths.iter().zip(row) {
            let pad = w - cell.chars().count();
            let _ = write!(line, "{cell}{}  ", " ".repeat(pad));
        }
        out.push_str(line.trim_end());
        out.push('\n');
        if i == 0 {
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            out.push_str(&rule.join("  "));
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(number(1_234_567.4), "1,234,567");
        assert_eq!(number(100.0), "100");
        assert_eq!(number(12.345), "12.3");
        assert_eq!(number(0.456), "0.46");
    }

    #[test]
    fn targets_are_judged_on_the_right_figure() {
        let f = Figure::new("p", "x", 300.0, "ops/s").against(
            Some(1000.0),
            "ceiling",
            Target::RatioAtLeast(0.6),
        );
        assert_eq!(f.met, Some(false));
        let m = Figure::new("p", "rss", 12.0, "MiB").target(Target::AtMost(20.0));
        assert_eq!((m.met, m.ratio), (Some(true), Some(0.6)));
    }
}
