//! Turning deliveries from `{ns}.jobs` and `{ns}.splitter` into [`Command`]s.

use common::contract::CancelRequest;
use common::jobspec::{ParseLimits, parse_job_spec};
use common::lapin::BasicProperties;
use common::lapin::message::Delivery;
use common::lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use common::topology::{KEY_CANCEL, KEY_SETTLED, KEY_SUBMIT};
use common::wire::{SplitterInput, decode_splitter_inputs};

use crate::window::{Command, DeadCopy};

/// Header that carries the reason a message was refused, on its copy in `{ns}.dead`.
pub const REASON_HEADER: &str = "x-batchq-error";

/// Decodes a delivery from `{ns}.jobs`.
pub fn job_command(delivery: &Delivery, limits: ParseLimits, at_ms: i64) -> Command {
    let routing_key = delivery.routing_key.as_str();
    let content_type = delivery
        .properties
        .content_type()
        .as_ref()
        .map(|s| s.as_str());
    let message_id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|s| s.as_str());
    match routing_key {
        KEY_SUBMIT => match parse_job_spec(&delivery.data, content_type, message_id, limits) {
            Ok(spec) => Command::Submit { spec, at_ms },
            Err(rejection) => {
                let dead = dead_copy(delivery, &rejection.error);
                Command::Reject {
                    rejection,
                    dead,
                    at_ms,
                }
            }
        },
        KEY_CANCEL => match serde_json::from_slice::<CancelRequest>(&delivery.data) {
            Ok(cancel) => Command::Cancel {
                job_id: cancel.job_id,
            },
            Err(e) => Command::Dead(dead_copy(delivery, &format!("not a CancelRequest: {e}"))),
        },
        other => Command::Dead(dead_copy(
            delivery,
            &format!("routing key {other:?} is neither \"submit\" nor \"cancel\""),
        )),
    }
}

/// Decodes a message of settlements from `{ns}.splitter` into its commands, in order. A
/// message that is not one becomes a dead copy; so does each element of it that is not
/// understood, alone (the others are applied).
pub fn settled(delivery: &Delivery) -> Vec<Command> {
    match decode_splitter_inputs(&delivery.data) {
        Ok(inputs) => inputs
            .into_iter()
            .map(|input| match input {
                Ok(SplitterInput::Settled(settled)) => Command::Settle(settled),
                Ok(SplitterInput::Halt { job_id }) => Command::Halt { job_id },
                Err((error, text)) => {
                    let mut dead = dead_copy(delivery, &format!("not a settlement: {error}"));
                    dead.body = text;
                    Command::Dead(dead)
                }
            })
            .collect(),
        Err(e) => vec![Command::Dead(dead_copy(
            delivery,
            &format!("not a settlement: {e}"),
        ))],
    }
}

/// A message of ours (re-encoded from what it said) for `{ns}.dead`, with the reason.
pub fn internal_dead_copy(routing_key: &str, body: Vec<u8>, reason: &str) -> DeadCopy {
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from(REASON_HEADER),
        AMQPValue::LongString(LongString::from(reason)),
    );
    DeadCopy {
        routing_key: routing_key.to_owned(),
        body,
        properties: common::broker::json_properties().with_headers(headers),
    }
}

/// A settlement or halt (or a dead copy already) for `{ns}.dead`, with `reason`.
pub fn command_dead_copy(command: &Command, reason: &str) -> DeadCopy {
    let input = match command {
        Command::Settle(settled) => SplitterInput::Settled(settled.clone()),
        Command::Halt { job_id } => SplitterInput::Halt {
            job_id: job_id.clone(),
        },
        Command::Dead(dead) => return dead.clone(),
        other => {
            let body = format!("{other:?}").into_bytes();
            return internal_dead_copy(KEY_SETTLED, body, reason);
        }
    };
    let body =
        serde_json::to_vec(&input).unwrap_or_else(|e| format!("{input:?}: {e}").into_bytes());
    internal_dead_copy(KEY_SETTLED, body, reason)
}

/// The original message, properties and all, with the reason added to its headers.
pub fn dead_copy(delivery: &Delivery, reason: &str) -> DeadCopy {
    let mut headers: FieldTable = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert(
        ShortString::from(REASON_HEADER),
        AMQPValue::LongString(LongString::from(reason)),
    );
    let properties: BasicProperties = delivery.properties.clone().with_headers(headers);
    DeadCopy {
        routing_key: delivery.routing_key.as_str().to_owned(),
        body: delivery.data.clone(),
        properties,
    }
}
