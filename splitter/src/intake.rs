//! Turning deliveries from `{ns}.jobs` and `{ns}.splitter` into [`Command`]s.

use common::contract::{CancelRequest, RedriveRequest};
use common::jobspec::{ParseLimits, parse_job_spec};
use common::lapin::message::Delivery;
use common::topology::{KEY_CANCEL, KEY_REDRIVE, KEY_SETTLED, KEY_SUBMIT};
use common::wire::{SplitterInput, decode_splitter_inputs};

use crate::window::{Command, DeadCopy};

/// Header that carries the reason a message was refused, on its copy in `{ns}.dead`.
pub const REASON_HEADER: &str = common::dead::REASON_HEADER;

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
                let dead = job_dead_copy(delivery, &rejection.error, Some(&rejection.job_id));
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
        KEY_REDRIVE => match serde_json::from_slice::<RedriveRequest>(&delivery.data) {
            Ok(redrive) => Command::Redrive {
                job_id: redrive.job_id,
            },
            Err(e) => Command::Dead(dead_copy(delivery, &format!("not a RedriveRequest: {e}"))),
        },
        other => Command::Dead(dead_copy(
            delivery,
            &format!("routing key {other:?} is none of \"submit\", \"cancel\", \"redrive\""),
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
                Ok(SplitterInput::Halt { job_id, round }) => Command::Halt { job_id, round },
                Ok(SplitterInput::Redrive { job_id, round }) => Command::Redriven { job_id, round },
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

/// A message of ours (re-encoded from what it said) for `{ns}.dead`, with the reason, as if
/// it had come from `exchange` with `routing_key` (where `batchctl dead requeue` sends it).
pub fn internal_dead_copy(
    exchange: &str,
    routing_key: &str,
    body: Vec<u8>,
    reason: &str,
) -> DeadCopy {
    let kept = common::dead::DeadLetter::from_parts(
        exchange,
        routing_key,
        body,
        &common::broker::json_properties(),
        reason,
        None,
    );
    DeadCopy {
        routing_key: kept.routing_key,
        body: kept.body,
        properties: kept.properties,
    }
}

/// A settlement or halt (or a dead copy already) for `{ns}.dead`, with `reason`; `events` is
/// the exchange settlements come by.
pub fn command_dead_copy(events: &str, command: &Command, reason: &str) -> DeadCopy {
    let input = match command {
        Command::Settle(settled) => SplitterInput::Settled(settled.clone()),
        Command::Halt { job_id, round } => SplitterInput::Halt {
            job_id: job_id.clone(),
            round: *round,
        },
        Command::Redriven { job_id, round } => SplitterInput::Redrive {
            job_id: job_id.clone(),
            round: *round,
        },
        Command::Dead(dead) => return dead.clone(),
        other => {
            let body = format!("{other:?}").into_bytes();
            return internal_dead_copy(events, KEY_SETTLED, body, reason);
        }
    };
    let body =
        serde_json::to_vec(&input).unwrap_or_else(|e| format!("{input:?}: {e}").into_bytes());
    internal_dead_copy(events, KEY_SETTLED, body, reason)
}

/// The original message, properties and all, with the reason and origin added to its headers
/// (`common::dead`, as every component keeps its refusals).
pub fn dead_copy(delivery: &Delivery, reason: &str) -> DeadCopy {
    job_dead_copy(delivery, reason, None)
}

/// [`dead_copy`] of a message whose job is known (a rejected JobSpec's id may come from its
/// `message_id`, which the body alone would not tell a reader of `{ns}.dead`).
fn job_dead_copy(delivery: &Delivery, reason: &str, job_id: Option<&str>) -> DeadCopy {
    let kept = common::dead::DeadLetter::of(delivery, reason, job_id);
    DeadCopy {
        routing_key: kept.routing_key,
        body: kept.body,
        properties: kept.properties,
    }
}
