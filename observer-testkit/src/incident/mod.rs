//! The incident observer was born from, reproduced on one machine: nginx (Debian's `nginx-light`)
//! reverse-proxies to a Go order service that, for unknown users, cuts the connection after a
//! bodiless status line, sometimes closes without answering and sometimes aborts; a Go client
//! retries every error three times, each attempt on a new connection. The service can also fail
//! the way a net/http handler does (`panic(http.ErrAbortHandler)`): before its status line,
//! after part of a `Content-Length` body, or in the middle of a chunked body ([`Failure`]).
//!
//! The same code runs the `incident` test (`observer/tests/incident/`) and `cargo xtask
//! incident`, the README's walk-through. Everything runs inside one network namespace of the
//! caller's ([`NamedNetns`]) on its loopback, so nothing listens on the host's; every process
//! started here is killed when its guard is dropped, and also if the process that started it
//! dies (`PR_SET_PDEATHSIG`).
//!
//! | process (`comm`) | what |
//! |---|---|
//! | `ordercli` | [`ordercli.go`](ordercli.go): one order per user, each answer read to its end, every error (a 5xx, no answer or a body cut short) retried three times; one JSON line per round ([`ClientRound`]) |
//! | `nginx` | in the foreground, one process (`master_process off`), its own prefix, pid file and logs; HTTP/1.1 to the backend (so that it can answer chunked); `proxy_next_upstream off` (nginx never retries by itself); no upstream keep-alive (one backend connection per request, `Connection: close`) unless [`Options::keep_alive`] |
//! | `orderbackend` | [`orderbackend.go`](orderbackend.go): known users get their order; an unknown user's last `-` part chooses how it fails ([`Failure`]) |
//!
//! nginx's own logs are the ground truth ([`NginxLogs`]): an access log line per request with
//! `$upstream_status`, `$upstream_addr`, `$upstream_bytes_received`, `$request_method`,
//! `$upstream_connect_time`, `$connection` and `$connection_requests` (JSON, `escape=json`), an
//! error log line per failed upstream attempt and, with keep-alive, a debug log that says which
//! requests went on a reused upstream connection.
//!
//! With [`Options::keep_alive`] ([`KeepAlive`]) nginx keeps idle connections to the backend
//! (`keepalive N`), the backend closes a connection idle for [`KeepAlive::idle_timeout`] and the
//! client POSTs its orders [`KeepAlive::gap`] apart: now and then the backend closes an idle
//! connection just as nginx sends the next request on it, and nginx answers 502
//! ([`NginxLogs::reused_upstream_502s`]).
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{BufRead, BufReader},
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
/// What nginx's error log says about an upstream attempt closed without an answer (`silent`
/// and `panic`).
pub const NGINX_UPSTREAM_CLOSED: &str =
    "upstream prematurely closed connection while reading response header from upstream";
/// What nginx 1.22's error log says about an upstream attempt closed in the middle of the body
/// (`truncated`: fewer bytes than its `Content-Length`; `chunked`: no last chunk). nginx has
/// passed the status line and the bytes it got on to the client already; it logs the status
/// the backend sent (200) and closes the client's connection.
pub const NGINX_UPSTREAM_CLOSED_IN_BODY: &str = "upstream prematurely closed connection while reading upstream";

/// What Go's client says (`err.Error()`, and `errors.Is(err, io.ErrUnexpectedEOF)`) when the
/// body of an answer ends before its `Content-Length` or its last chunk: reading a `truncated`
/// or `chunked` answer through nginx.
pub const GO_UNEXPECTED_EOF: &str = "unexpected EOF";

/// The bodiless status line of a `cut` answer, all the bytes nginx receives before the RST.
pub const CUT_STATUS_LINE: &str = "HTTP/1.1 404 Not Found\r\n";
/// The `Content-Length` a `truncated` answer declares.
pub const TRUNCATED_CONTENT_LENGTH: u64 = 100;
/// The body bytes a `truncated` answer sends of those, and the one chunk of a `chunked` answer.
pub const TRUNCATED_BODY: &str = "{\"user\":";

const BACKEND_SOURCE: &str = include_str!("orderbackend.go");
const CLIENT_SOURCE: &str = include_str!("ordercli.go");

/// How long a process may take to start listening before that counts as a hang.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// How the backend fails an unknown user: the last `-` part of the user's name. What each
/// looks like from nginx's side was read in nginx 1.22's logs ([`Failure::nginx_error`],
/// [`Failure::nginx_status`]); none of them sends an RST but `cut` and `abort`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// `HTTP/1.1 404 Not Found` and nothing more, then an RST (SO_LINGER 0).
    Cut,
    /// Closed without an answer (FIN).
    Silent,
    /// Aborted without an answer (RST, SO_LINGER 0).
    Abort,
    /// `w.WriteHeader(404)`, then `panic(http.ErrAbortHandler)`: net/http had not written the
    /// header yet, so no byte is sent; it closes the connection (FIN).
    Panic,
    /// `Content-Length: 100` ([`TRUNCATED_CONTENT_LENGTH`]), 8 bytes of body
    /// ([`TRUNCATED_BODY`]), flushed, then `panic(http.ErrAbortHandler)` (FIN).
    Truncated,
    /// A chunked answer (no `Content-Length`): one chunk ([`TRUNCATED_BODY`]), flushed, then
    /// `panic(http.ErrAbortHandler)`, so no last chunk (FIN). Only because nginx speaks
    /// HTTP/1.1 to the backend: to an HTTP/1.0 request net/http answers without chunks and ends
    /// the body by closing, and nginx takes the cut answer for a whole one (200, nothing
    /// logged, the client none the wiser).
    Chunked,
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
            Some("panic") => Self::Panic,
            Some("truncated") => Self::Truncated,
            Some("chunked") => Self::Chunked,
            _ => Self::Cut,
        })
    }

    /// nginx's error log line for each attempt.
    pub fn nginx_error(self) -> &'static str {
        match self {
            Self::Cut | Self::Abort => NGINX_UPSTREAM_RESET,
            Self::Silent | Self::Panic => NGINX_UPSTREAM_CLOSED,
            Self::Truncated | Self::Chunked => NGINX_UPSTREAM_CLOSED_IN_BODY,
        }
    }

    /// The status of nginx's answer (its access log's `$status`): 502 when the backend sent no
    /// status line nginx could use, else the backend's 200, sent on before the body was cut.
    pub fn nginx_status(self) -> u16 {
        match self {
            Self::Cut | Self::Silent | Self::Abort | Self::Panic => 502,
            Self::Truncated | Self::Chunked => 200,
        }
    }

    /// Whether the client's attempt fails with Go's `unexpected EOF` ([`GO_UNEXPECTED_EOF`],
    /// reading the body nginx cut short) rather than with nginx's 502.
    pub fn client_unexpected_eof(self) -> bool {
        self.nginx_status() != 502
    }
}

/// The users `orderbackend.go` knows (its `known` map).
pub const KNOWN_USERS: &[&str] = &["alice", "bob", "carol", "dave", "erin"];

/// The users the walk-through orders for each round: three known, one unknown of each failure.
pub const WALKTHROUGH_USERS: &[&str] = &["alice", "mallory-cut", "bob", "peggy-silent", "carol", "sybil-abort"];

/// `n` orders of known users (the five in turn): the orders of a keep-alive race, which only
/// the race can fail.
pub fn known_users(n: usize) -> Vec<&'static str> {
    KNOWN_USERS.iter().copied().cycle().take(n).collect()
}

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

/// How the incident is set up beyond its ports; the default is the incident as it happened
/// (no upstream keep-alive).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// Keep-alive between nginx and the backend, and the client's pace to race it.
    pub keep_alive: Option<KeepAlive>,
}

/// Upstream keep-alive, and the race it brings: the backend closes a connection that has been
/// idle for [`KeepAlive::idle_timeout`] just as nginx sends the next request on it. nginx then
/// has written a request on a connection whose other end is gone (it gets a FIN or an RST
/// before any answer) and answers 502 (error log: [`NGINX_UPSTREAM_CLOSED`] or
/// [`NGINX_UPSTREAM_RESET`]): it does not retry a POST on another connection, even under its
/// default `proxy_next_upstream error timeout` (a GET it would retry: `$upstream_status` `502,
/// 200`); here `proxy_next_upstream` stays `off` anyway.
///
/// - nginx: `upstream { server ...; keepalive N; }`, `proxy_http_version 1.1`,
///   `proxy_set_header Connection ""`, and a debug log (`logs/debug.log`, Debian's nginx is
///   built `--with-debug`) that says which requests went on a reused connection
///   ([`NginxLogs::reused_upstream_502s`]); it makes nginx slower, and the race more frequent.
/// - the backend: `http.Server{IdleTimeout: idle_timeout}`.
/// - the client: POST, each order [`KeepAlive::gap`] ± [`KeepAlive::jitter`] (uniformly) after
///   the previous one ended. nginx's one connection to the backend (the client's orders come
///   one at a time) is idle for the gap plus the time from the backend's answer to the client's
///   next request reaching nginx, which varies between about 0.5 and 3 ms on a 2-core VM: the
///   jitter spreads the orders over that range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepAlive {
    /// nginx's `keepalive N`: idle connections to the backend it keeps.
    pub connections: u32,
    /// The backend's `http.Server.IdleTimeout`.
    pub idle_timeout: Duration,
    /// The client's pause between two orders (ordercli's `-gap`).
    pub gap: Duration,
    /// How much the pause varies either way (ordercli's `-jitter`).
    pub jitter: Duration,
}

impl KeepAlive {
    /// Parameters that make the race happen dozens of times in [`KeepAlive::RACE_ORDERS`]
    /// orders (about nine seconds): on a busy 2-core VM, 70 to 95 502s in each of 13 runs, about
    /// half the requests on a reused connection, and a debug log of about 11 MB
    /// (`examples/incident_shapes.rs` runs it and counts). The jitter spreads the orders over
    /// gaps of 7 to 10 ms, the whole range over which the connection goes from almost always
    /// reused to almost never.
    pub const RACE: Self = Self {
        connections: 8,
        idle_timeout: Duration::from_millis(10),
        gap: Duration::from_micros(8500),
        jitter: Duration::from_micros(1500),
    };

    /// Orders to place with [`KeepAlive::RACE`] ([`known_users`]).
    pub const RACE_ORDERS: usize = 800;
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
    pub options: Options,
}

impl Incident {
    /// Starts the backend and nginx in `netns` on `ports`, with nginx's prefix, configuration,
    /// pid file and logs in `dir` (made if missing; left in place for the logs to be read), and
    /// returns once both listen.
    pub fn start(programs: &Programs, netns: &NamedNetns, dir: &Path, ports: Ports) -> Result<Self> {
        Self::start_with(programs, netns, dir, ports, Options::default())
    }

    /// [`Incident::start`], set up as `options` says.
    pub fn start_with(
        programs: &Programs,
        netns: &NamedNetns,
        dir: &Path,
        ports: Ports,
        options: Options,
    ) -> Result<Self> {
        let nginx_bin = on_path("nginx").with_context(|| {
            "`nginx` is not installed (not on PATH nor in /usr/sbin): `apt-get install nginx-light` (cargo xtask \
             test installs it)"
        })?;
        for sub in ["logs", "tmp"] {
            fs::create_dir_all(dir.join(sub)).with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let mut backend_args = vec!["-listen".to_string(), format!("127.0.0.1:{}", ports.backend)];
        if let Some(keep_alive) = options.keep_alive {
            backend_args.extend(["-idle-timeout".to_string(), go_duration(keep_alive.idle_timeout)]);
        }
        let mut backend = Spawned::start(&netns.name, &programs.backend, &backend_args, dir.join("orderbackend.log"))?;
        let mut ready = String::new();
        BufReader::new(backend.stdout()?).read_line(&mut ready).context("reading orderbackend's stdout")?;
        if ready.trim() != "ready" {
            return Err(backend.failed(&format!("said {ready:?}, not \"ready\"")));
        }

        let config = dir.join("nginx.conf");
        fs::write(&config, nginx_config(dir, ports, options))
            .with_context(|| format!("writing {}", config.display()))?;
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
            options,
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
        if let Some(keep_alive) = self.options.keep_alive {
            args.extend([
                "-method".to_string(),
                "POST".to_string(),
                "-gap".to_string(),
                go_duration(keep_alive.gap),
                "-jitter".to_string(),
                go_duration(keep_alive.jitter),
            ]);
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

/// `d` as Go's `time.ParseDuration` reads it.
fn go_duration(d: Duration) -> String {
    format!("{}us", d.as_micros())
}

/// nginx's configuration: one foreground process, everything under `dir`, one server on
/// `ports.nginx` proxying to the backend over HTTP/1.1 without retrying; without keep-alive
/// (nginx's default `Connection: close` to the backend) unless `options.keep_alive`.
fn nginx_config(dir: &Path, ports: Ports, options: Options) -> String {
    let dir = dir.display();
    let backend = ports.backend;
    let (debug_log, upstream, proxy) = match options.keep_alive {
        None => (String::new(), String::new(), format!("proxy_pass http://127.0.0.1:{backend};")),
        Some(keep_alive) => (
            // Which request went on a reused connection: only the debug log says
            // (NginxLogs::reused_upstream_502s).
            format!("error_log {dir}/logs/{DEBUG_LOG} debug;\n"),
            format!(
                "upstream orderbackend {{\n        server 127.0.0.1:{backend};\n        keepalive {};\n    }}\n    ",
                keep_alive.connections
            ),
            "proxy_pass http://orderbackend;\n            proxy_set_header Connection \"\";".to_string(),
        ),
    };
    format!(
        r#"# Written by observer_testkit::incident.
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/logs/error.log error;
{debug_log}events {{
    worker_connections 512;
}}
http {{
    log_format incident escape=json '{{"status":$status,"upstream_status":"$upstream_status","upstream_addr":"$upstream_addr","upstream_bytes_received":"$upstream_bytes_received","request_uri":"$request_uri","request_method":"$request_method","upstream_connect_time":"$upstream_connect_time","connection":"$connection","connection_requests":"$connection_requests"}}';
    access_log {dir}/logs/access.log incident;
    client_body_temp_path {dir}/tmp/client_body;
    proxy_temp_path {dir}/tmp/proxy;
    {upstream}server {{
        listen 127.0.0.1:{nginx};
        location / {{
            {proxy}
            # HTTP/1.1, so that the backend can answer chunked (Failure::Chunked).
            proxy_http_version 1.1;
            # nginx itself never retries: every retry is the client's, on a new connection.
            proxy_next_upstream off;
        }}
    }}
}}
"#,
        nginx = ports.nginx,
    )
}

/// One round of the client, as it printed it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClientRound {
    pub orders: u64,
    pub failed: u64,
    pub attempts: u64,
    pub retries: u64,
    /// Status lines received, by HTTP status (also those whose body was then cut short).
    pub by_status: BTreeMap<String, u64>,
    /// Go's error strings of attempts that failed with an error: no answer at all, or an answer
    /// whose body was cut short ([`GO_UNEXPECTED_EOF`]).
    pub errors: BTreeMap<String, u64>,
    /// Attempts that failed with Go's `io.ErrUnexpectedEOF` (`errors.Is`): through nginx, an
    /// answer whose body ended before its `Content-Length` or its last chunk.
    pub unexpected_eof: u64,
    /// Attempts that failed with any other error.
    pub other_errors: u64,
}

impl ClientRound {
    /// Two rounds' counts together.
    pub fn plus(mut self, other: &Self) -> Self {
        self.orders += other.orders;
        self.failed += other.failed;
        self.attempts += other.attempts;
        self.retries += other.retries;
        self.unexpected_eof += other.unexpected_eof;
        self.other_errors += other.other_errors;
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
            unexpected_eof: n("unexpected_eof")?,
            other_errors: n("other_errors")?,
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
    /// `GET`, `POST`.
    pub request_method: String,
    /// `$upstream_connect_time`: seconds, `0.000` on loopback for most new connections and for
    /// every reused one alike, so it does not tell them apart.
    pub upstream_connect_time: String,
    /// `$connection`: the serial number of the client's connection, as the error and debug
    /// logs show it (`*N`).
    pub connection: u64,
    /// `$connection_requests`: the request's number on that connection (from 1).
    pub connection_requests: u64,
}

/// nginx's debug log, written with [`Options::keep_alive`] only.
const DEBUG_LOG: &str = "debug.log";

/// nginx's logs: the ground truth of the incident.
#[derive(Debug, Clone, Default)]
pub struct NginxLogs {
    pub access: Vec<AccessRecord>,
    /// The message of each `[error]` line (without time, pid, connection and the request's
    /// details): `upstream prematurely closed connection while reading response header from
    /// upstream`, ...
    pub errors: Vec<String>,
    /// The same messages by the client connection whose request they are about (`*N`, the
    /// access log's `$connection`).
    pub errors_by_connection: BTreeMap<u64, Vec<String>>,
    /// From the debug log (keep-alive only, else `None`): the requests nginx sent on a
    /// connection to the backend it had kept from an earlier request, as (`$connection`,
    /// `$connection_requests`).
    pub reused_upstream: Option<BTreeSet<(u64, u64)>>,
}

impl NginxLogs {
    pub fn read(logs: &Path) -> Result<Self> {
        let text = |name: &str| {
            let path = logs.join(name);
            fs::read_to_string(&path).with_context(|| format!("reading nginx's {}", path.display()))
        };
        let access = text("access.log")?.lines().map(parse_access).collect::<Result<_>>()?;
        let error_log = text("error.log")?;
        let error_lines: Vec<&str> = error_log.lines().filter(|l| l.contains(" [error] ")).collect();
        let errors = error_lines.iter().copied().map(error_message).collect();
        let mut errors_by_connection: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for line in error_lines {
            if let Some(connection) = error_connection(line) {
                errors_by_connection.entry(connection).or_default().push(error_message(line));
            }
        }
        let debug = logs.join(DEBUG_LOG);
        let reused_upstream = match fs::File::open(&debug) {
            Ok(file) => Some(
                reused_upstream(BufReader::new(file))
                    .with_context(|| format!("reading nginx's {}", debug.display()))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("opening nginx's {}", debug.display())),
        };
        Ok(Self { access, errors, errors_by_connection, reused_upstream })
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

    /// The error lines about `record`'s client connection (its request's, when the client
    /// makes one request per connection, as `ordercli` does).
    pub fn errors_of(&self, record: &AccessRecord) -> &[String] {
        self.errors_by_connection.get(&record.connection).map_or(&[], Vec::as_slice)
    }

    /// Whether nginx sent `record`'s request on a reused (kept-alive) connection to the
    /// backend; an error without the debug log (no keep-alive).
    pub fn on_reused_upstream(&self, record: &AccessRecord) -> Result<bool> {
        let reused = self.reused_upstream.as_ref().context(
            "nginx wrote no debug log, the only one that says which request went on a reused upstream connection \
             (the incident runs without keep-alive)",
        )?;
        Ok(reused.contains(&(record.connection, record.connection_requests)))
    }

    /// Requests nginx sent on a reused connection to the backend (whatever came of them).
    pub fn reused_upstream_requests(&self) -> Result<u64> {
        let mut n = 0;
        for r in &self.access {
            n += u64::from(self.on_reused_upstream(r)?);
        }
        Ok(n)
    }

    /// The keep-alive race's 502s: requests nginx answered 502 after sending them on a
    /// connection to the backend that it had kept from an earlier request.
    ///
    /// nginx's access and error logs cannot tell a reused upstream connection from a new one:
    /// `$upstream_connect_time` is `0.000` for a reused connection (nginx takes the time when it
    /// starts sending the request, right away for a kept one), but also for most new ones on
    /// loopback, and nginx 1.22 has no variable for it. Its debug log does: for each request it
    /// proxies, the keepalive module logs `get keepalive peer`, followed by `get keepalive peer:
    /// using connection 0x...` when it takes a kept connection, both on the line of the client
    /// connection's serial number (`*N`, the access log's `$connection`). The requests of one
    /// client connection come one after another and nginx never retries (`proxy_next_upstream
    /// off`: one upstream attempt per request), so the k-th `get keepalive peer` of `*N` is the
    /// request with `$connection` N and `$connection_requests` k.
    ///
    /// Checked against the kernel: with one connection per client attempt, the requests on a
    /// reused connection counted so equal the attempts minus nginx's new connections to the
    /// backend, which are the namespace's `Tcp: ActiveOpens` minus the client's attempts
    /// (`examples/incident_shapes.rs`).
    pub fn reused_upstream_502s(&self) -> Result<u64> {
        let mut n = 0;
        for r in self.access.iter().filter(|r| r.status == 502) {
            n += u64::from(self.on_reused_upstream(r)?);
        }
        Ok(n)
    }
}

/// The requests on a reused upstream connection, from nginx's debug log: (`*N`, the number of
/// `get keepalive peer` lines of `*N` so far) for each `get keepalive peer: using connection`.
/// Lines that are not a debug line of a connection (the request headers nginx dumps span
/// several lines) are skipped.
fn reused_upstream(debug: impl BufRead) -> Result<BTreeSet<(u64, u64)>> {
    let mut gets: BTreeMap<u64, u64> = BTreeMap::new();
    let mut reused = BTreeSet::new();
    for line in debug.split(b'\n') {
        let line = line?;
        // Only the keepalive module's lines matter (a few in a hundred): the others are not
        // even decoded (nginx writes what it got, not necessarily UTF-8).
        if !line.windows(GET_KEEPALIVE_PEER.len()).any(|w| w == GET_KEEPALIVE_PEER.as_bytes()) {
            continue;
        }
        let Ok(line) = std::str::from_utf8(&line) else { continue };
        let Some((connection, message)) = debug_line(line) else { continue };
        if message == GET_KEEPALIVE_PEER {
            *gets.entry(connection).or_default() += 1;
        } else if message.starts_with(USING_CONNECTION) {
            let k = gets.get(&connection).copied().with_context(|| {
                format!("`{USING_CONNECTION}` of *{connection} without a `{GET_KEEPALIVE_PEER}` before: {line}")
            })?;
            reused.insert((connection, k));
        }
    }
    Ok(reused)
}

const GET_KEEPALIVE_PEER: &str = "get keepalive peer";
const USING_CONNECTION: &str = "get keepalive peer: using connection ";

/// `2026/12/07 03:12:58 [debug] 1772#1772: *3 MESSAGE` → (3, `MESSAGE`).
fn debug_line(line: &str) -> Option<(u64, &str)> {
    let (_, rest) = line.split_once(" [debug] ")?;
    let (_, rest) = rest.split_once(": *")?;
    let (connection, message) = rest.split_once(' ')?;
    Some((connection.parse().ok()?, message))
}

fn parse_access(line: &str) -> Result<AccessRecord> {
    let v: Value =
        serde_json::from_str(line).with_context(|| format!("nginx's access log line is not JSON: {line}"))?;
    let s = |k: &str| v[k].as_str().map(str::to_string).with_context(|| format!("no {k} in {line}"));
    let n = |k: &str| -> Result<u64> { s(k)?.parse().with_context(|| format!("{k} is not a number in {line}")) };
    Ok(AccessRecord {
        status: v["status"]
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .with_context(|| format!("no status in {line}"))?,
        upstream_status: s("upstream_status")?,
        upstream_addr: s("upstream_addr")?,
        upstream_bytes_received: s("upstream_bytes_received")?,
        request_uri: s("request_uri")?,
        request_method: s("request_method")?,
        upstream_connect_time: s("upstream_connect_time")?,
        connection: n("connection")?,
        connection_requests: n("connection_requests")?,
    })
}

/// `2026/12/02 08:03:12 [error] 26791#26791: *3 MESSAGE, client: ...` → 3.
fn error_connection(line: &str) -> Option<u64> {
    let (_, rest) = line.split_once(": *")?;
    rest.split_once(' ')?.0.parse().ok()
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
        // nginx 1.22, a `truncated` answer.
        let line = "2026/12/07 03:09:10 [error] 26609#26609: *11 upstream prematurely closed connection while \
                    reading upstream, client: 127.0.0.1, server: , request: \"GET /order?user=y-truncated \
                    HTTP/1.1\", upstream: \"http://127.0.0.1:8080/order?user=y-truncated\", host: \"127.0.0.1:8000\"";
        assert_eq!(error_message(line), NGINX_UPSTREAM_CLOSED_IN_BODY);
        assert_eq!(error_connection(line), Some(11));
    }

    #[test]
    fn access_lines_and_client_rounds_parse() {
        let r = parse_access(r#"{"status":502,"upstream_status":"502","upstream_addr":"127.0.0.1:8080","upstream_bytes_received":"24","request_uri":"/order?user=a-cut","request_method":"GET","upstream_connect_time":"0.000","connection":"35","connection_requests":"1"}"#).unwrap();
        assert_eq!((r.status, r.upstream_bytes_received.as_str()), (502, "24"));
        assert_eq!((r.request_method.as_str(), r.upstream_connect_time.as_str()), ("GET", "0.000"));
        assert_eq!((r.connection, r.connection_requests), (35, 1));
        // A line of the format before $connection: not this format.
        assert!(parse_access(r#"{"status":200,"upstream_status":"200","upstream_addr":"127.0.0.1:8080","upstream_bytes_received":"163","request_uri":"/order?user=alice"}"#).is_err());
        let round = ClientRound::parse(
            r#"{"orders":4,"failed":3,"attempts":13,"retries":9,"by_status":{"200":1,"502":12},"errors":{},"unexpected_eof":0,"other_errors":0}"#,
        )
        .unwrap();
        assert_eq!((round.attempts, round.by_status["502"]), (13, 12));
    }

    #[test]
    fn client_rounds_count_unexpected_eofs_apart() {
        // ordercli's line for alice, x-panic, y-truncated, z-chunked, w-silent (nginx 1.22).
        let round = ClientRound::parse(
            r#"{"orders":5,"failed":4,"attempts":17,"retries":12,"by_status":{"200":9,"502":8},"errors":{"unexpected EOF":8},"unexpected_eof":8,"other_errors":0}"#,
        )
        .unwrap();
        assert_eq!((round.unexpected_eof, round.other_errors, round.errors[GO_UNEXPECTED_EOF]), (8, 0, 8));
        let other = ClientRound { other_errors: 2, unexpected_eof: 1, ..ClientRound::default() };
        let both = round.plus(&other);
        assert_eq!((both.unexpected_eof, both.other_errors), (9, 2));
        // A line without the counts is an older client's: refused rather than read as zeros.
        assert!(
            ClientRound::parse(r#"{"orders":1,"failed":0,"attempts":1,"retries":0,"by_status":{"200":1},"errors":{}}"#)
                .is_err()
        );
    }

    #[test]
    fn the_user_name_chooses_the_failure() {
        assert_eq!(Failure::of("alice"), None);
        assert_eq!(Failure::of("mallory-cut"), Some(Failure::Cut));
        assert_eq!(Failure::of("ghost"), Some(Failure::Cut));
        assert_eq!(Failure::of("peggy-silent"), Some(Failure::Silent));
        assert_eq!(Failure::of("sybil-abort"), Some(Failure::Abort));
        assert_eq!(Failure::of("x-panic"), Some(Failure::Panic));
        assert_eq!(Failure::of("y-truncated"), Some(Failure::Truncated));
        assert_eq!(Failure::of("z-chunked"), Some(Failure::Chunked));
        assert_eq!(Failure::Panic.nginx_error(), NGINX_UPSTREAM_CLOSED);
        assert_eq!(
            (Failure::Chunked.nginx_error(), Failure::Chunked.nginx_status()),
            (NGINX_UPSTREAM_CLOSED_IN_BODY, 200)
        );
        assert!(Failure::Truncated.client_unexpected_eof() && !Failure::Panic.client_unexpected_eof());
        assert_eq!(known_users(7), ["alice", "bob", "carol", "dave", "erin", "alice", "bob"]);
    }

    /// nginx 1.22's debug log with upstream keep-alive, cut down: *1 opens the connection to the
    /// backend and keeps it, *3 reuses it (and dumps its request headers over several lines),
    /// *5 is a client connection with two requests: a new upstream connection, then a reused
    /// one.
    const DEBUG: &str = "\
2026/12/07 03:13:27 [debug] 2486#2486: *1 init keepalive peer
2026/12/07 03:13:27 [debug] 2486#2486: *1 get keepalive peer
2026/12/07 03:13:27 [debug] 2486#2486: *1 get rr peer, try: 1
2026/12/07 03:13:27 [debug] 2486#2486: *1 stream socket 11
2026/12/07 03:13:27 [debug] 2486#2486: *1 connect to 127.0.0.1:8080, fd:11 #2
2026/12/07 03:13:27 [debug] 2486#2486: *1 free keepalive peer
2026/12/07 03:13:27 [debug] 2486#2486: *1 free keepalive peer: saving connection 00005573B3917E50
2026/12/07 03:13:27 [debug] 2486#2486: *3 init keepalive peer
2026/12/07 03:13:27 [debug] 2486#2486: *3 get keepalive peer
2026/12/07 03:13:27 [debug] 2486#2486: *3 get rr peer, try: 1
2026/12/07 03:13:27 [debug] 2486#2486: *3 get keepalive peer: using connection 00005573B3917E50
2026/12/07 03:13:27 [debug] 2486#2486: *3 http upstream connect: -4
2026/12/07 03:13:27 [debug] 2486#2486: *3 http proxy header:
\"POST /order?user=alice HTTP/1.1
Host: orderbackend
get keepalive peer: using connection 1
\"
2026/12/07 03:13:27 [debug] 2486#2486: *3 writev: 173 of 173
2026/12/07 03:13:27 [debug] 2486#2486: *3 recv: fd:11 0 of 4096
2026/12/07 03:13:27 [error] 2486#2486: *3 upstream prematurely closed connection while reading response header from upstream, client: 127.0.0.1
2026/12/07 03:13:27 [debug] 2486#2486: *5 get keepalive peer
2026/12/07 03:13:27 [debug] 2486#2486: *5 connect to 127.0.0.1:8080, fd:12 #6
2026/12/07 03:13:27 [debug] 2486#2486: *5 free keepalive peer: saving connection 00005573B3917F20
2026/12/07 03:13:27 [debug] 2486#2486: *5 get keepalive peer
2026/12/07 03:13:27 [debug] 2486#2486: *5 get keepalive peer: using connection 00005573B3917F20
";

    #[test]
    fn the_debug_log_says_which_requests_reused_an_upstream_connection() {
        let reused = reused_upstream(DEBUG.as_bytes()).unwrap();
        assert_eq!(reused, BTreeSet::from([(3, 1), (5, 2)]));
        let access = |status: u16, connection: u64, connection_requests: u64| AccessRecord {
            status,
            upstream_status: status.to_string(),
            upstream_addr: "127.0.0.1:8080".into(),
            upstream_bytes_received: "0".into(),
            request_uri: "/order?user=alice".into(),
            request_method: "POST".into(),
            upstream_connect_time: "0.000".into(),
            connection,
            connection_requests,
        };
        let logs = NginxLogs {
            access: vec![access(200, 1, 1), access(502, 3, 1), access(502, 5, 1), access(200, 5, 2)],
            errors: vec![NGINX_UPSTREAM_CLOSED.into(), NGINX_UPSTREAM_RESET.into()],
            errors_by_connection: [(3, vec![NGINX_UPSTREAM_CLOSED.into()]), (5, vec![NGINX_UPSTREAM_RESET.into()])]
                .into(),
            reused_upstream: Some(reused),
        };
        // *5's first request went on a new connection: its 502 is not the race's.
        assert_eq!(logs.reused_upstream_502s().unwrap(), 1);
        assert_eq!(logs.reused_upstream_requests().unwrap(), 2);
        assert_eq!(logs.errors_of(&logs.access[1]), [NGINX_UPSTREAM_CLOSED]);
        assert!(logs.errors_of(&logs.access[0]).is_empty());
        let without = NginxLogs { reused_upstream: None, ..logs };
        assert!(without.reused_upstream_502s().is_err());
        // `using connection` without its `get keepalive peer`: not a log this parser knows.
        assert!(
            reused_upstream("2026/12/07 03:13:27 [debug] 1#1: *9 get keepalive peer: using connection 0\n".as_bytes())
                .is_err()
        );
    }

    #[test]
    fn keep_alive_is_in_nginx_s_configuration_only_when_asked_for() {
        let dir = Path::new("/run/x");
        let plain = nginx_config(dir, Ports::default(), Options::default());
        assert!(plain.contains("proxy_pass http://127.0.0.1:8080;") && plain.contains("proxy_http_version 1.1;"));
        assert!(!plain.contains("keepalive") && !plain.contains("debug") && !plain.contains("Connection"));
        let race = nginx_config(dir, Ports::default(), Options { keep_alive: Some(KeepAlive::RACE) });
        for needle in [
            "upstream orderbackend {\n        server 127.0.0.1:8080;\n        keepalive 8;\n    }",
            "proxy_pass http://orderbackend;",
            "proxy_set_header Connection \"\";",
            "error_log /run/x/logs/debug.log debug;\nevents",
            "proxy_next_upstream off;",
        ] {
            assert!(race.contains(needle), "{needle:?} is not in\n{race}");
        }
        assert_eq!(go_duration(KeepAlive::RACE.gap), "8500us");
    }
}
