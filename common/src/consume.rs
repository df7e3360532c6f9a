//! Taking deliveries in batches, so one store commit and one multiple-ack cover many messages.

use deadpool_lapin::lapin::message::Delivery;
use deadpool_lapin::lapin::options::BasicAckOptions;
use deadpool_lapin::lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use deadpool_lapin::lapin::types::FieldTable;
use deadpool_lapin::lapin::{Channel, Consumer};
use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::broker::BrokerError;

/// Starts a manually-acknowledged consumer on `queue`, within the broker's answer timeout.
pub async fn consume(channel: &Channel, queue: &str, tag: &str) -> Result<Consumer, BrokerError> {
    crate::broker::answered(
        &format!("basic.consume on {queue}"),
        channel.basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
}

/// Subscribes to `exchange` with `routing_key` on a private queue (server-named, exclusive,
/// deleted with the channel) and consumes it without acknowledgements: for broadcasts and
/// status streams, where a message missed while not listening is not owed to this listener.
pub async fn subscribe(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    tag: &str,
) -> Result<Consumer, BrokerError> {
    let queue = crate::broker::answered(
        &format!("the declaration of a private queue for {exchange}"),
        channel.queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        ),
    )
    .await?;
    crate::broker::answered(
        &format!("the binding of a private queue to {exchange}"),
        channel.queue_bind(
            queue.name().clone(),
            exchange.into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await?;
    crate::broker::answered(
        &format!("basic.consume on a private queue of {exchange}"),
        channel.basic_consume(
            queue.name().clone(),
            tag.into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        ),
    )
    .await
}

/// Waits for the next delivery, then takes every delivery already buffered, up to `max`.
/// Returns `Ok(None)` when `shutdown` fires first; an error or an ended stream (the broker
/// cancelled the consumer, the channel closed) ends the session.
pub async fn next_batch(
    consumer: &mut Consumer,
    max: usize,
    shutdown: &CancellationToken,
) -> Result<Option<Vec<Delivery>>, BrokerError> {
    let first = tokio::select! {
        _ = shutdown.cancelled() => return Ok(None),
        next = consumer.next() => next,
    };
    let mut batch = vec![delivery_or_end(first)?];
    while batch.len() < max {
        match consumer.next().now_or_never() {
            Some(next) => batch.push(delivery_or_end(next)?),
            None => break,
        }
    }
    Ok(Some(batch))
}

fn delivery_or_end(
    next: Option<Result<Delivery, deadpool_lapin::lapin::Error>>,
) -> Result<Delivery, BrokerError> {
    match next {
        Some(Ok(delivery)) => Ok(delivery),
        Some(Err(e)) => Err(e.into()),
        None => Err(BrokerError::ConsumerEnded),
    }
}

/// Acknowledges every delivery of `batch` (all on one channel) with one multiple-ack.
pub async fn ack_batch(batch: &[Delivery]) -> Result<(), BrokerError> {
    if let Some(last) = batch.iter().max_by_key(|d| d.delivery_tag) {
        crate::broker::sent(
            "an acknowledgement",
            last.acker.ack(BasicAckOptions { multiple: true }),
        )
        .await?;
    }
    Ok(())
}
