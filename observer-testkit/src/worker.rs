//! Workers that make the suites' traffic: a test binary re-executes itself as one
//! ([`WORKER_ENV`] names the role; the arguments are `NETNS PORT N COMM [HOLD]`). A worker joins
//! the test's network namespace by its path (`/run/netns/NAME`) before anything else, so no
//! traffic touches the host's, and sets its command name, so the daemon's attribution can be
//! asserted by `comm`. Servers print `ready` once they listen and `done` once they have handled
//! their N connections; clients print `done` when theirs are made. `HOLD` (seconds, or `forever`) keeps the worker alive after its work, so
//! that its sockets' owner (and its container, in a container) outlives the test's checks.
//!
//! The same binary runs on the host, in a container (with the namespace mounted in) or in a pod.

use std::{
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    time::Duration,
};

use crate::{
    net::{self, set_linger0},
    process::set_comm,
};

/// Environment variable that turns a test binary into a worker: its value is the role.
pub const WORKER_ENV: &str = "OBSERVER_TEST_WORKER";

/// Runs the worker role named by [`WORKER_ENV`] and exits, if the variable is set; returns
/// otherwise. The first thing a test binary's `main` calls.
pub fn run_if_worker() {
    if let Ok(role) = std::env::var(WORKER_ENV) {
        worker_main(&role);
    }
}

/// The arguments of a worker: `NETNS PORT N COMM`, and `HOLD` when given.
pub fn args(netns: &str, port: u16, n: u32, comm: &str, hold: Option<&str>) -> Vec<String> {
    let mut args = vec![netns.to_string(), port.to_string(), n.to_string(), comm.to_string()];
    args.extend(hold.map(str::to_string));
    args
}

const REQUEST: &[u8] = b"GET /orders HTTP/1.1\r\nHost: shop\r\n\r\n";

/// Runs worker `role` with the process's arguments and exits.
fn worker_main(role: &str) -> ! {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(role, &args) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("worker {role} {args:?}: {e}");
            std::process::exit(1)
        }
    }
}

fn run(role: &str, args: &[String]) -> io::Result<()> {
    let (netns, port, n, comm, hold) = match args {
        [netns, port, n, comm] => (netns, port, n, comm, None),
        [netns, port, n, comm, hold] => (netns, port, n, comm, Some(hold.as_str())),
        _ => return Err(io::Error::other("want NETNS PORT N COMM [HOLD]")),
    };
    let hold = match hold {
        None => Some(Duration::ZERO),
        Some("forever") => None,
        Some(secs) => Some(Duration::from_secs(secs.parse().map_err(io::Error::other)?)),
    };
    work(role, netns, port, n, comm)?;
    // Servers said it after their N connections already; clients say it here.
    if !role.starts_with("server") && role != "noresponse" {
        say("done")?;
    }
    match hold {
        Some(d) => std::thread::sleep(d),
        None => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
    }
    Ok(())
}

fn work(role: &str, netns: &str, port: &str, n: &str, comm: &str) -> io::Result<()> {
    let port: u16 = port.parse().map_err(io::Error::other)?;
    let n: u32 = n.parse().map_err(io::Error::other)?;
    enter_netns(netns)?;
    set_comm(comm)?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    match role {
        // Reads each request, then closes with SO_LINGER {1, 0}: one RST each (local_reset here,
        // peer_reset for the client).
        "server-linger0" => serve(addr, n, |conn| {
            read_request(conn)?;
            set_linger0(conn)
        }),
        // Reads each request and closes without a word (FIN): eof_before_response for the
        // client, a normal close here.
        "noresponse" => serve(addr, n, read_request),
        // Reads each request and never closes: once the clients have closed, the sockets sit in
        // CLOSE-WAIT until this worker is killed.
        "server-leak" => {
            let listener = TcpListener::bind(addr)?;
            say("ready")?;
            let mut held = Vec::new();
            for _ in 0..n {
                let (mut conn, _) = listener.accept()?;
                read_request(&mut conn)?;
                let mut rest = Vec::new();
                conn.read_to_end(&mut rest)?;
                held.push(conn);
            }
            say("done")?;
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        // Sends a request and reads to the end: the server's RST or FIN, never an answer.
        "client" => {
            for i in 0..n {
                let mut conn = TcpStream::connect(addr)?;
                conn.write_all(REQUEST)?;
                let mut answer = Vec::new();
                match conn.read_to_end(&mut answer) {
                    Ok(0) => {}
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
                    other => {
                        return Err(io::Error::other(format!(
                            "connection {i}: want EOF or a reset before any answer, got {other:?} ({} bytes)",
                            answer.len()
                        )));
                    }
                }
            }
            Ok(())
        }
        // Sends a request and closes at once (FIN).
        "client-close" => {
            for _ in 0..n {
                TcpStream::connect(addr)?.write_all(REQUEST)?;
            }
            Ok(())
        }
        // Connects to a port nobody listens on: ECONNREFUSED each.
        "refused" => {
            for i in 0..n {
                match TcpStream::connect(addr) {
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                    other => {
                        return Err(io::Error::other(format!("connection {i}: want ECONNREFUSED, got {other:?}")));
                    }
                }
            }
            Ok(())
        }
        // Connects over `obs-va`, a veth whose peer stays down, with one SYN retry: ETIMEDOUT
        // after one retransmission each (connect_timeout, and observer_tcp_retransmits_total).
        // The peer's MAC is static, so the SYNs are sent and lost rather than failing neighbour
        // resolution. PORT is the port connected to on the far side.
        "connect-timeout" => {
            let (local, remote) = net::dead_end_link()?;
            for i in 0..n {
                let socket = net::tcp_socket_bound_to(local.into(), false)?;
                net::set_syn_count(&socket, 1)?;
                match net::connect(socket, SocketAddr::from((remote, port))) {
                    Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
                    other => return Err(io::Error::other(format!("connection {i}: want ETIMEDOUT, got {other:?}"))),
                }
            }
            Ok(())
        }
        other => Err(io::Error::other(format!("unknown role {other}"))),
    }
}

/// Listens on `addr`, says `ready`, hands each of `n` connections to `each` and closes it, says
/// `done`.
fn serve(addr: SocketAddr, n: u32, mut each: impl FnMut(&mut TcpStream) -> io::Result<()>) -> io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    say("ready")?;
    for _ in 0..n {
        let (mut conn, _) = listener.accept()?;
        each(&mut conn)?;
    }
    say("done")
}

fn say(line: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}

fn read_request(conn: &mut TcpStream) -> io::Result<()> {
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !got.ends_with(b"\r\n\r\n") {
        let k = conn.read(&mut buf)?;
        if k == 0 {
            return Err(io::Error::other("the client closed before its request was complete"));
        }
        got.extend_from_slice(&buf[..k]);
    }
    Ok(())
}

/// Joins the network namespace mounted at `path` (needs CAP_SYS_ADMIN).
fn enter_netns(path: &str) -> io::Result<()> {
    let ns = std::fs::File::open(path)?;
    // SAFETY: setns with an open namespace fd; this process is single-threaded here.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
