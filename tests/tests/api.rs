//! The console's HTTP API (`/api/v1/`, contract v1.2) over HTTP against a real stack: the
//! tokens (401 without, the read token's GETs and 403 POSTs), submit (202 and the job's
//! results equal to `batchctl results`; 400 naming the field, nothing published), 404s, the
//! event stream until the job ends, failures with `q`, pagination with a cursor while jobs
//! arrive, cancel and redrive, workers and queues as `batchctl … --json`, and the OpenAPI
//! document against the routes served.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use batchq_tests::browser::{Console, HttpResponse, http_with_body, http_within};
use batchq_tests::{TestEnv, WorkerOpts};
use common::jobspec::{ParseLimits, parse_job_spec};
use futures::StreamExt;
use serde_json::{Value, json};

/// How long a job of these tests may take.
const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// The API of a test's console, with the credentials it sends.
struct Api<'a> {
    console: &'a Console,
    bearer: Option<String>,
}

impl<'a> Api<'a> {
    fn new(console: &'a Console, token: Option<&str>) -> Self {
        Self {
            console,
            bearer: token.map(|t| format!("Bearer {t}")),
        }
    }

    fn headers(&self) -> Vec<(&str, &str)> {
        match &self.bearer {
            Some(bearer) => vec![("Authorization", bearer.as_str())],
            None => Vec::new(),
        }
    }

    async fn get(&self, path: &str) -> Result<HttpResponse> {
        http_with_body(self.console.authority(), "GET", path, &self.headers(), None).await
    }

    async fn post(&self, path: &str, body: &[u8]) -> Result<HttpResponse> {
        let body = Some(("application/json", body));
        http_with_body(
            self.console.authority(),
            "POST",
            path,
            &self.headers(),
            body,
        )
        .await
    }

    /// GET `path`, which must answer 200 with JSON.
    async fn get_json(&self, path: &str) -> Result<Value> {
        let response = self.get(path).await?;
        ensure!(response.status == 200, "GET {path}: {response:?}");
        json_of(&response)
    }

    /// Polls `GET /api/v1/jobs/{id}` until the job is terminal (a 404 while the splitter has
    /// not handed it to the reducer yet).
    async fn wait_for_terminal(&self, id: &str) -> Result<Value> {
        let deadline = Instant::now() + JOB_TIMEOUT;
        loop {
            let response = self.get(&format!("/api/v1/jobs/{id}")).await?;
            let status = match response.status {
                200 => Some(json_of(&response)?),
                404 => None,
                _ => bail!("GET /api/v1/jobs/{id}: {response:?}"),
            };
            let state = status.as_ref().and_then(|s| s["state"].as_str());
            if let (Some(status), Some(state)) = (&status, state)
                && ["succeeded", "failed", "cancelled", "rejected"].contains(&state)
            {
                return Ok(status.clone());
            }
            ensure!(
                Instant::now() < deadline,
                "job {id} did not end within {JOB_TIMEOUT:?}: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn json_of(response: &HttpResponse) -> Result<Value> {
    serde_json::from_str(&response.body).with_context(|| format!("not JSON: {:?}", response.body))
}

/// The `error` of a JSON error answer, which must have `status`.
fn error_of(response: &HttpResponse, status: u16) -> Result<String> {
    ensure!(response.status == status, "expected {status}: {response:?}");
    ensure!(
        response
            .header("content-type")
            .is_some_and(|t| t.starts_with("application/json")),
        "an error that is not JSON: {response:?}"
    );
    json_of(response)?["error"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no \"error\" string in {:?}", response.body))
}

/// A token of the length the console asks for, unique to the test.
fn token() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// A splitter, a reducer, `workers` workers and a console with `console_env`.
async fn stack(
    test: &str,
    workers: usize,
    console_env: &[(&str, &str)],
) -> Result<(TestEnv, Console)> {
    let mut env = TestEnv::new(test).await?;
    env.start_splitter()?;
    env.start_reducer()?;
    for _ in 0..workers {
        env.start_worker(WorkerOpts::default())?;
    }
    let console = env.start_console(console_env).await?;
    Ok((env, console))
}

/// The session cookie (`name=value`) the console's login form sets for `token`.
async fn login_cookie(console: &Console, token: &str) -> Result<String> {
    let login = http_with_body(
        console.authority(),
        "POST",
        "/login",
        &[],
        Some((
            "application/x-www-form-urlencoded",
            format!("token={token}&next=%2Fjobs").as_bytes(),
        )),
    )
    .await?;
    Ok(login
        .header("set-cookie")
        .and_then(|c| c.split(';').next())
        .with_context(|| format!("no session cookie: {login:?}"))?
        .to_owned())
}

fn sha256_spec(job_id: &str, n: u64) -> Value {
    json!({
        "job_id": job_id,
        "operation": "sha256",
        "params": {"rounds": 3},
        "range": {"start": 0, "end": n},
        "fragment_size": 7,
    })
}

#[tokio::test]
async fn with_tokens_the_api_needs_them_and_the_read_token_changes_nothing() -> Result<()> {
    let (full, read) = (token(), token());
    let (env, console) = stack(
        "api-tokens",
        1,
        &[
            ("BATCHQ_UI_TOKEN", full.as_str()),
            ("BATCHQ_UI_READ_TOKEN", read.as_str()),
        ],
    )
    .await?;
    let (anonymous, wrong) = (Api::new(&console, None), Api::new(&console, Some(&token())));
    let (api, reader) = (
        Api::new(&console, Some(&full)),
        Api::new(&console, Some(&read)),
    );
    for path in ["/api/v1/jobs", "/api/v1/workers", "/api/v1/openapi.json"] {
        error_of(&anonymous.get(path).await?, 401).context("without a token")?;
        error_of(&wrong.get(path).await?, 401).context("with a wrong token")?;
        reader.get_json(path).await.context("with the read token")?;
    }
    // The session cookie of the login form opens the pages, not the API.
    let cookie = login_cookie(&console, &full).await?;
    let with_cookie = [("Cookie", cookie.as_str())];
    let page = http_with_body(console.authority(), "GET", "/jobs", &with_cookie, None).await?;
    assert_eq!(page.status, 200, "a page with the session cookie");
    let api_by_cookie = http_with_body(
        console.authority(),
        "GET",
        "/api/v1/jobs",
        &with_cookie,
        None,
    )
    .await?;
    error_of(&api_by_cookie, 401).context("the API with only the session cookie")?;

    // The read token: every POST refused, of the API and of the pages; nothing published.
    let refused_id = env.job_id("refused");
    let refused = reader
        .post(
            "/api/v1/jobs",
            &serde_json::to_vec(&sha256_spec(&refused_id, 5))?,
        )
        .await?;
    assert!(
        error_of(&refused, 403)?.contains("read token"),
        "{refused:?}"
    );
    let job_id = env.job_id("allowed");
    let submitted = api
        .post(
            "/api/v1/jobs",
            &serde_json::to_vec(&sha256_spec(&job_id, 5))?,
        )
        .await?;
    assert_eq!(submitted.status, 202, "{submitted:?}");
    assert_eq!(json_of(&submitted)?, json!({ "job_id": job_id }));
    let status = api.wait_for_terminal(&job_id).await?;
    assert_eq!(status["state"], "succeeded", "{status}");
    for path in [
        format!("/api/v1/jobs/{job_id}/cancel"),
        format!("/api/v1/jobs/{job_id}/redrive"),
    ] {
        error_of(&reader.post(&path, b"").await?, 403).with_context(|| path.clone())?;
    }
    let read_bearer = format!("Bearer {read}");
    let page_cancel = http_with_body(
        console.authority(),
        "POST",
        &format!("/jobs/{job_id}/cancel"),
        &[("Authorization", read_bearer.as_str())],
        Some(("application/x-www-form-urlencoded", b"csrf=x")),
    )
    .await?;
    assert_eq!(page_cancel.status, 403, "a page's POST with the read token");
    let page = http_with_body(
        console.authority(),
        "GET",
        &format!("/jobs/{job_id}"),
        &[("Authorization", read_bearer.as_str())],
        None,
    )
    .await?;
    assert_eq!(page.status, 200, "a page with the read token");
    // The read token logs in too: its session reads the pages and is refused their POSTs.
    let read_cookie = login_cookie(&console, &read).await?;
    ensure!(
        read_cookie != cookie,
        "the read token's session is the token's"
    );
    let with_read_cookie = [("Cookie", read_cookie.as_str())];
    let page = http_with_body(console.authority(), "GET", "/jobs", &with_read_cookie, None).await?;
    assert_eq!(page.status, 200, "a page with the read token's session");
    let page_cancel = http_with_body(
        console.authority(),
        "POST",
        &format!("/jobs/{job_id}/cancel"),
        &with_read_cookie,
        Some(("application/x-www-form-urlencoded", b"csrf=x")),
    )
    .await?;
    assert_eq!(
        page_cancel.status, 403,
        "a page's POST with the read token's session"
    );
    // The refused job was published before the allowed one, on the same queue: it would be
    // known by now.
    let unknown = reader.get(&format!("/api/v1/jobs/{refused_id}")).await?;
    error_of(&unknown, 404).context("the job the read token submitted")?;
    env.finish().await
}

#[tokio::test]
async fn a_job_submitted_over_the_api_runs_and_its_results_are_batchctls() -> Result<()> {
    let (env, console) = stack("api-submit", 2, &[]).await?;
    let api = Api::new(&console, None);

    // A bad JobSpec: 400 naming the field as the splitter would, and nothing published.
    let bad_id = env.job_id("bad");
    let bad = json!({"job_id": bad_id, "operation": "noop", "range": {"start": 0, "end": 3}, "fragmnet_size": 2});
    let bad_body = serde_json::to_vec(&bad)?;
    let splitter_says = parse_job_spec(&bad_body, None, None, ParseLimits::default())
        .err()
        .context("the splitter accepts the bad JobSpec")?
        .error;
    let error = error_of(&api.post("/api/v1/jobs", &bad_body).await?, 400)?;
    assert!(
        error.contains("fragmnet_size") && error.contains(&splitter_says),
        "{error:?} does not carry the splitter's {splitter_says:?}"
    );
    let both = json!({"operation": "noop", "items": [1], "range": {"start": 0, "end": 1}});
    let error = error_of(
        &api.post("/api/v1/jobs", &serde_json::to_vec(&both)?)
            .await?,
        400,
    )?;
    assert!(
        error.contains("items") && error.contains("range"),
        "{error:?}"
    );
    error_of(&api.post("/api/v1/jobs", b"{not json").await?, 400)?;
    error_of(&api.post("/api/v1/jobs", b"").await?, 400)?;

    // A good one, without a job_id: the API gives it one.
    let mut spec = sha256_spec("unused", 60);
    spec.as_object_mut().context("an object")?.remove("job_id");
    let submitted = api
        .post("/api/v1/jobs", &serde_json::to_vec(&spec)?)
        .await?;
    assert_eq!(submitted.status, 202, "{submitted:?}");
    let job_id = json_of(&submitted)?["job_id"]
        .as_str()
        .context("no job_id")?
        .to_owned();
    assert!(
        uuid::Uuid::parse_str(&job_id).is_ok(),
        "{job_id} is no UUID"
    );

    // A slow job's events until it ends: a JobStatus at least once a second, the last one
    // terminal, then the end of the stream.
    let slow = env.job_id("slow");
    let spec = json!({"job_id": slow, "operation": "sleep", "params": {"ms": 100},
        "range": {"start": 0, "end": 25}, "fragment_size": 5, "max_concurrent_fragments": 1});
    assert_eq!(
        api.post("/api/v1/jobs", &serde_json::to_vec(&spec)?)
            .await?
            .status,
        202
    );
    let deadline = Instant::now() + JOB_TIMEOUT;
    while api.get(&format!("/api/v1/jobs/{slow}")).await?.status == 404 {
        ensure!(Instant::now() < deadline, "job {slow} never became known");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = Instant::now();
    let path = format!("/api/v1/jobs/{slow}/events");
    let events = http_within(console.authority(), "GET", &path, &[], None, JOB_TIMEOUT).await?;
    let streamed = started.elapsed();
    assert_eq!(events.status, 200, "{events:?}");
    assert!(
        events
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/event-stream")),
        "{events:?}"
    );
    let statuses = sse_statuses(&events.body)?;
    let last = statuses.last().context("no status event")?;
    assert_eq!(
        (&last["job_id"], &last["state"], &last["ops_succeeded"]),
        (&json!(slow), &json!("succeeded"), &json!(25)),
        "{last}"
    );
    ensure!(
        statuses[..statuses.len() - 1]
            .iter()
            .all(|s| s["state"] == "accepted" || s["state"] == "running"),
        "a terminal status before the last event: {statuses:?}"
    );
    ensure!(
        streamed >= Duration::from_secs(2) && statuses.len() as u64 >= streamed.as_secs(),
        "{} status events in {streamed:?}: fewer than one a second",
        statuses.len()
    );
    api.wait_for_terminal(&job_id).await?;

    let status = api.get_json(&format!("/api/v1/jobs/{job_id}")).await?;
    assert_eq!(
        (
            &status["state"],
            &status["ops_total"],
            &status["ops_failed"]
        ),
        (&json!("succeeded"), &json!(60), &json!(0))
    );
    let results = api.get(&format!("/api/v1/jobs/{job_id}/results")).await?;
    assert_eq!(results.status, 200, "{results:?}");
    assert_eq!(results.header("content-type"), Some("application/x-ndjson"));
    let (exit, printed, stderr) = env.batchctl(&["results", &job_id]).await?;
    ensure!(exit.success(), "batchctl results: {stderr}");
    assert_eq!(results.body.lines().count(), 60);
    assert_eq!(
        results.body, printed,
        "the API's results differ from batchctl's"
    );
    let first: Value = serde_json::from_str(results.body.lines().next().unwrap_or_default())?;
    assert_eq!(
        first,
        json!({"index": 0, "result": batchq_tests::sha256_hex("0", 3)})
    );

    // Unknown jobs: 404 with an error, on every route of a job.
    for path in ["", "/events", "/results", "/failures"] {
        let path = format!("/api/v1/jobs/no-such-job{path}");
        let error = error_of(&api.get(&path).await?, 404).with_context(|| path.clone())?;
        assert!(error.contains("no-such-job"), "{path}: {error}");
    }
    error_of(
        &api.post("/api/v1/jobs/no-such-job/cancel", b"").await?,
        404,
    )?;
    // The bad JobSpecs never reached the splitter: the first was refused before the good
    // one, and the splitter set none aside as rejected.
    error_of(&api.get(&format!("/api/v1/jobs/{bad_id}")).await?, 404)?;
    let dead = env.drain_dead().await?;
    ensure!(
        dead.is_empty(),
        "rejected JobSpecs reached the splitter: {dead:?}"
    );
    // A finished job cannot be cancelled, nor a succeeded one redriven.
    error_of(
        &api.post(&format!("/api/v1/jobs/{job_id}/cancel"), b"")
            .await?,
        409,
    )?;
    error_of(
        &api.post(&format!("/api/v1/jobs/{job_id}/redrive"), b"")
            .await?,
        409,
    )?;
    env.finish().await
}

/// The JobStatus of every `status` event of an event stream, in order.
fn sse_statuses(body: &str) -> Result<Vec<Value>> {
    let mut statuses = Vec::new();
    for event in body.split("\n\n").filter(|e| !e.trim().is_empty()) {
        let field = |name: &str| {
            event
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim_start().to_owned())
        };
        match field("event:").as_deref() {
            Some("status") => statuses.push(
                serde_json::from_str(&field("data:").context("a status event without data")?)
                    .context("a status event whose data is no JSON")?,
            ),
            // Keep-alive comments.
            None if event.lines().all(|l| l.starts_with(':')) => {}
            other => bail!("an event {other:?} in a stream of a job that ran well: {event:?}"),
        }
    }
    Ok(statuses)
}

/// A stock check of `exec`: item `ok-…` succeeds, any other fails with "{item} is out of
/// stock".
const STOCK_SCRIPT: &str =
    "case {} in ok-*) echo in stock;; *) echo {} is out of stock >&2; exit 3;; esac";

#[tokio::test]
async fn failures_and_jobs_come_in_pages_with_a_cursor() -> Result<()> {
    let (mut env, console) = stack("api-pages", 1, &[]).await?;
    let api = Api::new(&console, None);
    let (redrive_channel, mut redrives) = redrive_requests(&env).await?;

    // 30 items: every third in stock, one zebra among the others.
    let items: Vec<String> = (0..30)
        .map(|i| match i {
            _ if i % 3 == 0 => format!("ok-{i:02}"),
            17 => format!("zebra-{i:02}"),
            _ => format!("widget-{i:02}"),
        })
        .collect();
    let failing: Vec<u64> = (0..30).filter(|i| i % 3 != 0).collect();
    let job_id = env.job_id("stock");
    let spec = json!({
        "job_id": job_id, "operation": "exec",
        "params": {"command": ["sh", "-c", STOCK_SCRIPT], "timeout_ms": 10000},
        // One fragment: every operation runs (and keeps its error) before the job fails for
        // exceeding the failures it tolerates, which would cancel the rest unrun.
        "items": items, "max_attempts": 1, "fragment_size": 30,
    });
    env.note_operation("exec");
    let submitted = api
        .post("/api/v1/jobs", &serde_json::to_vec(&spec)?)
        .await?;
    assert_eq!(submitted.status, 202, "{submitted:?}");
    let status = api.wait_for_terminal(&job_id).await?;
    assert_eq!(
        (&status["state"], &status["ops_failed"]),
        (&json!("failed"), &json!(failing.len()))
    );

    // Failures, 7 a page, followed by cursor: every failed index once, in order.
    let mut seen = Vec::new();
    let mut path = format!("/api/v1/jobs/{job_id}/failures?limit=7");
    for page in 1.. {
        ensure!(page <= 10, "the failures did not end after 10 pages");
        let answer = api.get_json(&path).await?;
        let failures = answer["failures"].as_array().context("no failures")?;
        ensure!(
            failures.len() <= 7,
            "page {page}: {} failures",
            failures.len()
        );
        for failure in failures {
            let index = failure["index"].as_u64().context("no index")?;
            let item = &items[index as usize];
            assert_eq!(
                failure["error"]
                    .as_str()
                    .map(|e| e.ends_with(&format!("{item} is out of stock"))),
                Some(true),
                "{failure}"
            );
            seen.push(index);
        }
        match answer["next"].as_str() {
            Some(next) => path = format!("/api/v1/jobs/{job_id}/failures?limit=7&cursor={next}"),
            None => break,
        }
    }
    assert_eq!(seen, failing);
    let zebra = api
        .get_json(&format!("/api/v1/jobs/{job_id}/failures?q=ZEBRA"))
        .await?;
    assert_eq!(
        zebra["failures"].as_array().map(|f| f.len()),
        Some(1),
        "{zebra}"
    );
    assert_eq!(
        (&zebra["failures"][0]["index"], &zebra["next"]),
        (&json!(17), &Value::Null)
    );
    // A cursor of one query is refused on another.
    let first = api
        .get_json(&format!("/api/v1/jobs/{job_id}/failures?limit=2"))
        .await?;
    let cursor = first["next"].as_str().context("no next")?;
    let other = api
        .get(&format!(
            "/api/v1/jobs/{job_id}/failures?q=widget&cursor={cursor}"
        ))
        .await?;
    assert!(error_of(&other, 400)?.contains("cursor"));
    error_of(&api.get("/api/v1/jobs?limit=0").await?, 400)?;
    error_of(&api.get("/api/v1/jobs?state=sleepy").await?, 400)?;

    // Redrive of the failed job: 202 once a RedriveRequest is on {ns}.jobs.
    let redriven = api
        .post(&format!("/api/v1/jobs/{job_id}/redrive"), b"")
        .await?;
    assert_eq!(redriven.status, 202, "{redriven:?}");
    let request = tokio::time::timeout(Duration::from_secs(10), redrives.next())
        .await
        .context("no RedriveRequest within 10 s")?
        .context("the redrive subscription ended")??;
    assert_eq!(request.routing_key.as_str(), "redrive");
    assert_eq!(
        serde_json::from_slice::<Value>(&request.data)?,
        json!({ "job_id": job_id })
    );
    let _ = redrive_channel.close(200, "seen".into()).await;

    // Jobs, 2 a page, newest first, while another job arrives between two pages.
    let mut listed = Vec::new();
    for i in 0..5 {
        let id = format!("{}-{i}", env.job_id("listed"));
        let spec = json!({"job_id": id, "operation": "noop", "range": {"start": 0, "end": 1}});
        assert_eq!(
            api.post("/api/v1/jobs", &serde_json::to_vec(&spec)?)
                .await?
                .status,
            202
        );
        api.wait_for_terminal(&id).await?;
        listed.push(id);
    }
    listed.reverse();
    let first = api.get_json("/api/v1/jobs?prefix=listed-&limit=2").await?;
    let mut paged = ids_of(&first)?;
    let late = env.job_id("listed-late");
    let spec = json!({"job_id": late, "operation": "noop", "range": {"start": 0, "end": 1}});
    assert_eq!(
        api.post("/api/v1/jobs", &serde_json::to_vec(&spec)?)
            .await?
            .status,
        202
    );
    api.wait_for_terminal(&late).await?;
    let mut next = first["next"].as_str().map(str::to_owned);
    while let Some(cursor) = next {
        ensure!(paged.len() < 20, "the jobs did not end: {paged:?}");
        let page = api
            .get_json(&format!(
                "/api/v1/jobs?prefix=listed-&limit=2&cursor={cursor}"
            ))
            .await?;
        paged.extend(ids_of(&page)?);
        next = page["next"].as_str().map(str::to_owned);
    }
    assert_eq!(paged, listed, "the pages repeat, skip or misorder a job");
    let all = api.get_json("/api/v1/jobs?prefix=listed-&limit=10").await?;
    assert_eq!(ids_of(&all)?.first(), Some(&late), "the newest job first");
    let failed = api.get_json("/api/v1/jobs?state=failed").await?;
    assert_eq!(ids_of(&failed)?, vec![job_id]);

    // Workers and queues: the records batchctl prints.
    let workers = api.get_json("/api/v1/workers").await?;
    let (exit, printed, stderr) = env.batchctl(&["workers", "--json"]).await?;
    ensure!(exit.success(), "batchctl workers: {stderr}");
    let printed: Value = serde_json::from_str(&printed)?;
    let identity = |records: &Value| -> BTreeSet<String> {
        records
            .as_array()
            .into_iter()
            .flatten()
            .map(|w| format!("{} {} {}", w["worker"], w["pid"], w["operations"]))
            .collect()
    };
    assert_eq!(identity(&workers), identity(&printed));
    assert_eq!(workers.as_array().map(Vec::len), Some(1));
    let queues = api.get_json("/api/v1/queues").await?;
    let (exit, printed, stderr) = env.batchctl(&["queues", "--json"]).await?;
    ensure!(exit.success(), "batchctl queues: {stderr}");
    let printed: Value = serde_json::from_str(&printed)?;
    let names = |records: &Value| -> BTreeSet<String> {
        records
            .as_array()
            .into_iter()
            .flatten()
            .map(|q| format!("{} consumers {}", q["queue"], q["consumers"]))
            .collect()
    };
    assert_eq!(names(&queues), names(&printed));
    let work_queue = format!("{}.work.exec", env.broker().names().namespace());
    ensure!(
        names(&queues).iter().any(|q| q.contains(&work_queue)),
        "no {work_queue} in {queues}"
    );
    env.finish().await
}

fn ids_of(page: &Value) -> Result<Vec<String>> {
    page["jobs"]
        .as_array()
        .context("no jobs")?
        .iter()
        .map(|j| j["job_id"].as_str().map(str::to_owned).context("no job_id"))
        .collect()
}

/// What is published on `{ns}.jobs` with routing key `redrive`, from now on, on a private
/// queue that lives as long as the channel returned with it.
async fn redrive_requests(
    env: &TestEnv,
) -> Result<(common::lapin::Channel, common::lapin::Consumer)> {
    let channel = env.broker().channel().await?;
    let consumer = common::consume::subscribe(
        &channel,
        &env.broker().names().jobs(),
        common::topology::KEY_REDRIVE,
        "batchq-tests-redrive",
    )
    .await?;
    Ok((channel, consumer))
}

#[tokio::test]
async fn the_openapi_document_describes_every_route_served() -> Result<()> {
    let (env, console) = stack("api-openapi", 1, &[]).await?;
    let api = Api::new(&console, None);
    let job_id = env.job_id("described");
    let spec = sha256_spec(&job_id, 3);
    assert_eq!(
        api.post("/api/v1/jobs", &serde_json::to_vec(&spec)?)
            .await?
            .status,
        202
    );
    api.wait_for_terminal(&job_id).await?;

    let document = api.get_json("/api/v1/openapi.json").await?;
    ensure!(
        document["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.")),
        "not OpenAPI 3: {document}"
    );
    let paths = document["paths"].as_object().context("no paths")?;
    let mut described = 0;
    for (path, item) in paths {
        let concrete = path.replace("{job_id}", &job_id);
        for method in ["get", "post", "put", "patch", "delete"] {
            let Some(operation) = item.get(method) else {
                continue;
            };
            described += 1;
            let response = match method {
                "get" => api.get(&concrete).await?,
                "post" => api.post(&concrete, b"").await?,
                _ => bail!("{method} {path}: the API has only GET and POST"),
            };
            // Served: not the router's 404 or 405, and a status the document lists.
            let code = response.status.to_string();
            ensure!(
                operation["responses"].get(&code).is_some(),
                "{method} {path} answered {code}, which the document does not list: {response:?}"
            );
            ensure!(
                !response.body.contains("no such API route") && response.status != 405,
                "{method} {path} is described but not served: {response:?}"
            );
        }
    }
    assert_eq!(described, 11, "the contract's routes");
    // And nothing else is served under /api/.
    for (method, path) in [
        ("GET", "/api/v1/job"),
        ("GET", "/api/v2/jobs"),
        ("POST", "/api/v1/workers"),
    ] {
        let response = match method {
            "GET" => api.get(path).await?,
            _ => api.post(path, b"").await?,
        };
        ensure!(
            [404, 405].contains(&response.status) && json_of(&response)?["error"].is_string(),
            "{method} {path}: {response:?}"
        );
    }
    env.finish().await
}

/// The console refuses weak tokens at start, naming the variable, and exits non-zero.
#[tokio::test]
async fn the_console_refuses_weak_tokens() -> Result<()> {
    let cases = [
        (
            "BATCHQ_UI_TOKEN",
            "CHANGE-ME-to-a-long-random-secret",
            "placeholder",
        ),
        ("BATCHQ_UI_TOKEN", "short-secret", "characters"),
    ];
    for (variable, value, says) in cases {
        let output = tokio::time::timeout(
            Duration::from_secs(20),
            tokio::process::Command::new(batchq_tests::bin_path(batchq_tests::Bin::Batchctl))
                .args(["ui", "--listen", "127.0.0.1:0"])
                .env("BATCHQ_NAMESPACE", "api-weak-tokens-never-used")
                .env_remove("BATCHQ_UI_READ_TOKEN")
                .env(variable, value)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .context("batchctl ui with a weak token kept running")??;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{variable}={value}: exit 0");
        assert_eq!(stderr.trim().lines().count(), 1, "not one line: {stderr:?}");
        assert!(
            stderr.contains(variable) && stderr.contains(says),
            "{variable}={value}: {stderr:?}"
        );
    }
    // A read token is held to the same length.
    let output = tokio::process::Command::new(batchq_tests::bin_path(batchq_tests::Bin::Batchctl))
        .args(["ui", "--listen", "127.0.0.1:0"])
        .env("BATCHQ_UI_TOKEN", token())
        .env("BATCHQ_UI_READ_TOKEN", "read-only-but-short")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(20), output)
        .await
        .context("batchctl ui with a short read token kept running")??;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("BATCHQ_UI_READ_TOKEN"),
        "{stderr:?}"
    );
    Ok(())
}
