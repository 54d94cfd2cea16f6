//! Footprint: start-up time (spawn → all probes attached and /healthz answering 200) over
//! several starts, and the daemon's resident memory after start, after the storm and after the
//! soak (those three are one daemon's life; see `bench::run`).
use std::{thread, time::Duration};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use super::{
    Plan, Setup,
    daemon::{self, Measured as _},
    procfs::MemoryBreakdown,
};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Startup {
    pub command: String,
    /// Spawn → /healthz 200, per start.
    pub ms: Vec<f64>,
    /// Spawn → the daemon's "ready" log line as read here, per start (a cross-check).
    pub ready_logged_ms: Vec<Option<f64>>,
    pub median_ms: f64,
    pub max_ms: f64,
    /// VmRSS one second after each start, KiB.
    pub rss_kib: Vec<u64>,
    /// The first start's log, to show what start-up does.
    pub log: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Footprint {
    pub daemon_command: String,
    pub rss_after_start_kib: u64,
    pub rss_after_storm_kib: u64,
    pub rss_after_soak_kib: u64,
    /// VmHWM at the end: the most it ever held.
    pub peak_kib: u64,
    /// What the memory was at each of the three points.
    pub breakdown: Vec<(String, MemoryBreakdown)>,
}

/// Starts the daemon `plan.startups` times with its default flags (every namespace observed,
/// as a user would run it) and stops it again.
pub fn startup(setup: &Setup, plan: &Plan) -> Result<Startup> {
    let mut ms = Vec::new();
    let mut ready_logged_ms = Vec::new();
    let mut rss_kib = Vec::new();
    let mut command = String::new();
    let mut log = Vec::new();
    for i in 0..plan.startups {
        let daemon = daemon::start(&setup.observer, &[]).with_context(|| format!("start {}", i + 1))?;
        ms.push(daemon.startup.as_secs_f64() * 1000.0);
        ready_logged_ms.push(daemon.ready_logged.map(|d| d.as_secs_f64() * 1000.0));
        thread::sleep(Duration::from_secs(1));
        rss_kib.push(daemon.memory_kib()?.0);
        if i == 0 {
            command = daemon.command.clone();
            log = daemon.log();
        }
        daemon.stop()?;
    }
    let mut sorted = ms.clone();
    sorted.sort_by(f64::total_cmp);
    let median_ms = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    let max_ms = sorted.last().copied().unwrap_or(0.0);
    println!(
        "observer bench: start-up to all probes attached: median {median_ms:.0} ms, max {max_ms:.0} ms over {} starts",
        ms.len()
    );
    Ok(Startup { command, ms, ready_logged_ms, median_ms, max_ms, rss_kib, log })
}
