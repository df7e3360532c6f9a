//! Live progress of one job: JobStatus records from `{ns}.status`, with a query once a second
//! as a fallback, shown as a bar on a terminal and as plain lines elsewhere.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use common::broker::{Broker, BrokerError};
use common::contract::{JobState, JobStatus};
use common::rpc::{RpcClient, RpcError};
use common::wire::{Request, Response};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// How long a just-submitted job may stay unknown (the splitter has not taken it yet).
const UNKNOWN_GRACE: Duration = Duration::from_secs(60);
/// Pause between two plain progress lines, so a log gets a line a second, not one per status.
const LINE_EVERY: Duration = Duration::from_secs(1);
/// How long a watch keeps trying to get the broker (or the reducer behind it) back after
/// losing it, before it gives up with the error.
const RECONNECT_FOR: Duration = Duration::from_secs(120);
/// Pause between two attempts to reconnect.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// Where progress goes: a live bar on a terminal, a plain line a second elsewhere (a log, CI).
enum Output {
    Bar(ProgressBar),
    Lines { last: Option<Instant> },
}

struct Display {
    output: Output,
    rate: RateWindow,
    /// When batchctl began watching: the elapsed time when the job's own times are unknown.
    watching_since: Instant,
    /// Whether a status was shown (the bar shows counts from then on).
    counting: bool,
    /// What the job waits for, while no status has come.
    waiting: Option<String>,
}

/// The current speed of a job: operations finished over about the last [`RateWindow::SPAN`],
/// so it follows the job's speed now rather than its average since the start (a job watched
/// from the middle, or one that sped up as workers joined, gets a true ETA).
#[derive(Debug, Default)]
struct RateWindow {
    samples: VecDeque<(Instant, u64)>,
}

impl RateWindow {
    const SPAN: Duration = Duration::from_secs(10);
    /// Below this the rate is noise: two statuses a few milliseconds apart (the subscription
    /// and the poll) would show a burst as a speed.
    const MIN_SPAN: Duration = Duration::from_secs(1);

    /// Adds how many operations were done at `at`. Keeps one sample at least [`Self::SPAN`]
    /// old, so the window covers the whole span once the job has run that long.
    fn add(&mut self, at: Instant, done: u64) {
        self.samples.push_back((at, done));
        while self
            .samples
            .get(1)
            .is_some_and(|(t, _)| at.saturating_duration_since(*t) >= Self::SPAN)
        {
            self.samples.pop_front();
        }
    }

    /// Operations per second over the window; `None` until samples span [`Self::MIN_SPAN`].
    fn per_second(&self) -> Option<f64> {
        let (t0, d0) = self.samples.front()?;
        let (t1, d1) = self.samples.back()?;
        let span = t1.saturating_duration_since(*t0);
        (span >= Self::MIN_SPAN).then(|| d1.saturating_sub(*d0) as f64 / span.as_secs_f64())
    }

    /// Time left for `remaining` operations at the current speed; `None` while the speed is
    /// unknown or zero (a stalled job has no ETA).
    fn eta(&self, remaining: u64) -> Option<Duration> {
        let rate = self.per_second()?;
        (rate > 0.0).then(|| Duration::from_secs_f64(remaining as f64 / rate))
    }
}

/// What the display shows besides the counts.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Pace {
    elapsed: Duration,
    /// Operations per second, now.
    rate: Option<f64>,
    eta: Option<Duration>,
}

impl Pace {
    fn of(status: &JobStatus, rate: &RateWindow, now_ms: i64, watching: Duration) -> Self {
        let done = status.ops_succeeded + status.ops_failed;
        let eta = match status.state {
            state if state.is_terminal() => Some(Duration::ZERO),
            JobState::Running => rate.eta(status.ops_total.saturating_sub(done)),
            _ => None,
        };
        let ran = job_elapsed(status, now_ms);
        // An ended job seen too briefly for a window (`watch` of a finished job, a job done
        // in a second) shows its average over its whole run instead.
        let average = ran
            .filter(|ran| status.state.is_terminal() && !ran.is_zero())
            .map(|ran| done as f64 / ran.as_secs_f64());
        Pace {
            elapsed: ran.unwrap_or(watching),
            rate: rate.per_second().or(average),
            eta,
        }
    }
}

/// How long the job has run (or ran, once it ended) by its own timestamps, so `watch` of a job
/// begun an hour ago says an hour. `None` when the times are missing or unreadable, or when
/// this host's clock is behind the reducer's.
fn job_elapsed(status: &JobStatus, now_ms: i64) -> Option<Duration> {
    let began = status
        .started_at
        .as_deref()
        .or(status.submitted_at.as_deref())?;
    let ended = match status.finished_at.as_deref() {
        Some(finished) => parse_ms(finished)?,
        None if status.state.is_terminal() => return None,
        None => now_ms,
    };
    let ms = u64::try_from(ended - parse_ms(began)?).ok()?;
    Some(Duration::from_millis(ms))
}

/// Milliseconds since the epoch of a contract timestamp (RFC 3339).
pub(crate) fn parse_ms(timestamp: &str) -> Option<i64> {
    let t = OffsetDateTime::parse(timestamp, &Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// `4.2s`, `2m05s`, `2h01m`: short, and precise where it matters.
pub(crate) fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs >= 3600 {
        format!("{}h{:02}m", secs / 3600, secs % 3600 / 60)
    } else if secs >= 60 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

fn format_eta(eta: Option<Duration>) -> String {
    eta.map_or_else(|| "?".to_owned(), format_duration)
}

/// Operations per second: a decimal for slow jobs, whole numbers otherwise.
pub(crate) fn format_rate(rate: Option<f64>) -> String {
    match rate {
        None => "?".to_owned(),
        Some(r) if r < 10.0 => format!("{r:.1}"),
        Some(r) => format!("{r:.0}"),
    }
}

/// The bar's message: everything but the counts, which the bar shows itself.
fn bar_message(status: &JobStatus, pace: &Pace) -> String {
    format!(
        "{} failed  {} ops/s  ETA {}  {}, {} fragments out",
        status.ops_failed,
        format_rate(pace.rate),
        format_eta(pace.eta),
        status.state,
        status.fragments_in_flight
    )
}

/// One plain progress line.
fn plain_line(status: &JobStatus, pace: &Pace) -> String {
    format!(
        "{:>7}  {}  {}/{} ops ({})  {} failed  {} ops/s  ETA {}  {} fragments out",
        format_duration(pace.elapsed),
        status.state,
        status.ops_succeeded + status.ops_failed,
        status.ops_total,
        crate::table::percent(status),
        status.ops_failed,
        format_rate(pace.rate),
        format_eta(pace.eta),
        status.fragments_in_flight
    )
}

impl Display {
    fn new() -> Self {
        let output = if std::io::stderr().is_terminal() {
            // A spinner and a message until the job's first status: a bar of 0/0 operations
            // would read as a job done.
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template("{spinner} {prefix:>7} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            Output::Bar(bar)
        } else {
            Output::Lines { last: None }
        };
        Display {
            output,
            rate: RateWindow::default(),
            watching_since: Instant::now(),
            counting: false,
            waiting: None,
        }
    }

    /// Before the job's first status: says what it waits for (once per change on plain
    /// lines).
    fn waiting(&mut self, text: String) {
        let waited = format_duration(self.watching_since.elapsed());
        match &mut self.output {
            Output::Bar(bar) => {
                bar.set_prefix(waited);
                bar.set_message(text.clone());
            }
            Output::Lines { .. } => {
                if self.waiting.as_deref() != Some(text.as_str()) {
                    eprintln!("{waited:>7}  {text}");
                }
            }
        }
        self.waiting = Some(text);
    }

    fn show(&mut self, status: &JobStatus) {
        let now = Instant::now();
        self.rate.add(now, status.ops_succeeded + status.ops_failed);
        let pace = Pace::of(
            status,
            &self.rate,
            common::timefmt::now_ms(),
            now.saturating_duration_since(self.watching_since),
        );
        match &mut self.output {
            Output::Bar(bar) => {
                if !self.counting {
                    self.counting = true;
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{spinner} {prefix:>7} [{wide_bar}] {human_pos}/{human_len} ops  {msg}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    );
                }
                bar.set_length(status.ops_total);
                bar.set_position(status.ops_succeeded + status.ops_failed);
                bar.set_prefix(format_duration(pace.elapsed));
                bar.set_message(bar_message(status, &pace));
            }
            Output::Lines { last } => {
                let due = last.is_none_or(|t| now.saturating_duration_since(t) >= LINE_EVERY);
                if due || status.state.is_terminal() {
                    *last = Some(now);
                    eprintln!("{}", plain_line(status, &pace));
                }
            }
        }
    }

    /// A line of its own beside the progress (above the bar on a terminal).
    fn note(&self, text: &str) {
        match &self.output {
            Output::Bar(bar) => bar.println(text),
            Output::Lines { .. } => eprintln!("{text}"),
        }
    }

    fn finish(&self) {
        if let Output::Bar(bar) = &self.output {
            bar.finish();
            // indicatif leaves the cursor at the end of the bar's line: without this the
            // summary that follows would be glued to the bar.
            eprintln!();
        }
    }
}

/// Why one watching session ended without the job's end.
enum Interrupted {
    /// The broker or the reducer went away: worth reconnecting.
    Lost(anyhow::Error),
    /// Anything else (an unknown job, a reducer that answers with an error): final.
    Fatal(anyhow::Error),
}

impl From<BrokerError> for Interrupted {
    fn from(e: BrokerError) -> Self {
        Self::Lost(e.into())
    }
}

impl From<RpcError> for Interrupted {
    fn from(e: RpcError) -> Self {
        match e {
            // No answer: the reducer may be reconnecting after the broker came back.
            RpcError::Broker(_) | RpcError::NoAnswer { .. } => Self::Lost(e.into()),
            RpcError::Malformed(_) => Self::Fatal(e.into()),
        }
    }
}

/// What a watch carries across reconnections.
struct Watching<'a> {
    broker: &'a Broker,
    job_id: &'a str,
    timeout: Duration,
    just_submitted: bool,
    started: Instant,
    display: Display,
    latest: Option<JobStatus>,
    /// Statuses of fewer redrives are of a round the watch is not about (a redrive's wait
    /// starts from the job's status before it).
    min_redrives: u64,
}

/// Shows `job_id`'s progress until it ends; returns its final state. Losing the broker (a
/// restart, a network cut) is not the end: the watch says so on a line of its own, reconnects
/// and goes on, for up to [`RECONNECT_FOR`] without the broker.
pub async fn watch(
    broker: &Broker,
    job_id: &str,
    timeout: Duration,
    just_submitted: bool,
) -> anyhow::Result<JobState> {
    watch_round(broker, job_id, timeout, just_submitted, 0).await
}

/// How long a redriven job may go on showing the round before its redrive (the splitter and
/// the reducer have not taken the RedriveRequest yet).
const REDRIVE_GRACE: Duration = Duration::from_secs(60);

/// [`watch`] of a job just redriven: its statuses from before the redrive (fewer than
/// `redrives`) are not shown, and do not end the watch.
pub async fn watch_redriven(
    broker: &Broker,
    job_id: &str,
    timeout: Duration,
    redrives: u64,
) -> anyhow::Result<JobState> {
    watch_round(broker, job_id, timeout, false, redrives).await
}

async fn watch_round(
    broker: &Broker,
    job_id: &str,
    timeout: Duration,
    just_submitted: bool,
    min_redrives: u64,
) -> anyhow::Result<JobState> {
    let mut watching = Watching {
        broker,
        job_id,
        timeout,
        just_submitted,
        started: Instant::now(),
        display: Display::new(),
        latest: None,
        min_redrives,
    };
    let mut lost_since: Option<Instant> = None;
    loop {
        match watching.session(&mut lost_since).await {
            Ok(state) => return Ok(state),
            Err(Interrupted::Fatal(e)) => return Err(e),
            Err(Interrupted::Lost(e)) => {
                let since = match lost_since {
                    Some(since) => since,
                    None => {
                        watching
                            .display
                            .note(&format!("batchctl: lost the broker ({e}); reconnecting"));
                        *lost_since.insert(Instant::now())
                    }
                };
                if since.elapsed() >= RECONNECT_FOR {
                    return Err(e.context(format!(
                        "gave up reconnecting after {} s",
                        RECONNECT_FOR.as_secs()
                    )));
                }
                tokio::time::sleep(RECONNECT_EVERY).await;
            }
        }
    }
}

impl Watching<'_> {
    /// Subscribes, queries once a second, and shows what changes, until the job ends or the
    /// connection breaks. `lost_since` is cleared once the broker answers again.
    async fn session(&mut self, lost_since: &mut Option<Instant>) -> Result<JobState, Interrupted> {
        // Subscribe before the first query, so no change falls between the two.
        let channel = self.broker.channel().await?;
        let mut updates = common::consume::subscribe(
            &channel,
            &self.broker.names().status(),
            &format!("job.{}.*", self.job_id),
            "",
        )
        .await?;
        let mut rpc = RpcClient::connect(self.broker, self.timeout).await?;
        let mut poll = tokio::time::interval(Duration::from_secs(1));
        loop {
            let update = tokio::select! {
                delivery = updates.next() => match delivery {
                    Some(Ok(d)) => serde_json::from_slice::<JobStatus>(&d.data).ok(),
                    Some(Err(e)) => return Err(BrokerError::from(e).into()),
                    None => return Err(Interrupted::Lost(anyhow!("the status subscription ended"))),
                },
                _ = poll.tick() => self.query(&mut rpc).await?,
            };
            if lost_since.take().is_some() {
                self.display.note("batchctl: reconnected");
            }
            let Some(status) = update else {
                if self.latest.is_none() {
                    let text = self.unaccepted().await;
                    self.display.waiting(text);
                }
                continue;
            };
            if status.redrives < self.min_redrives {
                if self.started.elapsed() >= REDRIVE_GRACE {
                    return Err(Interrupted::Fatal(anyhow!(
                        "job {} was not redriven within {} s: it is still {} (is a splitter \
                         running? `batchctl dead` lists a refused request)",
                        self.job_id,
                        REDRIVE_GRACE.as_secs(),
                        status.state
                    )));
                }
                continue;
            }
            if let Some(state) = self.show(status) {
                return Ok(state);
            }
        }
    }

    /// What a job the reducer does not know yet waits for: a splitter to take it from
    /// `{ns}.jobs`, and whether any consumes that queue.
    async fn unaccepted(&self) -> String {
        let queue = self.broker.names().jobs();
        let peek =
            common::broker::peek_queues(std::slice::from_ref(&queue), || self.broker.channel())
                .await;
        match peek.as_deref() {
            Ok([Some(peek)]) if peek.consumers == 0 => format!(
                "waiting to be accepted: no splitter consumes {queue} ({} job(s) wait there); \
                 start one",
                peek.ready
            ),
            Ok([Some(peek)]) if peek.ready == 0 => {
                "taken by the splitter; waiting for its acceptance to reach the reducer".to_owned()
            }
            Ok([Some(peek)]) => format!(
                "waiting to be accepted by the splitter ({} job(s) in {queue})",
                peek.ready
            ),
            _ => format!("waiting to be accepted (could not look at {queue})"),
        }
    }

    async fn query(&mut self, rpc: &mut RpcClient) -> Result<Option<JobStatus>, Interrupted> {
        let request = Request::Status {
            job_id: self.job_id.to_owned(),
        };
        Ok(match rpc.call(&request).await? {
            Response::Status(status) => Some(status),
            Response::NotFound { .. }
                if self.just_submitted && self.started.elapsed() < UNKNOWN_GRACE =>
            {
                None
            }
            Response::NotFound { .. } if self.just_submitted => {
                return Err(Interrupted::Fatal(anyhow!(
                    "job {} was not accepted within {} s: no splitter took it from {} (it waits \
                     there; `batchctl watch {}` once a splitter runs)",
                    self.job_id,
                    UNKNOWN_GRACE.as_secs(),
                    self.broker.names().jobs(),
                    self.job_id
                )));
            }
            Response::NotFound { .. } => {
                return Err(Interrupted::Fatal(anyhow!("unknown job {}", self.job_id)));
            }
            Response::Gone(tombstone) => {
                return Err(Interrupted::Fatal(anyhow!("{}", tombstone.describe())));
            }
            Response::Error { message } => {
                return Err(Interrupted::Fatal(anyhow!(
                    "the reducer failed to answer: {message}"
                )));
            }
            other => {
                return Err(Interrupted::Fatal(anyhow!(
                    "unexpected reply from the reducer: {other:?}"
                )));
            }
        })
    }

    /// Shows `status` if it is news; the job's final state once it has ended.
    fn show(&mut self, status: JobStatus) -> Option<JobState> {
        // Counts only grow within a redrive round, and a later round supersedes an earlier
        // one: an older record arriving late must not move the display back.
        let newer = self.latest.as_ref().is_none_or(|l| {
            if status.redrives != l.redrives {
                return status.redrives > l.redrives;
            }
            status.state.is_terminal()
                || (!l.state.is_terminal()
                    && status.ops_succeeded + status.ops_failed >= l.ops_succeeded + l.ops_failed)
        });
        if !newer {
            return None;
        }
        self.display.show(&status);
        if status.state.is_terminal() {
            self.display.finish();
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
            return Some(status.state);
        }
        self.latest = Some(status);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(state: JobState, succeeded: u64, failed: u64, total: u64) -> JobStatus {
        JobStatus {
            job_id: "j".into(),
            state,
            operation: Some("sha256".into()),
            ops_total: total,
            ops_succeeded: succeeded,
            ops_failed: failed,
            fragments_done: 0,
            fragments_in_flight: 4,
            submitted_at: Some("2026-11-26T17:00:00.000Z".into()),
            started_at: Some("2026-11-26T17:00:00.500Z".into()),
            finished_at: None,
            error: None,
            redrives: 0,
        }
    }

    /// 17:02:05.500 on the day of [`status`]: 125 s after its start.
    const NOW_MS: i64 = 1_795_712_525_500;

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
        assert_eq!(window.per_second(), Some(100.0));
        for s in 21..=30 {
            done += 1000;
            window.add(start + Duration::from_secs(s), done);
        }
        assert_eq!(window.per_second(), Some(1000.0));
        assert_eq!(window.eta(5000), Some(Duration::from_secs(5)));
        // The window stays bounded however long the job runs.
        assert!(window.samples.len() <= 12, "{}", window.samples.len());
    }

    #[test]
    fn rate_covers_the_whole_span_when_statuses_are_sparse() {
        let start = Instant::now();
        let mut window = RateWindow::default();
        // Statuses every 4 s at 50 ops/s: the window keeps one sample at least 10 s old.
        for (i, s) in [0u64, 4, 8, 12, 16].into_iter().enumerate() {
            window.add(start + Duration::from_secs(s), i as u64 * 200);
        }
        assert_eq!(
            window.samples.front().map(|(t, _)| *t),
            Some(start + Duration::from_secs(4))
        );
        assert_eq!(window.per_second(), Some(50.0));
    }

    #[test]
    fn a_stalled_job_has_a_rate_of_zero_and_no_eta() {
        let start = Instant::now();
        let mut window = RateWindow::default();
        window.add(start, 500);
        for s in 1..=15 {
            window.add(start + Duration::from_secs(s), 500);
        }
        assert_eq!(window.per_second(), Some(0.0));
        assert_eq!(window.eta(100), None);
    }

    #[test]
    fn no_rate_from_statuses_moments_apart() {
        let start = Instant::now();
        let mut window = RateWindow::default();
        // The poll and the subscription deliver within milliseconds: no speed of 50 000/s.
        window.add(start, 100);
        window.add(start + Duration::from_millis(3), 250);
        assert_eq!(window.per_second(), None);
        assert_eq!(window.eta(1000), None);
        window.add(start + Duration::from_secs(2), 300);
        assert_eq!(window.per_second(), Some(100.0));
        assert_eq!(window.eta(1000), Some(Duration::from_secs(10)));
    }

    #[test]
    fn pace_uses_the_jobs_own_times_and_the_window() {
        let start = Instant::now();
        let mut window = RateWindow::default();
        window.add(start, 1000);
        window.add(start + Duration::from_secs(5), 1500);
        let watching = Duration::from_secs(5);

        let running = status(JobState::Running, 1400, 100, 2500);
        let pace = Pace::of(&running, &window, NOW_MS, watching);
        assert_eq!(
            pace.elapsed,
            Duration::from_secs(125),
            "since started_at, not since watching"
        );
        assert_eq!(pace.rate, Some(100.0));
        assert_eq!(
            pace.eta,
            Some(Duration::from_secs(10)),
            "1000 left at 100 ops/s"
        );

        let mut ended = status(JobState::Succeeded, 2500, 0, 2500);
        ended.finished_at = Some("2026-11-26T17:01:00.500Z".into());
        let pace = Pace::of(&ended, &window, NOW_MS, watching);
        assert_eq!(pace.elapsed, Duration::from_secs(60), "started to finished");
        assert_eq!(pace.eta, Some(Duration::ZERO));

        let once = Pace::of(&ended, &RateWindow::default(), NOW_MS, watching);
        assert_eq!(
            once.rate,
            Some(2500.0 / 60.0),
            "no window: the job's average"
        );
        let still_running = Pace::of(&running, &RateWindow::default(), NOW_MS, watching);
        assert_eq!(
            still_running.rate, None,
            "a running job's average is not its speed"
        );

        let accepted = status(JobState::Accepted, 0, 0, 2500);
        assert_eq!(Pace::of(&accepted, &window, NOW_MS, watching).eta, None);

        // Unreadable times, or this host's clock behind the reducer's: the time watched.
        let mut odd = status(JobState::Running, 0, 0, 10);
        odd.started_at = Some("yesterday".into());
        assert_eq!(Pace::of(&odd, &window, NOW_MS, watching).elapsed, watching);
        assert_eq!(
            Pace::of(&running, &window, NOW_MS - 200_000, watching).elapsed,
            watching
        );
    }

    #[test]
    fn a_plain_line_says_done_failed_rate_elapsed_and_eta() {
        let pace = Pace {
            elapsed: Duration::from_secs(125),
            rate: Some(1234.4),
            eta: Some(Duration::from_millis(4200)),
        };
        assert_eq!(
            plain_line(&status(JobState::Running, 400, 12, 1000), &pace),
            "  2m05s  running  412/1000 ops (41.2%)  12 failed  1234 ops/s  ETA 4.2s  4 fragments out"
        );
        let unknown = Pace {
            elapsed: Duration::from_millis(300),
            rate: None,
            eta: None,
        };
        assert_eq!(
            bar_message(&status(JobState::Running, 0, 0, 10), &unknown),
            "0 failed  ? ops/s  ETA ?  running, 4 fragments out"
        );
    }

    #[test]
    fn durations_and_rates_read_short() {
        assert_eq!(format_eta(None), "?");
        assert_eq!(format_eta(Some(Duration::from_millis(4200))), "4.2s");
        assert_eq!(format_eta(Some(Duration::from_secs(125))), "2m05s");
        assert_eq!(format_eta(Some(Duration::from_secs(7300))), "2h01m");
        assert_eq!(format_rate(None), "?");
        assert_eq!(format_rate(Some(0.25)), "0.2");
        assert_eq!(format_rate(Some(12.6)), "13");
    }

    #[test]
    fn contract_timestamps_parse() {
        assert_eq!(
            parse_ms(&common::timefmt::format_ms(1_795_712_400_123)),
            Some(1_795_712_400_123)
        );
        assert_eq!(parse_ms("not a time"), None);
    }
}
