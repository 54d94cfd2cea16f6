//! The `observer` command line: one subcommand per file.

pub mod config;
pub mod docs;
pub mod events;
pub mod logging;
pub mod run;
pub mod status;
pub mod top;

use clap::{Parser, Subcommand};

/// The default address of the daemon's HTTP endpoint.
pub const DEFAULT_PORT: u16 = 9645;

#[derive(Debug, Parser)]
#[command(
    name = "observer",
    version,
    about = "eBPF TCP connection observer: who resets and prematurely closes connections, with whom, and how"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the probes and serve /metrics, /healthz and /api/v1/status until SIGINT/SIGTERM.
    Run(run::RunArgs),
    /// Show a running daemon's probes and event counts.
    Status(status::StatusArgs),
    /// Print a running daemon's recent resets and premature closes (with --follow, as they happen).
    Events(events::EventsArgs),
    /// Show the rows with the most resets, premature closes or closes per second, live.
    Top(top::TopArgs),
    /// Print a shell completion script for observer on stdout.
    Completions(docs::CompletionsArgs),
    /// Print observer's man page (roff) on stdout: `observer man | man -l -`.
    Man,
}

/// The default of `--timeout`.
pub const DEFAULT_TIMEOUT: &str = "5s";

/// GETs `path` from the daemon at `endpoint`, waiting at most `timeout`; every way that fails
/// is one clear error saying what to do: nothing listening, no answer in time, an error status
/// (with the daemon's message).
pub fn get(endpoint: &str, path: &str, timeout: std::time::Duration) -> anyhow::Result<String> {
    let base = endpoint.trim_end_matches('/');
    let agent: ureq::Agent =
        ureq::Agent::config_builder().timeout_global(Some(timeout)).http_status_as_error(false).build().into();
    let url = format!("{base}{path}");
    let unreachable = |e: &dyn std::fmt::Display| {
        anyhow::anyhow!(
            "cannot reach an observer daemon at {base}: {e}; is observer run running? Point at it with --endpoint URL"
        )
    };
    let mut response = match agent.get(&url).call() {
        Ok(r) => r,
        Err(ureq::Error::Timeout(_)) => {
            anyhow::bail!(
                "the observer daemon at {base} did not answer within {} (--timeout)",
                humantime::format_duration(timeout)
            )
        }
        Err(e @ (ureq::Error::Io(_) | ureq::Error::ConnectionFailed | ureq::Error::HostNotFound)) => {
            return Err(unreachable(&e));
        }
        Err(e @ (ureq::Error::BadUri(_) | ureq::Error::Http(_))) => anyhow::bail!("--endpoint {base}: {e}"),
        Err(e) => anyhow::bail!("{url} answered, but not with observer's HTTP ({e}): is it an observer daemon?"),
    };
    let status = response.status();
    let body = match response.body_mut().read_to_string() {
        Ok(body) => body,
        Err(ureq::Error::Timeout(_)) => {
            anyhow::bail!(
                "the observer daemon at {base} did not answer within {} (--timeout)",
                humantime::format_duration(timeout)
            )
        }
        Err(e) => anyhow::bail!("{url}: reading the answer: {e}"),
    };
    if !status.is_success() {
        let message = serde_json::from_str::<observer::api::ApiError>(&body)
            .map_or_else(|_| body.trim().to_string(), |e| e.error);
        anyhow::bail!("{url} answered {status}: {message}");
    }
    Ok(body)
}

/// `--timeout`: a duration such as `5s`, `500ms`.
pub fn parse_timeout(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{text:?} is not a duration such as 5s or 500ms: {e}"))
}
