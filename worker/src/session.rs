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
use common::topology::{KEY_REDUCER, Names, declare_work_queue};
use common::wire::Fragment;
use futures::StreamExt;
use futures::stream::{BoxStream, SelectAll};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::budget::{SessionBudget, Taken, consumer_prefetch};
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
    /// What is left of `--max-fragments` in this session; `None` without the setting.
    budget: Option<Arc<SessionBudget>>,
}

/// Runs one session until `shutdown` (then stops gracefully) or until the session breaks.
pub(crate) async fn run(
    broker: &Broker,
    state: &Arc<WorkerState>,
    shutdown: &CancellationToken,
) -> Result<(), WorkerError> {
    // A worker that already ran its `--max-fragments` (in an earlier session) takes no more.
    let remaining = state.fragments_left();
    if remaining == Some(0) {
        return Ok(());
    }
    broker.declare_topology().await?;
    let names = broker.names().clone();
    let session = broker.session().await?;
    let publisher = session.publisher().await?;
    // Tasks report broker failures here; one ends the session.
    let (failed_tx, mut failed_rx) = mpsc::channel::<BrokerError>(1);
    let mut consumers = Consumers::start(&session, &names, state, remaining).await?;
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
        shutdown: shutdown.clone(),
        consumers_cancelled: CancellationToken::new(),
        failed: failed_tx.clone(),
        budget: consumers.budget.clone(),
    };
    // Never fires for a worker without `--max-fragments`.
    let exhausted = consumers
        .budget
        .as_ref()
        .map_or_else(CancellationToken::new, |budget| budget.exhausted().clone());
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
            // The rest of the budget is in hand: stop consuming as on SIGTERM, but let the
            // fragments in hand run to their end.
            _ = exhausted.cancelled() => {
                tracing::info!(worker = %state.id, "max fragments in hand; no more are taken");
                break Ok(());
            }
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
        fragments.consumers_cancelled.cancel();
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
    /// channel whose prefetch bounds what the worker holds: no more than the `remaining`
    /// fragments of `--max-fragments`, when it is set.
    async fn start(
        session: &common::broker::Session,
        names: &Names,
        state: &WorkerState,
        remaining: Option<u64>,
    ) -> Result<Self, BrokerError> {
        let operations = state.registry.names();
        let prefetch = remaining.map_or(state.prefetch, |remaining| {
            consumer_prefetch(state.prefetch, remaining, operations.len())
        });
        let budget = remaining.map(|remaining| {
            let window = u64::from(prefetch) * operations.len() as u64;
            Arc::new(SessionBudget::new(remaining, window))
        });
        let channel = session.consumer_channel(prefetch).await?;
        let mut streams = Vec::new();
        let mut tags = Vec::new();
        for operation in operations {
            let queue = names.work_queue(&operation);
            answered(
                &format!("the declaration of {queue}"),
                declare_work_queue(session.consume_connection(), names, &operation),
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
            budget,
        })
    }

    /// Graceful stop: take no new work, and hand back (report with nothing run) every
    /// fragment the broker already sent, rather than leave it to be requeued, which would
    /// count against its delivery limit.
    async fn drain(&mut self, fragments: &FragmentTasks, tracker: &TaskTracker) {
        for tag in &self.tags {
            let cancel = self
                .channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default());
            if let Err(error) = answered(&format!("basic.cancel of {tag}"), cancel).await {
                tracing::warn!(%tag, %error, "cancelling a consumer failed");
            }
        }
        // The broker sends nothing more: the acks held meanwhile may go.
        fragments.consumers_cancelled.cancel();
        let deadline = tokio::time::Instant::now() + DRAIN_LIMIT;
        let (handed_back, end) = take_until_ended(
            &mut self.deliveries,
            self.tags.len(),
            deadline,
            |delivery| fragments.spawn(tracker, delivery),
        )
        .await;
        match end {
            DrainEnd::AllEnded => {}
            DrainEnd::Failed(error) => {
                tracing::warn!(%error, "the channel failed while draining; the broker requeues what it still held")
            }
            DrainEnd::TimedOut => tracing::warn!(
                limit_s = DRAIN_LIMIT.as_secs(),
                "not every consumer's cancellation was confirmed in time; the broker requeues what it still held"
            ),
        }
        tracing::info!(
            handed_back,
            "consumers cancelled; fragments received meanwhile are handed back"
        );
    }
}

/// How a drain ended.
#[derive(Debug)]
enum DrainEnd {
    /// Every consumer's stream ended: the broker sent all it will.
    AllEnded,
    /// A stream failed (the channel closed): the broker requeues what it still held.
    Failed(BrokerError),
    /// The deadline passed first.
    TimedOut,
}

/// Passes every delivery of `streams` to `take` until `consumers` streams have ended (each
/// ends with one `ConsumerEnded`, after the broker's cancel-ok, which follows everything
/// sent to it), or until `deadline`. One stream ending says nothing of what the others
/// still buffer, so the drain goes on until all have. Returns the deliveries taken.
async fn take_until_ended<T>(
    streams: &mut SelectAll<BoxStream<'static, Result<T, BrokerError>>>,
    consumers: usize,
    deadline: tokio::time::Instant,
    mut take: impl FnMut(T),
) -> (u64, DrainEnd) {
    let mut taken = 0;
    let mut ended = 0;
    while ended < consumers {
        match tokio::time::timeout_at(deadline, streams.next()).await {
            Ok(Some(Ok(delivery))) => {
                taken += 1;
                take(delivery);
            }
            Ok(Some(Err(BrokerError::ConsumerEnded))) => ended += 1,
            Ok(Some(Err(error))) => return (taken, DrainEnd::Failed(error)),
            Ok(None) => break,
            Err(_) => return (taken, DrainEnd::TimedOut),
        }
    }
    (taken, DrainEnd::AllEnded)
}

/// What the task of every delivered fragment shares.
#[derive(Clone)]
struct FragmentTasks {
    publisher: Publisher,
    names: Names,
    state: Arc<WorkerState>,
    /// Permits for the fragments that run at once (`prefetch`).
    running: Arc<Semaphore>,
    /// Cuts every running fragment at its next operation boundary.
    stop: CancellationToken,
    /// The session's shutdown: once it fires, acks wait for `consumers_cancelled`.
    shutdown: CancellationToken,
    /// Every consumer of the session is cancelled (or the session broke). Until then, on a
    /// graceful stop, acks are held: an ack frees a prefetch slot, and a delivery the broker
    /// sends into it while the consumer is being cancelled may be returned by the broker
    /// itself (a quorum queue does so for deliveries in flight), marked redelivered.
    consumers_cancelled: CancellationToken,
    failed: mpsc::Sender<BrokerError>,
    /// `--max-fragments` in this session; `None` without the setting.
    budget: Option<Arc<SessionBudget>>,
}

impl FragmentTasks {
    /// Runs `delivery` in a task of `tracker`, once a permit is free.
    fn spawn(&self, tracker: &TaskTracker, delivery: Delivery) {
        let tasks = self.clone();
        // Fragments are published with their operation as routing key.
        let operation = delivery.routing_key.as_str().to_owned();
        if delivery.redelivered {
            // Handed out before and returned (a worker died or a session broke): each return
            // counts against the work queue's delivery limit.
            tracing::info!(%operation, "a fragment came back from the broker and is delivered again");
        }
        let taken = self
            .budget
            .as_ref()
            .map_or(Taken::Counted, |budget| budget.take());
        // A delivery past the budget runs with its stop already given: it reports nothing
        // run, which hands it back to the splitter without a broker requeue.
        let stop = match taken {
            Taken::Counted => self.stop.clone(),
            Taken::Excess => {
                tracing::info!("a fragment past --max-fragments is handed back unrun");
                let stopped = CancellationToken::new();
                stopped.cancel();
                stopped
            }
        };
        tasks.state.hold(&operation, true);
        tracker.spawn(async move {
            // Whether the fragment was settled (reported and acknowledged).
            let outcome = match Arc::clone(&tasks.running).acquire_owned().await {
                Ok(_permit) => handle_fragment(&delivery, &tasks, &stop)
                    .await
                    .map(|()| true),
                Err(_) => Ok(false),
            };
            tasks.state.hold(&operation, false);
            if matches!(outcome, Ok(true)) && taken == Taken::Counted {
                tasks.state.fragment_settled();
            }
            if let Err(error) = outcome {
                tracing::warn!(error = %error, "fragment not acknowledged; the broker will redeliver it");
                let _ = tasks.failed.try_send(error);
            }
        });
    }

    /// Acknowledges `delivery`, once the consumers are cancelled if the session is stopping,
    /// or if the room the acknowledgement gives the broker would let it send past
    /// `--max-fragments` (which then stops the consuming).
    async fn ack(&self, delivery: &Delivery) -> Result<(), BrokerError> {
        let past_budget = self
            .budget
            .as_ref()
            .is_some_and(|budget| !budget.release_ack());
        if self.shutdown.is_cancelled() || past_budget {
            self.consumers_cancelled.cancelled().await;
        }
        delivery.acker.ack(BasicAckOptions::default()).await?;
        Ok(())
    }
}

/// Runs one delivered fragment, publishes its report (confirmed), then acks it. `stop` cuts
/// the fragment at its next operation boundary.
async fn handle_fragment(
    delivery: &Delivery,
    tasks: &FragmentTasks,
    stop: &CancellationToken,
) -> Result<(), BrokerError> {
    let fragment: Fragment = match serde_json::from_slice(&delivery.data) {
        Ok(fragment) => fragment,
        Err(e) => {
            return dead_letter(delivery, tasks, &format!("not a fragment: {e}")).await;
        }
    };
    let Some(operation) = tasks.state.registry.get(&fragment.operation) else {
        let reason = format!(
            "operation {:?} is not offered by this worker",
            fragment.operation
        );
        return dead_letter(delivery, tasks, &reason).await;
    };
    let report = run_fragment(
        &fragment,
        operation.as_ref(),
        &tasks.state.id,
        &tasks.state.cancelled,
        stop,
    )
    .await;
    tracing::debug!(job_id = %report.job_id, fragment = report.fragment, done = report.done, cut = ?report.cut, "fragment ended");
    metrics::counter!("batchq_worker_fragments_total", "operation" => fragment.operation.clone())
        .increment(1);
    metrics::counter!("batchq_worker_operations_total", "operation" => fragment.operation.clone())
        .increment(u64::from(report.done));
    let body = serde_json::to_vec(&common::wire::ReducerInput::Fragment(report))?;
    tasks
        .publisher
        .start_with(
            &tasks.names.events(),
            KEY_REDUCER,
            &body,
            json_properties(),
            true,
        )
        .await?
        .wait()
        .await?;
    tasks.ack(delivery).await
}

/// Keeps an undecodable message on `{ns}.dead` with the reason, and takes it off the queue.
async fn dead_letter(
    delivery: &Delivery,
    tasks: &FragmentTasks,
    reason: &str,
) -> Result<(), BrokerError> {
    tracing::warn!(%reason, "fragment message kept on the dead-letter queue");
    common::dead::keep(&tasks.publisher, &tasks.names, delivery, reason, None).await?;
    tasks.ack(delivery).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::stream;

    /// A consumer's stream as the session builds it: its deliveries, then `ConsumerEnded`.
    fn consumer(deliveries: Vec<u32>) -> BoxStream<'static, Result<u32, BrokerError>> {
        stream::iter(deliveries.into_iter().map(Ok))
            .chain(stream::once(async { Err(BrokerError::ConsumerEnded) }))
            .boxed()
    }

    fn in_a_second() -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_secs(1)
    }

    #[tokio::test]
    async fn the_drain_takes_what_every_consumer_holds_after_one_has_ended() {
        // The first consumer has ended (its cancel-ok came) while the others still hold
        // deliveries: stopping there left those to the broker to requeue.
        let mut streams = futures::stream::select_all([
            consumer(vec![]),
            consumer(vec![1, 2, 3]),
            consumer(vec![]),
            consumer(vec![4]),
        ]);
        let mut taken = Vec::new();
        let (count, end) =
            take_until_ended(&mut streams, 4, in_a_second(), |d| taken.push(d)).await;
        taken.sort_unstable();
        assert_eq!(taken, [1, 2, 3, 4]);
        assert_eq!(count, 4);
        assert!(matches!(end, DrainEnd::AllEnded), "{end:?}");
    }

    #[tokio::test]
    async fn the_drain_stops_at_its_deadline_or_a_failed_channel() {
        let never_ends: BoxStream<'static, Result<u32, BrokerError>> =
            stream::iter([Ok(7)]).chain(stream::pending()).boxed();
        let mut streams = futures::stream::select_all([consumer(vec![]), never_ends]);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(50);
        let mut taken = Vec::new();
        let (count, end) = take_until_ended(&mut streams, 2, deadline, |d| taken.push(d)).await;
        assert_eq!((count, taken), (1, vec![7]));
        assert!(matches!(end, DrainEnd::TimedOut), "{end:?}");

        let ended: BoxStream<'static, Result<u32, BrokerError>> =
            stream::iter([Err(BrokerError::ConsumerEnded)]).boxed();
        let broken: BoxStream<'static, Result<u32, BrokerError>> =
            stream::iter([Err(BrokerError::NoAnswer {
                what: "basic.cancel".into(),
                secs: 30,
            })])
            .boxed();
        let mut streams = futures::stream::select_all([ended, broken]);
        let (count, end) = take_until_ended(&mut streams, 2, in_a_second(), |_| {}).await;
        assert_eq!(count, 0);
        assert!(matches!(end, DrainEnd::Failed(_)), "{end:?}");
    }
}
