//! Messages of the public wire contract (CONTRACT.md v1.1) that batchq publishes or accepts,
//! other than the JobSpec itself (see [`crate::jobspec`]).

use serde::{Deserialize, Serialize};

/// Lifecycle of a job. The last four are terminal and never change again.
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

/// Published on `{ns}.jobs` with routing key `redrive`: a failed or cancelled job runs again
/// every operation that has not succeeded.
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
