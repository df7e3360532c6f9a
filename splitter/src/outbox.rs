//! The splitter's transactional outbox, sending side: every message a decision produces is
//! written in the same transaction as the decision, and this pump publishes committed rows
//! in rounds, awaits their confirms, and only then forgets them. A crash in between
//! re-publishes the round: duplicates, which downstream ignores, never losses.

use std::collections::HashSet;

use common::broker::{Broker, Publisher};
use common::lapin::BasicProperties;
use common::topology::declare_work_queue;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::backend::Store;
use crate::store::{OutboxMessage, SplitterStore, StoreError};
use crate::{SharedStore, SplitterError};

/// Outbox messages published per round of confirms.
const ROUND: usize = 512;

/// Publishes committed outbox messages until `stop`, waking on `ready` when a commit added
/// some.
pub(crate) async fn pump(
    broker: &Broker,
    publisher: &Publisher,
    store: &SharedStore,
    ready: &Notify,
    stop: &CancellationToken,
) -> Result<(), SplitterError> {
    let mut declared_work_queues = HashSet::new();
    loop {
        let round = store
            .run(stop, "outbox", || |s: &mut Store| s.outbox(ROUND))
            .await?;
        let Some(last_seq) = round.last().map(|m| m.seq) else {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = ready.notified() => continue,
            }
        };
        let round_len = round.len() as u64;
        publish_round(broker, publisher, round, &mut declared_work_queues).await?;
        metrics::counter!("batchq_splitter_messages_published_total").increment(round_len);
        store
            .run(stop, "outbox", || {
                move |s: &mut Store| s.outbox_confirmed(last_seq)
            })
            .await?;
    }
}

/// Publishes one round and waits for all its confirms.
async fn publish_round(
    broker: &Broker,
    publisher: &Publisher,
    round: Vec<OutboxMessage>,
    declared_work_queues: &mut HashSet<String>,
) -> Result<(), SplitterError> {
    let names = broker.names();
    let mut pending = Vec::with_capacity(round.len());
    for message in round {
        if message.exchange == names.work() && !declared_work_queues.contains(&message.routing_key)
        {
            // A fragment for an operation nobody offers yet waits, visibly, in its queue.
            broker
                .on_connection(
                    &format!(
                        "the declaration of {}",
                        names.work_queue(&message.routing_key)
                    ),
                    async |connection| {
                        declare_work_queue(connection, names, &message.routing_key).await
                    },
                )
                .await?;
            declared_work_queues.insert(message.routing_key.clone());
        }
        let properties: BasicProperties = serde_json::from_str(&message.properties)
            .map_err(|e| StoreError::Corrupt(format!("outbox properties: {e}")))?;
        pending.push(
            publisher
                .start_with(
                    &message.exchange,
                    &message.routing_key,
                    &message.body,
                    properties,
                    message.mandatory,
                )
                .await?,
        );
    }
    common::broker::wait_all(pending).await?;
    Ok(())
}
