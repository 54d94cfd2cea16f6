//! A Prometheus server of a test's own (Debian's 2.42), scraping one target every second, and
//! its HTTP API: instant queries (`/api/v1/query`, at a given time), targets, its own metrics.
//! The `prometheus` suite checks PromQL with it; the `incident` suite and `cargo xtask incident`
//! run one beside the daemon.

use std::{
    collections::BTreeMap,
    fs,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use serde_json::Value;

use crate::{
    http,
    net::free_port,
    process::{self, Signal},
};

/// How long Prometheus may take to become ready before that counts as a hang.
const PATIENCE: Duration = Duration::from_secs(120);

/// A time on Prometheus's clock, in milliseconds since the epoch (the resolution of its
/// timestamps and of the `time` parameter of its queries).
pub type Ms = i64;

/// One sample of an instant vector: its labels and value.
pub type Sample = (BTreeMap<String, String>, f64);

/// A running `prometheus`, killed and its storage removed when dropped.
pub struct Prometheus {
    child: Child,
    pub addr: SocketAddr,
    dir: PathBuf,
}

impl Prometheus {
    /// Starts `prometheus` scraping `target` (job `observer`) every second, storing into a
    /// directory of its own, and waits until `/-/ready` answers 200. It listens on a free port
    /// of 127.0.0.1.
    pub fn start(prometheus: &std::path::Path, target: SocketAddr) -> Result<Self> {
        Self::start_on(prometheus, target, SocketAddr::from(([127, 0, 0, 1], free_port()?)))
    }

    /// [`Prometheus::start`], listening on `addr`.
    pub fn start_on(prometheus: &std::path::Path, target: SocketAddr, addr: SocketAddr) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("observer-prometheus-{}-{}", std::process::id(), addr.port()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("data")).with_context(|| format!("creating {}", dir.display()))?;
        let config = dir.join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: observer\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )?;
        let log = fs::File::create(dir.join("prometheus.log"))?;
        let mut command = Command::new(prometheus);
        command
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            // Nothing is kept past the test.
            .arg("--storage.tsdb.retention.time=1h")
            .arg("--log.level=info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let shown = process::display(&command);
        let child = command.spawn().with_context(|| format!("starting `{shown}`"))?;
        let mut server = Self { child, addr, dir };
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(r) = http::get(addr, "/-/ready", Duration::from_secs(10))
                && r.status == 200
            {
                return Ok(server);
            }
            if let Some(status) = server.child.try_wait()? {
                bail!(
                    "`{shown}` exited ({}) before it was ready; its log:\n{}",
                    process::describe(status),
                    server.log()
                );
            }
            ensure!(Instant::now() < deadline, "`{shown}` not ready within {PATIENCE:?}; its log:\n{}", server.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// GET `path` of its API: the `data` of a successful answer.
    pub fn api(&self, path: &str) -> Result<Value> {
        let answer = http::get(self.addr, path, Duration::from_secs(60))?;
        let body: Value = serde_json::from_str(&answer.body)
            .map_err(|e| anyhow!("GET {path} answered {} with no JSON ({e}): {}", answer.status, answer.body))?;
        ensure!(
            answer.status == 200 && body["status"] == "success",
            "GET {path} answered {}: {}",
            answer.status,
            answer.body
        );
        Ok(body["data"].clone())
    }

    /// `/api/v1/query` of `expr`, evaluated at `at` (now if `None`): the instant vector (a
    /// scalar is one sample without labels).
    pub fn query(&self, expr: &str, at: Option<Ms>) -> Result<Vec<Sample>> {
        let mut path = format!("/api/v1/query?query={}", encode(expr));
        if let Some(at) = at {
            path.push_str(&format!("&time={}", time_param(at)));
        }
        let data = self.api(&path).with_context(|| format!("the query `{expr}`"))?;
        let value = |v: &Value| -> Result<f64> {
            v[1].as_str()
                .and_then(|s| s.parse().ok())
                .with_context(|| format!("`{expr}`: a value that is no number: {v}"))
        };
        match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    let labels = s["metric"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                        .collect();
                    Ok((labels, value(&s["value"])?))
                })
                .collect(),
            Some("scalar") => Ok(vec![(BTreeMap::new(), value(&data["result"])?)]),
            other => bail!("`{expr}` gave a {other:?}, not an instant vector: {data}"),
        }
    }

    /// The one value of `expr` at `at`; `None` when the vector is empty.
    pub fn value(&self, expr: &str, at: Option<Ms>) -> Result<Option<f64>> {
        let samples = self.query(expr, at)?;
        ensure!(samples.len() <= 1, "`{expr}` gave {} samples, want at most one: {samples:?}", samples.len());
        Ok(samples.first().map(|(_, v)| *v))
    }

    /// `expr` at `at` by the value of label `by` (its samples' `by` label → value).
    pub fn by(&self, expr: &str, by: &str, at: Option<Ms>) -> Result<BTreeMap<String, f64>> {
        let mut out = BTreeMap::new();
        for (labels, v) in self.query(expr, at)? {
            let key = labels.get(by).cloned().unwrap_or_default();
            ensure!(out.insert(key.clone(), v).is_none(), "`{expr}` has two samples with {by}={key:?}");
        }
        Ok(out)
    }

    /// The timestamp of the newest scrape of the target it has stored (`timestamp(up)`).
    pub fn last_scrape(&self) -> Result<Option<Ms>> {
        Ok(self.value(r#"timestamp(up{job="observer"})"#, None)?.map(seconds_to_ms))
    }

    /// Its own metrics (`/metrics` of the server), as text.
    pub fn own_metrics(&self) -> Result<String> {
        let answer = http::get(self.addr, "/metrics", Duration::from_secs(60))?;
        ensure!(answer.status == 200, "Prometheus's /metrics answered {}", answer.status);
        Ok(answer.body)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = process::kill(self.child.id(), Signal::TERM);
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Seconds (as Prometheus writes times and `timestamp()` values) to milliseconds.
pub fn seconds_to_ms(s: f64) -> Ms {
    (s * 1000.0).round() as Ms
}

/// A time as the `time` parameter: seconds with exactly the milliseconds.
fn time_param(at: Ms) -> String {
    format!("{}.{:03}", at.div_euclid(1000), at.rem_euclid(1000))
}

/// A time as the text of a message.
pub fn shown(at: Ms) -> String {
    time_param(at)
}

/// Percent-encodes a query parameter (everything but RFC 3986's unreserved characters).
fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
