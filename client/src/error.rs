//! What can go wrong when a program talks to batchq, one variant per thing that happened.

use common::broker::BrokerError;
use common::contract::JobState;
use common::rpc::RpcError;
use common::wire::{Response, Tombstone};

/// An error of the [`crate::Client`]: each variant says what happened, and
/// [`ClientError::is_retryable`] whether trying again later may help.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The broker could not be reached within the client's patience (no answer, connection
    /// refused, DNS); the message names the broker (without its password).
    #[error("{0}")]
    Unreachable(String),
    /// The broker answered and turned this client away (login, vhost, TLS): the cause first,
    /// then the broker's own words. Waiting does not mend it.
    #[error("{0}")]
    Refused(String),
    /// The broker failed while the client used it (a channel closed, a message nacked).
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// No reducer answered a question within the client's timeout.
    #[error(
        "no reducer answered on {exchange} within {secs} s (is a reducer running in namespace {namespace:?}?)"
    )]
    NoReducer {
        /// The exchange the question was sent to (`{ns}.rpc`).
        exchange: String,
        /// The client's namespace.
        namespace: String,
        /// The timeout that passed, in seconds.
        secs: u64,
    },
    /// The JobSpec is not JSON.
    #[error("not a JSON JobSpec: {0}")]
    SpecNotJson(String),
    /// The JobSpec is JSON but not an object.
    #[error("a JobSpec is a JSON object")]
    SpecNotObject,
    /// The splitter would reject the JobSpec: `field` is what is wrong (`fragment_size`,
    /// `range`, `message` for the body as a whole), `reason` the splitter's words, which
    /// name the field too (`fragment_size: must be at least 1, got 0`). Nothing was
    /// published.
    #[error("invalid JobSpec: {reason}")]
    SpecRejected {
        /// The field that is wrong (`message` for the body as a whole).
        field: String,
        /// The splitter's words for the problem, the field first.
        reason: String,
    },
    /// The reducer knows no job of this id (never submitted, or not yet accepted).
    #[error("unknown job {0}")]
    UnknownJob(String),
    /// The job's records were deleted (retention or `delete`); what is left says when.
    #[error("{}", .0.describe())]
    Gone(Tombstone),
    /// `delete` of a job that has not ended.
    #[error("job {0} is still running; cancel it first")]
    StillRunning(String),
    /// `cancel` of a job that has already ended.
    #[error("job {job_id} has already ended ({state})")]
    AlreadyEnded {
        /// The job.
        job_id: String,
        /// The state it ended in.
        state: JobState,
    },
    /// `redrive` of a job that is neither failed nor cancelled.
    #[error("job {job_id} is {state}; only a failed or cancelled job can be redriven")]
    NotRedrivable {
        /// The job.
        job_id: String,
        /// Its state now.
        state: JobState,
    },
    /// A job just submitted was not accepted in time: no splitter took it from the jobs
    /// exchange's queue (it waits there).
    #[error("job {job_id} was not accepted within {secs} s: no splitter took it from {queue}")]
    NotAccepted {
        /// The job.
        job_id: String,
        /// How long it was waited for, in seconds.
        secs: u64,
        /// The queue where it waits (`{ns}.jobs`).
        queue: String,
    },
    /// The reducer answered with an error of its own (its store failed).
    #[error("the reducer failed to answer: {0}")]
    Reducer(String),
    /// The reducer answered something this client does not expect (another version).
    #[error("unexpected reply from the reducer: {0}")]
    Unexpected(String),
}

impl ClientError {
    /// Whether trying again later may help: the broker or the reducer was away, not the
    /// request wrong.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Unreachable(_) | ClientError::NoReducer { .. } => true,
            ClientError::Broker(e) => e.is_retryable(),
            _ => false,
        }
    }

    /// The error a reply other than the one asked for stands for. For batchq's own tools
    /// (`batchctl`): the reducer's replies are not part of the public contract.
    #[doc(hidden)]
    pub fn from_response(response: Response) -> Self {
        match response {
            Response::NotFound { job_id } => ClientError::UnknownJob(job_id),
            Response::Gone(tombstone) => ClientError::Gone(tombstone),
            Response::StillRunning { job_id } => ClientError::StillRunning(job_id),
            Response::Error { message } => ClientError::Reducer(message),
            other => ClientError::Unexpected(format!("{other:?}")),
        }
    }
}

impl From<RpcError> for ClientError {
    fn from(e: RpcError) -> Self {
        match e {
            RpcError::Broker(e) => ClientError::Broker(e),
            RpcError::NoAnswer {
                exchange,
                namespace,
                secs,
            } => ClientError::NoReducer {
                exchange,
                namespace,
                secs,
            },
            RpcError::Malformed(text) => ClientError::Unexpected(text),
        }
    }
}
