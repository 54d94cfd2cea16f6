//! Overload, hostile peers and lifecycle: deterministic, exact, no timing assertions.
//!
//! Tests that need numbers no other traffic may touch (lost events, series counts) run their own
//! daemon restricted to the scenario's network namespace (`--netns`).

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use libtest_mimic::Failed;

use observer_testkit::{Daemon, Metrics, kernel_version, process::Signal};

use crate::{
    lifecycle::{held_by, nothing_left},
    support::{self, N, PATIENCE, Settle as _, check, expected_probes, start_daemon, with},
    traffic::{Mode, Scenario},
};

/// A scenario with addresses and ports of its own (127.30/127.40, port 9000 + tag).
fn scenario(mode: Mode, tag: u8, connections: u32, server_comm: &'static str, client_comm: &'static str) -> Scenario {
    Scenario {
        connections,
        server_ip: Ipv4Addr::new(127, 30, tag, 1).into(),
        client_ip: Ipv4Addr::new(127, 40, tag, 1).into(),
        port: 9000 + tag as u16,
        ..support::scenario(mode, tag, server_comm, client_comm)
    }
}

/// Each SO_LINGER 0 connection makes 6 events: the client's ConnectionOpened (connect),
/// ResetReceived and ConnectionClosed, the server's ConnectionOpened (accept), ResetSent and
/// ConnectionClosed.
const EVENTS_PER_LINGER0: u64 = 6;

/// Waits until every event of the namespace is accounted for (seen or lost).
fn accounted(daemon: &Daemon, expected: u64) -> Result<Metrics, Failed> {
    Ok(daemon.settled_metrics(&[], |m| m.events_seen() + m.events_lost() >= expected)?)
}

pub fn overflow_accounting() -> Result<(), Failed> {
    let s = scenario(Mode::Linger0, 1, 300, "r1-ovf-srv", "r1-ovf-cli");
    let mut ns = s.prepare()?;
    // 4096 bytes hold 24 events (160 bytes + an 8-byte header each); with the daemon stopped, a burst of 1800 must overflow.
    let daemon = start_daemon(&["--netns", &ns.path, "--ring-buffer-size", "4096"])?;
    daemon.signal(Signal::STOP)?;
    let burst = ns.round();
    daemon.signal(Signal::CONT)?;
    burst?;
    let made = s.connections as u64 * EVENTS_PER_LINGER0;
    let m = accounted(&daemon, made)?;
    let (seen, lost) = (m.events_seen(), m.events_lost());
    check("seen + lost after the burst", seen + lost, made)?;
    if lost == 0 {
        return Err(format!("the ring never overflowed (seen {seen}): the test did not test overflow").into());
    }
    // The daemon recovers: the next round is accounted for exactly too, and counted by owner.
    ns.round_of(Mode::Linger0, 10)?;
    let made2 = made + 10 * EVENTS_PER_LINGER0;
    let m2 = accounted(&daemon, made2)?;
    check("seen + lost after recovery", m2.events_seen() + m2.events_lost(), made2)?;
    check("events seen after recovery", m2.events_seen() - seen, made2 - made - (m2.events_lost() - lost))?;
    ns.release()?;
    Ok(())
}

pub fn cardinality_attack() -> Result<(), Failed> {
    let mut s = scenario(Mode::Graceful, 2, 10_000, "r2-card-srv", "r2-card-cli");
    s.distinct_clients = true;
    let max_series = 500u64;
    let mut ns = s.prepare()?;
    let daemon = start_daemon(&["--netns", &ns.path, "--max-peers", "50", "--max-series", &max_series.to_string()])?;
    ns.round()?; // 10,000 distinct peers
    ns.round_of(Mode::PortScan, 1000)?; // 1,000 closed ports
    let (srv, cli) = (s.server_comm, s.client_comm);
    let n = s.connections as u64;
    // The daemon sees only this namespace: every series must settle.
    let m = daemon.settled_metrics(&[], |m| {
        m.sum("observer_tcp_closes_total", &[("comm", srv)]) >= n
            && m.sum("observer_tcp_premature_closes_total", &[("comm", cli)]) >= 1000
    })?;
    // Totals stay exact.
    check("server closes", m.sum("observer_tcp_closes_total", &[("comm", srv)]), n)?;
    check("client closes", m.sum("observer_tcp_closes_total", &[("comm", cli), ("port", &s.port.to_string())]), n)?;
    check("client refused", m.sum("observer_tcp_premature_closes_total", &[("kind", "refused")]), 1000)?;
    // Folded series keep their reason but not their comm ("other").
    // Traced by the tracepoint since 6.10, by the kprobe back end on every kernel.
    match (kernel_version() >= (6, 10), expected_probes().backend == "kprobe") {
        (true, _) => {
            check("no-socket resets", m.sum("observer_tcp_resets_sent_total", &[("reason", "no_socket")]), 1000)?
        }
        (false, false) => {
            check("no-socket resets", m.sum("observer_tcp_resets_sent_total", &[("reason", "not_specified")]), 0)?
        }
        (false, true) => {
            // Without reasons (before 6.10) the kprobes' other passive resets (segments that hit
            // a TIME_WAIT socket, ...) cannot be told apart from the scan's: at least 1000.
            let sent = m.sum("observer_tcp_resets_sent_total", &[("reason", "not_specified")]);
            if sent < 1000 {
                return Err(format!("no-socket resets: got {sent}, want at least 1000").into());
            }
        }
    }
    // Within the caps: at most 50 peers of their own per (metric, comm, port), plus "other".
    let server_peers = m.matching("observer_tcp_closes_total", &[("comm", srv)]).count() as u64;
    check("server close series (50 peers + other)", server_peers, 51)?;
    let exported: u64 = [
        "observer_tcp_resets_received_total",
        "observer_tcp_resets_sent_total",
        "observer_tcp_closes_total",
        "observer_tcp_premature_closes_total",
        "observer_tcp_retransmits_total",
        "observer_tcp_connections_opened_total",
    ]
    .iter()
    .map(|name| m.matching(name, &[]).count() as u64)
    .sum();
    // Beyond --max-series, one overflow series per metric and reason/kind.
    if exported > max_series + 10 {
        return Err(
            format!("{exported} per-connection series exported, cap is {max_series} (+ overflow series)").into()
        );
    }
    check("observer_series gauge", m.sum("observer_series", &[]), exported)?;
    if m.sum("observer_series_folded_total", &[]) == 0 {
        return Err("nothing was folded under a cardinality attack".into());
    }
    ns.release()?;
    Ok(())
}

pub fn sigterm_during_storm() -> Result<(), Failed> {
    let s = scenario(Mode::Linger0, 3, 3000, "r3-term-srv", "r3-term-cli");
    let ns = s.prepare()?;
    let mut daemon = start_daemon(&["--netns", &ns.path])?;
    let held = held_by(daemon.pid)?;
    let storm = std::thread::spawn(move || ns.run());
    // Wait until the storm is under way, then SIGTERM.
    let started = Instant::now();
    while daemon.metrics()?.events_seen() == 0 && started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(10));
    }
    daemon.signal(Signal::TERM)?;
    let status = daemon.wait_exit(PATIENCE)?;
    storm.join().map_err(|_| "storm thread panicked")??;
    if !status.success() {
        return Err(format!("exit status after SIGTERM during a storm: {status}").into());
    }
    nothing_left(&held)
}

/// Exact counts of a linger0 round of `connections` in `daemon`. A miss says which daemon
/// (`name`) and carries what it knew of the scenario's connections: its series and its event log.
fn check_linger0(name: &str, daemon: &Daemon, s: &Scenario, connections: u64) -> Result<(), Failed> {
    let (client, server) = (s.client_labels(), s.server_labels());
    let m = daemon.settled_metrics(&s.peers(), |m| {
        m.sum("observer_tcp_closes_total", &client) >= connections
            && m.sum("observer_tcp_closes_total", &server) >= connections
    })?;
    linger0_counts(&m, &client, &server, connections).map_err(|miss| {
        let series: Vec<String> =
            m.of_peers(&s.peers()).iter().map(|(n, labels, v)| format!("  {n}{labels:?} {v}")).collect();
        format!(
            "{name}: {}\nits series of the scenario's peers:\n{}\nits event log of them (/api/v1/events):\n{}",
            miss.message().unwrap_or("counts differ"),
            series.join("\n"),
            event_lines(daemon, &s.peers())
        )
        .into()
    })
}

/// The daemon's records of connections with one of `peers`: how many of each (event, comm,
/// role, kind), then the first [`RECORDS_SHOWN`] in full.
fn event_lines(daemon: &Daemon, peers: &[&str]) -> String {
    let records = match support::event_records(daemon) {
        Ok(records) => records,
        Err(e) => return format!("  {}", e.message().unwrap_or("could not be read")),
    };
    let ip = |v: &serde_json::Value| v.as_str()?.parse::<SocketAddr>().ok().map(|a| a.ip().to_string());
    let records: Vec<&serde_json::Value> = records
        .iter()
        .filter(|e| {
            [&e["local"], &e["remote"]].into_iter().any(|a| ip(a).is_some_and(|ip| peers.contains(&ip.as_str())))
        })
        .collect();
    let text = |e: &serde_json::Value, k: &str| e[k].as_str().unwrap_or("-").to_string();
    let mut counts = std::collections::BTreeMap::new();
    for e in &records {
        *counts.entry((text(e, "event"), text(e, "comm"), text(e, "role"), text(e, "kind"))).or_insert(0) += 1;
    }
    let counts =
        counts.into_iter().map(|((event, comm, role, kind), n)| format!("  {n} x {event} {comm:?} {role} {kind}"));
    let shown = records.iter().take(RECORDS_SHOWN).map(|e| {
        format!(
            "  #{} {} {}[{}] {} {} -> {} kind={} reason={} facts={} cause={}",
            e["seq"],
            text(e, "event"),
            text(e, "comm"),
            e["pid"],
            text(e, "role"),
            text(e, "local"),
            text(e, "remote"),
            text(e, "kind"),
            text(e, "reason"),
            e["facts"],
            e["cause"]
        )
    });
    counts.chain(shown).collect::<Vec<_>>().join("\n")
}

const RECORDS_SHOWN: usize = 12;

fn linger0_counts(
    m: &Metrics,
    client: &[(&str, &str)],
    server: &[(&str, &str)],
    connections: u64,
) -> Result<(), Failed> {
    check(
        "client peer_reset",
        m.sum("observer_tcp_premature_closes_total", &with(client, ("kind", "peer_reset"))),
        connections,
    )?;
    check(
        "server local_reset",
        m.sum("observer_tcp_premature_closes_total", &with(server, ("kind", "local_reset"))),
        connections,
    )?;
    check("server resets sent", m.sum("observer_tcp_resets_sent_total", server), connections)?;
    check("client resets received", m.sum("observer_tcp_resets_received_total", client), connections)?;
    check("events lost", m.events_lost(), 0)?;
    Ok(())
}

pub fn sigkill_then_restart() -> Result<(), Failed> {
    let s = scenario(Mode::Linger0, 4, N, "r4-kill-srv", "r4-kill-cli");
    let mut ns = s.prepare()?;
    let mut first = start_daemon(&["--netns", &ns.path])?;
    let held = held_by(first.pid)?;
    first.signal(Signal::KILL)?;
    first.wait_exit(PATIENCE)?;
    // The kernel releases programs and links with the last fd: nothing is left behind.
    nothing_left(&held)?;
    let second = start_daemon(&["--netns", &ns.path])?;
    ns.round()?;
    ns.release()?;
    check_linger0("restarted daemon", &second, &s, N as u64)
}

pub fn two_daemons_count_independently() -> Result<(), Failed> {
    let s = scenario(Mode::Linger0, 5, N, "r5-two-srv", "r5-two-cli");
    let mut ns = s.prepare()?;
    let a = start_daemon(&["--netns", &ns.path])?;
    let b = start_daemon(&["--netns", &ns.path])?;
    ns.round()?;
    ns.release()?;
    check_linger0("first daemon", &a, &s, N as u64)?;
    check_linger0("second daemon", &b, &s, N as u64)
}

/// Connections accepted and held while the daemon runs, then closed (RSTs) while it is stopped
/// (SIGSTOP) for longer than its socket scan's interval: when it resumes, a scan that finds them
/// gone runs while their closes still wait in the ring buffer. With socket-local storage the
/// daemon itself joins each accepted socket's owner to its later events, and that scan must not
/// take the owner from a close still on its way: every close names the server, as many as the
/// namespace's kernel counted resets.
pub fn a_daemon_stopped_while_its_connections_close_still_names_their_owner() -> Result<(), Failed> {
    const HELD: u32 = 200;
    const ROUNDS: u64 = 3;
    let s = scenario(Mode::HeldLinger0, 7, HELD, "r7-stop-srv", "r7-stop-cli");
    let mut ns = s.prepare()?;
    // The daemon joins owners itself only with socket-local storage, which only the BTF
    // tracepoint programs reach: pinned, whatever back end the suite runs on.
    let daemon = start_daemon(&["--netns", &ns.path, "--probes", "btf", "--socket-store", "storage"])?;
    let server = s.server_labels();
    for round in 1..=ROUNDS {
        ns.start_holding(Mode::HeldLinger0, HELD)?;
        let accepted = round * u64::from(HELD);
        let opened = |m: &Metrics| m.sum("observer_tcp_connections_opened_total", &server);
        let m = daemon.settled_metrics(&s.peers(), |m| opened(m) >= accepted)?;
        check("connections the server accepted, seen before the stop", opened(&m), accepted)?;
        daemon.signal(Signal::STOP)?;
        let resume = Instant::now() + STOPPED_FOR;
        let closed = ns.end_holding();
        std::thread::sleep(resume.saturating_duration_since(Instant::now()));
        daemon.signal(Signal::CONT)?;
        closed?;
    }
    let connections = ROUNDS * u64::from(HELD);
    check("resets the namespace's kernel sent (OutRsts)", ns.kernel_tcp("OutRsts")?, connections)?;
    ns.release()?;
    check_linger0("daemon", &daemon, &s, connections)?;
    check(
        "closes of sockets of unknown owner",
        daemon.metrics()?.sum("observer_tcp_closes_total", &[("comm", ""), ("role", "server")]),
        0,
    )
}

/// How long that test keeps its daemon stopped: over its scan interval (2 s), so a scan is due
/// the moment it resumes.
const STOPPED_FOR: Duration = Duration::from_millis(2500);

pub fn hostile_http_peers() -> Result<(), Failed> {
    // Its own daemon, watching only this test's namespace: other tests' storms must not decide
    // how fast it answers.
    let s = scenario(Mode::Linger0, 6, N, "r6-http-srv", "r6-http-cli");
    let mut ns = s.prepare()?;
    let daemon = &start_daemon(&["--netns", &ns.path])?;
    let addr = daemon.addr;
    // A slow client that never finishes its request, held open throughout.
    let mut slow = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    slow.write_all(b"GET /metr").map_err(|e| e.to_string())?;
    // Oversized headers: refused, and the daemon goes on.
    let mut big = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    big.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    let header = format!("GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(1 << 20));
    let _ = big.write_all(header.as_bytes());
    let mut answer = Vec::new();
    let _ = big.read_to_end(&mut answer);
    if String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200") {
        return Err("a 1 MiB header was accepted".into());
    }
    // Bad query strings and paths.
    for path in [
        "/api/v1/status?%%%",
        "/metrics?x=%ff%fe",
        "/api/v1/status?a=1&a=2&&=",
        "/healthz?\u{7f}",
        "/nope",
        "/api/v1/status/../../etc/passwd",
    ] {
        let code = raw_get_status(addr, path, PATIENCE).map_err(|e| format!("{path}: {e}"))?;
        if code >= 500 {
            return Err(format!("{path} answered {code}").into());
        }
    }
    // 500 concurrent scrapes all answered.
    let scrapes: Vec<_> = (0..500)
        .map(|_| std::thread::spawn(move || raw_get_status(addr, "/metrics", Duration::from_secs(120))))
        .collect();
    let mut ok = 0;
    let mut failures = std::collections::BTreeMap::new();
    for t in scrapes {
        match t.join() {
            Ok(Ok(200)) => ok += 1,
            other => *failures.entry(format!("{other:?}")).or_insert(0) += 1,
        }
    }
    if !failures.is_empty() {
        eprintln!("failed scrapes: {failures:?}");
    }
    check("concurrent scrapes answered 200", ok, 500)?;
    // And it keeps counting, exactly.
    ns.round()?;
    ns.release()?;
    check_linger0("daemon", daemon, &s, N as u64)?;
    drop(slow);
    Ok(())
}

/// A GET written byte for byte onto a new connection, as the path is (no URL parsing, so bytes
/// no client library would send reach the daemon): the answer's status. Waits up to
/// `patience` for the answer (a guard against hangs, not a latency assertion).
fn raw_get_status(addr: SocketAddr, path: &str, patience: Duration) -> Result<u16, String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    stream.set_read_timeout(Some(patience)).map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(|e| format!("reading {path}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, _) = text.split_once("\r\n\r\n").ok_or("no HTTP header")?;
    head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| "bad status line".to_string())
}
