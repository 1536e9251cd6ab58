//! The crier binary: parses the command line, sets up tracing, runs the command.

use clap::Parser;
use std::io::IsTerminal;
use std::process::ExitCode;

/// jemalloc instead of the system allocator: the store's work is mostly allocation (sled's
/// copy-on-write nodes, JSON records), and glibc's malloc and free were a quarter of an
/// import's time. Measured side by side on a 300,000-row import: 3.7 s to 2.9 s, for 14 MB
/// more peak memory (mimalloc was as fast but held twice the memory).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, which it reads when it starts (its `malloc_conf`, under the prefix
/// tikv-jemalloc-sys gives every jemalloc symbol). `_RJEM_MALLOC_CONF` in the environment
/// still overrides them. Each was measured side by side on a send to 1,000,000 subscribers:
///
/// - One arena instead of four per CPU: memory one thread frees is then reused by every
///   thread. Peak 157 to 144 MB, with import, email fan-out and the subscribe surge as fast.
/// - Each thread keeps freed blocks of up to 1 KiB for reuse, instead of up to 32 KiB. sled's
///   I/O threads free what the store's thread allocated, and each kept its own stock of it.
///   Peak 151 to 138 MB (147,720 to 134,932 KiB), with the send (184.0 and 185.5 s), import
///   and email fan-out as fast. No thread cache at all went 15 MB lower but 11 % slower.
#[unsafe(export_name = "_rjem_malloc_conf")]
static JEMALLOC_OPTIONS: &[u8; 26] = b"narenas:1,tcache_max:1024\0";

fn main() -> ExitCode {
    let cli = match crier::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) if !error.use_stderr() => {
            // --help and --version: print as asked, and succeed.
            let _ = error.print();
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!("crier: {}", one_line(&error.to_string()));
            return ExitCode::from(1);
        }
    };
    // The server's log is its record of requests and deliveries; a command only warns.
    // The PostgreSQL driver's notices and the migrations' progress are not crier's record.
    let default_level = match cli.command {
        crier::cli::Command::Serve => "info,tokio_postgres=warn,refinery_core=warn",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CRIER_LOG")
                .unwrap_or_else(|_| default_level.into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only where a terminal shows them, never in a log file.
        .with_ansi(std::io::stderr().is_terminal())
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
        // The reader went away (`crier deliveries | head`): nothing more to say to anyone.
        Err(error) if error.is_broken_pipe() => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("crier: {error}");
            ExitCode::from(error.kind().exit_code())
        }
    }
}

/// clap's message without its usage block, folded onto one line, its suggestion kept ("a
/// similar subcommand exists: 'send'").
fn one_line(message: &str) -> String {
    let lines: Vec<&str> = message
        .lines()
        .take_while(|line| !line.starts_with("Usage:"))
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with("For more information"))
        .collect();
    let (tips, reason): (Vec<&str>, Vec<&str>) =
        lines.into_iter().partition(|line| line.starts_with("tip:"));
    let reason = reason.join(" ");
    let reason = reason.strip_prefix("error: ").unwrap_or(&reason);
    // clap's other tip ("to pass '--x' as a value, use '-- --x'") helps no one here.
    let suggestion = tips
        .iter()
        .map(|tip| tip.trim_start_matches("tip:").trim())
        .find(|tip| tip.contains("similar"));
    match suggestion {
        Some(tip) => format!("{reason}; {tip} (see --help)"),
        None => format!("{reason} (see --help)"),
    }
}
