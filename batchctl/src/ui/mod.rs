//! `batchctl ui`: a web console over the same requests every `batchctl` command makes. It
//! talks to the reducer over `{ns}.rpc` and publishes submits and cancels on `{ns}.jobs`, so
//! it runs on any host that reaches the broker, needs no database and no port on the reducer.
//!
//! Pages are plain HTML rendered here (maud); one small script (`console.js`, served from this
//! binary) refreshes the live parts. No request leaves for anywhere but this server, which a
//! Content-Security-Policy of `'self'` holds the browser to.
//!
//! Security: the console listens on loopback unless told otherwise, and refuses any other
//! address without `BATCHQ_UI_TOKEN`. With a token every page needs it, as
//! `Authorization: Bearer TOKEN` or the session cookie the login form sets; `BATCHQ_UI_READ_TOKEN`
//! reads and changes nothing (see [`access`]). Every POST of a page (cancel, redrive, submit)
//! carries a CSRF token that only pages of this console hold, and a POST whose `Origin` names
//! another site is refused. The HTTP API under `/api/v1/` ([`api`]) takes bearer tokens only.

mod access;
mod api;
mod pages;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use axum::Router;
use axum::body::Body;
use axum::extract::rejection::FormRejection;
use axum::extract::{Multipart, Path, Query, Request as HttpRequest, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response as HttpResponse};
use axum::routing::{get, post};
use clap::Args;
use common::broker::Broker;
use common::contract::{CancelRequest, JobState, JobStatus, RedriveRequest};
use common::rpc::RpcClient;
use common::topology::{KEY_CANCEL, KEY_REDRIVE};
use common::wire::{Request, Response, ResultsPage};
use futures::Stream;
use serde::Deserialize;
use tokio::net::TcpListener;

use access::{Access, SESSION_COOKIE, Tokens, same};

/// Jobs on one page of the jobs list.
pub(crate) const JOBS_PER_PAGE: u32 = 50;
/// Failed operations on one page of a job.
pub(crate) const FAILURES_PER_PAGE: u32 = 50;
/// Dead letters listed at most (the queue is read whole and handed back in order).
const DEAD_LISTED: u32 = 200;
/// RPC clients kept open between requests.
const IDLE_CLIENTS: usize = 8;
/// How often a job page's event stream sends the job's status.
const EVENT_EVERY: Duration = Duration::from_secs(1);
/// Largest JobSpec the submit form takes (the splitter's own limit is far above what anyone
/// pastes into a browser).
const MAX_SUBMIT_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, Args)]
pub struct UiArgs {
    /// Address to listen on. Anything but loopback needs `BATCHQ_UI_TOKEN`; port 0 picks a
    /// free one (the first line printed names it).
    #[arg(long, env = "BATCHQ_UI_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// A shared secret every request must carry (a bearer token, or the session cookie the
    /// login form sets); at least 32 characters. Required when listening on anything but
    /// loopback.
    #[arg(long, env = "BATCHQ_UI_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A second secret, beside the token, that may read every page and every GET of the API
    /// and change nothing (every POST with it is refused with 403); at least 32 characters.
    #[arg(long, env = "BATCHQ_UI_READ_TOKEN", hide_env_values = true)]
    pub read_token: Option<String>,
}

/// `batchctl ui`: serves until Ctrl-C or SIGTERM.
pub async fn run(broker: Broker, timeout: Duration, args: UiArgs) -> anyhow::Result<()> {
    let (listener, tokens) = bind(&args).await?;
    let console = Console::new(broker, timeout, tokens);
    console.broker.declare_topology().await?;
    announce(&listener)?;
    let stop = common::shutdown::on_signals();
    serve(listener, console, async move { stop.cancelled().await }).await
}

/// The tokens of `args`, refused when weak (see [`Tokens::checked`]).
pub(crate) fn check_tokens(args: &UiArgs) -> anyhow::Result<Tokens> {
    Tokens::checked(args.token.clone(), args.read_token.clone())
}

/// Checks the tokens and binds the listening address, refusing one other than loopback
/// without a token.
pub(crate) async fn bind(args: &UiArgs) -> anyhow::Result<(TcpListener, Tokens)> {
    let tokens = check_tokens(args)?;
    if !args.listen.ip().is_loopback() && !tokens.is_set() {
        bail!(
            "listening on {} (not loopback) needs BATCHQ_UI_TOKEN (or --token): anyone who \
             reaches that address could cancel and submit jobs",
            args.listen
        );
    }
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    Ok((listener, tokens))
}

/// Prints the console's address as the first line on stdout (tests and scripts read it).
pub(crate) fn announce(listener: &TcpListener) -> anyhow::Result<String> {
    use std::io::Write;
    let url = format!("http://{}/", listener.local_addr()?);
    let mut out = std::io::stdout().lock();
    writeln!(out, "batchq console: {url}")?;
    out.flush()?;
    Ok(url)
}

pub(crate) async fn serve(
    listener: TcpListener,
    console: Arc<Console>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    axum::serve(listener, router(console))
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving the console")
}

fn router(console: Arc<Console>) -> Router {
    Router::new()
        .merge(api::router())
        .route("/", get(|| async { Redirect::to("/jobs") }))
        .route("/healthz", get(|| async { "ok" }))
        .route("/static/console.css", get(css))
        .route("/static/console.js", get(js))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/jobs", get(jobs))
        .route("/jobs/{id}", get(job))
        .route("/jobs/{id}/events", get(job_events))
        .route("/jobs/{id}/results.jsonl", get(results))
        .route("/jobs/{id}/cancel", post(cancel))
        .route("/jobs/{id}/redrive", post(redrive))
        .route("/workers", get(workers))
        .route("/queues", get(queues))
        .route("/dead", get(dead))
        .route("/submit", get(submit_page).post(submit))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(console.clone(), guard))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_SUBMIT_BYTES))
        .with_state(console)
}

/// What every request shares: the broker, a few open RPC clients, and the secrets.
pub(crate) struct Console {
    broker: Broker,
    timeout: Duration,
    idle: Mutex<Vec<RpcClient>>,
    tokens: Tokens,
    /// See [`Tokens::csrf`].
    csrf: String,
    /// Held while the dead-letter page reads `{ns}.dead`.
    dead_walk: tokio::sync::Mutex<()>,
}

impl Console {
    pub(crate) fn new(broker: Broker, timeout: Duration, tokens: Tokens) -> Arc<Self> {
        Arc::new(Self {
            broker,
            timeout,
            idle: Mutex::new(Vec::new()),
            csrf: tokens.csrf(),
            tokens,
            dead_walk: tokio::sync::Mutex::new(()),
        })
    }

    fn namespace(&self) -> &str {
        self.broker.names().namespace()
    }

    /// One request to the reducer, on an idle client if one is open.
    async fn call(&self, request: &Request) -> anyhow::Result<Response> {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut client = match idle {
            Some(client) if client.is_open() => client,
            _ => RpcClient::connect(&self.broker, self.timeout).await?,
        };
        match client.call(request).await {
            Ok(response) => {
                let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                if idle.len() < IDLE_CLIENTS {
                    idle.push(client);
                }
                Ok(response)
            }
            Err(e) => {
                client.close().await;
                Err(e.into())
            }
        }
    }

    fn csrf_ok(&self, given: Option<&str>) -> bool {
        given.is_some_and(|g| same(g, &self.csrf))
    }
}

/// Authentication, the read token's limits, the cross-site check, and the security headers
/// on every response.
async fn guard(
    State(console): State<Arc<Console>>,
    request: HttpRequest,
    next: Next,
) -> HttpResponse {
    let path = request.uri().path().to_owned();
    let open = matches!(
        path.as_str(),
        "/healthz" | "/login" | "/static/console.css" | "/static/console.js"
    );
    let is_api = api::is_api(&path);
    let access = console.tokens.access(request.headers(), is_api);
    // Logging out changes nothing but the caller's own cookie: a read session may do it.
    let changes_things = request.method() == Method::POST && path != "/logout";
    let mut response = if !open && access == Access::Denied {
        unauthorized(&request, is_api)
    } else if !open && access == Access::Read && changes_things {
        let message = "refused: the read token (BATCHQ_UI_READ_TOKEN) may read and change nothing";
        if is_api {
            api::error(StatusCode::FORBIDDEN, message)
        } else {
            PageError::new(StatusCode::FORBIDDEN, message).into_response()
        }
    } else if request.method() == Method::POST && cross_site(request.headers()) {
        let message =
            "refused: a request from another site (its Origin does not match this console)";
        if is_api {
            api::error(StatusCode::FORBIDDEN, message)
        } else {
            (StatusCode::FORBIDDEN, format!("{message}\n")).into_response()
        }
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

/// The 401 for a request without the token: JSON for the API, the login page for a browser,
/// a line of text for anything else.
fn unauthorized(request: &HttpRequest, is_api: bool) -> HttpResponse {
    let wants_html = request
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"));
    let mut response = if is_api {
        api::error(
            StatusCode::UNAUTHORIZED,
            "unauthorized: the API needs this console's token (Authorization: Bearer TOKEN)",
        )
    } else if wants_html {
        let next_path = request
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/jobs".into());
        (StatusCode::UNAUTHORIZED, pages::login(&next_path, None)).into_response()
    } else {
        (
            StatusCode::UNAUTHORIZED,
            "unauthorized: this console needs its token (Authorization: Bearer TOKEN)\n",
        )
            .into_response()
    };
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"batchq\""),
    );
    response
}

/// Whether a POST comes from a page of another site: its `Origin` (browsers send it on every
/// POST) names a host other than the one it was sent to.
fn cross_site(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin_host = origin.split_once("://").map(|(_, rest)| rest);
    origin_host != host
}

async fn css() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("console.css"),
    )
}

async fn js() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("console.js"),
    )
}

/// Anything not routed: a JSON error under `/api/`, else a page saying so.
async fn not_found(method: Method, uri: axum::http::Uri) -> HttpResponse {
    if api::is_api(uri.path()) {
        api::not_found(&method, uri.path())
    } else {
        PageError::new(StatusCode::NOT_FOUND, format!("no page at {}", uri.path())).into_response()
    }
}

/// A route asked with a method it does not take.
async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> HttpResponse {
    let message = format!("{} does not take {method}", uri.path());
    if api::is_api(uri.path()) {
        api::error(StatusCode::METHOD_NOT_ALLOWED, message)
    } else {
        PageError::new(StatusCode::METHOD_NOT_ALLOWED, message).into_response()
    }
}

/// A page that could not be made, as a page saying why.
pub(crate) struct PageError {
    status: StatusCode,
    message: String,
}

impl PageError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl From<anyhow::Error> for PageError {
    fn from(e: anyhow::Error) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, format!("{e:#}"))
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> HttpResponse {
        (self.status, pages::error(self.status, &self.message)).into_response()
    }
}

/// A reply other than the one asked for, as the page to show: an unknown or deleted job is a
/// 404, anything else the reducer's failure.
fn unexpected(response: Response) -> PageError {
    let status = match &response {
        Response::NotFound { .. } | Response::Gone(_) => StatusCode::NOT_FOUND,
        _ => StatusCode::BAD_GATEWAY,
    };
    PageError::new(status, crate::unexpected(response).to_string())
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct JobsQuery {
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub q: Option<String>,
    #[serde(default)]
    pub page: Option<u64>,
}

async fn jobs(
    State(console): State<Arc<Console>>,
    Query(query): Query<JobsQuery>,
) -> Result<HttpResponse, PageError> {
    let state = match query.state.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(JobState::parse(s).ok_or_else(|| {
            PageError::new(StatusCode::BAD_REQUEST, format!("unknown state {s:?}"))
        })?),
    };
    let prefix = query
        .q
        .as_deref()
        .map(str::trim)
        .filter(|q| !q.is_empty())
        .map(str::to_owned);
    let page = query.page.unwrap_or(1).max(1);
    let request = Request::JobsPage {
        state,
        prefix,
        offset: (page - 1) * u64::from(JOBS_PER_PAGE),
        limit: JOBS_PER_PAGE,
    };
    let listed = match console.call(&request).await? {
        Response::JobsPage(listed) => listed,
        other => return Err(unexpected(other)),
    };
    Ok(pages::jobs(&console.chrome("jobs"), &query, page, &listed).into_response())
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct JobQuery {
    #[serde(default)]
    pub fq: Option<String>,
    #[serde(default)]
    pub fpage: Option<u64>,
}

async fn job(
    State(console): State<Arc<Console>>,
    Path(id): Path<String>,
    Query(query): Query<JobQuery>,
) -> Result<HttpResponse, PageError> {
    let chrome = console.chrome("jobs");
    let detail = match console.call(&Request::Job { job_id: id.clone() }).await? {
        Response::Job(detail) => detail,
        // Just submitted: the splitter has not handed it to the reducer yet.
        Response::NotFound { .. } => {
            return Ok((StatusCode::NOT_FOUND, pages::job_pending(&chrome, &id)).into_response());
        }
        other => return Err(unexpected(other)),
    };
    let search = query
        .fq
        .as_deref()
        .filter(|q| !q.trim().is_empty())
        .map(str::to_owned);
    let fpage = query.fpage.unwrap_or(1).max(1);
    let failures = match console
        .call(&Request::Failures {
            job_id: id.clone(),
            search: search.clone(),
            offset: (fpage - 1) * u64::from(FAILURES_PER_PAGE),
            limit: FAILURES_PER_PAGE,
        })
        .await?
    {
        Response::Failures(page) => page,
        other => return Err(unexpected(other)),
    };
    Ok(pages::job(&chrome, &detail, search.as_deref(), fpage, &failures).into_response())
}

/// The job's status once a second, as Server-Sent Events, until it ends.
async fn job_events(
    State(console): State<Arc<Console>>,
    Path(id): Path<String>,
) -> Sse<impl Stream<Item = Result<Event, std::convert::Infallible>>> {
    Sse::new(status_events(console, id)).keep_alive(KeepAlive::default())
}

/// Events of job `id`, one a second: `status` (a JobStatus) until one is terminal, then
/// the stream ends; `gone` (why) and the end when the job is unknown or deleted; `problem`
/// (why) when the reducer does not answer, and the stream goes on.
pub(crate) fn status_events(
    console: Arc<Console>,
    id: String,
) -> impl Stream<Item = Result<Event, std::convert::Infallible>> {
    // Ticks a second apart, however long each answer takes (the first one at once).
    let mut every = tokio::time::interval(EVENT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    futures::stream::unfold(Some((console, id, every)), |next| async move {
        let (console, id, mut every) = next?;
        every.tick().await;
        let status = console.call(&Request::Status { job_id: id.clone() }).await;
        let (event, more) = match status {
            Ok(Response::Status(status)) => {
                let terminal = status.state.is_terminal();
                let event = Event::default()
                    .event("status")
                    .data(serde_json::to_string(&status).unwrap_or_default());
                (event, !terminal)
            }
            // Deleted, or never known: nothing more will come (the page says so and stops).
            Ok(other @ (Response::NotFound { .. } | Response::Gone(_))) => (
                Event::default()
                    .event("gone")
                    .data(crate::unexpected(other).to_string()),
                false,
            ),
            Ok(other) => (
                Event::default()
                    .event("problem")
                    .data(crate::unexpected(other).to_string()),
                true,
            ),
            Err(e) => (
                Event::default().event("problem").data(format!("{e:#}")),
                true,
            ),
        };
        Some((Ok(event), more.then_some((console, id, every))))
    })
}

/// The job's results as JSON Lines, as `batchctl results` prints them, streamed a page at a
/// time.
async fn results(
    State(console): State<Arc<Console>>,
    Path(id): Path<String>,
) -> Result<HttpResponse, PageError> {
    let filename = format!("{}.jsonl", id.replace(['"', '\\', '/'], "_"));
    let body = results_body(console, id).await?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-ndjson".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{filename}\""),
            ),
        ],
        body,
    )
        .into_response())
}

/// The lines of [`results`]: the first page is asked before the answer starts, so an unknown
/// job is an error (404) and not an empty body.
pub(crate) async fn results_body(console: Arc<Console>, id: String) -> Result<Body, PageError> {
    let first = results_page(&console, &id, 0).await?;
    let pages = futures::stream::unfold(
        (console, id, Some(Ok(first))),
        |(console, id, page): (Arc<Console>, String, Option<Result<ResultsPage, PageError>>)| async move {
            let page = match page? {
                Ok(page) => page,
                Err(e) => {
                    // The answer has begun: a failure can only cut it short, and say so.
                    let error = std::io::Error::other(e.message);
                    return Some((Err(error), (console, id, None)));
                }
            };
            let mut body = Vec::new();
            for line in &page.lines {
                if serde_json::to_writer(&mut body, line).is_ok() {
                    body.push(b'\n');
                }
            }
            let next = match page.next {
                Some(from) => Some(results_page(&console, &id, from).await),
                None => None,
            };
            Some((Ok::<_, std::io::Error>(body), (console, id, next)))
        },
    );
    Ok(Body::from_stream(pages))
}

async fn results_page(console: &Console, id: &str, from: u64) -> Result<ResultsPage, PageError> {
    let request = Request::Results {
        job_id: id.to_owned(),
        from,
        limit: 5000,
    };
    match console.call(&request).await? {
        Response::Results(page) => Ok(page),
        other => Err(unexpected(other)),
    }
}

#[derive(Debug, Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: Option<String>,
}

/// The CSRF token of a form; a body that is no form has none.
fn csrf_of(form: Result<axum::Form<CsrfForm>, FormRejection>) -> Option<String> {
    form.ok().and_then(|axum::Form(form)| form.csrf)
}

async fn cancel(
    State(console): State<Arc<Console>>,
    Path(id): Path<String>,
    form: Result<axum::Form<CsrfForm>, FormRejection>,
) -> Result<HttpResponse, PageError> {
    act_from_page(&console, &id, JobAction::Cancel, form).await
}

async fn redrive(
    State(console): State<Arc<Console>>,
    Path(id): Path<String>,
    form: Result<axum::Form<CsrfForm>, FormRejection>,
) -> Result<HttpResponse, PageError> {
    act_from_page(&console, &id, JobAction::Redrive, form).await
}

/// A Cancel or Redrive button's form: checked for its CSRF token, then back to the job's page.
async fn act_from_page(
    console: &Console,
    id: &str,
    action: JobAction,
    form: Result<axum::Form<CsrfForm>, FormRejection>,
) -> Result<HttpResponse, PageError> {
    if !console.csrf_ok(csrf_of(form).as_deref()) {
        return Err(PageError::new(
            StatusCode::FORBIDDEN,
            "refused: the form's CSRF token is missing or wrong (reload the job's page and try again)",
        ));
    }
    console.request(id, action).await?;
    Ok(Redirect::to(&job_path(id)).into_response())
}

/// What a user may ask of a job after submitting it, on `{ns}.jobs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JobAction {
    Cancel,
    Redrive,
}

impl Console {
    /// Publishes (confirmed) the CancelRequest or RedriveRequest for job `id`, refusing with
    /// 409 a job whose state the request would not change (as `batchctl cancel` and
    /// `batchctl redrive` do), and with 404 an unknown one.
    async fn request(&self, id: &str, action: JobAction) -> Result<(), PageError> {
        let status = job_status(self, id).await?;
        let refusal = match action {
            JobAction::Cancel if status.state.is_terminal() => {
                Some(format!("job {id} has already ended ({})", status.state))
            }
            JobAction::Redrive
                if !matches!(status.state, JobState::Failed | JobState::Cancelled) =>
            {
                Some(format!(
                    "job {id} is {}: only a failed or cancelled job can be redriven",
                    status.state
                ))
            }
            _ => None,
        };
        if let Some(refusal) = refusal {
            return Err(PageError::new(StatusCode::CONFLICT, refusal));
        }
        let publisher = crate::declared_publisher(&self.broker).await?;
        let jobs = self.broker.names().jobs();
        let job_id = id.to_owned();
        let sent = match action {
            JobAction::Cancel => {
                publisher
                    .send_json(&jobs, KEY_CANCEL, &CancelRequest { job_id })
                    .await
            }
            JobAction::Redrive => {
                publisher
                    .send_json(&jobs, KEY_REDRIVE, &RedriveRequest { job_id })
                    .await
            }
        };
        sent.map_err(anyhow::Error::from)?;
        tracing::info!(job_id = %id, ?action, "requested from the console");
        Ok(())
    }
}

async fn job_status(console: &Console, id: &str) -> Result<JobStatus, PageError> {
    match console
        .call(&Request::Status {
            job_id: id.to_owned(),
        })
        .await?
    {
        Response::Status(status) => Ok(status),
        other => Err(unexpected(other)),
    }
}

pub(crate) fn job_path(id: &str) -> String {
    format!("/jobs/{}", pages::encode_path(id))
}

async fn workers(State(console): State<Arc<Console>>) -> Result<HttpResponse, PageError> {
    let (workers, health) = tokio::join!(
        console.call(&Request::Workers),
        console.call(&Request::Health)
    );
    let workers = crate::worker_records(workers?)?;
    let health = match health? {
        Response::Health(report) => report,
        other => return Err(unexpected(other)),
    };
    Ok(pages::workers(&console.chrome("workers"), &workers, &health).into_response())
}

async fn queues(State(console): State<Arc<Console>>) -> Result<HttpResponse, PageError> {
    let rows = console.queue_rows().await?;
    let dead = console.broker.names().dead();
    Ok(pages::queues(&console.chrome("queues"), &rows, &dead).into_response())
}

impl Console {
    /// The records `batchctl queues --json` prints, asked on this console's clients.
    async fn queue_rows(&self) -> anyhow::Result<Vec<crate::table::QueueRow>> {
        let [workers, recent] = &crate::QUEUE_QUESTIONS;
        let answer = |response: anyhow::Result<Response>| {
            response.unwrap_or_else(|e| Response::Error {
                message: e.to_string(),
            })
        };
        let (workers, recent) = tokio::join!(self.call(workers), self.call(recent));
        crate::queue_rows(&self.broker, answer(workers), answer(recent)).await
    }
}

async fn dead(State(console): State<Arc<Console>>) -> Result<HttpResponse, PageError> {
    // Reading the queue takes every message and hands it back: two readers at once would
    // each see part of it, and could change its order.
    let _one_reader = console.dead_walk.lock().await;
    let (rows, present) = crate::dead::read_rows(&console.broker, DEAD_LISTED).await?;
    let queue = console.broker.names().dead();
    Ok(pages::dead(&console.chrome("dead"), &queue, &rows, present).into_response())
}

async fn submit_page(State(console): State<Arc<Console>>) -> HttpResponse {
    pages::submit(&console.chrome("submit"), "", None).into_response()
}

async fn submit(
    State(console): State<Arc<Console>>,
    mut form: Multipart,
) -> Result<HttpResponse, PageError> {
    let mut pasted = String::new();
    let mut uploaded = Vec::new();
    let mut csrf = None;
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| PageError::new(StatusCode::BAD_REQUEST, format!("unreadable form: {e}")))?
    {
        let name = field.name().unwrap_or_default().to_owned();
        let bytes = field.bytes().await.map_err(|e| {
            PageError::new(StatusCode::BAD_REQUEST, format!("unreadable form: {e}"))
        })?;
        match name.as_str() {
            "spec" => pasted = String::from_utf8_lossy(&bytes).into_owned(),
            "file" => uploaded = bytes.to_vec(),
            "csrf" => csrf = Some(String::from_utf8_lossy(&bytes).into_owned()),
            _ => {}
        }
    }
    if !console.csrf_ok(csrf.as_deref()) {
        return Err(PageError::new(
            StatusCode::FORBIDDEN,
            "refused: the form's CSRF token is missing or wrong (reload the page and try again)",
        ));
    }
    // An uploaded file wins over the text box; what was sent is shown again on an error.
    let body = if uploaded.is_empty() {
        pasted.into_bytes()
    } else {
        uploaded
    };
    let shown = String::from_utf8_lossy(&body).into_owned();
    let chrome = console.chrome("submit");
    if body.iter().all(u8::is_ascii_whitespace) {
        let page = pages::submit(&chrome, &shown, Some("paste a JobSpec or choose a file"));
        return Ok((StatusCode::BAD_REQUEST, page).into_response());
    }
    let (job_id, body) = match crate::checked_spec(&body) {
        Ok(checked) => checked,
        Err(error) => {
            return Ok((
                StatusCode::BAD_REQUEST,
                pages::submit(&chrome, &shown, Some(&error.to_string())),
            )
                .into_response());
        }
    };
    crate::submit_body(&console.broker, &job_id, &body).await?;
    tracing::info!(%job_id, "job submitted from the console");
    Ok(Redirect::to(&job_path(&job_id)).into_response())
}

#[derive(Debug, Default, Deserialize)]
struct LoginQuery {
    #[serde(default)]
    next: Option<String>,
}

async fn login_page(Query(query): Query<LoginQuery>) -> HttpResponse {
    pages::login(&safe_next(query.next.as_deref()), None).into_response()
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    token: String,
    #[serde(default)]
    next: Option<String>,
}

async fn login(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    axum::Form(form): axum::Form<LoginForm>,
) -> HttpResponse {
    let next = safe_next(form.next.as_deref());
    if !console.tokens.is_set() {
        return Redirect::to(&next).into_response();
    }
    let Some(session) = console
        .tokens
        .session(console.tokens.access_of(form.token.trim()))
    else {
        return (
            StatusCode::UNAUTHORIZED,
            pages::login(&next, Some("that is not this console's token")),
        )
            .into_response();
    };
    let mut cookie = format!("{SESSION_COOKIE}={session}; HttpOnly; SameSite=Strict; Path=/");
    // Behind a proxy that terminates TLS, the cookie never travels over plain HTTP.
    let behind_tls = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|proto| proto.eq_ignore_ascii_case("https"));
    if behind_tls {
        cookie.push_str("; Secure");
    }
    ([(header::SET_COOKIE, cookie)], Redirect::to(&next)).into_response()
}

async fn logout(
    State(console): State<Arc<Console>>,
    form: Result<axum::Form<CsrfForm>, FormRejection>,
) -> HttpResponse {
    if !console.csrf_ok(csrf_of(form).as_deref()) {
        return PageError::new(
            StatusCode::FORBIDDEN,
            "refused: missing or wrong CSRF token",
        )
        .into_response();
    }
    let cookie = format!("{SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
    ([(header::SET_COOKIE, cookie)], Redirect::to("/login")).into_response()
}

/// Where to go after logging in: a path of this console only, never another site.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(path) if path.starts_with('/') && !path.starts_with("//") && !path.contains('\\') => {
            path.to_owned()
        }
        _ => "/jobs".to_owned(),
    }
}

/// What every page's frame shows: which page is current, the namespace, and the CSRF token
/// its forms carry.
pub(crate) struct Chrome {
    pub current: &'static str,
    pub namespace: String,
    pub csrf: String,
    pub logged_in: bool,
}

impl Console {
    fn chrome(&self, current: &'static str) -> Chrome {
        Chrome {
            current,
            namespace: self.namespace().to_owned(),
            csrf: self.csrf.clone(),
            logged_in: self.tokens.is_set(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_only_returns_to_this_console() {
        assert_eq!(safe_next(Some("/jobs/a?fq=x")), "/jobs/a?fq=x");
        assert_eq!(safe_next(Some("//evil.example/")), "/jobs");
        assert_eq!(safe_next(Some("https://evil.example/")), "/jobs");
        assert_eq!(safe_next(Some("/\\evil.example")), "/jobs");
        assert_eq!(safe_next(None), "/jobs");
    }

    #[test]
    fn a_post_from_another_origin_is_cross_site() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        assert!(
            !cross_site(&headers),
            "no Origin: not a browser's cross-site form"
        );
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8080"),
        );
        assert!(!cross_site(&headers));
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert!(cross_site(&headers));
    }
}
