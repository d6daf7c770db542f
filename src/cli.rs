//! What every command-line program of the project shares: logging to standard error with a
//! default level (overridden by RUST_LOG), and one way to turn a failure into an exit status.

use std::process::ExitCode;

/// Log to standard error at `default` unless RUST_LOG says otherwise.
pub fn init_logging(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Exit 0, or print the error chain after the program's name and exit 1.
pub fn exit(program: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
