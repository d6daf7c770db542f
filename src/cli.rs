//! What every command-line program of the project shares: logging with a default level
//! (overridden by RUST_LOG) to the systemd journal or standard error, and one way to turn a
//! failure into an exit status.

use std::io::IsTerminal;
use std::os::unix::fs::MetadataExt;
use std::process::ExitCode;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Where log lines go and how they look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStyle {
    /// The journal's native protocol, with priority levels (under systemd); where its socket
    /// is missing, standard error (the journal's stream) without timestamps, which the
    /// journal adds itself, and without colour.
    Journal,
    /// Standard error with timestamps; colour only on a terminal without `NO_COLOR`.
    Stderr { ansi: bool },
}

/// What the environment asks for: `journal_stream` is `JOURNAL_STREAM` (systemd sets it to
/// the device and inode of the stream it connected standard error to), `stderr_id` the device
/// and inode standard error has now, `no_color` whether `NO_COLOR` is set and not empty,
/// `terminal` whether standard error is a terminal.
pub fn log_style(
    journal_stream: Option<&str>,
    stderr_id: Option<(u64, u64)>,
    no_color: bool,
    terminal: bool,
) -> LogStyle {
    let under_journal = journal_stream.is_some_and(|js| {
        let parsed = js
            .split_once(':')
            .and_then(|(d, i)| Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?)));
        // A stream that is not ours any more (standard error redirected) is not the journal.
        match (parsed, stderr_id) {
            (Some(ids), Some(now)) => ids == now,
            _ => true,
        }
    });
    if under_journal {
        LogStyle::Journal
    } else {
        LogStyle::Stderr {
            ansi: terminal && !no_color,
        }
    }
}

fn stderr_id() -> Option<(u64, u64)> {
    let fd = std::os::fd::AsFd::as_fd(&std::io::stderr())
        .try_clone_to_owned()
        .ok()?;
    let m = std::fs::File::from(fd).metadata().ok()?;
    Some((m.dev(), m.ino()))
}

/// Log at `default` unless RUST_LOG says otherwise: to the journal under systemd, else to
/// standard error.
pub fn init_logging(default: &str) {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let js = std::env::var("JOURNAL_STREAM").ok();
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let style = log_style(
        js.as_deref(),
        stderr_id(),
        no_color,
        std::io::stderr().is_terminal(),
    );
    let plain = || {
        tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .without_time()
            .init();
    };
    match style {
        LogStyle::Journal => match tracing_journald::layer() {
            Ok(journal) => tracing_subscriber::registry()
                .with(filter())
                .with(journal)
                .init(),
            Err(e) => {
                plain();
                tracing::debug!(error = %e, "journal socket not reachable; logging to standard error");
            }
        },
        LogStyle::Stderr { ansi } => tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .init(),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color_and_the_journal_only_on_its_stream() {
        let s = |js, id, nc, tty| log_style(js, id, nc, tty);
        assert_eq!(s(None, None, false, true), LogStyle::Stderr { ansi: true });
        assert_eq!(s(None, None, true, true), LogStyle::Stderr { ansi: false });
        assert_eq!(
            s(None, None, false, false),
            LogStyle::Stderr { ansi: false }
        );
        assert_eq!(
            s(Some("8:42"), Some((8, 42)), false, false),
            LogStyle::Journal
        );
        assert_eq!(
            s(Some("junk"), Some((8, 42)), false, false),
            LogStyle::Journal
        );
        // Standard error redirected away from the journal's stream.
        assert_eq!(
            s(Some("8:42"), Some((8, 43)), false, true),
            LogStyle::Stderr { ansi: true }
        );
    }
}
