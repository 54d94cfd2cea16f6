//! The four ways a connection ends on loopback, over IPv4 and IPv6: SO_LINGER 0, a request
//! left unread, a closed port, a graceful exchange. Exact counts on the shared daemon.

use libtest_mimic::Failed;
use observer_testkit::{Metrics, kernel_version};

use crate::{
    shared_daemon,
    support::{N, Settle as _, active_reason, both_closed, check, expected_probes, scenario, scenario_v6, with},
    traffic::{Mode, Scenario},
};

pub fn linger0_close() -> Result<(), Failed> {
    linger0_checks(&scenario(Mode::Linger0, 1, "t1-lng-srv", "t1-lng-cli"))
}

fn linger0_checks(s: &Scenario) -> Result<(), Failed> {
    let daemon = shared_daemon()?;
    let opens = run_counting_opens(s)?;
    let (srv, cli, client, server) = (s.server_comm, s.client_comm, s.client_labels(), s.server_labels());
    let m = daemon.settled_metrics(&s.peers(), |m| both_closed(m, s))?;
    let n = N as u64;
    check_opened(&m, s, opens, (n, n))?;
    check("client resets received", m.sum("observer_tcp_resets_received_total", &client), n)?;
    check(
        "client premature peer_reset",
        m.sum("observer_tcp_premature_closes_total", &with(&client, ("kind", "peer_reset"))),
        n,
    )?;
    check("client premature (all kinds)", m.sum("observer_tcp_premature_closes_total", &[("comm", cli)]), n)?;
    check("server resets sent", m.sum("observer_tcp_resets_sent_total", &server), n)?;
    check(
        "server resets sent with reason",
        m.sum("observer_tcp_resets_sent_total", &with(&server, ("reason", active_reason("tcp_state")))),
        n,
    )?;
    check(
        "server premature local_reset",
        m.sum("observer_tcp_premature_closes_total", &with(&server, ("kind", "local_reset"))),
        n,
    )?;
    check("server premature (all kinds)", m.sum("observer_tcp_premature_closes_total", &[("comm", srv)]), n)?;
    check(
        "resets received attributed to the server",
        m.sum("observer_tcp_resets_received_total", &[("comm", srv)]),
        0,
    )?;
    check("resets sent attributed to the client", m.sum("observer_tcp_resets_sent_total", &[("comm", cli)]), 0)?;
    check("client closes", m.sum("observer_tcp_closes_total", &client), n)?;
    check("server closes", m.sum("observer_tcp_closes_total", &server), n)?;
    Ok(())
}

pub fn close_with_unread_data() -> Result<(), Failed> {
    unread_checks(&scenario(Mode::Unread, 2, "t2-unr-srv", "t2-unr-cli"))
}

fn unread_checks(s: &Scenario) -> Result<(), Failed> {
    let daemon = shared_daemon()?;
    s.run()?;
    let (srv, client, server) = (s.server_comm, s.client_labels(), s.server_labels());
    let m = daemon.settled_metrics(&s.peers(), |m| both_closed(m, s))?;
    let n = N as u64;
    check(
        "server premature unread_data",
        m.sum("observer_tcp_premature_closes_total", &with(&server, ("kind", "unread_data"))),
        n,
    )?;
    check("server premature (all kinds)", m.sum("observer_tcp_premature_closes_total", &[("comm", srv)]), n)?;
    check(
        "server resets sent with reason",
        m.sum("observer_tcp_resets_sent_total", &with(&server, ("reason", active_reason("tcp_abort_on_close")))),
        n,
    )?;
    check(
        "client premature peer_reset",
        m.sum("observer_tcp_premature_closes_total", &with(&client, ("kind", "peer_reset"))),
        n,
    )?;
    check("client resets received", m.sum("observer_tcp_resets_received_total", &client), n)?;
    check(
        "resets received attributed to the server",
        m.sum("observer_tcp_resets_received_total", &[("comm", srv)]),
        0,
    )?;
    Ok(())
}

pub fn connect_refused() -> Result<(), Failed> {
    refused_checks(&scenario(Mode::Refused, 3, "t3-ref-srv", "t3-ref-cli"))
}

fn refused_checks(s: &Scenario) -> Result<(), Failed> {
    let daemon = shared_daemon()?;
    let opens = run_counting_opens(s)?;
    let cli = s.client_comm;
    let closed_port = (s.port + 1).to_string();
    let (client_ip, server_ip) = (s.client_ip.to_string(), s.server_ip.to_string());
    let client = [("comm", cli), ("role", "client"), ("peer", server_ip.as_str()), ("port", closed_port.as_str())];
    let no_socket = [("comm", ""), ("role", ""), ("peer", client_ip.as_str()), ("port", closed_port.as_str())];
    let m = daemon
        .settled_metrics(&s.peers(), |m| m.sum("observer_tcp_premature_closes_total", &[("comm", cli)]) >= N as u64)?;
    let n = N as u64;
    check(
        "client premature refused",
        m.sum("observer_tcp_premature_closes_total", &with(&client, ("kind", "refused"))),
        n,
    )?;
    check("client premature (all kinds)", m.sum("observer_tcp_premature_closes_total", &[("comm", cli)]), n)?;
    // The tracepoint traces them since 6.10; the kprobe on tcp_v{4,6}_send_reset on every kernel.
    let expected_no_socket = if kernel_version() >= (6, 10) || expected_probes().backend == "kprobe" { n } else { 0 };
    check(
        "no-socket resets sent",
        m.sum("observer_tcp_resets_sent_total", &with(&no_socket, ("reason", active_reason("no_socket")))),
        expected_no_socket,
    )?;
    check("resets sent attributed to the client", m.sum("observer_tcp_resets_sent_total", &[("comm", cli)]), 0)?;
    check("client resets received", m.sum("observer_tcp_resets_received_total", &client), n)?;
    // Every refused connect() was an attempt: opened, as the kernel's ActiveOpens counts it.
    check("the namespace's Tcp: ActiveOpens", opens.active, n)?;
    check("the namespace's Tcp: PassiveOpens", opens.passive, 0)?;
    check(
        "client connections opened (= ActiveOpens)",
        m.sum("observer_tcp_connections_opened_total", &client),
        opens.active,
    )?;
    Ok(())
}

pub fn graceful() -> Result<(), Failed> {
    graceful_checks(&scenario(Mode::Graceful, 4, "t4-ok-srv", "t4-ok-cli"))
}

fn graceful_checks(s: &Scenario) -> Result<(), Failed> {
    let daemon = shared_daemon()?;
    let opens = run_counting_opens(s)?;
    let (srv, cli, client, server) = (s.server_comm, s.client_comm, s.client_labels(), s.server_labels());
    let m = daemon.settled_metrics(&s.peers(), |m| both_closed(m, s))?;
    let n = N as u64;
    check_opened(&m, s, opens, (n, n))?;
    check(
        "closes, both ends",
        m.sum("observer_tcp_closes_total", &client) + m.sum("observer_tcp_closes_total", &server),
        2 * n,
    )?;
    check("client closes", m.sum("observer_tcp_closes_total", &client), n)?;
    check("server closes", m.sum("observer_tcp_closes_total", &server), n)?;
    for comm in [srv, cli] {
        check(&format!("{comm} premature"), m.sum("observer_tcp_premature_closes_total", &[("comm", comm)]), 0)?;
        check(&format!("{comm} resets sent"), m.sum("observer_tcp_resets_sent_total", &[("comm", comm)]), 0)?;
        check(&format!("{comm} resets received"), m.sum("observer_tcp_resets_received_total", &[("comm", comm)]), 0)?;
    }
    Ok(())
}

pub fn linger0_close_v6() -> Result<(), Failed> {
    linger0_checks(&scenario_v6(Mode::Linger0, 11, "t11-lng6-srv", "t11-lng6-cli"))
}

pub fn close_with_unread_data_v6() -> Result<(), Failed> {
    unread_checks(&scenario_v6(Mode::Unread, 12, "t12-unr6-srv", "t12-unr6-cli"))
}

pub fn connect_refused_v6() -> Result<(), Failed> {
    refused_checks(&scenario_v6(Mode::Refused, 13, "t13-ref6-srv", "t13-ref6-cli"))
}

pub fn graceful_v6() -> Result<(), Failed> {
    graceful_checks(&scenario_v6(Mode::Graceful, 14, "t14-ok6-srv", "t14-ok6-cli"))
}

/// The kernel's count of the connections a scenario opened in its namespace.
#[derive(Debug, Clone, Copy)]
struct Opens {
    /// `Tcp: ActiveOpens`: connect() attempts (a SYN sent).
    active: u64,
    /// `Tcp: PassiveOpens`: connections a listener accepted the handshake of.
    passive: u64,
}

/// Runs the scenario, reading the namespace's own open counters before it is released.
fn run_counting_opens(s: &Scenario) -> Result<Opens, Failed> {
    let mut ns = s.prepare()?;
    ns.round()?;
    let opens = Opens { active: ns.kernel_tcp("ActiveOpens")?, passive: ns.kernel_tcp("PassiveOpens")? };
    ns.release()?;
    Ok(opens)
}

/// `observer_tcp_connections_opened_total` of both ends equals the kernel's ActiveOpens
/// (client) and PassiveOpens (server, every connection accepted), which are `expected`.
fn check_opened(m: &Metrics, s: &Scenario, opens: Opens, expected: (u64, u64)) -> Result<(), Failed> {
    check("the namespace's Tcp: ActiveOpens", opens.active, expected.0)?;
    check("the namespace's Tcp: PassiveOpens", opens.passive, expected.1)?;
    check(
        "client connections opened (= ActiveOpens)",
        m.sum("observer_tcp_connections_opened_total", &s.client_labels()),
        opens.active,
    )?;
    check(
        "server connections opened (= PassiveOpens)",
        m.sum("observer_tcp_connections_opened_total", &s.server_labels()),
        opens.passive,
    )?;
    Ok(())
}
