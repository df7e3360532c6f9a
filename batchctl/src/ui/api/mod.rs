//! The console's HTTP API, `/api/v1/`: what `batchctl` does, for programs in any language.
//! JSON in and out; errors are `{"error": "..."}` with a 4xx/5xx status. `openapi.json`
//! (served at `/api/v1/openapi.json`) describes every route of [`routes`], and a test holds
//! the two together.
//!
//! Authentication is the console's ([`super::access`]): a bearer token only, never the
//! session cookie, so no CSRF token is needed.

mod cursor;

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{Method, StatusCode, header};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::routing::{MethodRouter, get, post};
use common::contract::{JobState, JobStatus};
use common::wire::{FailedItem, Request, Response};
use serde::Deserialize;
use serde_json::json;

use super::{Console, JobAction, PageError, job_status, unexpected};
use cursor::{Cursor, CursorProblem};

/// The OpenAPI 3 description of [`routes`].
const OPENAPI: &str = include_str!("openapi.json");
/// Entries of a list page when the request names no `limit`, and the most it may name (the
/// most the reducer answers at once).
const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = batchq_reducer::rpc::MAX_CONSOLE_PAGE;

pub(super) fn is_api(path: &str) -> bool {
    path == "/api" || path.starts_with("/api/")
}

/// Every route of the API: method, path (as OpenAPI writes it) and handler.
pub(super) fn routes() -> Vec<(Method, &'static str, MethodRouter<Arc<Console>>)> {
    vec![
        (Method::GET, "/api/v1/jobs", get(list_jobs)),
        (Method::POST, "/api/v1/jobs", post(submit)),
        (Method::GET, "/api/v1/jobs/{job_id}", get(job)),
        (Method::GET, "/api/v1/jobs/{job_id}/events", get(events)),
        (Method::GET, "/api/v1/jobs/{job_id}/results", get(results)),
        (Method::GET, "/api/v1/jobs/{job_id}/failures", get(failures)),
        (Method::POST, "/api/v1/jobs/{job_id}/cancel", post(cancel)),
        (Method::POST, "/api/v1/jobs/{job_id}/redrive", post(redrive)),
        (Method::GET, "/api/v1/workers", get(workers)),
        (Method::GET, "/api/v1/queues", get(queues)),
        (Method::GET, "/api/v1/openapi.json", get(openapi)),
    ]
}

pub(super) fn router() -> axum::Router<Arc<Console>> {
    routes()
        .into_iter()
        .fold(axum::Router::new(), |router, (_, path, handler)| {
            router.route(path, handler)
        })
}

/// `{"error": message}` with `status`.
pub(super) fn error(status: StatusCode, message: impl Into<String>) -> HttpResponse {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// A request the API could not answer: its status and why.
pub(super) struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

impl From<PageError> for ApiError {
    fn from(e: PageError) -> Self {
        Self {
            status: e.status,
            message: e.message,
        }
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        PageError::from(e).into()
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        Self::bad_request(e.body_text())
    }
}

impl From<CursorProblem> for ApiError {
    fn from(e: CursorProblem) -> Self {
        Self::bad_request(e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> HttpResponse {
        error(self.status, self.message)
    }
}

type ApiResult = Result<HttpResponse, ApiError>;

/// The answer to a request for anything under `/api/` that is not a route.
pub(super) fn not_found(method: &Method, path: &str) -> HttpResponse {
    error(
        StatusCode::NOT_FOUND,
        format!("no such API route: {method} {path} (see /api/v1/openapi.json)"),
    )
}

fn limit_of(limit: Option<u32>) -> Result<u32, ApiError> {
    match limit.unwrap_or(DEFAULT_LIMIT) {
        n @ 1..=MAX_LIMIT => Ok(n),
        n => Err(ApiError::bad_request(format!(
            "limit must be 1 to {MAX_LIMIT}, not {n}"
        ))),
    }
}

#[derive(Debug, Deserialize)]
struct JobsQuery {
    state: Option<String>,
    prefix: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

/// A job's place in the list, newest submitted first, then by id (the reducer's order), as a
/// key that ascends along the list.
type JobKey = (i64, String);

fn job_key(status: &JobStatus) -> JobKey {
    let submitted = status
        .submitted_at
        .as_deref()
        .and_then(crate::progress::parse_ms);
    // A job without a submission time sorts last, as the reducer lists it.
    (submitted.map_or(i64::MAX, |ms| -ms), status.job_id.clone())
}

async fn list_jobs(
    State(console): State<Arc<Console>>,
    query: Result<Query<JobsQuery>, QueryRejection>,
) -> ApiResult {
    let Query(query) = query?;
    let state = match query.state.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(JobState::parse(s).ok_or_else(|| {
            let known: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
            ApiError::bad_request(format!("unknown state {s:?}: one of {}", known.join(", ")))
        })?),
    };
    let prefix = query.prefix.filter(|p| !p.is_empty());
    let limit = limit_of(query.limit)?;
    let fingerprint = serde_json::to_string(&(state, &prefix)).unwrap_or_default();
    let cursor = match query.cursor.as_deref().filter(|c| !c.is_empty()) {
        Some(text) => Some(Cursor::<JobKey>::decode(text, &fingerprint)?),
        None => None,
    };
    let fetch = |offset: u64, limit: u32| {
        let (console, prefix) = (console.clone(), prefix.clone());
        async move {
            let request = Request::JobsPage {
                state,
                prefix,
                offset,
                limit,
            };
            match console.call(&request).await? {
                Response::JobsPage(page) => Ok(page.jobs),
                other => Err(ApiError::from(unexpected(other))),
            }
        }
    };
    let (jobs, next) = cursor::page(limit, cursor, &fingerprint, fetch, job_key).await?;
    let next = next.map(|c| c.encode());
    Ok(Json(json!({ "jobs": jobs, "next": next })).into_response())
}

async fn job(State(console): State<Arc<Console>>, Path(id): Path<String>) -> ApiResult {
    Ok(Json(job_status(&console, &id).await?).into_response())
}

/// The job's status once a second until it ends; an unknown job is a 404 before the stream
/// starts.
async fn events(State(console): State<Arc<Console>>, Path(id): Path<String>) -> ApiResult {
    job_status(&console, &id).await?;
    let stream = super::status_events(console, id);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

async fn results(State(console): State<Arc<Console>>, Path(id): Path<String>) -> ApiResult {
    let body = super::results_body(console, id).await?;
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}

#[derive(Debug, Deserialize)]
struct FailuresQuery {
    q: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

async fn failures(
    State(console): State<Arc<Console>>,
    Path(id): Path<String>,
    query: Result<Query<FailuresQuery>, QueryRejection>,
) -> ApiResult {
    let Query(query) = query?;
    let search = query.q.filter(|q| !q.trim().is_empty());
    let limit = limit_of(query.limit)?;
    let fingerprint = serde_json::to_string(&(&id, &search)).unwrap_or_default();
    let cursor = match query.cursor.as_deref().filter(|c| !c.is_empty()) {
        Some(text) => Some(Cursor::<u64>::decode(text, &fingerprint)?),
        None => None,
    };
    let fetch = |offset: u64, limit: u32| {
        let (console, job_id, search) = (console.clone(), id.clone(), search.clone());
        async move {
            let request = Request::Failures {
                job_id,
                search,
                offset,
                limit,
            };
            match console.call(&request).await? {
                Response::Failures(page) => Ok(page.failures),
                other => Err(ApiError::from(unexpected(other))),
            }
        }
    };
    let (failures, next) =
        cursor::page(limit, cursor, &fingerprint, fetch, |f: &FailedItem| f.index).await?;
    // The reducer answers an unknown job with no failures: tell it apart.
    if failures.is_empty() {
        job_status(&console, &id).await?;
    }
    let next = next.map(|c| c.encode());
    Ok(Json(json!({ "failures": failures, "next": next })).into_response())
}

/// `POST /api/v1/jobs`: the body is a JobSpec, checked as `batchctl submit` checks it (the
/// splitter's own validation) and published with a confirm.
async fn submit(State(console): State<Arc<Console>>, body: Bytes) -> ApiResult {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "the body is empty: send a JobSpec (a JSON object)",
        ));
    }
    let (job_id, body) =
        crate::checked_spec(&body).map_err(|problem| ApiError::bad_request(problem.to_string()))?;
    crate::submit_body(&console.broker, &job_id, &body).await?;
    tracing::info!(%job_id, "job submitted over the API");
    Ok((StatusCode::ACCEPTED, Json(json!({ "job_id": job_id }))).into_response())
}

async fn cancel(State(console): State<Arc<Console>>, Path(id): Path<String>) -> ApiResult {
    console.request(&id, JobAction::Cancel).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "job_id": id }))).into_response())
}

async fn redrive(State(console): State<Arc<Console>>, Path(id): Path<String>) -> ApiResult {
    console.request(&id, JobAction::Redrive).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "job_id": id }))).into_response())
}

async fn workers(State(console): State<Arc<Console>>) -> ApiResult {
    let workers = crate::worker_records(console.call(&Request::Workers).await?)?;
    Ok(Json(workers).into_response())
}

async fn queues(State(console): State<Arc<Console>>) -> ApiResult {
    Ok(Json(console.queue_rows().await?).into_response())
}

async fn openapi() -> HttpResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn the_openapi_document_describes_every_route_and_no_other() {
        let document: serde_json::Value =
            serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
        assert!(
            document["openapi"]
                .as_str()
                .is_some_and(|v| v.starts_with("3.")),
            "not an OpenAPI 3 document"
        );
        let methods = ["get", "post", "put", "patch", "delete", "head", "options"];
        let described: BTreeSet<(String, String)> = document["paths"]
            .as_object()
            .expect("paths")
            .iter()
            .flat_map(|(path, item)| {
                methods
                    .iter()
                    .filter(|m| item.get(**m).is_some())
                    .map(|m| (m.to_uppercase(), path.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let served: BTreeSet<(String, String)> = routes()
            .into_iter()
            .map(|(method, path, _)| (method.to_string(), path.to_owned()))
            .collect();
        assert_eq!(described, served);
    }

    #[test]
    fn limits_outside_the_bounds_are_refused() {
        assert_eq!(limit_of(None).ok(), Some(DEFAULT_LIMIT));
        assert_eq!(limit_of(Some(MAX_LIMIT)).ok(), Some(MAX_LIMIT));
        assert!(limit_of(Some(0)).is_err());
        assert!(limit_of(Some(MAX_LIMIT + 1)).is_err());
    }

    #[test]
    fn jobs_sort_newest_first_then_by_id() {
        let at = |id: &str, submitted: Option<&str>| -> JobStatus {
            serde_json::from_value(json!({
                "job_id": id, "state": "running", "operation": null, "ops_total": 0,
                "ops_succeeded": 0, "ops_failed": 0, "fragments_done": 0,
                "fragments_in_flight": 0, "submitted_at": submitted, "started_at": null,
                "finished_at": null, "error": null, "redrives": 0,
            }))
            .expect("a JobStatus")
        };
        let newer = job_key(&at("b", Some("2026-11-26T17:00:01.000Z")));
        let older_a = job_key(&at("a", Some("2026-11-26T17:00:00.000Z")));
        let older_c = job_key(&at("c", Some("2026-11-26T17:00:00.000Z")));
        let unknown = job_key(&at("d", None));
        assert!(newer < older_a && older_a < older_c && older_c < unknown);
    }
}
