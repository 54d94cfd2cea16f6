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

/// GETs `path` from the daemon at `endpoint`; a daemon that cannot be reached is one clear error
/// saying what to do.
pub fn get(endpoint: &str, path: &str) -> anyhow::Result<String> {
    let base = endpoint.trim_end_matches('/');
    let agent: ureq::Agent =
        ureq::Agent::config_builder().timeout_global(Some(std::time::Duration::from_secs(5))).build().into();
    agent.get(&format!("{base}{path}")).call().and_then(|mut response| response.body_mut().read_to_string()).map_err(|e| {
        anyhow::anyhow!("cannot reach an observer daemon at {base}: {e}; is it running (`observer run`)? Point at it with --endpoint URL")
    })
}

/// GETs `path` from the daemon at `endpoint`, waiting at most `timeout`: one error line when it
/// cannot be reached, is slow, or answers other than 200.
pub fn get_within(endpoint: &str, path: &str, timeout: std::time::Duration) -> anyhow::Result<String> {
    let base = endpoint.trim_end_matches('/');
    let agent: ureq::Agent =
        ureq::Agent::config_builder().timeout_global(Some(timeout)).http_status_as_error(false).build().into();
    let mut response = agent.get(&format!("{base}{path}")).call().map_err(|e| {
        anyhow::anyhow!("cannot reach an observer daemon at {base} within {timeout:?}: {e}; is it running (`observer run`)? Point at it with --endpoint URL")
    })?;
    let status = response.status();
    let body = response.body_mut().read_to_string().map_err(|e| anyhow::anyhow!("reading {base}{path}: {e}"))?;
    if status != 200 {
        anyhow::bail!("{base}{path} answered {status}: {}", body.lines().next().unwrap_or_default());
    }
    Ok(body)
}
