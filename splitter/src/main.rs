use std::process::ExitCode;

use batchq_splitter::SplitterConfig;
use clap::Parser;

/// batchq splitter: validates jobs and releases their fragments within each job's window.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    config: SplitterConfig,

    #[command(flatten)]
    log: common::config::LogArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    common::init_logging(cli.log.log_format);
    let shutdown = common::shutdown::on_signals();
    match batchq_splitter::run(cli.config, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line that says why (its cause is in it already), not anyhow's chain.
            eprintln!("splitter: {e}");
            ExitCode::FAILURE
        }
    }
}
