//! The load generator: a child process (`observer-bench --worker NAME`, i.e. this binary run
//! again) that lives in its own network namespace and makes traffic on command.
//!
//! Why a process of its own: the daemon is pointed at the namespace (`--netns`), so nothing else
//! on the host (other builds, the benchmark's own scrapes) is counted; and the process has a
//! known name (`comm`), so every series it causes can be checked against what it did.
//!
//! Protocol: the worker prints `netns /proc/PID/ns/net`, then reads one JSON [`Command`] per line
//! on stdin and answers with JSON lines on stdout: `{"mark":"start"}` / `{"mark":"end"}` around
//! the measured window (so the parent can sample CPU and memory exactly then), then
//! `{"result":...}` or `{"error":"..."}`. It exits at EOF on stdin, or when the parent dies.
use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener},
    os::fd::AsFd as _,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, ChildStdin, ChildStdout, Command as Process, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use observer_testkit::{net as testkit_net, process};

use super::net;

/// Where the servers listen, inside the worker's namespace.
const SERVER_IP: Ipv4Addr = Ipv4Addr::LOCALHOST;
const GRACEFUL_PORT: u16 = 8080;
const LINGER_PORT: u16 = 8081;
const UNREAD_PORT: u16 = 8082;
/// Nothing listens here: connects are answered with RST.
const CLOSED_PORT: u16 = 8083;
/// First of the ports the scrape benchmark's series are spread over.
const SERIES_BASE_PORT: u16 = 10_000;
/// A connection that gets no answer for this long is an error, not a hang.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// One kind of connection the worker makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Request, response, the server closes first, the client reads to EOF.
    Graceful,
    /// The server accepts and aborts with SO_LINGER {1, 0}: one RST, the client's read fails
    /// with ECONNRESET.
    Linger0,
    /// The client sends a request the server never reads; the server's close sends an RST.
    Unread,
    /// Connect to a port nobody listens on: the kernel answers the SYN with an RST.
    Refused,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// Graceful connections as fast as `clients` threads can make them, against `servers`
    /// accepting threads (SO_REUSEPORT listeners on one port).
    Churn { warmup_ms: u64, duration_ms: u64, clients: usize, servers: usize },
    /// RSTs: `refused` threads connecting to a closed port, `linger` threads whose connections
    /// the server aborts with SO_LINGER 0; each thread makes `rate` connections per second, or
    /// as many as it can with 0.
    Storm { warmup_ms: u64, duration_ms: u64, refused: usize, linger: usize, rate: u64 },
    /// One graceful connection from each of `clients` source addresses to each of `ports`
    /// server ports: a known set of series.
    Series { ports: u16, clients: u16 },
    /// Graceful connections cycling over the same (port, client) pairs, paced at `rate` per
    /// second, for `duration_ms`: traffic that creates no new series.
    Cycle { ports: u16, clients: u16, rate: u64, duration_ms: u64 },
    /// All four kinds at `rate_per_kind` connections per second each, for `duration_ms`.
    Mixed { rate_per_kind: u64, duration_ms: u64 },
}

/// Connections that completed as intended, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub graceful: u64,
    pub linger0: u64,
    pub unread: u64,
    pub refused: u64,
}

impl Tally {
    pub fn connections(&self) -> u64 {
        self.graceful + self.linger0 + self.unread + self.refused
    }

    /// RSTs sent (and received: both ends are on this host): one per aborted connection.
    pub fn resets(&self) -> u64 {
        self.linger0 + self.unread + self.refused
    }

    /// Connections that reached CLOSE, counted once per end: a refused connect has one.
    pub fn closes(&self) -> u64 {
        2 * (self.graceful + self.linger0 + self.unread) + self.refused
    }

    /// Connections opened, counted once per end: every connect (a refused one too) and every
    /// accept, so as many as closes.
    pub fn opens(&self) -> u64 {
        self.closes()
    }

    /// Kernel events the daemon's model has for this traffic: one per connection end that
    /// opens and one per end that closes, one per RST sent and one per RST received.
    pub fn events(&self) -> u64 {
        self.opens() + self.closes() + 2 * self.resets()
    }

    fn minus(&self, earlier: &Tally) -> Tally {
        Tally {
            graceful: self.graceful - earlier.graceful,
            linger0: self.linger0 - earlier.linger0,
            unread: self.unread - earlier.unread,
            refused: self.refused - earlier.refused,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    /// Length of the measured window (0 for commands without one).
    pub seconds: f64,
    /// Connections completed inside the window.
    pub window: Tally,
    /// Connections completed during the whole command (warm-up and wind-down included): what
    /// the daemon must have counted.
    pub total: Tally,
    /// Connections that did not end as their kind should (each is one of these or a tally).
    pub errors: u64,
    pub first_error: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Reply {
    Mark(Mark),
    Result(Outcome),
    Error(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mark {
    Start,
    End,
}

/// The parent's handle on a running worker. Dropping it closes stdin: the worker exits.
pub struct Worker {
    pub name: String,
    pub pid: u32,
    /// `/proc/PID/ns/net` of the worker's namespace, for `observer run --netns`.
    pub netns: PathBuf,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Worker {
    /// Starts a worker named `name` (its `comm`, at most 15 bytes) in a new network namespace.
    pub fn spawn(name: &str) -> Result<Self> {
        // This very binary, even if cargo has rebuilt observer-bench since it started (other work in the
        // workspace does): /proc/self/exe still names the running file.
        let exe = "/proc/self/exe";
        let mut cmd = Process::new(exe);
        // Shown by ps instead of /proc/self/exe.
        cmd.arg0(std::env::args_os().next().unwrap_or_else(|| "observer-bench".into()));
        cmd.args(["--worker", name]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = cmd.spawn().with_context(|| format!("starting the load generator `{exe} --worker {name}`"))?;
        let pid = child.id();
        let stdin = child.stdin.take().context("load generator without stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("load generator without stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line).context("reading the load generator's first line")?;
        let Some(netns) = line.trim().strip_prefix("netns ") else {
            let status = child.wait().map(process::describe).unwrap_or_default();
            bail!("load generator {name} did not start ({status}): {}", line.trim());
        };
        Ok(Self { name: name.to_string(), pid, netns: PathBuf::from(netns), child, stdin: Some(stdin), stdout })
    }

    /// Runs `command`; `on_mark` is called at the start and end of its measured window (while
    /// the traffic flows) and may take its time.
    pub fn run(&mut self, command: &Command, mut on_mark: impl FnMut(Mark) -> Result<()>) -> Result<Outcome> {
        let stdin = self.stdin.as_mut().context("load generator already stopped")?;
        let line = serde_json::to_string(command).context("encoding a load generator command")?;
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .with_context(|| format!("sending {line} to load generator {}", self.name))?;
        loop {
            let mut reply = String::new();
            let n =
                self.stdout.read_line(&mut reply).with_context(|| format!("reading load generator {}", self.name))?;
            if n == 0 {
                let status = self.child.wait().map(process::describe).unwrap_or_default();
                bail!("load generator {} exited during {line} ({status})", self.name);
            }
            match serde_json::from_str::<Reply>(&reply)
                .with_context(|| format!("load generator {} said {reply:?}", self.name))?
            {
                Reply::Mark(mark) => on_mark(mark)?,
                Reply::Result(outcome) => return Ok(outcome),
                Reply::Error(e) => bail!("load generator {} failed {line}: {e}", self.name),
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// Entry point of `observer-bench --worker NAME`.
pub fn main(name: &str) -> Result<()> {
    // A worker must not outlive the benchmark.
    process::die_with_parent().context("prctl(PR_SET_PDEATHSIG)")?;
    process::set_comm(name).with_context(|| format!("prctl(PR_SET_NAME, {name})"))?;
    // Before any thread exists: unshare applies to the calling thread, and threads created
    // later inherit its namespace.
    testkit_net::enter_new_netns().context("a network namespace of its own, with lo up")?;
    let mut out = io::stdout().lock();
    writeln!(out, "netns {}", testkit_net::own_netns_path())?;
    out.flush()?;
    for line in io::stdin().lock().lines() {
        let line = line.context("reading a command")?;
        let reply = match serde_json::from_str::<Command>(&line) {
            Ok(command) => match execute(&command, &mut |mark| emit(&mut out, &Reply::Mark(mark))) {
                Ok(outcome) => Reply::Result(outcome),
                Err(e) => Reply::Error(format!("{e:#}")),
            },
            Err(e) => Reply::Error(format!("bad command {line:?}: {e}")),
        };
        emit(&mut out, &reply)?;
    }
    Ok(())
}

fn emit(out: &mut impl io::Write, reply: &Reply) -> Result<()> {
    let line = serde_json::to_string(reply)?;
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

/// Counters the traffic threads share.
#[derive(Default)]
struct Counters {
    graceful: AtomicU64,
    linger0: AtomicU64,
    unread: AtomicU64,
    refused: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Counters {
    fn done(&self, kind: Kind) {
        match kind {
            Kind::Graceful => &self.graceful,
            Kind::Linger0 => &self.linger0,
            Kind::Unread => &self.unread,
            Kind::Refused => &self.refused,
        }
        .fetch_add(1, Relaxed);
    }

    fn error(&self, what: String) {
        self.errors.fetch_add(1, Relaxed);
        let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert(what);
    }

    fn tally(&self) -> Tally {
        Tally {
            graceful: self.graceful.load(Relaxed),
            linger0: self.linger0.load(Relaxed),
            unread: self.unread.load(Relaxed),
            refused: self.refused.load(Relaxed),
        }
    }
}

/// What a client thread does, over and over until told to stop.
#[derive(Clone, Copy)]
struct Client {
    kind: Kind,
    /// Server ports cycled through: (first, how many).
    ports: (u16, u16),
    /// Source addresses cycled through (`source_ip(0..sources)`); 0: no bind, the kernel picks.
    sources: u16,
    /// Connections per second, 0 for as fast as possible.
    rate: u64,
}

fn execute(command: &Command, mark: &mut dyn FnMut(Mark) -> Result<()>) -> Result<Outcome> {
    let counters = Counters::default();
    match *command {
        Command::Churn { warmup_ms, duration_ms, clients, servers } => {
            let servers = (0..servers.max(1))
                .map(|_| Ok(vec![(net::listen(SocketAddrV4::new(SERVER_IP, GRACEFUL_PORT), true)?, Kind::Graceful)]))
                .collect::<io::Result<Vec<_>>>()
                .context("listening for the churn")?;
            let client = Client { kind: Kind::Graceful, ports: (GRACEFUL_PORT, 1), sources: 0, rate: 0 };
            timed(&counters, servers, vec![client; clients.max(1)], warmup_ms, duration_ms, mark)
        }
        Command::Storm { warmup_ms, duration_ms, refused, linger, rate } => {
            let listener =
                net::listen(SocketAddrV4::new(SERVER_IP, LINGER_PORT), false).context("listening for the storm")?;
            let mut clients = vec![Client { kind: Kind::Refused, ports: (CLOSED_PORT, 1), sources: 0, rate }; refused];
            clients.extend(vec![Client { kind: Kind::Linger0, ports: (LINGER_PORT, 1), sources: 0, rate }; linger]);
            timed(&counters, vec![vec![(listener, Kind::Linger0)]], clients, warmup_ms, duration_ms, mark)
        }
        Command::Series { ports, clients } => {
            let stop = AtomicBool::new(false);
            let listeners = series_listeners(ports)?;
            thread::scope(|s| {
                let server = s.spawn(|| serve(&listeners, &counters, &stop));
                for port in 0..ports {
                    for source in 0..clients {
                        one(Kind::Graceful, Some(source_ip(source)), SERIES_BASE_PORT + port, &counters);
                    }
                }
                stop_servers(&stop, &[&listeners]);
                server.join().map_err(|_| anyhow!("server thread panicked"))
            })?;
            Ok(outcome(&counters, 0.0, Tally::default()))
        }
        Command::Cycle { ports, clients, rate, duration_ms } => {
            let client = Client { kind: Kind::Graceful, ports: (SERIES_BASE_PORT, ports), sources: clients, rate };
            timed(&counters, vec![series_listeners(ports)?], vec![client], 0, duration_ms, mark)
        }
        Command::Mixed { rate_per_kind, duration_ms } => {
            let listen = |port, kind| Ok((net::listen(SocketAddrV4::new(SERVER_IP, port), false)?, kind));
            let listeners =
                [(GRACEFUL_PORT, Kind::Graceful), (LINGER_PORT, Kind::Linger0), (UNREAD_PORT, Kind::Unread)]
                    .into_iter()
                    .map(|(port, kind)| listen(port, kind))
                    .collect::<io::Result<Vec<_>>>()
                    .context("listening for the mixed traffic")?;
            let clients = [
                (Kind::Graceful, GRACEFUL_PORT),
                (Kind::Linger0, LINGER_PORT),
                (Kind::Unread, UNREAD_PORT),
                (Kind::Refused, CLOSED_PORT),
            ]
            .map(|(kind, port)| Client { kind, ports: (port, 1), sources: 0, rate: rate_per_kind })
            .to_vec();
            timed(&counters, vec![listeners], clients, 0, duration_ms, mark)
        }
    }
}

/// The scrape benchmark's client addresses: 127.1.x.y, never 127.0.0.1 (the server's).
fn source_ip(i: u16) -> Ipv4Addr {
    Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8)
}

fn series_listeners(ports: u16) -> Result<Vec<(TcpListener, Kind)>> {
    (0..ports)
        .map(|p| Ok((net::listen(SocketAddrV4::new(SERVER_IP, SERIES_BASE_PORT + p), false)?, Kind::Graceful)))
        .collect::<io::Result<Vec<_>>>()
        .context("listening on the series ports")
}

/// Runs `servers` (one thread per listener set) and `clients` threads for a warm-up and a
/// measured window, then stops them all and waits until every connection has ended.
fn timed(
    counters: &Counters,
    servers: Vec<Vec<(TcpListener, Kind)>>,
    clients: Vec<Client>,
    warmup_ms: u64,
    duration_ms: u64,
    mark: &mut dyn FnMut(Mark) -> Result<()>,
) -> Result<Outcome> {
    let stop_clients = AtomicBool::new(false);
    let stop_servers_flag = AtomicBool::new(false);
    let listener_refs: Vec<&[(TcpListener, Kind)]> = servers.iter().map(Vec::as_slice).collect();
    thread::scope(|s| -> Result<Outcome> {
        let server_threads: Vec<_> =
            servers.iter().map(|set| s.spawn(|| serve(set, counters, &stop_servers_flag))).collect();
        let client_threads: Vec<_> = clients
            .iter()
            .enumerate()
            .map(|(i, c)| {
                s.spawn({
                    let stop = &stop_clients;
                    move || client_loop(*c, i, counters, stop)
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(warmup_ms));
        let before = counters.tally();
        let started = Instant::now();
        let mut result = mark(Mark::Start);
        if result.is_ok() {
            thread::sleep(Duration::from_millis(duration_ms).saturating_sub(started.elapsed()));
        }
        let window = counters.tally().minus(&before);
        let seconds = started.elapsed().as_secs_f64();
        if result.is_ok() {
            result = mark(Mark::End);
        }
        stop_clients.store(true, Relaxed);
        for t in client_threads {
            t.join().map_err(|_| anyhow!("client thread panicked"))?;
        }
        stop_servers(&stop_servers_flag, &listener_refs);
        for t in server_threads {
            t.join().map_err(|_| anyhow!("server thread panicked"))?;
        }
        result?;
        Ok(outcome(counters, seconds, window))
    })
}

fn outcome(counters: &Counters, seconds: f64, window: Tally) -> Outcome {
    Outcome {
        seconds,
        window,
        total: counters.tally(),
        errors: counters.errors.load(Relaxed),
        first_error: counters.first_error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
    }
}

fn stop_servers(stop: &AtomicBool, sets: &[&[(TcpListener, Kind)]]) {
    stop.store(true, Relaxed);
    for set in sets {
        for (listener, _) in *set {
            net::shutdown(listener);
        }
    }
}

fn client_loop(c: Client, thread_index: usize, counters: &Counters, stop: &AtomicBool) {
    let started = Instant::now();
    // Pairs are visited in a different order by each thread, so parallel threads spread out.
    let mut i = thread_index as u64 * 7919;
    let mut n = 0u64;
    while !stop.load(Relaxed) {
        if c.rate > 0 {
            // Paced: connection n starts at n / rate seconds; a late thread does not burst to
            // catch up by more than one connection at a time.
            let due = started + Duration::from_secs_f64(n as f64 / c.rate as f64);
            let now = Instant::now();
            if due > now {
                thread::sleep((due - now).min(Duration::from_millis(100)));
                continue;
            }
        }
        let port = c.ports.0 + (i % c.ports.1 as u64) as u16;
        let source = (c.sources > 0).then(|| source_ip(((i / c.ports.1 as u64) % c.sources as u64) as u16));
        one(c.kind, source, port, counters);
        i += 1;
        n += 1;
    }
}

/// Makes one connection of `kind` and counts how it ended.
fn one(kind: Kind, source: Option<Ipv4Addr>, port: u16, counters: &Counters) {
    let to = SocketAddrV4::new(SERVER_IP, port);
    let conn = net::connect(source, to);
    let result: io::Result<bool> = match (kind, conn) {
        (Kind::Refused, Err(e)) => Ok(e.kind() == io::ErrorKind::ConnectionRefused),
        (Kind::Refused, Ok(_)) => Ok(false),
        // The server can accept and abort before this thread returns from connect(): then
        // connect() itself reports the RST.
        (Kind::Linger0, Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => Ok(true),
        (_, Err(e)) => Err(e),
        (kind, Ok(mut conn)) => (|| {
            conn.set_read_timeout(Some(IO_TIMEOUT))?;
            match kind {
                Kind::Graceful => net::exchange(&mut conn).map(|()| true),
                Kind::Linger0 => net::read_until_reset(&mut conn),
                Kind::Unread => {
                    io::Write::write_all(&mut conn, net::REQUEST)?;
                    net::read_until_reset(&mut conn)
                }
                Kind::Refused => unreachable!("handled above"),
            }
        })(),
    };
    match result {
        Ok(true) => counters.done(kind),
        Ok(false) => counters.error(format!("{kind:?} connection to {to} did not end as intended")),
        Err(e) => counters.error(format!("{kind:?} connection to {to}: {e}")),
    }
}

/// Accepts on `listeners` until `stop`, handling each connection as its listener's kind says.
fn serve(listeners: &[(TcpListener, Kind)], counters: &Counters, stop: &AtomicBool) {
    let fds: Vec<_> = listeners.iter().map(|(l, _)| l.as_fd()).collect();
    while !stop.load(Relaxed) {
        // One listener: block in accept (no wasted wake-ups). Several: poll, then accept.
        let ready = if listeners.len() == 1 {
            vec![0]
        } else {
            match net::poll_readable(&fds, Duration::from_millis(200)) {
                Ok(ready) => ready,
                Err(e) => {
                    counters.error(format!("poll on listeners: {e}"));
                    return;
                }
            }
        };
        for i in ready {
            let (listener, kind) = &listeners[i];
            let conn = match listener.accept() {
                Ok((conn, _)) => conn,
                // shutdown() makes accept fail: that is the stop signal.
                Err(_) if stop.load(Relaxed) => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    counters.error(format!("accept: {e}"));
                    continue;
                }
            };
            let handled = match kind {
                Kind::Graceful => net::serve_graceful(conn),
                Kind::Linger0 => net::set_linger0(&conn),
                Kind::Unread => net::wait_readable(&conn, IO_TIMEOUT).and_then(|readable| {
                    if readable { Ok(()) } else { Err(io::Error::other("request never arrived")) }
                }),
                Kind::Refused => Ok(()),
            };
            if let Err(e) = handled {
                counters.error(format!("server side of a {kind:?} connection: {e}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_per_connection_follow_the_daemons_model() {
        // Each end that closes also opened (ConnectionOpened at connect and at accept).
        let one = |t: Tally| (t.closes(), t.resets(), t.events());
        assert_eq!(one(Tally { graceful: 1, ..Tally::default() }), (2, 0, 4));
        assert_eq!(one(Tally { linger0: 1, ..Tally::default() }), (2, 1, 6));
        assert_eq!(one(Tally { unread: 1, ..Tally::default() }), (2, 1, 6));
        assert_eq!(one(Tally { refused: 1, ..Tally::default() }), (1, 1, 4));
    }

    #[test]
    fn source_addresses_are_distinct_and_never_the_servers() {
        let all: std::collections::HashSet<Ipv4Addr> = (0..1000).map(source_ip).collect();
        assert_eq!(all.len(), 1000);
        assert!(!all.contains(&SERVER_IP));
    }

    #[test]
    fn commands_round_trip_as_json() {
        let c = Command::Cycle { ports: 10, clients: 99, rate: 5000, duration_ms: 1000 };
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(text, r#"{"op":"cycle","ports":10,"clients":99,"rate":5000,"duration_ms":1000}"#);
        assert!(matches!(serde_json::from_str(&text).unwrap(), Command::Cycle { ports: 10, .. }));
    }
}
