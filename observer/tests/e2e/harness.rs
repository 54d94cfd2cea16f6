//! The daemon under test and its `/metrics`, as a test sees them.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

pub const OBSERVER: &str = env!("CARGO_BIN_EXE_observer");

/// How long to wait for something that must happen before calling it a hang: generous, since
/// the suite also runs under software emulation (`cargo xtask test --kernel`). A guard, never a
/// latency assertion: latency is measured by `cargo xtask bench`.
pub const PATIENCE: Duration = Duration::from_secs(120);

/// A running `observer run`, killed (SIGTERM) on drop.
pub struct Daemon {
    pub child: Child,
    pub addr: String,
    /// Log lines after the "serving" line, collected in the background.
    pub log: std::sync::Mutex<mpsc::Receiver<String>>,
}

impl Daemon {
    /// Starts `observer run --listen 127.0.0.1:0 EXTRA...` and waits for it to be ready
    /// (`/healthz` 200). Fails with the daemon's own error output when it cannot start.
    pub fn start(extra: &[&str]) -> Result<Self, String> {
        let mut child = Command::new(OBSERVER)
            .args(["run", "--listen", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawning {OBSERVER}: {e}"))?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut seen = Vec::new();
        let deadline = Instant::now() + PATIENCE;
        let addr = loop {
            let line = match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => line,
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
                    return Err(format!("observer did not start ({status}); its output:\n{}", seen.join("\n")));
                }
            };
            if let Some(rest) = line.split("on http://").nth(1) {
                break rest.trim().to_string();
            }
            seen.push(line);
        };
        let daemon = Self { child, addr, log: std::sync::Mutex::new(rx) };
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok((200, _)) = daemon.get("/healthz") {
                return Ok(daemon);
            }
            if Instant::now() > deadline {
                let more: Vec<String> = daemon.log.lock().map(|l| l.try_iter().collect()).unwrap_or_default();
                return Err(format!("observer never became healthy; its output:\n{}\n{}", seen.join("\n"), more.join("\n")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A plain HTTP/1.1 GET: (status, body).
    pub fn get(&self, path: &str) -> Result<(u16, String), String> {
        http_get(&self.addr, path)
    }

    pub fn metrics(&self) -> Result<Metrics, String> {
        let (status, body) = self.get("/metrics")?;
        if status != 200 {
            return Err(format!("/metrics answered {status}"));
        }
        Ok(Metrics::parse(&body))
    }

    /// Waits until `done` holds on the metrics and the series of `peers` (all series when empty)
    /// then stay the same for a moment (no late events), and returns them. Event delivery is asynchronous; the
    /// assertions that follow are on exact values, never on time.
    pub fn settled_metrics(&self, peers: &[&str], done: impl Fn(&Metrics) -> bool) -> Result<Metrics, String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = self.metrics()?;
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let now = self.metrics()?;
            let stable = if peers.is_empty() { now == last } else { now.of_peers(peers) == last.of_peers(peers) };
            if done(&now) && stable {
                return Ok(now);
            }
            if Instant::now() > deadline {
                // Hand back what we have: the caller's exact assertions will say what is off.
                return Ok(now);
            }
            last = now;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

pub fn http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    http_get_within(addr, path, PATIENCE)
}

/// The same, waiting up to `patience` for the answer (a guard against hangs, not a latency
/// assertion: latency is measured by `cargo xtask bench`).
pub fn http_get_within(addr: &str, path: &str, patience: Duration) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    stream.set_read_timeout(Some(patience)).map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(|e| format!("reading {path}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP header")?;
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or("bad status line")?;
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_string() };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// One scrape: (name, labels) → value.
#[derive(Debug, Clone, PartialEq)]
pub struct Metrics {
    pub samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Metrics {
    pub fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
            let (series, value) = line.rsplit_once(' ').expect("sample line has a value");
            let value: f64 = value.parse().expect("numeric sample value");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
                None => (series, BTreeMap::new()),
            };
            samples.push((name.to_string(), labels, value));
        }
        Self { samples }
    }

    /// The samples about connections with one of `peers`.
    pub fn of_peers(&self, peers: &[&str]) -> Vec<&(String, BTreeMap<String, String>, f64)> {
        self.samples.iter().filter(|(_, labels, _)| labels.get("peer").is_some_and(|p| peers.contains(&p.as_str()))).collect()
    }

    /// Sum of `name` over the series whose labels include all of `filter`.
    pub fn sum(&self, name: &str, filter: &[(&str, &str)]) -> u64 {
        self.matching(name, filter).map(|(_, v)| v).sum::<f64>() as u64
    }

    /// The label sets of `name` that match `filter`.
    pub fn matching<'a>(&'a self, name: &'a str, filter: &'a [(&'a str, &'a str)]) -> impl Iterator<Item = (&'a BTreeMap<String, String>, f64)> + 'a {
        self.samples
            .iter()
            .filter(move |(n, labels, _)| n == name && filter.iter().all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v)))
            .map(|(_, labels, v)| (labels, *v))
    }
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(if escaped == 'n' { '\n' } else { escaped });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.insert(key.trim_start_matches(',').trim().to_string(), value);
        rest = &after[end..];
    }
    labels
}

/// Kernel version as (major, minor).
pub fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut it = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}
