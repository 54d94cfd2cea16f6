//! The daemon under test: started from the release build, timed to ready, scraped, measured.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};

use super::{net, procfs};
use crate::cmd;

/// How long the daemon may take to become healthy before the benchmark gives up.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `observer run`, stopped with SIGTERM when dropped.
pub struct Daemon {
    child: Child,
    pub pid: u32,
    pub addr: SocketAddr,
    /// The command line, for the report.
    pub command: String,
    /// Spawn → first `200` from /healthz (all probes attached).
    pub startup: Duration,
    /// Spawn → the "ready" line in its log, as read here (a cross-check of `startup`).
    pub ready_logged: Option<Duration>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    /// Starts `observer run --listen 127.0.0.1:PORT EXTRA...` and waits until /healthz says
    /// ready, polling every 2 ms so the start-up time is measured to that resolution.
    pub fn start(observer: &Path, extra: &[String]) -> Result<Self> {
        let port = net::free_port().context("finding a free port for the daemon")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut command = Command::new(observer);
        command
            .args(["run", "--listen", &addr.to_string()])
            .args(extra)
            .env("RUST_LOG", "info");
        let display = cmd::display(&command);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let spawned = Instant::now();
        let mut child = command
            .spawn()
            .with_context(|| format!("starting `{display}`"))?;
        let pid = child.id();
        let log = Arc::new(Mutex::new(Vec::new()));
        let ready_at = Arc::new(Mutex::new(None));
        if let Some(stderr) = child.stderr.take() {
            let (log, ready_at) = (log.clone(), ready_at.clone());
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains(" ready") {
                        ready_at
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get_or_insert(spawned.elapsed());
                    }
                    log.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                }
            });
        }
        let mut daemon = Self {
            child,
            pid,
            addr,
            command: display,
            startup: Duration::ZERO,
            ready_logged: None,
            log,
        };
        loop {
            if let Ok((200, _)) = daemon.get("/healthz") {
                daemon.startup = spawned.elapsed();
                break;
            }
            if let Some(status) = daemon.child.try_wait().context("waiting for the daemon")? {
                thread::sleep(Duration::from_millis(100));
                bail!(
                    "`{}` exited ({}) before becoming ready; its log:\n{}",
                    daemon.command,
                    cmd::describe(status),
                    daemon.log().join("\n")
                );
            }
            if spawned.elapsed() > START_TIMEOUT {
                bail!(
                    "`{}` not ready after {START_TIMEOUT:?}; its log:\n{}",
                    daemon.command,
                    daemon.log().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(2));
        }
        // The log line is written just before /healthz flips; give the reader thread a moment.
        thread::sleep(Duration::from_millis(20));
        daemon.ready_logged = *ready_at.lock().unwrap_or_else(|e| e.into_inner());
        Ok(daemon)
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A plain HTTP/1.1 GET on a new connection: (status, body).
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        let (status, body, _) = http_get(self.addr, path)?;
        Ok((status, body))
    }

    pub fn metrics(&self) -> Result<Metrics> {
        let (status, body) = self.get("/metrics")?;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        Metrics::parse(&body)
    }

    /// Metrics once the daemon has caught up: the events counters (seen and lost) have stopped
    /// moving for half a second. The traffic has ended before this is called.
    pub fn settled(&self) -> Result<Metrics> {
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

    /// (VmRSS, VmHWM) in KiB.
    pub fn memory_kib(&self) -> Result<(u64, u64)> {
        procfs::memory_kib(self.pid)
    }

    pub fn cpu_seconds(&self) -> Result<f64> {
        procfs::cpu_seconds(self.pid)
    }

    /// SIGTERM, and the daemon must exit 0 (it detaches its probes on the way out).
    pub fn stop(mut self) -> Result<()> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        let status = self
            .child
            .wait()
            .context("waiting for the daemon to exit")?;
        if !status.success() {
            bail!(
                "`{}` exited with {} on SIGTERM; its log:\n{}",
                self.command,
                cmd::describe(status),
                self.log().join("\n")
            );
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child's pid, which has not been reaped.
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
            let _ = self.child.wait();
        }
    }
}

/// GET `path` on a new connection (`Connection: close`): (status, body, time to the last byte).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String, Duration)> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .context("setting a read timeout")?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .with_context(|| format!("sending GET {path}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .with_context(|| format!("reading the answer to GET {path}"))?;
    let elapsed = started.elapsed();
    let text =
        String::from_utf8(raw).with_context(|| format!("GET {path}: answer is not UTF-8"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("GET {path}: no end of header in {} bytes", text.len()))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("GET {path}: bad status line"))?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body, elapsed))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// One scrape of /metrics: (name, labels, value) per sample.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Metrics {
    pub fn parse(text: &str) -> Result<Self> {
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        {
            let (series, value) = line
                .rsplit_once(' ')
                .ok_or_else(|| anyhow!("metrics line without a value: {line}"))?;
            let value: f64 = value
                .parse()
                .with_context(|| format!("metrics line with a bad value: {line}"))?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}').unwrap_or(rest))),
                None => (series, BTreeMap::new()),
            };
            samples.push((name.to_string(), labels, value));
        }
        Ok(Self { samples })
    }

    /// Sum of `name` over the series whose labels include all of `filter`.
    pub fn sum(&self, name: &str, filter: &[(&str, &str)]) -> u64 {
        self.samples
            .iter()
            .filter(|(n, labels, _)| {
                n == name
                    && filter
                        .iter()
                        .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| *v)
            .sum::<f64>() as u64
    }

    /// `observer_events_total` by probe.
    pub fn events_by_probe(&self) -> BTreeMap<String, u64> {
        self.samples
            .iter()
            .filter(|(n, _, _)| n == "observer_events_total")
            .filter_map(|(_, labels, v)| labels.get("probe").map(|p| (p.clone(), *v as u64)))
            .collect()
    }

    pub fn events_seen(&self) -> u64 {
        self.sum("observer_events_total", &[])
    }

    pub fn events_lost(&self) -> u64 {
        self.sum("observer_events_lost_total", &[])
    }

    /// Seen + lost: everything the kernel side tried to report.
    pub fn events_accounted(&self) -> u64 {
        self.events_seen() + self.events_lost()
    }

    pub fn revision(&self) -> Option<String> {
        self.samples
            .iter()
            .find(|(n, _, _)| n == "observer_build_info")
            .and_then(|(_, l, _)| l.get("revision").cloned())
    }
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut end = after.len();
        let mut chars = after.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(if escaped == 'n' { '\n' } else { escaped });
                    }
                }
                '"' => {
                    end = i;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.insert(key.trim_start_matches(',').trim().to_string(), value);
        rest = after.get(end + 1..).unwrap_or("");
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::Metrics;

    #[test]
    fn sums_by_label() {
        let m = Metrics::parse(
            "# HELP x\nobserver_tcp_closes_total{comm=\"a b\",peer=\"127.0.0.1\",port=\"80\",role=\"client\"} 3\n\
             observer_tcp_closes_total{comm=\"c\\\"q\",peer=\"127.0.0.1\",port=\"80\",role=\"server\"} 4\n\
             observer_events_total{probe=\"tcp_send_reset\"} 5\nobserver_events_lost_total 2\n",
        )
        .unwrap();
        assert_eq!(m.sum("observer_tcp_closes_total", &[]), 7);
        assert_eq!(m.sum("observer_tcp_closes_total", &[("comm", "a b")]), 3);
        assert_eq!(
            m.sum(
                "observer_tcp_closes_total",
                &[("comm", "c\"q"), ("role", "server")]
            ),
            4
        );
        assert_eq!(m.events_accounted(), 7);
    }
}
