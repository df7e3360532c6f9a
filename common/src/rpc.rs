//! The client side of the reducer's request/reply: requests to the `{ns}.rpc` exchange,
//! replies through direct reply-to (`amq.rabbitmq.reply-to`), which needs no queue at all.

use std::time::Duration;

use deadpool_lapin::lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
};
use deadpool_lapin::lapin::types::{FieldTable, ShortString};
use deadpool_lapin::lapin::{Channel, Confirmation, Consumer};
use futures::StreamExt;

use crate::broker::{Broker, BrokerError, transient_json_properties};
use crate::topology::KEY_RPC;
use crate::wire::{Request, Response};

const REPLY_TO: &str = "amq.rabbitmq.reply-to";
/// Pause before a request that found no reducer bound is sent again.
const UNROUTED_RETRY: Duration = Duration::from_millis(100);
/// Wait for a reply before the request is sent again, doubled at each copy: long enough for
/// the heaviest query (a results page, the recent jobs) on a busy reducer, so copies stay few.
const FIRST_RESEND: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(
        "no reducer answered on {exchange} within {secs} s (is a reducer running in namespace {namespace:?}?)"
    )]
    NoAnswer {
        exchange: String,
        namespace: String,
        secs: u64,
    },
    #[error("malformed reply from the reducer: {0}")]
    Malformed(String),
}

/// One channel, consuming its own direct reply-to, for a series of requests.
pub struct RpcClient {
    channel: Channel,
    replies: Consumer,
    exchange: String,
    namespace: String,
    timeout: Duration,
    next_id: u64,
}

impl RpcClient {
    pub async fn connect(broker: &Broker, timeout: Duration) -> Result<Self, RpcError> {
        let channel = broker.channel().await?;
        let replies = channel
            .basic_consume(
                REPLY_TO.into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(BrokerError::from)?;
        // Confirms tell a request no reducer took (returned) from one a reducer's queue holds.
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(BrokerError::from)?;
        Ok(Self {
            channel,
            replies,
            exchange: broker.names().rpc(),
            namespace: broker.names().namespace().to_owned(),
            timeout,
            next_id: 0,
        })
    }

    /// Whether the client's channel still works (it does not after the broker went away).
    pub fn is_open(&self) -> bool {
        self.channel.status().connected()
    }

    /// Closes the client's channel.
    pub async fn close(&self) {
        let _ = self.channel.close(200, "done".into()).await;
    }

    /// Sends `request` and waits for its reply.
    pub async fn call(&mut self, request: &Request) -> Result<Response, RpcError> {
        self.next_id += 1;
        let correlation = format!("rpc-{}", self.next_id);
        let body = serde_json::to_vec(request).map_err(BrokerError::from)?;
        let deadline = tokio::time::Instant::now() + self.timeout;
        let exchange = async {
            let mut patience = FIRST_RESEND;
            loop {
                self.deliver(&body, &correlation).await?;
                // A reducer session that took the request and then lost its connection (its
                // node died) never answers, and its private queue is gone with the request:
                // unanswered, the request is sent again, to whichever session is bound now.
                // The first reply wins; one to an earlier copy is told apart by nothing, as
                // every copy asks the same.
                match tokio::time::timeout(patience, self.reply(&correlation)).await {
                    Ok(reply) => return reply,
                    Err(_) => patience *= 2,
                }
            }
        };
        match tokio::time::timeout_at(deadline, exchange).await {
            Ok(result) => result,
            Err(_) => Err(self.no_answer()),
        }
    }

    /// The next reply that answers `correlation`.
    async fn reply(&mut self, correlation: &str) -> Result<Response, RpcError> {
        while let Some(delivery) = self.replies.next().await {
            let delivery = delivery.map_err(BrokerError::from)?;
            let matches = delivery
                .properties
                .correlation_id()
                .as_ref()
                .is_some_and(|id| id.as_str() == correlation);
            if matches {
                return serde_json::from_slice::<Response>(&delivery.data)
                    .map_err(|e| RpcError::Malformed(e.to_string()));
            }
            // A late reply to an earlier request, or a second one to a copy sent again.
        }
        Err(RpcError::Broker(BrokerError::ConsumerEnded))
    }

    fn no_answer(&self) -> RpcError {
        RpcError::NoAnswer {
            exchange: self.exchange.clone(),
            namespace: self.namespace.clone(),
            secs: self.timeout.as_secs(),
        }
    }

    /// Publishes the request until a reducer's queue takes it. The queue is private to a
    /// reducer session, so between sessions (a restart, a broker node lost) nothing is bound:
    /// the publish is mandatory, the broker returns it, and it is sent again shortly, until
    /// the caller's deadline, as the durable queue of earlier releases would have held it.
    async fn deliver(&self, body: &[u8], correlation: &str) -> Result<(), RpcError> {
        loop {
            let confirm = crate::broker::sent(
                "a request",
                self.channel.basic_publish(
                    self.exchange.as_str().into(),
                    KEY_RPC.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    body,
                    transient_json_properties()
                        .with_reply_to(ShortString::from(REPLY_TO))
                        .with_correlation_id(ShortString::from(correlation)),
                ),
            )
            .await?
            .await
            .map_err(BrokerError::from)?;
            match confirm {
                Confirmation::Ack(None) => return Ok(()),
                // Returned: no reducer session is bound right now.
                Confirmation::Ack(Some(_)) => tokio::time::sleep(UNROUTED_RETRY).await,
                Confirmation::Nack(_) | Confirmation::NotRequested => {
                    return Err(RpcError::Broker(BrokerError::Nacked {
                        exchange: self.exchange.clone(),
                    }));
                }
            }
        }
    }
}
