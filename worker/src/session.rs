//! One broker session of a worker: a consumer per operation it offers, a task per delivered
//! fragment, and, on a graceful stop, the drain that hands back every fragment the broker
//! already sent instead of leaving it to be requeued.

use std::sync::Arc;
use std::time::Duration;

use common::broker::{Broker, BrokerError, Publisher, answered, json_properties};
use common::consume::consume;
use common::lapin::Channel;
use common::lapin::message::Delivery;
use common::lapin::options::{BasicAckOptions, BasicCancelOptions};
use common::lapin::types::{AMQPValue, LongString, ShortString};
use common::topology::{KEY_REDUCER, Names, declare_work_queue};
use common::wire::Fragment;
use futures::StreamExt;
use futures::stream::{BoxStream, SelectAll};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::runner::run_fragment;
use crate::{WorkerError, WorkerState};

/// Longest a graceful stop waits for the broker to confirm the cancellation of every consumer
/// (and so to have handed over all it sent before). Past it, what is still on its way is left
/// to the broker, which requeues it when the channel closes.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// The deliveries of every operation queue, each stream ending in `ConsumerEnded`.
type Deliveries = SelectAll<BoxStream<'static, Result<Delivery, BrokerError>>>;

/// The consumers of one session: their channel, their tags and their deliveries.
struct Consumers {
    channel: Channel,
    tags: Vec<String>,
    deliveries: Deliveries,
}

/// Runs one session until `shutdown` (then stops gracefully) or until the session breaks.
pub(crate) async fn run(
    broker: &Broker,
    state: &Arc<WorkerState>,
    shutdown: &CancellationToken,
) -> Result<(), WorkerError> {
    broker.declare_topology().await?;
    let names = broker.names().clone();
    let session = broker.session().await?;
    let publisher = session.publisher().await?;
    // Tasks report broker failures here; one ends the session.
    let (failed_tx, mut failed_rx) = mpsc::channel::<BrokerError>(1);
    let mut consumers = Consumers::start(&session, &names, state).await?;
    let control = crate::control::listen(&session, &names, state, failed_tx.clone()).await?;
    tracing::info!(worker = %state.id, queues = consumers.tags.len(), "consuming");

    let tracker = TaskTracker::new();
    let fragments = FragmentTasks {
        publisher: publisher.clone(),
        names: names.clone(),
        state: Arc::clone(state),
        running: Arc::new(Semaphore::new(usize::from(state.prefetch))),
        // Cancelled on shutdown, and when the session breaks: fragments in hand then stop at
        // their next operation boundary instead of running on for a report that cannot be
        // sent.
        stop: shutdown.child_token(),
        failed: failed_tx.clone(),
    };
    let heartbeat = tokio::spawn(crate::heartbeat::publish(
        publisher.clone(),
        names.clone(),
        Arc::clone(state),
        fragments.stop.clone(),
        failed_tx,
    ));

    let result = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            Some(error) = failed_rx.recv() => break Err(WorkerError::from(error)),
            next = consumers.deliveries.next() => match next {
                Some(Ok(delivery)) => fragments.spawn(&tracker, delivery),
                Some(Err(e)) => break Err(e.into()),
                None => break Err(BrokerError::ConsumerEnded.into()),
            },
        }
    };

    if result.is_ok() {
        consumers.drain(&fragments, &tracker).await;
    } else {
        // What is in hand cannot be acknowledged on a broken session: stop it at once; the
        // broker hands the fragments out again.
        fragments.stop.cancel();
    }
    tracker.close();
    tracker.wait().await;
    fragments.stop.cancel();
    heartbeat.abort();
    control.abort();
    let _ = consumers.channel.close(200, "worker stopping".into()).await;
    let _ = publisher
        .channel()
        .close(200, "worker stopping".into())
        .await;
    result
}

impl Consumers {
    /// Declares the work queue of every operation the worker offers and consumes it, on one
    /// channel whose prefetch bounds what the worker holds.
    async fn start(
        session: &common::broker::Session,
        names: &Names,
        state: &WorkerState,
    ) -> Result<Self, BrokerError> {
        let channel = session.consumer_channel(state.prefetch).await?;
        let mut streams = Vec::new();
        let mut tags = Vec::new();
        for operation in state.registry.names() {
            let queue = names.work_queue(&operation);
            answered(
                &format!("the declaration of {queue}"),
                declare_work_queue(&channel, names, &operation),
            )
            .await?;
            let tag = format!("{}:{operation}", state.id);
            let consumer = consume(&channel, &queue, &tag).await?;
            // `select_all` silently drops a stream that ends; an operation whose consumer the
            // broker cancelled would never be served again. Its end ends the session instead.
            streams.push(
                consumer
                    .map(|next| next.map_err(BrokerError::from))
                    .chain(futures::stream::once(async {
                        Err(BrokerError::ConsumerEnded)
                    }))
                    .boxed(),
            );
            tags.push(tag);
        }
        Ok(Self {
            channel,
            tags,
            deliveries: futures::stream::select_all(streams),
        })
    }

    /// Graceful stop: take no new work, and hand back (report with nothing run) every
    /// fragment the broker already sent, rather than leave it to be requeued, which would
    /// count against its delivery limit. A consumer's stream ends after the broker's
    /// cancel-ok, which comes after every delivery sent to it; the drain waits for all of
    /// them, since one consumer ending says nothing of the deliveries of the others.
    async fn drain(&mut self, fragments: &FragmentTasks, tracker: &TaskTracker) {
        for tag in &self.tags {
            let cancel = self
                .channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default());
            if let Err(error) = answered(&format!("basic.cancel of {tag}"), cancel).await {
                tracing::warn!(%tag, %error, "cancelling a consumer failed");
            }
        }
        let deadline = tokio::time::Instant::now() + DRAIN_LIMIT;
        let mut ended = 0;
        let mut handed_back = 0u64;
        while ended < self.tags.len() {
            match tokio::time::timeout_at(deadline, self.deliveries.next()).await {
                Ok(Some(Ok(delivery))) => {
                    handed_back += 1;
                    fragments.spawn(tracker, delivery);
                }
                Ok(Some(Err(BrokerError::ConsumerEnded))) => ended += 1,
                Ok(Some(Err(error))) => {
                    tracing::warn!(%error, "the channel failed while draining; the broker requeues what it still held");
                    break;
                }
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(
                        limit_s = DRAIN_LIMIT.as_secs(),
                        "not every consumer's cancellation was confirmed in time; the broker requeues what it still held"
                    );
                    break;
                }
            }
        }
        tracing::info!(
            handed_back,
            "consumers cancelled; fragments received meanwhile are handed back"
        );
    }
}

/// What the task of every delivered fragment shares.
struct FragmentTasks {
    publisher: Publisher,
    names: Names,
    state: Arc<WorkerState>,
    /// Permits for the fragments that run at once (`prefetch`).
    running: Arc<Semaphore>,
    /// Cuts every running fragment at its next operation boundary.
    stop: CancellationToken,
    failed: mpsc::Sender<BrokerError>,
}

impl FragmentTasks {
    /// Runs `delivery` in a task of `tracker`, once a permit is free.
    fn spawn(&self, tracker: &TaskTracker, delivery: Delivery) {
        let publisher = self.publisher.clone();
        let names = self.names.clone();
        let state = Arc::clone(&self.state);
        let running = Arc::clone(&self.running);
        let stop = self.stop.clone();
        let failed = self.failed.clone();
        // Fragments are published with their operation as routing key.
        let operation = delivery.routing_key.as_str().to_owned();
        state.hold(&operation, true);
        tracker.spawn(async move {
            let outcome = match running.acquire_owned().await {
                Ok(_permit) => handle_fragment(&delivery, &publisher, &names, &state, &stop).await,
                Err(_) => Ok(()),
            };
            state.hold(&operation, false);
            if let Err(error) = outcome {
                tracing::warn!(error = %error, "fragment not acknowledged; the broker will redeliver it");
                let _ = failed.try_send(error);
            }
        });
    }
}

/// Runs one delivered fragment, publishes its report (confirmed), then acks it. `stop` cuts
/// the fragment at its next operation boundary.
async fn handle_fragment(
    delivery: &Delivery,
    publisher: &Publisher,
    names: &Names,
    state: &WorkerState,
    stop: &CancellationToken,
) -> Result<(), BrokerError> {
    let fragment: Fragment = match serde_json::from_slice(&delivery.data) {
        Ok(fragment) => fragment,
        Err(e) => {
            return dead_letter(delivery, publisher, names, &format!("not a fragment: {e}")).await;
        }
    };
    let Some(operation) = state.registry.get(&fragment.operation) else {
        let reason = format!(
            "operation {:?} is not offered by this worker",
            fragment.operation
        );
        return dead_letter(delivery, publisher, names, &reason).await;
    };
    let report = run_fragment(
        &fragment,
        operation.as_ref(),
        &state.id,
        &state.cancelled,
        stop,
    )
    .await;
    tracing::debug!(job_id = %report.job_id, fragment = report.fragment, done = report.done, cut = ?report.cut, "fragment ended");
    metrics::counter!("batchq_worker_fragments_total", "operation" => fragment.operation.clone())
        .increment(1);
    metrics::counter!("batchq_worker_operations_total", "operation" => fragment.operation.clone())
        .increment(u64::from(report.done));
    let body = serde_json::to_vec(&common::wire::ReducerInput::Fragment(report))?;
    publisher
        .start_with(&names.events(), KEY_REDUCER, &body, json_properties(), true)
        .await?
        .wait()
        .await?;
    delivery.acker.ack(BasicAckOptions::default()).await?;
    Ok(())
}

/// Keeps an undecodable message on `{ns}.dead` with the reason, and takes it off the queue.
async fn dead_letter(
    delivery: &Delivery,
    publisher: &Publisher,
    names: &Names,
    reason: &str,
) -> Result<(), BrokerError> {
    tracing::warn!(%reason, "fragment message kept on the dead-letter queue");
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert(
        ShortString::from("x-batchq-error"),
        AMQPValue::LongString(LongString::from(reason)),
    );
    let properties = delivery.properties.clone().with_headers(headers);
    publisher
        .start_with(
            &names.dead(),
            delivery.routing_key.as_str(),
            &delivery.data,
            properties,
            true,
        )
        .await?
        .wait()
        .await?;
    delivery.acker.ack(BasicAckOptions::default()).await?;
    Ok(())
}
