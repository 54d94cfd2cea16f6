//! The `observer` command line: one subcommand per file.

pub mod events;
pub mod run;
pub mod status;

use clap::{Parser, Subcommand};

/// The default address of the daemon's HTTP endpoint.
pub const DEFAULT_PORT: u16 = 9645;

#[derive(Debug, Parser)]
#[command(name = "observer", version, about = "eBPF TCP connection observer: who resets and prematurely closes connections, with whom, and how")]
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
}
