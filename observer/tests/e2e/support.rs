//! What the tests share: the daemon they start, how they wait for its counts, the checks they
//! make and the scenarios they run.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    time::{Duration, Instant},
};

use libtest_mimic::Failed;
use observer_testkit::{Daemon, Metrics, daemon::Options};

use crate::traffic::{Mode, Scenario};

pub const OBSERVER: &str = env!("CARGO_BIN_EXE_observer");

/// How long to wait for something that must happen before calling it a hang: generous, since
/// the suite also runs under software emulation (`cargo xtask test --kernel`). A guard, never a
/// latency assertion: latency is measured by `cargo xtask bench`.
pub const PATIENCE: Duration = Duration::from_secs(120);

/// Every record of `daemon`'s event log (`/api/v1/events`, from the first, up to 4096).
pub fn event_records(daemon: &Daemon) -> Result<Vec<serde_json::Value>, Failed> {
    let (code, body) = daemon.get("/api/v1/events?since=0&limit=4096")?;
    check("/api/v1/events status", code as u64, 200)?;
    let page: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("events JSON: {e}: {body}"))?;
    Ok(page["events"].as_array().cloned().unwrap_or_default())
}

/// Starts `observer run --listen 127.0.0.1:0 EXTRA...` and waits for it to be ready.
pub fn start_daemon(extra: &[&str]) -> anyhow::Result<Daemon> {
    Daemon::start(
        Path::new(OBSERVER),
        extra,
        &Options { ready_within: PATIENCE, http_timeout: PATIENCE, ..Options::default() },
    )
}

pub trait Settle {
    /// Waits until `done` holds on the metrics and the series of `peers` (all series when
    /// empty) then stay the same for a moment (no late events), and returns them. Event
    /// delivery is asynchronous; the assertions that follow are on exact values, never on time.
    fn settled_metrics(&self, peers: &[&str], done: impl Fn(&Metrics) -> bool) -> anyhow::Result<Metrics>;
}

impl Settle for Daemon {
    fn settled_metrics(&self, peers: &[&str], done: impl Fn(&Metrics) -> bool) -> anyhow::Result<Metrics> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = self.metrics()?;
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let now = self.metrics()?;
            let stable = if peers.is_empty() { now == last } else { now.of_peers(peers) == last.of_peers(peers) };
            if done(&now) && stable {
                return Ok(now);
            }
            if Instant::now() > deadline {
                // Hand back what we have: the caller's exact assertions will say what is off.
                return Ok(now);
            }
            last = now;
        }
    }
}

pub fn check(what: &str, got: u64, want: u64) -> Result<(), Failed> {
    if got == want { Ok(()) } else { Err(format!("{what}: got {got}, want {want}").into()) }
}

pub fn with<'a>(base: &[(&'a str, &'a str)], extra: (&'a str, &'a str)) -> Vec<(&'a str, &'a str)> {
    let mut v = base.to_vec();
    v.push(extra);
    v
}

/// The reason label the running kernel gives an active reset: 6.12 named them; 6.10-6.11 and
/// older kernels report none.
pub fn active_reason(name: &'static str) -> &'static str {
    observer_testkit::active_reset_reason(name)
}

/// Connections per scenario.
pub const N: u32 = 5;

pub fn scenario(mode: Mode, tag: u8, server_comm: &'static str, client_comm: &'static str) -> Scenario {
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
pub fn scenario_v6(mode: Mode, tag: u8, server_comm: &'static str, client_comm: &'static str) -> Scenario {
    let lo = IpAddr::from(Ipv6Addr::LOCALHOST);
    Scenario { server_ip: lo, client_ip: lo, ..scenario(mode, tag, server_comm, client_comm) }
}

/// Every connection of the scenario has been closed on both ends.
pub fn both_closed(m: &Metrics, s: &Scenario) -> bool {
    let n = s.connections as u64;
    m.sum("observer_tcp_closes_total", &[("comm", s.client_comm)]) >= n
        && m.sum("observer_tcp_closes_total", &[("comm", s.server_comm)]) >= n
}

pub const TRACEPOINT_PROBES: [(&str, &str); 6] = [
    ("inet_sock_set_state", "tracepoint/sock/inet_sock_set_state"),
    ("tcp_receive_reset", "tracepoint/tcp/tcp_receive_reset"),
    ("tcp_send_reset", "tracepoint/tcp/tcp_send_reset"),
    ("tcp_destroy_sock", "tracepoint/tcp/tcp_destroy_sock"),
    ("sys_exit_accept4", "tracepoint/syscalls/sys_exit_accept4"),
    ("sys_exit_accept", "tracepoint/syscalls/sys_exit_accept"),
];

pub const KPROBE_PROBES: [(&str, &str); 7] = [
    ("tcp_set_state", "kprobe/tcp_set_state"),
    ("tcp_reset", "kprobe/tcp_reset"),
    ("tcp_send_active_reset", "kprobe/tcp_send_active_reset"),
    ("tcp_v4_send_reset", "kprobe/tcp_v4_send_reset"),
    ("tcp_v6_send_reset", "kprobe/tcp_v6_send_reset"),
    ("tcp_v4_destroy_sock", "kprobe/tcp_v4_destroy_sock"),
    ("inet_csk_accept", "kretprobe/inet_csk_accept"),
];

/// The BTF tracepoint back end: every hook but accept, which keeps the syscall tracepoints.
pub const BTF_PROBES: [(&str, &str, &str); 6] = [
    ("btf_inet_sock_set_state", "tp_btf/inet_sock_set_state", "btf"),
    ("btf_tcp_receive_reset", "tp_btf/tcp_receive_reset", "btf"),
    ("btf_tcp_send_reset", "tp_btf/tcp_send_reset", "btf"),
    ("btf_tcp_destroy_sock", "tp_btf/tcp_destroy_sock", "btf"),
    ("sys_exit_accept4", "tracepoint/syscalls/sys_exit_accept4", "tracepoint"),
    ("sys_exit_accept", "tracepoint/syscalls/sys_exit_accept", "tracepoint"),
];

/// The back end the daemons of this suite run on, and its probes as (probe, attach, the
/// back end of its hook).
pub struct ExpectedProbes {
    /// `btf`, `tracepoint` or `kprobe`: the back end of the hooks that have one of each.
    pub backend: &'static str,
    pub probes: Vec<(&'static str, &'static str, &'static str)>,
}

/// The daemons this suite starts inherit `OBSERVER_PROBES` (`observer run --probes`): with
/// `kprobe` (on a kernel that has kprobes) the whole suite runs on the kprobe back end, with
/// `tracepoint` on the tracepoints. Otherwise (`auto` or `btf`) on the BTF tracepoints, which
/// every kernel this suite runs on has (5.5+ with BTF), accept on the syscall tracepoints.
pub fn expected_probes() -> ExpectedProbes {
    let of = |probes: &[(&'static str, &'static str)], backend| probes.iter().map(|&(p, a)| (p, a, backend)).collect();
    match std::env::var("OBSERVER_PROBES").as_deref() {
        Ok("kprobe") => ExpectedProbes { backend: "kprobe", probes: of(&KPROBE_PROBES, "kprobe") },
        Ok("tracepoint") => ExpectedProbes { backend: "tracepoint", probes: of(&TRACEPOINT_PROBES, "tracepoint") },
        _ => ExpectedProbes { backend: "btf", probes: BTF_PROBES.to_vec() },
    }
}
