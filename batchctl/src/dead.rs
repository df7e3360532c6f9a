//! `batchctl dead`: what `{ns}.dead` holds, put back where it came from, or dropped.
//!
//! Every command walks the whole queue, as it was when the command started, with `basic.get`
//! without acknowledging, so a message it does not act on stays unacknowledged until the end,
//! when one `basic.nack` (multiple, requeue) hands all of them back in their order; if
//! batchctl dies first, the broker returns them when the channel goes. A quorum queue puts
//! returned messages at its back, so taking them all is what keeps their order. `nack` rather
//! than `reject`: RabbitMQ 4.3 and later count a rejected message as a failed delivery, a
//! nacked one not (see docs/operations.md, "Dead letters").

use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use common::broker::{Broker, BrokerError, Publisher, answered};
use common::dead::{DeadInfo, KeptBy, properties_for_return};
use common::lapin::Acker;
use common::lapin::Channel;
use common::lapin::message::Delivery;
use common::lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use common::lapin::types::FieldTable;
use serde::Serialize;

use crate::table::{Align, render};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DeadArgs {
    #[command(subcommand)]
    action: Option<DeadAction>,
    /// Print the records as JSON.
    #[arg(long)]
    json: bool,
    /// Most messages to list, from the head of the queue (the whole queue is still read, and
    /// handed back, to keep its order).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    limit: u32,
}

#[derive(Subcommand)]
enum DeadAction {
    /// Put messages back on the exchange and routing key they came from.
    Requeue {
        /// Only this job's messages; the others stay untouched.
        #[arg(long)]
        job: Option<String>,
    },
    /// Drop messages for good (asks for `--yes`).
    Purge {
        /// Only this job's messages; the others stay untouched.
        #[arg(long)]
        job: Option<String>,
        /// Yes, drop them: dead letters are the only copy of what was refused.
        #[arg(long)]
        yes: bool,
    },
}

pub async fn run(broker: &Broker, args: DeadArgs) -> anyhow::Result<()> {
    // A namespace nothing has run in yet has an empty dead queue, not a missing one.
    broker.declare_topology().await?;
    match args.action {
        None => list(broker, args.json, args.limit).await,
        Some(DeadAction::Requeue { job }) => requeue(broker, job_filter(job)?.as_deref()).await,
        Some(DeadAction::Purge { job, yes }) => {
            if !yes {
                bail!(
                    "dead purge drops {ns}.dead's messages for good (they are the only copy of \
                     what was refused); run it again with --yes to do so",
                    ns = broker.names().namespace()
                );
            }
            purge(broker, job_filter(job)?.as_deref()).await
        }
    }
}

fn job_filter(job: Option<String>) -> anyhow::Result<Option<String>> {
    match job {
        Some(job) if job.trim().is_empty() => bail!("--job needs a job id, not an empty string"),
        other => Ok(other),
    }
}

/// One message of `{ns}.dead`, as listed.
#[derive(Debug, Serialize)]
pub(crate) struct DeadRow {
    /// 1 is the head of the queue.
    pub position: u64,
    pub reason: Option<String>,
    pub job_id: Option<String>,
    /// Body size in bytes.
    pub size: usize,
    pub age_secs: Option<u64>,
    pub kept_at: Option<String>,
    pub kept_by: KeptBy,
    pub origin_exchange: Option<String>,
    pub origin_routing_key: Option<String>,
    pub message_id: Option<String>,
}

impl DeadRow {
    fn of(position: u64, delivery: &Delivery, now_secs: u64) -> Self {
        let info = DeadInfo::read(&delivery.properties, &delivery.data);
        let (origin_exchange, origin_routing_key) = match info.origin {
            Some(origin) => (Some(origin.exchange), Some(origin.routing_key)),
            None => (None, None),
        };
        Self {
            position,
            reason: info.reason,
            job_id: info.job_id,
            size: delivery.data.len(),
            age_secs: info.kept_at_secs.map(|at| now_secs.saturating_sub(at)),
            kept_at: info
                .kept_at_secs
                .map(|at| common::timefmt::format_ms(at.saturating_mul(1000) as i64)),
            kept_by: info.kept_by,
            origin_exchange,
            origin_routing_key,
            message_id: delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.as_str().to_owned()),
        }
    }

    pub(crate) fn origin_text(&self) -> String {
        match (&self.origin_exchange, &self.origin_routing_key) {
            (Some(exchange), Some(key)) if exchange.is_empty() => format!("(default)/{key}"),
            (Some(exchange), Some(key)) => format!("{exchange}/{key}"),
            _ => "-".to_owned(),
        }
    }
}

/// `42s`, `5m`, `3h`, `2d`: the largest whole unit.
fn age_text(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

fn rows_table(rows: &[DeadRow]) -> String {
    let header = [
        ("#", Align::Right),
        ("JOB", Align::Left),
        ("SIZE", Align::Right),
        ("AGE", Align::Right),
        ("ORIGIN", Align::Left),
        ("REASON", Align::Left),
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            vec![
                row.position.to_string(),
                row.job_id.clone().unwrap_or_else(|| "-".into()),
                row.size.to_string(),
                row.age_secs.map(age_text).unwrap_or_else(|| "-".into()),
                row.origin_text(),
                // One line per message, whatever the reason holds.
                row.reason
                    .as_deref()
                    .unwrap_or("-")
                    .replace(['\n', '\r'], " "),
            ]
        })
        .collect();
    render(&header, &cells)
}

/// Lists the first `limit` messages of `{ns}.dead`, then hands every one back.
async fn list(broker: &Broker, json: bool, limit: u32) -> anyhow::Result<()> {
    let queue = broker.names().dead();
    let (rows, present) = read_rows(broker, limit).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("{queue} is empty");
        return Ok(());
    }
    print!("{}", rows_table(&rows));
    if present > rows.len() as u64 {
        println!(
            "{} of {present} messages listed (--limit {limit})",
            rows.len()
        );
    }
    Ok(())
}

/// The first `limit` messages of `{ns}.dead`, described, and how many it held. The queue is
/// read whole and handed back in its order.
pub(crate) async fn read_rows(broker: &Broker, limit: u32) -> anyhow::Result<(Vec<DeadRow>, u64)> {
    let queue = broker.names().dead();
    let channel = broker.channel().await?;
    let mut walk = DeadWalk::start(channel, &queue).await?;
    let now_secs = common::timefmt::now_ms().max(0) as u64 / 1000;
    let mut rows = Vec::new();
    let read = async {
        // Every message is taken, even past the limit: the broker puts a returned message
        // at the back of a quorum queue, so only a whole turn leaves the order as it was.
        while let Some(delivery) = walk.next().await? {
            if rows.len() < limit as usize {
                rows.push(DeadRow::of(walk.position, &delivery, now_secs));
            }
            walk.hand_back(delivery);
        }
        anyhow::Ok(())
    }
    .await;
    let present = walk.present;
    walk.finish().await.and(read)?;
    Ok((rows, present))
}

/// What `requeue` did, for its report.
#[derive(Default)]
struct Requeued {
    requeued: u64,
    /// Messages of other jobs, handed back untouched.
    other: u64,
    /// Matching messages that stayed, each with why.
    stayed: Vec<String>,
}

/// Puts each (matching) message back on its origin with a confirm, then acks it on
/// `{ns}.dead`. A message whose origin is unknown, or whose origin routes it nowhere, stays.
async fn requeue(broker: &Broker, job: Option<&str>) -> anyhow::Result<()> {
    let queue = broker.names().dead();
    // Publishing and reading on separate connections, as everywhere in batchq.
    let session = broker.session().await?;
    let publisher = session.publisher().await?;
    let channel = session.plain_channel().await?;
    let mut walk = DeadWalk::start(channel, &queue).await?;
    let mut done = Requeued::default();
    let moved = requeue_each(&mut walk, &publisher, job, &mut done).await;
    let _ = publisher.channel().close(200, "requeued".into()).await;
    walk.finish().await.and(moved).with_context(|| {
        format!(
            "requeue stopped after {} message(s); the rest stay on {queue}",
            done.requeued
        )
    })?;
    let left = done.other + done.stayed.len() as u64;
    println!(
        "requeued {} message(s) to their origin; {left} left on {queue}",
        done.requeued
    );
    for why in &done.stayed {
        println!("not requeued: {why}");
    }
    Ok(())
}

async fn requeue_each(
    walk: &mut DeadWalk,
    publisher: &Publisher,
    job: Option<&str>,
    done: &mut Requeued,
) -> anyhow::Result<()> {
    while let Some(delivery) = walk.next().await? {
        let info = DeadInfo::read(&delivery.properties, &delivery.data);
        if !matches_job(job, &info) {
            done.other += 1;
            walk.hand_back(delivery);
            continue;
        }
        let which = describe(walk.position, &info);
        let Some(origin) = info.origin else {
            done.stayed
                .push(format!("{which}: where it came from is not known"));
            walk.hand_back(delivery);
            continue;
        };
        // Mandatory: a message its origin no longer routes anywhere must stay here rather
        // than vanish.
        let published = publisher
            .start_with(
                &origin.exchange,
                &origin.routing_key,
                &delivery.data,
                properties_for_return(&delivery.properties),
                true,
            )
            .await?
            .wait()
            .await;
        match published {
            Ok(()) => {
                walk.ack(delivery).await?;
                done.requeued += 1;
            }
            Err(BrokerError::Unroutable { .. }) => {
                done.stayed.push(format!(
                    "{which}: no queue takes routing key {:?} on exchange {:?}",
                    origin.routing_key, origin.exchange
                ));
                walk.hand_back(delivery);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Drops every message of `{ns}.dead`, or only `job`'s.
async fn purge(broker: &Broker, job: Option<&str>) -> anyhow::Result<()> {
    let queue = broker.names().dead();
    let channel = broker.channel().await?;
    let Some(job) = job else {
        let purged = answered(
            &format!("queue.purge of {queue}"),
            channel.queue_purge(queue.as_str().into(), QueuePurgeOptions::default()),
        )
        .await;
        let _ = channel.close(200, "purged".into()).await;
        println!("purged {} message(s) from {queue}", purged?);
        return Ok(());
    };
    let mut walk = DeadWalk::start(channel, &queue).await?;
    let (mut purged, mut left) = (0u64, 0u64);
    let dropped = async {
        while let Some(delivery) = walk.next().await? {
            let info = DeadInfo::read(&delivery.properties, &delivery.data);
            if matches_job(Some(job), &info) {
                walk.ack(delivery).await?;
                purged += 1;
            } else {
                left += 1;
                walk.hand_back(delivery);
            }
        }
        anyhow::Ok(())
    }
    .await;
    walk.finish()
        .await
        .and(dropped)
        .with_context(|| format!("purge stopped after {purged} message(s)"))?;
    println!("purged {purged} message(s) of job {job} from {queue}; {left} left");
    Ok(())
}

fn matches_job(job: Option<&str>, info: &DeadInfo) -> bool {
    job.is_none_or(|job| info.job_id.as_deref() == Some(job))
}

fn describe(position: u64, info: &DeadInfo) -> String {
    match &info.job_id {
        Some(job) => format!("#{position} (job {job})"),
        None => format!("#{position}"),
    }
}

/// Longest wait for the broker to show handed-back messages on the queue again.
const RETURN_PATIENCE: Duration = Duration::from_secs(5);

/// A read of `{ns}.dead` that takes the messages present when it starts (those published
/// meanwhile, e.g. a requeued message refused again, are left for next time) and hands back
/// every one it is not told to keep.
struct DeadWalk {
    channel: Channel,
    queue: String,
    /// Messages on the queue when the walk started.
    present: u64,
    /// Position of the last message taken, 1 for the head.
    position: u64,
    /// Messages taken and acknowledged (requeued elsewhere or purged).
    settled: u64,
    /// The acker of the latest message handed back: one multiple nack on it returns them all.
    last_handed_back: Option<Acker>,
}

impl DeadWalk {
    async fn start(channel: Channel, queue: &str) -> anyhow::Result<Self> {
        let declared = answered(
            &format!("the passive declaration of {queue}"),
            channel.queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await?;
        Ok(Self {
            channel,
            queue: queue.to_owned(),
            present: u64::from(declared.message_count()),
            position: 0,
            settled: 0,
            last_handed_back: None,
        })
    }

    /// The next message, unacknowledged, or `None` past the messages present at the start.
    async fn next(&mut self) -> anyhow::Result<Option<Delivery>> {
        if self.position >= self.present {
            return Ok(None);
        }
        let got = answered(
            &format!("basic.get on {}", self.queue),
            self.channel.basic_get(
                self.queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            ),
        )
        .await?;
        Ok(got.map(|message| {
            self.position += 1;
            message.delivery
        }))
    }

    /// Takes the message off the queue for good.
    async fn ack(&mut self, delivery: Delivery) -> anyhow::Result<()> {
        delivery.acker.ack(BasicAckOptions::default()).await?;
        self.settled += 1;
        Ok(())
    }

    /// Leaves the message on the queue; it goes back when the walk finishes.
    fn hand_back(&mut self, delivery: Delivery) {
        self.last_handed_back = Some(delivery.acker);
    }

    /// Returns every message handed back, in order, waits until the queue shows them again,
    /// and closes the channel (which would return them too, should the nack not reach the
    /// broker).
    async fn finish(self) -> anyhow::Result<()> {
        let returned = match &self.last_handed_back {
            Some(acker) => {
                let nacked = acker
                    .nack(BasicNackOptions {
                        multiple: true,
                        requeue: true,
                    })
                    .await
                    .map(|_| ())
                    .with_context(|| format!("handing messages back to {}", self.queue));
                if nacked.is_ok() {
                    self.wait_until_back().await;
                }
                nacked
            }
            None => Ok(()),
        };
        let _ = self.channel.close(200, "dead letters read".into()).await;
        returned
    }

    /// A quorum queue applies returned messages a moment after the nack: until then they are
    /// neither ready nor visible, and a reader that comes right after this command would find
    /// the queue short, or take the messages behind them first. So wait, for at most
    /// [`RETURN_PATIENCE`], until the queue holds again at least what it held minus what this
    /// walk took off; past that (another reader took some meanwhile) stop waiting.
    async fn wait_until_back(&self) {
        let expected = self.present.saturating_sub(self.settled);
        let deadline = tokio::time::Instant::now() + RETURN_PATIENCE;
        loop {
            let ready = self
                .channel
                .queue_declare(
                    self.queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map(|q| u64::from(q.message_count()));
            match ready {
                Ok(ready) if ready < expected && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_in_their_largest_unit() {
        assert_eq!(age_text(0), "0s");
        assert_eq!(age_text(59), "59s");
        assert_eq!(age_text(60), "1m");
        assert_eq!(age_text(3599), "59m");
        assert_eq!(age_text(7200), "2h");
        assert_eq!(age_text(86_400 * 3 + 5), "3d");
    }

    #[test]
    fn a_table_row_is_one_line_with_its_origin() {
        let row = DeadRow {
            position: 1,
            reason: Some("bad\nfield".into()),
            job_id: Some("j-1".into()),
            size: 12,
            age_secs: Some(90),
            kept_at: None,
            kept_by: KeptBy::Batchq,
            origin_exchange: Some("ns.jobs".into()),
            origin_routing_key: Some("submit".into()),
            message_id: None,
        };
        let text = rows_table(&[row]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[1], "1  j-1    12   1m  ns.jobs/submit  bad field");
    }

    #[test]
    fn an_empty_job_filter_is_refused() {
        assert!(job_filter(Some(" ".into())).is_err());
        assert_eq!(job_filter(None).ok(), Some(None));
    }
}
