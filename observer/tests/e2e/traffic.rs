//! Real TCP traffic in a private network namespace, made by named processes.
//!
//! The test binary re-executes itself: a `netns` worker unshares a network namespace, brings
//! `lo` up, and starts a `server` and a `client` worker in it (children inherit the namespace).
//! Each sets its own command name, so the daemon's attribution can be asserted by `comm`.

use std::{
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    process::{Command, Stdio},
    time::Duration,
};

/// Environment variable that turns the test binary into a worker.
pub const WORKER_ENV: &str = "OBSERVER_E2E_WORKER";

/// What the server does with each connection (the client follows suit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Reads the request, then closes with SO_LINGER {1, 0}: RST, reason TCP_STATE.
    Linger0,
    /// Closes with the request unread: RST, reason TCP_ABORT_ON_CLOSE.
    Unread,
    /// Connects to a port nobody listens on: RST NO_SOCKET, ECONNREFUSED.
    Refused,
    /// Reads the request, answers, closes; the client reads to EOF and closes.
    Graceful,
    /// Connects once to each of `connections` closed ports after `port`: a port scan.
    PortScan,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Linger0 => "linger0",
            Mode::Unread => "unread",
            Mode::Refused => "refused",
            Mode::Graceful => "graceful",
            Mode::PortScan => "portscan",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "linger0" => Mode::Linger0,
            "unread" => Mode::Unread,
            "refused" => Mode::Refused,
            "graceful" => Mode::Graceful,
            "portscan" => Mode::PortScan,
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
    pub server_ip: Ipv4Addr,
    pub client_ip: Ipv4Addr,
    pub port: u16,
    /// Each connection comes from its own address (`client_ip` + i): many distinct peers.
    pub distinct_clients: bool,
}

const REQUEST: &[u8] = b"GET /order HTTP/1.1\r\n\r\n";

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
        [("comm", self.client_comm), ("role", "client"), ("peer", leak(self.server_ip.to_string())), ("port", leak(self.port.to_string()))]
    }

    /// Labels of the server's connections.
    pub fn server_labels(&self) -> [(&'static str, &'static str); 4] {
        [("comm", self.server_comm), ("role", "server"), ("peer", leak(self.client_ip.to_string())), ("port", leak(self.port.to_string()))]
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
            return Err(format!("round {mode:?} x{connections} failed: {line}{}", self.release().err().unwrap_or_default()));
        }
        Ok(())
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
        "server" => {
            set_comm(scenario.server_comm);
            server(&scenario)
        }
        "client" => {
            set_comm(scenario.client_comm);
            client(&scenario)
        }
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

fn set_comm(name: &str) {
    let name = std::ffi::CString::new(name).expect("comm without NUL");
    // SAFETY: PR_SET_NAME with a NUL-terminated string; the kernel truncates to 15 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong, 0, 0, 0) };
}

fn netns_worker(s: &Scenario) -> io::Result<()> {
    // SAFETY: the worker is single-threaded; the new namespace applies to it and its children.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::other(format!(
            "unshare(CLONE_NEWNET) failed: {} (the end-to-end tests need root)",
            io::Error::last_os_error()
        )));
    }
    loopback_up()?;
    // Announce the namespace, then make one round of traffic per `go MODE N` line until EOF.
    println!("netns /proc/{}/ns/net", std::process::id());
    io::stdout().flush()?;
    for line in io::stdin().lock().lines() {
        let line = line?;
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
    let spawn = |role: &str, stdout: Stdio| {
        Command::new(&exe).env(WORKER_ENV, role).args(s.args()).stdin(Stdio::null()).stdout(stdout).spawn()
    };
    let mut server = spawn("server", Stdio::piped())?;
    // The server says "ready" once it listens.
    let mut ready = String::new();
    BufReader::new(server.stdout.take().ok_or_else(|| io::Error::other("no server stdout"))?).read_line(&mut ready)?;
    if ready.trim() != "ready" {
        let _ = server.kill();
        return Err(io::Error::other(format!("server did not start: {ready:?} ({:?})", server.wait()?)));
    }
    let client = spawn("client", Stdio::null())?.wait()?;
    let server_status = server.wait()?;
    if !client.success() || !server_status.success() {
        return Err(io::Error::other(format!("client {client}, server {server_status}")));
    }
    Ok(())
}

/// `ip link set lo up`, by ioctl.
fn loopback_up() -> io::Result<()> {
    // SAFETY: a datagram socket used only for interface ioctls, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zeroed ifreq is valid; the name fits.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: ioctls on a valid fd with a valid ifreq.
    let rc = unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) < 0 {
            -1
        } else {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &req)
        }
    };
    let err = io::Error::last_os_error();
    // SAFETY: closing our own fd.
    unsafe { libc::close(fd) };
    if rc < 0 { Err(err) } else { Ok(()) }
}

fn server(s: &Scenario) -> io::Result<()> {
    let listener = TcpListener::bind((s.server_ip, s.port))?;
    println!("ready");
    io::stdout().flush()?;
    if matches!(s.mode, Mode::Refused | Mode::PortScan) {
        // Nobody accepts on the port the client targets (port + 1); this one just exists.
        return Ok(());
    }
    for _ in 0..s.connections {
        let (mut conn, _) = listener.accept()?;
        let mut request = [0u8; REQUEST.len()];
        match s.mode {
            Mode::Linger0 => {
                conn.read_exact(&mut request)?;
                set_linger0(&conn)?;
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
            Mode::Refused | Mode::PortScan => unreachable!(),
        }
    }
    Ok(())
}

fn client(s: &Scenario) -> io::Result<()> {
    for i in 0..s.connections {
        let ip = if s.distinct_clients { Ipv4Addr::from(u32::from(s.client_ip) + i) } else { s.client_ip };
        let socket = socket_bound_to(ip)?;
        match s.mode {
            Mode::Refused | Mode::PortScan => {
                let port = if s.mode == Mode::PortScan { s.port + 1 + i as u16 } else { s.port + 1 };
                match connect(socket, SocketAddr::from((s.server_ip, port))) {
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                    other => return Err(io::Error::other(format!("connection {i}: expected ECONNREFUSED, got {other:?}"))),
                }
            }
            mode => {
                let mut conn = connect(socket, SocketAddr::from((s.server_ip, s.port)))?;
                conn.write_all(REQUEST)?;
                let mut response = Vec::new();
                let read = conn.read_to_end(&mut response);
                match (mode, read) {
                    (Mode::Graceful, Ok(_)) if response.ends_with(b"ok") => {}
                    (Mode::Linger0 | Mode::Unread, Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => {}
                    (mode, other) => {
                        return Err(io::Error::other(format!("connection {i} ({mode:?}): unexpected read result {other:?}")));
                    }
                }
            }
        }
    }
    Ok(())
}

fn set_linger0(conn: &TcpStream) -> io::Result<()> {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt with a valid linger struct on an open socket.
    let rc = unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

fn wait_readable(conn: &TcpStream) -> io::Result<()> {
    let mut pfd = libc::pollfd { fd: conn.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    let rc = unsafe { libc::poll(&mut pfd, 1, Duration::from_secs(10).as_millis() as i32) };
    if rc == 1 { Ok(()) } else { Err(io::Error::other("request never arrived")) }
}

/// A TCP socket bound to `ip` (so the scenario's client address is its own).
fn socket_bound_to(ip: Ipv4Addr) -> io::Result<i32> {
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let addr = sockaddr(SocketAddr::from((ip, 0)));
    // SAFETY: bind with a valid sockaddr_in.
    if unsafe { libc::bind(fd, (&addr as *const libc::sockaddr_in).cast(), size_of::<libc::sockaddr_in>() as u32) } != 0 {
        let e = io::Error::last_os_error();
        // SAFETY: our fd.
        unsafe { libc::close(fd) };
        return Err(e);
    }
    Ok(fd)
}

fn connect(fd: i32, to: SocketAddr) -> io::Result<TcpStream> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: fd is an open socket we own; TcpStream takes ownership and closes it.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let addr = sockaddr(to);
    // SAFETY: connect with a valid sockaddr_in.
    if unsafe { libc::connect(fd, (&addr as *const libc::sockaddr_in).cast(), size_of::<libc::sockaddr_in>() as u32) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

fn sockaddr(addr: SocketAddr) -> libc::sockaddr_in {
    let SocketAddr::V4(v4) = addr else { panic!("IPv4 only here") };
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*v4.ip()).to_be() },
        sin_zero: [0; 8],
    }
}
