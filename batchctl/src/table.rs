//! Aligned text tables and summaries for people; `--json` prints the records instead.

use common::contract::JobStatus;
use common::health::HealthReport;
use common::wire::WorkerInfo;
use serde::Serialize;

/// One row of `batchctl queues`.
#[derive(Debug, Serialize)]
pub struct QueueRow {
    pub queue: String,
    pub ready: u64,
    /// Known for work queues (from worker heartbeats); `None` elsewhere.
    pub unacknowledged: Option<u64>,
    pub consumers: u64,
}

/// How a column lines up its cells: names to the left, figures to the right so their digits
/// line up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Align {
    Left,
    Right,
}

/// Columns separated by two spaces, each as wide as its widest cell (counted in characters,
/// so a host name with accents does not shift the columns after it). Trailing spaces are cut.
pub(crate) fn render(header: &[(&str, Align)], rows: &[Vec<String>]) -> String {
    let width = |cell: &str| cell.chars().count();
    let mut widths: Vec<usize> = header.iter().map(|(h, _)| width(h)).collect();
    for row in rows {
        debug_assert_eq!(row.len(), header.len(), "a row of {row:?}");
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(width(cell));
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .zip(header)
            .map(|((cell, &w), (_, align))| match align {
                Align::Left => format!("{cell:<w$}"),
                Align::Right => format!("{cell:>w$}"),
            })
            .collect();
        out.push_str(padded.join("  ").trim_end());
        out.push('\n');
    };
    line(&header.iter().map(|(h, _)| *h).collect::<Vec<_>>());
    for row in rows {
        line(&row.iter().map(String::as_str).collect::<Vec<_>>());
    }
    out
}

pub fn percent(status: &JobStatus) -> String {
    if status.ops_total == 0 {
        return "100%".into();
    }
    let done = status.ops_succeeded + status.ops_failed;
    format!("{:.1}%", done as f64 * 100.0 / status.ops_total as f64)
}

pub fn status_text(s: &JobStatus) -> String {
    let mut out = format!(
        "job        {}\nstate      {}\noperation  {}\nprogress   {}/{} ({}), {} failed\nfragments  {} done, {} in flight\nsubmitted  {}\nstarted    {}\nfinished   {}\n",
        s.job_id,
        s.state,
        s.operation.as_deref().unwrap_or("-"),
        s.ops_succeeded + s.ops_failed,
        s.ops_total,
        percent(s),
        s.ops_failed,
        s.fragments_done,
        s.fragments_in_flight,
        s.submitted_at.as_deref().unwrap_or("-"),
        s.started_at.as_deref().unwrap_or("-"),
        s.finished_at.as_deref().unwrap_or("-"),
    );
    if s.redrives > 0 {
        out.push_str(&format!("redrives   {}\n", s.redrives));
    }
    if let Some(error) = &s.error {
        out.push_str(&format!("error      {error}\n"));
    }
    out
}

pub fn jobs(jobs: &[JobStatus]) -> String {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.job_id.clone(),
                j.state.to_string(),
                j.operation.clone().unwrap_or_default(),
                format!("{}/{}", j.ops_succeeded + j.ops_failed, j.ops_total),
                percent(j),
                j.ops_failed.to_string(),
                j.submitted_at.clone().unwrap_or_default(),
            ]
        })
        .collect();
    render(
        &[
            ("JOB", Align::Left),
            ("STATE", Align::Left),
            ("OPERATION", Align::Left),
            ("DONE", Align::Right),
            ("PROGRESS", Align::Right),
            ("FAILED", Align::Right),
            ("SUBMITTED", Align::Left),
        ],
        &rows,
    )
}

pub fn queues(rows: &[QueueRow]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|q| {
            vec![
                q.queue.clone(),
                q.ready.to_string(),
                q.unacknowledged.map_or("-".into(), |n| n.to_string()),
                q.consumers.to_string(),
            ]
        })
        .collect();
    render(
        &[
            ("QUEUE", Align::Left),
            ("READY", Align::Right),
            ("UNACKED", Align::Right),
            ("CONSUMERS", Align::Right),
        ],
        &rows,
    )
}

pub fn workers(workers: &[WorkerInfo]) -> String {
    let rows: Vec<Vec<String>> = workers
        .iter()
        .map(|w| {
            vec![
                w.worker.clone(),
                w.host.clone(),
                w.operations.join(","),
                format!("{}/{}", w.fragments_in_flight, w.prefetch),
                w.last_heartbeat.clone(),
            ]
        })
        .collect();
    render(
        &[
            ("WORKER", Align::Left),
            ("HOST", Align::Left),
            ("OPERATIONS", Align::Left),
            ("IN FLIGHT", Align::Right),
            ("LAST HEARTBEAT", Align::Left),
        ],
        &rows,
    )
}

pub fn health(report: &HealthReport) -> String {
    let rows: Vec<Vec<String>> = report
        .services
        .iter()
        .map(|s| {
            let detail = match &s.store_fault {
                Some(f) => format!(
                    "{} since {} ({} attempts): {}",
                    f.cause,
                    common::timefmt::format_ms(f.since_ms),
                    f.attempts,
                    f.error
                ),
                None => String::new(),
            };
            vec![
                s.role.clone(),
                s.instance.clone().unwrap_or_else(|| "-".to_owned()),
                s.state.clone(),
                s.last_heartbeat.clone().unwrap_or_else(|| "-".to_owned()),
                detail,
            ]
        })
        .collect();
    let mut out = render(
        &[
            ("ROLE", Align::Left),
            ("INSTANCE", Align::Left),
            ("STATE", Align::Left),
            ("LAST HEARTBEAT", Align::Left),
            ("DETAIL", Align::Left),
        ],
        &rows,
    );
    out.push_str(&format!("live workers: {}\n", report.workers_live));
    out
}

/// `batchctl members`: one row per splitter or reducer replica.
pub fn members(members: &[common::health::ServiceHealth]) -> String {
    let rows: Vec<Vec<String>> = members
        .iter()
        .map(|m| {
            vec![
                m.role.clone(),
                m.instance.clone().unwrap_or_else(|| "-".to_owned()),
                m.host.clone().unwrap_or_else(|| "-".to_owned()),
                if m.active { "active" } else { "standby" }.to_owned(),
                m.state.clone(),
                m.last_heartbeat.clone().unwrap_or_else(|| "-".to_owned()),
            ]
        })
        .collect();
    render(
        &[
            ("ROLE", Align::Left),
            ("INSTANCE", Align::Left),
            ("HOST", Align::Left),
            ("ACTIVE", Align::Left),
            ("STATE", Align::Left),
            ("LAST HEARTBEAT", Align::Left),
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use common::contract::JobState;

    use super::*;

    /// The character column where each of `cells` starts in `line`, each looked for after the
    /// one before it.
    fn starts(line: &str, cells: &[&str]) -> Vec<usize> {
        let mut from = 0;
        cells
            .iter()
            .map(|cell| match line[from..].find(cell) {
                Some(at) => {
                    from += at + cell.len();
                    line[..from - cell.len()].chars().count()
                }
                None => usize::MAX,
            })
            .collect()
    }

    /// The character column where each whitespace-separated cell of `line` ends.
    fn ends(line: &str) -> Vec<usize> {
        let chars: Vec<char> = line.chars().collect();
        (0..chars.len())
            .filter(|&i| {
                !chars[i].is_whitespace() && chars.get(i + 1).is_none_or(|c| c.is_whitespace())
            })
            .map(|i| i + 1)
            .collect()
    }

    fn job(id: &str, state: JobState, done: u64, failed: u64, total: u64) -> JobStatus {
        JobStatus {
            job_id: id.into(),
            state,
            operation: Some("sha256".into()),
            ops_total: total,
            ops_succeeded: done - failed,
            ops_failed: failed,
            fragments_done: 0,
            fragments_in_flight: 0,
            submitted_at: Some("2026-11-26T17:00:00.123Z".into()),
            started_at: None,
            finished_at: None,
            error: None,
            redrives: 0,
        }
    }

    #[test]
    fn columns_align() {
        let text = render(
            &[("A", Align::Left), ("BB", Align::Right)],
            &[vec!["long".into(), "x".into()]],
        );
        assert_eq!(text, "A     BB\nlong   x\n");
    }

    #[test]
    fn queues_line_up_with_long_names_and_big_numbers() {
        let rows = [
            QueueRow {
                queue: "batchq.jobs".into(),
                ready: 0,
                unacknowledged: None,
                consumers: 1,
            },
            QueueRow {
                queue: "test-9f1c2b7e-5d3a.work.a-custom-operation-with-a-long-name".into(),
                ready: 12_345_678,
                unacknowledged: Some(64),
                consumers: 250,
            },
            QueueRow {
                queue: "batchq.work.noop".into(),
                ready: 7,
                unacknowledged: Some(0),
                consumers: 3,
            },
        ];
        let text = queues(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "QUEUE                                                           READY  UNACKED  CONSUMERS",
                "batchq.jobs                                                         0        -          1",
                "test-9f1c2b7e-5d3a.work.a-custom-operation-with-a-long-name  12345678       64        250",
                "batchq.work.noop                                                    7        0          3",
            ]
        );
        // Every line ends its figures in the same columns as the header's names.
        let figure_ends = |line: &str| ends(line)[1..].to_vec();
        for line in &lines[1..] {
            assert_eq!(figure_ends(line), figure_ends(lines[0]), "{line:?}");
        }
    }

    #[test]
    fn jobs_line_up_names_left_and_figures_right() {
        let jobs_text = jobs(&[
            job("a", JobState::Running, 5, 0, 10),
            job(
                "nightly-thumbnails-2026-11-26-with-a-long-suffix",
                JobState::Succeeded,
                1_000_000,
                1_234,
                1_000_000,
            ),
        ]);
        let lines: Vec<&str> = jobs_text.lines().collect();
        assert_eq!(lines.len(), 3, "{jobs_text}");
        let left = ["JOB", "STATE", "OPERATION", "SUBMITTED"];
        let header_starts = starts(lines[0], &left);
        let first_row_starts = starts(lines[1], &["a ", "running", "sha256", "2026-"]);
        assert_eq!(first_row_starts, header_starts, "{jobs_text}");
        let second = starts(lines[2], &["nightly", "succeeded", "sha256", "2026-"]);
        assert_eq!(second, header_starts, "{jobs_text}");
        // DONE, PROGRESS and FAILED end where their header names end.
        let figure_ends = |line: &str| ends(line)[3..6].to_vec();
        assert_eq!(figure_ends(lines[1]), figure_ends(lines[0]), "{jobs_text}");
        assert_eq!(figure_ends(lines[2]), figure_ends(lines[0]), "{jobs_text}");
        assert!(
            lines[2].contains("1000000/1000000    100.0%    1234"),
            "{jobs_text}"
        );
    }

    #[test]
    fn workers_line_up_with_wide_characters_counted_once() {
        let worker = |id: &str, host: &str, in_flight: u64| WorkerInfo {
            worker: id.into(),
            host: host.into(),
            pid: 1,
            operations: vec!["noop".into(), "sha256".into()],
            prefetch: 4,
            fragments_in_flight: in_flight,
            held_by_operation: Default::default(),
            started_at: "2026-11-26T17:00:00.000Z".into(),
            last_heartbeat: "2026-11-26T17:00:05.000Z".into(),
        };
        let text = workers(&[
            worker("w-1", "hôte-été", 4),
            worker("worker-0123456789abcdef", "h", 12),
        ]);
        let lines: Vec<&str> = text.lines().collect();
        let header = starts(
            lines[0],
            &["WORKER", "HOST", "OPERATIONS", "LAST HEARTBEAT"],
        );
        assert_eq!(
            starts(lines[1], &["w-1", "hôte", "noop", "2026-"]),
            header,
            "{text}"
        );
        assert_eq!(
            starts(lines[2], &["worker-", "h", "noop", "2026-"]),
            header,
            "{text}"
        );
        // IN FLIGHT is right-aligned: "4/4" and "12/4" end under its last letter.
        let in_flight_end = starts(lines[0], &["IN FLIGHT"])[0] + "IN FLIGHT".len();
        for (line, cell) in [(lines[1], "4/4"), (lines[2], "12/4")] {
            let at = starts(line, &["sha256", cell])[1];
            assert_eq!(at + cell.len(), in_flight_end, "{text}");
        }
    }

    #[test]
    fn no_trailing_spaces() {
        let text = render(
            &[("NAME", Align::Left), ("NOTE", Align::Left)],
            &[vec!["a".into(), "".into()], vec!["bb".into(), "x".into()]],
        );
        assert_eq!(text, "NAME  NOTE\na\nbb    x\n");
    }
}
