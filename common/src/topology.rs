//! Names of every exchange and queue under a namespace, and their idempotent declaration.
//!
//! Queue arguments are part of a queue's identity: RabbitMQ refuses a re-declaration with
//! different arguments, so changing anything here is an upgrade step (see docs/operations).

use deadpool_lapin::lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use deadpool_lapin::lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use deadpool_lapin::lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use deadpool_lapin::lapin::{Channel, Connection, ErrorKind, ExchangeKind};

/// Routing keys on `{ns}.jobs`.
pub const KEY_SUBMIT: &str = "submit";
pub const KEY_CANCEL: &str = "cancel";
pub const KEY_REDRIVE: &str = "redrive";
/// Routing keys on `{ns}.events`.
pub const KEY_REDUCER: &str = "reducer";
pub const KEY_SETTLED: &str = "settled";
pub const KEY_HEARTBEAT: &str = "heartbeat";
/// Routing key under which poison fragments are dead-lettered from the work queues into
/// `{ns}.events` (and so to the reducer).
pub const KEY_POISON: &str = "poison";
/// Routing key of requests to the reducer on `{ns}.rpc`.
pub const KEY_RPC: &str = "request";
/// Routing key on `{ns}.metrics`.
pub const KEY_METRICS: &str = "batch";

/// Returns of one fragment to its work queue after which the broker gives up on it
/// (`x-delivery-limit`): a fragment that kills its worker this often is poison, not bad luck.
/// The queues that batchq's own splitter and reducer consume have no such limit: their
/// consumers hold a message for as long as a store fault lasts, and a healthy message must
/// not be dead-lettered because they restarted (see [`declare`]).
pub const DELIVERY_LIMIT: i64 = 5;
/// Deliveries a fragment gets before its work queue dead-letters it: the first, plus one per
/// return the delivery limit allows.
pub const MAX_DELIVERIES: i64 = DELIVERY_LIMIT + 1;
/// How long a heartbeat or RPC request stays meaningful.
pub const HEARTBEAT_TTL_MS: i64 = 15_000;
pub const RPC_TTL_MS: i64 = 30_000;

/// The built-in operations, whose work queues `batchctl queues` always shows.
/// The backoff steps of retries: attempt `n + 1` waits in the queue of step `min(n - 1, last)`,
/// with a per-message expiration of the step's delay plus up to half of it as jitter.
pub const RETRY_DELAYS_MS: [u64; 7] = [1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 60_000];

/// The backoff step a fragment of `attempt` (2 for the first retry) waits in.
pub fn retry_delay_ms(attempt: u32) -> u64 {
    let step = (attempt.saturating_sub(2) as usize).min(RETRY_DELAYS_MS.len() - 1);
    RETRY_DELAYS_MS[step]
}

pub const BUILTIN_OPERATIONS: [&str; 4] = ["noop", "sleep", "sha256", "exec"];

/// All names of one deployment, derived from its namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    ns: String,
}

impl Names {
    pub fn new(ns: impl Into<String>) -> Self {
        Self { ns: ns.into() }
    }

    pub fn namespace(&self) -> &str {
        &self.ns
    }

    fn name(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.ns)
    }

    /// Exchange users publish JobSpecs and CancelRequests to; also the splitter's queue.
    pub fn jobs(&self) -> String {
        self.name("jobs")
    }
    pub fn status(&self) -> String {
        self.name("status")
    }
    pub fn metrics(&self) -> String {
        self.name("metrics")
    }
    /// Exchange fragments are published to, routed by operation.
    pub fn work(&self) -> String {
        self.name("work")
    }
    pub fn work_queue(&self, operation: &str) -> String {
        self.name(&format!("work.{operation}"))
    }
    /// Exchange for internal events (reports, settlements, heartbeats).
    pub fn events(&self) -> String {
        self.name("events")
    }
    pub fn reducer_queue(&self) -> String {
        self.name("reducer")
    }
    pub fn splitter_queue(&self) -> String {
        self.name("splitter")
    }
    /// Exchange and queue that keep rejected messages for inspection.
    pub fn dead(&self) -> String {
        self.name("dead")
    }
    /// Exchange of requests to the reducer (`batchctl`); each reducer session consumes them
    /// from a private queue bound to it, so no durable queue of one node carries them.
    pub fn rpc(&self) -> String {
        self.name("rpc")
    }
    /// Durable classic queues that earlier batchq releases declared for heartbeats and RPC. A
    /// classic queue lives on one node, and with that node down every declaration of it
    /// fails: they are no longer declared or used, only deleted by [`delete`] (and by hand
    /// on an upgraded deployment, docs/operations.md "Upgrading").
    pub fn legacy_queues(&self) -> Vec<String> {
        vec![self.name("heartbeats"), self.name("rpc")]
    }
    /// Fanout exchange that reaches every live worker.
    pub fn control(&self) -> String {
        self.name("control")
    }
    /// Fanout exchange and queue where retry fragments wait `delay_ms` (see [`RETRY_DELAYS_MS`])
    /// before they expire into `{ns}.work`, keeping their operation as routing key.
    pub fn retry(&self, delay_ms: u64) -> String {
        self.name(&format!("retry.{delay_ms}ms"))
    }

    /// Every durable queue of the deployment except the per-operation work queues.
    pub fn fixed_queues(&self) -> Vec<String> {
        vec![
            self.jobs(),
            self.reducer_queue(),
            self.splitter_queue(),
            self.dead(),
        ]
        .into_iter()
        .chain(RETRY_DELAYS_MS.iter().map(|&ms| self.retry(ms)))
        .collect()
    }

    pub fn exchanges(&self) -> Vec<String> {
        vec![
            self.jobs(),
            self.status(),
            self.metrics(),
            self.work(),
            self.events(),
            self.dead(),
            self.control(),
            self.rpc(),
        ]
        .into_iter()
        .chain(RETRY_DELAYS_MS.iter().map(|&ms| self.retry(ms)))
        .collect()
    }
}

fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in entries {
        table.insert(ShortString::from(*key), value.clone());
    }
    table
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// Queue argument that places a new quorum queue's leader on the node that leads the fewest
/// (`balanced`, RabbitMQ 3.10+) instead of the node the declaring client is connected to:
/// spread leaders mean that one node's loss stalls only its share of the queues for the few
/// seconds a new leader takes, and that no node carries every queue's traffic.
pub const LEADER_LOCATOR: &str = "x-queue-leader-locator";
pub const LEADER_LOCATOR_VALUE: &str = "balanced";

fn leader_locator() -> (&'static str, AMQPValue) {
    (LEADER_LOCATOR, text(LEADER_LOCATOR_VALUE))
}

/// A work queue's arguments: quorum, with a delivery limit past which a fragment is poison.
/// Without the leader locator, which [`declare_quorum_queue`] adds.
fn quorum_args(names: &Names, extra: &[(&'static str, AMQPValue)]) -> QueueArgs {
    let mut entries = vec![
        ("x-queue-type", text("quorum")),
        ("x-delivery-limit", AMQPValue::LongLongInt(DELIVERY_LIMIT)),
        ("x-dead-letter-exchange", text(&names.dead())),
        // Dead-letter with confirms inside the broker, so a poison message is never dropped.
        ("x-dead-letter-strategy", text("at-least-once")),
        ("x-overflow", text("reject-publish")),
    ];
    entries.extend_from_slice(extra);
    entries
}

/// A quorum queue's arguments, as (name, value) pairs so the leader locator can be added or
/// left out.
type QueueArgs = Vec<(&'static str, AMQPValue)>;

/// The arguments of a queue that batchq's splitter or reducer consumes: quorum, and no
/// delivery limit. Those consumers never give a message back for a reason the message
/// carries: what they cannot use they keep on `{ns}.dead` themselves and ack, and a store
/// fault is waited out while the message is held. A limit would only dead-letter healthy
/// messages after a few restarts or lost connections.
fn internal_queue_args() -> QueueArgs {
    vec![
        ("x-queue-type", text("quorum")),
        ("x-overflow", text("reject-publish")),
    ]
}

/// What [`declare_quorum_queue`] does when the queue exists with arguments of an older
/// release that even the form without the leader locator does not match.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Older {
    /// Use it as it is, with a warning (the splitter's and reducer's queues: batchq 0.1
    /// declared them with a delivery limit; see [`internal_queue_args`]).
    Use,
    /// Refuse: the queue is not one batchq can work with.
    Refuse,
}

/// Declares a quorum queue with `args` and the leader locator, on `channel`.
///
/// RabbitMQ refuses a re-declaration whose arguments differ from the queue's (406, which
/// closes the channel), and queues declared by earlier releases have no leader locator. Such
/// a queue is declared again, on a fresh channel, without it: it keeps working, its leader
/// stays where it is (docs/operations.md, "Upgrading", says how to re-create it or set the
/// locator by policy). Failing here would leave every process looping on reconnect.
async fn declare_quorum_queue(
    connection: &Connection,
    channel: &mut Channel,
    name: String,
    args: QueueArgs,
    older: Older,
) -> Result<(), deadpool_lapin::lapin::Error> {
    let mut located = args.clone();
    located.push(leader_locator());
    match declare_queue(channel, name.clone(), table(&located)).await {
        Err(e) if is_precondition_failed(&e) => {}
        other => return other,
    }
    *channel = connection.create_channel().await?;
    match declare_queue(channel, name.clone(), table(&args)).await {
        Ok(()) => {
            tracing::info!(
                queue = %name,
                "queue was declared by an earlier batchq without a leader locator; its leader \
                 stays where it is (docs/operations.md, \"Upgrading\")"
            );
            Ok(())
        }
        Err(e) if is_precondition_failed(&e) && older == Older::Use => {
            tracing::warn!(
                queue = %name,
                "queue was declared by an older batchq with a delivery limit; using it as it \
                 is until it is re-created (docs/operations.md, \"Upgrading\")"
            );
            *channel = connection.create_channel().await?;
            Ok(())
        }
        Err(e) => Err(e),
    }
}

fn is_precondition_failed(error: &deadpool_lapin::lapin::Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::ProtocolError(e)
            if *e.kind() == AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
    )
}

async fn declare_exchange(
    channel: &Channel,
    name: String,
    kind: ExchangeKind,
) -> Result<(), deadpool_lapin::lapin::Error> {
    channel
        .exchange_declare(
            name.into(),
            kind,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

async fn declare_queue(
    channel: &Channel,
    name: String,
    args: FieldTable,
) -> Result<(), deadpool_lapin::lapin::Error> {
    channel
        .queue_declare(name.into(), QueueDeclareOptions::durable(), args)
        .await
        .map(|_| ())
}

async fn bind(
    channel: &Channel,
    queue: String,
    exchange: String,
    key: &str,
) -> Result<(), deadpool_lapin::lapin::Error> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// Declares every exchange and fixed queue of the namespace, on channels of `connection`.
/// Idempotent; every binary and `batchctl` call it at start, so a user may publish before any
/// batchq process has run.
pub async fn declare(
    connection: &Connection,
    names: &Names,
) -> Result<(), deadpool_lapin::lapin::Error> {
    let mut channel = connection.create_channel().await?;
    let channel = &mut channel;
    declare_exchange(channel, names.jobs(), ExchangeKind::Direct).await?;
    declare_exchange(channel, names.status(), ExchangeKind::Topic).await?;
    declare_exchange(channel, names.metrics(), ExchangeKind::Topic).await?;
    declare_exchange(channel, names.work(), ExchangeKind::Direct).await?;
    declare_exchange(channel, names.events(), ExchangeKind::Direct).await?;
    declare_exchange(channel, names.dead(), ExchangeKind::Fanout).await?;
    declare_exchange(channel, names.control(), ExchangeKind::Fanout).await?;
    declare_exchange(channel, names.rpc(), ExchangeKind::Direct).await?;

    declare_quorum_queue(
        connection,
        channel,
        names.jobs(),
        internal_queue_args(),
        Older::Use,
    )
    .await?;
    bind(channel, names.jobs(), names.jobs(), KEY_SUBMIT).await?;
    bind(channel, names.jobs(), names.jobs(), KEY_CANCEL).await?;

    declare_quorum_queue(
        connection,
        channel,
        names.reducer_queue(),
        internal_queue_args(),
        Older::Use,
    )
    .await?;
    bind(channel, names.reducer_queue(), names.events(), KEY_REDUCER).await?;
    bind(channel, names.reducer_queue(), names.events(), KEY_POISON).await?;

    declare_quorum_queue(
        connection,
        channel,
        names.splitter_queue(),
        internal_queue_args(),
        Older::Use,
    )
    .await?;
    bind(channel, names.splitter_queue(), names.events(), KEY_SETTLED).await?;

    declare_quorum_queue(
        connection,
        channel,
        names.dead(),
        vec![("x-queue-type", text("quorum"))],
        Older::Refuse,
    )
    .await?;
    bind(channel, names.dead(), names.dead(), "").await?;

    // Retry delays: fragments expire (per-message TTL) into the work exchange with their
    // routing key, the operation, unchanged. Quorum, so the move is at-least-once.
    for delay_ms in RETRY_DELAYS_MS {
        let name = names.retry(delay_ms);
        declare_exchange(channel, name.clone(), ExchangeKind::Fanout).await?;
        declare_quorum_queue(
            connection,
            channel,
            name.clone(),
            vec![
                ("x-queue-type", text("quorum")),
                ("x-dead-letter-exchange", text(&names.work())),
                ("x-dead-letter-strategy", text("at-least-once")),
                ("x-overflow", text("reject-publish")),
            ],
            Older::Refuse,
        )
        .await?;
        bind(channel, name.clone(), name, "").await?;
    }
    let _ = channel.close(200, "topology declared".into()).await;
    Ok(())
}

/// Declares a private queue (server-named, exclusive, deleted with its channel) bound to
/// `exchange` with `routing_key`, whose messages expire after `ttl_ms`, and returns its name.
///
/// For heartbeats and RPC requests: their value dies within seconds, so a durable queue buys
/// nothing, and a private queue lives on the node the consumer is connected to. When that
/// node dies, the connection and the queue go together and the next session declares a new
/// one on whichever node it reaches; no node's absence can fail the declaration.
pub async fn declare_private_queue(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    ttl_ms: i64,
) -> Result<ShortString, deadpool_lapin::lapin::Error> {
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            table(&[("x-message-ttl", AMQPValue::LongLongInt(ttl_ms))]),
        )
        .await?;
    let name = queue.name().clone();
    channel
        .queue_bind(
            name.clone(),
            exchange.into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(name)
}

/// Declares the work queue of one operation, on a channel of its own on `connection` (a
/// refused re-declaration closes the channel it was asked on, see [`declare_quorum_queue`]).
/// A fragment that kills its worker [`MAX_DELIVERIES`] times is dead-lettered to the
/// reducer, which records it as failed.
pub async fn declare_work_queue(
    connection: &Connection,
    names: &Names,
    operation: &str,
) -> Result<(), deadpool_lapin::lapin::Error> {
    let queue = names.work_queue(operation);
    let args = quorum_args(
        names,
        &[
            ("x-dead-letter-exchange", text(&names.events())),
            ("x-dead-letter-routing-key", text(KEY_POISON)),
        ],
    );
    let mut channel = connection.create_channel().await?;
    declare_quorum_queue(connection, &mut channel, queue.clone(), args, Older::Refuse).await?;
    bind(&channel, queue, names.work(), operation).await?;
    let _ = channel.close(200, "work queue declared".into()).await;
    Ok(())
}

/// Deletes every exchange and queue of the namespace (fixed ones and the work queues of
/// `operations`). For tests and for tearing a deployment down.
pub async fn delete(
    channel: &Channel,
    names: &Names,
    operations: &[&str],
) -> Result<(), deadpool_lapin::lapin::Error> {
    let work_queues = operations.iter().map(|op| names.work_queue(op));
    let queues = names
        .fixed_queues()
        .into_iter()
        .chain(names.legacy_queues());
    for queue in queues.chain(work_queues) {
        channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await?;
    }
    for exchange in names.exchanges() {
        channel
            .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_fixed_queue_is_a_classic_queue_of_earlier_releases() {
        let names = Names::new("ns");
        let fixed = names.fixed_queues();
        for legacy in names.legacy_queues() {
            assert!(!fixed.contains(&legacy), "{legacy} is declared again");
        }
        assert_eq!(names.legacy_queues(), vec!["ns.heartbeats", "ns.rpc"]);
        // The RPC exchange takes the old queue's name: exchanges and queues are separate
        // namespaces in AMQP, so both may exist while an upgraded deployment still has it.
        assert!(names.exchanges().contains(&"ns.rpc".to_owned()));
    }
}
