//! Live progress of one job: JobStatus records from `{ns}.status`, with a query once a second
//! as a fallback, shown as a bar on a terminal and as plain lines elsewhere.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use common::broker::{Broker, BrokerError};
use common::contract::{JobState, JobStatus};
use common::lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use common::lapin::types::FieldTable;
use common::rpc::RpcClient;
use common::wire::{Request, Response};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};

/// How long a just-submitted job may stay unknown (the splitter has not taken it yet).
const UNKNOWN_GRACE: Duration = Duration::from_secs(60);

enum Display {
    Bar(ProgressBar),
    Lines { last: Option<Instant> },
}

impl Display {
    fn new() -> Self {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] [{wide_bar}] {human_pos}/{human_len} ops  {per_sec}  ETA {eta}  {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            Display::Bar(bar)
        } else {
            Display::Lines { last: None }
        }
    }

    fn show(&mut self, status: &JobStatus, started: Instant) {
        let done = status.ops_succeeded + status.ops_failed;
        match self {
            Display::Bar(bar) => {
                bar.set_length(status.ops_total);
                bar.set_position(done);
                bar.set_message(format!(
                    "{} · {} failed · {} fragments out",
                    status.state, status.ops_failed, status.fragments_in_flight
                ));
            }
            Display::Lines { last } => {
                let due = last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
                if due || status.state.is_terminal() {
                    *last = Some(Instant::now());
                    let elapsed = started.elapsed().as_secs_f64();
                    let rate = if elapsed > 0.0 {
                        done as f64 / elapsed
                    } else {
                        0.0
                    };
                    eprintln!(
                        "{:>7.1}s  {}  {}/{} ops ({})  {} failed  {:.0} ops/s  {} fragments out",
                        elapsed,
                        status.state,
                        done,
                        status.ops_total,
                        crate::table::percent(status),
                        status.ops_failed,
                        rate,
                        status.fragments_in_flight
                    );
                }
            }
        }
    }

    fn finish(&self) {
        if let Display::Bar(bar) = self {
            bar.finish();
        }
    }
}

/// Shows `job_id`'s progress until it ends; returns its final state.
pub async fn watch(
    broker: &Broker,
    job_id: &str,
    timeout: Duration,
    just_submitted: bool,
) -> anyhow::Result<JobState> {
    // Subscribe before the first query, so no change falls between the two.
    let channel = broker.channel().await?;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(BrokerError::from)?;
    channel
        .queue_bind(
            queue.name().clone(),
            broker.names().status().into(),
            format!("job.{job_id}.*").into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(BrokerError::from)?;
    let mut updates = channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(BrokerError::from)?;
    let mut rpc = RpcClient::connect(broker, timeout).await?;
    let started = Instant::now();
    let mut display = Display::new();
    let mut poll = tokio::time::interval(Duration::from_secs(1));
    let mut latest: Option<JobStatus> = None;
    loop {
        let update = tokio::select! {
            delivery = updates.next() => match delivery {
                Some(Ok(d)) => serde_json::from_slice::<JobStatus>(&d.data).ok(),
                Some(Err(e)) => return Err(BrokerError::from(e).into()),
                None => bail!("the status subscription ended"),
            },
            _ = poll.tick() => match rpc.call(&Request::Status { job_id: job_id.to_owned() }).await? {
                Response::Status(status) => Some(status),
                Response::NotFound { .. } if just_submitted && started.elapsed() < UNKNOWN_GRACE => None,
                Response::NotFound { .. } => bail!("unknown job {job_id}"),
                Response::Error { message } => bail!("the reducer failed to answer: {message}"),
                other => return Err(anyhow!("unexpected reply from the reducer: {other:?}")),
            },
        };
        let Some(status) = update else { continue };
        // Counts only grow: an older record arriving late must not move the display back.
        let newer = latest.as_ref().is_none_or(|l| {
            status.state.is_terminal()
                || (!l.state.is_terminal()
                    && status.ops_succeeded + status.ops_failed >= l.ops_succeeded + l.ops_failed)
        });
        if !newer {
            continue;
        }
        display.show(&status, started);
        if status.state.is_terminal() {
            display.finish();
            eprintln!(
                "job {} {}: {} succeeded, {} failed of {} operations{}",
                status.job_id,
                status.state,
                status.ops_succeeded,
                status.ops_failed,
                status.ops_total,
                status
                    .error
                    .as_ref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            );
            return Ok(status.state);
        }
        latest = Some(status);
    }
}
