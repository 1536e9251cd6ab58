//! The crier binary: parses the command line, sets up tracing, runs the command.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = crier::cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CRIER_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("crier: cannot start the runtime: {error}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(crier::cli::run(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("crier: {error:#}");
            if crier::is_user_error(&error) {
                ExitCode::from(1)
            } else {
                ExitCode::from(2)
            }
        }
    }
}
