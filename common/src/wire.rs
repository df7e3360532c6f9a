//! Internal messages between batchq's own binaries. They are not part of the public contract
//! and may change between versions (all binaries of one deployment run the same version).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::contract::JobStatus;

/// The operation indices a fragment covers, in the order they run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Indices {
    /// `start..end`, end exclusive.
    Span(u64, u64),
    /// Arbitrary indices (retries gather failed operations from anywhere in a job).
    List(Vec<u64>),
}

impl Indices {
    pub fn len(&self) -> usize {
        match self {
            Indices::Span(start, end) => end.saturating_sub(*start) as usize,
            Indices::List(list) => list.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The index at `offset` in run order.
    pub fn get(&self, offset: usize) -> Option<u64> {
        match self {
            Indices::Span(start, end) => {
                let index = start.checked_add(offset as u64)?;
                (index < *end).then_some(index)
            }
            Indices::List(list) => list.get(offset).copied(),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.len()).filter_map(|offset| self.get(offset))
    }

    /// The indices from `offset` on: what is left when a fragment stops early.
    pub fn tail(&self, offset: usize) -> Indices {
        match self {
            Indices::Span(start, end) => Indices::Span((start + offset as u64).min(*end), *end),
            Indices::List(list) => Indices::List(list.get(offset..).unwrap_or_default().to_vec()),
        }
    }

    pub fn first(&self) -> Option<u64> {
        self.get(0)
    }
}

/// What a fragment runs on. Range jobs carry no items: the item is `base + index`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Payload {
    Range {
        base: i64,
    },
    /// One item per index, in the same order as the fragment's indices.
    Items(Vec<Value>),
}

/// A unit of work on `{ns}.work.{operation}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fragment {
    pub job_id: String,
    /// Number of this fragment within its job, unique and never reused: the key under which
    /// the reducer records the fragment's outcome exactly once.
    pub fragment: u64,
    pub operation: String,
    pub params: Map<String, Value>,
    pub attempt: u32,
    pub indices: Indices,
    pub payload: Payload,
    pub lifespan_ms: u64,
    pub collect_results: bool,
}

impl Fragment {
    /// The item at `offset` in run order.
    pub fn item(&self, offset: usize) -> Option<Value> {
        match &self.payload {
            Payload::Range { base } => {
                let index = self.indices.get(offset)?;
                Some(Value::from(base.checked_add(i64::try_from(index).ok()?)?))
            }
            Payload::Items(items) => items.get(offset).cloned(),
        }
    }
}

/// Why a fragment stopped before its last operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Cut {
    /// It reached its lifespan.
    Lifespan,
    /// Its worker is shutting down.
    Shutdown,
    /// Its job was cancelled.
    Cancelled,
}

/// A failed operation of a fragment report: its offset within the fragment and the error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub offset: u32,
    pub error: String,
}

/// What a worker reports when a fragment ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FragmentReport {
    pub job_id: String,
    pub fragment: u64,
    pub operation: String,
    pub attempt: u32,
    pub worker: String,
    pub indices: Indices,
    /// How many operations ran, from the start of `indices`; the rest did not run.
    pub done: u32,
    pub failures: Vec<Failure>,
    /// One result per operation that ran (null where it failed); empty unless the job
    /// collects results.
    pub results: Vec<Value>,
    pub cut: Option<Cut>,
    pub started_at_ms: i64,
    pub elapsed_us: u64,
    /// Durations and the operations' own metrics.
    #[serde(default)]
    pub measurements: crate::measure::FragmentMeasurements,
}

/// Everything the reducer consumes from `{ns}.reducer`.
// One value lives per delivery, briefly: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
// Adjacently tagged, with the tag written first: serde then reads the body straight into
// its variant instead of buffering a whole report (up to 10,000 results) to find the tag.
#[serde(tag = "type", content = "body", rename_all = "lowercase")]
pub enum ReducerInput {
    /// The splitter took the job.
    Accepted {
        job_id: String,
        operation: String,
        ops_total: u64,
        submitted_at_ms: i64,
        collect_results: bool,
        tolerated_failure_percent: f64,
        max_attempts: u32,
    },
    /// The splitter refused the message as a job.
    Rejected {
        job_id: String,
        error: String,
        submitted_at_ms: i64,
    },
    /// Fragments of the job now out; `seq` orders these notes (later ones win).
    Progress {
        job_id: String,
        in_flight: u64,
        seq: u64,
        at_ms: i64,
    },
    /// A cancelled job has no fragment out any more: its counts are final.
    Cancelled { job_id: String, at_ms: i64 },
    /// A worker finished (or stopped) a fragment.
    Fragment(FragmentReport),
}

/// The reducer's decision on a fragment, sent to the splitter once the outcome is committed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settled {
    pub job_id: String,
    pub fragment: u64,
    /// Operations of the fragment that ran; the splitter re-dispatches the rest.
    pub done: u32,
    /// Indices among the `done` ones whose operation failed on a non-final attempt: the
    /// splitter runs them again, in a retry fragment, after a backoff.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry: Vec<u64>,
    /// How long the fragment ran, for sizing the job's next fragments.
    #[serde(default)]
    pub elapsed_us: u64,
}

/// What the reducer tells the splitter, on `{ns}.splitter`. The reducer sends them as a JSON
/// array of up to [`SETTLEMENTS_PER_MESSAGE`] (one message per committed batch, in order); the
/// splitter also reads a single object (what a reducer from before this batching sends).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SplitterInput {
    /// A fragment's outcome is recorded: free its window slot, release what it left.
    Settled(Settled),
    /// The job ended early (its failures exceeded the share it tolerates): dispatch nothing
    /// more of it, and have workers drop its queued fragments.
    Halt { job_id: String },
}

/// Most settlements in one message to the splitter: one message per reducer batch instead of
/// one per fragment takes a third of the broker's messages off every fragment.
pub const SETTLEMENTS_PER_MESSAGE: usize = 256;

/// Decodes a message of `{ns}.splitter`: an array of [`SplitterInput`], or a single one.
pub fn decode_splitter_inputs(body: &[u8]) -> Result<Vec<SplitterInput>, serde_json::Error> {
    let array = body
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'[');
    if array {
        serde_json::from_slice(body)
    } else {
        serde_json::from_slice(body).map(|one| vec![one])
    }
}

/// Broadcast on `{ns}.control` to every live worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Control {
    Cancel { job_id: String },
}

/// Sent by each worker every few seconds on `{ns}.events`, routing key `heartbeat`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub worker: String,
    pub host: String,
    pub pid: u32,
    pub operations: Vec<String>,
    pub prefetch: u16,
    /// Fragments delivered to this worker and not yet acknowledged.
    pub fragments_in_flight: u64,
    /// The same, by operation: the unacknowledged messages of each work queue held here.
    pub held_by_operation: std::collections::BTreeMap<String, u64>,
    pub started_at_ms: i64,
    pub at_ms: i64,
    /// Milliseconds until the next heartbeat; a worker silent for three of these is gone.
    pub interval_ms: u64,
}

/// A live worker as `batchctl workers` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub worker: String,
    pub host: String,
    pub pid: u32,
    pub operations: Vec<String>,
    pub prefetch: u16,
    pub fragments_in_flight: u64,
    pub held_by_operation: std::collections::BTreeMap<String, u64>,
    pub started_at: String,
    pub last_heartbeat: String,
}

/// `batchctl` → reducer, on `{ns}.rpc` with direct reply-to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Request {
    Status {
        job_id: String,
    },
    /// Results with index ≥ `from`, at most `limit` of them, ordered by index.
    Results {
        job_id: String,
        from: u64,
        limit: u32,
    },
    Jobs {
        limit: u32,
    },
    Workers,
}

/// One page of results; `next` is where the following page starts, if any.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultsPage {
    pub lines: Vec<crate::contract::ResultLine>,
    pub next: Option<u64>,
}

/// The reducer's answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Response {
    Status(JobStatus),
    Results(ResultsPage),
    Jobs { jobs: Vec<JobStatus> },
    Workers { workers: Vec<WorkerInfo> },
    NotFound { job_id: String },
    Error { message: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_tail_and_get() {
        let span = Indices::Span(10, 15);
        assert_eq!(span.len(), 5);
        assert_eq!(span.get(4), Some(14));
        assert_eq!(span.get(5), None);
        assert_eq!(span.tail(2), Indices::Span(12, 15));
        assert_eq!(span.tail(9), Indices::Span(15, 15));
        let list = Indices::List(vec![3, 9, 4]);
        assert_eq!(list.tail(1), Indices::List(vec![9, 4]));
        assert_eq!(list.iter().collect::<Vec<_>>(), vec![3, 9, 4]);
    }

    #[test]
    fn range_items_are_base_plus_index() {
        let fragment = Fragment {
            job_id: "j".into(),
            fragment: 0,
            operation: "noop".into(),
            params: Map::new(),
            attempt: 1,
            indices: Indices::Span(3, 5),
            payload: Payload::Range { base: -10 },
            lifespan_ms: 1000,
            collect_results: true,
        };
        assert_eq!(fragment.item(0), Some(Value::from(-7)));
        assert_eq!(fragment.item(1), Some(Value::from(-6)));
        assert_eq!(fragment.item(2), None);
    }

    #[test]
    fn splitter_messages_are_arrays_or_one_input() {
        let settled = SplitterInput::Settled(Settled {
            job_id: "j".into(),
            fragment: 4,
            done: 3,
            retry: vec![7],
            elapsed_us: 12,
        });
        let halt = SplitterInput::Halt { job_id: "k".into() };
        let many = serde_json::to_vec(&[settled.clone(), halt.clone()]).expect("serialise");
        assert_eq!(
            decode_splitter_inputs(&many).expect("an array"),
            vec![settled.clone(), halt]
        );
        let one = serde_json::to_vec(&settled).expect("serialise");
        assert_eq!(
            decode_splitter_inputs(&one).expect("one input"),
            vec![settled]
        );
        assert!(decode_splitter_inputs(b" [{\"type\": \"nope\"}]").is_err());
        assert!(decode_splitter_inputs(b"").is_err());
    }
}
