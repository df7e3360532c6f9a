//! The web console (`batchctl ui`) in a real browser: a headless Chromium (through
//! chromedriver) against the console of a real stack, reading the routes and the DOM that
//! `batchctl/src/ui/` documents (ids, classes and `data-*` attributes, never the wording).
//!
//! Without Chromium and chromedriver these tests skip, saying so, unless
//! `BATCHQ_TEST_REQUIRE_BROWSER` is set (`.ci/run` sets it). Screenshots of the jobs, a job and
//! the workers pages go to `BATCHQ_UI_SCREENSHOTS` when set (docs/img holds the ones the README
//! shows), else to the test's own folder.

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use batchq_tests::browser::{
    Browser, Console, Node, http, http_with_body, multipart, skip_without_browser,
};
use batchq_tests::{Bin, ProcId, Signal, TestEnv, WorkerOpts, assert_counts, bin_path};
use common::contract::JobState;
use common::jobspec::{ParseLimits, parse_job_spec};
use fantoccini::key::Key;
use serde_json::{Value, json};

/// How long a page may take to show what the stack already knows (page loads, the 2 s
/// refreshes, the 1 s event stream, a job accepted by the splitter).
const PAGE: Duration = Duration::from_secs(15);
/// How long a job of these tests may take.
const JOB_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the console's pages refresh their live parts (contract: every 2 s).
const REFRESH_EVERY: Duration = Duration::from_secs(2);

/// A test's stack seen through the console: the environment, its console and a browser.
struct Stage {
    env: TestEnv,
    workers: Vec<ProcId>,
    console: Console,
    browser: Browser,
}

impl Stage {
    /// A splitter, a reducer, `workers` workers and a console in a fresh namespace, with a
    /// browser; `None` when the test skips for want of a browser.
    async fn start(
        test: &str,
        workers: &[WorkerOpts],
        console_env: &[(&str, &str)],
    ) -> Result<Option<Self>> {
        if skip_without_browser(test)? {
            return Ok(None);
        }
        let mut env = TestEnv::new(test).await?;
        env.start_splitter()?;
        env.start_reducer()?;
        let workers = workers
            .iter()
            .map(|opts| env.start_worker(opts.clone()))
            .collect::<Result<Vec<_>>>()?;
        let console = env.start_console(console_env).await?;
        let browser = Browser::start(&env).await?;
        Ok(Some(Self {
            env,
            workers,
            console,
            browser,
        }))
    }

    async fn goto(&self, path: &str) -> Result<()> {
        self.browser.goto(&self.console.url(path)).await
    }

    /// Closes the browser and ends the test's environment (the console with it).
    async fn finish(self) -> Result<()> {
        self.browser.close().await?;
        self.env.finish().await
    }
}

/// Marks the page shown, so that a later [`still_same_page`] tells a page that updated itself
/// from one that was reloaded or left.
async fn mark_page(browser: &Browser) -> Result<()> {
    browser
        .client()
        .execute("window.batchqTestMark = 'unchanged'; return null;", vec![])
        .await?;
    Ok(())
}

async fn still_same_page(browser: &Browser) -> Result<bool> {
    let mark = browser
        .client()
        .execute("return window.batchqTestMark || null;", vec![])
        .await?;
    Ok(mark == json!("unchanged"))
}

/// The row of `job_id` on the jobs page, if listed.
async fn job_row(browser: &Browser, job_id: &str) -> Result<Option<Node>> {
    Ok(browser
        .nodes("#jobs tr.job")
        .await?
        .into_iter()
        .find(|row| row.data.get("job").is_some_and(|id| id == job_id)))
}

/// The number shown in the one element matching `css`.
async fn count_in(browser: &Browser, css: &str) -> Result<u64> {
    let text = browser.text(css).await?;
    text.parse()
        .with_context(|| format!("{css} reads {text:?}, not a count"))
}

/// Types `text` into the one field matching `css` and presses Enter, as a user submits a
/// search form.
async fn search(browser: &Browser, css: &str, text: &str) -> Result<()> {
    browser
        .type_into(css, &format!("{text}{}", char::from(Key::Enter)))
        .await
}

/// A job of `n` `sleep` operations of `ms` each, `fragment_size` to a fragment and one fragment
/// out at a time: its progress grows steadily for about `n × ms`.
fn slow_job(job_id: &str, n: u64, ms: u64, fragment_size: u64) -> Value {
    json!({
        "job_id": job_id,
        "operation": "sleep",
        "params": {"ms": ms},
        "range": {"start": 0, "end": n},
        "fragment_size": fragment_size,
        "max_concurrent_fragments": 1,
    })
}

/// Waits until the jobs page lists `running` (of `total` operations) as running, with its
/// link, beside `finished` (of `finished_total`) as succeeded, and returns the running job's
/// data-done as first seen.
async fn assert_both_listed(
    browser: &Browser,
    (finished, finished_total): (&str, u64),
    (running, total): (&str, u64),
) -> Result<u64> {
    let first = browser
        .until(PAGE, "the running job listed as running", || async {
            Ok(job_row(browser, running)
                .await?
                .filter(|row| row.data.get("state").is_some_and(|s| s == "running")))
        })
        .await?;
    assert_eq!(first.number("total")?, total, "data-total of {first:?}");
    let done_first = first.number("done")?;
    ensure!(
        done_first < total,
        "the job had ended before the page showed it: {first:?}"
    );
    let link = browser
        .node(&format!("#jobs tr.job[data-job='{running}'] a.job-link"))
        .await?
        .context("no a.job-link in the running job's row")?;
    assert_eq!(
        link.attrs.get("href").map(String::as_str),
        Some(format!("/jobs/{running}").as_str())
    );
    let finished_row = job_row(browser, finished)
        .await?
        .context("the finished job is not listed")?;
    assert_eq!(finished_row.data("state")?, "succeeded");
    assert_eq!(
        (finished_row.number("done")?, finished_row.number("total")?),
        (finished_total, finished_total)
    );
    assert_eq!(
        count_in(browser, "#jobs-total").await?,
        JOBS_LISTED,
        "jobs-total"
    );
    Ok(done_first)
}

/// Filters the jobs page by the id prefix `prefix`, and asserts that only `job_id` is left.
async fn assert_filter_by_prefix(browser: &Browser, prefix: &str, job_id: &str) -> Result<()> {
    search(browser, "#filter input[name=q]", prefix).await?;
    browser
        .until(PAGE, "the filtered list", || async {
            let location = browser.location().await?;
            Ok(location.contains(&format!("q={prefix}")).then_some(()))
        })
        .await?;
    browser
        .until(PAGE, "only the running job listed", || async {
            let rows = browser.nodes("#jobs tr.job").await?;
            let ids: Vec<&str> = rows
                .iter()
                .filter_map(|r| r.data.get("job"))
                .map(String::as_str)
                .collect();
            Ok((ids == [job_id]).then_some(()))
        })
        .await?;
    assert_eq!(
        count_in(browser, "#jobs-total").await?,
        1,
        "jobs-total filtered"
    );
    Ok(())
}

/// On the page of the running job `job_id` (of `total` operations), the counts grow without
/// a reload (the event stream) until the job has succeeded, and the page says so.
async fn assert_job_page_follows_to_the_end(stage: &Stage, job_id: &str, total: u64) -> Result<()> {
    let browser = &stage.browser;
    let counts = browser.wait_for("#counts", PAGE).await?;
    let succeeded_first = counts.number("succeeded")?;
    mark_page(browser).await?;
    browser
        .until(PAGE, "#counts data-succeeded growing", || async {
            Ok(browser
                .node("#counts")
                .await?
                .filter(|c| c.number("succeeded").is_ok_and(|n| n > succeeded_first)))
        })
        .await?;
    ensure!(
        still_same_page(browser).await?,
        "the job page was reloaded to show the counts"
    );
    let status = stage.env.wait_for_terminal(job_id, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, total, 0);
    browser.wait_for_text("#state", "succeeded", PAGE).await?;
    let counts = browser
        .until(PAGE, "#counts at the job's end", || async {
            Ok(browser
                .node("#counts")
                .await?
                .filter(|c| c.number("succeeded").is_ok_and(|n| n == total)))
        })
        .await?;
    assert_eq!(
        (counts.number("failed")?, counts.number("total")?),
        (0, total),
        "#counts at the end: {counts:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jobs_page_shows_a_running_job_grow() -> Result<()> {
    let Some(stage) = Stage::start("ui-jobs", &[WorkerOpts::default()], &[]).await? else {
        return Ok(());
    };
    let env = &stage.env;
    let browser = &stage.browser;
    // A finished job beside the running one, as a real list has.
    let finished = env
        .submit(&json!({"job_id": env.job_id("nightly"), "operation": "noop", "range": {"start": 0, "end": 10}}))
        .await?;
    env.wait_for_terminal(&finished, JOB_TIMEOUT).await?;
    // And the other ends a job meets (they make the screenshot tell more): one whose every
    // operation fails, and one the splitter rejects.
    let failing = env
        .submit(&json!({"job_id": env.job_id("resize"), "operation": "sleep", "params": {"ms": "soon"}, "range": {"start": 0, "end": 40}, "max_attempts": 1}))
        .await?;
    let rejected = env
        .submit(&json!({"job_id": env.job_id("typo"), "operation": "noop", "items": [1], "max_attempts": 0}))
        .await?;
    for (job, state) in [
        (&failing, JobState::Failed),
        (&rejected, JobState::Rejected),
    ] {
        let status = env.wait_for_terminal(job, JOB_TIMEOUT).await?;
        assert_eq!(status.state, state, "{status:?}");
    }
    // About 12 s of work (one fragment of 4 × 100 ms at a time): time to watch it on both pages.
    let total = 120;
    let running = env
        .submit(&slow_job(&env.job_id("growing"), total, 100, 4))
        .await?;
    env.wait_for_status(&running, PAGE, |s| s.state == JobState::Running)
        .await?;

    stage.goto("/jobs").await?;
    let done_first = assert_both_listed(browser, (&finished, 10), (&running, total)).await?;
    for (job, state) in [(&failing, "failed"), (&rejected, "rejected")] {
        let row = job_row(browser, job)
            .await?
            .with_context(|| format!("{job} not listed"))?;
        assert_eq!(row.data("state")?, state, "{row:?}");
    }

    // The row's figures grow while the page stays as it is (its own refresh, no reload).
    mark_page(browser).await?;
    let grown = browser
        .until(PAGE, "data-done of the running job growing", || async {
            Ok(job_row(browser, &running)
                .await?
                .filter(|row| row.number("done").is_ok_and(|d| d > done_first)))
        })
        .await?;
    ensure!(
        still_same_page(browser).await?,
        "the page was reloaded to show the progress"
    );
    let shot = browser.screenshot("jobs").await?;
    eprintln!(
        "data-done {done_first} → {} of {total}; screenshot {}",
        grown.number("done")?,
        shot.display()
    );

    // The filter: the id prefix leaves only the running job.
    assert_filter_by_prefix(browser, "growing-", &running).await?;

    // Its page follows it live to the end.
    browser
        .click(&format!("#jobs tr.job[data-job='{running}'] a.job-link"))
        .await?;
    browser
        .wait_for_location(&format!("/jobs/{running}"), PAGE)
        .await?;
    assert_job_page_follows_to_the_end(&stage, &running, total).await?;
    stage.finish().await
}

/// The jobs of the jobs page's test: one running, one succeeded, one failed, one rejected.
const JOBS_LISTED: u64 = 4;

/// The error `exec` reports for item `text` of the stock job.
fn exec_error(text: &str) -> String {
    format!("exited with status 3: {text} is out of stock")
}

/// A stock check: item `ok-…` succeeds, any other fails with "{item} is out of stock".
const STOCK_SCRIPT: &str =
    "case {} in ok-*) echo in stock;; *) echo {} is out of stock >&2; exit 3;; esac";

/// The items of the stock job: every fifth one (index 4, 9, …) in stock, the others
/// `widget-…`, except one `zebra-…` to search for.
fn stock_items(n: u64, unique: u64) -> Vec<String> {
    (0..n)
        .map(|i| match i {
            _ if i % 5 == 4 => format!("ok-{i:03}"),
            _ if i == unique => format!("zebra-{i:03}"),
            _ => format!("widget-{i:03}"),
        })
        .collect()
}

/// Failures shown per page (contract: 50).
const FAILURES_PER_PAGE: usize = 50;

/// Asserts the head of the page `path` of a failed `exec` job of `n` operations, `failed` of
/// them failed: state, counts, no Cancel, the JobSpec and the results link.
async fn assert_failed_job_page(browser: &Browser, path: &str, n: u64, failed: u64) -> Result<()> {
    browser.wait_for_text("#state", "failed", PAGE).await?;
    let counts = browser.wait_for("#counts", PAGE).await?;
    let figures = ["succeeded", "failed", "total"].map(|name| counts.number(name).ok());
    assert_eq!(
        figures,
        [Some(n - failed), Some(failed), Some(n)],
        "#counts: {counts:?}"
    );
    assert_eq!(
        count_in(browser, "#failures-total").await?,
        failed,
        "failures-total"
    );
    ensure!(
        browser.node("#cancel").await?.is_none(),
        "a failed job still offers Cancel"
    );
    let redrive = browser
        .node("#redrive")
        .await?
        .context("a failed job offers no Redrive")?;
    assert_eq!(
        redrive.attrs.get("action").map(String::as_str),
        Some(format!("{path}/redrive").as_str()),
        "#redrive: {redrive:?}"
    );
    let spec: Value = serde_json::from_str(&browser.text("#spec").await?)
        .context("#spec is not the JobSpec as JSON")?;
    assert_eq!(
        (&spec["operation"], &spec["items"]["count"]),
        (&json!("exec"), &json!(n)),
        "#spec: {spec}"
    );
    let results = browser
        .node("#results")
        .await?
        .context("no #results link")?;
    assert_eq!(
        results.attrs.get("href").map(String::as_str),
        Some(format!("{path}/results.jsonl").as_str())
    );
    Ok(())
}

/// Asserts that the job page shows page `page` (from 1) of the failures `failing` (indices
/// into `items`): their indices in order, and each the error `exec` reported for its item.
async fn assert_failure_page(
    browser: &Browser,
    items: &[String],
    failing: &[u64],
    page: usize,
) -> Result<()> {
    let from = (page - 1) * FAILURES_PER_PAGE;
    let expected = &failing[from..(from + FAILURES_PER_PAGE).min(failing.len())];
    let rows = browser.nodes("#failures tr.failure").await?;
    let indices = rows
        .iter()
        .map(|row| row.number("index"))
        .collect::<Result<Vec<u64>>>()?;
    ensure!(
        indices == expected,
        "page {page}: failure rows {indices:?}, expected {expected:?}"
    );
    let cells = |css: &'static str| async move {
        let nodes = browser.nodes(css).await?;
        anyhow::Ok(
            nodes
                .iter()
                .map(|n| n.text.trim().to_owned())
                .collect::<Vec<_>>(),
        )
    };
    let want: Vec<String> = expected.iter().map(u64::to_string).collect();
    let shown = cells("#failures tr.failure td.index").await?;
    ensure!(shown == want, "page {page}: index cells {shown:?}");
    let want: Vec<String> = expected
        .iter()
        .map(|i| exec_error(&items[*i as usize]))
        .collect();
    let shown = cells("#failures tr.failure td.error").await?;
    ensure!(
        shown == want,
        "page {page}: errors shown {shown:?}, expected {want:?}"
    );
    Ok(())
}

/// Follows the pager link `css` (`a.next`, `a.prev`) and waits for the page it leads to.
async fn turn_page(browser: &Browser, css: &str, path: &str, fpage: u64) -> Result<()> {
    browser.click(css).await?;
    browser
        .wait_for_location(&format!("{path}?fpage={fpage}"), PAGE)
        .await
}

/// Asserts that `results.jsonl` of the job at `path` holds `n` JSON lines, line `index` with
/// `error`.
async fn assert_results_download(
    console: &Console,
    path: &str,
    n: u64,
    (index, error): (u64, &str),
) -> Result<()> {
    let download = http(
        console.authority(),
        "GET",
        &format!("{path}/results.jsonl"),
        &[],
        None,
    )
    .await?;
    assert_eq!(download.status, 200, "results.jsonl: {download:?}");
    assert_eq!(
        download.header("content-type"),
        Some("application/x-ndjson"),
        "content type of results.jsonl"
    );
    let lines: Vec<Value> = download
        .body
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("results.jsonl holds a line that is not JSON")?;
    assert_eq!(lines.len() as u64, n, "lines of results.jsonl");
    assert_eq!(lines[index as usize]["error"], json!(error), "line {index}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_page_shows_searches_and_pages_the_failures() -> Result<()> {
    let Some(stage) = Stage::start("ui-failures", &[WorkerOpts::default()], &[]).await? else {
        return Ok(());
    };
    let env = &stage.env;
    let browser = &stage.browser;
    // 150 items, 120 failing: three pages of 50 failures.
    let (n, unique) = (150, 77);
    let items = stock_items(n, unique);
    let failing: Vec<u64> = (0..n)
        .filter(|i| !items[*i as usize].starts_with("ok-"))
        .collect();
    assert_eq!(failing.len(), 120);
    let job_id = env
        .submit(&json!({
            "job_id": env.job_id("stock"),
            "operation": "exec",
            "params": {"command": ["sh", "-c", STOCK_SCRIPT], "timeout_ms": 10000},
            "items": items,
            // One fragment: every operation runs (and has its error kept) before the job fails
            // for exceeding the failures it tolerates, which would cancel the rest unrun.
            "fragment_size": n,
            "max_attempts": 1,
        }))
        .await?;
    let status = env.wait_for_terminal(&job_id, JOB_TIMEOUT).await?;
    let failed = failing.len() as u64;
    assert_counts(&status, JobState::Failed, n - failed, failed);

    let path = format!("/jobs/{job_id}");
    stage.goto(&path).await?;
    assert_failed_job_page(browser, &path, n, failed).await?;

    // Three pages of 50, in index order, each row the error the worker reported.
    assert_failure_page(browser, &items, &failing, 1).await?;
    ensure!(
        browser.node("a.prev").await?.is_none(),
        "a.prev on the first page"
    );
    let shot = browser.screenshot("job").await?;
    eprintln!("screenshot {}", shot.display());
    turn_page(browser, "a.next", &path, 2).await?;
    assert_failure_page(browser, &items, &failing, 2).await?;
    turn_page(browser, "a.next", &path, 3).await?;
    assert_failure_page(browser, &items, &failing, 3).await?;
    ensure!(
        browser.node("a.next").await?.is_none(),
        "a.next on the last page"
    );
    turn_page(browser, "a.prev", &path, 2).await?;
    assert_failure_page(browser, &items, &failing, 2).await?;

    // The one failure whose error holds "zebra", found by its text.
    search(browser, "#failure-search input[name=fq]", "zebra").await?;
    browser
        .wait_for_location(&format!("{path}?fq=zebra"), PAGE)
        .await?;
    assert_eq!(
        count_in(browser, "#failures-total").await?,
        1,
        "failures-total of the search"
    );
    let rows = browser.nodes("#failures tr.failure").await?;
    let [row] = rows.as_slice() else {
        bail!("one failure row expected for the search, got {rows:?}");
    };
    assert_eq!(row.number("index")?, unique);
    let zebra = exec_error(&format!("zebra-{unique:03}"));
    assert_eq!(browser.text("#failures tr.failure td.error").await?, zebra);
    ensure!(
        browser.node("a.next").await?.is_none() && browser.node("a.prev").await?.is_none(),
        "one page of results, yet pager links"
    );

    // The results link serves every line, as `batchctl results`.
    assert_results_download(&stage.console, &path, n, (unique, &zebra)).await?;
    stage.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_on_the_job_page_ends_the_job_cancelled() -> Result<()> {
    let Some(stage) = Stage::start("ui-cancel", &[WorkerOpts::default()], &[]).await? else {
        return Ok(());
    };
    let env = &stage.env;
    let browser = &stage.browser;
    // A minute of work: only the cancel can end it within the test.
    let job_id = env
        .submit(&slow_job(&env.job_id("doomed"), 600, 100, 2))
        .await?;
    let path = format!("/jobs/{job_id}");
    stage.goto(&path).await?;
    // Until the splitter hands the job over, the page waits (and reloads itself).
    browser.wait_for_text("#state", "running", PAGE).await?;
    let form = browser.wait_for("#cancel", PAGE).await?;
    assert_eq!(
        form.attrs.get("action").map(String::as_str),
        Some(format!("{path}/cancel").as_str()),
        "#cancel: {form:?}"
    );
    ensure!(
        browser.node("#redrive").await?.is_none(),
        "a running job offers Redrive"
    );
    let csrf = browser
        .node("#cancel input[name=csrf]")
        .await?
        .context("no csrf field in #cancel")?;
    ensure!(
        csrf.attrs.get("value").is_some_and(|v| !v.is_empty()),
        "an empty csrf field: {csrf:?}"
    );

    // A POST needs the form's CSRF token, with or without BATCHQ_UI_TOKEN.
    let cancel_path = format!("{path}/cancel");
    for form in [&[][..], &[("csrf", "0123abcd")][..]] {
        let refused = http(
            stage.console.authority(),
            "POST",
            &cancel_path,
            &[],
            Some(form),
        )
        .await?;
        assert_eq!(refused.status, 403, "cancel with {form:?}: {refused:?}");
    }
    let root = http(stage.console.authority(), "GET", "/", &[], None).await?;
    assert_eq!(
        (root.status, root.header("location")),
        (303, Some("/jobs")),
        "GET /: {root:?}"
    );
    let status = env.status(&job_id).await?.context("the job is known")?;
    assert_eq!(
        status.state,
        JobState::Running,
        "after refused cancels: {status:?}"
    );

    browser.click("#cancel-button").await?;
    let question = browser.accept_dialog(PAGE).await?;
    ensure!(
        question.contains(&job_id),
        "the confirmation does not name the job: {question:?}"
    );
    browser.wait_for_location(&path, PAGE).await?;
    browser.wait_for_text("#state", "cancelled", PAGE).await?;
    let status = env.wait_for_terminal(&job_id, PAGE).await?;
    assert_eq!(status.state, JobState::Cancelled, "{status:?}");
    ensure!(
        status.ops_succeeded < 600,
        "the job ran to its end: {status:?}"
    );
    // The page of a cancelled job offers no Cancel any more (it reloads at the end).
    browser
        .until(PAGE, "#cancel gone from the page", || async {
            Ok(browser.node("#cancel").await?.is_none().then_some(()))
        })
        .await?;
    browser.wait_for_text("#state", "cancelled", PAGE).await?;

    // It offers Redrive instead, which publishes a RedriveRequest for the job.
    let channel = env.broker().channel().await?;
    let mut redrives = common::consume::subscribe(
        &channel,
        &env.broker().names().jobs(),
        common::topology::KEY_REDRIVE,
        "batchq-tests-redrive",
    )
    .await?;
    browser.wait_for("#redrive-button", PAGE).await?;
    browser.click("#redrive-button").await?;
    let question = browser.accept_dialog(PAGE).await?;
    ensure!(
        question.contains(&job_id),
        "the confirmation does not name the job: {question:?}"
    );
    browser.wait_for_location(&path, PAGE).await?;
    let request = tokio::time::timeout(PAGE, futures::StreamExt::next(&mut redrives))
        .await
        .context("no RedriveRequest after the Redrive button")?
        .context("the redrive subscription ended")??;
    assert_eq!(
        serde_json::from_slice::<Value>(&request.data)?,
        json!({ "job_id": job_id })
    );
    let _ = channel.close(200, "seen".into()).await;
    stage.finish().await
}

/// Submits a long `sleep` job with room for three fragments per worker, and waits until the
/// workers page shows each of its three workers holding some.
async fn make_every_worker_busy(stage: &Stage) -> Result<()> {
    let env = &stage.env;
    env.submit(&json!({
        "job_id": env.job_id("busy"),
        "operation": "sleep",
        "params": {"ms": 100},
        "range": {"start": 0, "end": 600},
        "fragment_size": 2,
        "max_concurrent_fragments": 9,
    }))
    .await?;
    let browser = &stage.browser;
    browser
        .until(PAGE, "every worker holding sleep fragments", || async {
            let rows = browser.nodes("#workers tr.worker").await?;
            Ok((rows.len() == 3 && rows.iter().all(|r| r.text.contains("sleep: "))).then_some(()))
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workers_page_shows_every_worker_and_drops_a_killed_one() -> Result<()> {
    let heartbeat = Duration::from_secs(1);
    let opts = WorkerOpts {
        heartbeat_ms: heartbeat.as_millis() as u64,
        ..WorkerOpts::default()
    };
    let Some(mut stage) =
        Stage::start("ui-workers", &[opts.clone(), opts.clone(), opts], &[]).await?
    else {
        return Ok(());
    };
    let workers = stage.env.wait_for_workers(3, PAGE).await?;
    let ids: BTreeSet<String> = workers.iter().map(|w| w.worker.clone()).collect();
    stage.goto("/workers").await?;
    let browser = &stage.browser;
    let listed = || async {
        let rows = browser.nodes("#workers tr.worker").await?;
        rows.iter()
            .map(|row| row.data("worker").map(str::to_owned))
            .collect::<Result<BTreeSet<String>>>()
    };
    browser
        .until(PAGE, "every worker listed", || async {
            Ok((listed().await? == ids).then_some(()))
        })
        .await?;
    assert_eq!(
        count_in(browser, "#workers-total").await?,
        3,
        "workers-total"
    );
    // The splitter and the reducer, each active (the splitter's first beat may come after the
    // page's first load: the table refreshes itself).
    for role in ["splitter", "reducer"] {
        let css = format!("#services tr.service[data-role='{role}'][data-active='true']");
        browser
            .until(PAGE, &format!("an active {role} listed"), || async {
                Ok((!browser.nodes(&css).await?.is_empty()).then_some(()))
            })
            .await?;
    }
    // Work for all three: the page shows what each holds, from its heartbeats.
    make_every_worker_busy(&stage).await?;
    let shot = browser.screenshot("workers").await?;
    eprintln!("screenshot {}", shot.display());

    // SIGKILL one worker: it stops beating, and the page (without a reload) drops it once the
    // reducer has missed three heartbeats, plus at most one refresh of the page.
    mark_page(browser).await?;
    let victim = stage.workers[1];
    let victim_pid = stage.env.pid(victim).context("the worker runs")?;
    let victim_id = workers
        .iter()
        .find(|w| w.pid == victim_pid)
        .map(|w| w.worker.clone())
        .context("the killed worker among those the reducer knows")?;
    stage.env.kill(victim, Signal::Kill)?;
    let killed_at = Instant::now();
    let bound = heartbeat * 3 + REFRESH_EVERY + Duration::from_secs(2);
    let left: BTreeSet<String> = ids.iter().filter(|id| **id != victim_id).cloned().collect();
    browser
        .until(bound, "the killed worker gone from the page", || async {
            Ok((listed().await? == left).then_some(()))
        })
        .await?;
    let gone_after = killed_at.elapsed();
    ensure!(
        still_same_page(browser).await?,
        "the workers page was reloaded rather than refreshed"
    );
    assert_eq!(
        count_in(browser, "#workers-total").await?,
        2,
        "workers-total after the kill"
    );
    eprintln!(
        "the killed worker left the page {gone_after:?} after SIGKILL (heartbeat {heartbeat:?}, \
         bound {bound:?})"
    );
    stage.finish().await
}

/// The submit form as bytes: the bad JobSpec `bad_text` is refused with a 400 naming the
/// field; without the CSRF token even a good JobSpec (of id `forged`) is refused (403).
async fn assert_submit_over_http(stage: &Stage, bad_text: &str, forged: &str) -> Result<()> {
    let csrf = stage
        .browser
        .node("#submit input[name=csrf]")
        .await?
        .and_then(|field| field.attrs.get("value").cloned())
        .context("no csrf field in #submit")?;
    let post = |fields: Vec<(&'static str, String)>| async move {
        let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (kind, body) = multipart(&fields);
        http_with_body(
            stage.console.authority(),
            "POST",
            "/submit",
            &[],
            Some((&kind, &body)),
        )
        .await
    };
    let refused = post(vec![("csrf", csrf), ("spec", bad_text.to_owned())]).await?;
    assert_eq!(
        refused.status, 400,
        "POST /submit of the bad JobSpec: {refused:?}"
    );
    ensure!(
        refused.body.contains("max_attempts"),
        "the 400 does not name the field: {}",
        refused.body
    );
    let good = json!({"job_id": forged, "operation": "noop", "items": [1]});
    let no_csrf = post(vec![("spec", serde_json::to_string(&good)?)]).await?;
    assert_eq!(
        no_csrf.status, 403,
        "POST /submit without csrf: {no_csrf:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_jobspec_submitted_names_the_wrong_field() -> Result<()> {
    let Some(stage) = Stage::start("ui-submit", &[WorkerOpts::default()], &[]).await? else {
        return Ok(());
    };
    let env = &stage.env;
    let browser = &stage.browser;
    let bad =
        json!({"job_id": env.job_id("bad"), "operation": "noop", "items": [1], "max_attempts": 0});
    let bad_text = serde_json::to_string(&bad)?;
    // The splitter's own words for it.
    let rejection = parse_job_spec(bad_text.as_bytes(), None, None, ParseLimits::default())
        .err()
        .context("the splitter's parser accepts max_attempts 0")?;
    ensure!(rejection.error.contains("max_attempts"), "{rejection:?}");

    stage.goto("/submit").await?;
    browser.wait_for("#submit", PAGE).await?;
    browser
        .type_into("#submit textarea[name=spec]", &bad_text)
        .await?;
    browser.click("#submit-button").await?;
    let error = browser.wait_for("#error", PAGE).await?;
    assert_eq!(
        error.text.trim(),
        format!("invalid JobSpec: {}", rejection.error),
        "#error on {}",
        browser.describe().await
    );
    let kept = browser
        .node("#submit textarea[name=spec]")
        .await?
        .context("no spec box on the page with the error")?;
    assert_eq!(kept.text, bad_text, "the spec box keeps what was sent");
    let forged = env.job_id("forged");
    assert_submit_over_http(&stage, &bad_text, &forged).await?;

    let reached = env.status(rejection.job_id.as_str()).await?;
    ensure!(
        reached.is_none(),
        "the bad JobSpec reached the reducer: {reached:?}"
    );

    // A good one goes through, to its own page.
    let good = env.job_id("good");
    let good_text =
        serde_json::to_string(&json!({"job_id": good, "operation": "noop", "items": [1, 2, 3]}))?;
    browser
        .type_into("#submit textarea[name=spec]", &good_text)
        .await?;
    browser.click("#submit-button").await?;
    browser
        .wait_for_location(&format!("/jobs/{good}"), PAGE)
        .await?;
    let status = env.wait_for_terminal(&good, JOB_TIMEOUT).await?;
    assert_counts(&status, JobState::Succeeded, 3, 0);
    // Published after the forged one would have been, and done: the forged one never was.
    let forged_status = env.status(&forged).await?;
    ensure!(
        forged_status.is_none(),
        "a submit without the CSRF token was published: {forged_status:?}"
    );
    browser.wait_for_text("#state", "succeeded", PAGE).await?;
    stage.finish().await
}

/// Asserts that every page but `/healthz` answers 401 without the token or with a wrong one,
/// and 200 with it as a bearer token.
async fn assert_pages_need_the_token(console: &Console, bearer: &str, job_id: &str) -> Result<()> {
    let health = http(console.authority(), "GET", "/healthz", &[], None).await?;
    assert_eq!(
        (health.status, health.body.trim()),
        (200, "ok"),
        "/healthz needs no token"
    );
    let wrong = [("Authorization", "Bearer not-the-token")];
    let right = [("Authorization", bearer)];
    for path in ["/jobs", "/workers", &format!("/jobs/{job_id}")] {
        for (headers, expected, how) in [
            (&[][..], 401, "without the token"),
            (&wrong[..], 401, "with a wrong token"),
            (&right[..], 200, "with the token"),
        ] {
            let response = http(console.authority(), "GET", path, headers, None).await?;
            assert_eq!(response.status, expected, "GET {path} {how}: {response:?}");
        }
    }
    Ok(())
}

/// Asserts that POST `cancel_path` is refused without the CSRF token or with a wrong one (403,
/// with the bearer token), and without the bearer token (401).
async fn assert_cancel_refused(console: &Console, bearer: &str, cancel_path: &str) -> Result<()> {
    let right = [("Authorization", bearer)];
    for (headers, form, expected, how) in [
        (&right[..], &[][..], 403, "without csrf"),
        (
            &right[..],
            &[("csrf", "0123abcd")][..],
            403,
            "with a wrong csrf",
        ),
        (
            &[][..],
            &[("csrf", "0123abcd")][..],
            401,
            "without the token",
        ),
    ] {
        let response = http(
            console.authority(),
            "POST",
            cancel_path,
            headers,
            Some(form),
        )
        .await?;
        assert_eq!(response.status, expected, "cancel {how}: {response:?}");
    }
    Ok(())
}

/// Asserts that POST /login refuses a wrong token (401, no cookie) and answers the right one
/// with a 303 to /jobs and the session cookie, HttpOnly, SameSite=Strict, for the whole site.
async fn assert_login_sets_the_session(console: &Console, token: &str) -> Result<()> {
    let wrong = http(
        console.authority(),
        "POST",
        "/login",
        &[],
        Some(&[("token", "nope")]),
    )
    .await?;
    assert_eq!(wrong.status, 401, "login with a wrong token: {wrong:?}");
    ensure!(
        wrong.header("set-cookie").is_none(),
        "a cookie for a wrong token"
    );
    let login = http(
        console.authority(),
        "POST",
        "/login",
        &[],
        Some(&[("token", token)]),
    )
    .await?;
    assert_eq!(
        (login.status, login.header("location")),
        (303, Some("/jobs")),
        "login: {login:?}"
    );
    let cookie = login
        .header("set-cookie")
        .context("no Set-Cookie at login")?;
    for part in ["batchq_session=", "HttpOnly", "SameSite=Strict", "Path=/"] {
        ensure!(cookie.contains(part), "Set-Cookie {cookie:?} lacks {part}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_pages_need_it_and_cancel_needs_the_csrf_token() -> Result<()> {
    let token = uuid::Uuid::new_v4().simple().to_string();
    let Some(stage) = Stage::start(
        "ui-token",
        &[WorkerOpts::default()],
        &[("BATCHQ_UI_TOKEN", token.as_str())],
    )
    .await?
    else {
        return Ok(());
    };
    let (env, console, browser) = (&stage.env, &stage.console, &stage.browser);
    let job_id = env
        .submit(&slow_job(&env.job_id("guarded"), 600, 100, 2))
        .await?;
    env.wait_for_status(&job_id, PAGE, |s| s.state == JobState::Running)
        .await?;
    let bearer = format!("Bearer {token}");
    assert_pages_need_the_token(console, &bearer, &job_id).await?;
    let cancel_path = format!("/jobs/{job_id}/cancel");
    assert_cancel_refused(console, &bearer, &cancel_path).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = env.status(&job_id).await?.context("the job is known")?;
    assert_eq!(
        status.state,
        JobState::Running,
        "after refused cancels: {status:?}"
    );
    assert_login_sets_the_session(console, &token).await?;

    // In the browser: the jobs page asks for the token, then shows the job.
    stage.goto("/jobs").await?;
    browser.wait_for("#login", PAGE).await?;
    browser
        .type_into("#login input[name=token]", &token)
        .await?;
    browser.click("#login-button").await?;
    browser.wait_for_location("/jobs", PAGE).await?;
    browser
        .until(PAGE, "the job listed after logging in", || {
            job_row(browser, &job_id)
        })
        .await?;

    // With the page's CSRF token the same cancel goes through (what was refused was its
    // lack), unless it comes from a page of another site (its Origin gives it away).
    stage.goto(&format!("/jobs/{job_id}")).await?;
    let csrf = browser
        .wait_for("#cancel input[name=csrf]", PAGE)
        .await?
        .attrs
        .get("value")
        .cloned()
        .context("no value in the csrf field")?;
    let form = [("csrf", csrf.as_str())];
    let elsewhere = [
        ("Authorization", bearer.as_str()),
        ("Origin", "http://evil.example"),
    ];
    let refused = http(
        console.authority(),
        "POST",
        &cancel_path,
        &elsewhere,
        Some(&form),
    )
    .await?;
    assert_eq!(
        refused.status, 403,
        "cancel from another origin: {refused:?}"
    );
    let right = [("Authorization", bearer.as_str())];
    let cancelled = http(
        console.authority(),
        "POST",
        &cancel_path,
        &right,
        Some(&form),
    )
    .await?;
    assert_eq!(
        (cancelled.status, cancelled.header("location")),
        (303, Some(format!("/jobs/{job_id}").as_str())),
        "cancel with the csrf: {cancelled:?}"
    );
    let status = env.wait_for_terminal(&job_id, PAGE).await?;
    assert_eq!(status.state, JobState::Cancelled, "{status:?}");
    stage.finish().await
}

/// No browser needed: the console refuses, before serving anything, to listen beyond
/// loopback without a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_does_not_listen_beyond_loopback_without_a_token() -> Result<()> {
    let env = TestEnv::new("ui-loopback").await?;
    let mut beyond = tokio::process::Command::new(bin_path(Bin::Batchctl));
    beyond
        .args(["ui", "--listen", "0.0.0.0:0"])
        .env("AMQP_URL", env.broker_url())
        .env("BATCHQ_NAMESPACE", &env.ns)
        .env_remove("BATCHQ_UI_TOKEN")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(15), beyond.output())
        .await
        .context("batchctl ui --listen 0.0.0.0:0 without a token kept running")??;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(2),
        "exit code; stderr {stderr:?}"
    );
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    ensure!(
        stderr.contains("BATCHQ_UI_TOKEN"),
        "the reason does not name BATCHQ_UI_TOKEN: {stderr:?}"
    );
    ensure!(
        output.stdout.is_empty(),
        "it announced a URL: {:?}",
        String::from_utf8_lossy(&output.stdout)
    );
    env.finish().await
}

/// The dead-letter count of the queues page, as its link reads (`1 dead letters`).
async fn dead_letters_shown(browser: &Browser) -> Result<Option<u64>> {
    let Some(link) = browser.node("#dead-link").await? else {
        return Ok(None);
    };
    Ok(link
        .text
        .split_whitespace()
        .next()
        .and_then(|n| n.replace(',', "").parse().ok()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queues_page_counts_dead_letters_and_links_to_them() -> Result<()> {
    let Some(stage) = Stage::start("ui-queues", &[WorkerOpts::default()], &[]).await? else {
        return Ok(());
    };
    let env = &stage.env;
    let browser = &stage.browser;
    // A JobSpec published straight to {ns}.jobs, as a user's program would, that the splitter
    // rejects and keeps on {ns}.dead; and a good job, so the work queue has had its consumer.
    let rejected = env
        .submit(&json!({"job_id": env.job_id("rejected"), "operation": "noop", "items": [1], "max_attempts": 0}))
        .await?;
    let good = env
        .submit(&json!({"job_id": env.job_id("good"), "operation": "noop", "items": [1, 2, 3]}))
        .await?;
    let status = env.wait_for_terminal(&rejected, JOB_TIMEOUT).await?;
    assert_eq!(status.state, JobState::Rejected, "{status:?}");
    assert_counts(
        &env.wait_for_terminal(&good, JOB_TIMEOUT).await?,
        JobState::Succeeded,
        3,
        0,
    );

    stage.goto("/queues").await?;
    browser.wait_for("#queues", PAGE).await?;
    let work_queue = env.names.work_queue("noop");
    let queues: Vec<String> = browser
        .nodes("#queues tr.queue")
        .await?
        .into_iter()
        .filter_map(|row| row.data.get("queue").cloned())
        .collect();
    for expected in [env.names.jobs(), env.names.dead(), work_queue.clone()] {
        ensure!(
            queues.contains(&expected),
            "{expected} not on the queues page: {queues:?}"
        );
    }
    browser
        .until(PAGE, "one dead letter counted", || async {
            Ok((dead_letters_shown(browser).await? == Some(1)).then_some(()))
        })
        .await?;

    browser.click("#dead-link").await?;
    browser.wait_for_location("/dead", PAGE).await?;
    let rows = browser.nodes("#dead tr.dead").await?;
    assert_eq!(rows.len(), 1, "dead letters listed: {rows:?}");
    ensure!(
        rows[0].text.contains("max_attempts") && rows[0].text.contains(&rejected),
        "the dead letter names its job and the field at fault: {:?}",
        rows[0].text
    );

    // Reading the dead letters hands them back: the queue still holds the one.
    stage.goto("/queues").await?;
    browser
        .until(PAGE, "the dead letter still counted", || async {
            Ok((dead_letters_shown(browser).await? == Some(1)).then_some(()))
        })
        .await?;
    stage.finish().await
}
