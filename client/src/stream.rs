//! The client's streams: a job's statuses until it ends, and its results page by page.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use common::broker::BrokerError;
use common::contract::{JobState, JobStatus, ResultLine};
use common::lapin::{Channel, Consumer};
use common::rpc::RpcClient;
use common::wire::{Request, Response};
use futures::StreamExt;
use futures::stream::BoxStream;

use crate::{Client, ClientError};

/// How often a watch asks the reducer, besides listening: a status missed while the
/// subscription was being set up, or one published while it was away, comes within this.
const POLL_EVERY: Duration = Duration::from_secs(1);

/// What a watch listens and asks on.
struct Listening {
    /// Holds the private queue of the subscription (deleted with the channel).
    _channel: Channel,
    updates: Consumer,
    rpc: RpcClient,
    poll: tokio::time::Interval,
}

/// A watch between two statuses.
struct Watch<'a> {
    client: &'a Client,
    job_id: String,
    /// How long an unknown job is waited for (a job just submitted), if at all.
    accept_patience: Option<Duration>,
    started: Instant,
    listening: Option<Listening>,
    latest: Option<JobStatus>,
    ended: bool,
}

pub(crate) fn watch<'a>(
    client: &'a Client,
    job_id: &str,
    accept_patience: Option<Duration>,
) -> BoxStream<'a, Result<JobStatus, ClientError>> {
    let watch = Watch {
        client,
        job_id: job_id.to_owned(),
        accept_patience,
        started: Instant::now(),
        listening: None,
        latest: None,
        ended: false,
    };
    futures::stream::unfold(watch, |mut watch| async move {
        if watch.ended {
            return None;
        }
        let next = watch.next().await;
        watch.ended = next.as_ref().map_or(true, |s| s.state.is_terminal());
        if watch.ended {
            // Closes the channel, and with it the subscription's queue, now rather than
            // when the stream is dropped.
            watch.listening = None;
        }
        Some((next, watch))
    })
    .boxed()
}

impl Watch<'_> {
    /// The next status that is news.
    async fn next(&mut self) -> Result<JobStatus, ClientError> {
        let listening = match &mut self.listening {
            Some(listening) => listening,
            none => none.insert(listen(self.client, &self.job_id).await?),
        };
        loop {
            let update = tokio::select! {
                delivery = listening.updates.next() => match delivery {
                    Some(Ok(d)) => serde_json::from_slice::<JobStatus>(&d.data).ok(),
                    Some(Err(e)) => return Err(BrokerError::from(e).into()),
                    None => return Err(BrokerError::ConsumerEnded.into()),
                },
                _ = listening.poll.tick() => {
                    query(self.client, &mut listening.rpc, &self.job_id, self.accept_patience, self.started).await?
                }
            };
            if let Some(status) = update
                && is_news(self.latest.as_ref(), &status)
            {
                self.latest = Some(status.clone());
                return Ok(status);
            }
        }
    }
}

/// Subscribes to the job's statuses, then opens the channel for questions: subscribing
/// first means no change falls between the first answer and the first update.
async fn listen(client: &Client, job_id: &str) -> Result<Listening, ClientError> {
    let broker = client.broker();
    let channel = broker.channel().await?;
    let updates = common::consume::subscribe(
        &channel,
        &broker.names().status(),
        &format!("job.{job_id}.*"),
        "",
    )
    .await?;
    let rpc = client.rpc().await?;
    Ok(Listening {
        _channel: channel,
        updates,
        rpc,
        poll: tokio::time::interval(POLL_EVERY),
    })
}

/// The job's status as the reducer has it; `None` while a job just submitted is unknown.
async fn query(
    client: &Client,
    rpc: &mut RpcClient,
    job_id: &str,
    accept_patience: Option<Duration>,
    started: Instant,
) -> Result<Option<JobStatus>, ClientError> {
    let request = Request::Status {
        job_id: job_id.to_owned(),
    };
    match rpc.call(&request).await? {
        Response::Status(status) => Ok(Some(status)),
        Response::NotFound { .. } => match accept_patience {
            Some(patience) if started.elapsed() < patience => Ok(None),
            Some(patience) => Err(ClientError::NotAccepted {
                job_id: job_id.to_owned(),
                secs: patience.as_secs(),
                queue: client.broker().names().jobs(),
            }),
            None => Err(ClientError::UnknownJob(job_id.to_owned())),
        },
        other => Err(ClientError::from_response(other)),
    }
}

/// Whether `status` tells more than `latest`: a first status, the end, or counts that grew.
/// Counts only grow, so an older record arriving late (a poll's answer overtaken by an
/// update) is not news, and neither is the same status again.
fn is_news(latest: Option<&JobStatus>, status: &JobStatus) -> bool {
    let Some(latest) = latest else {
        return true;
    };
    if latest == status || latest.state.is_terminal() {
        return false;
    }
    let done = |s: &JobStatus| s.ops_succeeded + s.ops_failed;
    status.state.is_terminal()
        || done(status) > done(latest)
        || (done(status) == done(latest)
            && latest.state == JobState::Accepted
            && status.state == JobState::Running)
}

/// Where a results stream is.
struct Results<'a> {
    client: &'a Client,
    job_id: String,
    page: u32,
    rpc: Option<RpcClient>,
    /// Where the next page starts; `None` once the last page was read.
    from: Option<u64>,
    lines: VecDeque<ResultLine>,
}

pub(crate) fn results<'a>(
    client: &'a Client,
    job_id: &str,
    page: u32,
) -> BoxStream<'a, Result<ResultLine, ClientError>> {
    let results = Results {
        client,
        job_id: job_id.to_owned(),
        page,
        rpc: None,
        from: Some(0),
        lines: VecDeque::new(),
    };
    futures::stream::unfold(results, |mut results| async move {
        loop {
            if let Some(line) = results.lines.pop_front() {
                return Some((Ok(line), results));
            }
            let from = results.from?;
            if let Err(e) = results.read_page(from).await {
                // An error ends the stream.
                results.from = None;
                return Some((Err(e), results));
            }
        }
    })
    .boxed()
}

impl Results<'_> {
    /// Reads the page that starts at index `from`.
    async fn read_page(&mut self, from: u64) -> Result<(), ClientError> {
        let rpc = match &mut self.rpc {
            Some(rpc) => rpc,
            none => none.insert(self.client.rpc().await?),
        };
        let request = Request::Results {
            job_id: self.job_id.clone(),
            from,
            limit: self.page,
        };
        match rpc.call(&request).await? {
            Response::Results(page) => {
                self.lines.extend(page.lines);
                self.from = page.next;
                if self.from.is_none() {
                    self.rpc = None;
                }
                Ok(())
            }
            other => Err(ClientError::from_response(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A status of job `j` (from JSON, as the client reads it off the wire).
    fn status(state: JobState, succeeded: u64, failed: u64) -> JobStatus {
        serde_json::from_value(serde_json::json!({
            "job_id": "j",
            "state": state,
            "operation": "noop",
            "ops_total": 10,
            "ops_succeeded": succeeded,
            "ops_failed": failed,
            "fragments_done": 0,
            "fragments_in_flight": 0,
            "submitted_at": null,
            "started_at": null,
            "finished_at": null,
            "error": null,
        }))
        .expect("a JobStatus")
    }

    #[test]
    fn only_newer_statuses_are_news() {
        let running = status(JobState::Running, 3, 1);
        assert!(is_news(None, &running));
        assert!(!is_news(Some(&running), &running), "the same again");
        assert!(
            !is_news(Some(&running), &status(JobState::Running, 2, 1)),
            "counts moved back"
        );
        assert!(is_news(Some(&running), &status(JobState::Running, 4, 1)));
        assert!(is_news(
            Some(&status(JobState::Accepted, 0, 0)),
            &status(JobState::Running, 0, 0)
        ));
        let done = status(JobState::Succeeded, 10, 0);
        assert!(is_news(Some(&running), &done));
        assert!(
            !is_news(Some(&done), &status(JobState::Running, 9, 0)),
            "after the end"
        );
    }
}
