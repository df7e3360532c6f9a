//! The broker ceiling: how fast RabbitMQ itself moves persistent messages through two hops
//! when every client does what batchq's processes should do at best.
//!
//! ```text
//! producer ──confirms, window──▶ quorum queue A ──prefetch──▶ relay ──confirms──▶ quorum queue B ──prefetch──▶ sink
//!                                                   (acks A only after B confirmed)                    (acks)
//! ```
//!
//! Publishing and consuming use separate connections (four in all), confirms are awaited in
//! windows rather than one by one, and acks cover many deliveries at once (`multiple`).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::broker::{Broker, json_properties};
use common::lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use common::lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use common::lapin::{Channel, Confirmation, Consumer, PublisherConfirm};
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;

/// Settings of one relay run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RelaySettings {
    pub messages: u64,
    pub body_bytes: usize,
    /// Most published messages whose confirm the producer has not seen yet.
    pub confirm_window: usize,
    /// Unacknowledged deliveries per consumer (relay and sink).
    pub prefetch: u16,
}

/// Messages per second through both hops, from the first publish to the sink's last delivery.
/// `broker` should be a session of its own: the relay takes four connections of its pool.
pub async fn run(broker: &Broker, settings: &RelaySettings, timeout: Duration) -> Result<f64> {
    let names = broker.names();
    let queue_a = relay_queue(names.namespace(), "a");
    let queue_b = relay_queue(names.namespace(), "b");
    // Four connections (all that a `Broker`'s pool holds): one per publishing or consuming
    // client, as batchq's processes keep them apart.
    let producer_conn = broker.connection().await?;
    let relay_in_conn = broker.connection().await?;
    let relay_out_conn = broker.connection().await?;
    let sink_conn = broker.connection().await?;

    let setup = producer_conn.create_channel().await?;
    for queue in [&queue_a, &queue_b] {
        setup
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::durable(),
                quorum_args(),
            )
            .await
            .with_context(|| format!("declaring {queue}"))?;
    }
    let _ = setup.close(200, "declared".into()).await;

    let producer = confirm_channel(&producer_conn).await?;
    let relay_in = consumer_channel(&relay_in_conn, settings.prefetch).await?;
    let relay_out = confirm_channel(&relay_out_conn).await?;
    let sink = consumer_channel(&sink_conn, settings.prefetch).await?;
    let from_a = consume(&relay_in, &queue_a, "bench-relay").await?;
    let from_b = consume(&sink, &queue_b, "bench-sink").await?;

    let messages = settings.messages;
    let started = Instant::now();
    let sink_task = tokio::spawn(drain(from_b, messages));
    let relay_task = tokio::spawn(relay(from_a, relay_out, queue_b.clone(), messages));
    let produce = produce(&producer, &queue_a, settings);
    let outcome = tokio::time::timeout(timeout, async {
        produce.await.context("producer")?;
        relay_task.await.context("relay task")?.context("relay")?;
        sink_task.await.context("sink task")?.context("sink")
    })
    .await;
    let seconds = started.elapsed().as_secs_f64();
    for channel in [&producer, &relay_in, &sink] {
        let _ = channel.close(200, "relay over".into()).await;
    }
    match outcome {
        Ok(result) => result?,
        Err(_) => bail!("the relay of {messages} messages did not finish within {timeout:?}"),
    }
    Ok(messages as f64 / seconds.max(1e-9))
}

/// The two queues of the relay, inside the bench's namespace (deleted with it).
pub fn relay_queue(namespace: &str, hop: &str) -> String {
    format!("{namespace}.relay.{hop}")
}

/// Quorum, like batchq's work queues.
fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    args
}

async fn confirm_channel(conn: &common::lapin::Connection) -> Result<Channel> {
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

async fn consumer_channel(conn: &common::lapin::Connection, prefetch: u16) -> Result<Channel> {
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    Ok(channel)
}

async fn consume(channel: &Channel, queue: &str, tag: &str) -> Result<Consumer> {
    Ok(channel
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?)
}

async fn confirmed(confirm: PublisherConfirm) -> Result<()> {
    match confirm.await? {
        Confirmation::Ack(_) => Ok(()),
        other => bail!("the broker did not confirm a relay message: {other:?}"),
    }
}

/// Publishes `messages` persistent messages, each carrying its sequence number, keeping at most
/// `confirm_window` unconfirmed.
async fn produce(channel: &Channel, queue: &str, settings: &RelaySettings) -> Result<()> {
    let mut pending: VecDeque<PublisherConfirm> = VecDeque::with_capacity(settings.confirm_window);
    let mut body = vec![b'x'; settings.body_bytes.max(8)];
    for seq in 0..settings.messages {
        body[..8].copy_from_slice(&seq.to_be_bytes());
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &body,
                json_properties(),
            )
            .await?;
        pending.push_back(confirm);
        if pending.len() >= settings.confirm_window {
            // Await the older half together; the newer half keeps the pipe full meanwhile.
            for _ in 0..settings.confirm_window.div_ceil(2) {
                if let Some(confirm) = pending.pop_front() {
                    confirmed(confirm).await?;
                }
            }
        }
    }
    for confirm in pending {
        confirmed(confirm).await?;
    }
    Ok(())
}

/// Everything already delivered to `consumer` after the next delivery, up to `max`.
async fn next_batch(
    consumer: &mut Consumer,
    max: usize,
) -> Result<Vec<common::lapin::message::Delivery>> {
    let first = consumer
        .next()
        .await
        .context("the consumer ended")?
        .context("consuming")?;
    let mut batch = vec![first];
    while batch.len() < max {
        match consumer.next().now_or_never() {
            Some(Some(next)) => batch.push(next.context("consuming")?),
            _ => break,
        }
    }
    Ok(batch)
}

/// Takes each message off A and republishes it to B; a batch of deliveries is acked on A (one
/// multiple-ack) once every republish of the batch is confirmed. The confirms are awaited by a
/// task of their own, so the relay keeps publishing while they travel.
async fn relay(mut from_a: Consumer, to_b: Channel, queue_b: String, messages: u64) -> Result<()> {
    let (confirmed_tx, mut confirmed_rx) =
        mpsc::unbounded_channel::<(Vec<PublisherConfirm>, common::lapin::Acker)>();
    let acker = tokio::spawn(async move {
        while let Some((confirms, last)) = confirmed_rx.recv().await {
            for confirm in confirms {
                confirmed(confirm).await?;
            }
            last.ack(BasicAckOptions { multiple: true }).await?;
        }
        Ok::<_, anyhow::Error>(())
    });
    let mut relayed = 0u64;
    while relayed < messages {
        let batch = next_batch(&mut from_a, 64).await?;
        let mut confirms = Vec::with_capacity(batch.len());
        for delivery in &batch {
            confirms.push(
                to_b.basic_publish(
                    "".into(),
                    queue_b.as_str().into(),
                    BasicPublishOptions::default(),
                    &delivery.data,
                    json_properties(),
                )
                .await?,
            );
        }
        relayed += batch.len() as u64;
        if let Some(last) = batch.last() {
            confirmed_tx
                .send((confirms, last.acker.clone()))
                .ok()
                .context("the relay's acker ended")?;
        }
    }
    drop(confirmed_tx);
    acker.await.context("the relay's acker panicked")??;
    let _ = to_b.close(200, "relay over".into()).await;
    Ok(())
}

/// Takes `messages` messages off B, acking each batch with one multiple-ack, and checks that
/// every sequence number arrived exactly once.
async fn drain(mut from_b: Consumer, messages: u64) -> Result<()> {
    let mut seen = vec![false; messages as usize];
    let mut received = 0u64;
    while received < messages {
        let batch = next_batch(&mut from_b, 64).await?;
        for delivery in &batch {
            let seq = delivery
                .data
                .get(..8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
                .context("a relay message without its sequence number")?;
            let slot = seen
                .get_mut(seq as usize)
                .with_context(|| format!("sequence number {seq} out of range"))?;
            ensure!(!*slot, "message {seq} arrived twice");
            *slot = true;
        }
        received += batch.len() as u64;
        if let Some(last) = batch.last() {
            last.acker.ack(BasicAckOptions { multiple: true }).await?;
        }
    }
    Ok(())
}
