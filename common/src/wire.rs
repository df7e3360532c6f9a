//! Internal messages between batchq's own binaries. They are not part of the public contract
//! and may change between versions (all binaries of one deployment run the same version).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::contract::{JobState, JobStatus};

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

    /// The first `count` indices in run order.
    pub fn head(&self, count: usize) -> Indices {
        match self {
            Indices::Span(start, end) => {
                Indices::Span(*start, start.saturating_add(count as u64).min(*end))
            }
            Indices::List(list) => Indices::List(list[..count.min(list.len())].to_vec()),
        }
    }

    /// The indices from `offset` on: what is left when a fragment stops early.
    pub fn tail(&self, offset: usize) -> Indices {
        match self {
            Indices::Span(start, end) => Indices::Span((start + offset as u64).min(*end), *end),
            Indices::List(list) => Indices::List(list.get(offset..).unwrap_or_default().to_vec()),
        }
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
    /// The job's redrive round this fragment belongs to (0 before any redrive): a report of
    /// an earlier round than the job's is stale and counts nothing.
    #[serde(default)]
    pub round: u64,
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
    /// Its report reached the most a report may carry: the rest runs as a fragment of its own.
    Size,
}

/// A failed operation of a fragment report: its offset within the fragment and the error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub offset: u32,
    pub error: String,
    /// The operation said trying again cannot help (`OpError::permanent`): the failure is
    /// final whatever attempt this was. Absent (false) from workers before it existed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub permanent: bool,
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
    /// The fragment's [`Fragment::round`].
    #[serde(default)]
    pub round: u64,
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
        /// [`crate::jobspec::JobSpec::ops_total`], as validated: the reducer keeps it as is.
        ops_total: u64,
        submitted_at_ms: i64,
        collect_results: bool,
        tolerated_failure_percent: f64,
        max_attempts: u32,
        /// [`crate::jobspec::JobSpec::summary`], for the console (absent from splitters
        /// before issue 14).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        spec: Option<Value>,
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
    /// The job was cancelled: it ends now. Fragments that were running still report what
    /// they ran, which the reducer adds to its counts.
    Cancelled { job_id: String, at_ms: i64 },
    /// A worker finished (or stopped) a fragment.
    Fragment(FragmentReport),
    /// A RedriveRequest reached the splitter: redrive the job into `round` (one more than the
    /// splitter's round of the job when it asked), if the job is failed or cancelled. Asking
    /// again for a round the job reached already changes nothing, so a re-sent ask never
    /// redrives twice.
    Redrive { job_id: String, round: u64 },
    /// A CancelRequest reached the splitter while it was not dispatching the job: if the
    /// reducer started redrive `round` (the one after the splitter's) and the splitter has
    /// not applied it yet, that round is cancelled, and the splitter told to halt it.
    CancelRound { job_id: String, round: u64 },
}

impl ReducerInput {
    /// The job this input is about.
    pub fn job_id(&self) -> &str {
        match self {
            ReducerInput::Accepted { job_id, .. }
            | ReducerInput::Rejected { job_id, .. }
            | ReducerInput::Progress { job_id, .. }
            | ReducerInput::Cancelled { job_id, .. }
            | ReducerInput::Redrive { job_id, .. }
            | ReducerInput::CancelRound { job_id, .. } => job_id,
            ReducerInput::Fragment(report) => &report.job_id,
        }
    }
}

/// The start of a message of several reports (see [`encode_reports`]).
const REPORTS_PREFIX: &[u8] = br#"{"type":"fragments","body":["#;

/// One message for `{ns}.reducer` holding the reports of fragments that ended together, each
/// already encoded as a [`FragmentReport`]: one report is the [`ReducerInput::Fragment`]
/// message it always was; several are `{"type":"fragments","body":[…]}`, one broker message
/// for all (a worker sends them this way when reports queue up while the last one is being
/// published). Only a reducer that reads [`decode_reducer_message`] understands the latter.
pub fn encode_reports(reports: &[Vec<u8>]) -> Vec<u8> {
    let len: usize = reports.iter().map(|r| r.len() + 1).sum();
    let mut body = Vec::with_capacity(len + REPORTS_PREFIX.len() + 2);
    if let [one] = reports {
        body.extend_from_slice(br#"{"type":"fragment","body":"#);
        body.extend_from_slice(one);
        body.push(b'}');
        return body;
    }
    body.extend_from_slice(REPORTS_PREFIX);
    for (i, report) in reports.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(report);
    }
    body.extend_from_slice(b"]}");
    body
}

/// The inputs one message of `{ns}.reducer` holds: a [`ReducerInput`], or the reports of
/// several fragments ([`encode_reports`]).
pub fn decode_reducer_message(bytes: &[u8]) -> Result<Vec<ReducerInput>, serde_json::Error> {
    #[derive(Deserialize)]
    #[serde(tag = "type", content = "body", rename_all = "lowercase")]
    enum Group {
        Fragments(Vec<FragmentReport>),
    }
    if bytes.starts_with(REPORTS_PREFIX) {
        let Group::Fragments(reports) = serde_json::from_slice(bytes)?;
        return Ok(reports.into_iter().map(ReducerInput::Fragment).collect());
    }
    serde_json::from_slice(bytes).map(|input| vec![input])
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
    /// Indices among the `done` ones whose failure is final and counted: what a redrive
    /// runs again, with the indices the fragment did not run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<u64>,
    /// Whether the reducer counted the fragment. It does not when the job had failed before
    /// (its unrun operations were counted as failed) or the report is of an earlier round:
    /// then none of the fragment's operations succeeded as far as the job's counts go.
    #[serde(default = "counted_by_default", skip_serializing_if = "is_true")]
    pub counted: bool,
}

fn counted_by_default() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// What the reducer tells the splitter, on `{ns}.splitter`. The reducer sends a committed
/// batch's as JSON arrays ([`encode_splitter_inputs`], in order); the splitter also reads a
/// single object (what a reducer from before this batching sends).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SplitterInput {
    /// A fragment's outcome is recorded: free its window slot, release what it left.
    Settled(Settled),
    /// The job ended early (its failures exceeded the share it tolerates) in redrive `round`:
    /// dispatch nothing more of it, and have workers drop its queued fragments. A halt of an
    /// earlier round than the splitter's changes nothing.
    Halt {
        job_id: String,
        #[serde(default)]
        round: u64,
    },
    /// The reducer took the job into redrive `round` (its state is `running` again): run
    /// every operation that has not succeeded. Applied once; a repeat changes nothing.
    Redrive { job_id: String, round: u64 },
}

/// Most settlements in one message to the splitter: one message per reducer batch instead of
/// one per fragment takes a third of the broker's messages off every fragment.
pub const SETTLEMENTS_PER_MESSAGE: usize = 256;

/// Most bytes of one message of settlements (a settlement's `retry` list can hold a whole
/// fragment's indices): well under any broker's message size limit. A single settlement
/// larger than this still travels, alone.
pub const SETTLEMENT_MESSAGE_BYTES: usize = 1 << 20;

/// Encodes `inputs` as JSON arrays of at most [`SETTLEMENTS_PER_MESSAGE`] inputs and about
/// [`SETTLEMENT_MESSAGE_BYTES`] each (never empty, order kept): the bodies of the messages
/// to the splitter.
pub fn encode_splitter_inputs(inputs: &[SplitterInput]) -> Result<Vec<Vec<u8>>, serde_json::Error> {
    let mut bodies = Vec::new();
    let mut body = Vec::new();
    let mut count = 0;
    for input in inputs {
        let encoded = serde_json::to_vec(input)?;
        if count > 0
            && (count == SETTLEMENTS_PER_MESSAGE
                || body.len() + encoded.len() + 2 > SETTLEMENT_MESSAGE_BYTES)
        {
            body.push(b']');
            bodies.push(std::mem::take(&mut body));
            count = 0;
        }
        body.push(if count == 0 { b'[' } else { b',' });
        body.extend_from_slice(&encoded);
        count += 1;
    }
    if count > 0 {
        body.push(b']');
        bodies.push(body);
    }
    Ok(bodies)
}

/// One element of a message of `{ns}.splitter`: the input, or why it is not one (with its
/// JSON text, to keep on the dead-letter queue).
pub type DecodedInput = Result<SplitterInput, (String, Vec<u8>)>;

/// Decodes a message of `{ns}.splitter`: an array of [`SplitterInput`], or a single one (what
/// a reducer from before this batching sends). Each element is decoded on its own, so one
/// that is not understood does not take the others with it. `Err` when the body is neither.
pub fn decode_splitter_inputs(body: &[u8]) -> Result<Vec<DecodedInput>, serde_json::Error> {
    let array = body
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'[');
    if !array {
        return serde_json::from_slice(body).map(|one| vec![Ok(one)]);
    }
    let elements: Vec<Box<serde_json::value::RawValue>> = serde_json::from_slice(body)?;
    Ok(elements
        .into_iter()
        .map(|element| {
            serde_json::from_str(element.get())
                .map_err(|e| (e.to_string(), element.get().as_bytes().to_vec()))
        })
        .collect())
}

/// Broadcast on `{ns}.control` to every live worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Control {
    /// Stop the job's fragments of `round` and earlier (a redriven job's later rounds run).
    Cancel {
        job_id: String,
        #[serde(default)]
        round: u64,
    },
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
    /// Whether the splitter and the reducer are alive and their stores work.
    Health,
    /// Deletes a finished job's status and results now, as retention would later.
    Delete {
        job_id: String,
    },
    /// One page of jobs, newest submitted first, for the web console: only those in `state`
    /// (if given) whose id starts with `prefix` (if given), skipping `offset` of them.
    #[serde(rename = "jobs_page")]
    JobsPage {
        #[serde(default)]
        state: Option<JobState>,
        #[serde(default)]
        prefix: Option<String>,
        offset: u64,
        limit: u32,
    },
    /// One page of a job's failed operations, ordered by index: only those whose error
    /// contains `search` (ignoring ASCII case, if given), skipping `offset` of them.
    Failures {
        job_id: String,
        #[serde(default)]
        search: Option<String>,
        offset: u64,
        limit: u32,
    },
    /// The job's status and the JobSpec it was accepted with (see [`JobDetail`]).
    Job {
        job_id: String,
    },
}

/// One page of jobs; `total` counts every job that matches the filter, `by_state` every job
/// the reducer keeps, by state, whatever the filter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobsPage {
    pub jobs: Vec<JobStatus>,
    pub total: u64,
    pub by_state: std::collections::BTreeMap<String, u64>,
}

/// A failed operation and its error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailedItem {
    pub index: u64,
    pub error: String,
}

/// One page of failed operations; `total` counts every one that matches the search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailuresPage {
    pub failures: Vec<FailedItem>,
    pub total: u64,
}

/// A job as the console shows it: its status, and the JobSpec it was accepted with as
/// [`crate::jobspec::JobSpec::summary`] gives it (`None` for a job accepted before the
/// reducer kept specs, or rejected).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobDetail {
    pub status: JobStatus,
    pub spec: Option<Value>,
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
    Jobs {
        jobs: Vec<JobStatus>,
    },
    Workers {
        workers: Vec<WorkerInfo>,
    },
    Health(crate::health::HealthReport),
    NotFound {
        job_id: String,
    },
    Error {
        message: String,
    },
    /// The job's records were deleted (retention, or `batchctl delete`); only this is left.
    Gone(Tombstone),
    /// `Delete` of a job that has not ended.
    StillRunning {
        job_id: String,
    },
    /// `Delete` done.
    Deleted {
        job_id: String,
    },
    #[serde(rename = "jobs_page")]
    JobsPage(JobsPage),
    Failures(FailuresPage),
    Job(JobDetail),
}

/// Why a job's records are gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Removal {
    /// Its retention passed.
    Expired,
    /// `batchctl delete`.
    Deleted,
}

impl Removal {
    pub fn as_str(self) -> &'static str {
        match self {
            Removal::Expired => "expired",
            Removal::Deleted => "deleted",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "expired" => Some(Removal::Expired),
            "deleted" => Some(Removal::Deleted),
            _ => None,
        }
    }
}

/// What is kept of a job whose records were deleted, so that asking for it says so.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tombstone {
    pub job_id: String,
    pub how: Removal,
    /// When the job ended (RFC 3339), if it is known.
    pub finished_at: Option<String>,
    pub deleted_at: String,
    /// The retention that expired it (`7d`), for [`Removal::Expired`].
    pub retention: Option<String>,
}

impl Tombstone {
    /// One line for a user: `job X expired (it ended at ..., retention 7d)`.
    pub fn describe(&self) -> String {
        let ended = match &self.finished_at {
            Some(at) => format!("it ended at {at}"),
            None => "it had ended".to_owned(),
        };
        match self.how {
            Removal::Expired => format!(
                "job {} expired ({ended}, retention {}); its status and results were deleted at {}",
                self.job_id,
                self.retention.as_deref().unwrap_or("?"),
                self.deleted_at
            ),
            Removal::Deleted => format!(
                "job {} was deleted at {} ({ended}); its status and results are gone",
                self.job_id, self.deleted_at
            ),
        }
    }
}

#[cfg(test)]
mod tests {

    fn report(job_id: &str, fragment: u64) -> FragmentReport {
        FragmentReport {
            job_id: job_id.into(),
            fragment,
            operation: "noop".into(),
            attempt: 1,
            worker: "w".into(),
            indices: Indices::Span(fragment, fragment + 1),
            done: 1,
            failures: vec![],
            results: vec![Value::from(fragment)],
            cut: None,
            started_at_ms: 1,
            elapsed_us: 2,
            measurements: Default::default(),
            round: 0,
        }
    }

    #[test]
    fn reports_travel_one_or_several_to_a_message() {
        let encoded = |r: &FragmentReport| serde_json::to_vec(r).expect("encodes");
        let (a, b) = (report("a", 1), report("b", 2));
        // One report is the message it always was.
        let one = encode_reports(&[encoded(&a)]);
        assert_eq!(
            one,
            serde_json::to_vec(&ReducerInput::Fragment(a.clone())).expect("encodes")
        );
        assert_eq!(
            decode_reducer_message(&one).expect("decodes"),
            vec![ReducerInput::Fragment(a.clone())]
        );
        let two = encode_reports(&[encoded(&a), encoded(&b)]);
        assert_eq!(
            decode_reducer_message(&two).expect("decodes"),
            vec![ReducerInput::Fragment(a), ReducerInput::Fragment(b)]
        );
        // Any other input decodes as before; a broken group is an error naming the field.
        let cancelled = serde_json::to_vec(&ReducerInput::Cancelled {
            job_id: "c".into(),
            at_ms: 3,
        })
        .expect("encodes");
        assert_eq!(
            decode_reducer_message(&cancelled).expect("decodes").len(),
            1
        );
        let broken = br#"{"type":"fragments","body":[{"job_id":"a"}]}"#;
        let error = decode_reducer_message(broken).expect_err("a report lacks fields");
        assert!(error.to_string().contains("missing field"), "{error}");
    }

    use super::*;

    #[test]
    fn indices_tail_and_get() {
        let span = Indices::Span(10, 15);
        assert_eq!(span.len(), 5);
        assert_eq!(span.get(4), Some(14));
        assert_eq!(span.get(5), None);
        assert_eq!(span.tail(2), Indices::Span(12, 15));
        assert_eq!(span.tail(9), Indices::Span(15, 15));
        assert_eq!(span.head(2), Indices::Span(10, 12));
        assert_eq!(span.head(9), span);
        assert_eq!(
            Indices::List(vec![3, 9, 4]).head(2),
            Indices::List(vec![3, 9])
        );
        let list = Indices::List(vec![3, 9, 4]);
        assert_eq!(list.tail(1), Indices::List(vec![9, 4]));
        assert_eq!(list.get(1), Some(9));
        assert_eq!(list.get(3), None);
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
            round: 0,
        };
        assert_eq!(fragment.item(0), Some(Value::from(-7)));
        assert_eq!(fragment.item(1), Some(Value::from(-6)));
        assert_eq!(fragment.item(2), None);
    }

    #[test]
    fn splitter_messages_are_arrays_or_one_input() {
        let settled = |fragment, retry: Vec<u64>| {
            SplitterInput::Settled(Settled {
                job_id: "j".into(),
                fragment,
                done: 3,
                retry,
                elapsed_us: 12,
                failed: Vec::new(),
                counted: true,
            })
        };
        let halt = SplitterInput::Halt {
            job_id: "k".into(),
            round: 0,
        };
        let inputs = vec![settled(4, vec![7]), halt.clone()];
        let bodies = encode_splitter_inputs(&inputs).expect("encoded");
        assert_eq!(bodies.len(), 1);
        let decoded = decode_splitter_inputs(&bodies[0]).expect("an array");
        assert_eq!(decoded, vec![Ok(settled(4, vec![7])), Ok(halt)]);

        // A single object, as reducers sent before the batching.
        let one = serde_json::to_vec(&settled(1, Vec::new())).expect("serialise");
        assert_eq!(
            decode_splitter_inputs(&one).expect("one input"),
            vec![Ok(settled(1, Vec::new()))]
        );

        // An element not understood is refused alone, with its text.
        let mixed = br#"[{"type": "nope"}, {"type": "halt", "job_id": "k"}]"#;
        let decoded = decode_splitter_inputs(mixed).expect("an array");
        assert!(matches!(&decoded[0], Err((_, text)) if text == br#"{"type": "nope"}"#));
        assert_eq!(
            decoded[1],
            Ok(SplitterInput::Halt {
                job_id: "k".into(),
                round: 0
            })
        );
        assert!(decode_splitter_inputs(b"").is_err());
        assert!(decode_splitter_inputs(b"[1, 2").is_err());
    }

    #[test]
    fn settlements_are_split_by_count_and_size() {
        let small: Vec<SplitterInput> = (0..600)
            .map(|fragment| SplitterInput::Halt {
                job_id: format!("job-{fragment}"),
                round: 0,
            })
            .collect();
        let bodies = encode_splitter_inputs(&small).expect("encoded");
        let counts: Vec<usize> = bodies
            .iter()
            .map(|b| decode_splitter_inputs(b).expect("an array").len())
            .collect();
        assert_eq!(counts, vec![256, 256, 88]);

        // Retry lists of 100,000 indices: about 0.7 MB each, so one per message.
        let big = |fragment| {
            SplitterInput::Settled(Settled {
                job_id: "j".into(),
                fragment,
                done: 100_000,
                retry: (0..100_000).collect(),
                elapsed_us: 1,
                failed: Vec::new(),
                counted: true,
            })
        };
        let inputs: Vec<SplitterInput> = (0..3).map(big).collect();
        let bodies = encode_splitter_inputs(&inputs).expect("encoded");
        assert_eq!(bodies.len(), 3);
        let mut decoded = Vec::new();
        for body in &bodies {
            decoded.extend(decode_splitter_inputs(body).expect("an array"));
        }
        assert_eq!(decoded, inputs.into_iter().map(Ok).collect::<Vec<_>>());
        assert!(encode_splitter_inputs(&[]).expect("encoded").is_empty());
    }
}
