//! `observer status`.

use anyhow::Context as _;
use clap::Args;
use observer::api::{ConfigSetting, STATUS_PATH, StatusReport};

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
    out.push_str(&render_config(&s.config));
    if !s.recent_premature.is_empty() {
        let _ = writeln!(out, "\nRECENT PREMATURE CLOSES (newest last)");
        for r in &s.recent_premature {
            let _ = writeln!(out, "  {}", super::events::render(r));
        }
    }
    out
}

/// The effective configuration, one line per source (`flag`, `env`, `file`, `default`) of
/// `key=value` pairs; options that are not set are left out.
fn render_config(config: &std::collections::BTreeMap<String, ConfigSetting>) -> String {
    use std::fmt::Write as _;
    if config.is_empty() {
        return String::new();
    }
    let file = config.get("config").and_then(|c| c.value.as_deref().map(|v| format!(" (file {v}, from {})", c.source)));
    let mut out = format!("\nCONFIG{}\n", file.unwrap_or_default());
    for source in ["flag", "env", "file", "default"] {
        let mut line = format!("  {source:<8}");
        let mut width = line.len();
        for (key, setting) in config.iter().filter(|(k, c)| c.source == source && k.as_str() != "config") {
            let Some(value) = &setting.value else { continue };
            let pair = format!(" {key}={value}");
            if width + pair.len() > 100 && width > 10 {
                let _ = write!(line, "\n{:10}", "");
                width = 10;
            }
            width += pair.len();
            line.push_str(&pair);
        }
        if line.len() > 10 {
            let _ = writeln!(out, "{line}");
        }
    }
    out
}
