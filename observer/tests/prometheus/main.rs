//! Prometheus for real: the daemon's `/metrics` through Prometheus's own tools.
//!
//! - `lint`: a real daemon's output, after real traffic that gives every family series (resets,
//!   premature closes of several kinds, CLOSE-WAIT, retransmits, durations, program runs), is fed
//!   to `promtool check metrics`, which must print nothing and exit 0.
//! - `scrape`: a real Prometheus server scrapes a real daemon every second while traffic runs in
//!   rounds, and PromQL answers through its HTTP API (`/api/v1/query`) are checked against the
//!   traffic made, exactly.
//!
//! Each trial makes its own network namespace (`ip netns add`) and its own daemon restricted to
//! it (`--netns`), so only its own traffic counts; the traffic comes from this test binary
//! re-executed as workers (`observer_testkit::worker`) that join the namespace by its path and name themselves.
//! Everything a trial starts (Prometheus, the daemon, workers, the namespace) is stopped or
//! removed when it ends, also when it fails: each is a guard that does so when dropped.
//!
//! Host only: it needs root (BPF, network namespaces) and Debian's `prometheus` package
//! (`/usr/bin/prometheus`, `/usr/bin/promtool`; `cargo xtask test` installs it). It is never
//! packed into the QEMU kernel matrix, which runs only the `e2e` binary. Without them the trials
//! fail, saying what to install; they never skip.

mod lint;
mod scrape;

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use libtest_mimic::{Arguments, Failed, Trial};
use observer_testkit::{
    Daemon, Metrics,
    net::NamedNetns,
    process::{self, Signal},
};

pub const OBSERVER: &str = env!("CARGO_BIN_EXE_observer");

/// How long anything that must happen may take before it counts as a hang (never a latency
/// assertion).
pub const PATIENCE: Duration = Duration::from_secs(120);

fn main() {
    observer_testkit::worker::run_if_worker();
    let args = Arguments::from_args();
    let trials = vec![
        trial("promtool_check_metrics_finds_nothing_in_a_real_daemons_output", lint::promtool_finds_nothing),
        trial(
            "a_real_prometheus_scraping_every_second_answers_promql_exactly_as_the_traffic_made",
            scrape::promql_answers_match_the_traffic,
        ),
    ];
    libtest_mimic::run(&args, trials).exit();
}

fn trial(name: &'static str, f: fn() -> Result<()>) -> Trial {
    Trial::test(name, move || f().map_err(|e| Failed::from(format!("{e:#}"))))
}

pub fn require_root() -> Result<()> {
    ensure!(process::is_root(), "these tests load BPF programs and make network namespaces: run them as root");
    Ok(())
}

/// `name` on PATH, or a failure saying how to install it.
pub fn tool(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file()).with_context(|| {
        format!(
            "`{name}` is not installed (not on PATH): `apt-get install prometheus` (Debian's package ships \
             prometheus and promtool; cargo xtask test installs it)"
        )
    })
}

/// A worker process (`observer_testkit::worker`), killed and reaped when dropped.
pub struct Worker {
    child: Child,
    stdout: BufReader<ChildStdout>,
    what: String,
}

impl Worker {
    /// Starts the worker `role` with `NETNS PORT N COMM`.
    pub fn start(role: &str, netns: &NamedNetns, port: u16, n: u32, comm: &str) -> Result<Self> {
        let exe = std::env::current_exe().context("finding the test binary")?;
        let what = format!("worker {role} {} {port} {n} {comm}", netns.path());
        let mut child = Command::new(exe)
            .env(observer_testkit::worker::WORKER_ENV, role)
            .args([netns.path(), port.to_string(), n.to_string(), comm.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        let stdout = BufReader::new(child.stdout.take().context("the worker's stdout is not piped")?);
        Ok(Self { child, stdout, what })
    }

    /// Waits for the worker to print `line` (`ready`, `done`).
    pub fn expect(&mut self, line: &str) -> Result<()> {
        let mut got = String::new();
        self.stdout.read_line(&mut got).with_context(|| format!("reading from {}", self.what))?;
        if got.trim() != line {
            let _ = self.child.kill();
            let status = self.child.wait().map(process::describe).unwrap_or_default();
            let stderr = self.stderr();
            bail!("{} said {got:?}, not {line:?} ({status}): {stderr}", self.what);
        }
        Ok(())
    }

    /// Waits for the worker to exit, which it must do with status 0.
    pub fn finish(mut self) -> Result<()> {
        let status = self.child.wait().with_context(|| format!("waiting for {}", self.what))?;
        let stderr = self.stderr();
        ensure!(status.success(), "{} failed ({}): {stderr}", self.what, process::describe(status));
        Ok(())
    }

    fn stderr(&mut self) -> String {
        let mut text = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut text);
        }
        text.trim().to_string()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = process::kill(self.child.id(), Signal::KILL);
        }
        let _ = self.child.wait();
    }
}

/// Runs a client worker to completion.
pub fn run_worker(role: &str, netns: &NamedNetns, port: u16, n: u32, comm: &str) -> Result<()> {
    Worker::start(role, netns, port, n, comm)?.finish()
}

/// A server worker, listening once this returns.
pub fn server(role: &str, netns: &NamedNetns, port: u16, n: u32, comm: &str) -> Result<Worker> {
    let mut w = Worker::start(role, netns, port, n, comm)?;
    w.expect("ready")?;
    Ok(w)
}

/// Starts observer restricted to `netns`, with `extra` flags.
pub fn start_observer(netns: &NamedNetns, extra: &[&str]) -> Result<Daemon> {
    Daemon::start_in_netns(Path::new(OBSERVER), &netns.path(), extra, PATIENCE)
}

/// Scrapes the daemon until `done` holds on its metrics.
pub fn daemon_shows(daemon: &Daemon, what: &str, done: impl Fn(&Metrics) -> bool) -> Result<Metrics> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let m = daemon.metrics()?;
        if done(&m) {
            return Ok(m);
        }
        ensure!(
            Instant::now() < deadline,
            "{what} not seen within {PATIENCE:?}; the daemon's log:\n{}",
            daemon.log().join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
