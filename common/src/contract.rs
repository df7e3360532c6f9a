//! Messages of the public wire contract (docs/protocol.md, v1.2) that batchq publishes or accepts,
//! other than the JobSpec itself (see [`crate::jobspec`]).

use serde::{Deserialize, Serialize};

/// Lifecycle of a job. The last four are terminal and never change again, except that a
/// redrive takes a failed or cancelled job back to `Running` (raising its `redrives`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Accepted,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Rejected,
}

impl JobState {
    pub const ALL: [JobState; 6] = [
        JobState::Accepted,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
        JobState::Rejected,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::Rejected
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Accepted => "accepted",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::Rejected => "rejected",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "accepted" => JobState::Accepted,
            "running" => JobState::Running,
            "succeeded" => JobState::Succeeded,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            "rejected" => JobState::Rejected,
            _ => return None,
        })
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Published on `{ns}.status` with routing key `job.{job_id}.{state}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    pub job_id: String,
    pub state: JobState,
    pub operation: Option<String>,
    /// At most [`crate::jobspec::MAX_OPS_TOTAL`], so exact in every JSON client; the counts
    /// of operations below never exceed it.
    pub ops_total: u64,
    pub ops_succeeded: u64,
    pub ops_failed: u64,
    pub fragments_done: u64,
    pub fragments_in_flight: u64,
    pub submitted_at: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub error: Option<String>,
    /// How often the job was redriven. A status with a higher value supersedes every status
    /// with a lower one; within one value counts only grow. Absent from statuses of releases
    /// before v1.2, which read as 0.
    #[serde(default)]
    pub redrives: u64,
}

impl JobStatus {
    /// Routing key on `{ns}.status`.
    pub fn routing_key(&self) -> String {
        format!("job.{}.{}", self.job_id, self.state)
    }
}

/// Published on `{ns}.jobs` with routing key `cancel`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    pub job_id: String,
}

/// Published on `{ns}.jobs` with routing key `redrive`: runs again every operation of a
/// failed or cancelled job that has not succeeded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedriveRequest {
    pub job_id: String,
}

/// One line of `batchctl results`: the outcome of the operation at `index`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ResultLine {
    // `Err` comes first: an untagged `Ok` would also match `{"index", "error"}` with a null result.
    Err {
        index: u64,
        error: String,
    },
    Ok {
        index: u64,
        result: serde_json::Value,
    },
}

impl ResultLine {
    pub fn index(&self) -> u64 {
        match self {
            ResultLine::Ok { index, .. } | ResultLine::Err { index, .. } => *index,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A JobStatus as releases before v1.2 published it.
    const V1_1_STATUS: &str = r#"{"job_id": "j", "state": "failed", "operation": "noop",
        "ops_total": 4, "ops_succeeded": 1, "ops_failed": 3, "fragments_done": 2,
        "fragments_in_flight": 0, "submitted_at": null, "started_at": null,
        "finished_at": null, "error": "boom"}"#;

    #[test]
    fn a_status_without_redrives_reads_as_never_redriven_and_every_status_says_it() {
        let status: JobStatus = serde_json::from_str(V1_1_STATUS).expect("a v1.1 status");
        assert_eq!(status.redrives, 0);
        let written = serde_json::to_value(&status).expect("encodes");
        assert_eq!(written["redrives"], 0, "always present: {written}");
        let redriven = JobStatus {
            redrives: 2,
            ..status
        };
        let again: JobStatus =
            serde_json::from_value(serde_json::to_value(&redriven).expect("encodes"))
                .expect("decodes");
        assert_eq!(again.redrives, 2);
    }

    #[test]
    fn a_redrive_request_names_its_job_and_nothing_else() {
        let request: RedriveRequest =
            serde_json::from_str(r#"{"job_id": "j"}"#).expect("a request");
        assert_eq!(request.job_id, "j");
        let error = serde_json::from_str::<RedriveRequest>(r#"{"job_id": "j", "round": 1}"#)
            .expect_err("an unknown field");
        assert!(
            error.to_string().contains("unknown field `round`"),
            "{error}"
        );
    }
}
