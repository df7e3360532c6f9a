//! batchctl: submit jobs to batchq and watch them, from any host that reaches the broker.

mod dead;
mod demo;
mod progress;
mod table;
mod ui;

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::{Parser, Subcommand};
use common::broker::{Broker, json_properties};
use common::config::BrokerArgs;
use common::contract::{CancelRequest, JobState, JobStatus};
use common::jobspec::{ParseLimits, parse_job_spec};
use common::lapin::types::ShortString;
use common::rpc::RpcClient;
use common::topology::{BUILTIN_OPERATIONS, KEY_CANCEL, KEY_SUBMIT};
use common::wire::{Request, Response, WorkerInfo};
use serde_json::Value;

#[derive(Parser)]
#[command(version, about = "Submit and watch batchq jobs")]
struct Cli {
    #[command(flatten)]
    broker: BrokerArgs,

    /// Seconds to wait for the reducer to answer a query.
    #[arg(long, global = true, default_value_t = 5)]
    timeout: u64,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Publish a JobSpec (a file, or - for stdin) and print its job id.
    Submit {
        file: String,
        /// Show live progress until the job ends; exit 0 only if it succeeded.
        #[arg(long)]
        wait: bool,
    },
    /// The job's current status.
    Status {
        job: String,
        #[arg(long)]
        json: bool,
    },
    /// Live progress until the job ends.
    Watch { job: String },
    /// The job's results as JSON Lines, ordered by index.
    Results { job: String },
    /// Cancel a job.
    Cancel { job: String },
    /// Delete a finished job's status and results now (as retention does later).
    Delete { job: String },
    /// Recent jobs with state and progress.
    Jobs {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Each batchq queue: ready, unacknowledged, consumers.
    Queues {
        #[arg(long)]
        json: bool,
    },
    /// Live workers.
    Workers {
        #[arg(long)]
        json: bool,
    },
    /// Every splitter and reducer replica heard from, with its role and whether it is the
    /// active one (with `BATCHQ_DATABASE_URL`, one of each role is; the rest are standbys).
    Members {
        #[arg(long)]
        json: bool,
    },
    /// Whether the splitter and the reducer are alive and their stores work; exits 1 when
    /// one is not.
    Health {
        #[arg(long)]
        json: bool,
    },
    /// What {ns}.dead holds (reason, job, size, age, origin); `requeue` puts messages back
    /// where they came from, `purge` drops them.
    Dead(dead::DeadArgs),
    /// Run a real job end to end on this machine: splitter, reducer and workers in this
    /// process, a sha256 job over a range, with live progress.
    Demo(demo::DemoArgs),
    /// A web console: jobs, a job's failed items, workers, queues, dead letters, submit,
    /// cancel and redrive, and an HTTP API under /api/v1/ (default http://127.0.0.1:8080/;
    /// `BATCHQ_UI_TOKEN` to require a token, `BATCHQ_UI_READ_TOKEN` for one that only reads).
    Ui(ui::UiArgs),
}

/// Exit codes: 0 done (and for waits, the job succeeded), 1 the job ended otherwise, 2 error.
#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("batchctl: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let broker = Broker::new(&cli.broker, "batchctl")?;
    let timeout = Duration::from_secs(cli.timeout.max(1));
    if let Command::Ui(args) = &cli.command {
        // A weak token is refused before anything else is tried.
        ui::check_tokens(args)?;
    }
    if !matches!(cli.command, Command::Demo(_)) {
        // The connection stays in the broker's pool for the command to use.
        reach_broker(&broker).await?;
    }
    match cli.command {
        Command::Submit { file, wait } => {
            let job_id = submit(&broker, &file).await?;
            println!("{job_id}");
            if wait {
                return Ok(exit_for(
                    progress::watch(&broker, &job_id, timeout, true).await?,
                ));
            }
        }
        Command::Status { job, json } => {
            let status = status(&broker, &job, timeout).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", table::status_text(&status));
            }
        }
        Command::Watch { job } => {
            return Ok(exit_for(
                progress::watch(&broker, &job, timeout, false).await?,
            ));
        }
        Command::Results { job } => results(&broker, &job, timeout).await?,
        Command::Cancel { job } => {
            let current = status(&broker, &job, timeout).await?;
            if current.state.is_terminal() {
                bail!("job {job} has already ended ({})", current.state);
            }
            declared_publisher(&broker)
                .await?
                .send_json(
                    &broker.names().jobs(),
                    KEY_CANCEL,
                    &CancelRequest {
                        job_id: job.clone(),
                    },
                )
                .await?;
            println!("cancel requested for {job}");
        }
        Command::Delete { job } => {
            match rpc(
                &broker,
                timeout,
                &Request::Delete {
                    job_id: job.clone(),
                },
            )
            .await?
            {
                Response::Deleted { .. } => println!("deleted job {job}"),
                other => return Err(unexpected(other)),
            }
        }
        Command::Jobs { json, limit } => {
            let jobs = match rpc(&broker, timeout, &Request::Jobs { limit }).await? {
                Response::Jobs { jobs } => jobs,
                other => return Err(unexpected(other)),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&jobs)?);
            } else {
                print!("{}", table::jobs(&jobs));
            }
        }
        Command::Queues { json } => queues(&broker, timeout, json).await?,
        Command::Workers { json } => {
            let workers = worker_records(rpc(&broker, timeout, &Request::Workers).await?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&workers)?);
            } else {
                print!("{}", table::workers(&workers));
            }
        }
        Command::Members { json } => {
            let report = match rpc(&broker, timeout, &Request::Health).await? {
                Response::Health(report) => report,
                other => return Err(unexpected(other)),
            };
            let members: Vec<_> = report
                .services
                .into_iter()
                .filter(|s| s.instance.is_some())
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&members)?);
            } else {
                print!("{}", table::members(&members));
            }
        }
        Command::Health { json } => {
            let report = match rpc(&broker, timeout, &Request::Health).await? {
                Response::Health(report) => report,
                other => return Err(unexpected(other)),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", table::health(&report));
            }
            if !report.services.iter().all(|s| s.is_ok()) {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Dead(args) => dead::run(&broker, args).await?,
        Command::Demo(args) => return demo::run(cli.broker, args).await,
        Command::Ui(args) => ui::run(broker, timeout, args).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// How long batchctl keeps trying to reach the broker before it gives up: long enough to ride
/// out a broker that is restarting or a connection refused in passing, short enough that a
/// wrong address is reported promptly.
const CONNECT_PATIENCE: Duration = Duration::from_secs(3);
/// Pause between two connection attempts.
const CONNECT_RETRY_EVERY: Duration = Duration::from_millis(250);

/// Connects to the broker (each URL of `AMQP_URL` in turn), retrying for
/// [`CONNECT_PATIENCE`]; the error after that is one line naming the broker. A broker that
/// refuses the login, the vhost or the TLS handshake is not retried: waiting will not mend
/// it, so the line naming the cause comes at once.
async fn reach_broker(broker: &Broker) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let attempt = tokio::time::timeout(CONNECT_PATIENCE, broker.connection()).await;
        let error = match attempt {
            Ok(Ok(_connection)) => return Ok(()),
            Ok(Err(e)) if e.refusal().is_some() => bail!("{}", refusal_line(&e)),
            Ok(Err(e)) if e.is_retryable() => e.to_string(),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => format!(
                "cannot reach the broker ({}): no answer within {} s",
                broker.urls_redacted(),
                CONNECT_PATIENCE.as_secs()
            ),
        };
        if started.elapsed() + CONNECT_RETRY_EVERY >= CONNECT_PATIENCE {
            bail!(
                "{} (gave up after {attempts} attempts in {:.1} s)",
                error.replace('\n', " "),
                started.elapsed().as_secs_f64()
            );
        }
        tokio::time::sleep(CONNECT_RETRY_EVERY).await;
    }
}

/// One line for a refused connection: the cause first, then the broker's own words and the
/// URL (without its password).
fn refusal_line(error: &common::broker::BrokerError) -> String {
    match error.refusal() {
        Some(cause) => format!("{cause}; {}", error.to_string().replace('\n', " ")),
        None => error.to_string(),
    }
}

fn exit_for(state: JobState) -> ExitCode {
    if state == JobState::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

pub(crate) fn unexpected(response: Response) -> anyhow::Error {
    match response {
        Response::NotFound { job_id } => anyhow!("unknown job {job_id}"),
        Response::Gone(tombstone) => anyhow!("{}", tombstone.describe()),
        Response::StillRunning { job_id } => {
            anyhow!("job {job_id} is still running; cancel it first")
        }
        Response::Error { message } => anyhow!("the reducer failed to answer: {message}"),
        other => anyhow!("unexpected reply from the reducer: {other:?}"),
    }
}

/// The records `batchctl workers --json` prints, from the reducer's answer to
/// [`Request::Workers`].
pub(crate) fn worker_records(response: Response) -> anyhow::Result<Vec<WorkerInfo>> {
    match response {
        Response::Workers { workers } => Ok(workers),
        other => Err(unexpected(other)),
    }
}

pub(crate) async fn declared_publisher(
    broker: &Broker,
) -> anyhow::Result<common::broker::Publisher> {
    broker.declare_topology().await?;
    Ok(broker.publisher().await?)
}

pub(crate) async fn rpc(
    broker: &Broker,
    timeout: Duration,
    request: &Request,
) -> anyhow::Result<Response> {
    let mut client = RpcClient::connect(broker, timeout).await?;
    Ok(client.call(request).await?)
}

pub(crate) async fn status(
    broker: &Broker,
    job: &str,
    timeout: Duration,
) -> anyhow::Result<JobStatus> {
    match rpc(
        broker,
        timeout,
        &Request::Status {
            job_id: job.to_owned(),
        },
    )
    .await?
    {
        Response::Status(status) => Ok(status),
        other => Err(unexpected(other)),
    }
}

fn read_spec(file: &str) -> anyhow::Result<Vec<u8>> {
    if file == "-" {
        let mut body = Vec::new();
        std::io::stdin()
            .read_to_end(&mut body)
            .context("reading the JobSpec from stdin")?;
        Ok(body)
    } else {
        std::fs::read(PathBuf::from(file)).with_context(|| format!("reading {file}"))
    }
}

/// Publishes a JobSpec (confirmed) and returns its job id, giving it one if it has none.
pub(crate) async fn submit(broker: &Broker, file: &str) -> anyhow::Result<String> {
    let body = read_spec(file)?;
    let (job_id, body) = checked_spec(&body).map_err(|problem| match problem {
        SpecProblem::Invalid(_) => anyhow!("{problem}"),
        SpecProblem::NotJson(e) => anyhow!("{file} is not a JSON JobSpec: {e}"),
        SpecProblem::NotObject => anyhow!("{file}: {problem}"),
    })?;
    submit_body(broker, &job_id, &body).await?;
    Ok(job_id)
}

/// Why a JobSpec is not published.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SpecProblem {
    #[error("not a JSON JobSpec: {0}")]
    NotJson(String),
    #[error("a JobSpec is a JSON object")]
    NotObject,
    /// What the splitter would reject, in its words.
    #[error("invalid JobSpec: {0}")]
    Invalid(String),
}

/// A JobSpec as published: given a job id if it has none, and checked here for what the
/// splitter would reject, so the mistake is shown where it was made.
pub(crate) fn checked_spec(body: &[u8]) -> Result<(String, Vec<u8>), SpecProblem> {
    let mut value: Value =
        serde_json::from_slice(body).map_err(|e| SpecProblem::NotJson(e.to_string()))?;
    let Some(object) = value.as_object_mut() else {
        return Err(SpecProblem::NotObject);
    };
    if !object.contains_key("job_id") {
        object.insert(
            "job_id".into(),
            Value::String(uuid::Uuid::new_v4().to_string()),
        );
    }
    let body = serde_json::to_vec(&value).map_err(|e| SpecProblem::NotJson(e.to_string()))?;
    let spec = parse_job_spec(&body, None, None, ParseLimits::default())
        .map_err(|rejection| SpecProblem::Invalid(rejection.error))?;
    Ok((spec.job_id, body))
}

pub(crate) async fn submit_body(broker: &Broker, job_id: &str, body: &[u8]) -> anyhow::Result<()> {
    let publisher = declared_publisher(broker).await?;
    publisher
        .send(
            &broker.names().jobs(),
            KEY_SUBMIT,
            body,
            json_properties().with_message_id(ShortString::from(job_id)),
        )
        .await?;
    Ok(())
}

async fn results(broker: &Broker, job: &str, timeout: Duration) -> anyhow::Result<()> {
    use std::io::Write;
    let mut client = RpcClient::connect(broker, timeout).await?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut from = 0;
    loop {
        let request = Request::Results {
            job_id: job.to_owned(),
            from,
            limit: 5000,
        };
        let page = match client.call(&request).await? {
            Response::Results(page) => page,
            other => return Err(unexpected(other)),
        };
        for line in &page.lines {
            serde_json::to_writer(&mut out, line)?;
            out.write_all(b"\n")?;
        }
        match page.next {
            Some(next) => from = next,
            None => break,
        }
    }
    out.flush()?;
    Ok(())
}

/// What [`queue_rows`] needs of the reducer: the live workers and the recent jobs.
pub(crate) const QUEUE_QUESTIONS: [Request; 2] = [Request::Workers, Request::Jobs { limit: 1000 }];

/// Queue figures from passive declares (no management plugin needed).
async fn queues(broker: &Broker, timeout: Duration, json: bool) -> anyhow::Result<()> {
    let mut client = RpcClient::connect(broker, timeout).await?;
    let [workers, recent] = &QUEUE_QUESTIONS;
    // Without answers the fixed queues and the built-ins' work queues are still listed.
    let mut ask = async |request| {
        client
            .call(request)
            .await
            .unwrap_or_else(|e| Response::Error {
                message: e.to_string(),
            })
    };
    let (workers, recent) = (ask(workers).await, ask(recent).await);
    let rows = queue_rows(broker, workers, recent).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", table::queues(&rows));
    }
    Ok(())
}

/// Every batchq queue of the namespace that exists: the fixed ones, and the work queues of
/// the built-in operations, of those live workers offer and of recent jobs.
///
/// `workers` and `recent` are the reducer's answers to [`QUEUE_QUESTIONS`], asked by the
/// caller on whatever client it holds (an answer that is not those lists is left out).
pub(crate) async fn queue_rows(
    broker: &Broker,
    workers: Response,
    recent: Response,
) -> anyhow::Result<Vec<table::QueueRow>> {
    let names = broker.names();
    let mut operations: Vec<String> = BUILTIN_OPERATIONS.iter().map(|s| s.to_string()).collect();
    // Unacknowledged work comes from worker heartbeats: what each live worker holds.
    let mut held: std::collections::BTreeMap<String, u64> = Default::default();
    // Work queues of custom operations: those live workers offer, and those of recent jobs.
    if let Response::Workers { workers } = workers {
        for worker in workers {
            for (operation, n) in worker.held_by_operation {
                *held.entry(operation).or_default() += n;
            }
            operations.extend(worker.operations);
        }
    }
    if let Response::Jobs { jobs } = recent {
        operations.extend(jobs.into_iter().filter_map(|j| j.operation));
    }
    operations.sort();
    operations.dedup();
    let mut queue_names: Vec<(String, Option<u64>)> = names
        .fixed_queues()
        .into_iter()
        .map(|q| (q, None))
        .collect();
    queue_names.extend(operations.iter().map(|op| {
        (
            names.work_queue(op),
            Some(held.get(op).copied().unwrap_or(0)),
        )
    }));
    let names_only: Vec<String> = queue_names.iter().map(|(q, _)| q.clone()).collect();
    let peeks = common::broker::peek_queues(&names_only, || broker.channel()).await?;
    let rows: Vec<table::QueueRow> = queue_names
        .into_iter()
        .zip(peeks)
        .filter_map(|((queue, unacknowledged), peek)| {
            peek.map(|p| table::QueueRow {
                queue,
                ready: p.ready,
                unacknowledged,
                consumers: p.consumers,
            })
        })
        .collect();
    Ok(rows)
}
