//! A session's reports to the reducer. Each fragment task hands its report over and waits
//! for the broker's confirm; one task publishes them, taking every report that queued up
//! while it published the last message into the next one (up to [`MAX_GROUP`] reports and
//! [`MAX_GROUP_BYTES`]). When fragments end one at a time each report is a message of its
//! own, as before; when many end together (short fragments, a large prefetch) the broker
//! handles one message for several reports: a report per fragment was half of what a
//! fragment cost it. The confirms are awaited beside the publishing, so the next message does
//! not wait for the last one's.

use common::broker::{BrokerError, PendingConfirm, Publisher, json_properties};
use common::topology::{KEY_REDUCER, Names};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Most reports in one message.
const MAX_GROUP: usize = 64;
/// Most bytes of reports in one message, unless one report alone is larger (it goes alone).
const MAX_GROUP_BYTES: usize = 256 * 1024;

/// One report waiting to be published, and who waits for its confirm.
struct Queued {
    body: Vec<u8>,
    confirmed: oneshot::Sender<Result<(), String>>,
}

/// The reporting side of a session; dropping every clone ends its task.
#[derive(Clone)]
pub(crate) struct Reporter {
    queue: mpsc::UnboundedSender<Queued>,
}

impl Reporter {
    /// Starts the task that publishes the session's reports on `publisher`.
    pub(crate) fn start(publisher: Publisher, names: Names) -> (Self, JoinHandle<()>) {
        let (queue, receiver) = mpsc::unbounded_channel();
        let task = tokio::spawn(publish(publisher, names, receiver));
        (Self { queue }, task)
    }

    /// Publishes `report` (a [`common::wire::FragmentReport`], encoded) and waits for the
    /// broker's confirm of the message that holds it.
    pub(crate) async fn report(&self, report: Vec<u8>) -> Result<(), BrokerError> {
        let (confirmed, outcome) = oneshot::channel();
        self.queue
            .send(Queued {
                body: report,
                confirmed,
            })
            .map_err(|_| BrokerError::ConsumerEnded)?;
        match outcome.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(BrokerError::Failed {
                what: "publishing a fragment's report".to_owned(),
                reason,
            }),
            Err(_) => Err(BrokerError::ConsumerEnded),
        }
    }
}

async fn publish(
    publisher: Publisher,
    names: Names,
    mut receiver: mpsc::UnboundedReceiver<Queued>,
) {
    let exchange = names.events();
    while let Some(first) = receiver.recv().await {
        let mut bytes = first.body.len();
        let mut group = vec![first];
        while group.len() < MAX_GROUP && bytes < MAX_GROUP_BYTES {
            match receiver.try_recv() {
                Ok(next) => {
                    bytes += next.body.len();
                    group.push(next);
                }
                Err(_) => break,
            }
        }
        let (bodies, waiting): (Vec<Vec<u8>>, Vec<_>) =
            group.into_iter().map(|q| (q.body, q.confirmed)).unzip();
        let message = common::wire::encode_reports(&bodies);
        drop(bodies);
        let started = publisher
            .start_with(&exchange, KEY_REDUCER, &message, json_properties(), true)
            .await;
        match started {
            Ok(pending) => {
                tokio::spawn(answer(pending, waiting));
            }
            Err(error) => tell(waiting, Err(error.to_string())),
        }
    }
}

/// Waits for one message's confirm and tells each report's task.
async fn answer(pending: PendingConfirm, waiting: Vec<oneshot::Sender<Result<(), String>>>) {
    let outcome = pending.wait().await.map_err(|e| e.to_string());
    tell(waiting, outcome);
}

fn tell(waiting: Vec<oneshot::Sender<Result<(), String>>>, outcome: Result<(), String>) {
    for task in waiting {
        let _ = task.send(outcome.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::broker::Broker;
    use common::config::BrokerArgs;
    use common::lapin::options::BasicGetOptions;
    use common::wire::{FragmentReport, Indices, ReducerInput};

    fn report(fragment: u64) -> Vec<u8> {
        serde_json::to_vec(&FragmentReport {
            job_id: "j".into(),
            fragment,
            operation: "noop".into(),
            attempt: 1,
            worker: "w".into(),
            indices: Indices::Span(fragment, fragment + 1),
            done: 1,
            failures: vec![],
            results: vec![],
            cut: None,
            started_at_ms: 1,
            elapsed_us: 1,
            measurements: Default::default(),
            round: 0,
        })
        .expect("encodes")
    }

    /// Reports handed over while none is being published yet share one message; each task
    /// hears its report confirmed, and the reducer's queue holds every report once. Needs the
    /// broker of `AMQP_URL` (as the integration tests do), in a namespace of its own.
    #[tokio::test]
    async fn reports_that_queue_up_share_a_message() {
        let url = std::env::var("AMQP_URL")
            .unwrap_or_else(|_| common::config::DEFAULT_AMQP_URL.to_owned());
        let ns = format!(
            "test-reporter-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let broker =
            Broker::new(&BrokerArgs::new(url.as_str(), ns.as_str()), "test").expect("broker");
        broker.declare_topology().await.expect("topology");
        let publisher = broker.publisher().await.expect("publisher");
        let (reporter, task) = Reporter::start(publisher, broker.names().clone());
        // Handed over together: all are queued before the publishing task first runs (this
        // test's runtime has one thread).
        let confirmed =
            futures::future::join_all((0..40).map(|f| reporter.report(report(f)))).await;
        assert!(confirmed.iter().all(Result::is_ok), "{confirmed:?}");

        let channel = broker.channel().await.expect("channel");
        let (mut messages, mut fragments) = (0, Vec::new());
        while let Some(message) = channel
            .basic_get(
                broker.names().reducer_queue().as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .expect("basic.get")
        {
            messages += 1;
            for input in common::wire::decode_reducer_message(&message.delivery.data)
                .expect("a reducer message")
            {
                let ReducerInput::Fragment(report) = input else {
                    panic!("not a report: {input:?}");
                };
                fragments.push(report.fragment);
            }
        }
        task.abort();
        common::topology::delete(&channel, broker.names(), &[])
            .await
            .expect("cleanup");
        fragments.sort_unstable();
        assert_eq!(
            fragments,
            (0..40).collect::<Vec<u64>>(),
            "every report once"
        );
        assert_eq!(
            messages, 1,
            "40 reports queued together travel in one message"
        );
    }
}
