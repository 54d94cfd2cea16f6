//! The incident's HTTP shapes with `--http`, against what nginx and Go report.
//!
//! 1. The backend's `net/http` failures behind nginx: `panic` (404 set, then
//!    `panic(http.ErrAbortHandler)`: no byte sent), `truncated` (`Content-Length: 100`, 8 bytes,
//!    then the panic) and `chunked` (one chunk, then the panic). nginx's error-log lines "while
//!    reading response header from upstream" equal observer's `eof_before_response` for nginx
//!    towards the backend's port, "while reading upstream" its `truncated_response`; the backend
//!    gets the same `truncated_response` count (the sender's side); the client's `unexpected EOF`s
//!    equal its `truncated_response` towards nginx, and nginx's serving side the same (it passed
//!    the truncation on); each of nginx's upstream records names `orderbackend[PID]` as the
//!    process that closed first.
//! 2. The keep-alive race (`KeepAlive::RACE`: nginx keeps upstream connections, the backend
//!    closes them after 10 ms idle, POSTs arrive about that far apart): every 502 nginx answered
//!    from a reused upstream connection (its debug log) is one of nginx's upstream records with
//!    stage `idle_keepalive` and no idle time (the request it lost), naming `orderbackend` as the
//!    process that closed the connection first.

use std::{collections::BTreeMap, path::Path};

use anyhow::{Result, ensure};
use observer::api::EventRecord;
use observer_testkit::{
    Daemon, Problems,
    incident::{
        ATTEMPTS_PER_FAILED_ORDER, BACKEND_COMM, CLIENT_COMM, ClientRound, Failure, GO_UNEXPECTED_EOF, Incident,
        KeepAlive, NGINX_COMM, NGINX_UPSTREAM_CLOSED, NGINX_UPSTREAM_CLOSED_IN_BODY, NginxLogs, Options, Ports,
        TRUNCATED_BODY, TRUNCATED_CONTENT_LENGTH, build_programs, known_users,
    },
    net::NamedNetns,
    process,
};

use crate::{OBSERVER, PATIENCE, TempDir, daemon_shows, events, wait_for};

/// Distinct numbers of each failure, so that no two counts can be swapped unnoticed.
const USERS: &[&str] = &["alice", "p1-panic", "t1-truncated", "bob", "t2-truncated", "c1-chunked", "t3-truncated"];

pub fn http_shapes() -> Result<()> {
    ensure!(process::is_root(), "this test loads BPF programs and makes network namespaces: run it as root");
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let programs = build_programs(&tmp.join("incident-go"))?;
    let mut p = Problems::default();
    failures(&mut p, &programs, tmp)?;
    keepalive_race(&mut p, &programs, tmp)?;
    p.finish()
}

/// A part's own directory and network namespace, and a `--http` daemon watching it (drop them
/// in reverse: daemon, namespace, directory).
fn set_up(tmp: &Path, tag: &str) -> Result<(TempDir, NamedNetns, Daemon)> {
    let dir = TempDir(tmp.join(format!("incident-{tag}-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    let netns = NamedNetns::new("incident", tag)?;
    let daemon =
        Daemon::start_in_netns(Path::new(OBSERVER), &netns.path(), &["--cri-socket", "none", "--http"], PATIENCE)?;
    Ok((dir, netns, daemon))
}

/// nginx's logs once they have a line per attempt of `round` (it logs a request once answered).
fn logs_of(incident: &Incident, round: &ClientRound) -> Result<NginxLogs> {
    wait_for("nginx's access log to have a line per attempt", || {
        let logs = incident.nginx_logs()?;
        Ok((logs.access.len() as u64 >= round.attempts).then_some(logs))
    })
}

fn failures(p: &mut Problems, programs: &observer_testkit::incident::Programs, tmp: &Path) -> Result<()> {
    let (dir, netns, daemon) = set_up(tmp, "http")?;
    let ports = Ports::default();
    let incident = Incident::start(programs, &netns, &dir.0, ports)?;
    let round = incident.place_orders(USERS)?;
    let logs = logs_of(&incident, &round)?;

    // The scenario, from nginx's logs and Go's errors, against the users' names.
    let of = |f: Failure| USERS.iter().filter(|u| Failure::of(u) == Some(f)).count() as u64 * ATTEMPTS_PER_FAILED_ORDER;
    let (panics, in_body) = (of(Failure::Panic), of(Failure::Truncated) + of(Failure::Chunked));
    let header_lines = logs.errors_saying(NGINX_UPSTREAM_CLOSED);
    let body_lines = logs.errors_saying(NGINX_UPSTREAM_CLOSED_IN_BODY);
    p.eq(&format!("nginx's `{NGINX_UPSTREAM_CLOSED}` lines"), header_lines, panics);
    p.eq(&format!("nginx's `{NGINX_UPSTREAM_CLOSED_IN_BODY}` lines"), body_lines, in_body);
    p.eq(&format!("the client's `{GO_UNEXPECTED_EOF}`s"), round.unexpected_eof, in_body);
    p.eq("the client's other errors", round.other_errors, 0);

    let (backend_port, nginx_port) = (ports.backend.to_string(), ports.nginx.to_string());
    let nginx_up: &[(&str, &str)] = &[("comm", NGINX_COMM), ("role", "client"), ("port", &backend_port)];
    let nginx_down: &[(&str, &str)] = &[("comm", NGINX_COMM), ("role", "server"), ("port", &nginx_port)];
    let backend: &[(&str, &str)] = &[("comm", BACKEND_COMM), ("role", "server"), ("port", &backend_port)];
    let client: &[(&str, &str)] = &[("comm", CLIENT_COMM), ("role", "client"), ("port", &nginx_port)];
    let closes = "observer_tcp_closes_total";
    let upstream = logs.upstream_attempts();
    let m = daemon_shows(&daemon, "every connection of the incident closed", |m| {
        m.sum(closes, nginx_up) >= upstream
            && m.sum(closes, backend) >= upstream
            && m.sum(closes, nginx_down) >= round.attempts
            && m.sum(closes, client) >= round.attempts
    })?;
    let kind = |labels: &[(&str, &str)], kind: &str| {
        let mut l = labels.to_vec();
        l.push(("kind", kind));
        m.sum("observer_tcp_premature_closes_total", &l)
    };
    p.eq(
        "nginx → backend: eof_before_response = nginx's header lines",
        kind(nginx_up, "eof_before_response"),
        header_lines,
    );
    p.eq("nginx → backend: truncated_response = nginx's body lines", kind(nginx_up, "truncated_response"), body_lines);
    p.eq("the backend: truncated_response (the sender's side)", kind(backend, "truncated_response"), body_lines);
    p.eq(
        "the client: truncated_response = its unexpected EOFs",
        kind(client, "truncated_response"),
        round.unexpected_eof,
    );
    p.eq(
        "nginx → client: truncated_response (passed on)",
        kind(nginx_down, "truncated_response"),
        round.unexpected_eof,
    );

    // nginx's upstream records name the backend as the process that closed first.
    let backend_pid = incident.backend_pid();
    let records = events(&daemon, &["--comm", NGINX_COMM, "--port", &backend_port])?;
    let named = |r: &EventRecord| {
        r.cause.as_ref().is_some_and(|c| c.comm == BACKEND_COMM && c.pid == backend_pid && c.reason == "fin")
    };
    let mut stages: BTreeMap<String, u64> = BTreeMap::new();
    for r in &records {
        let stage = r.http.as_ref().map_or("-".to_string(), |h| h.stage.clone());
        *stages.entry(format!("{}/{stage}", r.kind.as_deref().unwrap_or("-"))).or_default() += 1;
        if !named(r) {
            p.push(format!("nginx's upstream record does not name {BACKEND_COMM}[{backend_pid}] as the closer: {r:?}"));
        }
    }
    let want: BTreeMap<String, u64> = [
        ("eof_before_response/awaiting_response".to_string(), header_lines),
        ("truncated_response/in_response_body".to_string(), body_lines),
    ]
    .into_iter()
    .filter(|(_, n)| *n > 0)
    .collect();
    p.eq("nginx's upstream records by kind/stage", stages, want);
    // The sized ones: 8 of the 100 declared bytes, on both ends of the backend's connections.
    for comm in [NGINX_COMM, BACKEND_COMM] {
        let sized = events(&daemon, &["--comm", comm, "--port", &backend_port, "--kind", "truncated_response"])?
            .into_iter()
            .filter(|r| r.http.as_ref().is_some_and(|h| h.declared_body_bytes == Some(TRUNCATED_CONTENT_LENGTH)))
            .collect::<Vec<_>>();
        p.eq(&format!("{comm}: truncated sized bodies"), sized.len() as u64, of(Failure::Truncated));
        for r in sized {
            let h = r.http.as_ref().expect("filtered on it");
            if h.transferred_body_bytes != Some(TRUNCATED_BODY.len() as u64) || h.path.as_deref() != Some("/order") {
                p.push(format!(
                    "{comm}: a truncated body should be {} of {TRUNCATED_CONTENT_LENGTH} bytes of a /order: {r:?}",
                    TRUNCATED_BODY.len()
                ));
            }
        }
    }
    drop(incident);
    daemon.stop()?;
    Ok(())
}

fn keepalive_race(p: &mut Problems, programs: &observer_testkit::incident::Programs, tmp: &Path) -> Result<()> {
    let (dir, netns, daemon) = set_up(tmp, "race")?;
    let ports = Ports::default();
    let incident =
        Incident::start_with(programs, &netns, &dir.0, ports, Options { keep_alive: Some(KeepAlive::RACE) })?;
    let backend_pid = incident.backend_pid();
    let round = incident.place_orders(&known_users(KeepAlive::RACE_ORDERS))?;
    let logs = logs_of(&incident, &round)?;
    let race_502s = logs.reused_upstream_502s()?;
    p.eq("race: nginx's 502s all on reused upstream connections", race_502s, logs.status(502));
    if race_502s == 0 {
        // Then the comparison below would hold whatever observer said.
        p.push(format!("race: the race did not happen ({} orders, no 502)", round.orders));
    }
    drop(incident);
    let backend_port = ports.backend.to_string();
    let nginx_up: &[(&str, &str)] = &[("comm", NGINX_COMM), ("role", "client"), ("port", &backend_port)];
    // Every upstream connection has closed once the backend's and nginx's are all counted.
    let upstream_opened = |m: &observer_testkit::Metrics| m.sum("observer_tcp_connections_opened_total", nginx_up);
    daemon_shows(&daemon, "every upstream connection of the race closed", |m| {
        upstream_opened(m) > 0 && m.sum("observer_tcp_closes_total", nginx_up) >= upstream_opened(m)
    })?;
    let races: Vec<EventRecord> = events(&daemon, &["--comm", NGINX_COMM, "--port", &backend_port])?
        .into_iter()
        .filter(|r| r.http.as_ref().is_some_and(|h| h.stage == "idle_keepalive" && h.idle_seconds.is_none()))
        .collect();
    println!(
        "race: {} orders, nginx answered {} 502s, {race_502s} from a reused upstream connection; observer: {} of \
         nginx's upstream records at idle_keepalive with a lost request",
        round.orders,
        logs.status(502),
        races.len()
    );
    p.eq("race: nginx's reused-connection 502s = observer's idle_keepalive records", races.len() as u64, race_502s);
    for r in &races {
        let h = r.http.as_ref().expect("filtered on it");
        if h.method.as_deref() != Some("POST") || h.requests < 2 {
            p.push(format!("race: the lost request should be a POST on a reused connection: {r:?}"));
        }
        // The backend closed the idle connection (a FIN, or an RST when the request had just
        // arrived unread), whatever its kernel answered after.
        if r.cause.as_ref().is_none_or(|c| c.comm != BACKEND_COMM || c.pid != backend_pid) {
            p.push(format!("race: the record should name {BACKEND_COMM}[{backend_pid}] as the closer: {r:?}"));
        }
    }
    daemon.stop()?;
    Ok(())
}
