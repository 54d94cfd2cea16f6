//! The traffic the runtime tests make, from inside containers: this test binary is put into an
//! image with its libraries and run there as a worker (`WORKER_ENV` names the role). Each worker
//! enters the test's own network namespace first (mounted into the container), so no traffic
//! touches the host's, and sets its command name, so the daemon's attribution can be asserted.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    time::Duration,
};

use observer_testkit::{net::set_linger0, process::set_comm};

/// Environment variable that turns the test binary into a worker: `ROLE NETNS PORT N COMM`.
pub const WORKER_ENV: &str = "OBSERVER_RUNTIME_WORKER";

const REQUEST: &[u8] = b"GET /orders HTTP/1.1\r\nHost: shop\r\n\r\n";

/// Runs the worker role named by [`WORKER_ENV`] with the process's arguments and exits.
pub fn worker_main(role: &str) -> ! {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(role, &args) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("worker {role} {args:?}: {e}");
            std::process::exit(1)
        }
    }
}

fn run(role: &str, args: &[String]) -> std::io::Result<()> {
    let [netns, port, n, comm] = args else {
        return Err(std::io::Error::other("want NETNS PORT N COMM"));
    };
    let port: u16 = port.parse().map_err(std::io::Error::other)?;
    let n: u32 = n.parse().map_err(std::io::Error::other)?;
    enter_netns(netns)?;
    set_comm(comm)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    match role {
        // Reads each request, then closes with SO_LINGER {1, 0}: an RST each; then serves on
        // (idle) until the container is stopped.
        "server-linger0" => {
            let listener = TcpListener::bind(addr)?;
            println!("ready");
            for _ in 0..n {
                let (mut conn, _) = listener.accept()?;
                read_request(&mut conn)?;
                set_linger0(&conn)?;
            }
            println!("done");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        // Reads each request and never closes: the sockets sit in CLOSE-WAIT once the clients
        // have closed, until the container is stopped.
        "server-leak" => {
            let listener = TcpListener::bind(addr)?;
            println!("ready");
            let mut held = Vec::new();
            for _ in 0..n {
                let (mut conn, _) = listener.accept()?;
                read_request(&mut conn)?;
                held.push(conn);
            }
            println!("done");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        // Sends a request and reads until the server's RST (or EOF).
        "client" => {
            for _ in 0..n {
                let mut conn = TcpStream::connect(addr)?;
                conn.write_all(REQUEST)?;
                let mut buf = [0u8; 512];
                while matches!(conn.read(&mut buf), Ok(k) if k > 0) {}
            }
            println!("done");
            Ok(())
        }
        // Sends a request and closes at once (FIN), then lives on a moment: a container whose
        // cgroup is removed within milliseconds of its last connection can lose its identity
        // (README "Pods", known limits), which is not what this role is for.
        "client-close" => {
            for _ in 0..n {
                let mut conn = TcpStream::connect(addr)?;
                conn.write_all(REQUEST)?;
            }
            println!("done");
            std::thread::sleep(Duration::from_secs(2));
            Ok(())
        }
        other => Err(std::io::Error::other(format!("unknown role {other}"))),
    }
}

fn read_request(conn: &mut TcpStream) -> std::io::Result<()> {
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !got.ends_with(b"\r\n\r\n") {
        let k = conn.read(&mut buf)?;
        if k == 0 {
            return Err(std::io::Error::other("the client closed before its request was complete"));
        }
        got.extend_from_slice(&buf[..k]);
    }
    Ok(())
}

/// Joins the network namespace mounted at `path` (needs CAP_SYS_ADMIN).
fn enter_netns(path: &str) -> std::io::Result<()> {
    let ns = std::fs::File::open(path)?;
    // SAFETY: setns with an open namespace fd; this process is single-threaded here.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
