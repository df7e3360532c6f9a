//! A Rust client of batchq: submit jobs, follow their statuses, read their results, cancel,
//! redrive and delete them, from any program that reaches the broker.
//!
//! It speaks the public wire contract (`docs/protocol.md`): JobSpecs, CancelRequests and
//! RedriveRequests on `{ns}.jobs`, JobStatus records from `{ns}.status`, and the reducer's
//! answers for what is stored (a job's status, its results, the recent jobs).
//!
//! ```no_run
//! use batchq_client::{Client, JobState, StreamExt};
//! use serde_json::json;
//!
//! # async fn demo() -> Result<(), batchq_client::ClientError> {
//! let client = Client::connect_url("amqp://guest:guest@127.0.0.1:5672/%2f", "batchq").await?;
//! let status = client
//!     .submit_and_wait(&json!({"operation": "sha256", "range": {"start": 0, "end": 100}}))
//!     .await?;
//! assert_eq!(status.state, JobState::Succeeded);
//! let mut results = client.results(&status.job_id);
//! while let Some(line) = results.next().await {
//!     println!("{:?}", line?);
//! }
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod error;
mod spec;
mod stream;

use std::time::{Duration, Instant};

use common::broker::{Broker, json_properties};
use common::contract::{CancelRequest, RedriveRequest};
use common::lapin::types::ShortString;
use common::rpc::RpcClient;
use common::topology::{KEY_CANCEL, KEY_REDRIVE, KEY_SUBMIT};
use common::wire::{Request, Response};
use futures::stream::BoxStream;
use serde_json::Value;

pub use crate::error::ClientError;
pub use crate::spec::{CheckedSpec, checked_spec, checked_value};
pub use common::config::BrokerArgs;
pub use common::contract::{JobState, JobStatus, ResultLine};
pub use common::health::HealthReport;
pub use common::wire::WorkerInfo;
pub use futures::{Stream, StreamExt};

/// How long the reducer has to answer one question, unless [`Client::with_timeout`] says
/// otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`Client::reach`] keeps trying to reach the broker before it gives up: long
/// enough to ride out a broker that is restarting or a connection refused in passing, short
/// enough that a wrong address is reported promptly.
pub const CONNECT_PATIENCE: Duration = Duration::from_secs(3);

/// Pause between two connection attempts.
const CONNECT_RETRY_EVERY: Duration = Duration::from_millis(250);

/// How long a just-submitted job may stay unknown to the reducer (no splitter has taken it
/// yet) before [`Client::watch_submitted`] gives up with [`ClientError::NotAccepted`].
pub const ACCEPT_PATIENCE: Duration = Duration::from_secs(60);

/// Results asked of the reducer at once by [`Client::results`].
const RESULTS_PAGE: u32 = 5000;

/// A connection to one batchq deployment (a broker and a namespace). Cheap to clone: clones
/// share the broker's connection pool.
#[derive(Clone)]
pub struct Client {
    broker: Broker,
    timeout: Duration,
}

impl Client {
    /// Connects to the broker and namespace of `args` (the same settings, flags and
    /// environment variables as every batchq binary: `AMQP_URL`, `BATCHQ_NAMESPACE`,
    /// `BATCHQ_TLS_CA_FILE`), trying for [`CONNECT_PATIENCE`].
    pub async fn connect(args: &BrokerArgs) -> Result<Self, ClientError> {
        let client = Self::from_broker(Broker::new(args, "batchq-client")?);
        client.reach().await?;
        Ok(client)
    }

    /// [`Client::connect`] to the broker at `amqp_url` (a comma-separated list for a cluster)
    /// and the namespace `namespace`.
    pub async fn connect_url(amqp_url: &str, namespace: &str) -> Result<Self, ClientError> {
        Self::connect(&BrokerArgs::new(amqp_url, namespace)).await
    }

    /// A client over a broker handle of one's own; nothing is connected until it is used
    /// (call [`Client::reach`] to find out at once whether the broker answers).
    pub fn from_broker(broker: Broker) -> Self {
        Self {
            broker,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The same client, giving the reducer `timeout` to answer each question.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The broker handle: its names (`broker().names()`), its pool.
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// Connects to the broker (each URL in turn), retrying for [`CONNECT_PATIENCE`]; the
    /// error after that is one line naming the broker. A broker that refuses the login, the
    /// vhost or the TLS handshake is not retried: waiting will not mend it, so
    /// [`ClientError::Refused`] comes at once.
    pub async fn reach(&self) -> Result<(), ClientError> {
        let started = Instant::now();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let attempt = tokio::time::timeout(CONNECT_PATIENCE, self.broker.connection()).await;
            let error = match attempt {
                Ok(Ok(_connection)) => return Ok(()),
                Ok(Err(e)) if e.refusal().is_some() => {
                    return Err(ClientError::Refused(refusal_line(&e)));
                }
                Ok(Err(e)) if e.is_retryable() => e.to_string(),
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => format!(
                    "cannot reach the broker ({}): no answer within {} s",
                    self.broker.urls_redacted(),
                    CONNECT_PATIENCE.as_secs()
                ),
            };
            if started.elapsed() + CONNECT_RETRY_EVERY >= CONNECT_PATIENCE {
                return Err(ClientError::Unreachable(format!(
                    "{} (gave up after {attempts} attempts in {:.1} s)",
                    error.replace('\n', " "),
                    started.elapsed().as_secs_f64()
                )));
            }
            tokio::time::sleep(CONNECT_RETRY_EVERY).await;
        }
    }

    /// Publishes the JobSpec `spec` (with a confirm) and returns its job id, giving it one if
    /// it has none. The spec is checked first as the splitter will check it: what it would
    /// reject is [`ClientError::SpecRejected`] naming the field, and nothing is published.
    pub async fn submit(&self, spec: &Value) -> Result<String, ClientError> {
        let checked = checked_value(spec.clone())?;
        self.publish(&checked).await?;
        Ok(checked.job_id)
    }

    /// [`Client::submit`] of a JobSpec as JSON text (a file's contents).
    pub async fn submit_json(&self, body: &[u8]) -> Result<String, ClientError> {
        let checked = checked_spec(body)?;
        self.publish(&checked).await?;
        Ok(checked.job_id)
    }

    /// Publishes a JobSpec already checked ([`checked_spec`]), with a confirm.
    pub async fn publish(&self, spec: &CheckedSpec) -> Result<(), ClientError> {
        self.broker.declare_topology().await?;
        self.broker
            .publisher()
            .await?
            .send(
                &self.broker.names().jobs(),
                KEY_SUBMIT,
                &spec.body,
                json_properties().with_message_id(ShortString::from(spec.job_id.as_str())),
            )
            .await?;
        Ok(())
    }

    /// Submits `spec` and waits until the job ends: its final status (whatever the state;
    /// look at `state`). Waits at most [`ACCEPT_PATIENCE`] for a splitter to take the job.
    pub async fn submit_and_wait(&self, spec: &Value) -> Result<JobStatus, ClientError> {
        let job_id = self.submit(spec).await?;
        self.wait(self.watch_submitted(&job_id)).await
    }

    /// The last status of `statuses` (a watch): the job's final one.
    async fn wait(
        &self,
        mut statuses: BoxStream<'_, Result<JobStatus, ClientError>>,
    ) -> Result<JobStatus, ClientError> {
        let mut last = None;
        while let Some(status) = statuses.next().await {
            last = Some(status?);
        }
        // A watch ends after a terminal status or an error, both handled above.
        last.ok_or_else(|| ClientError::Unexpected("the watch ended without a status".into()))
    }

    /// The statuses of `job_id` as they change, until the job ends: each one newer than the
    /// one before (counts never move back), the last one terminal. Listens on `{ns}.status`
    /// and asks the reducer once a second, so no change is missed for long. A job the
    /// reducer does not know is [`ClientError::UnknownJob`] at once; for a job just submitted
    /// use [`Client::watch_submitted`]. An error ends the stream.
    pub fn watch(&self, job_id: &str) -> BoxStream<'_, Result<JobStatus, ClientError>> {
        stream::watch(self, job_id, None)
    }

    /// [`Client::watch`] of a job just submitted: while no splitter has taken it the reducer
    /// does not know it, which is waited out for [`ACCEPT_PATIENCE`]
    /// ([`ClientError::NotAccepted`] after that).
    pub fn watch_submitted(&self, job_id: &str) -> BoxStream<'_, Result<JobStatus, ClientError>> {
        stream::watch(self, job_id, Some(ACCEPT_PATIENCE))
    }

    /// The job's current status.
    pub async fn status(&self, job_id: &str) -> Result<JobStatus, ClientError> {
        let request = Request::Status {
            job_id: job_id.to_owned(),
        };
        match self.ask(&request).await? {
            Response::Status(status) => Ok(status),
            other => Err(ClientError::from_response(other)),
        }
    }

    /// The outcome of each operation of the job that has one, in index order: a result, or
    /// the operation's error. Read page by page from the reducer as the stream is consumed.
    pub fn results(&self, job_id: &str) -> BoxStream<'_, Result<ResultLine, ClientError>> {
        stream::results(self, job_id, RESULTS_PAGE)
    }

    /// Cancels the job: no new fragments are dispatched and it ends `cancelled`. A job that
    /// has already ended is [`ClientError::AlreadyEnded`], and nothing is published.
    pub async fn cancel(&self, job_id: &str) -> Result<(), ClientError> {
        let current = self.status(job_id).await?;
        if current.state.is_terminal() {
            return Err(ClientError::AlreadyEnded {
                job_id: job_id.to_owned(),
                state: current.state,
            });
        }
        let request = CancelRequest {
            job_id: job_id.to_owned(),
        };
        self.publish_request(KEY_CANCEL, &request).await
    }

    /// Redrives a failed or cancelled job: every operation that has not succeeded runs again
    /// (a RedriveRequest on `{ns}.jobs`, routing key `redrive`). A job in any other state is
    /// [`ClientError::NotRedrivable`], and nothing is published.
    pub async fn redrive(&self, job_id: &str) -> Result<(), ClientError> {
        let current = self.status(job_id).await?;
        if !matches!(current.state, JobState::Failed | JobState::Cancelled) {
            return Err(ClientError::NotRedrivable {
                job_id: job_id.to_owned(),
                state: current.state,
            });
        }
        let request = RedriveRequest {
            job_id: job_id.to_owned(),
        };
        self.publish_request(KEY_REDRIVE, &request).await
    }

    /// Deletes a finished job's status and results now, as retention does later. A job
    /// still running is [`ClientError::StillRunning`].
    pub async fn delete(&self, job_id: &str) -> Result<(), ClientError> {
        let request = Request::Delete {
            job_id: job_id.to_owned(),
        };
        match self.ask(&request).await? {
            Response::Deleted { .. } => Ok(()),
            other => Err(ClientError::from_response(other)),
        }
    }

    /// Jobs the reducer keeps, newest submitted first: only those in `state` (if given)
    /// whose id starts with `prefix` (if given), at most `limit` of them (asked for in pages,
    /// as the reducer answers at most a few hundred at once).
    pub async fn jobs(
        &self,
        state: Option<JobState>,
        prefix: Option<&str>,
        limit: u32,
    ) -> Result<Vec<JobStatus>, ClientError> {
        let wanted = limit as usize;
        let mut jobs: Vec<JobStatus> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut offset = 0u64;
        let mut rpc = self.rpc().await?;
        while jobs.len() < wanted {
            let request = Request::JobsPage {
                state,
                prefix: prefix.map(str::to_owned),
                offset,
                limit: (wanted - jobs.len()) as u32,
            };
            let page = match rpc.call(&request).await? {
                Response::JobsPage(page) => page,
                other => return Err(ClientError::from_response(other)),
            };
            offset += page.jobs.len() as u64;
            let last_page = page.jobs.is_empty() || offset >= page.total;
            // A job submitted between two pages shifts the later ones: keep each job once.
            for job in page.jobs {
                if seen.insert(job.job_id.clone()) {
                    jobs.push(job);
                }
            }
            if last_page {
                break;
            }
        }
        rpc.close().await;
        jobs.truncate(wanted);
        Ok(jobs)
    }

    /// The live workers: what each offers and holds, and when it was last heard from.
    pub async fn workers(&self) -> Result<Vec<WorkerInfo>, ClientError> {
        match self.ask(&Request::Workers).await? {
            Response::Workers { workers } => Ok(workers),
            other => Err(ClientError::from_response(other)),
        }
    }

    /// Whether the splitter and the reducer are alive and their stores work.
    pub async fn health(&self) -> Result<HealthReport, ClientError> {
        match self.ask(&Request::Health).await? {
            Response::Health(report) => Ok(report),
            other => Err(ClientError::from_response(other)),
        }
    }

    /// One question to the reducer, on a channel of its own.
    async fn ask(&self, request: &Request) -> Result<Response, ClientError> {
        let mut rpc = self.rpc().await?;
        let response = rpc.call(request).await;
        rpc.close().await;
        Ok(response?)
    }

    /// A channel for questions to the reducer.
    async fn rpc(&self) -> Result<RpcClient, ClientError> {
        Ok(RpcClient::connect(&self.broker, self.timeout).await?)
    }

    /// Publishes `request` on `{ns}.jobs` under `key`, with a confirm.
    async fn publish_request<T: serde::Serialize>(
        &self,
        key: &str,
        request: &T,
    ) -> Result<(), ClientError> {
        self.broker.declare_topology().await?;
        self.broker
            .publisher()
            .await?
            .send_json(&self.broker.names().jobs(), key, request)
            .await?;
        Ok(())
    }
}

/// One line for a refused connection: the cause first, then the broker's own words and the
/// URL (without its password).
fn refusal_line(error: &common::broker::BrokerError) -> String {
    match error.refusal() {
        Some(cause) => format!("{cause}; {}", error.to_string().replace('\n', " ")),
        None => error.to_string(),
    }
}
