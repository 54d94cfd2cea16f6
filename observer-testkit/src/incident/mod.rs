//! The incident observer was born from, reproduced on one machine: nginx (Debian's `nginx-light`)
//! reverse-proxies to a Go order service that, for unknown users, cuts the connection after a
//! bodiless status line, sometimes closes without answering and sometimes aborts; a Go client
//! retries every error three times, each attempt on a new connection.
//!
//! The same code runs the `incident` test (`observer/tests/incident/`) and `cargo xtask
//! incident`, the README's walk-through. Everything runs inside one network namespace of the
//! caller's ([`NamedNetns`]) on its loopback, so nothing listens on the host's; every process
//! started here is killed when its guard is dropped, and also if the process that started it
//! dies (`PR_SET_PDEATHSIG`).
//!
//! | process (`comm`) | what |
//! |---|---|
//! | `ordercli` | [`ordercli.go`](ordercli.go): one order per user, every error (a 5xx or no answer) retried three times; one JSON line per round ([`ClientRound`]) |
//! | `nginx` | in the foreground, one process (`master_process off`), its own prefix, pid file and logs; `proxy_next_upstream off` (nginx never retries by itself), no upstream keep-alive (one backend connection per request) |
//! | `orderbackend` | [`orderbackend.go`](orderbackend.go): known users get their order; an unknown user's last `-` part chooses how it fails ([`Failure`]) |
//!
//! nginx's own logs are the ground truth ([`NginxLogs`]): an access log line per request with
//! `$upstream_status`, `$upstream_addr` and `$upstream_bytes_received` (JSON, `escape=json`),
//! and an error log line per failed upstream attempt.
use std::{
    fs,
    io::{BufRead as _, BufReader},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;

use crate::{
    net::NamedNetns,
    process::{self, Signal},
};

/// The processes' command names, as observer's `comm` labels show them.
pub const NGINX_COMM: &str = "nginx";
pub const BACKEND_COMM: &str = "orderbackend";
pub const CLIENT_COMM: &str = "ordercli";

/// Attempts the client makes for an order that keeps failing: the first and three retries.
pub const ATTEMPTS_PER_FAILED_ORDER: u64 = 4;

/// What nginx's error log says about an upstream attempt that was reset (`cut` and `abort`).
pub const NGINX_UPSTREAM_RESET: &str =
    "recv() failed (104: Connection reset by peer) while reading response header from upstream";
/// What nginx's error log says about an upstream attempt closed without an answer (`silent`).
pub const NGINX_UPSTREAM_CLOSED: &str =
    "upstream prematurely closed connection while reading response header from upstream";

/// The bodiless status line of a `cut` answer, all the bytes nginx receives before the RST.
pub const CUT_STATUS_LINE: &str = "HTTP/1.1 404 Not Found\r\n";

const BACKEND_SOURCE: &str = include_str!("orderbackend.go");
const CLIENT_SOURCE: &str = include_str!("ordercli.go");

/// How long a process may take to start listening before that counts as a hang.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// How the backend fails an unknown user: the last `-` part of the user's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// `HTTP/1.1 404 Not Found` and nothing more, then an RST (SO_LINGER 0).
    Cut,
    /// Closed without an answer (FIN).
    Silent,
    /// Aborted without an answer (RST, SO_LINGER 0).
    Abort,
}

impl Failure {
    /// The failure the backend chooses for `user`; `None` for a known user (it gets its order).
    pub fn of(user: &str) -> Option<Self> {
        if KNOWN_USERS.contains(&user) {
            return None;
        }
        Some(match user.rsplit('-').next() {
            Some("silent") => Self::Silent,
            Some("abort") => Self::Abort,
            _ => Self::Cut,
        })
    }
}

/// The users `orderbackend.go` knows (its `known` map).
pub const KNOWN_USERS: &[&str] = &["alice", "bob", "carol", "dave", "erin"];

/// The users the walk-through orders for each round: three known, one unknown of each failure.
pub const WALKTHROUGH_USERS: &[&str] = &["alice", "mallory-cut", "bob", "peggy-silent", "carol", "sybil-abort"];

/// The two Go programs, built.
#[derive(Debug, Clone)]
pub struct Programs {
    pub backend: PathBuf,
    pub client: PathBuf,
}

/// Builds `orderbackend` and `ordercli` into `dir` with Debian's Go (standard library only: no
/// module is downloaded; the build cache is `dir/go-cache`, kept for the next build).
pub fn build_programs(dir: &Path) -> Result<Programs> {
    let go = on_path("go").with_context(
        || "`go` is not installed (not on PATH): `apt-get install golang-go` (cargo xtask test installs it)",
    )?;
    let src = dir.join("src");
    fs::create_dir_all(&src).with_context(|| format!("creating {}", src.display()))?;
    let mut built = Vec::new();
    for (name, source) in [(BACKEND_COMM, BACKEND_SOURCE), (CLIENT_COMM, CLIENT_SOURCE)] {
        let file = src.join(format!("{name}.go"));
        fs::write(&file, source).with_context(|| format!("writing {}", file.display()))?;
        let out = dir.join(name);
        let mut build = Command::new(&go);
        build
            .arg("build")
            .arg("-o")
            .arg(&out)
            .arg(&file)
            .current_dir(&src)
            .env("GOCACHE", dir.join("go-cache"))
            .env("GOPATH", dir.join("go-path"))
            // Offline and as shipped: no toolchain switch, no module proxy, no C compiler.
            .env("GOTOOLCHAIN", "local")
            .env("GOPROXY", "off")
            .env("GOFLAGS", "")
            .env("CGO_ENABLED", "0");
        process::stdout(&mut build).with_context(|| format!("building {name} with Debian's Go"))?;
        built.push(out);
    }
    let [backend, client] = <[PathBuf; 2]>::try_from(built).map_err(|_| anyhow::anyhow!("two programs built"))?;
    Ok(Programs { backend, client })
}

/// `name` on PATH (or in /usr/sbin, where Debian puts nginx).
fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Where nginx and the backend listen, on the namespace's loopback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    pub nginx: u16,
    pub backend: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Self { nginx: 8000, backend: 8080 }
    }
}

/// A process started in the namespace, killed and reaped when dropped.
pub struct Spawned {
    child: Child,
    what: String,
    stderr_file: PathBuf,
}

impl Spawned {
    /// Starts `program ARGS` in `netns` (`ip netns exec`, which execs it: the child is the
    /// program itself), its stderr to `stderr_file`, its stdout piped.
    fn start(netns: &str, program: &Path, args: &[String], stderr_file: PathBuf) -> Result<Self> {
        Self::start_to(netns, program, args, stderr_file, Stdio::piped())
    }

    /// [`Spawned::start`] with its stdout to `stdout`.
    fn start_to(netns: &str, program: &Path, args: &[String], stderr_file: PathBuf, stdout: Stdio) -> Result<Self> {
        let stderr = fs::File::create(&stderr_file).with_context(|| format!("creating {}", stderr_file.display()))?;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", netns])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        // SAFETY: the closure only makes one system call (prctl), which is async-signal-safe.
        // Nothing may outlive the test or xtask that started it, even when that is killed.
        unsafe {
            command.pre_exec(process::die_with_parent);
        }
        let what = process::display(&command);
        let child = command.spawn().with_context(|| format!("starting `{what}`"))?;
        Ok(Self { child, what, stderr_file })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stdout(&mut self) -> Result<ChildStdout> {
        self.child.stdout.take().with_context(|| format!("the stdout of `{}` is not piped", self.what))
    }

    /// Its stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_file).unwrap_or_default().trim().to_string()
    }

    /// An error that says how it ended (if it did) and what it wrote on stderr.
    fn failed(&mut self, what: &str) -> anyhow::Error {
        let status = match self.child.try_wait() {
            Ok(Some(status)) => process::describe(status),
            _ => "still running".to_string(),
        };
        anyhow::anyhow!("`{}` {what} ({status}); its stderr: {}", self.what, self.stderr())
    }

    /// Waits for it to exit, which it must do with status 0.
    fn finish(mut self) -> Result<()> {
        let status = self.child.wait().with_context(|| format!("waiting for `{}`", self.what))?;
        ensure!(status.success(), "`{}` failed ({}): {}", self.what, process::describe(status), self.stderr());
        Ok(())
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = process::kill(self.child.id(), Signal::KILL);
        }
        let _ = self.child.wait();
    }
}

/// nginx and the backend, running in a namespace; stopped when dropped (the client is dropped
/// first: declared first).
pub struct Incident {
    client_loop: Option<Spawned>,
    nginx: Spawned,
    backend: Spawned,
    netns: String,
    programs: Programs,
    dir: PathBuf,
    pub ports: Ports,
}

impl Incident {
    /// Starts the backend and nginx in `netns` on `ports`, with nginx's prefix, configuration,
    /// pid file and logs in `dir` (made if missing; left in place for the logs to be read), and
    /// returns once both listen.
    pub fn start(programs: &Programs, netns: &NamedNetns, dir: &Path, ports: Ports) -> Result<Self> {
        let nginx_bin = on_path("nginx").with_context(|| {
            "`nginx` is not installed (not on PATH nor in /usr/sbin): `apt-get install nginx-light` (cargo xtask \
             test installs it)"
        })?;
        for sub in ["logs", "tmp"] {
            fs::create_dir_all(dir.join(sub)).with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let backend_args = vec!["-listen".to_string(), format!("127.0.0.1:{}", ports.backend)];
        let mut backend = Spawned::start(&netns.name, &programs.backend, &backend_args, dir.join("orderbackend.log"))?;
        let mut ready = String::new();
        BufReader::new(backend.stdout()?).read_line(&mut ready).context("reading orderbackend's stdout")?;
        if ready.trim() != "ready" {
            return Err(backend.failed(&format!("said {ready:?}, not \"ready\"")));
        }

        let config = dir.join("nginx.conf");
        fs::write(&config, nginx_config(dir, ports)).with_context(|| format!("writing {}", config.display()))?;
        let pid_file = dir.join("nginx.pid");
        let _ = fs::remove_file(&pid_file);
        let nginx_args = vec![
            "-p".to_string(),
            dir.display().to_string(),
            "-c".to_string(),
            config.display().to_string(),
            // The log of start-up, before the configuration's error_log applies.
            "-e".to_string(),
            dir.join("logs/error.log").display().to_string(),
        ];
        let mut nginx = Spawned::start(&netns.name, &nginx_bin, &nginx_args, dir.join("nginx.stderr"))?;
        // nginx writes its pid file once its listening socket is open.
        let deadline = Instant::now() + READY_WITHIN;
        while !pid_file.exists() {
            if !matches!(nginx.child.try_wait(), Ok(None)) {
                let log = fs::read_to_string(dir.join("logs/error.log")).unwrap_or_default();
                return Err(nginx.failed(&format!("exited before listening; its error log:\n{log}")));
            }
            if Instant::now() > deadline {
                return Err(nginx.failed(&format!("wrote no pid file within {READY_WITHIN:?}")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self {
            client_loop: None,
            nginx,
            backend,
            netns: netns.name.clone(),
            programs: programs.clone(),
            dir: dir.to_path_buf(),
            ports,
        })
    }

    pub fn nginx_pid(&self) -> u32 {
        self.nginx.pid()
    }

    pub fn backend_pid(&self) -> u32 {
        self.backend.pid()
    }

    /// nginx's address, as the client uses it.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.nginx)
    }

    fn client_args(&self, users: &[&str], every: Option<Duration>) -> Vec<String> {
        let mut args = vec!["-url".to_string(), self.url(), "-users".to_string(), users.join(",")];
        if let Some(every) = every {
            args.extend(["-every".to_string(), format!("{}ms", every.as_millis())]);
        }
        args
    }

    /// Runs the client once: one order per user, each failure retried three times. What it saw.
    pub fn place_orders(&self, users: &[&str]) -> Result<ClientRound> {
        let mut client = Spawned::start(
            &self.netns,
            &self.programs.client,
            &self.client_args(users, None),
            self.dir.join("ordercli.log"),
        )?;
        let mut line = String::new();
        BufReader::new(client.stdout()?).read_line(&mut line).context("reading ordercli's stdout")?;
        let round = ClientRound::parse(&line).map_err(|e| client.failed(&format!("printed no round: {e:#}")))?;
        client.finish()?;
        Ok(round)
    }

    /// Starts the client placing orders for `users` every `every` until the incident is
    /// dropped; its rounds go to `ordercli.out` in the directory, its complaints to
    /// `ordercli.log`.
    pub fn start_client_loop(&mut self, users: &[&str], every: Duration) -> Result<()> {
        let out = self.dir.join("ordercli.out");
        let file = fs::File::create(&out).with_context(|| format!("creating {}", out.display()))?;
        let client = Spawned::start_to(
            &self.netns,
            &self.programs.client,
            &self.client_args(users, Some(every)),
            self.dir.join("ordercli.log"),
            Stdio::from(file),
        )?;
        self.client_loop = Some(client);
        Ok(())
    }

    /// nginx's access and error logs as they are now.
    pub fn nginx_logs(&self) -> Result<NginxLogs> {
        NginxLogs::read(&self.dir.join("logs"))
    }

    /// The directory with nginx's configuration and logs and the programs' logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// nginx's configuration: one foreground process, everything under `dir`, one server on
/// `ports.nginx` proxying to the backend without retrying and without keep-alive.
fn nginx_config(dir: &Path, ports: Ports) -> String {
    let dir = dir.display();
    format!(
        r#"# Written by observer_testkit::incident.
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/logs/error.log error;
events {{
    worker_connections 512;
}}
http {{
    log_format incident escape=json '{{"status":$status,"upstream_status":"$upstream_status","upstream_addr":"$upstream_addr","upstream_bytes_received":"$upstream_bytes_received","request_uri":"$request_uri"}}';
    access_log {dir}/logs/access.log incident;
    client_body_temp_path {dir}/tmp/client_body;
    proxy_temp_path {dir}/tmp/proxy;
    server {{
        listen 127.0.0.1:{nginx};
        location / {{
            proxy_pass http://127.0.0.1:{backend};
            # nginx itself never retries: every retry is the client's, on a new connection.
            proxy_next_upstream off;
        }}
    }}
}}
"#,
        nginx = ports.nginx,
        backend = ports.backend,
    )
}

/// One round of the client, as it printed it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClientRound {
    pub orders: u64,
    pub failed: u64,
    pub attempts: u64,
    pub retries: u64,
    /// Answers by HTTP status.
    pub by_status: std::collections::BTreeMap<String, u64>,
    /// Go's error strings of attempts that got no answer.
    pub errors: std::collections::BTreeMap<String, u64>,
}

impl ClientRound {
    /// Two rounds' counts together.
    pub fn plus(mut self, other: &Self) -> Self {
        self.orders += other.orders;
        self.failed += other.failed;
        self.attempts += other.attempts;
        self.retries += other.retries;
        for (k, v) in &other.by_status {
            *self.by_status.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
        self
    }

    pub fn parse(line: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(line.trim()).with_context(|| format!("not JSON: {line:?}"))?;
        let n = |k: &str| v[k].as_u64().with_context(|| format!("no number {k} in {line}"));
        let counts = |k: &str| -> Result<_> {
            v[k].as_object()
                .with_context(|| format!("no object {k} in {line}"))?
                .iter()
                .map(|(name, count)| Ok((name.clone(), count.as_u64().with_context(|| format!("{k}.{name}"))?)))
                .collect()
        };
        Ok(Self {
            orders: n("orders")?,
            failed: n("failed")?,
            attempts: n("attempts")?,
            retries: n("retries")?,
            by_status: counts("by_status")?,
            errors: counts("errors")?,
        })
    }
}

/// One line of nginx's access log (`log_format incident`).
#[derive(Debug, Clone, PartialEq)]
pub struct AccessRecord {
    pub status: u16,
    pub upstream_status: String,
    pub upstream_addr: String,
    pub upstream_bytes_received: String,
    pub request_uri: String,
}

/// nginx's logs: the ground truth of the incident.
#[derive(Debug, Clone, Default)]
pub struct NginxLogs {
    pub access: Vec<AccessRecord>,
    /// The message of each `[error]` line (without time, pid, connection and the request's
    /// details): `upstream prematurely closed connection while reading response header from
    /// upstream`, ...
    pub errors: Vec<String>,
}

impl NginxLogs {
    pub fn read(logs: &Path) -> Result<Self> {
        let text = |name: &str| {
            let path = logs.join(name);
            fs::read_to_string(&path).with_context(|| format!("reading nginx's {}", path.display()))
        };
        let access = text("access.log")?.lines().map(parse_access).collect::<Result<_>>()?;
        let errors = text("error.log")?.lines().filter(|l| l.contains(" [error] ")).map(error_message).collect();
        Ok(Self { access, errors })
    }

    /// Error lines with exactly `message`.
    pub fn errors_saying(&self, message: &str) -> u64 {
        self.errors.iter().filter(|m| *m == message).count() as u64
    }

    /// Requests answered with `status`.
    pub fn status(&self, status: u16) -> u64 {
        self.access.iter().filter(|r| r.status == status).count() as u64
    }

    /// Upstream attempts: requests that nginx passed to an upstream.
    pub fn upstream_attempts(&self) -> u64 {
        self.access.iter().filter(|r| !r.upstream_addr.is_empty() && r.upstream_addr != "-").count() as u64
    }
}

fn parse_access(line: &str) -> Result<AccessRecord> {
    let v: Value =
        serde_json::from_str(line).with_context(|| format!("nginx's access log line is not JSON: {line}"))?;
    let s = |k: &str| v[k].as_str().map(str::to_string).with_context(|| format!("no {k} in {line}"));
    Ok(AccessRecord {
        status: v["status"]
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .with_context(|| format!("no status in {line}"))?,
        upstream_status: s("upstream_status")?,
        upstream_addr: s("upstream_addr")?,
        upstream_bytes_received: s("upstream_bytes_received")?,
        request_uri: s("request_uri")?,
    })
}

/// `2026/12/02 08:03:12 [error] 26791#26791: *3 MESSAGE, client: ...` → `MESSAGE`.
fn error_message(line: &str) -> String {
    let after_pid = line.split_once("#").and_then(|(_, rest)| rest.split_once(": ")).map_or(line, |(_, m)| m);
    let after_connection = match after_pid.strip_prefix('*') {
        Some(rest) => rest.split_once(' ').map_or(rest, |(_, m)| m),
        None => after_pid,
    };
    after_connection.split(", client: ").next().unwrap_or(after_connection).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_lines_reduce_to_their_message() {
        let line = "2026/12/02 08:03:12 [error] 26791#26791: *11 upstream prematurely closed connection while \
                    reading response header from upstream, client: 127.0.0.1, server: , request: \"GET \
                    /order?user=ghost-silent HTTP/1.1\", upstream: \"http://127.0.0.1:8080/order\", host: \"x\"";
        assert_eq!(error_message(line), NGINX_UPSTREAM_CLOSED);
    }

    #[test]
    fn access_lines_and_client_rounds_parse() {
        let r = parse_access(r#"{"status":502,"upstream_status":"502","upstream_addr":"127.0.0.1:8080","upstream_bytes_received":"24","request_uri":"/order?user=a-cut"}"#).unwrap();
        assert_eq!((r.status, r.upstream_bytes_received.as_str()), (502, "24"));
        let round = ClientRound::parse(
            r#"{"orders":4,"failed":3,"attempts":13,"retries":9,"by_status":{"200":1,"502":12},"errors":{}}"#,
        )
        .unwrap();
        assert_eq!((round.attempts, round.by_status["502"]), (13, 12));
    }

    #[test]
    fn the_user_name_chooses_the_failure() {
        assert_eq!(Failure::of("alice"), None);
        assert_eq!(Failure::of("mallory-cut"), Some(Failure::Cut));
        assert_eq!(Failure::of("ghost"), Some(Failure::Cut));
        assert_eq!(Failure::of("peggy-silent"), Some(Failure::Silent));
        assert_eq!(Failure::of("sybil-abort"), Some(Failure::Abort));
    }
}
