//! Connection intelligence: the kinds beyond resets, per-connection facts, containers, cause
//! pairing and connection-state gauges, exact on real sockets.

use std::net::{IpAddr, Ipv4Addr};

use libtest_mimic::Failed;

use observer_testkit::{Daemon, Metrics, kernel_version};

use crate::{
    shared_daemon,
    support::{
        N, Settle as _, active_reason, both_closed, check, event_records, scenario, scenario_v6, start_daemon, with,
    },
    traffic::{Mode, Scenario},
};

const PREMATURE: &str = "observer_tcp_premature_closes_total";
const CLOSES: &str = "observer_tcp_closes_total";

/// The length of the request every client sends (traffic.rs).
const REQUEST_BYTES: u64 = 23;

/// Runs `s` under a daemon of its own that watches only the scenario's namespace: tests that
/// read the event log must not find it flooded by other tests' traffic.
fn run_watched(s: &Scenario) -> Result<Daemon, Failed> {
    let mut ns = s.prepare()?;
    let daemon = start_daemon(&["--netns", &ns.path])?;
    ns.round()?;
    ns.release()?;
    Ok(daemon)
}

/// Every premature close of `comm`, by kind: the context a failed count needs.
fn kinds(m: &Metrics, comm: &str) -> String {
    let kinds: Vec<String> =
        m.matching(PREMATURE, &[("comm", comm)]).map(|(l, v)| format!("{}={v}", l["kind"])).collect();
    format!("[{}]", kinds.join(", "))
}

fn events_of(daemon: &Daemon, comm: &str) -> Result<Vec<serde_json::Value>, Failed> {
    Ok(event_records(daemon)?.into_iter().filter(|e| e["comm"] == comm).collect())
}

pub fn eof_before_response() -> Result<(), Failed> {
    eof_checks(&scenario(Mode::NoResponse, 21, "t21-eof-srv", "t21-eof-cli"))
}

pub fn eof_before_response_v6() -> Result<(), Failed> {
    eof_checks(&scenario_v6(Mode::NoResponse, 22, "t22-eof6-srv", "t22-eof6-cli"))
}

/// The server reads each request and closes without a word: the client saw EOF.
fn eof_checks(s: &Scenario) -> Result<(), Failed> {
    let daemon = &run_watched(s)?;
    let (client, server) = (s.client_labels(), s.server_labels());
    let m = daemon.settled_metrics(&s.peers(), |m| both_closed(m, s))?;
    let n = N as u64;
    check("client eof_before_response", m.sum(PREMATURE, &with(&client, ("kind", "eof_before_response"))), n)?;
    check("client premature (all kinds)", m.sum(PREMATURE, &[("comm", s.client_comm)]), n)?;
    check("server premature (it closed first: not abandoned)", m.sum(PREMATURE, &[("comm", s.server_comm)]), 0)?;
    check("closes, both ends", m.sum(CLOSES, &client) + m.sum(CLOSES, &server), 2 * n)?;
    check(
        "resets",
        m.sum("observer_tcp_resets_sent_total", &[("comm", s.server_comm)])
            + m.sum("observer_tcp_resets_received_total", &[("comm", s.client_comm)]),
        0,
    )?;
    // Per-connection facts: the request went out, nothing came back, the peer closed first.
    let events = events_of(daemon, s.client_comm)?;
    check("client events logged", events.len() as u64, n)?;
    for e in &events {
        let f = &e["facts"];
        if e["kind"] != "eof_before_response"
            || f["bytes_sent"] != REQUEST_BYTES
            || f["bytes_received"] != 0
            || f["close_initiator"] != "peer"
            || f["final_state"] != "LAST-ACK"
        {
            return Err(format!("unexpected event/facts: {e}").into());
        }
        if f["duration_seconds"].as_f64().is_none_or(|d| d <= 0.0) || e["pid"].as_u64().is_none_or(|p| p == 0) {
            return Err(format!("no duration or pid: {e}").into());
        }
    }
    Ok(())
}

/// Each client sends its request and closes before the server answers.
pub fn abandoned() -> Result<(), Failed> {
    let s = scenario(Mode::Abandon, 23, "t23-abn-srv", "t23-abn-cli");
    let daemon = &run_watched(&s)?;
    let (client, server) = (s.client_labels(), s.server_labels());
    let m = daemon.settled_metrics(&s.peers(), |m| both_closed(m, &s))?;
    let n = N as u64;
    check("server abandoned", m.sum(PREMATURE, &with(&server, ("kind", "abandoned"))), n)?;
    check("server premature (all kinds)", m.sum(PREMATURE, &[("comm", s.server_comm)]), n)?;
    check("client premature (it gave up itself)", m.sum(PREMATURE, &[("comm", s.client_comm)]), 0)?;
    check("closes, both ends", m.sum(CLOSES, &client) + m.sum(CLOSES, &server), 2 * n)?;
    for e in events_of(daemon, s.server_comm)? {
        let f = &e["facts"];
        if f["bytes_received"] != REQUEST_BYTES || f["bytes_sent"] != 0 || f["close_initiator"] != "peer" {
            return Err(format!("unexpected facts: {e}").into());
        }
    }
    Ok(())
}

/// A scenario over a veth link (its own /24 per tag).
fn veth_scenario(mode: Mode, tag: u8, server_comm: &'static str, client_comm: &'static str) -> Scenario {
    Scenario {
        server_ip: IpAddr::V4(Ipv4Addr::new(10, 77, tag, 2)),
        client_ip: IpAddr::V4(Ipv4Addr::new(10, 77, tag, 1)),
        connections: 3,
        ..scenario(mode, tag, server_comm, client_comm)
    }
}

/// The server's end of the link goes down; the client writes with TCP_USER_TIMEOUT and the
/// kernel gives up in a timer (softirq): the close must still be the client's.
pub fn timeout() -> Result<(), Failed> {
    let daemon = shared_daemon()?;
    let s = veth_scenario(Mode::Timeout, 24, "t24-to-srv", "t24-to-cli");
    s.run()?;
    let client = s.client_labels();
    let n = s.connections as u64;
    let m = daemon.settled_metrics(&s.peers(), |m| m.sum(PREMATURE, &[("comm", s.client_comm)]) >= n)?;
    check("client timeout", m.sum(PREMATURE, &with(&client, ("kind", "timeout"))), n)
        .map_err(|e| format!("{}; all kinds: {}", e.message().unwrap_or_default(), kinds(&m, s.client_comm)))?;
    check("client premature (all kinds)", m.sum(PREMATURE, &[("comm", s.client_comm)]), n)?;
    check("client closes", m.sum(CLOSES, &client), n)?;
    for comm in ["swapper/0", "swapper/1", "ksoftirqd/0", "ksoftirqd/1", ""] {
        check(
            &format!("timeouts attributed to {comm:?}"),
            m.sum(PREMATURE, &[("comm", comm), ("kind", "timeout")]),
            0,
        )?;
    }
    // Retransmissions before the timeout are counted for the client.
    if m.sum("observer_tcp_retransmits_total", &client) < n {
        return Err(format!(
            "retransmits: {} for {n} timed-out connections",
            m.sum("observer_tcp_retransmits_total", &client)
        )
        .into());
    }
    Ok(())
}

pub fn connect_timeout() -> Result<(), Failed> {
    let daemon = shared_daemon()?;
    let s = veth_scenario(Mode::ConnectTimeout, 25, "t25-cto-srv", "t25-cto-cli");
    s.run()?;
    let client = s.client_labels();
    let n = s.connections as u64;
    let m = daemon.settled_metrics(&s.peers(), |m| m.sum(PREMATURE, &[("comm", s.client_comm)]) >= n)?;
    // A close missing from the client's series was either never tracked (the kernel side had no
    // room for its socket) or attributed elsewhere: say which.
    check("client connect_timeout", m.sum(PREMATURE, &with(&client, ("kind", "connect_timeout"))), n).map_err(|e| {
        format!(
            "{}; all kinds: {}; daemon-wide: sockets untracked {}, events lost {}",
            e.message().unwrap_or_default(),
            kinds(&m, s.client_comm),
            m.sum("observer_sockets_untracked_total", &[]),
            m.sum("observer_events_lost_total", &[])
        )
    })?;
    check("client premature (all kinds)", m.sum(PREMATURE, &[("comm", s.client_comm)]), n)?;
    Ok(())
}

/// The client runs in a cgroup named as docker names a container's.
pub fn container_label() -> Result<(), Failed> {
    const ID: &str = "4f1c0ffee0ddba11c0de5eed0b5e55ed4f1c0ffee0ddba11c0de5eed0b5e55ed";
    let s = Scenario { client_container: Some(ID), ..scenario(Mode::Linger0, 26, "t26-ctr-srv", "t26-ctr-cli") };
    let daemon = &run_watched(&s)?;
    let (client, server) = (s.client_labels(), s.server_labels());
    let m = daemon.settled_metrics(&s.peers(), |m| both_closed(m, &s));
    // The container's cgroup outlives its processes until the daemon has resolved it, as a
    // real container's does.
    crate::traffic::remove_container_cgroup(ID)?;
    let m = m?;
    let n = N as u64;
    check(
        "client resets received in its container",
        m.sum("observer_tcp_resets_received_total", &with(&client, ("container_id", &ID[..12]))),
        n,
    )?;
    check("client peer_reset in its container", m.sum(PREMATURE, &with(&client, ("container_id", &ID[..12]))), n)?;
    check(
        "server (on the host) resets sent",
        m.sum("observer_tcp_resets_sent_total", &with(&server, ("container_id", ""))),
        n,
    )?;
    for e in events_of(daemon, s.client_comm)? {
        if e["container_id"] != ID[..12]
            || !e["cgroup"].as_str().is_some_and(|c| c.ends_with(&format!("/docker-{ID}.scope")))
        {
            return Err(format!("event without its container and cgroup: {e}").into());
        }
    }
    Ok(())
}

/// Both ends on this node: the client's received reset names the server process and its reason.
pub fn cause_pairing() -> Result<(), Failed> {
    let s = scenario(Mode::Linger0, 27, "t27-pair-srv", "t27-pair-cli");
    let daemon = &run_watched(&s)?;
    daemon.settled_metrics(&s.peers(), |m| both_closed(m, &s))?;
    let server_events = events_of(daemon, s.server_comm)?;
    let server_pid = server_events.first().and_then(|e| e["pid"].as_u64()).ok_or("no server events")?;
    let reason = active_reason("tcp_state");
    let events = events_of(daemon, s.client_comm)?;
    // Per connection: the reset received and the premature close, each naming its cause.
    check("client events logged", events.len() as u64, 2 * N as u64)?;
    let want = format!("reset by {}[{server_pid}]: {reason}", s.server_comm);
    for e in &events {
        let cause = &e["cause"];
        if cause["comm"] != s.server_comm
            || cause["pid"] != server_pid
            || cause["reason"] != reason
            || cause["summary"] != want.as_str()
        {
            return Err(format!("cause {cause} is not {want:?}: {e}").into());
        }
    }
    // A refused connect: the kernel answered for a port nobody listens on.
    let r = scenario(Mode::Refused, 28, "t28-pref-srv", "t28-pref-cli");
    let daemon = &run_watched(&r)?;
    daemon.settled_metrics(&r.peers(), |m| m.sum(PREMATURE, &[("comm", r.client_comm)]) >= N as u64)?;
    let refused = events_of(daemon, r.client_comm)?;
    check("refused client events", refused.len() as u64, 2 * N as u64)?;
    if kernel_version() >= (6, 10) {
        // No-socket resets are traced since 6.10.
        let want = format!("reset by the kernel, nothing listening: {}", active_reason("no_socket"));
        if let Some(e) = refused.iter().find(|e| e["cause"]["summary"] != want.as_str()) {
            return Err(format!("refused connect without cause {want:?}: {e}").into());
        }
    }
    // The status carries the latest premature closes with their cause.
    let (_, body) = daemon.get("/api/v1/status")?;
    let status: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    // This daemon saw only the refused connects: they pair with the kernel's no-socket resets,
    // which are traced since 6.10 (none to pair with before).
    let paired = if kernel_version() >= (6, 10) { 2 * N as u64 } else { 0 };
    if status["events"]["paired"].as_u64().is_none_or(|p| p < paired) || !status["recent_premature"].is_array() {
        return Err(format!("status lacks pairing: {body}").into());
    }
    Ok(())
}

fn gauge(m: &Metrics, name: &str, filter: &[(&str, &str)]) -> f64 {
    m.matching(name, filter).map(|(_, v)| v).sum()
}

/// A server that never closes the sockets its clients closed: CLOSE_WAIT grows and ages.
pub fn close_wait_leak() -> Result<(), Failed> {
    let daemon = shared_daemon()?;
    let s = scenario(Mode::LeakCloseWait, 29, "t29-leak-srv", "t29-leak-cli");
    let mut ns = s.prepare()?;
    ns.start_holding(Mode::LeakCloseWait, N)?;
    let n = N as f64;
    let leaking = [("comm", s.server_comm), ("role", "server"), ("state", "close_wait")];
    let m = daemon.settled_metrics(&s.peers(), |m| gauge(m, "observer_tcp_connections", &leaking) >= n)?;
    let got = gauge(&m, "observer_tcp_connections", &leaking);
    if got != n {
        return Err(format!("CLOSE-WAIT sockets of the leaking server: got {got}, want {n}").into());
    }
    let age = gauge(&m, "observer_tcp_close_wait_oldest_seconds", &[("comm", s.server_comm)]);
    if age <= 0.0 {
        return Err(format!("oldest CLOSE-WAIT age of the leaking server: {age}").into());
    }
    // Once it closes them, the gauge drops to zero.
    ns.end_holding()?;
    let m = daemon.settled_metrics(&s.peers(), |m| gauge(m, "observer_tcp_connections", &leaking) == 0.0)?;
    let left = gauge(&m, "observer_tcp_connections", &leaking);
    if left != 0.0 {
        return Err(format!("CLOSE-WAIT sockets after the server closed them: {left}").into());
    }
    ns.release()?;
    Ok(())
}

/// `--socket-store storage`: each socket's state lives on the socket, out of the accept programs'
/// reach, and the gauges read it back through sock_diag. The accepted sockets' owner, joined by
/// the daemon, still names the leaking server in the gauges and in its closes; and the store
/// refuses the back ends that cannot reach it.
pub fn socket_storage_keeps_owners_and_gauges_exact() -> Result<(), Failed> {
    let s = scenario(Mode::LeakCloseWait, 31, "t31-stg-srv", "t31-stg-cli");
    let mut ns = s.prepare()?;
    // Only the BTF tracepoint programs reach socket-local storage, so this test pins them even
    // in the runs of the suite on another back end (`OBSERVER_PROBES=kprobe|tracepoint`).
    let daemon = start_daemon(&["--netns", &ns.path, "--probes", "btf", "--socket-store", "storage"])?;
    let (_, body) = daemon.get("/api/v1/status")?;
    let status: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    if status["config"]["socket_store"]["value"] != "storage" {
        return Err(format!("status does not show socket_store=storage: {}", status["config"]).into());
    }
    ns.start_holding(Mode::LeakCloseWait, N)?;
    let n = N as u64;
    let leaking = [("comm", s.server_comm), ("role", "server"), ("state", "close_wait")];
    let m = daemon.settled_metrics(&s.peers(), |m| gauge(m, "observer_tcp_connections", &leaking) >= n as f64)?;
    let got = gauge(&m, "observer_tcp_connections", &leaking);
    if got != n as f64 {
        return Err(format!("CLOSE-WAIT sockets of the leaking server: got {got}, want {n}").into());
    }
    if gauge(&m, "observer_tcp_close_wait_oldest_seconds", &[("comm", s.server_comm)]) <= 0.0 {
        return Err("no oldest CLOSE-WAIT age for the leaking server".into());
    }
    check(
        "connections the server accepted",
        m.sum("observer_tcp_connections_opened_total", &[("comm", s.server_comm), ("role", "server")]),
        n,
    )?;
    ns.end_holding()?;
    ns.release()?;
    let server = s.server_labels();
    let m = daemon.settled_metrics(&s.peers(), |m| m.sum(CLOSES, &[("comm", s.server_comm)]) >= n)?;
    check("server closes, owner joined by the daemon", m.sum(CLOSES, &server), n)?;
    check("server abandoned", m.sum(PREMATURE, &with(&server, ("kind", "abandoned"))), n)
        .map_err(|e| format!("{}; all kinds: {}", e.message().unwrap_or_default(), kinds(&m, s.server_comm)))?;
    check("client closes", m.sum(CLOSES, &s.client_labels()), n)?;
    check("events about sockets of unknown owner", m.sum("observer_events_unattributed_total", &[]), 0)?;
    check("sockets without an entry", m.sum("observer_sockets_untracked_total", &[]), 0)?;
    let gone = daemon.settled_metrics(&s.peers(), |m| gauge(m, "observer_tcp_connections", &leaking) == 0.0)?;
    if gauge(&gone, "observer_tcp_connections", &leaking) != 0.0 {
        return Err("CLOSE-WAIT sockets still counted after the server closed them".into());
    }

    let refused = std::process::Command::new(crate::support::OBSERVER)
        .args(["run", "--listen", "127.0.0.1:0", "--socket-store", "storage", "--probes", "tracepoint"])
        .output()
        .map_err(|e| format!("running observer run: {e}"))?;
    let err = String::from_utf8_lossy(&refused.stderr);
    if refused.status.code() != Some(1)
        || !err.contains("--socket-store storage cannot be used here")
        || !err.contains("--probes tracepoint")
    {
        return Err(format!("--socket-store storage --probes tracepoint: {:?}, stderr: {err}", refused.status).into());
    }
    Ok(())
}

/// Connections open before the daemon starts: seeded from the kernel's socket table, so the
/// gauges are right at the first scrape and their closes are counted for their owner.
pub fn connections_open_before_start() -> Result<(), Failed> {
    let s = scenario(Mode::LeakCloseWait, 30, "t30-seed-srv", "t30-seed-cli");
    let mut ns = s.prepare()?;
    ns.start_holding(Mode::LeakCloseWait, N)?;
    let daemon = start_daemon(&["--netns", &ns.path])?;
    let n = N as u64;
    let first = daemon.metrics()?;
    let leaking = [("comm", s.server_comm), ("role", "server"), ("state", "close_wait")];
    let got = gauge(&first, "observer_tcp_connections", &leaking);
    if got != n as f64 {
        return Err(format!("CLOSE-WAIT sockets of the server at the first scrape: got {got}, want {n}").into());
    }
    ns.end_holding()?;
    ns.release()?;
    let server = s.server_labels();
    let m = daemon.settled_metrics(&s.peers(), |m| m.sum(CLOSES, &[("comm", s.server_comm)]) >= n)?;
    check("server closes, attributed through the seed", m.sum(CLOSES, &server), n)?;
    // It read each request, never answered, and the client closed first.
    check("server abandoned", m.sum(PREMATURE, &with(&server, ("kind", "abandoned"))), n)
        .map_err(|e| format!("{}; all kinds: {}", e.message().unwrap_or_default(), kinds(&m, s.server_comm)))?;
    check("events about sockets of unknown owner", m.sum("observer_events_unattributed_total", &[]), 0)?;
    Ok(())
}
