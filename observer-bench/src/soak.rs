//! Soak: steady mixed traffic (graceful, SO_LINGER 0, unread data, refused) at a fixed rate for
//! a long time; the daemon's memory must stay flat and its counts exact.
use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::{
    Check, Plan, count_checks,
    daemon::{Daemon, Measured as _},
    procfs::{CpuSample, CpuUse},
    worker::{Command, Mark, Tally, Worker},
};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Soak {
    pub seconds: f64,
    pub rate_per_kind: u64,
    pub total: Tally,
    pub connections_per_second: f64,
    pub events_per_second: f64,
    /// (seconds into the soak, VmRSS KiB).
    pub rss_kib: Vec<(f64, u64)>,
    pub rss_start_kib: u64,
    pub rss_end_kib: u64,
    pub rss_max_kib: u64,
    /// End over start, in percent.
    pub rss_growth_percent: f64,
    pub events_lost: u64,
    pub cpu: CpuUse,
    pub checks: Vec<Check>,
    pub generator_errors: u64,
    pub first_generator_error: Option<String>,
}

pub fn run(plan: &Plan, daemon: &Daemon, worker: &mut Worker) -> Result<Soak> {
    let before = daemon.metrics()?;
    let duration = Duration::from_secs_f64(plan.soak_seconds);
    let command = Command::Mixed { rate_per_kind: plan.soak_rate_per_kind, duration_ms: duration.as_millis() as u64 };
    let (load_pid, daemon_pid) = (worker.pid, daemon.pid);
    let mut rss_kib = Vec::new();
    let mut cpu = CpuUse::default();
    let outcome = worker.run(&command, |mark| {
        if mark != Mark::Start {
            return Ok(());
        }
        let started = Instant::now();
        let cpu_start = CpuSample::now(load_pid, Some(daemon_pid))?;
        let mut minute = 0;
        loop {
            let at = started.elapsed();
            rss_kib.push((at.as_secs_f64(), daemon.memory_kib()?.0));
            if at.as_secs() / 60 > minute {
                minute = at.as_secs() / 60;
                println!("observer bench: soak {minute} min: daemon RSS {} KiB", rss_kib.last().map_or(0, |s| s.1));
            }
            // The last sample is taken just before the traffic stops.
            let next = at + Duration::from_secs_f64(plan.soak_sample_seconds);
            if next + Duration::from_millis(500) >= duration {
                thread::sleep(duration.saturating_sub(started.elapsed() + Duration::from_millis(500)));
                rss_kib.push((started.elapsed().as_secs_f64(), daemon.memory_kib()?.0));
                cpu = cpu_start.until(&CpuSample::now(load_pid, Some(daemon_pid))?);
                return Ok(());
            }
            thread::sleep(next.saturating_sub(started.elapsed()));
        }
    })?;
    let after = daemon.settled()?;
    let rss_start_kib = rss_kib.first().map_or(0, |s| s.1);
    let rss_end_kib = rss_kib.last().map_or(0, |s| s.1);
    Ok(Soak {
        seconds: outcome.seconds,
        rate_per_kind: plan.soak_rate_per_kind,
        total: outcome.total,
        connections_per_second: outcome.window.connections() as f64 / outcome.seconds,
        events_per_second: outcome.window.events() as f64 / outcome.seconds,
        rss_max_kib: rss_kib.iter().map(|s| s.1).max().unwrap_or(0),
        rss_kib,
        rss_start_kib,
        rss_end_kib,
        rss_growth_percent: if rss_start_kib > 0 {
            (rss_end_kib as f64 / rss_start_kib as f64 - 1.0) * 100.0
        } else {
            0.0
        },
        events_lost: after.events_lost() - before.events_lost(),
        cpu,
        checks: count_checks(&before, &after, &outcome.total, worker.name.as_str()),
        generator_errors: outcome.errors,
        first_generator_error: outcome.first_error,
    })
}
