//! Keeping refused messages on `{ns}.dead`, and reading them back.
//!
//! Every component that gives up on a message keeps a copy through [`DeadLetter`]: the body and
//! properties unchanged, plus headers that say why ([`REASON_HEADER`]), where the message was
//! going ([`ORIGIN_EXCHANGE_HEADER`], [`ORIGIN_ROUTING_KEY_HEADER`]), whose it is
//! ([`JOB_ID_HEADER`]) and when it was kept ([`KEPT_AT_HEADER`]). The broker dead-letters
//! messages of its own (a quorum queue's delivery limit) with an `x-death` header instead;
//! [`DeadInfo`] reads either, so `batchctl dead` can list them and put them back.

use std::collections::BTreeMap;

use deadpool_lapin::lapin::BasicProperties;
use deadpool_lapin::lapin::message::Delivery;
use deadpool_lapin::lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use serde::Deserialize;

use crate::broker::{BrokerError, Publisher};
use crate::topology::Names;

/// Why the message was refused, in words that name the problem.
pub const REASON_HEADER: &str = "x-batchq-error";
/// The exchange the message had been published to when it was refused.
pub const ORIGIN_EXCHANGE_HEADER: &str = "x-batchq-origin-exchange";
/// The routing key it had been published with.
pub const ORIGIN_ROUTING_KEY_HEADER: &str = "x-batchq-origin-routing-key";
/// The job the message belongs to, when that is known.
pub const JOB_ID_HEADER: &str = "x-batchq-job-id";
/// When it was kept: an AMQP timestamp (seconds since the epoch), as the broker's `x-death`.
pub const KEPT_AT_HEADER: &str = "x-batchq-kept-at";
/// The broker's own dead-lettering record, most recent first.
pub const X_DEATH_HEADER: &str = "x-death";
/// Deliveries a quorum queue counted; meaningless once the message is in another queue.
pub const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

/// The headers batchq adds when it keeps a message, which it strips when it puts it back.
pub const BATCHQ_HEADERS: [&str; 5] = [
    REASON_HEADER,
    ORIGIN_EXCHANGE_HEADER,
    ORIGIN_ROUTING_KEY_HEADER,
    JOB_ID_HEADER,
    KEPT_AT_HEADER,
];

/// A copy of a refused message, ready to publish to `{ns}.dead`.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The original routing key (`{ns}.dead` is a fanout exchange; kept for a reader's sake).
    pub routing_key: String,
    pub body: Vec<u8>,
    pub properties: BasicProperties,
}

impl DeadLetter {
    /// A copy of `delivery` with the reason, its origin, the job id (`job_id`, else the body's
    /// `job_id` when it is a JSON object that has one) and the time it was kept.
    pub fn of(delivery: &Delivery, reason: &str, job_id: Option<&str>) -> Self {
        Self::from_parts(
            delivery.exchange.as_str(),
            delivery.routing_key.as_str(),
            delivery.data.clone(),
            &delivery.properties,
            reason,
            job_id,
        )
    }

    /// [`DeadLetter::of`] from the parts of a message.
    pub fn from_parts(
        exchange: &str,
        routing_key: &str,
        body: Vec<u8>,
        properties: &BasicProperties,
        reason: &str,
        job_id: Option<&str>,
    ) -> Self {
        let mut headers = properties.headers().clone().unwrap_or_default();
        let mut put = |name: &str, value: AMQPValue| {
            headers.insert(ShortString::from(name), value);
        };
        put(REASON_HEADER, text(reason));
        put(ORIGIN_EXCHANGE_HEADER, text(exchange));
        put(ORIGIN_ROUTING_KEY_HEADER, text(routing_key));
        let job_id = job_id.map(str::to_owned).or_else(|| job_id_in_body(&body));
        if let Some(job_id) = job_id {
            put(JOB_ID_HEADER, text(&job_id));
        }
        let now_secs = crate::timefmt::now_ms().max(0) as u64 / 1000;
        put(KEPT_AT_HEADER, AMQPValue::Timestamp(now_secs));
        Self {
            routing_key: routing_key.to_owned(),
            body,
            properties: properties.clone().with_headers(headers),
        }
    }

    /// Publishes the copy to `{ns}.dead` (mandatory, so a missing queue is an error) and waits
    /// for the broker's confirm: only then may the original be acked.
    pub async fn keep(&self, publisher: &Publisher, names: &Names) -> Result<(), BrokerError> {
        publisher
            .start_with(
                &names.dead(),
                &self.routing_key,
                &self.body,
                self.properties.clone(),
                true,
            )
            .await?
            .wait()
            .await
    }
}

/// Keeps a copy of `delivery` on `{ns}.dead` with `reason`, confirmed. The caller acks (or
/// drops) the original afterwards.
pub async fn keep(
    publisher: &Publisher,
    names: &Names,
    delivery: &Delivery,
    reason: &str,
    job_id: Option<&str>,
) -> Result<(), BrokerError> {
    DeadLetter::of(delivery, reason, job_id)
        .keep(publisher, names)
        .await
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// The `job_id` of a JSON object body, if it has a string one.
pub fn job_id_in_body(body: &[u8]) -> Option<String> {
    // Only the one field is kept; the rest of the body is skipped, whatever it holds.
    #[derive(Deserialize)]
    struct WithJobId {
        job_id: Option<serde_json::Value>,
    }
    let parsed: WithJobId = serde_json::from_slice(body).ok()?;
    match parsed.job_id? {
        serde_json::Value::String(id) if !id.is_empty() => Some(id),
        _ => None,
    }
}

/// Where a kept message was going: the place `batchctl dead requeue` puts it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// `""` is the default exchange (published straight to a queue).
    pub exchange: String,
    pub routing_key: String,
}

/// Who put a message on `{ns}.dead`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeptBy {
    /// A batchq component, through [`DeadLetter`].
    Batchq,
    /// The broker's own dead-lettering (`x-death`), e.g. a quorum queue's delivery limit.
    Broker,
    /// Neither: someone published it there by hand.
    Unknown,
}

/// What the headers (and body) of a message on `{ns}.dead` say about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadInfo {
    pub kept_by: KeptBy,
    pub reason: Option<String>,
    pub job_id: Option<String>,
    pub origin: Option<Origin>,
    /// Seconds since the epoch.
    pub kept_at_secs: Option<u64>,
}

impl DeadInfo {
    /// batchq's headers first; else the most recent `x-death` entry; the job id from the
    /// header, else the body.
    pub fn read(properties: &BasicProperties, body: &[u8]) -> Self {
        let empty = FieldTable::default();
        let headers = properties.headers().as_ref().unwrap_or(&empty);
        let death = headers
            .inner()
            .get(X_DEATH_HEADER)
            .and_then(first_death_entry);
        let batchq_reason = string_header(headers, REASON_HEADER);
        let kept_by = match (&batchq_reason, death) {
            (Some(_), _) => KeptBy::Batchq,
            (None, Some(_)) => KeptBy::Broker,
            (None, None) => KeptBy::Unknown,
        };
        let reason = batchq_reason.or_else(|| death.map(death_reason));
        let batchq_origin = match (
            string_header(headers, ORIGIN_EXCHANGE_HEADER),
            string_header(headers, ORIGIN_ROUTING_KEY_HEADER),
        ) {
            (Some(exchange), Some(routing_key)) => Some(Origin {
                exchange,
                routing_key,
            }),
            _ => None,
        };
        let origin = batchq_origin.or_else(|| death.and_then(death_origin));
        let kept_at_secs = headers
            .inner()
            .get(KEPT_AT_HEADER)
            .and_then(timestamp)
            .or_else(|| {
                death
                    .and_then(|d| d.inner().get("time"))
                    .and_then(timestamp)
            });
        let job_id = string_header(headers, JOB_ID_HEADER).or_else(|| job_id_in_body(body));
        Self {
            kept_by,
            reason,
            job_id,
            origin,
            kept_at_secs,
        }
    }
}

/// The properties of a kept message as it goes back to its origin: batchq's dead headers and
/// the dead queue's delivery count removed; `x-death` kept, as the broker keeps it, so the
/// message's history stays readable if it is refused again.
pub fn properties_for_return(properties: &BasicProperties) -> BasicProperties {
    let Some(headers) = properties.headers() else {
        return properties.clone();
    };
    let kept: BTreeMap<ShortString, AMQPValue> = headers
        .inner()
        .iter()
        .filter(|(name, _)| {
            let name = name.as_str();
            !BATCHQ_HEADERS.contains(&name) && name != DELIVERY_COUNT_HEADER
        })
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    properties.clone().with_headers(FieldTable::from(kept))
}

fn value_text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn string_header(headers: &FieldTable, name: &str) -> Option<String> {
    headers.inner().get(name).and_then(value_text)
}

fn timestamp(value: &AMQPValue) -> Option<u64> {
    match value {
        AMQPValue::Timestamp(secs) => Some(*secs),
        AMQPValue::LongLongInt(secs) => u64::try_from(*secs).ok(),
        _ => None,
    }
}

fn first_death_entry(value: &AMQPValue) -> Option<&FieldTable> {
    match value {
        AMQPValue::FieldArray(entries) => entries.as_slice().iter().find_map(|entry| match entry {
            AMQPValue::FieldTable(table) => Some(table),
            _ => None,
        }),
        _ => None,
    }
}

/// "dead-lettered by the broker: delivery_limit in queue q".
fn death_reason(death: &FieldTable) -> String {
    let why = string_header(death, "reason").unwrap_or_else(|| "no reason given".to_owned());
    match string_header(death, "queue") {
        Some(queue) => format!("dead-lettered by the broker: {why} in queue {queue}"),
        None => format!("dead-lettered by the broker: {why}"),
    }
}

/// The exchange and first routing key of an `x-death` entry.
fn death_origin(death: &FieldTable) -> Option<Origin> {
    let exchange = string_header(death, "exchange")?;
    let routing_key = match death.inner().get("routing-keys")? {
        AMQPValue::FieldArray(keys) => keys.as_slice().iter().find_map(value_text)?,
        _ => return None,
    };
    Some(Origin {
        exchange,
        routing_key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
        let mut table = FieldTable::default();
        for (name, value) in entries {
            table.insert(ShortString::from(*name), value.clone());
        }
        table
    }

    fn header<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
        properties.headers().as_ref()?.inner().get(name)
    }

    #[test]
    fn a_kept_copy_says_why_where_and_whose() {
        let original = BasicProperties::default()
            .with_message_id(ShortString::from("m-1"))
            .with_headers(table(&[("user", text("kept"))]));
        let body = br#"{"job_id": "j-7", "operation": 3}"#.to_vec();
        let dead = DeadLetter::from_parts(
            "ns.jobs",
            "submit",
            body.clone(),
            &original,
            "operation: not a string",
            None,
        );
        assert_eq!(dead.body, body);
        assert_eq!(dead.routing_key, "submit");
        assert_eq!(
            dead.properties.message_id().as_ref().map(|s| s.as_str()),
            Some("m-1")
        );
        assert_eq!(header(&dead.properties, "user"), Some(&text("kept")));
        let info = DeadInfo::read(&dead.properties, &dead.body);
        assert_eq!(info.kept_by, KeptBy::Batchq);
        assert_eq!(info.reason.as_deref(), Some("operation: not a string"));
        assert_eq!(info.job_id.as_deref(), Some("j-7"));
        assert_eq!(
            info.origin,
            Some(Origin {
                exchange: "ns.jobs".into(),
                routing_key: "submit".into()
            })
        );
        let now = crate::timefmt::now_ms() as u64 / 1000;
        let kept_at = info.kept_at_secs.unwrap_or(0);
        assert!(now.abs_diff(kept_at) <= 5, "kept at {kept_at}, now {now}");
    }

    #[test]
    fn a_given_job_id_wins_over_the_body() {
        let dead = DeadLetter::from_parts(
            "ns.jobs",
            "submit",
            b"not json".to_vec(),
            &BasicProperties::default(),
            "not JSON",
            Some("from-message-id"),
        );
        let info = DeadInfo::read(&dead.properties, &dead.body);
        assert_eq!(info.job_id.as_deref(), Some("from-message-id"));
    }

    #[test]
    fn the_body_job_id_counts_only_when_it_is_a_string() {
        assert_eq!(
            job_id_in_body(br#"{"job_id":"a","x":[1,2]}"#),
            Some("a".into())
        );
        assert_eq!(job_id_in_body(br#"{"job_id":12}"#), None);
        assert_eq!(job_id_in_body(br#"{"job_id":""}"#), None);
        assert_eq!(job_id_in_body(br#"[{"job_id":"a"}]"#), None);
        assert_eq!(job_id_in_body(b"\xff"), None);
    }

    fn x_death(queue: &str, exchange: &str, key: &str, time: u64) -> AMQPValue {
        AMQPValue::FieldTable(table(&[
            ("reason", text("delivery_limit")),
            ("queue", text(queue)),
            ("exchange", text(exchange)),
            (
                "routing-keys",
                AMQPValue::FieldArray(vec![text(key)].into()),
            ),
            ("time", AMQPValue::Timestamp(time)),
            ("count", AMQPValue::LongLongInt(1)),
        ]))
    }

    #[test]
    fn a_broker_dead_letter_reads_from_its_latest_x_death_entry() {
        let deaths = AMQPValue::FieldArray(
            vec![
                x_death("ns.splitter", "ns.events", "settled", 1_800_000_000),
                x_death("ns.jobs", "ns.jobs", "submit", 1_700_000_000),
            ]
            .into(),
        );
        let properties =
            BasicProperties::default().with_headers(table(&[(X_DEATH_HEADER, deaths)]));
        let info = DeadInfo::read(&properties, br#"{"job_id":"b-1"}"#);
        assert_eq!(info.kept_by, KeptBy::Broker);
        assert_eq!(
            info.reason.as_deref(),
            Some("dead-lettered by the broker: delivery_limit in queue ns.splitter")
        );
        assert_eq!(
            info.origin,
            Some(Origin {
                exchange: "ns.events".into(),
                routing_key: "settled".into()
            })
        );
        assert_eq!(info.kept_at_secs, Some(1_800_000_000));
        assert_eq!(info.job_id.as_deref(), Some("b-1"));
    }

    #[test]
    fn a_message_published_by_hand_has_no_origin() {
        let info = DeadInfo::read(&BasicProperties::default(), b"hello");
        assert_eq!(info.kept_by, KeptBy::Unknown);
        assert_eq!(info.origin, None);
        assert_eq!(info.reason, None);
        assert_eq!(info.job_id, None);
    }

    #[test]
    fn a_returned_message_loses_the_dead_headers_and_keeps_its_history() {
        let dead = DeadLetter::from_parts(
            "ns.jobs",
            "submit",
            b"{}".to_vec(),
            &BasicProperties::default().with_headers(table(&[
                ("user", text("kept")),
                (
                    X_DEATH_HEADER,
                    AMQPValue::FieldArray(vec![x_death("q", "e", "k", 1)].into()),
                ),
            ])),
            "bad",
            Some("j"),
        );
        let mut headers = dead.properties.headers().clone().unwrap_or_default();
        headers.insert(
            ShortString::from(DELIVERY_COUNT_HEADER),
            AMQPValue::LongLongInt(3),
        );
        let returned = properties_for_return(&dead.properties.clone().with_headers(headers));
        let names: Vec<&str> = returned
            .headers()
            .as_ref()
            .map(|h| h.inner().keys().map(|k| k.as_str()).collect())
            .unwrap_or_default();
        assert_eq!(names, vec!["user", X_DEATH_HEADER]);
    }
}
