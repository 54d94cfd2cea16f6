//! Where the cost goes, measured after the benchmarks proper (nothing here is in their numbers):
//! what each kernel program costs per connection under the churn load, for observer and for the
//! counting bpftrace script, from the kernel's own BPF run-time statistics.
//!
//! `kernel.bpf_stats_enabled` makes the kernel time every BPF program run (adding a little to
//! each), so it is switched on only for these runs and restored afterwards. Each program's
//! `run_cnt` and `run_time_ns` are read from the tool's own file descriptors
//! (`/proc/PID/fdinfo`), so programs other processes load at the same time are not mixed in.
use std::{fs, process::Command};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use super::{
    Plan, Setup, daemon,
    tools::Tool,
    worker::{Command as Load, Worker},
};
use observer_testkit::process as cmd;

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProgramCost {
    pub name: String,
    pub runs_per_connection: f64,
    /// Mean time of one run.
    pub mean_ns: f64,
    pub ns_per_connection: f64,
    /// The program's size as the verifier saw it (`bpftool prog show`: `verified_insns`,
    /// `bytes_xlated`, `bytes_jited`), so a regression in program size shows; 0 if not shown.
    #[serde(default)]
    pub verified_insns: u64,
    #[serde(default)]
    pub bytes_xlated: u64,
    #[serde(default)]
    pub bytes_jited: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ToolCost {
    pub tool: String,
    pub connections: u64,
    pub programs: Vec<ProgramCost>,
    pub ns_per_connection: f64,
    /// Length of the churn run.
    pub seconds: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Diagnostics {
    pub churn_programs: Vec<ToolCost>,
}

pub fn run(setup: &Setup, plan: &Plan) -> Result<Diagnostics> {
    let previous = fs::read_to_string(BPF_STATS).with_context(|| format!("reading {BPF_STATS}"))?.trim().to_string();
    fs::write(BPF_STATS, "1").with_context(|| format!("enabling {BPF_STATS}"))?;
    let result = ["observer", "observer-http", "observer-tracepoint", "observer-storage", "bpftrace"]
        .into_iter()
        .map(|tool| measure(setup, plan, tool).with_context(|| format!("BPF program costs of {tool}")))
        .collect::<Result<Vec<_>>>();
    // Restored whatever happened above.
    fs::write(BPF_STATS, &previous).with_context(|| format!("restoring {BPF_STATS} to {previous}"))?;
    Ok(Diagnostics { churn_programs: result? })
}

fn measure(setup: &Setup, plan: &Plan, tool: &str) -> Result<ToolCost> {
    let mut worker = Worker::spawn("bench-diag")?;
    let (pid, stop): (u32, Box<dyn FnOnce() -> Result<()>>) = match tool {
        "observer" | "observer-http" | "observer-tracepoint" | "observer-storage" => {
            let args = super::churn::observer_args(tool, &worker.netns.display().to_string());
            let daemon = daemon::start(&setup.observer, &args)?;
            (daemon.pid, Box::new(move || daemon.stop()))
        }
        _ => {
            let bpftrace = Tool::bpftrace()?;
            (bpftrace.pid, Box::new(move || bpftrace.stop().map(drop)))
        }
    };
    let before = program_stats(pid)?;
    let outcome = worker.run(
        &Load::Churn {
            warmup_ms: 0,
            duration_ms: (plan.diagnose_seconds * 1000.0) as u64,
            clients: plan.churn_clients,
            servers: plan.churn_servers,
        },
        |_| Ok(()),
    )?;
    let after = program_stats(pid)?;
    // Named while the tool still holds them: its programs go when it stops.
    let names: Vec<ProgramShown> = after.iter().map(|(id, _, _)| program_shown(*id)).collect();
    stop()?;
    let connections = outcome.total.connections().max(1);
    let programs: Vec<ProgramCost> = after
        .iter()
        .zip(names)
        .filter_map(|((id, runs, ns), shown)| {
            let (runs0, ns0) = before.iter().find(|b| b.0 == *id).map_or((0, 0), |b| (b.1, b.2));
            let (runs, ns) = (runs - runs0, ns - ns0);
            (runs > 0).then(|| ProgramCost {
                name: shown.name,
                verified_insns: shown.verified_insns,
                bytes_xlated: shown.bytes_xlated,
                bytes_jited: shown.bytes_jited,
                runs_per_connection: runs as f64 / connections as f64,
                mean_ns: ns as f64 / runs as f64,
                ns_per_connection: ns as f64 / connections as f64,
            })
        })
        .collect();
    Ok(ToolCost {
        tool: tool.into(),
        connections,
        ns_per_connection: programs.iter().map(|p| p.ns_per_connection).sum(),
        programs,
        seconds: outcome.seconds,
    })
}

/// (prog id, run_cnt, run_time_ns) of every BPF program `pid` holds a descriptor of.
fn program_stats(pid: u32) -> Result<Vec<(u64, u64, u64)>> {
    let dir = format!("/proc/{pid}/fd");
    let mut stats = Vec::new();
    for fd in fs::read_dir(&dir).with_context(|| format!("reading {dir}"))?.filter_map(std::result::Result::ok) {
        if !fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:bpf-prog") {
            continue;
        }
        let info =
            fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_string_lossy())).unwrap_or_default();
        let field =
            |name: &str| info.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse::<u64>().ok());
        if let (Some(id), Some(runs), Some(ns)) = (field("prog_id:"), field("run_cnt:"), field("run_time_ns:")) {
            // A program can be held by several descriptors: count it once.
            if !stats.iter().any(|s: &(u64, u64, u64)| s.0 == id) {
                stats.push((id, runs, ns));
            }
        }
    }
    Ok(stats)
}

/// What `bpftool prog show` says of a program.
struct ProgramShown {
    name: String,
    verified_insns: u64,
    bytes_xlated: u64,
    bytes_jited: u64,
}

/// The program's name (else its id) and sizes as `bpftool` reports them. The verifier's
/// instruction count comes from the kernel's program info directly (5.16+): bpftool before 7.2
/// (Debian 12 has 7.1) does not print it.
fn program_shown(id: u64) -> ProgramShown {
    let v = cmd::stdout(Command::new("bpftool").args(["-j", "prog", "show", "id", &id.to_string()]))
        .ok()
        .and_then(|json| serde_json::from_str::<serde_json::Value>(&json).ok())
        .unwrap_or_default();
    let verified_insns = v["verified_insns"].as_u64().or_else(|| verified_instructions(id)).unwrap_or(0);
    ProgramShown {
        name: v["name"].as_str().map_or_else(|| format!("prog {id}"), String::from),
        verified_insns,
        bytes_xlated: v["bytes_xlated"].as_u64().unwrap_or(0),
        bytes_jited: v["bytes_jited"].as_u64().unwrap_or(0),
    }
}

/// `verified_insns` of program `id` from `BPF_OBJ_GET_INFO_BY_FD`, if the kernel reports it.
fn verified_instructions(id: u64) -> Option<u64> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| u64::from(p.id()) == id)
        .and_then(|p| p.verified_instruction_count())
        .map(u64::from)
}
