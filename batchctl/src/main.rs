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

use anyhow::{Context, anyhow};
use batchq_client::{Client, ClientError, StreamExt};
use clap::{Parser, Subcommand};
use common::broker::Broker;
use common::config::BrokerArgs;
use common::contract::JobState;
use common::rpc::RpcClient;
use common::topology::BUILTIN_OPERATIONS;
use common::wire::{Request, Response, WorkerInfo};

#[derive(Parser)]
#[command(version, about = "Submit and watch batchq jobs")]
struct Cli {
    #[command(flatten)]
    broker: BrokerArgs,

    /// Seconds to wait for the reducer to answer a query.
    #[arg(long, global = true, default_value_t = 5)]
    timeout: u64,

    #[command(flatten)]
    log: common::config::LogArgs,

    #[command(subcommand)]
    command: Command,
}

/// The shells `batchctl completions` writes a script for.
#[derive(Clone, Copy, clap::ValueEnum)]
enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Subcommand)]
enum Command {
    /// Publish a JobSpec (a file, or - for stdin) and print its job id.
    Submit {
        /// The JobSpec: a file of JSON, or `-` to read it from stdin.
        file: String,
        /// Show live progress until the job ends; exit 0 only if it succeeded.
        #[arg(long)]
        wait: bool,
        /// Print `{"job_id": …}` instead of the bare id (with --wait: then the final status).
        #[arg(long)]
        json: bool,
    },
    /// The job's current status.
    Status {
        /// The job's id.
        job: String,
        /// Print the JobStatus record as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Live progress until the job ends.
    Watch {
        /// The job's id.
        job: String,
        /// Print every status as one JSON line (NDJSON) instead of a progress bar.
        #[arg(long)]
        json: bool,
    },
    /// The job's results as JSON Lines, ordered by index.
    Results {
        /// The job's id.
        job: String,
    },
    /// Cancel a job.
    Cancel {
        /// The job's id.
        job: String,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run again every operation of a failed or cancelled job that has not succeeded.
    Redrive {
        /// The job's id.
        job: String,
        /// Show live progress until the job ends again; exit 0 only if it succeeded.
        #[arg(long)]
        wait: bool,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a finished job's status and results now (as retention does later).
    Delete {
        /// The job's id.
        job: String,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Recent jobs with state and progress, newest first (filtered by the reducer).
    Jobs {
        /// Print the JobStatus records as JSON.
        #[arg(long)]
        json: bool,
        /// Most jobs to list.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Only jobs in this state (accepted, running, succeeded, failed, cancelled, rejected).
        #[arg(long, value_parser = parse_state)]
        state: Option<JobState>,
        /// Only jobs whose id starts with this.
        #[arg(long)]
        prefix: Option<String>,
    },
    /// Each batchq queue: ready, unacknowledged, consumers.
    Queues {
        /// Print the records as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Live workers.
    Workers {
        /// Print the records as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Every splitter and reducer replica heard from, with its role and whether it is the
    /// active one (with `BATCHQ_DATABASE_URL`, one of each role is; the rest are standbys).
    Members {
        /// Print the records as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Whether the splitter and the reducer are alive and their stores work; exits 1 when
    /// one is not.
    Health {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// A completion script for a shell, on stdout (`batchctl completions bash >
    /// /etc/bash_completion.d/batchctl`).
    Completions {
        /// The shell: bash, zsh or fish.
        shell: Shell,
    },
    /// batchctl's manual page in roff, on stdout (`batchctl man > batchctl.1; man ./batchctl.1`).
    Man,
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
    match cli.command {
        // Neither needs a broker.
        Command::Completions { shell } => return print_completions(shell),
        Command::Man => return print_man(),
        Command::Ui(_) => common::init_logging(cli.log.log_format),
        _ => {}
    }
    let broker = Broker::new(&cli.broker, "batchctl")?;
    let timeout = Duration::from_secs(cli.timeout.max(1));
    let client = Client::from_broker(broker.clone()).with_timeout(timeout);
    if let Command::Ui(args) = &cli.command {
        // A weak token is refused before anything else is tried.
        ui::check_tokens(args)?;
    }
    if !matches!(cli.command, Command::Demo(_)) {
        // The connection stays in the broker's pool for the command to use.
        client.reach().await?;
    }
    match cli.command {
        Command::Submit { file, wait, json } => {
            let job_id = submit(&client, &file).await?;
            if !wait {
                print_outcome(json, &job_id, None, &job_id);
                return Ok(ExitCode::SUCCESS);
            }
            if json {
                let last = watch_json(&client, &job_id).await?;
                return Ok(exit_for(last));
            }
            println!("{job_id}");
            return Ok(exit_for(
                progress::watch(&broker, &job_id, timeout, true).await?,
            ));
        }
        Command::Status { job, json } => {
            let status = client.status(&job).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", table::status_text(&status));
            }
        }
        Command::Watch { job, json } => {
            if json {
                return Ok(exit_for(watch_json(&client, &job).await?));
            }
            return Ok(exit_for(
                progress::watch(&broker, &job, timeout, false).await?,
            ));
        }
        Command::Results { job } => results(&client, &job).await?,
        Command::Cancel { job, json } => {
            client.cancel(&job).await?;
            print_outcome(
                json,
                &job,
                Some("cancel requested"),
                &format!("cancel requested for {job}"),
            );
        }
        Command::Redrive { job, wait, json } => {
            let current = client.status(&job).await?;
            client.redrive(&job).await?;
            print_outcome(
                json,
                &job,
                Some("redrive requested"),
                &format!("redrive requested for {job}"),
            );
            if wait {
                return Ok(exit_for(
                    progress::watch_redriven(&broker, &job, timeout, current.redrives + 1).await?,
                ));
            }
        }
        Command::Delete { job, json } => {
            client.delete(&job).await?;
            print_outcome(json, &job, Some("deleted"), &format!("deleted job {job}"));
        }
        Command::Jobs {
            json,
            limit,
            state,
            prefix,
        } => {
            let jobs = client.jobs(state, prefix.as_deref(), limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&jobs)?);
            } else {
                print!("{}", table::jobs(&jobs));
            }
        }
        Command::Queues { json } => queues(&broker, timeout, json).await?,
        Command::Workers { json } => {
            let workers = client.workers().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&workers)?);
            } else {
                print!("{}", table::workers(&workers));
            }
        }
        Command::Members { json } => {
            let report = client.health().await?;
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
            let report = client.health().await?;
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
        Command::Completions { .. } | Command::Man => unreachable!("answered before the broker"),
    }
    Ok(ExitCode::SUCCESS)
}

fn exit_for(state: JobState) -> ExitCode {
    if state == JobState::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// The error a reply other than the one asked for stands for (the console's pages use it).
pub(crate) fn unexpected(response: Response) -> anyhow::Error {
    ClientError::from_response(response).into()
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

/// Publishes the JobSpec in `file` (confirmed) and returns its job id, giving it one if it
/// has none; a spec that is not JSON, or not an object, is reported under the file's name.
async fn submit(client: &Client, file: &str) -> anyhow::Result<String> {
    let body = read_spec(file)?;
    client.submit_json(&body).await.map_err(|e| match e {
        ClientError::SpecNotJson(e) => anyhow!("{file} is not a JSON JobSpec: {e}"),
        e @ ClientError::SpecNotObject => anyhow!("{file}: {e}"),
        e => e.into(),
    })
}

/// A JobSpec as published ([`batchq_client::checked_spec`]), for the console's submit page.
pub(crate) fn checked_spec(body: &[u8]) -> Result<(String, Vec<u8>), ClientError> {
    batchq_client::checked_spec(body).map(|spec| (spec.job_id, spec.body))
}

/// Publishes a JobSpec checked by [`checked_spec`] (the console's submit page, the demo).
pub(crate) async fn submit_body(broker: &Broker, job_id: &str, body: &[u8]) -> anyhow::Result<()> {
    let spec = batchq_client::CheckedSpec {
        job_id: job_id.to_owned(),
        body: body.to_vec(),
    };
    Client::from_broker(broker.clone()).publish(&spec).await?;
    Ok(())
}

/// The job's results as JSON Lines on stdout, in index order.
async fn results(client: &Client, job: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut lines = client.results(job);
    while let Some(line) = lines.next().await {
        serde_json::to_writer(&mut out, &line?)?;
        out.write_all(b"\n")?;
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

/// `--state`'s values: the contract's states.
fn parse_state(text: &str) -> Result<JobState, String> {
    JobState::parse(text).ok_or_else(|| {
        format!(
            "{text:?} is not a state (accepted, running, succeeded, failed, cancelled, rejected)"
        )
    })
}

/// What a command that changes a job did: `{"job_id": …, "outcome": …}` with `--json`
/// (just the id for a submit), else `text`.
fn print_outcome(json: bool, job_id: &str, outcome: Option<&str>, text: &str) {
    if !json {
        println!("{text}");
        return;
    }
    let record = match outcome {
        Some(outcome) => serde_json::json!({"job_id": job_id, "outcome": outcome}),
        None => serde_json::json!({"job_id": job_id}),
    };
    println!("{record}");
}

/// Every status of the job until it ends, one JSON line each (NDJSON); the last state.
async fn watch_json(client: &Client, job_id: &str) -> anyhow::Result<JobState> {
    use std::io::Write;
    let mut statuses = client.watch_submitted(job_id);
    let mut last = None;
    while let Some(status) = statuses.next().await {
        let status = status?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", serde_json::to_string(&status)?)?;
        out.flush()?;
        last = Some(status.state);
    }
    last.ok_or_else(|| anyhow!("job {job_id}: no status before the watch ended"))
}

fn print_completions(shell: Shell) -> anyhow::Result<ExitCode> {
    use clap::CommandFactory;
    let shell = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(
        shell,
        &mut Cli::command(),
        "batchctl",
        &mut std::io::stdout(),
    );
    Ok(ExitCode::SUCCESS)
}

fn print_man() -> anyhow::Result<ExitCode> {
    use clap::CommandFactory;
    clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod cli_tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Every flag and argument of every command, with the command's path, that has no help.
    fn without_help(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            if arg.get_help().is_none() && arg.get_long_help().is_none() {
                missing.push(format!("{path} {id}"));
            }
        }
        for sub in command.get_subcommands() {
            if sub.get_about().is_none() && sub.get_long_about().is_none() {
                missing.push(format!("{path} {} (the command)", sub.get_name()));
            }
            without_help(sub, &format!("{path} {}", sub.get_name()), missing);
        }
    }

    #[test]
    fn every_command_flag_and_argument_has_help() {
        let mut missing = Vec::new();
        without_help(&Cli::command(), "batchctl", &mut missing);
        assert!(missing.is_empty(), "without help text: {missing:#?}");
    }

    #[test]
    fn completions_and_the_manual_name_every_command() {
        let mut script = Vec::new();
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut Cli::command(),
            "batchctl",
            &mut script,
        );
        let script = String::from_utf8(script).expect("utf-8");
        let mut man = Vec::new();
        clap_mangen::Man::new(Cli::command())
            .render(&mut man)
            .expect("renders");
        let man = String::from_utf8(man).expect("utf-8");
        for command in ["submit", "watch", "redrive", "completions", "dead", "ui"] {
            assert!(script.contains(command), "completion lacks {command}");
            assert!(man.contains(command), "manual lacks {command}");
        }
        Cli::command().debug_assert();
    }
}
