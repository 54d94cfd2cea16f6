//! `promtool check metrics` on a real daemon's `/metrics`, after real traffic that gives every
//! family series: promtool's linter (counter suffixes, help text, units, reserved suffixes, name
//! style) must find nothing.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, ensure};

use observer_testkit::Problems;

use crate::{NamedNetns, daemon_shows, require_root, run_worker, server, start_observer, tool};

/// Complaints of promtool that only renaming a metric or a label would fix: names are a
/// contract (README "Metrics"), so such a complaint is listed here, each with why, instead of
/// renamed. None today: promtool 2.42 finds nothing.
const TOLERATED: &[&str] = &[];

/// Every family the daemon exports, as its `# TYPE` lines name them; the trial waits until the
/// traffic has given each one series.
const FAMILIES: &[&str] = &[
    "observer_tcp_resets_received_total",
    "observer_tcp_resets_sent_total",
    "observer_tcp_connections_opened_total",
    "observer_tcp_closes_total",
    "observer_tcp_premature_closes_total",
    "observer_tcp_retransmits_total",
    "observer_tcp_connection_duration_seconds",
    "observer_tcp_connections",
    "observer_tcp_close_wait_oldest_seconds",
    "observer_events_total",
    "observer_events_lost_total",
    "observer_events_unattributed_total",
    "observer_events_malformed_total",
    "observer_sockets_untracked_total",
    "observer_series",
    "observer_series_expired_total",
    "observer_series_folded_total",
    "observer_probe_info",
    "observer_probe_runs_total",
    "observer_probe_run_seconds_total",
    "observer_build_info",
    "observer_container_runtime_info",
    "observer_container_runtime_errors_total",
];

/// The premature-close kinds the traffic makes.
const KINDS: &[&str] = &["peer_reset", "local_reset", "refused", "eof_before_response", "connect_timeout"];

const LEAKED: u32 = 2;

pub fn promtool_finds_nothing() -> Result<()> {
    require_root()?;
    let promtool = tool("promtool")?;
    // promtool does lint what it is given: a counter without `_total` and without help text.
    let (_, bad) = check_metrics(&promtool, "# TYPE observer_bad_counter counter\nobserver_bad_counter 1\n")?;
    ensure!(
        bad.iter().any(|l| l.contains("_total")),
        "promtool check metrics did not flag a counter without _total: {bad:?}"
    );

    let netns = NamedNetns::new("prom", "lint")?;
    // --probe-stats: observer_probe_runs_total and observer_probe_run_seconds_total.
    let daemon = start_observer(&netns, &["--probe-stats", "--cri-socket", "none"])?;
    let linger = server("server-linger0", &netns, 8081, 3, "pl-linger")?;
    run_worker("client", &netns, 8081, 3, "pl-client")?;
    linger.finish()?;
    let noresp = server("noresponse", &netns, 8082, 3, "pl-noresp")?;
    run_worker("client", &netns, 8082, 3, "pl-client")?;
    noresp.finish()?;
    run_worker("refused", &netns, 9999, 3, "pl-refused")?;
    // Held until the scrape: the CLOSE-WAIT sockets.
    let mut leaky = server("server-leak", &netns, 8083, LEAKED, "pl-leaky")?;
    run_worker("client-close", &netns, 8083, LEAKED, "pl-closer")?;
    leaky.expect("done")?;
    run_worker("connect-timeout", &netns, 8080, 1, "pl-timeout")?;

    let m = daemon_shows(&daemon, "every family with series, every kind, the CLOSE-WAIT sockets", |m| {
        let names: Vec<&str> = m.samples.iter().map(|(n, _, _)| n.as_str()).collect();
        FAMILIES.iter().all(|f| names.iter().any(|n| n == f || n.strip_prefix(f).is_some_and(|s| s == "_count")))
            && KINDS.iter().all(|k| m.sum("observer_tcp_premature_closes_total", &[("kind", k)]) > 0)
            && m.sum("observer_tcp_connections", &[("comm", "pl-leaky"), ("state", "close_wait")]) == u64::from(LEAKED)
            && m.sum("observer_tcp_retransmits_total", &[("comm", "pl-timeout")]) > 0
    })?;
    let (status, body) = daemon.get("/metrics")?;
    ensure!(status == 200, "/metrics answered {status}");
    drop(leaky);

    let (code, lines) = check_metrics(&promtool, &body)?;
    let mut problems = Problems::default();
    let complaints: Vec<&String> = lines.iter().filter(|l| !TOLERATED.iter().any(|t| l.contains(t))).collect();
    for line in &complaints {
        problems.push(format!("promtool check metrics: {line}"));
    }
    // Exit status 3 means "lint problems": only tolerated ones may have caused it.
    if code != 0 && !(code == 3 && complaints.is_empty() && !lines.is_empty()) {
        problems.push(format!("promtool check metrics exited with {code}"));
    }
    let families = body.lines().filter(|l| l.starts_with("# TYPE ")).count();
    let samples = body.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).count();
    println!(
        "promtool check metrics: {families} families, {samples} samples, {} series in all; {} line(s) printed",
        m.samples.len(),
        lines.len()
    );
    if !complaints.is_empty() {
        problems.push(format!("the exposition promtool was given:\n{body}"));
    }
    drop(daemon);
    problems.finish()
}

/// `promtool check metrics` with `text` on its standard input: its exit code and every
/// non-empty line it printed (on either stream).
fn check_metrics(promtool: &std::path::Path, text: &str) -> Result<(i32, Vec<String>)> {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting promtool check metrics")?;
    let mut stdin = child.stdin.take().context("promtool's stdin is not piped")?;
    stdin.write_all(text.as_bytes()).context("writing to promtool check metrics")?;
    drop(stdin);
    let out = child.wait_with_output().context("waiting for promtool check metrics")?;
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&out.stderr).lines())
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    Ok((observer_testkit::process::exit_code(out.status), lines))
}
