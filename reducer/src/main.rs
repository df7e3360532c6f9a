use clap::Parser;
use reducer::ReducerConfig;

/// batchq reducer: folds fragment reports into exact job status and results.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    config: ReducerConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::init_logging();
    let cli = Cli::parse();
    let shutdown = common::shutdown::on_signals();
    reducer::run(cli.config, shutdown).await?;
    Ok(())
}
