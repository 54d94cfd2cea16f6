//! Scrape latency: /metrics timed end to end (connect to last byte) at 1,000 and 10,000 series,
//! while connections keep flowing and being counted.
//!
//! The series are made on purpose: one graceful connection from each of C client addresses
//! (127.1.x.y) to each of P server ports gives P × C server-side series (peer = client address)
//! and P client-side ones (peer = 127.0.0.1) in each of the two families every graceful
//! connection counts in, `observer_tcp_closes_total` and `observer_tcp_connections_opened_total`:
//! 2 × P × (C + 1) series. The background
//! traffic cycles over the same pairs, so it adds events and, normally, no series. On a busy
//! loopback the odd connection ends otherwise than gracefully (a SYN retransmitted when the
//! listen queue overflows, a SYN meeting a TIME_WAIT socket of the same four addresses), which
//! the daemon rightly counts in a series of another family: those are reported by family, and
//! only more than 10 % of extra series stops the benchmark (the level would be another).
use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use super::{
    Plan, Setup,
    daemon::{self, Daemon, Measured as _},
    procfs,
    worker::{Command, Mark, Worker},
};

/// Client addresses per port: with one client-side series per port, P × 99 + P = 100 P per
/// family.
const CLIENTS: u16 = 99;
/// The families a graceful connection counts in: closed, and opened.
const FAMILIES: u64 = 2;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Level {
    /// The level: series made on purpose.
    pub series: u64,
    /// What the daemon's `observer_series` gauge said after the scrapes.
    #[serde(default)]
    pub series_exported: u64,
    /// Series the background traffic added, by family (`observer_tcp_retransmits_total +3`).
    #[serde(default)]
    pub extra_series: Vec<String>,
    pub ports: u16,
    pub clients: u16,
    pub scrapes: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    pub body_bytes: usize,
    /// Background traffic while scraping: connections per second made, events per second.
    pub connections_per_second: f64,
    pub events_per_second: f64,
    pub events_lost: u64,
    /// The daemon's CPU time per scrape with no traffic flowing (all its threads).
    #[serde(default)]
    pub cpu_ms_per_scrape: f64,
    pub latencies_ms: Vec<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Scrape {
    pub daemon_command: String,
    pub interval_ms: u64,
    pub background_rate: u64,
    pub levels: Vec<Level>,
}

pub fn run(setup: &Setup, plan: &Plan) -> Result<Scrape> {
    let mut worker = Worker::spawn("bench-scrape")?;
    let args = ["--max-peers", "1000", "--max-series", "50000", "--netns"]
        .map(String::from)
        .into_iter()
        .chain([worker.netns.display().to_string()])
        .collect::<Vec<_>>();
    let daemon = daemon::start(&setup.observer, &args)?;
    let mut levels = Vec::new();
    // 1,000 and 10,000 series: the levels the targets name.
    for ports in [5u16, 50] {
        let series = FAMILIES * u64::from(ports) * (u64::from(CLIENTS) + 1);
        worker.run(&Command::Series { ports, clients: CLIENTS }, |_| Ok(()))?;
        let settled = daemon.settled()?;
        let gauge = settled.sum("observer_series", &[]);
        // A few more are tolerated (and reported): the odd connection can end otherwise than
        // gracefully on a busy loopback (a SYN meeting a TIME_WAIT socket of the same four
        // addresses), which adds a series of another family.
        if gauge < series || gauge > series + series / 10 {
            bail!("after {ports} ports × {CLIENTS} clients the daemon exports {gauge} series, not {series}");
        }
        let mut level = measure(plan, &daemon, &mut worker, ports, series)
            .with_context(|| format!("scraping at {series} series"))?;
        level.cpu_ms_per_scrape = cpu_per_scrape(&daemon)?;
        println!(
            "observer bench: scrape at {series} series ({} bytes): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, with {:.0} events/s flowing",
            level.body_bytes, level.p50_ms, level.p99_ms, level.max_ms, level.events_per_second
        );
        levels.push(level);
    }
    let daemon_command = daemon.command.clone();
    daemon.stop()?;
    Ok(Scrape {
        daemon_command,
        interval_ms: plan.scrape_interval_ms,
        background_rate: plan.scrape_background_rate,
        levels,
    })
}

/// Per-connection series by family (`observer_tcp_*_total`).
fn series_by_family(m: &daemon::Metrics) -> std::collections::BTreeMap<String, u64> {
    let mut families = std::collections::BTreeMap::new();
    for (name, _, _) in m.samples.iter().filter(|(n, _, _)| n.starts_with("observer_tcp_") && n.ends_with("_total")) {
        *families.entry(name.clone()).or_insert(0) += 1;
    }
    families
}

fn measure(plan: &Plan, daemon: &Daemon, worker: &mut Worker, ports: u16, series: u64) -> Result<Level> {
    let before = daemon.metrics()?;
    let interval = Duration::from_millis(plan.scrape_interval_ms);
    // Long enough for every scrape, with room for slow ones; the worker ends it.
    let duration_ms = plan.scrapes as u64 * plan.scrape_interval_ms + 2_000;
    let command = Command::Cycle { ports, clients: CLIENTS, rate: plan.scrape_background_rate, duration_ms };
    let mut latencies = Vec::with_capacity(plan.scrapes);
    let mut body_bytes = 0;
    let outcome = worker.run(&command, |mark| {
        if mark == Mark::Start {
            // Let the paced traffic get going first.
            thread::sleep(Duration::from_millis(500));
            for _ in 0..plan.scrapes {
                let started = Instant::now();
                // A new connection each time, timed from connect to the body's last byte.
                let (status, body) = daemon.get("/metrics")?;
                let elapsed = started.elapsed();
                if status != 200 {
                    bail!("/metrics answered {status}");
                }
                body_bytes = body.len();
                latencies.push(elapsed.as_secs_f64() * 1000.0);
                thread::sleep(interval.saturating_sub(started.elapsed()));
            }
        }
        Ok(())
    })?;
    let after = daemon.settled()?;
    let series_after = after.sum("observer_series", &[]);
    let (families_before, families_after) = (series_by_family(&before), series_by_family(&after));
    let extra_series: Vec<String> = families_after
        .iter()
        .filter_map(|(family, n)| {
            let added = n.saturating_sub(families_before.get(family).copied().unwrap_or(0));
            (added > 0).then(|| format!("{family} +{added}"))
        })
        .collect();
    if series_after > series + series / 10 {
        bail!("the background traffic added series ({series_after} instead of {series}: {})", extra_series.join(", "));
    }
    let mut sorted = latencies.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(Level {
        series,
        series_exported: series_after,
        extra_series,
        ports,
        clients: CLIENTS,
        scrapes: sorted.len(),
        p50_ms: percentile(&sorted, 50.0),
        p99_ms: percentile(&sorted, 99.0),
        max_ms: sorted.last().copied().unwrap_or(0.0),
        mean_ms: sorted.iter().sum::<f64>() / sorted.len().max(1) as f64,
        body_bytes,
        connections_per_second: outcome.window.connections() as f64 / outcome.seconds,
        events_per_second: outcome.window.events() as f64 / outcome.seconds,
        events_lost: after.events_lost() - before.events_lost(),
        cpu_ms_per_scrape: 0.0,
        latencies_ms: latencies,
    })
}

/// The daemon's CPU time for one scrape: 50 scrapes back to back, nothing else happening.
fn cpu_per_scrape(daemon: &Daemon) -> Result<f64> {
    const SCRAPES: u32 = 50;
    let before = procfs::thread_cpu_ns(daemon.pid)?;
    for _ in 0..SCRAPES {
        daemon.get("/metrics")?;
    }
    let after = procfs::thread_cpu_ns(daemon.pid)?;
    Ok(after.saturating_sub(before) as f64 / f64::from(SCRAPES) / 1e6)
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }
}
