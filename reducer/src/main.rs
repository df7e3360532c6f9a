use std::process::ExitCode;

use batchq_reducer::ReducerConfig;
use clap::Parser;

/// batchq reducer: folds fragment reports into exact job status and results.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    config: ReducerConfig,
}

#[tokio::main]
async fn main() -> ExitCode {
    common::init_logging();
    let cli = Cli::parse();
    let shutdown = common::shutdown::on_signals();
    match batchq_reducer::run(cli.config, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line that says why (its cause is in it already), not anyhow's chain.
            eprintln!("reducer: {e}");
            ExitCode::FAILURE
        }
    }
}
