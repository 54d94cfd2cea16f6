//! The daemon under test: `observer run` started, waited for until ready, scraped, signalled,
//! stopped.
use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow, bail};

use crate::{
    http,
    metrics::Metrics,
    process::{self, Signal},
};

/// How to start a daemon.
#[derive(Debug, Clone)]
pub struct Options {
    /// `--listen` address; `None`: 127.0.0.1:0, the address read from the daemon's log.
    pub listen: Option<SocketAddr>,
    /// How long it may take to become ready before starting counts as failed.
    pub ready_within: Duration,
    /// How often `/healthz` is asked while waiting (the resolution of [`Daemon::startup`]).
    pub poll: Duration,
    /// How long one HTTP request may take.
    pub http_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            listen: None,
            ready_within: Duration::from_secs(120),
            poll: Duration::from_millis(50),
            http_timeout: Duration::from_secs(120),
        }
    }
}

/// A running `observer run`, stopped with SIGTERM when dropped.
pub struct Daemon {
    child: Child,
    pub pid: u32,
    pub addr: SocketAddr,
    /// The command line, for messages and reports.
    pub command: String,
    /// Spawn → the first `200` from `/healthz` (every probe attached).
    pub startup: Duration,
    /// Spawn → the "ready" line in its log, as read here (a cross-check of `startup`).
    pub ready_logged: Option<Duration>,
    http_timeout: Duration,
    log: Arc<Mutex<Vec<String>>>,
    /// Its standard output, line by line (`--log-events` writes there).
    stdout: Arc<Mutex<Vec<String>>>,
}

/// The message of a daemon log line: the line itself in the text format, `fields.message` of a
/// `--log-format json` line.
pub fn log_message(line: &str) -> String {
    if line.starts_with('{')
        && let Ok(json) = serde_json::from_str::<serde_json::Value>(line)
        && let Some(message) = json["fields"]["message"].as_str().or(json["message"].as_str())
    {
        return message.to_string();
    }
    line.to_string()
}

impl Daemon {
    /// Starts `OBSERVER run --listen ADDR EXTRA...` (with `RUST_LOG=info`) and waits until
    /// `/healthz` answers 200. Fails with the daemon's own output when it cannot start.
    pub fn start(observer: &Path, extra: &[&str], options: &Options) -> Result<Self> {
        Self::start_with_env(observer, extra, &[], options)
    }

    /// [`Daemon::start`] with environment variables `env` set for the daemon.
    pub fn start_with_env(observer: &Path, extra: &[&str], env: &[(&str, &str)], options: &Options) -> Result<Self> {
        let listen = options.listen.map_or_else(|| "127.0.0.1:0".to_string(), |a| a.to_string());
        let mut command = Command::new(observer);
        command.args(["run", "--listen", &listen]).args(extra).env("RUST_LOG", "info");
        command.envs(env.iter().copied());
        let display = process::display(&command);
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let spawned = Instant::now();
        let mut child = command.spawn().map_err(|e| anyhow!("starting `{display}`: {e}"))?;
        let pid = child.id();
        let log = Arc::new(Mutex::new(Vec::new()));
        let ready_at = Arc::new(Mutex::new(None));
        let (serving_tx, serving) = mpsc::channel();
        let stderr = child.stderr.take().ok_or_else(|| anyhow!("the daemon's stderr is not piped"))?;
        let stdout_pipe = child.stdout.take().ok_or_else(|| anyhow!("the daemon's stdout is not piped"))?;
        let stdout = Arc::new(Mutex::new(Vec::new()));
        {
            let stdout = stdout.clone();
            thread::spawn(move || {
                for line in BufReader::new(stdout_pipe).lines().map_while(Result::ok) {
                    stdout.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                }
            });
        }
        {
            let (log, ready_at) = (log.clone(), ready_at.clone());
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let message = log_message(&line);
                    if message.contains(" ready") {
                        ready_at.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(spawned.elapsed());
                    }
                    if let Some(addr) = message.split("on http://").nth(1).and_then(|a| a.split_whitespace().next()) {
                        let _ = serving_tx.send(addr.to_string());
                    }
                    log.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                }
            });
        }
        let mut daemon = Self {
            child,
            pid,
            addr: options.listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
            command: display,
            startup: Duration::ZERO,
            ready_logged: None,
            http_timeout: options.http_timeout,
            log,
            stdout,
        };
        let deadline = spawned + options.ready_within;
        if options.listen.is_none() {
            // Port 0: the daemon names the port it got.
            let addr = serving.recv_timeout(deadline.saturating_duration_since(Instant::now()));
            daemon.addr = match addr.ok().and_then(|a| a.parse().ok()) {
                Some(addr) => addr,
                None => return Err(daemon.failed_to_start("never said where it serves")),
            };
        }
        loop {
            if let Ok((200, _)) = daemon.get("/healthz") {
                daemon.startup = spawned.elapsed();
                break;
            }
            if daemon.child.try_wait().map_err(|e| anyhow!("waiting for the daemon: {e}"))?.is_some() {
                return Err(daemon.failed_to_start("exited before becoming ready"));
            }
            if Instant::now() > deadline {
                return Err(daemon.failed_to_start(&format!("not ready after {:?}", options.ready_within)));
            }
            thread::sleep(options.poll);
        }
        // The log line is written just before /healthz flips; give the reader thread a moment.
        thread::sleep(Duration::from_millis(20));
        daemon.ready_logged = *ready_at.lock().unwrap_or_else(|e| e.into_inner());
        Ok(daemon)
    }

    /// Starts `OBSERVER run --netns NETNS EXTRA...`, restricted to one network namespace (a
    /// test's own), allowing `patience` for start-up and for each HTTP request.
    pub fn start_in_netns(observer: &Path, netns: &str, extra: &[&str], patience: Duration) -> Result<Self> {
        let mut args = vec!["--netns", netns];
        args.extend_from_slice(extra);
        Self::start(observer, &args, &Options { ready_within: patience, http_timeout: patience, ..Options::default() })
    }

    /// Kills a daemon that did not start and describes how it ended, with its log.
    fn failed_to_start(mut self, what: &str) -> anyhow::Error {
        let _ = self.child.kill();
        let status = self.child.wait().map(process::describe).unwrap_or_default();
        // Let the reader thread take the last lines.
        thread::sleep(Duration::from_millis(100));
        anyhow!("`{}` {what} ({status}); its output:\n{}", self.command, self.log().join("\n"))
    }

    /// What it wrote on standard output so far, line by line.
    pub fn stdout(&self) -> Vec<String> {
        self.stdout.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// `http://ADDR`, for `observer status --endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Everything the daemon has logged so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// GET `path` on a new connection: (status, body).
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        let answer = http::get(self.addr, path, self.http_timeout)?;
        Ok((answer.status, answer.body))
    }

    /// One scrape of `/metrics`, parsed.
    pub fn metrics(&self) -> Result<Metrics> {
        let (status, body) = self.get("/metrics")?;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        Metrics::parse(&body)
    }

    pub fn signal(&self, signal: Signal) -> Result<()> {
        process::kill(self.pid, signal).map_err(|e| anyhow!("signalling daemon {}: {e}", self.pid))
    }

    /// Waits up to `within` for the daemon to exit.
    pub fn wait_exit(&mut self, within: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().map_err(|e| anyhow!("waiting for the daemon: {e}"))? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("daemon {} still running {} s after the signal", self.pid, within.as_secs());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, and the daemon must exit 0 (it detaches its probes on the way out) within two
    /// minutes.
    pub fn stop(mut self) -> Result<()> {
        self.signal(Signal::TERM)?;
        let status = self.wait_exit(Duration::from_secs(120))?;
        if !status.success() {
            thread::sleep(Duration::from_millis(100));
            bail!(
                "`{}` exited with {} on SIGTERM; its log:\n{}",
                self.command,
                process::describe(status),
                self.log().join("\n")
            );
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = process::kill(self.pid, Signal::TERM);
            let _ = self.child.wait();
        }
    }
}
