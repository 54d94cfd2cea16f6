//! Connection churn: how many loopback connections per second the machine makes with nothing
//! watching, with observer, with a counting bpftrace script and with tcplife.
//!
//! The arms run one after another, round after round, each round in a different order
//! (ABCD, BCDA, ...), so slow drifts in the machine's other load fall on every arm alike. Each
//! arm run gets a fresh load generator in a fresh network namespace, so no run inherits the
//! previous one's TIME_WAIT sockets.
use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use super::{
    Check, Plan, Setup,
    daemon::Daemon,
    procfs::{self, CpuSample, CpuUse},
    tools::{Tool, ToolReport},
    worker::{Command, Mark, Worker},
};

pub const ARMS: [&str; 4] = ["none", "observer", "bpftrace", "tcplife"];

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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArmSummary {
    pub arm: String,
    pub runs: usize,
    /// All its connections over all its seconds.
    pub per_second: f64,
    pub min: f64,
    pub max: f64,
    /// `per_second` over the no-observer arm's.
    pub ratio: f64,
    /// Per round: this arm's rate over the no-observer arm's rate in the same round.
    pub round_ratios: Vec<f64>,
    /// The median of `round_ratios` (less sensitive to a burst of other load in one run).
    pub median_round_ratio: f64,
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
    let mut runs = Vec::new();
    for round in 0..plan.churn_rounds {
        for i in 0..ARMS.len() {
            let arm = ARMS[(round + i) % ARMS.len()];
            let run = run_arm(setup, plan, arm, round)
                .with_context(|| format!("churn, arm {arm}, round {}", round + 1))?;
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
    }
    let summary = summarize(&runs, plan.churn_rounds);
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
        "observer" => Watcher::Observer(Daemon::start(
            &setup.observer,
            &["--netns".into(), worker.netns.display().to_string()],
        )?),
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
            let closes =
                |m: &super::daemon::Metrics| m.sum("observer_tcp_closes_total", &[("comm", LOAD)]);
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
    })
}

fn summarize(runs: &[ArmRun], rounds: usize) -> Vec<ArmSummary> {
    let rate_of = |arm: &str, round: usize| {
        runs.iter()
            .find(|r| r.arm == arm && r.round == round)
            .map(|r| r.per_second)
    };
    let pooled = |arm: &str| {
        let of: Vec<&ArmRun> = runs.iter().filter(|r| r.arm == arm).collect();
        let connections: u64 = of.iter().map(|r| r.connections).sum();
        let seconds: f64 = of.iter().map(|r| r.seconds).sum();
        (
            of,
            if seconds > 0.0 {
                connections as f64 / seconds
            } else {
                0.0
            },
        )
    };
    let (_, baseline) = pooled("none");
    ARMS.iter()
        .map(|&arm| {
            let (of, per_second) = pooled(arm);
            let rates: Vec<f64> = of.iter().map(|r| r.per_second).collect();
            let round_ratios: Vec<f64> = (0..rounds)
                .filter_map(|r| Some(rate_of(arm, r)? / rate_of("none", r)?))
                .collect();
            let mut sorted = round_ratios.clone();
            sorted.sort_by(f64::total_cmp);
            let median_round_ratio = match sorted.len() {
                0 => 0.0,
                n if n % 2 == 1 => sorted[n / 2],
                n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
            };
            ArmSummary {
                arm: arm.to_string(),
                runs: of.len(),
                per_second,
                min: rates.iter().copied().fold(f64::INFINITY, f64::min),
                max: rates.iter().copied().fold(0.0, f64::max),
                ratio: if baseline > 0.0 {
                    per_second / baseline
                } else {
                    0.0
                },
                round_ratios,
                median_round_ratio,
                tool_cores: if of.is_empty() {
                    0.0
                } else {
                    of.iter().map(|r| r.cpu.tool).sum::<f64>() / of.len() as f64
                },
            }
        })
        .collect()
}
