//! The `observer` command line: one subcommand per file.

pub mod config;
pub mod docs;
pub mod events;
pub mod logging;
pub mod run;
pub mod status;

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
