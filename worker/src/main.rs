use clap::Parser;
use worker::{Registry, WorkerConfig};

/// batchq worker: runs fragments of the operations it offers.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    config: WorkerConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::init_logging();
    let cli = Cli::parse();
    let shutdown = common::shutdown::on_signals();
    worker::run(cli.config, Registry::with_builtins(), shutdown).await?;
    Ok(())
}
