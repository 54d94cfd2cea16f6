//! The daemon's own log: `tracing`, with the `log` facade (the code base's `log::info!` calls,
//! aya's and the kernel programs' aya-log records) bridged into it. Always on stderr: stdout is
//! `--log-events`' JSON lines.

use std::io::IsTerminal as _;

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// `2026-01-02T03:04:05.678901Z  INFO observer::daemon: message key=value`
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, and `fields` with the
    /// `message` and the event's other fields.
    Json,
}

/// Installs the subscriber (and the `log` bridge) for the whole process. The level comes from
/// `RUST_LOG` (tracing's env-filter directives, e.g. `debug`, `warn,observer=debug`), `info` when
/// it is unset; a `RUST_LOG` it cannot read falls back to `info` and says so.
pub fn init(format: LogFormat) {
    let (filter, bad) = match EnvFilter::try_from_default_env() {
        Ok(filter) => (filter, None),
        Err(e) => {
            let bad = std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty()).map(|v| format!("RUST_LOG={v}: {e}"));
            (EnvFilter::new("info"), bad)
        }
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // With the `tracing-log` feature, `try_init` also installs the `log` → tracing bridge.
    let installed = match format {
        LogFormat::Text => {
            builder.with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()).try_init()
        }
        LogFormat::Json => builder.json().with_current_span(false).with_span_list(false).try_init(),
    };
    if let Err(e) = installed {
        eprintln!("observer: cannot install the logger: {e}");
    }
    if let Some(bad) = bad {
        tracing::warn!("{bad}; logging at info");
    }
}
