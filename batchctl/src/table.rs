//! Aligned text tables and summaries for people; `--json` prints the records instead.

use common::contract::JobStatus;
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

/// Left-aligned columns separated by two spaces.
fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = widths[i]))
            .collect();
        out.push_str(padded.join("  ").trim_end());
        out.push('\n');
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
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
            "JOB",
            "STATE",
            "OPERATION",
            "DONE",
            "PROGRESS",
            "FAILED",
            "SUBMITTED",
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
    render(&["QUEUE", "READY", "UNACKED", "CONSUMERS"], &rows)
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
            "WORKER",
            "HOST",
            "OPERATIONS",
            "IN FLIGHT",
            "LAST HEARTBEAT",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align() {
        let text = render(&["A", "BB"], &[vec!["long".into(), "x".into()]]);
        assert_eq!(text, "A     BB\nlong  x\n");
    }
}
