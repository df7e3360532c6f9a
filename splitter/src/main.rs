use clap::Parser;
use splitter::SplitterConfig;

/// batchq splitter: validates jobs and releases their fragments within each job's window.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    config: SplitterConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::init_logging();
    let cli = Cli::parse();
    let shutdown = common::shutdown::on_signals();
    splitter::run(cli.config, shutdown).await?;
    Ok(())
}
