//! Real TCP traffic in a private network namespace, made by named processes.
//!
//! The test binary re-executes itself: a `netns` worker unshares a network namespace, brings
//! `lo` up, and starts a `server` and a `client` worker in it (children inherit the namespace).
//! Each sets its own command name, so the daemon's attribution can be asserted by `comm`.

use std::{
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use observer_testkit::{
    net::{self, connect, ip},
    process::set_comm,
};

/// Environment variable that turns the test binary into a worker.
pub const WORKER_ENV: &str = "OBSERVER_E2E_WORKER";

/// What the server does with each connection (the client follows suit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Reads the request, then closes with SO_LINGER {1, 0}: RST, reason TCP_STATE.
    Linger0,
    /// Linger0, the client starting connection i at [`PACE`] × i after its first: a steady rate.
    PacedLinger0,
    /// Closes with the request unread: RST, reason TCP_ABORT_ON_CLOSE.
    Unread,
    /// Connects to a port nobody listens on: RST NO_SOCKET, ECONNREFUSED.
    Refused,
    /// Reads the request, answers, closes; the client reads to EOF and closes.
    Graceful,
    /// Connects once to each of `connections` closed ports after `port`: a port scan.
    PortScan,
    /// Reads the request and closes without answering (FIN): the client sees EOF.
    NoResponse,
    /// The client sends its request and closes at once; the server reads it, sees EOF, and
    /// closes without answering: the client gave up.
    Abandon,
    /// Over a veth link to a server in its own namespace: after one exchange the server's end
    /// goes down and the client writes with TCP_USER_TIMEOUT, so it times out (no RST).
    Timeout,
    /// Over a veth link whose far end is down: connect() with one SYN retry times out.
    ConnectTimeout,
    /// The server accepts and reads, the client closes, and the server never closes: its
    /// sockets sit in CLOSE_WAIT until the round ends.
    LeakCloseWait,
    /// The server accepts and reads every connection and holds them, each set to SO_LINGER 0,
    /// until the round ends; then it closes them all (RSTs) and the client reads its resets.
    HeldLinger0,
    /// HTTP: the server declares `Content-Length: 100`, sends 8 body bytes and closes (FIN).
    HttpTruncated,
    /// HTTP: the server sends a bodiless status line and resets (SO_LINGER 0).
    HttpStatusLineReset,
    /// HTTP: the server sends one chunk of a chunked body and closes (FIN) without the last.
    HttpChunkedCut,
    /// HTTP: four clean exchanges per connection (a sized body, a chunked body in two writes,
    /// two pipelined requests answered in one write); the client closes it idle.
    HttpKeepalive,
    /// HTTP: the server answers the first request and closes the idle connection; the client,
    /// once the server's FIN is in, sends a second request on it: the keep-alive race.
    HttpKeepaliveRace,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Linger0 => "linger0",
            Mode::PacedLinger0 => "pacedlinger0",
            Mode::Unread => "unread",
            Mode::Refused => "refused",
            Mode::Graceful => "graceful",
            Mode::PortScan => "portscan",
            Mode::NoResponse => "noresponse",
            Mode::Abandon => "abandon",
            Mode::Timeout => "timeout",
            Mode::ConnectTimeout => "connecttimeout",
            Mode::LeakCloseWait => "leakclosewait",
            Mode::HeldLinger0 => "heldlinger0",
            Mode::HttpTruncated => "httptruncated",
            Mode::HttpStatusLineReset => "httpstatuslinereset",
            Mode::HttpChunkedCut => "httpchunkedcut",
            Mode::HttpKeepalive => "httpkeepalive",
            Mode::HttpKeepaliveRace => "httpkeepaliverace",
        }
    }

    /// Modes whose round holds its connections open until the test ends it
    /// ([`HeldNetns::start_holding`], [`HeldNetns::end_holding`]).
    fn holds(self) -> bool {
        matches!(self, Mode::LeakCloseWait | Mode::HeldLinger0)
    }

    /// Modes whose server lives in its own namespace behind a veth link.
    fn over_veth(self) -> bool {
        matches!(self, Mode::Timeout | Mode::ConnectTimeout)
    }

    fn parse(s: &str) -> Self {
        match s {
            "linger0" => Mode::Linger0,
            "pacedlinger0" => Mode::PacedLinger0,
            "unread" => Mode::Unread,
            "refused" => Mode::Refused,
            "graceful" => Mode::Graceful,
            "portscan" => Mode::PortScan,
            "noresponse" => Mode::NoResponse,
            "abandon" => Mode::Abandon,
            "timeout" => Mode::Timeout,
            "connecttimeout" => Mode::ConnectTimeout,
            "leakclosewait" => Mode::LeakCloseWait,
            "heldlinger0" => Mode::HeldLinger0,
            "httptruncated" => Mode::HttpTruncated,
            "httpstatuslinereset" => Mode::HttpStatusLineReset,
            "httpchunkedcut" => Mode::HttpChunkedCut,
            "httpkeepalive" => Mode::HttpKeepalive,
            "httpkeepaliverace" => Mode::HttpKeepaliveRace,
            other => panic!("unknown mode {other}"),
        }
    }
}

/// One scenario: N connections from `client_comm` at `client_ip` to `server_comm` at
/// `server_ip:port`.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub mode: Mode,
    pub connections: u32,
    pub server_comm: &'static str,
    pub client_comm: &'static str,
    pub server_ip: IpAddr,
    pub client_ip: IpAddr,
    pub port: u16,
    /// Each connection comes from its own address (`client_ip` + i, IPv4): many distinct peers.
    pub distinct_clients: bool,
    /// Run the client in a cgroup named as docker names a container's (`docker-<id>.scope`).
    pub client_container: Option<&'static str>,
}

const REQUEST: &[u8] = b"GET /order HTTP/1.1\r\n\r\n";

/// The HTTP modes' answers.
pub const TRUNCATED_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n";
pub const TRUNCATED_BODY: &[u8] = b"12345678";
pub const STATUS_LINE: &[u8] = b"HTTP/1.1 404 Not Found\r\n";
pub const CHUNKED_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
pub const FIRST_CHUNK: &[u8] = b"5\r\nhello\r\n";
const LAST_CHUNK: &[u8] = b"0\r\n\r\n";
const OK_RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
/// The request [`Mode::HttpKeepaliveRace`] sends on the connection the server closed.
pub const RACE_REQUEST: &[u8] = b"POST /order HTTP/1.1\r\nContent-Length: 0\r\n\r\n";

/// The client's pace in [`Mode::PacedLinger0`]: one connection (one reset) per 100 ms.
pub const PACE: Duration = Duration::from_millis(100);

impl Scenario {
    /// Runs the scenario to completion in a fresh network namespace.
    pub fn run(&self) -> Result<(), String> {
        self.prepare()?.run()
    }

    /// Creates the scenario's network namespace and holds it until [`HeldNetns::run`], so a
    /// daemon can be pointed at it first (`--netns`).
    pub fn prepare(&self) -> Result<HeldNetns, String> {
        let mut child = Command::new(std::env::current_exe().map_err(|e| e.to_string())?)
            .env(WORKER_ENV, "netns")
            .args(self.args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawning the netns worker: {e}"))?;
        let mut line = String::new();
        let stdout = child.stdout.take().ok_or("no worker stdout")?;
        let mut stdout = BufReader::new(stdout);
        stdout.read_line(&mut line).map_err(|e| e.to_string())?;
        let Some(path) = line.trim().strip_prefix("netns ") else {
            let out = child.wait_with_output().map_err(|e| e.to_string())?;
            return Err(format!("netns worker failed: {line}{}", String::from_utf8_lossy(&out.stderr)));
        };
        let stdin = child.stdin.take();
        Ok(HeldNetns { path: path.to_string(), child, stdout, stdin, mode: self.mode, connections: self.connections })
    }

    /// The scenario's addresses as `peer` label values.
    pub fn peers(&self) -> [&'static str; 2] {
        [leak(self.server_ip.to_string()), leak(self.client_ip.to_string())]
    }

    /// Labels of the client's connections: its comm, role, the server as peer, the service port.
    pub fn client_labels(&self) -> [(&'static str, &'static str); 4] {
        [
            ("comm", self.client_comm),
            ("role", "client"),
            ("peer", leak(self.server_ip.to_string())),
            ("port", leak(self.port.to_string())),
        ]
    }

    /// Labels of the server's connections.
    pub fn server_labels(&self) -> [(&'static str, &'static str); 4] {
        [
            ("comm", self.server_comm),
            ("role", "server"),
            ("peer", leak(self.client_ip.to_string())),
            ("port", leak(self.port.to_string())),
        ]
    }

    fn args(&self) -> Vec<String> {
        vec![
            self.mode.as_str().into(),
            self.connections.to_string(),
            self.server_comm.into(),
            self.client_comm.into(),
            self.server_ip.to_string(),
            self.client_ip.to_string(),
            self.port.to_string(),
            if self.distinct_clients { "distinct" } else { "same" }.into(),
            self.client_container.unwrap_or("-").into(),
        ]
    }

    fn from_args(args: &[String]) -> Self {
        Self {
            mode: Mode::parse(&args[0]),
            connections: args[1].parse().expect("connections"),
            server_comm: leak(args[2].clone()),
            client_comm: leak(args[3].clone()),
            server_ip: args[4].parse().expect("server ip"),
            client_ip: args[5].parse().expect("client ip"),
            port: args[6].parse().expect("port"),
            distinct_clients: args[7] == "distinct",
            client_container: (args[8] != "-").then(|| leak(args[8].clone())),
        }
    }
}

/// A scenario's network namespace, created and waiting for traffic.
pub struct HeldNetns {
    /// `/proc/PID/ns/net` of the namespace.
    pub path: String,
    child: std::process::Child,
    stdout: BufReader<std::process::ChildStdout>,
    stdin: Option<std::process::ChildStdin>,
    mode: Mode,
    connections: u32,
}

impl HeldNetns {
    /// Makes one round of the scenario's traffic and waits for it to finish.
    pub fn round(&mut self) -> Result<(), String> {
        self.round_of(self.mode, self.connections)
    }

    /// One round with another mode or connection count (same processes' names and addresses).
    pub fn round_of(&mut self, mode: Mode, connections: u32) -> Result<(), String> {
        let stdin = self.stdin.as_mut().ok_or("namespace already released")?;
        writeln!(stdin, "go {} {connections}", mode.as_str()).map_err(|e| e.to_string())?;
        stdin.flush().map_err(|e| e.to_string())?;
        let mut line = String::new();
        self.stdout.read_line(&mut line).map_err(|e| e.to_string())?;
        if line.trim() != "done" {
            return Err(format!(
                "round {mode:?} x{connections} failed: {line}{}",
                self.release().err().unwrap_or_default()
            ));
        }
        Ok(())
    }

    /// Starts a round of a mode that holds its connections ([`Mode::LeakCloseWait`],
    /// [`Mode::HeldLinger0`]) and returns once the client holds all of them.
    pub fn start_holding(&mut self, mode: Mode, connections: u32) -> Result<(), String> {
        assert!(mode.holds(), "{mode:?} does not hold its connections");
        let stdin = self.stdin.as_mut().ok_or("namespace already released")?;
        writeln!(stdin, "go {} {connections}", mode.as_str()).map_err(|e| e.to_string())?;
        stdin.flush().map_err(|e| e.to_string())?;
        let mut line = String::new();
        self.stdout.read_line(&mut line).map_err(|e| e.to_string())?;
        if line.trim() != "holding" {
            return Err(format!("{mode:?} round failed: {line}{}", self.release().err().unwrap_or_default()));
        }
        Ok(())
    }

    /// Ends a holding round: the server closes its connections, then the client.
    pub fn end_holding(&mut self) -> Result<(), String> {
        let stdin = self.stdin.as_mut().ok_or("namespace already released")?;
        writeln!(stdin, "release").map_err(|e| e.to_string())?;
        stdin.flush().map_err(|e| e.to_string())?;
        let mut line = String::new();
        self.stdout.read_line(&mut line).map_err(|e| e.to_string())?;
        if line.trim() != "done" {
            return Err(format!("holding round did not end: {line}{}", self.release().err().unwrap_or_default()));
        }
        Ok(())
    }

    /// A `Tcp:` counter of the namespace's `/proc/net/snmp` (`ActiveOpens`, `PassiveOpens`,
    /// `OutRsts`, ...): the kernel's own count of what the traffic made, read through the
    /// worker that holds the namespace.
    pub fn kernel_tcp(&self, counter: &str) -> Result<u64, String> {
        let snmp = std::fs::read_to_string(format!("/proc/{}/net/snmp", self.child.id()))
            .map_err(|e| format!("reading the namespace's /proc/net/snmp: {e}"))?;
        observer_testkit::net::snmp_tcp(&snmp, counter).map_err(|e| format!("{e:#}"))
    }

    /// Lets the namespace go: the worker exits.
    pub fn release(&mut self) -> Result<(), String> {
        drop(self.stdin.take());
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        let status = self.child.wait().map_err(|e| e.to_string())?;
        if status.success() { Ok(()) } else { Err(format!("netns worker {status}: {stderr}")) }
    }

    /// One round, then release.
    pub fn run(mut self) -> Result<(), String> {
        self.round()?;
        self.release()
    }
}

impl Drop for HeldNetns {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// Label values live as long as the test process; a few short strings per scenario.
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// Entry point of a worker process; never returns.
pub fn worker_main(role: &str) -> ! {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let scenario = Scenario::from_args(&args);
    let result = match role {
        "netns" => netns_worker(&scenario),
        "server" => set_comm(scenario.server_comm).and_then(|()| server(&scenario)),
        "client" => set_comm(scenario.client_comm)
            .and_then(|()| join_container_cgroup(&scenario))
            .and_then(|()| client(&scenario)),
        other => Err(io::Error::other(format!("unknown worker role {other}"))),
    };
    match result {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("{role} worker: {e}");
            std::process::exit(1)
        }
    }
}

fn netns_worker(s: &Scenario) -> io::Result<()> {
    // The worker is single-threaded: the new namespace applies to it and its children.
    net::enter_new_netns()?;
    // Announce the namespace, then make one round of traffic per `go MODE N` line until EOF.
    println!("netns {}", net::own_netns_path());
    io::stdout().flush()?;
    loop {
        let mut line = String::new();
        if io::stdin().read_line(&mut line)? == 0 {
            break;
        }
        let mut words = line.split_whitespace().skip(1);
        let (Some(mode), Some(n)) = (words.next(), words.next().and_then(|n| n.parse().ok())) else {
            return Err(io::Error::other(format!("bad round request {line:?}")));
        };
        netns_round(&Scenario { mode: Mode::parse(mode), connections: n, ..s.clone() })?;
        println!("done");
        io::stdout().flush()?;
    }
    Ok(())
}

/// Runs a server and a client worker for one round.
fn netns_round(s: &Scenario) -> io::Result<()> {
    let exe = std::env::current_exe()?;
    let spawn = |role: &str, stdin: Stdio, stdout: Stdio| {
        Command::new(&exe).env(WORKER_ENV, role).args(s.args()).stdin(stdin).stdout(stdout).spawn()
    };
    let mut server = spawn("server", Stdio::piped(), Stdio::piped())?;
    let mut server_in = server.stdin.take().ok_or_else(|| io::Error::other("no server stdin"))?;
    let mut server_out = BufReader::new(server.stdout.take().ok_or_else(|| io::Error::other("no server stdout"))?);
    let mut line = String::new();
    if s.mode.over_veth() {
        // The server made its own namespace; link it to this one.
        server_out.read_line(&mut line)?;
        if line.trim() != "netns" {
            let _ = server.kill();
            return Err(io::Error::other(format!(
                "server did not make its namespace: {line:?} ({:?})",
                server.wait()?
            )));
        }
        link_to(server.id(), s)?;
        writeln!(server_in, "veth")?;
        server_in.flush()?;
        line.clear();
    }
    // The server says "ready" once it listens.
    server_out.read_line(&mut line)?;
    if line.trim() != "ready" {
        let _ = server.kill();
        return Err(io::Error::other(format!("server did not start: {line:?} ({:?})", server.wait()?)));
    }
    let client = if s.mode.holds() {
        // The client holds its sockets and says "holding" once they are made (LeakCloseWait:
        // half-closed, FIN_WAIT2, not orphaned, so no tcp_fin_timeout ends them however long
        // the test looks, and the server's ends sit in CLOSE_WAIT); hold the round until the
        // test has looked.
        let mut client = spawn("client", Stdio::piped(), Stdio::piped())?;
        let mut client_out = BufReader::new(client.stdout.take().ok_or_else(|| io::Error::other("no client stdout"))?);
        line.clear();
        client_out.read_line(&mut line)?;
        if line.trim() == "holding" {
            println!("holding");
            io::stdout().flush()?;
            let mut release = String::new();
            io::stdin().read_line(&mut release)?;
        }
        // The server closes first (LeakCloseWait: its FIN ends the client's FIN_WAIT2;
        // HeldLinger0: its RSTs), then the client goes.
        drop(server_in);
        let server_status = server.wait()?;
        drop(client.stdin.take());
        return match client.wait()? {
            c if c.success() && server_status.success() => Ok(()),
            c => Err(io::Error::other(format!("client {c}, server {server_status}"))),
        };
    } else {
        spawn("client", Stdio::null(), Stdio::null())?.wait()
    };
    // The server may wait for the round's end (a link that went down).
    drop(server_in);
    let server_status = server.wait()?;
    let client = client?;
    if !client.success() || !server_status.success() {
        return Err(io::Error::other(format!("client {client}, server {server_status}")));
    }
    Ok(())
}

/// The MAC the server's end gets; the client's side knows it statically, so a link that is
/// down loses segments silently instead of failing neighbour resolution (EHOSTUNREACH).
const SERVER_MAC: &str = "02:00:00:00:00:02";

/// A veth pair from this namespace (`vA`, the client's address) to the server's (`vB`).
fn link_to(server_pid: u32, s: &Scenario) -> io::Result<()> {
    net::add_veth("vA", "vB", server_pid)?;
    ip(&["addr", "add", &format!("{}/24", s.client_ip), "dev", "vA"])?;
    ip(&["link", "set", "vA", "up"])?;
    ip(&["neigh", "replace", &s.server_ip.to_string(), "lladdr", SERVER_MAC, "dev", "vA", "nud", "permanent"])
}

/// Server side of [`link_to`], in the server's own namespace.
fn server_veth(s: &Scenario) -> io::Result<()> {
    // The worker is single-threaded.
    net::enter_new_netns()?;
    println!("netns");
    io::stdout().flush()?;
    let mut line = String::new();
    io::stdin().lock().read_line(&mut line)?;
    if line.trim() != "veth" {
        return Err(io::Error::other(format!("expected `veth`, got {line:?}")));
    }
    ip(&["link", "set", "vB", "address", SERVER_MAC])?;
    ip(&["addr", "add", &format!("{}/24", s.server_ip), "dev", "vB"])?;
    if s.mode == Mode::Timeout {
        ip(&["link", "set", "vB", "up"])?;
    }
    Ok(())
}

/// The cgroup directory of the scenario's client container.
fn container_cgroup_dir(id: &str) -> io::Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let root = observer::container::cgroup2_mount(&mountinfo)
        .ok_or_else(|| io::Error::other("no cgroup2 mount on this machine"))?;
    Ok(root.join("observer-e2e.slice").join(format!("docker-{id}.scope")))
}

/// Removes a scenario's container cgroup (once its processes have exited).
pub fn remove_container_cgroup(id: &str) -> Result<(), String> {
    let dir = container_cgroup_dir(id).map_err(|e| e.to_string())?;
    std::fs::remove_dir(&dir).map_err(|e| format!("removing cgroup {}: {e}", dir.display()))
}

/// Moves the client into its container's cgroup, as a container runtime would.
fn join_container_cgroup(s: &Scenario) -> io::Result<()> {
    let Some(id) = s.client_container else { return Ok(()) };
    let dir = container_cgroup_dir(id)?;
    std::fs::create_dir_all(&dir).map_err(|e| io::Error::other(format!("creating cgroup {}: {e}", dir.display())))?;
    std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
        .map_err(|e| io::Error::other(format!("joining cgroup {}: {e}", dir.display())))
}

/// Waits for the round's end (the netns worker closes our stdin).
fn wait_for_round_end() -> io::Result<()> {
    let mut rest = String::new();
    io::stdin().lock().read_to_string(&mut rest)?;
    Ok(())
}

fn server(s: &Scenario) -> io::Result<()> {
    if s.mode.over_veth() {
        server_veth(s)?;
    }
    let listener = TcpListener::bind((s.server_ip, s.port))?;
    println!("ready");
    io::stdout().flush()?;
    let mut request = [0u8; REQUEST.len()];
    match s.mode {
        // Nobody accepts on the port the client targets (port + 1); this one just exists.
        Mode::Refused | Mode::PortScan => return Ok(()),
        // The link is down: nothing arrives.
        Mode::ConnectTimeout => return wait_for_round_end(),
        Mode::Timeout | Mode::LeakCloseWait | Mode::HeldLinger0 => {
            let mut held = Vec::new();
            for _ in 0..s.connections {
                let (mut conn, _) = listener.accept()?;
                conn.read_exact(&mut request)?;
                if s.mode == Mode::Timeout {
                    conn.write_all(b"ok")?;
                } else if s.mode == Mode::HeldLinger0 {
                    // Dropped at the round's end: an RST each.
                    net::set_linger0(&conn)?;
                } else {
                    // The client closed: from here on the socket is in CLOSE_WAIT until we close.
                    let mut rest = Vec::new();
                    conn.read_to_end(&mut rest)?;
                }
                held.push(conn);
            }
            if s.mode == Mode::Timeout {
                // The client now writes into a link that is down.
                ip(&["link", "set", "vB", "down"])?;
            }
            return wait_for_round_end();
        }
        _ => {}
    }
    for _ in 0..s.connections {
        let (mut conn, _) = listener.accept()?;
        match s.mode {
            Mode::Linger0 | Mode::PacedLinger0 => {
                conn.read_exact(&mut request)?;
                net::set_linger0(&conn)?;
                drop(conn);
            }
            Mode::Unread => {
                // Wait until the request is queued, then close without reading it.
                wait_readable(&conn)?;
                drop(conn);
            }
            Mode::Graceful => {
                conn.read_exact(&mut request)?;
                conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")?;
                drop(conn);
            }
            Mode::NoResponse => {
                conn.read_exact(&mut request)?;
                drop(conn);
            }
            Mode::Abandon => {
                conn.read_exact(&mut request)?;
                // The client closes before we answer: read its FIN, then close without a word.
                let mut rest = Vec::new();
                conn.read_to_end(&mut rest)?;
                drop(conn);
            }
            Mode::HttpTruncated | Mode::HttpChunkedCut => {
                conn.read_exact(&mut request)?;
                let answer = if s.mode == Mode::HttpTruncated {
                    [TRUNCATED_HEAD, TRUNCATED_BODY].concat()
                } else {
                    [CHUNKED_HEAD, FIRST_CHUNK].concat()
                };
                conn.write_all(&answer)?;
                drop(conn);
            }
            Mode::HttpStatusLineReset => {
                conn.read_exact(&mut request)?;
                conn.write_all(STATUS_LINE)?;
                net::set_linger0(&conn)?;
                drop(conn);
            }
            Mode::HttpKeepalive => {
                conn.read_exact(&mut request)?;
                conn.write_all(OK_RESPONSE)?;
                conn.read_exact(&mut request)?;
                conn.write_all(&[CHUNKED_HEAD, FIRST_CHUNK].concat())?;
                conn.write_all(LAST_CHUNK)?;
                // Two pipelined requests, answered in one write.
                let mut two = [0u8; 2 * REQUEST.len()];
                conn.read_exact(&mut two)?;
                conn.write_all(&[OK_RESPONSE, OK_RESPONSE].concat())?;
                // The client closes the idle connection; then we do.
                let mut rest = Vec::new();
                conn.read_to_end(&mut rest)?;
                drop(conn);
            }
            Mode::HttpKeepaliveRace => {
                conn.read_exact(&mut request)?;
                conn.write_all(OK_RESPONSE)?;
                // Closed while idle, as an idle timeout does.
                drop(conn);
            }
            Mode::Refused
            | Mode::PortScan
            | Mode::Timeout
            | Mode::ConnectTimeout
            | Mode::LeakCloseWait
            | Mode::HeldLinger0 => {
                unreachable!()
            }
        }
    }
    Ok(())
}

/// Reads from `conn` until `want` bytes have come.
fn read_bytes(conn: &mut TcpStream, want: usize) -> io::Result<Vec<u8>> {
    let mut got = vec![0u8; want];
    conn.read_exact(&mut got)?;
    Ok(got)
}

/// The client side of the HTTP modes that keep the connection: [`Mode::HttpKeepalive`] and
/// [`Mode::HttpKeepaliveRace`].
fn http_client_exchanges(mode: Mode, conn: &mut TcpStream) -> io::Result<()> {
    conn.write_all(REQUEST)?;
    read_bytes(conn, OK_RESPONSE.len())?;
    if mode == Mode::HttpKeepaliveRace {
        // The server's FIN is in (the socket reads as ready at EOF): send the next request
        // into the connection it closed. Its kernel answers with an RST; either way no
        // response comes.
        wait_readable(conn)?;
        conn.write_all(RACE_REQUEST)?;
        let mut rest = Vec::new();
        return match conn.read_to_end(&mut rest) {
            Ok(0) => Ok(()),
            Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe) => Ok(()),
            other => Err(io::Error::other(format!("keep-alive race: want EOF or a reset, got {other:?}"))),
        };
    }
    conn.write_all(REQUEST)?;
    read_bytes(conn, CHUNKED_HEAD.len() + FIRST_CHUNK.len() + LAST_CHUNK.len())?;
    conn.write_all(&[REQUEST, REQUEST].concat())?;
    read_bytes(conn, 2 * OK_RESPONSE.len())?;
    Ok(())
}

fn client(s: &Scenario) -> io::Result<()> {
    match s.mode {
        Mode::Timeout => return client_timeout(s),
        Mode::ConnectTimeout => return client_connect_timeout(s),
        _ => {}
    }
    let start = std::time::Instant::now();
    let mut held = Vec::new();
    for i in 0..s.connections {
        if s.mode == Mode::PacedLinger0 {
            // On a schedule, not a sleep after each: no drift.
            std::thread::sleep((start + PACE * i).saturating_duration_since(std::time::Instant::now()));
        }
        let ip = match s.client_ip {
            IpAddr::V4(v4) if s.distinct_clients => IpAddr::V4((u32::from(v4) + i).into()),
            ip => ip,
        };
        let socket = net::tcp_socket_bound_to(ip, false)?;
        match s.mode {
            Mode::Refused | Mode::PortScan => {
                let port = if s.mode == Mode::PortScan { s.port + 1 + i as u16 } else { s.port + 1 };
                match connect(socket, SocketAddr::from((s.server_ip, port))) {
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                    other => {
                        return Err(io::Error::other(format!("connection {i}: expected ECONNREFUSED, got {other:?}")));
                    }
                }
            }
            Mode::Abandon => {
                // Send the request and give up at once.
                let mut conn = connect(socket, SocketAddr::from((s.server_ip, s.port)))?;
                conn.write_all(REQUEST)?;
                drop(conn);
            }
            Mode::HttpKeepalive | Mode::HttpKeepaliveRace => {
                let mut conn = connect(socket, SocketAddr::from((s.server_ip, s.port)))?;
                http_client_exchanges(s.mode, &mut conn)
                    .map_err(|e| io::Error::other(format!("connection {i} ({:?}): {e}", s.mode)))?;
                drop(conn);
            }
            Mode::LeakCloseWait => {
                // Send the request and stop sending (FIN), keeping the socket.
                let mut conn = connect(socket, SocketAddr::from((s.server_ip, s.port)))?;
                conn.write_all(REQUEST)?;
                conn.shutdown(std::net::Shutdown::Write)?;
                held.push(conn);
            }
            Mode::HeldLinger0 => {
                let mut conn = connect(socket, SocketAddr::from((s.server_ip, s.port)))?;
                conn.write_all(REQUEST)?;
                held.push(conn);
            }
            mode => {
                let mut conn = connect(socket, SocketAddr::from((s.server_ip, s.port)))?;
                conn.write_all(REQUEST)?;
                let mut response = Vec::new();
                let read = conn.read_to_end(&mut response);
                match (mode, read) {
                    (Mode::Graceful, Ok(_)) if response.ends_with(b"ok") => {}
                    (Mode::NoResponse, Ok(0)) => {} // EOF before any response
                    (Mode::HttpTruncated, Ok(_)) if response == [TRUNCATED_HEAD, TRUNCATED_BODY].concat() => {}
                    (Mode::HttpChunkedCut, Ok(_)) if response == [CHUNKED_HEAD, FIRST_CHUNK].concat() => {}
                    // The status line may or may not be read before the reset.
                    (Mode::HttpStatusLineReset, Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => {}
                    (Mode::Linger0 | Mode::PacedLinger0 | Mode::Unread, Err(e))
                        if e.kind() == io::ErrorKind::ConnectionReset => {}
                    (mode, other) => {
                        return Err(io::Error::other(format!(
                            "connection {i} ({mode:?}): unexpected read result {other:?}"
                        )));
                    }
                }
            }
        }
    }
    if s.mode.holds() {
        // LeakCloseWait: our FINs are out (on loopback they have arrived once shutdown
        // returns), so the server's ends are in CLOSE_WAIT. Hold our ends until the round's end.
        println!("holding");
        io::stdout().flush()?;
        wait_for_round_end()?;
        if s.mode == Mode::HeldLinger0 {
            // The server has closed every connection with an RST by now.
            for (i, conn) in held.iter_mut().enumerate() {
                match conn.read(&mut [0u8; 64]) {
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
                    other => {
                        return Err(io::Error::other(format!("held connection {i}: want a reset, got {other:?}")));
                    }
                }
            }
        }
        drop(held);
    }
    Ok(())
}

/// All connections exchange once, then (the server's end of the link gone) write again with a
/// 1 s TCP_USER_TIMEOUT: each must fail with ETIMEDOUT.
fn client_timeout(s: &Scenario) -> io::Result<()> {
    let mut conns = Vec::new();
    for _ in 0..s.connections {
        let socket = net::tcp_socket_bound_to(s.client_ip, false)?;
        net::set_user_timeout(&socket, Duration::from_millis(1000))?;
        let mut conn = connect(socket, SocketAddr::from((s.server_ip, s.port)))?;
        conn.write_all(REQUEST)?;
        conns.push(conn);
    }
    for conn in &mut conns {
        let mut ok = [0u8; 2];
        conn.read_exact(&mut ok)?;
    }
    net::wait_carrier_lost("vA", Duration::from_secs(20))?;
    for conn in &mut conns {
        conn.write_all(REQUEST)?;
    }
    for (i, conn) in conns.iter_mut().enumerate() {
        let mut byte = [0u8; 1];
        match conn.read(&mut byte) {
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
            other => return Err(io::Error::other(format!("connection {i}: expected ETIMEDOUT, got {other:?}"))),
        }
    }
    Ok(())
}

/// Connects (in parallel) over a link whose far end is down, one SYN retry each: ETIMEDOUT.
fn client_connect_timeout(s: &Scenario) -> io::Result<()> {
    net::wait_carrier_lost("vA", Duration::from_secs(20))?;
    let to = SocketAddr::from((s.server_ip, s.port));
    let attempts: Vec<_> = (0..s.connections)
        .map(|_| {
            let ip = s.client_ip;
            std::thread::spawn(move || -> io::Result<()> {
                let socket = net::tcp_socket_bound_to(ip, false)?;
                net::set_syn_count(&socket, 1)?;
                match connect(socket, to) {
                    Err(e) if e.kind() == io::ErrorKind::TimedOut => Ok(()),
                    other => Err(io::Error::other(format!("expected ETIMEDOUT, got {other:?}"))),
                }
            })
        })
        .collect();
    for a in attempts {
        a.join().map_err(|_| io::Error::other("connect thread panicked"))??;
    }
    Ok(())
}

fn wait_readable(conn: &TcpStream) -> io::Result<()> {
    if net::wait_readable(conn, Duration::from_secs(10))? {
        Ok(())
    } else {
        Err(io::Error::other("request never arrived"))
    }
}
