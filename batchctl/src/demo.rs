//! `batchctl demo`: the whole pipeline on this machine in one command. Splitter, reducer and
//! workers run inside this process (the same libraries the binaries run), in a namespace of
//! their own, and a real sha256 job runs end to end with live progress.

use std::collections::HashMap;
use std::future::Future;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use batchq_client::StreamExt;
use clap::Args;
use common::broker::Broker;
use common::config::BrokerArgs;
use common::contract::JobState;
use tokio::task::{Id, JoinError, JoinSet};
use tokio_util::sync::CancellationToken;

/// How long the demo's components get to stop once it ends; then they are aborted.
const STOP_GRACE: Duration = Duration::from_secs(30);

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
    /// Fragments each worker holds and runs at once; unset, the workers' default (4 run at
    /// once, holding adapted to the fragments' length).
    #[arg(long)]
    prefetch: Option<u16>,
    /// Keep the demo's namespace and data afterwards (for `batchctl` commands against it).
    #[arg(long)]
    keep: bool,
    /// Write the components' logs to stderr, between the progress lines, rather than to
    /// `demo.log` in the demo's data folder.
    #[arg(long)]
    verbose: bool,
    /// Serve the web console (`batchctl ui`) beside the demo, and keep it, and the demo's
    /// components, up after the job ends until Ctrl-C.
    #[arg(long)]
    ui: bool,
    /// Where the console listens with `--ui`.
    #[arg(long, default_value = "127.0.0.1:8080", requires = "ui")]
    listen: std::net::SocketAddr,
}

pub async fn run(broker_args: BrokerArgs, args: DemoArgs) -> anyhow::Result<ExitCode> {
    let namespace = format!(
        "{}-demo-{}",
        broker_args.namespace,
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let broker_args = BrokerArgs {
        namespace: namespace.clone(),
        ..broker_args
    };
    // Deleted at the end unless `--keep`, or the demo failed (its log says why).
    let mut data = Some(tempfile::Builder::new().prefix("batchq-demo-").tempdir()?);
    let data_dir = match data.take_if(|_| args.keep) {
        Some(kept) => kept.keep(),
        None => data
            .as_ref()
            .map(|d| d.path().to_path_buf())
            .unwrap_or_default(),
    };
    let log = data_dir.join("demo.log");
    if args.verbose {
        common::init_logging(common::config::LogFormat::Text);
    } else {
        common::init_logging_to(
            std::fs::File::create(&log)
                .with_context(|| format!("creating the demo's log {}", log.display()))?,
        );
    }
    // The console's port is taken before anything starts, so a port in use fails at once.
    let variable = |name: &str| std::env::var(name).ok().filter(|t| !t.is_empty());
    let listener = if args.ui {
        let ui = crate::ui::UiArgs {
            listen: args.listen,
            token: variable("BATCHQ_UI_TOKEN"),
            read_token: variable("BATCHQ_UI_READ_TOKEN"),
        };
        Some(crate::ui::bind(&ui).await?)
    } else {
        None
    };
    let broker = Broker::new(&broker_args, "batchctl-demo")?;
    broker
        .declare_topology()
        .await
        .context("the demo needs RabbitMQ (AMQP_URL); is it running?")?;
    if args.verbose {
        eprintln!("namespace {namespace}, data in {}", data_dir.display());
    } else {
        eprintln!(
            "namespace {namespace}, data in {}, the components' logs in {} (--verbose shows them here)",
            data_dir.display(),
            log.display()
        );
    }

    let shutdown = CancellationToken::new();
    let mut components = Components::default();
    {
        let config = batchq_splitter::SplitterConfig::new(broker_args.clone(), &data_dir);
        let stop = shutdown.clone();
        components.spawn("splitter", async move {
            batchq_splitter::run(config, stop)
                .await
                .map_err(anyhow::Error::from)
        });
    }
    {
        let config = batchq_reducer::ReducerConfig::new(broker_args.clone(), &data_dir);
        let stop = shutdown.clone();
        components.spawn("reducer", async move {
            batchq_reducer::run(config, stop)
                .await
                .map_err(anyhow::Error::from)
        });
    }
    for n in 1..=args.workers {
        let mut config = batchq_worker::WorkerConfig::new(broker_args.clone());
        config.prefetch = args.prefetch;
        // The demo's workers offer every built-in; `exec` runs only `echo`, which every
        // system has (the demo job is sha256, and a worker offers no `exec` unless told what
        // it may run).
        config.exec_allow = Some(vec!["echo".to_owned()]);
        let stop = shutdown.clone();
        components.spawn(format!("worker {n}"), async move {
            batchq_worker::run(config, batchq_worker::Registry::with_builtins(), stop)
                .await
                .map_err(anyhow::Error::from)
        });
    }

    let job_id = format!("demo-sha256-{}", args.ops);
    let console_url = match listener {
        Some((listener, tokens)) => {
            let url = crate::ui::announce(&listener)?;
            eprintln!("watch it in a browser: {url}jobs/{job_id}");
            let console = crate::ui::Console::new(broker.clone(), Duration::from_secs(5), tokens);
            let stop = shutdown.clone();
            components.spawn("console", async move {
                crate::ui::serve(listener, console, async move { stop.cancelled().await }).await
            });
            Some(url)
        }
        None => None,
    };
    let spec = serde_json::json!({
        "job_id": job_id,
        "operation": "sha256",
        "params": {"rounds": args.rounds},
        "range": {"start": 0, "end": args.ops},
        "max_concurrent_fragments": 16,
        "collect_results": true,
    });
    eprintln!(
        "submitting {job_id}: sha256 x{} rounds over {} items, {} workers, prefetch {}",
        args.rounds,
        args.ops,
        args.workers,
        args.prefetch
            .map_or_else(|| "adaptive".to_owned(), |p| p.to_string())
    );
    let started = Instant::now();
    crate::submit_body(&broker, &job_id, &serde_json::to_vec(&spec)?).await?;
    let outcome = tokio::select! {
        state = crate::progress::watch(&broker, &job_id, Duration::from_secs(5), true) => state,
        stopped = components.first_stopped() => Err(anyhow::Error::new(stopped)),
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
    if let Some(url) = console_url
        && code != ExitCode::from(2)
    {
        eprintln!("the console stays up at {url} until Ctrl-C");
        // Ctrl-C or SIGTERM: either way the demo stops its components and deletes its
        // namespace (a second signal exits at once).
        let stop = common::shutdown::on_signals();
        tokio::select! {
            _ = stop.cancelled() => {}
            stopped = components.first_stopped() => eprintln!("batchctl demo: {stopped}"),
        }
    }
    components.stop(&shutdown, STOP_GRACE).await;
    if code != ExitCode::SUCCESS && !args.verbose {
        // The log says what went wrong: keep it.
        if let Some(failed) = data.take() {
            eprintln!(
                "the components' logs are kept in {}",
                failed.keep().join("demo.log").display()
            );
        }
    }
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
    let client = batchq_client::Client::from_broker(broker.clone());
    let mut lines = client.results(job_id).take(3);
    while let Some(Ok(line)) = lines.next().await {
        if let Ok(text) = serde_json::to_string(&line) {
            eprintln!("  {text}");
        }
    }
}

/// The demo's splitter, reducer and workers, run as tasks of this process under their names.
/// The demo's job cannot finish while any of them is down, so the first one to end, by an
/// error, a panic or a return, ends the demo, named.
#[derive(Default)]
struct Components {
    tasks: JoinSet<anyhow::Result<()>>,
    /// By task id, since a panicked task hands back only its id.
    names: HashMap<Id, String>,
}

/// A component that ended before the demo stopped it.
#[derive(Debug, thiserror::Error)]
#[error("{component} {reason}")]
struct ComponentStopped {
    component: String,
    reason: String,
}

impl Components {
    fn spawn(
        &mut self,
        name: impl Into<String>,
        component: impl Future<Output = anyhow::Result<()>> + Send + 'static,
    ) {
        let id = self.tasks.spawn(component).id();
        self.names.insert(id, name.into());
    }

    /// The first component to end and why. Pending as long as every one runs.
    async fn first_stopped(&mut self) -> ComponentStopped {
        let Some(joined) = self.tasks.join_next_with_id().await else {
            // Nothing runs, so nothing can stop.
            return std::future::pending().await;
        };
        let (id, reason) = match joined {
            Ok((id, Ok(()))) => (id, "stopped on its own, without an error".to_owned()),
            Ok((id, Err(e))) => (id, format!("failed: {e:#}")),
            Err(e) => (e.id(), describe_join_error(e)),
        };
        let component = self
            .names
            .remove(&id)
            .unwrap_or_else(|| format!("task {id}"));
        ComponentStopped { component, reason }
    }

    /// Stops every component and waits for them, at most `grace`, then aborts what is left.
    /// A component that fails while stopping gets a line of its own.
    async fn stop(mut self, shutdown: &CancellationToken, grace: Duration) {
        shutdown.cancel();
        let drained = tokio::time::timeout(grace, async {
            while let Some(joined) = self.tasks.join_next_with_id().await {
                let (id, reason) = match joined {
                    Ok((_, Ok(()))) => continue,
                    Ok((id, Err(e))) => (id, format!("failed: {e:#}")),
                    Err(e) => (e.id(), describe_join_error(e)),
                };
                let name = self.names.get(&id).map_or("a component", String::as_str);
                eprintln!("batchctl demo: {name} {reason} while stopping");
            }
        })
        .await;
        if drained.is_err() {
            eprintln!(
                "batchctl demo: {} component(s) still running after {} s; aborting them",
                self.tasks.len(),
                grace.as_secs()
            );
            self.tasks.shutdown().await;
        }
    }
}

/// A task that did not return: it panicked (with this message) or was aborted.
fn describe_join_error(e: JoinError) -> String {
    if !e.is_panic() {
        return "was aborted".to_owned();
    }
    let panic = e.into_panic();
    let message = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    format!("panicked: {message}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A component that runs until the demo stops it, as the real ones do.
    fn until_stopped(
        shutdown: &CancellationToken,
    ) -> impl Future<Output = anyhow::Result<()>> + Send + use<> {
        let stop = shutdown.clone();
        async move {
            stop.cancelled().await;
            Ok(())
        }
    }

    async fn first_stopped_of(
        failing: impl Future<Output = anyhow::Result<()>> + Send + 'static,
    ) -> (ComponentStopped, Components, CancellationToken) {
        let shutdown = CancellationToken::new();
        let mut components = Components::default();
        components.spawn("splitter", until_stopped(&shutdown));
        components.spawn("worker 2", failing);
        components.spawn("reducer", until_stopped(&shutdown));
        let stopped = tokio::time::timeout(Duration::from_secs(5), components.first_stopped())
            .await
            .expect("the failing component is noticed");
        (stopped, components, shutdown)
    }

    #[tokio::test]
    async fn a_panicking_component_is_named_with_its_message() {
        let (stopped, components, shutdown) = first_stopped_of(async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            panic!("store corrupt: boom");
        })
        .await;
        assert_eq!(stopped.component, "worker 2");
        assert_eq!(
            stopped.to_string(),
            "worker 2 panicked: store corrupt: boom"
        );
        // The others stop when asked, within the grace.
        tokio::time::timeout(
            Duration::from_secs(5),
            components.stop(&shutdown, Duration::from_secs(2)),
        )
        .await
        .expect("stopped in time");
        assert!(shutdown.is_cancelled());
    }

    #[tokio::test]
    async fn a_failing_or_returning_component_is_named() {
        let (stopped, _, _) =
            first_stopped_of(async { Err(anyhow::anyhow!("broker refused: 403")) }).await;
        assert_eq!(stopped.to_string(), "worker 2 failed: broker refused: 403");

        let (stopped, _, _) = first_stopped_of(async { Ok(()) }).await;
        assert_eq!(
            stopped.to_string(),
            "worker 2 stopped on its own, without an error"
        );
    }

    #[tokio::test]
    async fn nothing_stops_while_every_component_runs() {
        let shutdown = CancellationToken::new();
        let mut components = Components::default();
        components.spawn("splitter", until_stopped(&shutdown));
        let waited =
            tokio::time::timeout(Duration::from_millis(100), components.first_stopped()).await;
        assert!(waited.is_err(), "no component ended");
    }

    #[tokio::test]
    async fn a_component_that_ignores_the_stop_is_aborted_after_the_grace() {
        let shutdown = CancellationToken::new();
        let mut components = Components::default();
        components.spawn("stuck worker", std::future::pending());
        components.spawn("reducer", until_stopped(&shutdown));
        let started = Instant::now();
        tokio::time::timeout(
            Duration::from_secs(5),
            components.stop(&shutdown, Duration::from_millis(200)),
        )
        .await
        .expect("aborted after the grace");
        assert!(started.elapsed() >= Duration::from_millis(200));
    }
}
