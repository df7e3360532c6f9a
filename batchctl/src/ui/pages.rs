//! The console's pages, rendered on the server. Element ids and `data-` attributes are what
//! `console.js` updates and what the browser tests (`tests/tests/ui.rs`) read; keep them
//! stable. Among them: `#jobs tr.job[data-job][data-state][data-done][data-total]`,
//! `#jobs-total[data-count]`, `#state`, `#counts[data-succeeded][data-failed][data-total]`,
//! `#failures tr.failure[data-index]` with `td.error`, `#failures-total[data-count]`,
//! `#failure-search`, `a.prev`/`a.next`, `form#cancel` with `#cancel-button`, `form#redrive` with
//! `#redrive-button` (failed or cancelled jobs),
//! `#workers tr.worker[data-worker]`, `#services tr.service[data-role][data-active]`,
//! `#queues tr.queue[data-queue]`, `#dead-link`, `#dead tr.dead`, `form#submit`, `#error`,
//! `form#login`. Text shows figures grouped (`1,234`); the attributes hold them bare.

use std::time::Duration;

use axum::http::StatusCode;
use common::contract::{JobState, JobStatus};
use common::health::HealthReport;
use common::wire::{FailuresPage, JobDetail, JobsPage, WorkerInfo};
use maud::{DOCTYPE, Markup, html};

use super::{Chrome, FAILURES_PER_PAGE, JOBS_PER_PAGE, JobsQuery, job_path};
use crate::dead::DeadRow;
use crate::progress::{format_duration, format_rate, parse_ms};
use crate::table::QueueRow;

/// Every page's frame: the navigation, the namespace, and the one script.
fn layout(chrome: &Chrome, title: &str, body: Markup) -> Markup {
    let nav = [
        ("jobs", "/jobs", "Jobs"),
        ("workers", "/workers", "Workers"),
        ("queues", "/queues", "Queues"),
        ("dead", "/dead", "Dead letters"),
        ("submit", "/submit", "Submit"),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title, true))
            body {
                header.top {
                    a.brand href="/jobs" { "batchq" }
                    span.namespace title="namespace" { (chrome.namespace) }
                    nav {
                        @for (key, href, label) in nav {
                            a href=(href) class=[(chrome.current == key).then_some("current")] { (label) }
                        }
                    }
                    @if chrome.logged_in {
                        form.logout method="post" action="/logout" {
                            input type="hidden" name="csrf" value=(chrome.csrf);
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

fn head(title: &str, with_script: bool) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            meta name="color-scheme" content="light dark";
            title { (title) " · batchq" }
            link rel="stylesheet" href="/static/console.css";
            @if with_script {
                script src="/static/console.js" defer {}
            }
        }
    }
}

/// A page outside the frame: login, errors.
fn bare(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title, false))
            body.bare { main { (body) } }
        }
    }
}

pub fn login(next: &str, problem: Option<&str>) -> Markup {
    bare(
        "Log in",
        html! {
            h1 { "batchq console" }
            p { "This console needs its token (" code { "BATCHQ_UI_TOKEN" } ")." }
            @if let Some(problem) = problem {
                div #error .error role="alert" { (problem) }
            }
            form #login method="post" action="/login" {
                input type="hidden" name="next" value=(next);
                label for="token" { "Token" }
                input #token type="password" name="token" autocomplete="current-password" required autofocus;
                button #login-button type="submit" { "Log in" }
            }
        },
    )
}

pub fn error(status: StatusCode, message: &str) -> Markup {
    bare(
        status.canonical_reason().unwrap_or("Error"),
        html! {
            h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) }
            div #error .error role="alert" { (message) }
            p { a href="/jobs" { "Back to the jobs" } }
        },
    )
}

/// Percent-encodes one path segment or query value.
pub fn encode_path(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `?k=v&…` of the pairs whose value is not empty.
fn query(pairs: &[(&str, &str)]) -> String {
    let kept: Vec<String> = pairs
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={}", encode_path(v)))
        .collect();
    if kept.is_empty() {
        String::new()
    } else {
        format!("?{}", kept.join("&"))
    }
}

/// Operations per second: a decimal for slow jobs, grouped whole numbers otherwise.
fn rate_text(rate: f64) -> String {
    if rate < 10.0 {
        format_rate(Some(rate))
    } else {
        grouped(rate.round() as u64)
    }
}

/// The `s` of a plural noun after `n`.
fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// `1,530,032`: figures people read at a glance.
pub fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn done(status: &JobStatus) -> u64 {
    status.ops_succeeded + status.ops_failed
}

fn percent(status: &JobStatus) -> f64 {
    if status.ops_total == 0 {
        100.0
    } else {
        done(status) as f64 * 100.0 / status.ops_total as f64
    }
}

/// Operations per second since the job started (to its end, once it ended), and the time
/// left at that rate while it runs.
fn rate_and_eta(status: &JobStatus) -> (Option<f64>, Option<Duration>) {
    let Some(started) = status.started_at.as_deref().and_then(parse_ms) else {
        return (None, None);
    };
    let until = status
        .finished_at
        .as_deref()
        .and_then(parse_ms)
        .unwrap_or_else(common::timefmt::now_ms);
    let secs = (until - started) as f64 / 1000.0;
    if secs <= 0.0 || done(status) == 0 {
        return (None, None);
    }
    let rate = done(status) as f64 / secs;
    let eta = (!status.state.is_terminal()).then(|| {
        let left = status.ops_total.saturating_sub(done(status)) as f64;
        Duration::from_secs_f64(left / rate)
    });
    (Some(rate), eta)
}

/// How long a job waited between submission and start, and ran from its start to its end
/// (to now while it runs).
fn timeline(status: &JobStatus) -> Option<(Duration, Duration)> {
    let at = |t: Option<&str>| t.and_then(parse_ms);
    let started = at(status.started_at.as_deref())?;
    let submitted = at(status.submitted_at.as_deref()).unwrap_or(started);
    let ended = at(status.finished_at.as_deref()).unwrap_or_else(common::timefmt::now_ms);
    let span = |from: i64, to: i64| Duration::from_millis(u64::try_from(to - from).unwrap_or(0));
    Some((span(submitted, started), span(started, ended)))
}

/// `2026-12-05 01:23:45` of a contract timestamp (UTC), for tables.
fn short_time(timestamp: Option<&str>) -> String {
    match timestamp {
        Some(t) if t.len() >= 19 => t[..19].replace('T', " "),
        Some(t) => t.to_owned(),
        None => String::new(),
    }
}

fn state_badge(state: JobState) -> Markup {
    html! { span class={ "badge state-" (state.as_str()) } { (state.as_str()) } }
}

/// The bar, coloured by the job's state.
fn progress_bar(status: &JobStatus) -> Markup {
    html! {
        progress class={ "state-" (status.state.as_str()) } max=(status.ops_total.max(1))
            value=(if status.ops_total == 0 { 1 } else { done(status) }) {
            (format!("{:.1}%", percent(status)))
        }
    }
}

/// A long error cut to `chars` characters for a table cell (the job's page has it whole).
fn clipped(text: &str, chars: usize) -> String {
    match text.char_indices().nth(chars) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// Links to the page before and after this one; `labels` name them (newer/older for jobs,
/// previous/next for a job's failures, which are listed by index).
fn pager(
    base: &str,
    pairs: &[(&str, &str)],
    page_key: &str,
    (page, last): (u64, u64),
    labels: (&str, &str),
) -> Markup {
    let link = |n: u64| {
        let n = n.to_string();
        let mut all: Vec<(&str, &str)> = pairs.to_vec();
        all.push((page_key, &n));
        format!("{base}{}", query(&all))
    };
    html! {
        nav.pager {
            @if page > 1 {
                a.prev href=(link(page - 1)) rel="prev" { "← " (labels.0) }
            }
            span { "page " (page) " of " (last.max(1)) }
            @if page < last {
                a.next href=(link(page + 1)) rel="next" { (labels.1) " →" }
            }
        }
    }
}

fn pages_of(total: u64, per_page: u32) -> u64 {
    total.div_ceil(u64::from(per_page)).max(1)
}

pub fn jobs(chrome: &Chrome, filter: &JobsQuery, page: u64, listed: &JobsPage) -> Markup {
    let state = filter.state.as_deref().unwrap_or("");
    let q = filter.q.as_deref().unwrap_or("");
    let all: u64 = listed.by_state.values().sum();
    let last = pages_of(listed.total, JOBS_PER_PAGE);
    layout(
        chrome,
        "Jobs",
        html! {
            h1 { "Jobs" }
            nav #states .chips data-live {
                a href=(format!("/jobs{}", query(&[("q", q)]))) class=[state.is_empty().then_some("current")] {
                    "all " span.count { (all) }
                }
                @for s in JobState::ALL {
                    a href=(format!("/jobs{}", query(&[("state", s.as_str()), ("q", q)])))
                        class=[(state == s.as_str()).then_some("current")] {
                        (s.as_str()) " " span.count { (listed.by_state.get(s.as_str()).copied().unwrap_or(0)) }
                    }
                }
            }
            form #filter .filter method="get" action="/jobs" {
                label { "State "
                    select name="state" {
                        option value="" selected[state.is_empty()] { "any" }
                        @for s in JobState::ALL {
                            option value=(s.as_str()) selected[state == s.as_str()] { (s.as_str()) }
                        }
                    }
                }
                label { "Job id starts with "
                    input type="search" name="q" value=(q) placeholder="nightly-" autocomplete="off";
                }
                button type="submit" { "Filter" }
            }
            p.summary { span #jobs-total data-live data-count=(listed.total) { (grouped(listed.total)) } " job" (plural(listed.total)) ", newest first" }
            div.table-wrap {
                table #jobs data-live {
                    thead { tr {
                        th { "Job" } th { "State" } th.wide { "Progress" } th.num.opt { "Rate/s" }
                        th.num.opt { "ETA" } th.num { "Failed" } th.opt { "Submitted (UTC)" } th.opt { "Finished (UTC)" }
                    } }
                    tbody {
                        @for job in &listed.jobs {
                            @let (rate, eta) = rate_and_eta(job);
                            tr.job data-job=(job.job_id) data-state=(job.state.as_str())
                                data-done=(done(job)) data-total=(job.ops_total) {
                                td { a.job-link href=(job_path(&job.job_id)) { (job.job_id) }
                                     @if let Some(op) = &job.operation { div.sub { (op) } } }
                                td { (state_badge(job.state)) }
                                td.wide {
                                    @if job.state == JobState::Rejected {
                                        div.sub.bad title=[job.error.as_deref()] { (clipped(job.error.as_deref().unwrap_or("rejected"), 80)) }
                                    } @else {
                                        (progress_bar(job))
                                        div.sub { (grouped(done(job))) " / " (grouped(job.ops_total)) " · " (format!("{:.1}%", percent(job))) }
                                    }
                                }
                                td.num.opt { (rate.map_or(String::new(), rate_text)) }
                                td.num.opt { (eta.map_or(String::new(), format_duration)) }
                                td.num class=[(job.ops_failed > 0).then_some("bad")] { (grouped(job.ops_failed)) }
                                td.opt { (short_time(job.submitted_at.as_deref())) }
                                td.opt { (short_time(job.finished_at.as_deref())) }
                            }
                        }
                        @if listed.jobs.is_empty() {
                            tr { td colspan="8" .empty { "No jobs match." } }
                        }
                    }
                }
            }
            (pager("/jobs", &[("state", state), ("q", q)], "page", (page, last), ("newer", "older")))
        },
    )
}

pub fn job_pending(chrome: &Chrome, id: &str) -> Markup {
    layout(
        chrome,
        id,
        html! {
            h1 { "Job " (id) }
            p #pending data-reload-every="2000" {
                "The reducer does not know this job yet: it waits to be accepted by the splitter "
                "(this page reloads itself). A job id nobody submitted stays here; see "
                a href="/queues" { "the queues" } "."
            }
        },
    )
}

pub fn job(
    chrome: &Chrome,
    detail: &JobDetail,
    search: Option<&str>,
    fpage: u64,
    failures: &FailuresPage,
) -> Markup {
    let s = &detail.status;
    let (rate, eta) = rate_and_eta(s);
    let terminal = s.state.is_terminal();
    let last = pages_of(failures.total, FAILURES_PER_PAGE);
    let search = search.unwrap_or("");
    let path = job_path(&s.job_id);
    let spec = detail
        .spec
        .as_ref()
        .and_then(|spec| serde_json::to_string_pretty(spec).ok());
    layout(
        chrome,
        &s.job_id,
        html! {
            h1.job-title { "Job " span.id { (s.job_id) } " " span #state class={ "badge state-" (s.state.as_str()) } { (s.state.as_str()) } }
            section #live data-job=(s.job_id) data-terminal=(terminal) data-events=(format!("{path}/events"))
                data-started-ms=[s.started_at.as_deref().and_then(parse_ms)] {
                div #counts data-succeeded=(s.ops_succeeded) data-failed=(s.ops_failed) data-total=(s.ops_total) {
                    progress #progress class={ "state-" (s.state.as_str()) } max=(s.ops_total.max(1)) value=(if s.ops_total == 0 { 1 } else { done(s) }) {}
                    p.figures {
                        span #done { (grouped(done(s))) } " of " span #total { (grouped(s.ops_total)) } " operations ("
                        span #percent { (format!("{:.1}%", percent(s))) } "): "
                        span #succeeded { (grouped(s.ops_succeeded)) } " succeeded, "
                        span #failed class=[(s.ops_failed > 0).then_some("bad")] { (grouped(s.ops_failed)) } " failed; "
                        span #in-flight { (grouped(s.fragments_in_flight)) } " fragments out, "
                        span #fragments-done { (grouped(s.fragments_done)) } " done"
                    }
                    p.figures {
                        "Rate " span #rate { (rate.map_or("?".to_owned(), rate_text)) } " ops/s"
                        @if !terminal { " · ETA " span #eta { (eta.map_or("?".to_owned(), format_duration)) } }
                    }
                }
                @if !terminal {
                    figure.chart {
                        svg #chart viewBox="0 0 600 120" preserveAspectRatio="none" role="img"
                            aria-label="operations done over time" {}
                        figcaption { "Operations done since the job started: measured every second while this page is open, a straight line before" }
                    }
                }
            }
            @if let Some(error) = &s.error {
                pre.error #job-error { (error) }
            }
            dl.facts {
                dt { "Operation" } dd { (s.operation.as_deref().unwrap_or("-")) }
                dt { "Submitted" } dd { (s.submitted_at.as_deref().unwrap_or("-")) }
                dt { "Started" } dd { (s.started_at.as_deref().unwrap_or("-")) }
                dt { "Finished" } dd { (s.finished_at.as_deref().unwrap_or("-")) }
                @if let Some((waited, ran)) = timeline(s) {
                    dt { "Took" } dd #took {
                        (format_duration(ran)) " running"
                        @if waited >= Duration::from_millis(100) { ", after " (format_duration(waited)) " waiting to start" }
                    }
                }
            }
            div.actions {
                a #results .button href=(format!("{path}/results.jsonl")) download { "Download results (JSON Lines)" }
                @if !terminal {
                    form #cancel method="post" action=(format!("{path}/cancel"))
                        data-confirm=(format!("Cancel job {}? Running fragments stop at their next operation; nothing more of it is dispatched.", s.job_id)) {
                        input type="hidden" name="csrf" value=(chrome.csrf);
                        button #cancel-button .danger type="submit" { "Cancel job" }
                    }
                }
                @if matches!(s.state, JobState::Failed | JobState::Cancelled) {
                    form #redrive method="post" action=(format!("{path}/redrive"))
                        data-confirm=(format!("Redrive job {}? Every operation that has not succeeded runs again, with fresh attempts.", s.job_id)) {
                        input type="hidden" name="csrf" value=(chrome.csrf);
                        button #redrive-button type="submit" { "Redrive job" }
                    }
                }
            }
            section {
                h2 { "Failed operations" }
                form #failure-search .filter method="get" action=(path) {
                    input type="search" name="fq" value=(search) placeholder="text in the error" autocomplete="off";
                    button type="submit" { "Search" }
                    @if !search.is_empty() { " " a href=(path) { "clear" } }
                }
                p.summary { span #failures-total data-count=(failures.total) { (grouped(failures.total)) } " failed operation" (plural(failures.total))
                    @if !search.is_empty() { " whose error contains “" (search) "”" } }
                @if search.is_empty() && s.ops_failed > failures.total {
                    p.note #not-run {
                        (grouped(s.ops_failed - failures.total)) " more count as failed without an error of their own: "
                        "they never ran, because the job failed once more of its operations failed than it tolerates."
                    }
                }
                div.table-wrap {
                    table #failures {
                        thead { tr { th.num { "Index" } th { "Error" } } }
                        tbody {
                            @for f in &failures.failures {
                                tr.failure data-index=(f.index) {
                                    td.index.num { (f.index) }
                                    td.error { (f.error) }
                                }
                            }
                            @if failures.failures.is_empty() {
                                tr { td colspan="2" .empty { "None." } }
                            }
                        }
                    }
                }
                (pager(&path, &[("fq", search)], "fpage", (fpage, last), ("previous", "next")))
            }
            section {
                h2 { "JobSpec" }
                @match spec {
                    Some(spec) => pre #spec { (spec) },
                    None => p #spec { "Not known: the job was rejected, or accepted before the reducer kept JobSpecs." },
                }
            }
        },
    )
}

pub fn workers(chrome: &Chrome, workers: &[WorkerInfo], health: &HealthReport) -> Markup {
    let replicas: Vec<_> = health
        .services
        .iter()
        .filter(|s| s.instance.is_some())
        .collect();
    layout(
        chrome,
        "Workers",
        html! {
            h1 { "Workers" }
            p.summary { span #workers-total data-live { (workers.len()) } " live worker" (plural(workers.len() as u64)) " (heard from within 3 heartbeats)" }
            div.table-wrap {
                table #workers data-live {
                    thead { tr {
                        th { "Worker" } th { "Host" } th.num { "PID" } th { "Operations" }
                        th.num { "In flight / prefetch" } th { "Held by operation" } th { "Last heartbeat (UTC)" } th { "Started (UTC)" }
                    } }
                    tbody {
                        @for w in workers {
                            tr.worker data-worker=(w.worker) {
                                td { (w.worker) }
                                td { (w.host) }
                                td.num { (w.pid) }
                                td { (w.operations.join(", ")) }
                                td.num { (w.fragments_in_flight) " / " (w.prefetch) }
                                td { (w.held_by_operation.iter().map(|(op, n)| format!("{op}: {n}")).collect::<Vec<_>>().join(", ")) }
                                td { (short_time(Some(&w.last_heartbeat))) }
                                td { (short_time(Some(&w.started_at))) }
                            }
                        }
                        @if workers.is_empty() {
                            tr { td colspan="8" .empty { "No live worker." } }
                        }
                    }
                }
            }
            h2 { "Splitters and reducers" }
            div.table-wrap {
                table #services data-live {
                    thead { tr { th { "Role" } th { "Instance" } th { "Host" } th { "Replica" } th { "State" } th { "Last heartbeat (UTC)" } } }
                    tbody {
                        @for s in &health.services {
                            @if let Some(instance) = &s.instance {
                                tr.service data-role=(s.role) data-active=(s.active) {
                                    td { (s.role) }
                                    td { (instance) }
                                    td { (s.host.as_deref().unwrap_or("")) }
                                    td { @if s.active { span.badge.state-running { "active" } } @else { span.badge { "standby" } } }
                                    td class=[(!s.is_ok()).then_some("bad")] { (s.state) }
                                    td { (short_time(s.last_heartbeat.as_deref())) }
                                }
                            } @else {
                                tr.service.missing data-role=(s.role) data-active="false" {
                                    td { (s.role) } td colspan="5" .bad { "no active " (s.role) " heard from" }
                                }
                            }
                        }
                    }
                }
            }
            @if replicas.is_empty() { p { "No splitter or reducer heard from." } }
        },
    )
}

pub fn queues(chrome: &Chrome, rows: &[QueueRow], dead_queue: &str) -> Markup {
    let dead = rows
        .iter()
        .find(|q| q.queue == dead_queue)
        .map_or(0, |q| q.ready);
    layout(
        chrome,
        "Queues",
        html! {
            h1 { "Queues" }
            p.summary #dead-summary data-live {
                a #dead-link href="/dead" class=[(dead > 0).then_some("bad")] { (dead) " dead letter" (plural(dead)) }
                " kept on " code { (dead_queue) }
            }
            div.table-wrap {
                table #queues data-live {
                    thead { tr { th { "Queue" } th.num { "Ready" } th.num { "Unacked" } th.num { "Consumers" } } }
                    tbody {
                        @for q in rows {
                            tr.queue data-queue=(q.queue) {
                                td { (q.queue) }
                                td.num {
                                    @if q.queue == dead_queue { a href="/dead" { (q.ready) } } @else { (q.ready) }
                                }
                                td.num { (q.unacknowledged.map_or("-".to_owned(), |n| n.to_string())) }
                                td.num class=[(q.consumers == 0).then_some("bad")] { (q.consumers) }
                            }
                        }
                    }
                }
            }
            p.note { "Unacked work comes from the workers' heartbeats (what each holds); ready and consumers from the broker." }
        },
    )
}

pub fn dead(chrome: &Chrome, queue: &str, rows: &[DeadRow], present: u64) -> Markup {
    layout(
        chrome,
        "Dead letters",
        html! {
            h1 { "Dead letters" }
            p.summary { (present) " message" (plural(present)) " on " code { (queue) }
                @if present > rows.len() as u64 { " (the first " (rows.len()) " listed)" } }
            div.table-wrap {
                table #dead {
                    thead { tr { th.num { "#" } th { "Reason" } th { "Job" } th.num { "Bytes" } th { "Kept at (UTC)" } th { "Origin" } } }
                    tbody {
                        @for row in rows {
                            tr.dead {
                                td.num { (row.position) }
                                td.error { (row.reason.as_deref().unwrap_or("-")) }
                                td { @if let Some(job) = &row.job_id { a href=(job_path(job)) { (job) } } @else { "-" } }
                                td.num { (row.size) }
                                td { (short_time(row.kept_at.as_deref())) }
                                td { (row.origin_text()) }
                            }
                        }
                        @if rows.is_empty() { tr { td colspan="6" .empty { "Empty." } } }
                    }
                }
            }
            p.note { "Put them back with " code { "batchctl dead requeue [--job JOB]" } ", drop them with "
                code { "batchctl dead purge [--job JOB]" } "." }
        },
    )
}

const EXAMPLE_SPEC: &str = r#"{
  "operation": "sha256",
  "range": {"start": 0, "end": 100000},
  "params": {"rounds": 10}
}"#;

pub fn submit(chrome: &Chrome, text: &str, problem: Option<&str>) -> Markup {
    layout(
        chrome,
        "Submit",
        html! {
            h1 { "Submit a job" }
            p { "Paste a JobSpec or choose a file; it is checked as the splitter would check it "
                "before it is published. A JobSpec without " code { "job_id" } " gets one." }
            @if let Some(problem) = problem {
                div #error .error role="alert" { (problem) }
            }
            form #submit method="post" action="/submit" enctype="multipart/form-data" {
                input type="hidden" name="csrf" value=(chrome.csrf);
                textarea name="spec" rows="14" spellcheck="false" placeholder=(EXAMPLE_SPEC) { (text) }
                label.file { "or a file: " input type="file" name="file" accept=".json,application/json"; }
                button #submit-button type="submit" { "Submit" }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_what_a_path_cannot_hold() {
        assert_eq!(encode_path("job-1.a_b"), "job-1.a_b");
        assert_eq!(encode_path("a b/c?d"), "a%20b%2Fc%3Fd");
        assert_eq!(query(&[("state", "running"), ("q", "")]), "?state=running");
        assert_eq!(query(&[("q", "")]), "");
    }

    #[test]
    fn groups_thousands() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1,000");
        assert_eq!(grouped(1_530_032), "1,530,032");
    }

    #[test]
    fn a_job_took_what_its_timestamps_say() {
        let status = JobStatus {
            job_id: "j".into(),
            state: JobState::Succeeded,
            operation: None,
            ops_total: 1,
            ops_succeeded: 1,
            ops_failed: 0,
            fragments_done: 1,
            fragments_in_flight: 0,
            submitted_at: Some("2026-12-05T01:00:00.000Z".into()),
            started_at: Some("2026-12-05T01:00:02.500Z".into()),
            finished_at: Some("2026-12-05T01:01:02.500Z".into()),
            error: None,
            redrives: 0,
        };
        assert_eq!(
            timeline(&status),
            Some((Duration::from_millis(2500), Duration::from_secs(60)))
        );
        let never_started = JobStatus {
            started_at: None,
            ..status
        };
        assert_eq!(timeline(&never_started), None);
    }

    #[test]
    fn clips_long_errors_on_a_character_boundary() {
        assert_eq!(clipped("short", 80), "short");
        assert_eq!(clipped("ééééé", 3), "ééé…");
    }

    #[test]
    fn rate_and_eta_of_a_running_job() {
        let now = common::timefmt::now_ms();
        let status = JobStatus {
            job_id: "j".into(),
            state: JobState::Running,
            operation: Some("noop".into()),
            ops_total: 1000,
            ops_succeeded: 90,
            ops_failed: 10,
            fragments_done: 1,
            fragments_in_flight: 2,
            submitted_at: None,
            started_at: Some(common::timefmt::format_ms(now - 10_000)),
            finished_at: None,
            error: None,
            redrives: 0,
        };
        let (rate, eta) = rate_and_eta(&status);
        let rate = rate.expect("a rate");
        assert!((9.0..=10.5).contains(&rate), "100 ops in ~10 s: {rate}");
        let eta = eta.expect("an ETA").as_secs_f64();
        assert!((85.0..=101.0).contains(&eta), "900 left at ~10/s: {eta}");
    }
}
