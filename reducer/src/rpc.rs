//! Answers to `batchctl` over the broker: requests through the `{ns}.rpc` exchange, replies through RabbitMQ's
//! direct reply-to, so `batchctl` works from any host that reaches the broker.

use common::broker::{BrokerError, Session, transient_json_properties};
use common::consume::{ack_batch, consume, next_batch};
use common::health::{HealthReport, ServiceHealth};
use common::lapin::options::BasicPublishOptions;
use common::store::StoreHealth;
use common::timefmt::{format_ms, now_ms};
use common::topology::Names;
use common::wire::{Request, Response, ResultsPage, WorkerInfo};
use tokio_util::sync::CancellationToken;

use crate::backend::{Place, Queries};
use crate::retention::Pruning;
use crate::store::{Burial, JobsFilter, ReducerQueries, StoreError};
use crate::{ReducerError, ServiceTable, WorkerTable};

/// Most results in one reply.
pub const MAX_RESULTS_PAGE: u32 = 5000;

/// Most jobs, or failed operations, in one page of the console's.
pub const MAX_CONSOLE_PAGE: u32 = 500;

pub async fn serve(
    session: &Session,
    names: &Names,
    place: Place,
    tables: Tables,
    stop: &CancellationToken,
) -> Result<(), ReducerError> {
    let channel = session.consumer_channel(16).await?;
    // Replies go without confirms: a lost reply is retried by batchctl.
    let replies = session.plain_channel().await?;
    // Requests come through `{ns}.rpc` into a private queue of this session, on whichever
    // node it reached (see `declare_private_queue`). A request published while no reducer
    // session is bound is dropped, and batchctl's timeout reports it.
    let queue = common::broker::answered(
        "the declaration of the reducer's RPC queue",
        common::topology::declare_private_queue(
            &channel,
            &names.rpc(),
            common::topology::KEY_RPC,
            common::topology::RPC_TTL_MS,
        ),
    )
    .await?;
    let mut consumer = consume(&channel, queue.as_str(), "reducer-rpc").await?;
    let mut queries = Some(place.queries()?);
    while let Some(batch) = next_batch(&mut consumer, 16, stop).await? {
        for delivery in &batch {
            let Some(reply_to) = delivery.properties.reply_to().clone() else {
                tracing::warn!("ignoring an RPC request without reply_to");
                continue;
            };
            let response = match serde_json::from_slice::<Request>(&delivery.data) {
                Ok(request) => {
                    // Store reads block: they run on the blocking pool, as the writes do,
                    // taking the connection along and handing it back.
                    let mut taken = queries
                        .take()
                        .ok_or_else(|| StoreError::Corrupt("query connection lost".into()))?;
                    let tables = tables.clone();
                    let (back, response) = tokio::task::spawn_blocking(move || {
                        let response = answer(&mut taken, &tables, request);
                        (taken, response)
                    })
                    .await
                    .map_err(|e| StoreError::Corrupt(format!("query task failed: {e}")))?;
                    queries = Some(back);
                    response
                }
                Err(e) => Response::Error {
                    message: format!("malformed request: {e}"),
                },
            };
            let body = serde_json::to_vec(&response).map_err(BrokerError::from)?;
            let mut properties = transient_json_properties();
            if let Some(id) = delivery.properties.correlation_id().clone() {
                properties = properties.with_correlation_id(id);
            }
            common::broker::sent(
                "a reply",
                replies.basic_publish(
                    "".into(),
                    reply_to,
                    BasicPublishOptions::default(),
                    &body,
                    properties,
                ),
            )
            .await?;
        }
        ack_batch(&batch).await?;
    }
    Ok(())
}

/// What the reducer knows besides its store's rows: live workers and splitters, its own
/// store's health, and the pruner that deletes jobs.
#[derive(Clone)]
pub struct Tables {
    pub workers: WorkerTable,
    pub services: ServiceTable,
    pub health: StoreHealth,
    pub started_at_ms: i64,
    pub pruning: Pruning,
}

fn answer(queries: &mut Queries, tables: &Tables, request: Request) -> Response {
    let result = match request {
        Request::Status { job_id } => match queries.status(&job_id) {
            Ok(Some(status)) => Ok(Response::Status(status)),
            Ok(None) => missing(queries, job_id),
            Err(e) => Err(e),
        },
        Request::Results {
            job_id,
            from,
            limit,
        } => {
            let limit = limit.clamp(1, MAX_RESULTS_PAGE);
            match queries.status(&job_id) {
                Ok(None) => missing(queries, job_id),
                Err(e) => Err(e),
                Ok(Some(_)) => queries.results(&job_id, from, limit).map(|lines| {
                    let next = (lines.len() as u32 == limit)
                        .then(|| lines.last().map(|l| l.index() + 1))
                        .flatten();
                    Response::Results(ResultsPage { lines, next })
                }),
            }
        }
        Request::Jobs { limit } => queries
            .recent_jobs(limit.clamp(1, 10_000))
            .map(|jobs| Response::Jobs { jobs }),
        Request::Workers => Ok(Response::Workers {
            workers: live_workers(&tables.workers),
        }),
        Request::Health => Ok(Response::Health(health(tables))),
        Request::Delete { job_id } => {
            tables
                .pruning
                .delete_now(&job_id)
                .map(|burial| match burial {
                    Burial::Buried => Response::Deleted { job_id },
                    Burial::StillRunning => Response::StillRunning { job_id },
                    Burial::Gone(tombstone) => Response::Gone(tombstone),
                    Burial::Unknown => Response::NotFound { job_id },
                })
        }
        Request::JobsPage {
            state,
            prefix,
            offset,
            limit,
        } => queries
            .jobs_page(
                &JobsFilter { state, prefix },
                offset,
                limit.clamp(1, MAX_CONSOLE_PAGE),
            )
            .map(Response::JobsPage),
        Request::Failures {
            job_id,
            search,
            offset,
            limit,
        } => match queries.status(&job_id) {
            Ok(None) => missing(queries, job_id),
            Err(e) => Err(e),
            Ok(Some(_)) => queries
                .failures(
                    &job_id,
                    search.as_deref(),
                    offset,
                    limit.clamp(1, MAX_CONSOLE_PAGE),
                )
                .map(Response::Failures),
        },
        Request::Job { job_id } => match queries.job_detail(&job_id) {
            Ok(Some(detail)) => Ok(Response::Job(detail)),
            Ok(None) => missing(queries, job_id),
            Err(e) => Err(e),
        },
    };
    result.unwrap_or_else(|e| Response::Error {
        message: e.to_string(),
    })
}

/// The answer for a job without a status: what is left of it if it was deleted, or else
/// that it is unknown.
fn missing(queries: &mut Queries, job_id: String) -> Result<Response, StoreError> {
    Ok(match queries.tombstone(&job_id)? {
        Some(tombstone) => Response::Gone(tombstone),
        None => Response::NotFound { job_id },
    })
}

/// Workers heard from within three of their heartbeat intervals, dropping the rest.
fn live_workers(workers: &WorkerTable) -> Vec<WorkerInfo> {
    let now = now_ms();
    let mut table = workers.lock().unwrap_or_else(|p| p.into_inner());
    table.retain(|_, (beat, seen)| now - *seen <= 3 * beat.interval_ms as i64);
    let mut live: Vec<WorkerInfo> = table
        .values()
        .map(|(beat, _)| WorkerInfo {
            worker: beat.worker.clone(),
            host: beat.host.clone(),
            pid: beat.pid,
            operations: beat.operations.clone(),
            prefetch: beat.prefetch,
            fragments_in_flight: beat.fragments_in_flight,
            held_by_operation: beat.held_by_operation.clone(),
            started_at: format_ms(beat.started_at_ms),
            last_heartbeat: format_ms(beat.at_ms),
        })
        .collect();
    live.sort_by(|a, b| a.worker.cmp(&b.worker));
    live
}

/// The reducer's own state (it answers, so it is alive and active), every other replica heard
/// from within three beats (splitters, and standby reducers with `BATCHQ_DATABASE_URL`), and
/// how many workers are live. A role with no active replica heard from is listed as missing.
fn health(tables: &Tables) -> HealthReport {
    let now = now_ms();
    let mut services = vec![ServiceHealth::from_beat(&common::health::beat(
        "reducer",
        tables.started_at_ms,
        &tables.health,
        true,
    ))];
    // This process's own beats from a time it was a standby are not listed twice (by role
    // too: a splitter in the same process, as in `batchctl demo`, has the same instance).
    let me = services[0].instance.clone();
    let mut others: Vec<ServiceHealth> = {
        let mut table = tables.services.lock().unwrap_or_else(|p| p.into_inner());
        table.retain(|_, (beat, seen)| now - *seen <= 3 * beat.interval_ms as i64);
        table
            .values()
            .filter(|(beat, _)| {
                beat.role != "reducer" || me.as_deref() != Some(beat.instance.as_str())
            })
            .map(|(beat, _)| ServiceHealth::from_beat(beat))
            .collect()
    };
    // Active replicas first, then by role and instance.
    others
        .sort_by(|a, b| (&a.role, !a.active, &a.instance).cmp(&(&b.role, !b.active, &b.instance)));
    if !others.iter().any(|s| s.role == "splitter" && s.active) {
        others.insert(0, ServiceHealth::missing("splitter"));
    }
    services.extend(others);
    HealthReport {
        services,
        workers_live: live_workers(&tables.workers).len() as u64,
    }
}
