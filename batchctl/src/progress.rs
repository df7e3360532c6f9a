//! Live progress of one job: JobStatus records from `{ns}.status`, with a query once a second
//! as a fallback, shown as a bar on a terminal and as plain lines elsewhere.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use common::broker::{Broker, BrokerError};
use common::contract::{JobState, JobStatus};
use common::rpc::RpcClient;
use common::wire::{Request, Response};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};

/// How long a just-submitted job may stay unknown (the splitter has not taken it yet).
const UNKNOWN_GRACE: Duration = Duration::from_secs(60);

enum Display {
    Bar(ProgressBar),
    Lines {
        last: Option<Instant>,
        rate: RateWindow,
    },
}

/// The current speed of a job: operations finished over the last [`RateWindow::SPAN`], so it
/// follows the job's speed now rather than its average since the start.
#[derive(Debug, Default)]
struct RateWindow {
    samples: std::collections::VecDeque<(Instant, u64)>,
}

impl RateWindow {
    const SPAN: Duration = Duration::from_secs(10);

    fn add(&mut self, at: Instant, done: u64) {
        self.samples.push_back((at, done));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| at.duration_since(*t) > Self::SPAN)
            && self.samples.len() > 2
        {
            self.samples.pop_front();
        }
    }

    /// Operations per second over the window; `None` until two samples apart in time.
    fn per_second(&self) -> Option<f64> {
        let (t0, d0) = self.samples.front()?;
        let (t1, d1) = self.samples.back()?;
        let seconds = t1.duration_since(*t0).as_secs_f64();
        (seconds > 0.0).then(|| d1.saturating_sub(*d0) as f64 / seconds)
    }

    /// Time left for `remaining` operations at the current speed.
    fn eta(&self, remaining: u64) -> Option<Duration> {
        let rate = self.per_second()?;
        (rate > 0.0).then(|| Duration::from_secs_f64(remaining as f64 / rate))
    }
}

fn format_eta(eta: Option<Duration>) -> String {
    match eta {
        None => "?".to_owned(),
        Some(d) => {
            let secs = d.as_secs();
            if secs >= 3600 {
                format!("{}h{:02}m", secs / 3600, secs % 3600 / 60)
            } else if secs >= 60 {
                format!("{}m{:02}s", secs / 60, secs % 60)
            } else {
                format!("{:.1}s", d.as_secs_f64())
            }
        }
    }
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
            Display::Lines {
                last: None,
                rate: RateWindow::default(),
            }
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
            Display::Lines { last, rate } => {
                let now = Instant::now();
                rate.add(now, done);
                let due = last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
                if due || status.state.is_terminal() {
                    *last = Some(now);
                    let elapsed = started.elapsed().as_secs_f64();
                    let eta = if status.state.is_terminal() {
                        Some(Duration::ZERO)
                    } else {
                        rate.eta(status.ops_total.saturating_sub(done))
                    };
                    eprintln!(
                        "{:>7.1}s  {}  {}/{} ops ({})  {} failed  {:.0} ops/s  ETA {}  {} fragments out",
                        elapsed,
                        status.state,
                        done,
                        status.ops_total,
                        crate::table::percent(status),
                        status.ops_failed,
                        rate.per_second().unwrap_or(0.0),
                        format_eta(eta),
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
    let mut updates = common::consume::subscribe(
        &channel,
        &broker.names().status(),
        &format!("job.{job_id}.*"),
        "",
    )
    .await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_follows_the_recent_speed() {
        let start = Instant::now();
        let mut window = RateWindow::default();
        assert_eq!(window.per_second(), None);
        // 100 ops/s for 20 s, then 1000 ops/s for 10 s: the window sees only the latter.
        let mut done = 0;
        for s in 0..=20 {
            done = s * 100;
            window.add(start + Duration::from_secs(s), done);
        }
        for s in 21..=30 {
            done += 1000;
            window.add(start + Duration::from_secs(s), done);
        }
        let rate = window.per_second().unwrap_or_default();
        assert!((rate - 1000.0).abs() < 1e-6, "{rate}");
        assert_eq!(window.eta(5000), Some(Duration::from_secs(5)));
    }

    #[test]
    fn eta_reads_like_a_duration() {
        assert_eq!(format_eta(None), "?");
        assert_eq!(format_eta(Some(Duration::from_millis(4200))), "4.2s");
        assert_eq!(format_eta(Some(Duration::from_secs(125))), "2m05s");
        assert_eq!(format_eta(Some(Duration::from_secs(7300))), "2h01m");
    }
}
