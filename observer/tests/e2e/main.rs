//! End-to-end tests: the real daemon, real kernel probes, real sockets in private network
//! namespaces, asserted through the daemon's real `/metrics` and status API.
//!
//! They need root (BPF, network namespaces). Without it they fail, naming what is missing; they
//! never skip. Scenarios share one daemon and tell their traffic apart by their processes'
//! command names and addresses, so they can run side by side.

mod harness;
mod intelligence;
mod reliability;
mod traffic;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Command,
    sync::OnceLock,
    time::{Duration, Instant},
};

use harness::{Daemon, Metrics, OBSERVER, kernel_version};
use libtest_mimic::{Arguments, Failed, Trial};
use traffic::{Mode, Scenario, WORKER_ENV};

static SHARED: OnceLock<Result<Daemon, String>> = OnceLock::new();

fn shared_daemon() -> Result<&'static Daemon, Failed> {
    SHARED.get_or_init(|| Daemon::start(&[])).as_ref().map_err(|e| Failed::from(e.as_str()))
}

fn main() {
    if let Ok(role) = std::env::var(WORKER_ENV) {
        traffic::worker_main(&role);
    }
    let args = Arguments::from_args();
    let trials = vec![
        Trial::test("linger0_close_is_local_reset_for_server_and_peer_reset_for_client", linger0_close),
        Trial::test("close_with_unread_request_is_unread_data_with_abort_on_close_reason", close_with_unread_data),
        Trial::test("connect_to_closed_port_is_refused_and_no_socket_reset_has_no_owner", connect_refused),
        Trial::test("graceful_connections_are_closed_once_each_and_never_premature", graceful),
        Trial::test("ipv6_linger0_close_is_local_reset_for_server_and_peer_reset_for_client", || linger0_checks(&scenario_v6(Mode::Linger0, 11, "t11-lng6-srv", "t11-lng6-cli"))),
        Trial::test("ipv6_close_with_unread_request_is_unread_data", || unread_checks(&scenario_v6(Mode::Unread, 12, "t12-unr6-srv", "t12-unr6-cli"))),
        Trial::test("ipv6_connect_to_closed_port_is_refused", || refused_checks(&scenario_v6(Mode::Refused, 13, "t13-ref6-srv", "t13-ref6-cli"))),
        Trial::test("ipv6_graceful_connections_are_never_premature", || graceful_checks(&scenario_v6(Mode::Graceful, 14, "t14-ok6-srv", "t14-ok6-cli"))),
        Trial::test("eof_before_response_when_the_server_closes_without_answering", intelligence::eof_before_response),
        Trial::test("ipv6_eof_before_response", intelligence::eof_before_response_v6),
        Trial::test("abandoned_when_the_client_gives_up_before_the_answer", intelligence::abandoned),
        Trial::test("timeout_when_the_link_goes_down_under_tcp_user_timeout_is_the_clients", intelligence::timeout),
        Trial::test("connect_timeout_when_syn_retries_run_out", intelligence::connect_timeout),
        Trial::test("a_process_in_a_container_cgroup_gets_its_container_label", intelligence::container_label),
        Trial::test("a_received_reset_names_the_sending_process_and_its_reason", intelligence::cause_pairing),
        Trial::test("close_wait_leak_shows_in_connection_gauges_and_oldest_age", intelligence::close_wait_leak),
        Trial::test("connections_open_before_start_are_seeded_from_the_socket_table", intelligence::connections_open_before_start),
        Trial::test("status_api_healthz_and_info_metrics_list_every_probe", status_lists_every_probe),
        Trial::test("status_command_prints_probes_and_fails_clearly_without_a_daemon", status_command),
        Trial::test("probes_flag_forces_a_back_end_for_every_hook", forced_back_end),
        Trial::test("listen_address_in_use_or_invalid_is_a_clear_error", bad_listen_address),
        Trial::test("sigterm_detaches_every_program_and_link_and_exits_zero", sigterm_detaches),
        Trial::test("full_ring_buffer_is_counted_seen_plus_lost_is_exact_and_daemon_recovers", reliability::overflow_accounting),
        Trial::test("cardinality_attack_10000_peers_and_port_scan_stays_within_caps_with_exact_totals", reliability::cardinality_attack),
        Trial::test("sigterm_during_a_reset_storm_exits_zero_and_leaves_no_program_or_link", reliability::sigterm_during_storm),
        Trial::test("sigkill_leaves_no_program_or_link_and_the_next_start_counts_exactly", reliability::sigkill_then_restart),
        Trial::test("two_daemons_at_once_both_count_exactly", reliability::two_daemons_count_independently),
        Trial::test("slow_oversized_concurrent_and_malformed_http_requests_do_not_stop_serving_or_counting", reliability::hostile_http_peers),
    ];
    let conclusion = libtest_mimic::run(&args, trials);
    // Stop the shared daemon before exiting: statics are never dropped.
    if let Some(Ok(daemon)) = SHARED.get() {
        if let Ok(m) = daemon.metrics() {
            eprintln!(
                "shared daemon: {} events seen, {} lost, {} series",
                m.sum("observer_events_total", &[]),
                m.sum("observer_events_lost_total", &[]),
                m.sum("observer_series", &[])
            );
        }
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(daemon.child.id() as i32, libc::SIGTERM) };
    }
    conclusion.exit();
}

fn check(what: &str, got: u64, want: u64) -> Result<(), Failed> {
    if got == want { Ok(()) } else { Err(format!("{what}: got {got}, want {want}").into()) }
}

/// The reason label the running kernel gives an active reset: 6.12 named them; 6.10-6.11 and
/// older kernels report none.
fn active_reason(name: &'static str) -> &'static str {
    if kernel_version() >= (6, 12) { name } else { "not_specified" }
}

const N: u32 = 5;

fn scenario(mode: Mode, tag: u8, server_comm: &'static str, client_comm: &'static str) -> Scenario {
    Scenario {
        mode,
        connections: N,
        server_comm,
        client_comm,
        server_ip: Ipv4Addr::new(127, 10, tag, 1).into(),
        client_ip: Ipv4Addr::new(127, 20, tag, 1).into(),
        port: 8000 + tag as u16,
        distinct_clients: false,
        client_container: None,
    }
}

/// The same over IPv6 loopback (`::1` on both ends; comms and ports tell scenarios apart).
fn scenario_v6(mode: Mode, tag: u8, server_comm: &'static str, client_comm: &'static str) -> Scenario {
    let lo = IpAddr::from(Ipv6Addr::LOCALHOST);
    Scenario { server_ip: lo, client_ip: lo, ..scenario(mode, tag, server_comm, client_comm) }
}

fn linger0_close() -> Result<(), Failed> {
    linger0_checks(&scenario(Mode::Linger0, 1, "t1-lng-srv", "t1-lng-cli"))
}

fn linger0_checks(s: &Scenario) -> Result<(), Failed> {
    let daemon = shared_daemon()?;
    s.run()?;
    let (srv, cli, client, server) = (s.server_comm, s.client_comm, s.client_labels(), s.server_labels());
    let m = daemon.settled_metrics(&s.peers(), |m| both_closed(m, s))?;
    let n = N as u64;
    check("client resets received", m.sum("observer_tcp_resets_received_total", &client), n)?;
    check("client premature peer_reset", m.sum("observer_tcp_premature_closes_total", &with(&client, ("kind", "peer_reset"))), n)?;
    check("client premature (all kinds)", m.sum("observer_tcp_premature_closes_total", &[("comm", cli)]), n)?;
    check("server resets sent", m.sum("observer_tcp_resets_sent_total", &server), n)?;
    check("server resets sent with reason", m.sum("observer_tcp_resets_sent_total", &with(&server, ("reason", active_reason("tcp_state")))), n)?;
    check("server premature local_reset", m.sum("observer_tcp_premature_closes_total", &with(&server, ("kind", "local_reset"))), n)?;
    check("server premature (all kinds)", m.sum("observer_tcp_premature_closes_total", &[("comm", srv)]), n)?;
    check("resets received attributed to the server", m.sum("observer_tcp_resets_received_total", &[("comm", srv)]), 0)?;
    check("resets sent attributed to the client", m.sum("observer_tcp_resets_sent_total", &[("comm", cli)]), 0)?;
    check("client closes", m.sum("observer_tcp_closes_total", &client), n)?;
    check("server closes", m.sum("observer_tcp_closes_total", &server), n)?;
    Ok(())
}

fn close_with_unread_data() -> Result<(), Failed> {
    unread_checks(&scenario(Mode::Unread, 2, "t2-unr-srv", "t2-unr-cli"))
}

fn unread_checks(s: &Scenario) -> Result<(), Failed> {
    let daemon = shared_daemon()?;
    s.run()?;
    let (srv, client, server) = (s.server_comm, s.client_labels(), s.server_labels());
    let m = daemon.settled_metrics(&s.peers(), |m| both_closed(m, s))?;
    let n = N as u64;
    check("server premature unread_data", m.sum("observer_tcp_premature_closes_total", &with(&server, ("kind", "unread_data"))), n)?;
    check("server premature (all kinds)", m.sum("observer_tcp_premature_closes_total", &[("comm", srv)]), n)?;
    check(
        "server resets sent with reason",
        m.sum("observer_tcp_resets_sent_total", &with(&server, ("reason", active_reason("tcp_abort_on_close")))),
        n,
    )?;
    check("client premature peer_reset", m.sum("observer_tcp_premature_closes_total", &with(&client, ("kind", "peer_reset"))), n)?;
    check("client resets received", m.sum("observer_tcp_resets_received_total", &client), n)?;
    check("resets received attributed to the server", m.sum("observer_tcp_resets_received_total", &[("comm", srv)]), 0)?;
    Ok(())
}

fn connect_refused() -> Result<(), Failed> {
    refused_checks(&scenario(Mode::Refused, 3, "t3-ref-srv", "t3-ref-cli"))
}

fn refused_checks(s: &Scenario) -> Result<(), Failed> {
    let daemon = shared_daemon()?;
    s.run()?;
    let cli = s.client_comm;
    let closed_port = (s.port + 1).to_string();
    let (client_ip, server_ip) = (s.client_ip.to_string(), s.server_ip.to_string());
    let client = [("comm", cli), ("role", "client"), ("peer", server_ip.as_str()), ("port", closed_port.as_str())];
    let no_socket = [("comm", ""), ("role", ""), ("peer", client_ip.as_str()), ("port", closed_port.as_str())];
    let m = daemon.settled_metrics(&s.peers(), |m| m.sum("observer_tcp_premature_closes_total", &[("comm", cli)]) >= N as u64)?;
    let n = N as u64;
    check("client premature refused", m.sum("observer_tcp_premature_closes_total", &with(&client, ("kind", "refused"))), n)?;
    check("client premature (all kinds)", m.sum("observer_tcp_premature_closes_total", &[("comm", cli)]), n)?;
    // The tracepoint traces them since 6.10; the kprobe on tcp_v{4,6}_send_reset on every kernel.
    let expected_no_socket = if kernel_version() >= (6, 10) || expected_probes().0 == "kprobe" { n } else { 0 };
    check("no-socket resets sent", m.sum("observer_tcp_resets_sent_total", &with(&no_socket, ("reason", active_reason("no_socket")))), expected_no_socket)?;
    check("resets sent attributed to the client", m.sum("observer_tcp_resets_sent_total", &[("comm", cli)]), 0)?;
    check("client resets received", m.sum("observer_tcp_resets_received_total", &client), n)?;
    Ok(())
}

fn graceful() -> Result<(), Failed> {
    graceful_checks(&scenario(Mode::Graceful, 4, "t4-ok-srv", "t4-ok-cli"))
}

fn graceful_checks(s: &Scenario) -> Result<(), Failed> {
    let daemon = shared_daemon()?;
    s.run()?;
    let (srv, cli, client, server) = (s.server_comm, s.client_comm, s.client_labels(), s.server_labels());
    let m = daemon.settled_metrics(&s.peers(), |m| both_closed(m, s))?;
    let n = N as u64;
    check("closes, both ends", m.sum("observer_tcp_closes_total", &client) + m.sum("observer_tcp_closes_total", &server), 2 * n)?;
    check("client closes", m.sum("observer_tcp_closes_total", &client), n)?;
    check("server closes", m.sum("observer_tcp_closes_total", &server), n)?;
    for comm in [srv, cli] {
        check(&format!("{comm} premature"), m.sum("observer_tcp_premature_closes_total", &[("comm", comm)]), 0)?;
        check(&format!("{comm} resets sent"), m.sum("observer_tcp_resets_sent_total", &[("comm", comm)]), 0)?;
        check(&format!("{comm} resets received"), m.sum("observer_tcp_resets_received_total", &[("comm", comm)]), 0)?;
    }
    Ok(())
}

/// Every connection of the scenario has been closed on both ends.
fn both_closed(m: &Metrics, s: &Scenario) -> bool {
    let n = s.connections as u64;
    m.sum("observer_tcp_closes_total", &[("comm", s.client_comm)]) >= n && m.sum("observer_tcp_closes_total", &[("comm", s.server_comm)]) >= n
}

fn with<'a>(base: &[(&'a str, &'a str)], extra: (&'a str, &'a str)) -> Vec<(&'a str, &'a str)> {
    let mut v = base.to_vec();
    v.push(extra);
    v
}

const TRACEPOINT_PROBES: [(&str, &str); 6] = [
    ("inet_sock_set_state", "tracepoint/sock/inet_sock_set_state"),
    ("tcp_receive_reset", "tracepoint/tcp/tcp_receive_reset"),
    ("tcp_send_reset", "tracepoint/tcp/tcp_send_reset"),
    ("tcp_destroy_sock", "tracepoint/tcp/tcp_destroy_sock"),
    ("sys_exit_accept4", "tracepoint/syscalls/sys_exit_accept4"),
    ("sys_exit_accept", "tracepoint/syscalls/sys_exit_accept"),
];

const KPROBE_PROBES: [(&str, &str); 7] = [
    ("tcp_set_state", "kprobe/tcp_set_state"),
    ("tcp_reset", "kprobe/tcp_reset"),
    ("tcp_send_active_reset", "kprobe/tcp_send_active_reset"),
    ("tcp_v4_send_reset", "kprobe/tcp_v4_send_reset"),
    ("tcp_v6_send_reset", "kprobe/tcp_v6_send_reset"),
    ("tcp_v4_destroy_sock", "kprobe/tcp_v4_destroy_sock"),
    ("inet_csk_accept", "kretprobe/inet_csk_accept"),
];

/// The daemons this suite starts inherit `OBSERVER_PROBES` (`observer run --probes`): with
/// `kprobe` (on a kernel that has kprobes) the whole suite runs on the kprobe back end.
/// Otherwise `auto` picks the tracepoints, which every kernel this suite runs on has.
fn expected_probes() -> (&'static str, &'static [(&'static str, &'static str)]) {
    match std::env::var("OBSERVER_PROBES").as_deref() {
        Ok("kprobe") => ("kprobe", &KPROBE_PROBES),
        _ => ("tracepoint", &TRACEPOINT_PROBES),
    }
}

fn status_lists_every_probe() -> Result<(), Failed> {
    let daemon = shared_daemon()?;
    let (code, _) = daemon.get("/healthz")?;
    check("/healthz status", code as u64, 200)?;
    let (code, body) = daemon.get("/api/v1/status")?;
    check("/api/v1/status status", code as u64, 200)?;
    let status: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("status JSON: {e}: {body}"))?;
    for key in ["version", "kernel", "uptime_seconds", "probes", "events"] {
        if status.get(key).is_none() {
            return Err(format!("status lacks `{key}`: {body}").into());
        }
    }
    for field in ["seen", "lost", "unattributed"] {
        if !status["events"][field].is_u64() {
            return Err(format!("status events.{field} is not a count: {body}").into());
        }
    }
    let probes = status["probes"].as_array().ok_or("probes is not a list")?;
    let (backend, expected) = expected_probes();
    for &(name, attach) in expected {
        let p = probes.iter().find(|p| p["probe"] == name).ok_or_else(|| format!("probe {name} missing from status: {body}"))?;
        if p["attach"] != attach || p["state"] != "attached" || p["backend"] != backend || !p["hook"].is_string() {
            return Err(format!("probe {name}: {p}").into());
        }
    }
    if probes.len() != expected.len() {
        return Err(format!("status lists probes of a back end not chosen: {body}").into());
    }
    let m: Metrics = daemon.metrics()?;
    for &(name, attach) in expected {
        check(&format!("observer_probe_info {name}"), m.sum("observer_probe_info", &[("probe", name), ("attach", attach), ("backend", backend)]), 1)?;
    }
    check("observer_build_info", m.sum("observer_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1)?;
    for name in ["observer_events_lost_total", "observer_events_unattributed_total"] {
        if m.matching(name, &[]).count() != 1 {
            return Err(format!("{name} not exported").into());
        }
    }
    Ok(())
}

fn status_command() -> Result<(), Failed> {
    let daemon = shared_daemon()?;
    let out = Command::new(OBSERVER).args(["status", "--endpoint", &daemon.endpoint()]).output().map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!("observer status failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    for &(name, attach) in expected_probes().1 {
        if !text.lines().any(|l| l.starts_with(name) && l.contains("attached") && l.contains(attach)) {
            return Err(format!("observer status does not show {name} attached:\n{text}").into());
        }
    }
    let json = Command::new(OBSERVER).args(["status", "--json", "--endpoint", &daemon.endpoint()]).output().map_err(|e| e.to_string())?;
    serde_json::from_slice::<serde_json::Value>(&json.stdout).map_err(|e| format!("status --json is not JSON: {e}"))?;

    // Pointed at nothing: a clear error, non-zero exit.
    let nothing = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let dead = format!("http://{}", nothing.local_addr().map_err(|e| e.to_string())?);
    drop(nothing);
    let out = Command::new(OBSERVER).args(["status", "--endpoint", &dead]).output().map_err(|e| e.to_string())?;
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || !err.contains("cannot reach an observer daemon at") || !err.contains("--endpoint") {
        return Err(format!("status against nothing: {} / {err}", out.status).into());
    }
    Ok(())
}

/// `--probes kprobe` on a kernel without kprobes (this project's machines) is a clear error
/// naming what is missing; where the kernel has them, every hook runs on kprobes.
/// `--probes tracepoint` runs every hook on tracepoints.
fn forced_back_end() -> Result<(), Failed> {
    if std::path::Path::new("/sys/bus/event_source/devices/kprobe").exists() {
        let daemon = Daemon::start(&["--probes", "kprobe"])?;
        let (_, body) = daemon.get("/api/v1/status")?;
        let status: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("status JSON: {e}: {body}"))?;
        let probes = status["probes"].as_array().ok_or("probes is not a list")?;
        for &(name, attach) in &KPROBE_PROBES {
            if !probes.iter().any(|p| p["probe"] == name && p["attach"] == attach && p["backend"] == "kprobe" && p["state"] == "attached") {
                return Err(format!("--probes kprobe: {name} not attached to {attach}: {body}").into());
            }
        }
    } else {
        let out = Command::new(OBSERVER)
            .args(["run", "--listen", "127.0.0.1:0", "--probes", "kprobe"])
            .output()
            .map_err(|e| e.to_string())?;
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success()
            || !err.contains("none of observer's probes could be attached")
            || !err.contains("no kprobes")
            || !err.contains("tcp_set_state")
        {
            return Err(format!("--probes kprobe without kprobes: {} / {err}", out.status).into());
        }
    }
    let daemon = Daemon::start(&["--probes", "tracepoint"])?;
    let (_, body) = daemon.get("/api/v1/status")?;
    let status: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("status JSON: {e}: {body}"))?;
    let probes = status["probes"].as_array().ok_or("probes is not a list")?;
    if probes.len() != TRACEPOINT_PROBES.len() || probes.iter().any(|p| p["backend"] != "tracepoint" || p["state"] != "attached") {
        return Err(format!("--probes tracepoint: {body}").into());
    }
    Ok(())
}

fn bad_listen_address() -> Result<(), Failed> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = taken.local_addr().map_err(|e| e.to_string())?.to_string();
    let out = Command::new(OBSERVER).args(["run", "--listen", &addr]).output().map_err(|e| e.to_string())?;
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || !err.contains(&format!("cannot listen on {addr}")) || !err.contains("--listen") {
        return Err(format!("port in use: {} / {err}", out.status).into());
    }
    let out = Command::new(OBSERVER).args(["run", "--listen", "not-an-address"]).output().map_err(|e| e.to_string())?;
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || !err.contains("--listen") || !err.contains("not-an-address") {
        return Err(format!("invalid address: {} / {err}", out.status).into());
    }
    Ok(())
}

/// IDs of the BPF programs process `pid` holds open, from its fds' `prog_id:` in /proc.
fn programs_of(pid: u32) -> Result<Vec<u64>, Failed> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))? {
        let path = entry.map_err(|e| e.to_string())?.path();
        let Ok(info) = std::fs::read_to_string(&path) else { continue };
        if let Some(id) = info.lines().find_map(|l| l.strip_prefix("prog_id:")).and_then(|v| v.trim().parse().ok()) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// `bpftool OBJECT show --json`, as a list.
fn bpftool_list(object: &str) -> Result<Vec<serde_json::Value>, Failed> {
    let out = Command::new("bpftool")
        .args([object, "show", "--json"])
        .output()
        .map_err(|e| format!("running bpftool (installed by `cargo xtask setup`): {e}"))?;
    if !out.status.success() {
        return Err(format!("bpftool {object} show: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("bpftool JSON: {e}"))?;
    Ok(list.as_array().cloned().unwrap_or_default())
}

/// IDs of the BPF links attached to any of `programs` (`bpftool link show`).
fn links_to(programs: &[u64]) -> Result<Vec<u64>, Failed> {
    Ok(bpftool_list("link")?
        .iter()
        .filter(|l| l["prog_id"].as_u64().is_some_and(|p| programs.contains(&p)))
        .filter_map(|l| l["id"].as_u64())
        .collect())
}

/// What a daemon holds before it is stopped: its programs, and the links attaching them.
struct Held {
    programs: Vec<u64>,
    links: Vec<u64>,
}

fn held_by(pid: u32) -> Result<Held, Failed> {
    let programs = programs_of(pid)?;
    let links = links_to(&programs)?;
    if programs.is_empty() {
        return Err(format!("daemon {pid} holds no BPF program").into());
    }
    // Since 5.15 tracepoints and kprobes are attached through BPF links, which bpftool lists.
    if kernel_version() >= (5, 15) && links.is_empty() {
        return Err(format!("daemon {pid} holds programs {programs:?} but bpftool shows no link to them").into());
    }
    Ok(Held { programs, links })
}

/// After the daemon is gone, none of its programs is loaded and none of its links exists.
fn nothing_left(held: &Held) -> Result<(), Failed> {
    let loaded: Vec<u64> = bpftool_list("prog")?.iter().filter_map(|p| p["id"].as_u64()).collect();
    let programs: Vec<u64> = held.programs.iter().copied().filter(|id| loaded.contains(id)).collect();
    let links: Vec<u64> = bpftool_list("link")?.iter().filter_map(|l| l["id"].as_u64()).filter(|id| held.links.contains(id)).collect();
    if !programs.is_empty() || !links.is_empty() {
        return Err(format!("left after exit: programs {programs:?}, links {links:?}").into());
    }
    Ok(())
}

fn sigterm_detaches() -> Result<(), Failed> {
    let mut daemon = Daemon::start(&[])?;
    let pid = daemon.child.id();
    let held = held_by(pid)?;
    check("programs held by the daemon", held.programs.len() as u64, expected_probes().1.len() as u64)?;
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let deadline = Instant::now() + harness::PATIENCE;
    let status = loop {
        if let Some(status) = daemon.child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if Instant::now() > deadline {
            return Err(format!("daemon still running {} s after SIGTERM", harness::PATIENCE.as_secs()).into());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if !status.success() {
        let log: Vec<String> = daemon.log.lock().map(|l| l.try_iter().collect()).unwrap_or_default();
        return Err(format!("exit status after SIGTERM: {status}\n{}", log.join("\n")).into());
    }
    nothing_left(&held)
}
