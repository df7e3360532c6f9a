//! `batchctl demo`: the whole pipeline on this machine in one command. Splitter, reducer and
//! workers run inside this process (the same libraries the binaries run), in a namespace of
//! their own, and a real sha256 job runs end to end with live progress.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use common::broker::Broker;
use common::config::BrokerArgs;
use common::contract::JobState;
use common::wire::{Request, Response};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Operations in the demo job.
    #[arg(long, default_value_t = 1_000_000)]
    ops: u64,
    /// sha256 rounds per operation.
    #[arg(long, default_value_t = 10)]
    rounds: u64,
    /// Worker replicas to start.
    #[arg(long, default_value_t = 2)]
    workers: u16,
    /// Fragments each worker runs at once.
    #[arg(long, default_value_t = 4)]
    prefetch: u16,
    /// Keep the demo's namespace and data afterwards (for `batchctl` commands against it).
    #[arg(long)]
    keep: bool,
}

pub async fn run(broker_args: BrokerArgs, args: DemoArgs) -> anyhow::Result<ExitCode> {
    let namespace = format!(
        "{}-demo-{}",
        broker_args.namespace,
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let broker_args = BrokerArgs::new(broker_args.amqp_url.clone(), namespace.clone());
    let data = tempfile::Builder::new().prefix("batchq-demo-").tempdir()?;
    let data_dir = if args.keep {
        data.keep()
    } else {
        data.path().to_path_buf()
    };
    let broker = Broker::new(&broker_args, "batchctl-demo")?;
    broker
        .declare_topology()
        .await
        .context("the demo needs RabbitMQ (AMQP_URL); is it running?")?;
    eprintln!("namespace {namespace}, data in {}", data_dir.display());

    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    {
        let config = splitter::SplitterConfig::new(broker_args.clone(), &data_dir);
        let stop = shutdown.clone();
        tasks.spawn(async move {
            splitter::run(config, stop)
                .await
                .map_err(anyhow::Error::from)
        });
    }
    {
        let config = reducer::ReducerConfig::new(broker_args.clone(), &data_dir);
        let stop = shutdown.clone();
        tasks.spawn(async move {
            reducer::run(config, stop)
                .await
                .map_err(anyhow::Error::from)
        });
    }
    for _ in 0..args.workers {
        let mut config = worker::WorkerConfig::new(broker_args.clone());
        config.prefetch = args.prefetch;
        // The demo's workers offer every built-in; `exec` runs only `echo`, which every
        // system has (the demo job is sha256, and a worker offers no `exec` unless told what
        // it may run).
        config.exec_allow = Some(vec!["echo".to_owned()]);
        let stop = shutdown.clone();
        tasks.spawn(async move {
            worker::run(config, worker::Registry::with_builtins(), stop)
                .await
                .map_err(anyhow::Error::from)
        });
    }

    let job_id = format!("demo-sha256-{}", args.ops);
    let spec = serde_json::json!({
        "job_id": job_id,
        "operation": "sha256",
        "params": {"rounds": args.rounds},
        "range": {"start": 0, "end": args.ops},
        "max_concurrent_fragments": 16,
        "collect_results": true,
    });
    eprintln!(
        "submitting {job_id}: sha256 x{} rounds over {} items, {} workers x prefetch {}",
        args.rounds, args.ops, args.workers, args.prefetch
    );
    let started = Instant::now();
    crate::submit_body(&broker, &job_id, &serde_json::to_vec(&spec)?).await?;
    let outcome = tokio::select! {
        state = crate::progress::watch(&broker, &job_id, Duration::from_secs(5), true) => state,
        Some(Ok(Err(e))) = tasks.join_next() => Err(e.context("a demo component stopped")),
    };
    let elapsed = started.elapsed();
    let code = match outcome {
        Ok(state) => {
            eprintln!(
                "{} operations in {:.1} s ({:.0} ops/s)",
                args.ops,
                elapsed.as_secs_f64(),
                args.ops as f64 / elapsed.as_secs_f64().max(1e-9)
            );
            show_first_results(&broker, &job_id).await;
            if state == JobState::Succeeded {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("batchctl demo: {e:#}");
            ExitCode::from(2)
        }
    };
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    if args.keep {
        eprintln!("kept: BATCHQ_NAMESPACE={namespace} batchctl results {job_id}");
    } else {
        let channel = broker.channel().await?;
        common::topology::delete(
            &channel,
            broker.names(),
            &common::topology::BUILTIN_OPERATIONS,
        )
        .await?;
    }
    Ok(code)
}

async fn show_first_results(broker: &Broker, job_id: &str) {
    let request = Request::Results {
        job_id: job_id.to_owned(),
        from: 0,
        limit: 3,
    };
    if let Ok(Response::Results(page)) = crate::rpc(broker, Duration::from_secs(5), &request).await
    {
        for line in page.lines {
            if let Ok(text) = serde_json::to_string(&line) {
                eprintln!("  {text}");
            }
        }
    }
}
