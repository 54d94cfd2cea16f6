//! The incident, end to end: nginx (Debian's `nginx-light`) reverse-proxies to `orderbackend`, a
//! Go service that, for unknown users, cuts the connection after a bodiless status line,
//! sometimes closes without answering and sometimes aborts; `ordercli`, a Go client, retries
//! every error three times, each attempt on a new connection (`observer_testkit::incident`, the
//! same code as `cargo xtask incident`, the README's walk-through).
//!
//! Ground truth is nginx's own logs: its access log (a line per request, with
//! `$upstream_status`, `$upstream_addr` and `$upstream_bytes_received`) and its error log (a
//! line per failed upstream attempt: `recv() failed (104: Connection reset by peer) while
//! reading response header from upstream`, `upstream prematurely closed connection while reading
//! response header from upstream`), with the client's own account of its attempts and the
//! namespace's `Tcp: OutRsts`. First the logs are checked against the orders placed (so a
//! scenario that went wrong fails here, not as a puzzling count below); then observer's counts,
//! exactly: for nginx towards the backend's port (resets received, `peer_reset`,
//! `eof_before_response`, closes), for the backend (resets sent with their reason,
//! `local_reset`), for the client (its attempts closed, none premature); its event log (the
//! resets nginx received paired with `orderbackend[PID]` as their cause, the bytes nginx got
//! before each); `observer top`'s first rows; and, through a real Prometheus scraping the
//! daemon, the PromQL queries of the walk-through.
//!
//! Everything runs in a network namespace of the test's own (`ip netns add`), on its loopback,
//! and the daemon observes only it (`--netns`). Every process is stopped and the namespace and
//! the directory removed when the trial ends, also when it fails (each is a guard).
//!
//! Host only: root, and Debian's `nginx-light`, `golang-go` and `prometheus` (which `cargo xtask
//! test` installs); without them the trial fails, saying what to install. Never packed into the
//! QEMU kernel matrix, which runs only the `e2e` binary.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use libtest_mimic::{Arguments, Failed, Trial};
use observer::api::{EventRecord, TopReport};
use observer_testkit::{
    Daemon, Metrics, Problems, active_reset_reason,
    incident::{
        ATTEMPTS_PER_FAILED_ORDER, BACKEND_COMM, CLIENT_COMM, CUT_STATUS_LINE, ClientRound, Failure, Incident,
        NGINX_COMM, NGINX_UPSTREAM_CLOSED, NGINX_UPSTREAM_RESET, NginxLogs, Ports, build_programs,
    },
    net::NamedNetns,
    process,
    prometheus::{Ms, Prometheus},
};

const OBSERVER: &str = env!("CARGO_BIN_EXE_observer");

/// How long anything that must happen may take before it counts as a hang (never a latency
/// assertion).
const PATIENCE: Duration = Duration::from_secs(120);

/// The orders placed: five known users, and unknown users of each failure in distinct numbers
/// (three cut, two silent, one abort), so that no two counts can be swapped unnoticed.
/// The orders are placed this many times, with a Prometheus scrape between the rounds, so that
/// the walk-through's `rate()` queries have two different samples of every series.
const ROUNDS: u64 = 2;

const USERS: &[&str] = &[
    "alice",
    "mallory-cut",
    "bob",
    "peggy-silent",
    "trent-cut",
    "carol",
    "sybil-abort",
    "dave",
    "victor-silent",
    "oscar-cut",
    "erin",
];

mod http;

fn main() {
    let args = Arguments::from_args();
    let trials = vec![
        Trial::test("observer_counts_the_nginx_incident_as_nginx_logged_it", || {
            incident().map_err(|e| Failed::from(format!("{e:#}")))
        }),
        Trial::test("with_http_observer_gives_each_http_shape_its_verdict_as_nginx_and_go_report_it", || {
            http::http_shapes().map_err(|e| Failed::from(format!("{e:#}")))
        }),
    ];
    libtest_mimic::run(&args, trials).exit();
}

/// A directory of the trial's own, removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the orders should make, from the users' names alone.
#[derive(Debug, Default)]
struct Plan {
    known: u64,
    cut: u64,
    silent: u64,
    abort: u64,
}

impl Plan {
    fn of(users: &[&str]) -> Self {
        let mut plan = Self::default();
        for user in users {
            match Failure::of(user) {
                None => plan.known += 1,
                Some(Failure::Cut) => plan.cut += 1,
                Some(Failure::Silent) => plan.silent += 1,
                Some(Failure::Abort) => plan.abort += 1,
                Some(other @ (Failure::Panic | Failure::Truncated | Failure::Chunked)) => {
                    panic!("{user}: this test places no {other:?} order")
                }
            }
        }
        plan
    }

    fn failing(&self) -> u64 {
        self.cut + self.silent + self.abort
    }

    /// The client's attempts in one round.
    fn attempts(&self) -> u64 {
        self.known + ATTEMPTS_PER_FAILED_ORDER * self.failing()
    }

    /// The same orders `rounds` times over.
    fn times(&self, rounds: u64) -> Self {
        Self {
            known: self.known * rounds,
            cut: self.cut * rounds,
            silent: self.silent * rounds,
            abort: self.abort * rounds,
        }
    }
}

fn incident() -> Result<()> {
    ensure!(process::is_root(), "this test loads BPF programs and makes network namespaces: run it as root");
    let prometheus_bin = Path::new("/usr/bin/prometheus");
    ensure!(
        prometheus_bin.is_file(),
        "{} is missing: `apt-get install prometheus` (cargo xtask test installs it)",
        prometheus_bin.display()
    );
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    // Kept between runs: the Go build cache makes the next build take a second.
    let programs = build_programs(&tmp.join("incident-go"))?;
    let dir = TempDir(tmp.join(format!("incident-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);

    let netns = NamedNetns::new("incident", "nginx")?;
    let daemon = Daemon::start_in_netns(Path::new(OBSERVER), &netns.path(), &["--cri-socket", "none"], PATIENCE)?;
    let prom = Prometheus::start(prometheus_bin, daemon.addr)?;
    let rsts_before = netns.out_rsts()?;
    let ports = Ports::default();
    let incident = Incident::start(&programs, &netns, &dir.0, ports)?;
    let mut round = ClientRound::default();
    for i in 0..ROUNDS {
        round = round.plus(&incident.place_orders(USERS)?);
        let client_closes = format!("sum(observer_tcp_closes_total{{comm=\"{CLIENT_COMM}\"}})");
        let counted = round.attempts as f64;
        wait_for(&format!("round {i}: a Prometheus scrape with `{client_closes}` = {counted}"), || {
            Ok(match prom.last_scrape()? {
                Some(at) if prom.value(&client_closes, Some(at))? == Some(counted) => Some(at),
                _ => None,
            })
        })?;
    }
    let plan = Plan::of(USERS).times(ROUNDS);

    // nginx logs a request once it has answered it: wait for every attempt's line.
    let logs = wait_for("nginx's access log to have a line per attempt", || {
        let logs = incident.nginx_logs()?;
        Ok((logs.access.len() as u64 >= round.attempts).then_some(logs))
    })?;
    let mut p = Problems::default();
    check_the_scenario(&mut p, &plan, &round, &logs);
    // A scenario that did not go as planned would make every count below a puzzle.
    std::mem::take(&mut p)
        .finish()
        .context("the incident did not happen as planned (nginx's logs and the client's account)")?;

    // The ground truth, from nginx's logs.
    let resets = logs.errors_saying(NGINX_UPSTREAM_RESET);
    let eofs = logs.errors_saying(NGINX_UPSTREAM_CLOSED);
    let requests = logs.access.len() as u64;
    let upstream = logs.upstream_attempts();
    let backend_port = ports.backend.to_string();
    let nginx_port = ports.nginx.to_string();
    let nginx_up: &[(&str, &str)] = &[("comm", NGINX_COMM), ("role", "client"), ("port", &backend_port)];
    let nginx_down: &[(&str, &str)] = &[("comm", NGINX_COMM), ("role", "server"), ("port", &nginx_port)];
    let backend: &[(&str, &str)] = &[("comm", BACKEND_COMM), ("role", "server"), ("port", &backend_port)];
    let client: &[(&str, &str)] = &[("comm", CLIENT_COMM), ("role", "client"), ("port", &nginx_port)];
    let closes = "observer_tcp_closes_total";

    // Every connection has closed once the daemon counts them all (no later count can come).
    let m = daemon_shows(&daemon, "every connection of the incident closed", |m| {
        m.sum(closes, nginx_up) >= upstream
            && m.sum(closes, backend) >= upstream
            && m.sum(closes, nginx_down) >= requests
            && m.sum(closes, client) >= requests
            && m.sum("observer_tcp_resets_received_total", nginx_up) >= resets
    })?;
    let rsts_sent = netns.out_rsts()? - rsts_before;
    println!(
        "nginx's logs: {requests} requests ({} answered 200, {} 502), {upstream} upstream attempts, {resets} × \
         `{NGINX_UPSTREAM_RESET}`, {eofs} × `{NGINX_UPSTREAM_CLOSED}`; the client: {} orders, {} attempts; the \
         namespace's kernel sent {rsts_sent} RSTs",
        logs.status(200),
        logs.status(502),
        round.orders,
        round.attempts
    );
    check_metrics(&mut p, &m, &logs, &round, rsts_sent, &ports);
    check_events(&mut p, &daemon, &incident, &logs)?;
    check_top(&mut p, &daemon, &ports)?;
    check_promql(&mut p, &prom, &daemon, &m, &ports)?;
    let summary = m.per_connection_summary();
    drop(prom);
    drop(incident);
    daemon.stop()?;
    p.finish().map_err(|e| anyhow::anyhow!("{e:#}\nthe daemon's last scrape:\n{summary}"))
}

/// nginx's logs and the client's account against the orders placed.
fn check_the_scenario(p: &mut Problems, plan: &Plan, round: &ClientRound, logs: &NginxLogs) {
    let failed_attempts = ATTEMPTS_PER_FAILED_ORDER * plan.failing();
    p.eq("the client's orders", round.orders, ROUNDS * USERS.len() as u64);
    p.eq("the client's failed orders", round.failed, plan.failing());
    p.eq("the client's attempts", round.attempts, plan.attempts());
    p.eq("the client's retries", round.retries, (ATTEMPTS_PER_FAILED_ORDER - 1) * plan.failing());
    let by_status: BTreeMap<String, u64> =
        [("200".to_string(), plan.known), ("502".to_string(), failed_attempts)].into_iter().collect();
    p.eq("the client's answers by status", &round.by_status, &by_status);
    p.eq("the client's attempts without an answer (Go's errors)", &round.errors, &BTreeMap::new());
    p.eq("nginx's access log lines", logs.access.len() as u64, round.attempts);
    p.eq("nginx's 200s", logs.status(200), plan.known);
    p.eq("nginx's 502s", logs.status(502), failed_attempts);
    p.eq("nginx's requests passed upstream", logs.upstream_attempts(), round.attempts);
    p.eq(
        &format!("nginx's error lines `{NGINX_UPSTREAM_RESET}`"),
        logs.errors_saying(NGINX_UPSTREAM_RESET),
        ATTEMPTS_PER_FAILED_ORDER * (plan.cut + plan.abort),
    );
    p.eq(
        &format!("nginx's error lines `{NGINX_UPSTREAM_CLOSED}`"),
        logs.errors_saying(NGINX_UPSTREAM_CLOSED),
        ATTEMPTS_PER_FAILED_ORDER * plan.silent,
    );
    p.eq("nginx's error lines in all", logs.errors.len() as u64, failed_attempts);
    let mut bytes = BTreeMap::new();
    for r in logs.access.iter().filter(|r| r.status == 502) {
        *bytes.entry(r.upstream_bytes_received.clone()).or_insert(0u64) += 1;
    }
    let want: BTreeMap<String, u64> = [
        (CUT_STATUS_LINE.len().to_string(), ATTEMPTS_PER_FAILED_ORDER * plan.cut),
        ("0".to_string(), ATTEMPTS_PER_FAILED_ORDER * (plan.silent + plan.abort)),
    ]
    .into_iter()
    .collect();
    p.eq("nginx's $upstream_bytes_received of its 502s (count by bytes)", &bytes, &want);
}

/// observer's counters against nginx's logs, the client's account and the kernel's OutRsts.
fn check_metrics(p: &mut Problems, m: &Metrics, logs: &NginxLogs, round: &ClientRound, rsts_sent: u64, ports: &Ports) {
    let resets = logs.errors_saying(NGINX_UPSTREAM_RESET);
    let eofs = logs.errors_saying(NGINX_UPSTREAM_CLOSED);
    let requests = logs.access.len() as u64;
    let upstream = logs.upstream_attempts();
    let (backend_port, nginx_port) = (ports.backend.to_string(), ports.nginx.to_string());
    let reason = active_reset_reason("tcp_state");
    let with = |base: &[(&'static str, &str)], extra: &[(&'static str, &'static str)]| -> Vec<(String, String)> {
        base.iter().chain(extra).map(|(k, v)| (k.to_string(), v.to_string())).collect()
    };
    let sum = |name: &str, labels: &[(String, String)]| {
        let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        m.sum(name, &labels)
    };
    let nginx_up = [("comm", NGINX_COMM), ("role", "client"), ("peer", "127.0.0.1"), ("port", backend_port.as_str())];
    let nginx_down = [("comm", NGINX_COMM), ("role", "server"), ("port", nginx_port.as_str())];
    let backend = [("comm", BACKEND_COMM), ("role", "server"), ("port", backend_port.as_str())];
    let client = [("comm", CLIENT_COMM), ("role", "client"), ("peer", "127.0.0.1"), ("port", nginx_port.as_str())];
    let (rx, tx, closes, premature) = (
        "observer_tcp_resets_received_total",
        "observer_tcp_resets_sent_total",
        "observer_tcp_closes_total",
        "observer_tcp_premature_closes_total",
    );
    let cases: Vec<(String, u64, u64)> = vec![
        (
            format!("nginx: resets received from the backend's port = `{NGINX_UPSTREAM_RESET}` lines"),
            sum(rx, &with(&nginx_up, &[])),
            resets,
        ),
        (
            "nginx: peer_reset towards the backend = the same lines".into(),
            sum(premature, &with(&nginx_up, &[("kind", "peer_reset")])),
            resets,
        ),
        (
            format!("nginx: eof_before_response towards the backend = `{NGINX_UPSTREAM_CLOSED}` lines"),
            sum(premature, &with(&nginx_up, &[("kind", "eof_before_response")])),
            eofs,
        ),
        (
            "nginx: premature closes towards the backend, every kind = nginx's error lines".into(),
            sum(premature, &with(&nginx_up, &[])),
            logs.errors.len() as u64,
        ),
        (
            "nginx: connections to the backend closed = requests passed upstream".into(),
            sum(closes, &with(&nginx_up, &[])),
            upstream,
        ),
        (
            "nginx: connections from clients closed = access log lines".into(),
            sum(closes, &with(&nginx_down, &[])),
            requests,
        ),
        ("nginx: premature closes of client connections".into(), sum(premature, &with(&nginx_down, &[])), 0),
        ("nginx: resets received from clients".into(), sum(rx, &with(&nginx_down, &[])), 0),
        (
            format!("the backend: resets sent, reason {reason} = `{NGINX_UPSTREAM_RESET}` lines"),
            sum(tx, &with(&backend, &[("reason", reason)])),
            resets,
        ),
        ("the backend: resets sent, every reason".into(), sum(tx, &with(&backend, &[])), resets),
        (
            "the backend: local_reset = the same lines".into(),
            sum(premature, &with(&backend, &[("kind", "local_reset")])),
            resets,
        ),
        ("the backend: premature closes, every kind".into(), sum(premature, &with(&backend, &[])), resets),
        (
            "the backend: connections closed = requests passed upstream".into(),
            sum(closes, &with(&backend, &[])),
            upstream,
        ),
        (
            "the client: connections to nginx closed = its attempts (retries included)".into(),
            sum(closes, &with(&client, &[])),
            round.attempts,
        ),
        ("the client: premature closes (nginx answered every attempt)".into(), sum(premature, &with(&client, &[])), 0),
        ("the client: resets received".into(), sum(rx, &with(&client, &[])), 0),
        ("resets sent in the namespace = its kernel's Tcp: OutRsts".into(), m.sum(tx, &[]), rsts_sent),
        ("the namespace's kernel's RSTs = nginx's reset lines".into(), rsts_sent, resets),
        ("resets received in the namespace".into(), m.sum(rx, &[]), resets),
        ("events lost".into(), m.events_lost(), 0),
    ];
    for (what, got, want) in cases {
        p.eq(&format!("{what} (from /metrics)"), got, want);
    }
    // Once the lead's opened-connections counter is there, a retry is a connection too.
    if m.matching("observer_tcp_connections_opened_total", &[]).next().is_some() {
        let opened = sum("observer_tcp_connections_opened_total", &with(&client, &[]));
        p.eq("the client: connections opened = its attempts (retries included)", opened, round.attempts);
    }
}

/// `observer events --json ARGS` against the daemon: the records.
fn events(daemon: &Daemon, args: &[&str]) -> Result<Vec<EventRecord>> {
    let out = process::stdout(
        Command::new(OBSERVER)
            .args(["events", "--json", "--limit", "4096", "--endpoint", &daemon.endpoint()])
            .args(args),
    )?;
    out.lines()
        .map(|l| {
            serde_json::from_str(l).with_context(|| format!("`observer events {args:?}` printed a non-record: {l}"))
        })
        .collect()
}

/// The event log through `observer events --kind ...`: the walk-through's commands.
fn check_events(p: &mut Problems, daemon: &Daemon, incident: &Incident, logs: &NginxLogs) -> Result<()> {
    let backend_pid = incident.backend_pid();
    let nginx_pid = incident.nginx_pid();
    let resets = logs.errors_saying(NGINX_UPSTREAM_RESET);
    let eofs = logs.errors_saying(NGINX_UPSTREAM_CLOSED);

    let eof = events(daemon, &["--kind", "eof_before_response"])?;
    p.eq(
        &format!("`observer events --kind eof_before_response`: records = `{NGINX_UPSTREAM_CLOSED}` lines"),
        eof.len() as u64,
        eofs,
    );
    for r in &eof {
        let fine = r.comm == NGINX_COMM
            && r.pid == nginx_pid
            && r.role == "client"
            && r.remote == format!("127.0.0.1:{}", incident.ports.backend)
            && r.facts.as_ref().is_some_and(|f| f.bytes_received == 0 && f.close_initiator == "peer");
        if !fine {
            p.push(format!(
                "an eof_before_response record is not nginx[{nginx_pid}]'s, closed by the backend at \
                 127.0.0.1:{} after 0 bytes: {r:?}",
                incident.ports.backend
            ));
        }
    }

    let reset = events(daemon, &["--kind", "peer_reset", "--comm", NGINX_COMM])?;
    p.eq(
        &format!("`observer events --kind peer_reset --comm nginx`: records = `{NGINX_UPSTREAM_RESET}` lines"),
        reset.len() as u64,
        resets,
    );
    let mut got_bytes = BTreeMap::new();
    for r in &reset {
        *got_bytes.entry(r.facts.as_ref().map_or(u64::MAX, |f| f.bytes_received)).or_insert(0u64) += 1;
        let caused = r.cause.as_ref().is_some_and(|c| c.comm == BACKEND_COMM && c.pid == backend_pid);
        if !caused || r.pid != nginx_pid || r.remote != format!("127.0.0.1:{}", incident.ports.backend) {
            p.push(format!(
                "a peer_reset record of nginx[{nginx_pid}] does not name {BACKEND_COMM}[{backend_pid}] at \
                 127.0.0.1:{} as the cause: {r:?}",
                incident.ports.backend
            ));
        }
    }
    // What nginx got before each reset, by its own account ($upstream_bytes_received).
    let mut want_bytes = BTreeMap::new();
    for r in logs.access.iter().filter(|r| r.status == 502 && r.upstream_bytes_received != "0") {
        *want_bytes.entry(r.upstream_bytes_received.parse::<u64>().unwrap_or(u64::MAX)).or_insert(0u64) += 1;
    }
    let zero_byte_resets = resets - want_bytes.values().sum::<u64>();
    if zero_byte_resets > 0 {
        want_bytes.insert(0, zero_byte_resets);
    }
    p.eq(
        "peer_reset records of nginx, count by bytes received (nginx's $upstream_bytes_received)",
        got_bytes,
        want_bytes,
    );

    let sent = events(daemon, &["--kind", "reset_sent", "--comm", BACKEND_COMM])?;
    p.eq("`observer events --kind reset_sent --comm orderbackend`: records", sent.len() as u64, resets);
    let reason = active_reset_reason("tcp_state");
    for r in sent.iter().filter(|r| r.pid != backend_pid || r.reason.as_deref() != Some(reason)) {
        p.push(format!("a reset_sent record is not {BACKEND_COMM}[{backend_pid}]'s with reason {reason}: {r:?}"));
    }
    Ok(())
}

/// `observer top --once --json`: sorted by resets in, nginx towards the backend is first;
/// sorted by resets out, the backend is. The daemon is younger than the 60 s interval, so
/// its window covers all the traffic.
fn check_top(p: &mut Problems, daemon: &Daemon, ports: &Ports) -> Result<()> {
    let backend_port = ports.backend.to_string();
    for (sort, comm, role) in [("resets_in", NGINX_COMM, "client"), ("resets_out", BACKEND_COMM, "server")] {
        let out = process::stdout(Command::new(OBSERVER).args([
            "top",
            "--once",
            "--json",
            "--interval",
            "60s",
            "--sort",
            sort,
            "--endpoint",
            &daemon.endpoint(),
        ]))?;
        let report: TopReport =
            serde_json::from_str(out.trim()).with_context(|| format!("`observer top` printed {out}"))?;
        match report.rows.first() {
            Some(row)
                if row.comm == comm && row.role == role && row.port == backend_port && row.peer == "127.0.0.1" => {}
            other => p.push(format!(
                "`observer top --sort {sort}`: the first row is not {comm} ({role}) with peer 127.0.0.1 port \
                 {backend_port}: {other:?}"
            )),
        }
    }
    Ok(())
}

/// The walk-through's PromQL, through a real Prometheus: at a scrape taken after the daemon
/// showed the final counts, the sums by label are those counts, and the rate queries of the
/// walk-through name the same series (the backend as the one resetting, nginx towards the
/// backend's port as the one cut).
fn check_promql(
    p: &mut Problems,
    prom: &Prometheus,
    daemon: &Daemon,
    final_counts: &Metrics,
    ports: &Ports,
) -> Result<()> {
    let counted = now_ms();
    // The final counts must be what the daemon still shows (nothing came after).
    let now = daemon.metrics()?;
    for name in ["observer_tcp_resets_sent_total", "observer_tcp_premature_closes_total", "observer_tcp_closes_total"] {
        p.eq(&format!("{name} a scrape later"), now.sum(name, &[]), final_counts.sum(name, &[]));
    }
    let at = wait_for("a Prometheus scrape after the final counts", || {
        Ok(prom.last_scrape()?.filter(|at| *at > counted + 1000))
    })?;
    let backend_port = ports.backend.to_string();
    let key = |labels: &BTreeMap<String, String>, names: &[&str]| -> String {
        names.iter().map(|n| format!("{n}={}", labels.get(*n).map_or("", String::as_str))).collect::<Vec<_>>().join(",")
    };
    // The README walk-through's four queries, verbatim: each against the same sum of the final
    // counts, and (the reset and premature-close ones) naming the culprit on the backend's port.
    struct Walkthrough {
        totals: &'static str,
        query: &'static str,
        labels: &'static [&'static str],
        family: &'static str,
        client_only: bool,
        culprit: Option<&'static str>,
    }
    let queries = [
        Walkthrough {
            totals: "sum by (comm, peer, port, kind) (observer_tcp_premature_closes_total{role=\"client\"})",
            query: "topk(5, sum by (comm, peer, port, kind) (rate(observer_tcp_premature_closes_total{role=\"client\"}[1m])))",
            labels: &["comm", "peer", "port", "kind"],
            family: "observer_tcp_premature_closes_total",
            client_only: true,
            culprit: Some(NGINX_COMM),
        },
        Walkthrough {
            totals: "sum by (comm, port, reason) (observer_tcp_resets_sent_total)",
            query: "sum by (comm, port, reason) (rate(observer_tcp_resets_sent_total[1m]))",
            labels: &["comm", "port", "reason"],
            family: "observer_tcp_resets_sent_total",
            client_only: false,
            culprit: Some(BACKEND_COMM),
        },
        Walkthrough {
            totals: "sum by (comm, peer, port) (observer_tcp_closes_total{role=\"client\"})",
            query: "sum by (comm, peer, port) (rate(observer_tcp_closes_total{role=\"client\"}[1m]))",
            labels: &["comm", "peer", "port"],
            family: "observer_tcp_closes_total",
            client_only: true,
            culprit: None,
        },
        Walkthrough {
            totals: "sum by (comm, peer, port) (observer_tcp_connections_opened_total{role=\"client\"})",
            query: "sum by (comm, peer, port) (rate(observer_tcp_connections_opened_total{role=\"client\"}[1m]))",
            labels: &["comm", "peer", "port"],
            family: "observer_tcp_connections_opened_total",
            client_only: true,
            culprit: None,
        },
    ];
    for q in queries {
        let got: BTreeMap<String, f64> =
            prom.query(q.totals, Some(at))?.into_iter().map(|(l, v)| (key(&l, q.labels), v)).collect();
        let mut want: BTreeMap<String, f64> = BTreeMap::new();
        for (l, v) in final_counts.matching(q.family, &[]) {
            if q.client_only && l.get("role").map(String::as_str) != Some("client") {
                continue;
            }
            *want.entry(key(l, q.labels)).or_default() += v;
        }
        p.eq(&format!("`{}` at {}", q.totals, observer_testkit::prometheus::shown(at)), &got, &want);
        let rates = prom.query(q.query, Some(at))?;
        let mut rated: Vec<String> = rates.iter().filter(|(_, v)| *v > 0.0).map(|(l, _)| key(l, q.labels)).collect();
        rated.sort();
        let want_keys: Vec<String> = want.keys().cloned().collect();
        p.eq(&format!("the series with a rate in `{}`", q.query), rated, want_keys);
        if let Some(comm) = q.culprit {
            let culprit = rates
                .iter()
                .all(|(l, _)| l.get("port") == Some(&backend_port) && l.get("comm").map(String::as_str) == Some(comm));
            if !culprit {
                p.push(format!("`{}` names someone else than {comm} on port {backend_port}: {rates:?}", q.query));
            }
        }
    }
    Ok(())
}

fn now_ms() -> Ms {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as Ms)
}

/// Scrapes the daemon until `done` holds on its metrics.
fn daemon_shows(daemon: &Daemon, what: &str, done: impl Fn(&Metrics) -> bool) -> Result<Metrics> {
    wait_for(what, || {
        let m = daemon.metrics()?;
        Ok(done(&m).then_some(m))
    })
    .map_err(|e| anyhow::anyhow!("{e:#}; the daemon's log:\n{}", daemon.log().join("\n")))
}

/// Polls `f` until it gives `Some`, for up to [`PATIENCE`].
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {PATIENCE:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
