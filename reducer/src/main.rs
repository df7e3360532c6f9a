use std::process::ExitCode;

use batchq_reducer::ReducerConfig;
use clap::Parser;

/// batchq reducer: folds fragment reports into exact job status and results.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    config: ReducerConfig,

    #[command(flatten)]
    log: common::config::LogArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    common::init_logging(cli.log.log_format);
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
