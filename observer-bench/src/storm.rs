//! Reset storm: RSTs as fast as the machine makes them (connects to a closed port, SO_LINGER 0
//! aborts), against a running daemon; every event must be seen or counted as lost.
//!
//! Before the all-out run, a sweep at paced rates (50,000 events/s and up, until events are lost
//! or the machine cannot make the rate) finds the highest rate the daemon keeps up with: the
//! all-out run alone only says whether it keeps up when the generator takes every core.
use std::time::Instant;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::{
    Check, Plan, count_checks,
    daemon::{Daemon, Measured as _},
    procfs::{self, CpuSample, CpuUse},
    worker::{Command, Mark, Tally, Worker},
};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Storm {
    /// Paced runs, lowest rate first.
    pub sweep: Vec<Run>,
    /// As fast as the generator can.
    pub max: Run,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    /// Events per second the generator was paced at; `None`: as fast as it could.
    pub target_events_per_second: Option<f64>,
    pub seconds: f64,
    pub refused_threads: usize,
    pub linger_threads: usize,
    /// Connections made inside the measured window, by kind.
    pub window: Tally,
    /// All connections of the run (warm-up and wind-down too): what the daemon must account for.
    pub total: Tally,
    /// RSTs made (sent, and received by the other end) in the window, per second.
    pub resets_per_second: f64,
    /// Kernel events the window's traffic makes, per second (3 per refused connect, 4 per
    /// SO_LINGER 0 connection: RST sent, RST received, the closes).
    pub events_per_second: f64,
    pub resets_made: u64,
    pub events_expected: u64,
    pub events_seen: u64,
    pub events_lost: u64,
    pub events_by_probe: std::collections::BTreeMap<String, u64>,
    /// CPU over the window, in cores.
    pub cpu: CpuUse,
    /// The daemon's CPU time for the whole run, including draining what was left after it.
    pub daemon_cpu_seconds: f64,
    /// Seconds from the end of the traffic until the daemon's counters stopped moving.
    pub drain_seconds: f64,
    /// Percent of one core the daemon needs per 10,000 events/s (its CPU time per event).
    pub core_percent_per_10k: f64,
    /// The daemon's context switches per event in the window: how often it was woken (or
    /// preempted) for each event it handled; near 1 means nearly a wake-up per event.
    #[serde(default)]
    pub daemon_switches_per_event: f64,
    pub checks: Vec<Check>,
    pub generator_errors: u64,
    pub first_generator_error: Option<String>,
}

pub fn run(plan: &Plan, daemon: &Daemon, worker: &mut Worker) -> Result<Storm> {
    let mut sweep = Vec::new();
    for target in plan.storm_sweep.iter().copied() {
        let run = run_once(plan, daemon, worker, Some(target), plan.storm_sweep_seconds)?;
        println!(
            "observer bench: storm paced at {target:.0} events/s: made {:.0} events/s, {} lost, daemon {:.0} % of a core",
            run.events_per_second,
            run.events_lost,
            run.cpu.tool * 100.0
        );
        let stop = run.events_lost > 0 || run.events_per_second < 0.9 * target;
        sweep.push(run);
        if stop {
            break;
        }
    }
    let max = run_once(plan, daemon, worker, None, plan.storm_seconds)?;
    Ok(Storm { sweep, max })
}

fn run_once(plan: &Plan, daemon: &Daemon, worker: &mut Worker, target: Option<f64>, seconds: f64) -> Result<Run> {
    let before = daemon.metrics()?;
    let cpu_before = daemon.cpu_seconds()?;
    let (refused, linger) = (plan.storm_refused_threads, plan.storm_linger_threads);
    // Every thread makes the same number of connections per second: 3 events per refused
    // connect, 4 per SO_LINGER 0 connection.
    let rate = target.map_or(0, |t| (t / (3 * refused + 4 * linger) as f64).ceil() as u64);
    let command = Command::Storm {
        warmup_ms: (plan.warmup_seconds * 1000.0) as u64,
        duration_ms: (seconds * 1000.0) as u64,
        refused,
        linger,
        rate,
    };
    let (load_pid, daemon_pid) = (worker.pid, daemon.pid);
    let mut start = None;
    let mut cpu = CpuUse::default();
    let mut switches = 0;
    let outcome = worker.run(&command, |mark| {
        match mark {
            Mark::Start => {
                start = Some(CpuSample::now(load_pid, Some(daemon_pid))?);
                switches = procfs::context_switches(daemon_pid)?;
            }
            Mark::End => {
                switches = procfs::context_switches(daemon_pid)? - switches;
                if let Some(start) = &start {
                    cpu = start.until(&CpuSample::now(load_pid, Some(daemon_pid))?);
                }
            }
        }
        Ok(())
    })?;
    let traffic_ended = Instant::now();
    let after = daemon.settled()?;
    let drain_seconds = traffic_ended.elapsed().as_secs_f64();
    let daemon_cpu_seconds = daemon.cpu_seconds()? - cpu_before;

    let seen = after.events_seen() - before.events_seen();
    let lost = after.events_lost() - before.events_lost();
    let events_by_probe = after
        .events_by_probe()
        .into_iter()
        .map(|(probe, n)| {
            let earlier = before.events_by_probe().get(&probe).copied().unwrap_or(0);
            (probe, n - earlier)
        })
        .collect();
    let checks = count_checks(&before, &after, &outcome.total, worker.name.as_str());
    let core_percent_per_10k = if seen > 0 { daemon_cpu_seconds / seen as f64 * 10_000.0 * 100.0 } else { 0.0 };
    Ok(Run {
        target_events_per_second: target,
        seconds: outcome.seconds,
        refused_threads: plan.storm_refused_threads,
        linger_threads: plan.storm_linger_threads,
        window: outcome.window,
        total: outcome.total,
        resets_per_second: outcome.window.resets() as f64 / outcome.seconds,
        events_per_second: outcome.window.events() as f64 / outcome.seconds,
        resets_made: outcome.total.resets(),
        events_expected: outcome.total.events(),
        events_seen: seen,
        events_lost: lost,
        events_by_probe,
        cpu,
        daemon_cpu_seconds,
        drain_seconds,
        core_percent_per_10k,
        daemon_switches_per_event: switches as f64 / outcome.window.events().max(1) as f64,
        checks,
        generator_errors: outcome.errors,
        first_generator_error: outcome.first_error,
    })
}
