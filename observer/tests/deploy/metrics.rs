//! Every `observer_*` metric name that deploy/ uses (the alerts, the dashboard, the runbooks'
//! and the README's PromQL) is one the daemon exports: a real daemon is started in a private
//! network namespace, a little loopback traffic makes its per-connection families appear, and
//! the `# TYPE` lines of its `/metrics` are the names it exports.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, TcpListener, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

use libtest_mimic::Failed;
use observer_testkit::{Daemon, daemon::Options, net};

use crate::support;

const OBSERVER: &str = env!("CARGO_BIN_EXE_observer");

pub fn names_are_exported() -> Result<(), Failed> {
    let (exprs, _) = support::all_exprs()?;
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for e in &exprs {
        for name in support::metric_names(&e.expr) {
            used.entry(name).or_default().insert(e.file.clone());
        }
    }
    let wanted: BTreeSet<String> = used.keys().cloned().collect();
    // The daemon, the traffic and the scrapes in a thread of their own, in a network namespace of
    // its own (the daemon is started from it, so it serves there too).
    let scrape = std::thread::spawn(move || scrape_after_traffic(&wanted))
        .join()
        .map_err(|_| "the traffic thread panicked")??;
    let types = exported_types(&scrape.body);
    let mut missing = Vec::new();
    for (name, files) in &used {
        let exported = types.contains_key(name)
            || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                name.strip_suffix(suffix)
                    .is_some_and(|base| matches!(types.get(base).map(String::as_str), Some("histogram" | "summary")))
            });
        if !exported {
            missing.push(format!("{name} (used in {})", files.iter().cloned().collect::<Vec<_>>().join(", ")));
        }
    }
    println!("{} observer_* names used in deploy/; the daemon exports {} families", used.len(), types.len());
    if !missing.is_empty() {
        return Err(format!(
            "the daemon ({}, revision {}) does not export {} name(s) that deploy/ uses:\n- {}\n(exported: {})",
            OBSERVER,
            scrape.revision,
            missing.len(),
            missing.join("\n- "),
            types.keys().cloned().collect::<Vec<_>>().join(", ")
        )
        .into());
    }
    Ok(())
}

struct Scrape {
    body: String,
    revision: String,
}

/// `# TYPE name type` lines: name → type.
fn exported_types(body: &str) -> BTreeMap<String, String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name.to_string(), kind.trim().to_string()))
        .collect()
}

fn scrape_after_traffic(wanted: &BTreeSet<String>) -> Result<Scrape, Failed> {
    net::enter_new_netns().map_err(|e| format!("a private network namespace for the traffic: {e}"))?;
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    let netns = format!("/proc/{}/task/{tid}/ns/net", std::process::id());
    let options =
        Options { ready_within: Duration::from_secs(120), http_timeout: Duration::from_secs(60), ..Options::default() };
    // --probe-stats for observer_probe_runs_total and observer_probe_run_seconds_total.
    let daemon = Daemon::start(Path::new(OBSERVER), &["--netns", &netns, "--probe-stats"], &options)
        .map_err(|e| format!("starting the daemon (this trial needs root, like the e2e suite): {e}"))?;
    let held = traffic().map_err(|e| format!("making loopback traffic: {e}"))?;
    let made = Instant::now();
    // Counters appear with the events; the state gauges with the socket-map refresh (every 2 s).
    // Wait until every wanted name is there, or the set of names has stopped changing.
    let mut last = BTreeSet::new();
    let mut stable_since = Instant::now();
    let body = loop {
        let (status, body) = daemon.get("/metrics").map_err(|e| format!("scraping the daemon: {e}"))?;
        if status != 200 {
            return Err(format!("/metrics answered {status}").into());
        }
        let names: BTreeSet<String> = exported_types(&body).into_keys().collect();
        if names != last {
            last = names.clone();
            stable_since = Instant::now();
        }
        let complete = wanted.iter().all(|w| {
            names.contains(w)
                || ["_bucket", "_sum", "_count"].iter().any(|s| w.strip_suffix(s).is_some_and(|b| names.contains(b)))
        });
        let settled = made.elapsed() > Duration::from_secs(6) && stable_since.elapsed() > Duration::from_secs(4);
        if complete || settled || made.elapsed() > Duration::from_secs(30) {
            break body;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    drop(held);
    let revision = body
        .lines()
        .find(|l| l.starts_with("observer_build_info{"))
        .and_then(|l| l.split("revision=\"").nth(1))
        .and_then(|r| r.split('"').next())
        .unwrap_or("?")
        .to_string();
    daemon.stop().map_err(|e| format!("stopping the daemon: {e}"))?;
    Ok(Scrape { body, revision })
}

/// Sockets that must stay open until the scrape: a connection in CLOSE-WAIT, an established one.
struct Held {
    _listener: TcpListener,
    _close_wait: TcpStream,
    _established: (TcpStream, TcpStream),
}

/// A little of each kind of connection: on loopback graceful, refused, reset (SO_LINGER 0), one
/// left in CLOSE-WAIT and one established; and a connect over a veth whose far end is down
/// (both ends in this private namespace), whose SYN is retransmitted once: the retransmits.
fn traffic() -> std::io::Result<Held> {
    connect_timeout()?;
    let lo = Ipv4Addr::LOCALHOST;
    let listener = TcpListener::bind((lo, 0))?;
    let addr = listener.local_addr()?;
    let mut buf = [0u8; 64];
    // Graceful request and response, the server closing first.
    for _ in 0..3 {
        let mut client = TcpStream::connect(addr)?;
        client.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
        let (mut server, _) = listener.accept()?;
        let _ = server.read(&mut buf)?;
        server.write_all(b"HTTP/1.0 200 OK\r\n\r\n")?;
        drop(server);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest)?;
    }
    // Refused: a port nobody listens on.
    let closed = TcpListener::bind((lo, 0))?.local_addr()?;
    for _ in 0..3 {
        if TcpStream::connect(closed).is_ok() {
            return Err(std::io::Error::other(format!("{closed} accepted a connection; it should be closed")));
        }
    }
    // Reset: the server closes with SO_LINGER 0.
    for _ in 0..3 {
        let mut client = TcpStream::connect(addr)?;
        client.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
        let (server, _) = listener.accept()?;
        net::set_linger0(&server)?;
        drop(server);
        let _ = client.read(&mut buf);
    }
    // CLOSE-WAIT: the client closes, the server never does.
    let client = TcpStream::connect(addr)?;
    let (close_wait, _) = listener.accept()?;
    client.shutdown(Shutdown::Both)?;
    drop(client);
    // Established.
    let client = TcpStream::connect(addr)?;
    let (server, _) = listener.accept()?;
    Ok(Held { _listener: listener, _close_wait: close_wait, _established: (client, server) })
}

/// One connect that times out after one SYN retransmission, over `obs-va`, a veth whose peer
/// stays down; the peer's MAC is static, so the SYNs are sent and lost rather than failing
/// neighbour resolution. Addresses as in the e2e suite's veth scenarios, inside this namespace.
fn connect_timeout() -> std::io::Result<()> {
    let (local, remote) = net::dead_end_link()?;
    let socket = net::tcp_socket_bound_to(local.into(), false)?;
    net::set_syn_count(&socket, 1)?;
    match net::connect(socket, (remote, 8080).into()) {
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Ok(()),
        other => Err(std::io::Error::other(format!("connect over the dead veth: want ETIMEDOUT, got {other:?}"))),
    }
}
