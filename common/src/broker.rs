//! Connections to RabbitMQ (pooled by deadpool, one pool per cluster URL, tried in turn from
//! a random one, `amqps://` through rustls) and a publisher that always waits for the broker's confirm.

mod connector;
mod refusal;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use deadpool_lapin::lapin::options::{BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions};
use deadpool_lapin::lapin::types::ShortString;
use deadpool_lapin::lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};
use deadpool_lapin::{PoolConfig, PoolError, Runtime, Timeouts};
use serde::Serialize;

use crate::config::{BrokerArgs, redact_url};
use crate::topology::Names;
use connector::{ConnectionManager, ConnectionPool, PooledConnection};
pub use refusal::Refusal;
use refusal::{Stage, classify, may_heal};

/// A broker error, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot reach the broker ({urls}): {reason}")]
    Unreachable { urls: String, reason: String },
    /// The broker answered and turned this client away; the cause is the source, so that
    /// it can be found under the transparent error types of the binaries.
    #[error("the broker at {url} refused this client: {detail}")]
    Refused {
        url: String,
        detail: String,
        #[source]
        refusal: Refusal,
    },
    #[error("broker error: {0}")]
    Amqp(#[from] deadpool_lapin::lapin::Error),
    #[error("the broker refused a message published to exchange {exchange:?}")]
    Nacked { exchange: String },
    #[error("no queue is bound for a message published to exchange {exchange:?}")]
    Unroutable { exchange: String },
    #[error("cannot encode message: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("the broker cancelled the consumer or closed its channel")]
    ConsumerEnded,
    #[error("the broker did not answer {what} within {secs} s")]
    NoAnswer { what: String, secs: u64 },
    #[error("invalid broker settings: {0}")]
    Config(String),
    /// An error met by another task on this one's behalf (a publish shared by several
    /// reports), as text.
    #[error("{what} failed: {reason}")]
    Failed { what: String, reason: String },
}

impl BrokerError {
    /// Whether reconnecting may help: not with bad settings, an unencodable message, or a
    /// reply code that says the client broke the protocol. A refusal is retryable (slowly,
    /// see [`BrokerError::refusal`]): credentials or permissions may arrive later.
    pub fn is_retryable(&self) -> bool {
        match self {
            BrokerError::Config(_) | BrokerError::Encode(_) => false,
            BrokerError::Amqp(e) => may_heal(e),
            _ => true,
        }
    }

    /// The cause, when the broker refused this client rather than failed or went away.
    pub fn refusal(&self) -> Option<Refusal> {
        match self {
            BrokerError::Refused { refusal, .. } => Some(*refusal),
            BrokerError::Amqp(e) => classify(e, Stage::Channel, false),
            _ => None,
        }
    }

    /// `self`, made a [`BrokerError::Refused`] naming `url` when its reply code is a refusal
    /// at `stage`.
    fn refused_at(self, url: &str, stage: Stage) -> Self {
        let BrokerError::Amqp(error) = self else {
            return self;
        };
        match classify(&error, stage, is_tls(url)) {
            Some(refusal) => BrokerError::Refused {
                url: redact_url(url),
                detail: error.to_string(),
                refusal,
            },
            None => BrokerError::Amqp(error),
        }
    }
}

/// The refusal somewhere in `error`'s chain of sources (the binaries wrap [`BrokerError`]
/// transparently, which hides it but not its source).
pub fn refusal_in(error: &(dyn std::error::Error + 'static)) -> Option<Refusal> {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(refusal) = error.downcast_ref::<Refusal>() {
            return Some(*refusal);
        }
        if let Some(broker) = error.downcast_ref::<BrokerError>() {
            return broker.refusal();
        }
        if let Some(lapin) = error.downcast_ref::<deadpool_lapin::lapin::Error>() {
            return classify(lapin, Stage::Channel, false);
        }
        next = error.source();
    }
    None
}

fn is_tls(url: &str) -> bool {
    url.trim_start()
        .to_ascii_lowercase()
        .starts_with("amqps://")
}

/// Longest wait for the broker to answer one request of a session's setup (a declare, a
/// consume). A broker that came back badly from a crash can leave such a request unanswered
/// for ever (RabbitMQ 3.10: a quorum queue whose Raft member lost its registration stays
/// leaderless); the session then ends with [`BrokerError::NoAnswer`] and the supervisor logs
/// it and tries again, instead of the process hanging silently.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a publisher confirm. Past it the message counts as not taken: the session
/// starts again and the message is published again (a duplicate at worst, never a loss).
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for a frame to leave for the broker: a publish, an ack. lapin hands such a
/// frame to its I/O thread and waits until it is written, which is for ever on a connection
/// the broker has stopped reading (a quorum queue stuck behind a lost node holds its channel
/// in flow control; `connection.blocked` stops every write until an `unblocked` that may
/// never come). The session then ends with [`BrokerError::NoAnswer`] and starts again on a
/// new connection, instead of the process standing still without a word.
pub const SEND_TIMEOUT: Duration = ANSWER_TIMEOUT;

/// `frame` (a publish, an ack) handed to the broker, or [`BrokerError::NoAnswer`] naming
/// `what` after [`SEND_TIMEOUT`]: see there.
pub async fn sent<T, E>(
    what: &str,
    frame: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, BrokerError>
where
    E: Into<BrokerError>,
{
    within(
        SEND_TIMEOUT,
        &format!("{what} (not written: the broker stopped reading this connection)"),
        frame,
    )
    .await
}

/// `request` on `connection` within [`ANSWER_TIMEOUT`]. A connection that leaves it
/// unanswered is open yet not answering (not read, or blocked by the broker): it is taken
/// out of the pool instead of being handed to the next caller.
async fn answered_on<T, E>(
    connection: PooledConnection,
    what: &str,
    request: impl AsyncFnOnce(&deadpool_lapin::lapin::Connection) -> Result<T, E>,
) -> Result<T, BrokerError>
where
    E: Into<BrokerError>,
{
    let outcome = answered(what, request(&connection)).await;
    if let Err(BrokerError::NoAnswer { .. }) = outcome {
        drop(deadpool::managed::Object::take(connection));
    }
    outcome
}

/// `request`, or [`BrokerError::NoAnswer`] naming `what` after [`ANSWER_TIMEOUT`].
pub async fn answered<T, E>(
    what: &str,
    request: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, BrokerError>
where
    E: Into<BrokerError>,
{
    within(ANSWER_TIMEOUT, what, request).await
}

async fn within<T, E>(
    limit: Duration,
    what: &str,
    request: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, BrokerError>
where
    E: Into<BrokerError>,
{
    match tokio::time::timeout(limit, request).await {
        Ok(result) => result.map_err(Into::into),
        Err(_) => Err(BrokerError::NoAnswer {
            what: what.to_owned(),
            secs: limit.as_secs(),
        }),
    }
}

/// Persistent JSON message properties, as the contract asks of every publisher.
pub fn json_properties() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from("application/json"))
}

/// Transient JSON properties, for messages whose value dies with them (heartbeats, RPC).
pub fn transient_json_properties() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(1)
        .with_content_type(ShortString::from("application/json"))
}

/// The broker of one deployment: a connection pool per URL and the deployment's names.
#[derive(Clone)]
pub struct Broker {
    pools: Arc<Vec<(String, ConnectionPool)>>,
    /// Index of the URL that last answered, tried first next time; random at the start. A
    /// connection whose node died is discarded by the pool's recycle check, and the next
    /// attempt on that dead URL fails at once, so the caller moves on to the next URL.
    preferred: Arc<AtomicUsize>,
    names: Names,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<String> = self.pools.iter().map(|(u, _)| redact_url(u)).collect();
        f.debug_struct("Broker")
            .field("urls", &urls)
            .field("namespace", &self.names.namespace())
            .finish()
    }
}

/// Largest AMQP frame batchq asks for unless the URL says otherwise (`?frame_max=…`).
///
/// lapin sizes each connection's read and write buffers from the negotiated frame size
/// (RabbitMQ offers 128 KiB, which makes 4 MiB per buffer, 16 MiB for a process's two
/// connections); 32 KiB frames cut an idle worker from ~22 MiB to ~6 MiB resident. Larger
/// messages are simply sent in more frames.
pub const DEFAULT_FRAME_MAX: u32 = 32 * 1024;

/// `url` with `frame_max` set to [`DEFAULT_FRAME_MAX`] and `heartbeat` to `heartbeat_secs`,
/// each unless the URL sets it itself.
pub fn with_defaults(url: &str, heartbeat_secs: u16) -> String {
    let mut url = url.to_owned();
    for (key, value) in [
        ("frame_max", DEFAULT_FRAME_MAX.to_string()),
        ("heartbeat", heartbeat_secs.to_string()),
    ] {
        if !url.contains(&format!("{key}=")) {
            let separator = if url.contains('?') { '&' } else { '?' };
            url = format!("{url}{separator}{key}={value}");
        }
    }
    url
}

impl Broker {
    /// `client_name` shows as the connection name in RabbitMQ's tools.
    pub fn new(args: &BrokerArgs, client_name: &str) -> Result<Self, BrokerError> {
        let urls = args.urls();
        if urls.is_empty() {
            return Err(BrokerError::Config("AMQP_URL is empty".into()));
        }
        if !crate::jobspec::valid_id(&args.namespace) {
            return Err(BrokerError::Config(format!(
                "namespace {:?} must be 1-128 letters, digits, '.', '_' or '-'",
                args.namespace
            )));
        }
        let ca_pem = args.tls_ca_pem().map_err(BrokerError::Config)?;
        let mut pools = Vec::with_capacity(urls.len());
        for url in urls {
            // A malformed URL is a setting to fix, not a broker to wait for.
            if let Err(e) = url.parse::<deadpool_lapin::lapin::uri::AMQPUri>() {
                return Err(BrokerError::Config(format!(
                    "AMQP_URL {} is not a valid AMQP URL: {e}",
                    redact_url(&url)
                )));
            }
            let manager = ConnectionManager::new(
                with_defaults(&url, args.heartbeat_secs),
                ca_pem.clone(),
                client_name.to_owned(),
            );
            let pool = ConnectionPool::builder(manager)
                .config(PoolConfig {
                    max_size: 4,
                    timeouts: Timeouts {
                        wait: Some(Duration::from_secs(10)),
                        create: Some(Duration::from_secs(5)),
                        recycle: Some(Duration::from_secs(5)),
                    },
                    ..PoolConfig::default()
                })
                .runtime(Runtime::Tokio1)
                .build()
                .map_err(|e| BrokerError::Config(format!("{}: {e}", redact_url(&url))))?;
            pools.push((url, pool));
        }
        // Each process starts at a random node of a cluster, so a fleet given the same list
        // spreads its connections (and the private queues they own) over every node instead
        // of all sitting on the first one.
        let first = rand::random_range(0..pools.len());
        Ok(Self {
            pools: Arc::new(pools),
            preferred: Arc::new(AtomicUsize::new(first)),
            names: crate::topology::Names::new(args.namespace.clone()),
        })
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    /// The broker URLs, passwords redacted, comma-separated: fit for a message to a user.
    pub fn urls_redacted(&self) -> String {
        self.pools
            .iter()
            .map(|(u, _)| redact_url(u))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// A pooled connection, trying each URL in turn from the one that answered last (at
    /// first a random one).
    pub async fn connection(&self) -> Result<PooledConnection, BrokerError> {
        Ok(self.connection_and_url().await?.0)
    }

    /// [`Broker::connection`] and the URL it reached. A broker that refuses the login, the
    /// vhost or the TLS handshake is reported as [`BrokerError::Refused`] (when no other URL
    /// answers), since it is what the user has to mend; a broker down is just unreachable.
    async fn connection_and_url(&self) -> Result<(PooledConnection, &str), BrokerError> {
        let n = self.pools.len();
        let first = self.preferred.load(Ordering::Relaxed) % n;
        let mut reasons = Vec::new();
        let mut refused = None;
        for i in 0..n {
            let at = (first + i) % n;
            let (url, pool) = &self.pools[at];
            match pool.get().await {
                Ok(conn) => {
                    self.preferred.store(at, Ordering::Relaxed);
                    return Ok((conn, url));
                }
                Err(PoolError::Backend(e)) => {
                    let error = BrokerError::Amqp(e).refused_at(url, Stage::Connect);
                    match error {
                        BrokerError::Refused { .. } if refused.is_none() => refused = Some(error),
                        other => reasons.push(format!("{}: {other}", redact_url(url))),
                    }
                }
                Err(e) => reasons.push(format!("{}: {e}", redact_url(url))),
            }
        }
        Err(refused.unwrap_or_else(|| BrokerError::Unreachable {
            urls: self.urls_redacted(),
            reason: reasons.join("; "),
        }))
    }

    /// A channel on a pooled connection (shared with other short-lived users).
    pub async fn channel(&self) -> Result<Channel, BrokerError> {
        let conn = self.connection().await?;
        answered("channel.open", conn.create_channel()).await
    }

    /// A publishing channel with publisher confirms on.
    pub async fn publisher(&self) -> Result<Publisher, BrokerError> {
        Publisher::open(&*self.connection().await?).await
    }

    /// Two connections held for the life of a session: one for publishing, one for consuming,
    /// so the broker's flow control on publishers never stalls consumption and acks.
    pub async fn session(&self) -> Result<Session, BrokerError> {
        let publish = self.connection().await?;
        let consume = self.connection().await?;
        Ok(Session {
            publish: Some(publish),
            consume: Some(consume),
        })
    }

    /// Declares the namespace's whole fixed topology. A missing permission or an exchange
    /// or queue declared otherwise is a [`BrokerError::Refused`] naming the URL.
    pub async fn declare_topology(&self) -> Result<(), BrokerError> {
        let (connection, url) = self.connection_and_url().await?;
        answered_on(
            connection,
            "the topology's declarations",
            async |connection| crate::topology::declare(connection, &self.names).await,
        )
        .await
        .map_err(|e| e.refused_at(url, Stage::Declare))
    }

    /// `request` on a pooled connection, within [`ANSWER_TIMEOUT`] (see [`answered_on`]).
    pub async fn on_connection<T, E>(
        &self,
        what: &str,
        request: impl AsyncFnOnce(&deadpool_lapin::lapin::Connection) -> Result<T, E>,
    ) -> Result<T, BrokerError>
    where
        E: Into<BrokerError>,
    {
        answered_on(self.connection().await?, what, request).await
    }
}

/// The connections of one supervised session, held for its life and never handed back to
/// the pool: a session ends because something went wrong on them (or at shutdown), and a
/// connection can be wrong in ways its status does not show (open, but no longer read by
/// the broker), so the next session always starts on connections of its own.
pub struct Session {
    // `Some` until the drop takes them out of the pool.
    publish: Option<PooledConnection>,
    consume: Option<PooledConnection>,
}

impl Session {
    fn publish(&self) -> &deadpool_lapin::lapin::Connection {
        self.publish.as_ref().expect("held until the session drops")
    }

    fn consume(&self) -> &deadpool_lapin::lapin::Connection {
        self.consume.as_ref().expect("held until the session drops")
    }

    pub async fn publisher(&self) -> Result<Publisher, BrokerError> {
        Publisher::open(self.publish()).await
    }

    /// The consuming connection, for declarations that open channels of their own.
    pub fn consume_connection(&self) -> &deadpool_lapin::lapin::Connection {
        self.consume()
    }

    /// A channel without confirms on the consuming connection (for replies that may be lost).
    pub async fn plain_channel(&self) -> Result<Channel, BrokerError> {
        answered("channel.open", self.consume().create_channel()).await
    }

    /// A consuming channel with `prefetch` unacknowledged deliveries per consumer.
    pub async fn consumer_channel(&self, prefetch: u16) -> Result<Channel, BrokerError> {
        let channel = answered("channel.open", self.consume().create_channel()).await?;
        // basic_qos must come before basic_consume to bound the first burst too.
        answered(
            "basic.qos",
            channel.basic_qos(prefetch, BasicQosOptions::default()),
        )
        .await?;
        Ok(channel)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Out of the pool for good; lapin closes each connection as its last handle goes.
        for connection in [self.publish.take(), self.consume.take()]
            .into_iter()
            .flatten()
        {
            drop(deadpool::managed::Object::take(connection));
        }
    }
}

/// A channel in confirm mode.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
}

impl Publisher {
    async fn open(conn: &deadpool_lapin::lapin::Connection) -> Result<Self, BrokerError> {
        let channel = answered("channel.open", conn.create_channel()).await?;
        answered(
            "confirm.select",
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        Ok(Self { channel })
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes and returns the pending confirm, so callers can pipeline many publishes and
    /// await their confirms together. A `mandatory` message that no queue takes is an error
    /// when its confirm is awaited.
    pub async fn start_with(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> Result<PendingConfirm, BrokerError> {
        let confirm = sent(
            &format!("a publish to {exchange:?}"),
            self.channel.basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            ),
        )
        .await?;
        Ok(PendingConfirm {
            confirm,
            exchange: exchange.to_owned(),
        })
    }

    /// [`Publisher::start_with`] of a message that may go unrouted (topic subscribers).
    pub async fn start(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<PendingConfirm, BrokerError> {
        self.start_with(exchange, routing_key, body, properties, false)
            .await
    }

    /// Publishes and waits until the broker has taken responsibility for the message.
    pub async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BrokerError> {
        self.start(exchange, routing_key, body, properties)
            .await?
            .wait()
            .await
    }

    /// [`Publisher::send`] of a JSON-encoded persistent message.
    pub async fn send_json<T: Serialize>(
        &self,
        exchange: &str,
        routing_key: &str,
        message: &T,
    ) -> Result<(), BrokerError> {
        let body = serde_json::to_vec(message)?;
        self.send(exchange, routing_key, &body, json_properties())
            .await
    }
}

/// A published message whose confirm has not been awaited yet.
pub struct PendingConfirm {
    confirm: PublisherConfirm,
    exchange: String,
}

impl PendingConfirm {
    /// The broker's answer, within [`CONFIRM_TIMEOUT`].
    pub async fn wait(self) -> Result<(), BrokerError> {
        let what = format!("a publish to {:?} with a confirm", self.exchange);
        match within(CONFIRM_TIMEOUT, &what, self.confirm).await? {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => Err(BrokerError::Unroutable {
                exchange: self.exchange,
            }),
            Confirmation::Nack(_) | Confirmation::NotRequested => Err(BrokerError::Nacked {
                exchange: self.exchange,
            }),
        }
    }
}

/// Waits for every confirm; the first refusal or error wins.
pub async fn wait_all(pending: Vec<PendingConfirm>) -> Result<(), BrokerError> {
    for confirm in pending {
        confirm.wait().await?;
    }
    Ok(())
}

/// What a passive declare tells of a queue, without the management plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuePeek {
    pub ready: u64,
    pub consumers: u64,
}

/// Peeks at each of `queues` with a passive declare, on channels from `open`: a queue that
/// does not exist closes the channel it was asked on, so another is opened for the next one.
/// `None` for a queue that does not exist.
pub async fn peek_queues<F, Fut>(
    queues: &[String],
    mut open: F,
) -> Result<Vec<Option<QueuePeek>>, BrokerError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Channel, BrokerError>>,
{
    let mut peeks = Vec::with_capacity(queues.len());
    let mut channel = open().await?;
    for queue in queues {
        let declared = answered(
            &format!("the passive declaration of {queue}"),
            channel.queue_declare(
                queue.as_str().into(),
                deadpool_lapin::lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                deadpool_lapin::lapin::types::FieldTable::default(),
            ),
        )
        .await;
        match declared {
            Ok(q) => peeks.push(Some(QueuePeek {
                ready: u64::from(q.message_count()),
                consumers: u64::from(q.consumer_count()),
            })),
            Err(_) => {
                peeks.push(None);
                channel = open().await?;
            }
        }
    }
    let _ = channel.close(200, "done".into()).await;
    Ok(peeks)
}

#[cfg(test)]
mod frame_tests {
    use super::*;

    #[test]
    fn a_malformed_url_is_a_setting_to_fix_named_without_its_password() {
        let args = BrokerArgs::new("amqp://u:secretpw@127.0.0.1:xx/%2f", "ns");
        let Err(error) = Broker::new(&args, "test") else {
            panic!("a URL with port xx must be refused");
        };
        assert!(!error.is_retryable());
        let message = error.to_string();
        assert!(message.contains("not a valid AMQP URL"), "{message}");
        assert!(
            message.contains("amqp://u:***@127.0.0.1:xx/%2f"),
            "{message}"
        );
        assert!(!message.contains("secretpw"), "{message}");
    }

    #[test]
    fn frame_max_and_heartbeat_are_added_unless_given() {
        assert_eq!(
            with_defaults("amqp://h:5672/%2f", 10),
            "amqp://h:5672/%2f?frame_max=32768&heartbeat=10"
        );
        assert_eq!(
            with_defaults("amqp://h/%2f?heartbeat=600", 10),
            "amqp://h/%2f?heartbeat=600&frame_max=32768"
        );
        assert_eq!(
            with_defaults("amqp://h/%2f?frame_max=131072", 0),
            "amqp://h/%2f?frame_max=131072&heartbeat=0"
        );
    }
}
