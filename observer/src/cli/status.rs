//! `observer status`.

use anyhow::Context as _;
use clap::Args;
use observer::api::{STATUS_PATH, StatusReport};

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Base URL of a running daemon.
    #[arg(long, value_name = "URL", default_value_t = format!("http://127.0.0.1:{}", super::DEFAULT_PORT), env = "OBSERVER_ENDPOINT")]
    pub endpoint: String,
    /// Print the daemon's JSON as it is.
    #[arg(long)]
    pub json: bool,
    /// How long to wait for the daemon's answer.
    #[arg(long, value_name = "DURATION", default_value = super::DEFAULT_TIMEOUT, value_parser = super::parse_timeout)]
    pub timeout: std::time::Duration,
}

pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let body = super::get(&args.endpoint, STATUS_PATH, args.timeout)?;
    let status: StatusReport = serde_json::from_str(&body).with_context(|| {
        format!(
            "{}{STATUS_PATH} answered, but not with observer's status JSON (is it an observer daemon?)",
            args.endpoint
        )
    })?;
    if args.json {
        println!("{body}");
        return Ok(());
    }
    print!("{}", render(&status));
    Ok(())
}

fn render(s: &StatusReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "observer {} ({}) on kernel {}, up {:.0}s, {}",
        s.version,
        s.revision,
        s.kernel,
        s.uptime_seconds,
        if s.ready { "ready" } else { "starting" }
    );
    // The kernel's cost per run, when it counts (`--probe-stats`, `kernel.bpf_stats_enabled`).
    let counted = s.probes.iter().any(|p| p.runs.is_some());
    if counted {
        let _ = writeln!(out, "\nPROBE                 STATE                RUNS   NS/RUN  ATTACH");
    } else {
        let _ = writeln!(out, "\nPROBE                 STATE        ATTACH");
    }
    for p in &s.probes {
        let error = p.error.as_ref().map(|e| format!("  ({e})")).unwrap_or_default();
        if counted {
            let runs = p.runs.map_or_else(|| "-".to_string(), |n| n.to_string());
            let ns = p.ns_per_run.map_or_else(|| "-".to_string(), |ns| format!("{ns:.0}"));
            let _ = writeln!(out, "{:<21} {:<12} {runs:>12} {ns:>8}  {}{error}", p.probe, p.state, p.attach);
        } else {
            let _ = writeln!(out, "{:<21} {:<12} {}{error}", p.probe, p.state, p.attach);
        }
    }
    let _ = writeln!(
        out,
        "\nEVENTS  seen {}  lost {}  unattributed {}  paired {}",
        s.events.seen, s.events.lost, s.events.unattributed, s.events.paired
    );
    for (probe, n) in &s.events.seen_by_probe {
        let _ = writeln!(out, "  {probe:<21} {n}");
    }
    let rt = &s.container_runtime;
    let runtime = match rt.state.as_str() {
        "connected" => format!("{} {} on {}", rt.runtime, rt.version, rt.socket),
        "unreachable" => {
            format!("unreachable on {} ({})", rt.socket, rt.error.as_deref().unwrap_or("not answered yet"))
        }
        _ => "none found (container ids only; --cri-socket)".to_string(),
    };
    let _ = writeln!(out, "\nCONTAINER RUNTIME  {runtime}; {} containers seen, {} named", rt.containers, rt.pods_named);
    for d in &s.degraded {
        let _ = writeln!(out, "degraded: {d}");
    }
    if !s.recent_premature.is_empty() {
        let _ = writeln!(out, "\nRECENT PREMATURE CLOSES (newest last)");
        for r in &s.recent_premature {
            let _ = writeln!(out, "  {}", super::events::render(r));
        }
    }
    out
}
