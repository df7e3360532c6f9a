//! The client side of the reducer's request/reply on `{ns}.rpc` (direct reply-to).

use std::time::Duration;

use deadpool_lapin::lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use deadpool_lapin::lapin::types::{FieldTable, ShortString};
use deadpool_lapin::lapin::{Channel, Consumer};
use futures::StreamExt;

use crate::broker::{Broker, BrokerError, transient_json_properties};
use crate::wire::{Request, Response};

const REPLY_TO: &str = "amq.rabbitmq.reply-to";

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(
        "no reducer answered on {queue} within {secs} s (is a reducer running in namespace {namespace:?}?)"
    )]
    NoAnswer {
        queue: String,
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
    queue: String,
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
        Ok(Self {
            channel,
            replies,
            queue: broker.names().rpc_queue(),
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
        self.channel
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                transient_json_properties()
                    .with_reply_to(ShortString::from(REPLY_TO))
                    .with_correlation_id(ShortString::from(correlation.as_str())),
            )
            .await
            .map_err(BrokerError::from)?;
        let wait = async {
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
                // A late reply to an earlier, timed-out request: skip it.
            }
            Err(RpcError::Broker(BrokerError::ConsumerEnded))
        };
        match tokio::time::timeout(self.timeout, wait).await {
            Ok(result) => result,
            Err(_) => Err(RpcError::NoAnswer {
                queue: self.queue.clone(),
                namespace: self.namespace.clone(),
                secs: self.timeout.as_secs(),
            }),
        }
    }
}
