//! Connection churn: how many loopback connections per second the machine makes with nothing
//! watching, with observer, with a counting bpftrace script and with tcplife.
//!
//! Every run of a tool is bracketed by runs with nothing attached (none, observer, none, bpftrace,
//! none, tcplife, none, ...; the tools' order rotates each round), and compared with the mean of
//! the two baselines around it: on a shared machine other load comes and goes, and a baseline
//! measured minutes apart would compare unlike conditions. Each run gets a fresh load generator
//! in a fresh network namespace, so no run inherits the previous one's TIME_WAIT sockets.
use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use super::{
    Check, Plan, Setup,
    daemon::{self, Daemon, Measured as _},
    procfs::{self, CpuSample, CpuUse},
    tools::{Tool, ToolReport},
    worker::{Command, Mark, Worker},
};

/// `observer`: the default back end (`auto`: BTF tracepoints on kernels that allow them);
/// `observer-http`: the same with the HTTP capture (`--http`; the load's graceful connections
/// are HTTP/1.1 exchanges, so every one is captured); `observer-tracepoint`: every hook on the
/// classic tracepoints (`--probes tracepoint`), the back end before BTF tracepoints;
/// `observer-storage`: the default back end with its per-socket state in socket-local storage
/// (`--socket-store storage`) instead of the hash map; for comparison on the same machine in the
/// same run.
pub const ARMS: [&str; 7] =
    ["none", "observer", "observer-http", "observer-tracepoint", "observer-storage", "bpftrace", "tcplife"];
/// The arms compared with the baseline.
const TOOLS: [&str; 6] =
    ["observer", "observer-http", "observer-tracepoint", "observer-storage", "bpftrace", "tcplife"];

/// The load generator's name in this benchmark (its `comm`).
const LOAD: &str = "bench-churn";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArmRun {
    pub arm: String,
    pub round: usize,
    pub loadavg_before: String,
    /// Other processes holding BPF programs during the run (`pid comm`).
    #[serde(default)]
    pub other_bpf: Vec<String>,
    pub seconds: f64,
    pub connections: u64,
    pub per_second: f64,
    pub cpu: CpuUse,
    pub generator_errors: u64,
    /// observer arm: its event counts against what the generator did.
    pub checks: Vec<Check>,
    pub events_lost: Option<u64>,
    /// bpftrace / tcplife arms: what the tool printed.
    pub tool_output: Option<ToolReport>,
    /// Tool runs: the mean rate of the baseline runs just before and just after.
    #[serde(default)]
    pub baseline: Option<f64>,
    /// Tool runs: `per_second` over `baseline`.
    #[serde(default)]
    pub ratio: Option<f64>,
    /// Tool runs: how far apart the two baselines were (|before − after| / mean); large when
    /// other load changed during the bracket.
    #[serde(default)]
    pub baseline_spread: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArmSummary {
    pub arm: String,
    pub runs: usize,
    /// All its connections over all its seconds.
    pub per_second: f64,
    pub min: f64,
    pub max: f64,
    /// `per_second` over the no-observer arm's (all runs pooled; sensitive to other load that
    /// came and went, see `median_ratio`).
    pub ratio: f64,
    /// Each run's rate over its bracketing baselines' mean, in run order.
    pub run_ratios: Vec<f64>,
    /// The median of `run_ratios`: the comparison the targets are judged on.
    pub median_ratio: f64,
    /// Mean CPU of the tool's own process, in cores.
    pub tool_cores: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Churn {
    pub seconds_per_run: f64,
    pub warmup_seconds: f64,
    pub rounds: usize,
    pub clients: usize,
    pub servers: usize,
    pub runs: Vec<ArmRun>,
    pub summary: Vec<ArmSummary>,
}

pub fn run(setup: &Setup, plan: &Plan) -> Result<Churn> {
    // none, tool, none, tool, ..., none: every tool run sits between two baselines.
    let mut order = Vec::new();
    for round in 0..plan.churn_rounds {
        for i in 0..TOOLS.len() {
            order.push(("none", round));
            order.push((TOOLS[(round + i) % TOOLS.len()], round));
        }
    }
    order.push(("none", plan.churn_rounds.saturating_sub(1)));
    let mut runs = Vec::new();
    for (arm, round) in order {
        let run = run_arm(setup, plan, arm, round).with_context(|| format!("churn, arm {arm}, round {}", round + 1))?;
        if !run.other_bpf.is_empty() {
            println!(
                "observer bench: warning: other processes hold BPF programs during this run: {}",
                run.other_bpf.join(", ")
            );
        }
        println!(
            "observer bench: churn round {} {arm:>8}: {:>8.0} connections/s (load average before: {}; CPU in cores: machine {:.2}, generator {:.2}, tool {:.2}, other {:.2})",
            round + 1,
            run.per_second,
            run.loadavg_before,
            run.cpu.machine,
            run.cpu.load,
            run.cpu.tool,
            run.cpu.other
        );
        runs.push(run);
    }
    bracket(&mut runs);
    let summary = summarize(&runs);
    Ok(Churn {
        seconds_per_run: plan.churn_seconds,
        warmup_seconds: plan.warmup_seconds,
        rounds: plan.churn_rounds,
        clients: plan.churn_clients,
        servers: plan.churn_servers,
        runs,
        summary,
    })
}

/// The tool under test in one arm.
enum Watcher {
    Nothing,
    Observer(Daemon),
    Tool(Tool),
}

impl Watcher {
    fn pid(&self) -> Option<u32> {
        match self {
            Watcher::Nothing => None,
            Watcher::Observer(d) => Some(d.pid),
            Watcher::Tool(t) => Some(t.pid),
        }
    }
}

fn run_arm(setup: &Setup, plan: &Plan, arm: &str, round: usize) -> Result<ArmRun> {
    let mut worker = Worker::spawn(LOAD)?;
    let watcher = match arm {
        "observer" | "observer-http" | "observer-tracepoint" | "observer-storage" => {
            Watcher::Observer(daemon::start(&setup.observer, &observer_args(arm, &worker.netns.display().to_string()))?)
        }
        "bpftrace" => Watcher::Tool(Tool::bpftrace()?),
        "tcplife" => Watcher::Tool(Tool::tcplife(&setup.tcplife)?),
        _ => Watcher::Nothing,
    };
    let before_metrics = match &watcher {
        Watcher::Observer(d) => Some(d.metrics()?),
        _ => None,
    };
    let loadavg_before = procfs::loadavg();
    let other_bpf = procfs::other_bpf_holders(&[worker.pid, watcher.pid().unwrap_or(0)]);
    let command = Command::Churn {
        warmup_ms: (plan.warmup_seconds * 1000.0) as u64,
        duration_ms: (plan.churn_seconds * 1000.0) as u64,
        clients: plan.churn_clients,
        servers: plan.churn_servers,
    };
    let (load_pid, tool_pid) = (worker.pid, watcher.pid());
    let mut start = None;
    let mut cpu = CpuUse::default();
    let outcome = worker.run(&command, |mark| {
        match mark {
            Mark::Start => start = Some(CpuSample::now(load_pid, tool_pid)?),
            Mark::End => {
                if let Some(start) = &start {
                    cpu = start.until(&CpuSample::now(load_pid, tool_pid)?);
                }
            }
        }
        Ok(())
    })?;
    let mut checks = Vec::new();
    let mut events_lost = None;
    let mut tool_output = None;
    match watcher {
        Watcher::Observer(daemon) => {
            let after = daemon.settled()?;
            let before = before_metrics.unwrap_or_default();
            let lost = after.events_lost() - before.events_lost();
            events_lost = Some(lost);
            let closes = |m: &super::daemon::Metrics| m.sum("observer_tcp_closes_total", &[("comm", LOAD)]);
            checks.push(Check::new(
                format!("observer_tcp_closes_total{{comm=\"{LOAD}\"}} = 2 per connection"),
                outcome.total.closes(),
                closes(&after) - closes(&before),
            ));
            daemon.stop()?;
        }
        Watcher::Tool(tool) => tool_output = Some(tool.stop()?),
        Watcher::Nothing => {}
    }
    drop(worker);
    let connections = outcome.window.connections();
    Ok(ArmRun {
        arm: arm.to_string(),
        round,
        loadavg_before,
        other_bpf,
        seconds: outcome.seconds,
        connections,
        per_second: connections as f64 / outcome.seconds,
        cpu,
        generator_errors: outcome.errors,
        checks,
        events_lost,
        tool_output,
        baseline: None,
        ratio: None,
        baseline_spread: None,
    })
}

/// The daemon's arguments in arm `arm` (`observer`, `observer-http`, `observer-tracepoint`,
/// `observer-storage`), watching `netns`.
pub fn observer_args(arm: &str, netns: &str) -> Vec<String> {
    let mut args = vec!["--netns".to_string(), netns.to_string()];
    match arm {
        "observer-tracepoint" => args.extend(["--probes".to_string(), "tracepoint".to_string()]),
        "observer-http" => args.push("--http".to_string()),
        "observer-storage" => args.extend(["--socket-store".to_string(), "storage".to_string()]),
        _ => {}
    }
    args
}

/// Sets each tool run's baseline: the mean of the baseline runs next to it.
fn bracket(runs: &mut [ArmRun]) {
    for i in 0..runs.len() {
        if runs[i].arm == "none" {
            continue;
        }
        let before = runs[..i].iter().rev().find(|r| r.arm == "none").map(|r| r.per_second);
        let after = runs[i + 1..].iter().find(|r| r.arm == "none").map(|r| r.per_second);
        let (baseline, spread) = match (before, after) {
            (Some(b), Some(a)) => ((a + b) / 2.0, Some((a - b).abs() / ((a + b) / 2.0))),
            (Some(x), None) | (None, Some(x)) => (x, None),
            (None, None) => continue,
        };
        runs[i].baseline = Some(baseline);
        runs[i].baseline_spread = spread;
        runs[i].ratio = (baseline > 0.0).then(|| runs[i].per_second / baseline);
    }
}

fn summarize(runs: &[ArmRun]) -> Vec<ArmSummary> {
    let pooled = |arm: &str| {
        let of: Vec<&ArmRun> = runs.iter().filter(|r| r.arm == arm).collect();
        let connections: u64 = of.iter().map(|r| r.connections).sum();
        let seconds: f64 = of.iter().map(|r| r.seconds).sum();
        (of, if seconds > 0.0 { connections as f64 / seconds } else { 0.0 })
    };
    let (_, baseline) = pooled("none");
    ARMS.iter()
        .map(|&arm| {
            let (of, per_second) = pooled(arm);
            let rates: Vec<f64> = of.iter().map(|r| r.per_second).collect();
            let run_ratios: Vec<f64> =
                if arm == "none" { vec![1.0; of.len()] } else { of.iter().filter_map(|r| r.ratio).collect() };
            ArmSummary {
                arm: arm.to_string(),
                runs: of.len(),
                per_second,
                min: rates.iter().copied().fold(f64::INFINITY, f64::min),
                max: rates.iter().copied().fold(0.0, f64::max),
                ratio: if baseline > 0.0 { per_second / baseline } else { 0.0 },
                median_ratio: median(&run_ratios),
                run_ratios,
                tool_cores: if of.is_empty() {
                    0.0
                } else {
                    of.iter().map(|r| r.cpu.tool).sum::<f64>() / of.len() as f64
                },
            }
        })
        .collect()
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(arm: &str, per_second: f64) -> ArmRun {
        ArmRun {
            arm: arm.into(),
            round: 0,
            loadavg_before: String::new(),
            other_bpf: Vec::new(),
            seconds: 1.0,
            connections: per_second as u64,
            per_second,
            cpu: CpuUse::default(),
            generator_errors: 0,
            checks: Vec::new(),
            events_lost: None,
            tool_output: None,
            baseline: None,
            ratio: None,
            baseline_spread: None,
        }
    }

    #[test]
    fn tool_runs_are_compared_with_the_baselines_around_them() {
        let mut runs = vec![
            run("none", 100.0),
            run("observer", 90.0),
            run("none", 80.0),
            run("bpftrace", 40.0),
            run("none", 40.0),
        ];
        bracket(&mut runs);
        assert_eq!(runs[1].ratio, Some(1.0));
        assert_eq!(runs[3].ratio, Some(2.0 / 3.0));
        assert_eq!(runs[3].baseline_spread, Some(40.0 / 60.0));
        let summary = summarize(&runs);
        assert_eq!(summary[1].median_ratio, 1.0);
        assert_eq!(median(&[3.0, 1.0, 2.0, 10.0]), 2.5);
    }
}
