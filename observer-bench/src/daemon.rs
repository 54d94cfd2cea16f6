//! The daemon under test, from the release build: started (timed to ready), scraped, measured.
//! Starting, scraping and stopping are the test kit's; what only the benchmarks measure is here.
use std::{
    net::SocketAddr,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
pub use observer_testkit::{Daemon, Metrics};
use observer_testkit::{daemon::Options, net};

use super::procfs;

/// How long the daemon may take to become healthy before the benchmark gives up.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts `observer run --listen 127.0.0.1:PORT EXTRA...` and waits until /healthz says ready,
/// polling every 2 ms so the start-up time is measured to that resolution. The port is picked
/// here, so the polling starts at the spawn.
pub fn start(observer: &Path, extra: &[String]) -> Result<Daemon> {
    let port = net::free_port().context("finding a free port for the daemon")?;
    let options = Options {
        listen: Some(SocketAddr::from(([127, 0, 0, 1], port))),
        ready_within: START_TIMEOUT,
        poll: Duration::from_millis(2),
        http_timeout: Duration::from_secs(30),
    };
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    Daemon::start(observer, &extra, &options)
}

/// What the benchmarks read off a running daemon.
pub trait Measured {
    /// Metrics once the daemon has caught up: the events counters (seen and lost) have stopped
    /// moving for half a second. The traffic has ended before this is called.
    fn settled(&self) -> Result<Metrics>;
    /// (VmRSS, VmHWM) in KiB.
    fn memory_kib(&self) -> Result<(u64, u64)>;
    fn cpu_seconds(&self) -> Result<f64>;
}

impl Measured for Daemon {
    fn settled(&self) -> Result<Metrics> {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut last = self.metrics()?;
        let mut still_since = Instant::now();
        loop {
            thread::sleep(Duration::from_millis(100));
            let now = self.metrics()?;
            if now.events_accounted() != last.events_accounted() {
                still_since = Instant::now();
            } else if still_since.elapsed() >= Duration::from_millis(500) {
                return Ok(now);
            }
            if Instant::now() > deadline {
                bail!("the daemon's event counters were still moving after 120 s");
            }
            last = now;
        }
    }

    fn memory_kib(&self) -> Result<(u64, u64)> {
        procfs::memory_kib(self.pid)
    }

    fn cpu_seconds(&self) -> Result<f64> {
        procfs::cpu_seconds(self.pid)
    }
}
