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
    // Probe names differ in length between back ends (`btf_inet_sock_set_state`): the column is
    // as wide as the longest.
    let width = s.probes.iter().map(|p| p.probe.len()).chain(s.events.seen_by_probe.keys().map(String::len)).max();
    let width = width.unwrap_or(0).max("PROBE".len());
    // The kernel's cost per run, when it counts (`--probe-stats`, `kernel.bpf_stats_enabled`).
    let counted = s.probes.iter().any(|p| p.runs.is_some());
    if counted {
        let _ = writeln!(out, "\n{:<width$} {:<12} {:>12} {:>8}  ATTACH", "PROBE", "STATE", "RUNS", "NS/RUN");
    } else {
        let _ = writeln!(out, "\n{:<width$} {:<12} ATTACH", "PROBE", "STATE");
    }
    for p in &s.probes {
        let error = p.error.as_ref().map(|e| format!("  ({e})")).unwrap_or_default();
        if counted {
            let runs = p.runs.map_or_else(|| "-".to_string(), |n| n.to_string());
            let ns = p.ns_per_run.map_or_else(|| "-".to_string(), |ns| format!("{ns:.0}"));
            let _ = writeln!(out, "{:<width$} {:<12} {runs:>12} {ns:>8}  {}{error}", p.probe, p.state, p.attach);
        } else {
            let _ = writeln!(out, "{:<width$} {:<12} {}{error}", p.probe, p.state, p.attach);
        }
    }
    let _ = writeln!(
        out,
        "\nEVENTS  seen {}  lost {}  unattributed {}  paired {}",
        s.events.seen, s.events.lost, s.events.unattributed, s.events.paired
    );
    for (probe, n) in &s.events.seen_by_probe {
        let _ = writeln!(out, "  {probe:<width$} {n}");
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The BTF back end's probe names are longer than the others': every column still lines up.
    #[test]
    fn probe_columns_line_up_for_the_longest_probe_name() {
        let status: StatusReport = serde_json::from_value(serde_json::json!({
            "version": "0.1.0", "revision": "abc", "kernel": "6.18", "uptime_seconds": 3.0, "ready": true,
            "probes": [
                {"probe": "btf_inet_sock_set_state", "attach": "tp_btf/inet_sock_set_state", "state": "attached",
                 "runs": 260, "ns_per_run": 456.5},
                {"probe": "sys_exit_accept", "attach": "tracepoint/syscalls/sys_exit_accept", "state": "attached",
                 "runs": 0},
            ],
            "degraded": [], "series": 0, "series_folded": 0,
            "events": {"seen": 3, "seen_by_probe": {"btf_inet_sock_set_state": 2, "sys_exit_accept": 1},
                       "lost": 0, "unattributed": 0},
        }))
        .unwrap();
        let text = render(&status);
        let lines: Vec<&str> = text.lines().collect();
        let header = lines.iter().position(|l| l.starts_with("PROBE")).unwrap();
        let table = &lines[header..header + 3];
        for column in ["STATE", "ATTACH"] {
            let at = table[0].find(column).unwrap();
            for row in &table[1..] {
                assert_ne!(row.as_bytes()[at - 1], b'_', "{column} column cut into a name: {row:?}");
                assert_eq!(row.as_bytes()[at - 1], b' ', "{column} column misaligned: {row:?}");
                assert_ne!(row.as_bytes()[at], b' ', "{column} column misaligned: {row:?}");
            }
        }
        let seen: Vec<&&str> = lines.iter().filter(|l| l.starts_with("  btf_") || l.starts_with("  sys_")).collect();
        assert_eq!(seen.len(), 2);
        let counts_at: Vec<usize> = seen.iter().map(|l| l.rfind(' ').unwrap()).collect();
        assert_eq!(counts_at[0], counts_at[1], "event counts misaligned: {seen:?}");
    }
}
