//! A real Prometheus scrapes a real daemon every second while traffic runs in rounds; PromQL
//! answers through its HTTP API are checked against the traffic made, exactly.
//!
//! Why each check is exact, not approximately right:
//!
//! - Every series exists before the measured window: round 0 makes one connection of each kind
//!   (series appear with their first count, and `increase()` cannot see the first count of a
//!   series that starts inside its window). The rounds after it reuse the same processes' names,
//!   addresses and ports, so they add to the same series.
//! - After each round the trial waits until the daemon shows the round's counts, then until
//!   Prometheus has stored a scrape that *started* after that (its timestamp, `timestamp(up)`, is
//!   later) and whose `sum(observer_tcp_resets_received_total)` is the round's total. That
//!   scrape's timestamp is the round's mark `T_r`; the next round starts only once it is known,
//!   so the scrape at `T_r` holds exactly the counts of rounds 0..=r.
//! - Every sample of one scrape carries the scrape's timestamp, so each series has a sample at
//!   every `T_r`. `increase(x[W])` evaluated at `T_r` with `W = T_r - T_(r-1)` (to the
//!   millisecond) has samples at both ends of its range (Prometheus 2.x ranges include both
//!   ends): it extrapolates by nothing (`durationToStart = durationToEnd = 0`), so it is exactly
//!   the last minus the first sample, the counts made in round r. `rate()` over the same range
//!   is that divided by `W`, so `rate * W` is the count.
//! - Totals are instant values at the last mark (the newest sample, the final count), and
//!   `max_over_time()` over the whole test (a counter that never resets peaks at its last
//!   value); `resets()` over the whole test counts decreases, which must be none.
//! - `rate(x[5s])` is evaluated at a scrape at least 6 s after the last mark: every sample in
//!   its range is the final count, so it is 0, exactly.
//! - The RSTs are the namespace kernel's own count (`Tcp: OutRsts`), one per SO_LINGER 0 close
//!   and per refused connect: its loopback acknowledges at once
//!   ([`NamedNetns::acknowledge_at_once`]), so no delayed ACK overtaken by a FIN makes one
//!   more (and `TcpExt: DelayedACKs` must stay 0 to show it).

use std::{
    collections::BTreeMap,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use observer_testkit::{Daemon, Metrics, net::counter_changes};
use serde_json::Value;

use observer_testkit::{
    Problems,
    prometheus::{Ms, Prometheus, shown},
};

use crate::{NamedNetns, PATIENCE, daemon_shows, require_root, run_worker, server, start_observer, tool};

/// One round of traffic: so many connections of each kind.
#[derive(Debug, Clone, Copy, Default)]
struct Round {
    /// A server closing with SO_LINGER {1, 0}: local_reset (server), peer_reset (client).
    linger: u32,
    /// Connects to a closed port: refused (client), a no_socket RST by no process.
    refused: u32,
    /// A server closing without answering: eof_before_response (client), a normal close.
    noresponse: u32,
}

/// Round 0 comes before the measured window and gives every series its first count.
const ROUNDS: [Round; 4] = [
    Round { linger: 1, refused: 1, noresponse: 1 },
    Round { linger: 3, refused: 2, noresponse: 4 },
    Round { linger: 5, refused: 1, noresponse: 2 },
    Round { linger: 2, refused: 3, noresponse: 3 },
];

const LINGER: (u16, &str) = (8081, "pq-linger");
const NORESPONSE: (u16, &str) = (8082, "pq-noresp");
const REFUSED: (u16, &str) = (9999, "pq-refused");
const CLIENT: &str = "pq-client";

impl Round {
    fn plus(self, o: Round) -> Round {
        Round {
            linger: self.linger + o.linger,
            refused: self.refused + o.refused,
            noresponse: self.noresponse + o.noresponse,
        }
    }

    fn sum(rounds: &[Round]) -> Round {
        rounds.iter().fold(Round::default(), |a, r| a.plus(*r))
    }

    /// RSTs sent: one per SO_LINGER 0 close, one answering each refused SYN.
    fn resets(self) -> f64 {
        f64::from(self.linger + self.refused)
    }

    /// Premature closes by kind.
    fn kinds(self) -> BTreeMap<String, f64> {
        map(&[
            ("peer_reset", self.linger),
            ("local_reset", self.linger),
            ("refused", self.refused),
            ("eof_before_response", self.noresponse),
        ])
    }

    /// Closes by role: the client side of every connection, the server side of those accepted.
    fn closes_by_role(self) -> BTreeMap<String, f64> {
        map(&[("client", self.linger + self.refused + self.noresponse), ("server", self.linger + self.noresponse)])
    }

    /// Observations of the duration histogram with `premature="yes"`, by role.
    fn premature_durations_by_role(self) -> BTreeMap<String, f64> {
        map(&[("client", self.linger + self.refused + self.noresponse), ("server", self.linger)])
    }

    /// Resets received by comm: the linger clients' from the server, the refused ones' from the
    /// kernel.
    fn received_by_comm(self) -> BTreeMap<String, f64> {
        map(&[(CLIENT, self.linger), (REFUSED.1, self.refused)])
    }

    /// Resets sent by comm: the linger server's, and the kernel's answers to the refused SYNs,
    /// which belong to no process (`comm=""`).
    fn sent_by_comm(self) -> BTreeMap<String, f64> {
        map(&[(LINGER.1, self.linger), ("", self.refused)])
    }
}

/// A by-label map without its zero entries (a series that exists but did not change).
fn map(entries: &[(&str, u32)]) -> BTreeMap<String, f64> {
    entries.iter().filter(|(_, v)| *v > 0).map(|(k, v)| (k.to_string(), f64::from(*v))).collect()
}

fn nonzero(m: BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    m.into_iter().filter(|(_, v)| *v != 0.0).collect()
}

fn now_ms() -> Ms {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as Ms)
}

pub fn promql_answers_match_the_traffic() -> Result<()> {
    require_root()?;
    let prometheus_bin = tool("prometheus")?;
    tool("promtool")?;
    let netns = NamedNetns::new("prom", "scrape")?;
    // Else a noresponse client's delayed ACK, overtaken by its FIN, costs one RST more under load.
    netns.acknowledge_at_once()?;
    let counters_before = netns.tcp_counters()?;
    let rsts_before = netns.out_rsts()?;
    let opens_before = (netns.tcp_counter("ActiveOpens")?, netns.tcp_counter("PassiveOpens")?);
    let daemon = start_observer(&netns, &["--cri-socket", "none"])?;
    let prom = Prometheus::start(&prometheus_bin, daemon.addr)?;
    let first = wait_for(&prom, "the first successful scrape of the daemon", || {
        Ok(match prom.last_scrape()? {
            Some(at) if prom.value(r#"up{job="observer"}"#, Some(at))? == Some(1.0) => Some(at),
            _ => None,
        })
    })?;

    // The rounds, each marked by the first stored scrape that holds all of it.
    let mut marks: Vec<Ms> = Vec::new();
    for (i, round) in ROUNDS.iter().enumerate() {
        if i > 0 {
            // Seconds apart, so the rounds' windows differ.
            std::thread::sleep(Duration::from_secs(2));
        }
        make_round(&netns, *round).with_context(|| format!("round {i}"))?;
        let total = Round::sum(&ROUNDS[..=i]);
        marks.push(wait_for_round(&daemon, &prom, i, total)?);
    }
    let rsts_sent = netns.out_rsts()? - rsts_before;
    // Every connect() and every accepted connection, as the namespace's kernel counted them.
    let opened_by_role = map(&[
        ("client", (netns.tcp_counter("ActiveOpens")? - opens_before.0) as u32),
        ("server", (netns.tcp_counter("PassiveOpens")? - opens_before.1) as u32),
    ]);
    let end = *marks.last().context("no rounds")?;
    let total = Round::sum(&ROUNDS);
    let measured = Round::sum(&ROUNDS[1..]);
    println!(
        "scrapes from {} to {}: rounds marked at +{:?} ms; RSTs sent (Tcp: OutRsts) {rsts_sent}",
        shown(first),
        shown(end),
        marks.iter().map(|m| m - first).collect::<Vec<_>>()
    );

    let mut p = Problems::default();
    let whole = format!("{}ms", end - first);
    let delayed_acks = |c: &BTreeMap<String, u64>| c.get("TcpExt:DelayedACKs").copied().unwrap_or(0);
    let counters_after = netns.tcp_counters()?;
    ensure!(
        delayed_acks(&counters_after) == delayed_acks(&counters_before),
        "the namespace's kernel delayed {} ACKs (TcpExt: DelayedACKs), though its loopback routes have quickack: \
         the RST count below is not exact then",
        delayed_acks(&counters_after) - delayed_acks(&counters_before)
    );
    if rsts_sent as f64 != total.resets() {
        // Which kernel paths the traffic took, and what the daemon saw, say where the extra or
        // missing RST came from.
        let changes = counter_changes(&counters_before, &counters_after);
        let (_, events) = daemon.get("/api/v1/events?limit=200")?;
        bail!(
            "the namespace's kernel sent {rsts_sent} RSTs (Tcp: OutRsts), but the traffic should have made {}; \
             its TCP counters changed by {changes}; the daemon's events:\n{events}",
            total.resets()
        );
    }

    // Totals: the last values, and the peaks over the whole test.
    let at = Some(end);
    let sent = format!("sum(observer_tcp_resets_sent_total{{comm=\"{}\"}})", LINGER.1);
    eq(&mut p, "resets sent by the server", &sent, end, prom.value(&sent, at)?, f64::from(total.linger));
    let all_sent = "sum(observer_tcp_resets_sent_total)";
    eq(&mut p, "resets sent in all = Tcp: OutRsts", all_sent, end, prom.value(all_sent, at)?, rsts_sent as f64);
    let q = "sum by (comm) (observer_tcp_resets_sent_total)";
    eq_map(&mut p, "resets sent by comm", q, end, prom.by(q, "comm", at)?, total.sent_by_comm());
    let q = "sum by (comm) (observer_tcp_resets_received_total)";
    eq_map(&mut p, "resets received by comm", q, end, prom.by(q, "comm", at)?, total.received_by_comm());
    let q = "sum by (kind) (observer_tcp_premature_closes_total)";
    eq_map(&mut p, "premature closes by kind", q, end, prom.by(q, "kind", at)?, total.kinds());
    let q = format!("sum by (kind) (max_over_time(observer_tcp_premature_closes_total[{whole}]))");
    eq_map(&mut p, "peak premature closes by kind", &q, end, prom.by(&q, "kind", at)?, total.kinds());
    let q = "sum by (role) (observer_tcp_closes_total)";
    eq_map(&mut p, "closes by role", q, end, prom.by(q, "role", at)?, total.closes_by_role());
    ensure!(
        opened_by_role == total.closes_by_role(),
        "the namespace's kernel opened {opened_by_role:?} (Tcp: ActiveOpens, PassiveOpens), but the traffic should have opened {:?}",
        total.closes_by_role()
    );
    let q = "sum by (role) (observer_tcp_connections_opened_total)";
    eq_map(&mut p, "opened by role = Tcp: ActiveOpens, PassiveOpens", q, end, prom.by(q, "role", at)?, opened_by_role);
    for family in [
        "observer_tcp_resets_received_total",
        "observer_tcp_resets_sent_total",
        "observer_tcp_closes_total",
        "observer_tcp_connections_opened_total",
        "observer_tcp_premature_closes_total",
        "observer_tcp_connection_duration_seconds_count",
        "observer_events_total",
    ] {
        let q = format!("sum(resets({family}[{whole}]))");
        eq(&mut p, "counter resets", &q, end, prom.value(&q, at)?, 0.0);
    }

    // Each round's window, and the window of the three measured rounds.
    let mut windows: Vec<(String, Ms, Ms, Round)> =
        (1..ROUNDS.len()).map(|r| (format!("round {r}"), marks[r - 1], marks[r], ROUNDS[r])).collect();
    windows.push(("rounds 1-3".to_string(), marks[0], end, measured));
    for (what, from, to, round) in &windows {
        let (at, w) = (Some(*to), format!("{}ms", to - from));
        let q = format!("sum by (kind) (increase(observer_tcp_premature_closes_total{{comm=~\"pq-.+\"}}[{w}]))");
        eq_map(
            &mut p,
            &format!("{what}: premature closes by kind"),
            &q,
            *to,
            nonzero(prom.by(&q, "kind", at)?),
            round.kinds(),
        );
        let q = format!("sum by (role) (increase(observer_tcp_closes_total[{w}]))");
        eq_map(
            &mut p,
            &format!("{what}: closes by role"),
            &q,
            *to,
            nonzero(prom.by(&q, "role", at)?),
            round.closes_by_role(),
        );
        let q = format!(
            "sum by (role) (increase(observer_tcp_connection_duration_seconds_count{{premature=\"yes\"}}[{w}]))"
        );
        eq_map(
            &mut p,
            &format!("{what}: premature connection durations observed, by role"),
            &q,
            *to,
            nonzero(prom.by(&q, "role", at)?),
            round.premature_durations_by_role(),
        );
        let q = format!("sum(increase(observer_tcp_connection_duration_seconds_count{{premature=\"no\"}}[{w}]))");
        eq(
            &mut p,
            &format!("{what}: normal connection durations observed"),
            &q,
            *to,
            prom.value(&q, at)?,
            f64::from(round.noresponse),
        );
        let q = format!("sum by (comm) (increase(observer_tcp_resets_sent_total[{w}]))");
        eq_map(
            &mut p,
            &format!("{what}: resets sent by comm"),
            &q,
            *to,
            nonzero(prom.by(&q, "comm", at)?),
            round.sent_by_comm(),
        );
        // rate() over the window: positive while the traffic runs, and exactly its count / W.
        let q = format!("sum(rate(observer_tcp_resets_received_total[{w}]))");
        match prom.value(&q, at)? {
            Some(rate) if rate > 0.0 && (rate * (to - from) as f64 / 1000.0 - round.resets()).abs() < 1e-6 => {}
            got => p.push(format!(
                "{what}: `{q}` at {}: got {got:?}, want {} / {} s = {}",
                shown(*to),
                round.resets(),
                (to - from) as f64 / 1000.0,
                round.resets() * 1000.0 / (to - from) as f64
            )),
        }
    }

    // After the traffic: rate() over 5 s that all lie after the last mark is 0.
    let quiet = wait_for(&prom, "a scrape 6 s after the last round", || {
        Ok(prom.last_scrape()?.filter(|at| *at >= end + 6000))
    })?;
    for family in
        ["observer_tcp_resets_received_total", "observer_tcp_premature_closes_total", "observer_tcp_closes_total"]
    {
        let q = format!("sum(rate({family}[5s]))");
        eq(&mut p, "rate after the traffic stopped", &q, quiet, prom.value(&q, Some(quiet))?, 0.0);
    }

    // The probes: one observer_probe_info series per probe the status lists as attached.
    let (code, body) = daemon.get("/api/v1/status")?;
    ensure!(code == 200, "/api/v1/status answered {code}");
    let status: Value = serde_json::from_str(&body)?;
    let attached: Vec<String> = status["probes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|probe| probe["state"] == "attached")
        .filter_map(|probe| probe["probe"].as_str().map(str::to_string))
        .collect();
    let q = "count(observer_probe_info)";
    eq(&mut p, "attached probes (/api/v1/status)", q, end, prom.value(q, Some(end))?, attached.len() as f64);
    let q = "count by (probe) (observer_probe_info)";
    let got: Vec<String> = prom.by(q, "probe", Some(end))?.into_keys().collect();
    let mut want = attached.clone();
    want.sort();
    if got != want {
        p.push(format!("`{q}` at {}: probes {got:?}, the status lists {want:?} as attached", shown(end)));
    }

    scrape_health(&mut p, &prom, &daemon, first, end)?;
    let last = daemon.metrics()?;
    drop(prom);
    daemon.stop()?;
    p.finish().map_err(|e| anyhow!("{e:#}\nthe daemon's last scrape:\n{}", last.per_connection_summary()))
}

/// The target was up at every scrape, and Prometheus stored every sample it scraped.
fn scrape_health(p: &mut Problems, prom: &Prometheus, daemon: &Daemon, first: Ms, end: Ms) -> Result<()> {
    let whole = format!("{}ms", end - first);
    let q = r#"up{job="observer"}"#;
    eq(p, "the target is up", q, end, prom.value(q, Some(end))?, 1.0);
    let q = format!("min_over_time(up{{job=\"observer\"}}[{whole}])");
    eq(p, "the target was up at every scrape", &q, end, prom.value(&q, Some(end))?, 1.0);
    let stored = r#"count({job="observer",__name__=~"observer_.+"})"#;
    let stored_n = prom.value(stored, Some(end))?;
    let q = r#"scrape_samples_scraped{job="observer"}"#;
    let scraped = prom.value(q, Some(end))?;
    if scraped.is_none() || scraped != stored_n || scraped == Some(0.0) {
        p.push(format!(
            "samples scraped and stored differ: `{q}` at {} is {scraped:?}, `{stored}` is {stored_n:?}",
            shown(end)
        ));
    }
    let q2 = r#"scrape_samples_post_metric_relabeling{job="observer"}"#;
    eq(p, "samples kept after relabelling", q2, end, prom.value(q2, Some(end))?, scraped.unwrap_or(-1.0));

    let targets = prom.api("/api/v1/targets")?;
    let active = targets["activeTargets"].as_array().cloned().unwrap_or_default();
    let want_url = format!("http://{}/metrics", daemon.addr);
    match active.as_slice() {
        [t] if t["labels"]["job"] == "observer"
            && t["scrapeUrl"] == want_url.as_str()
            && t["health"] == "up"
            && t["lastError"] == "" => {}
        _ => p.push(format!("/api/v1/targets: want one target {want_url}, health up, lastError \"\"; got {active:?}")),
    }

    // Prometheus's own counters of samples it rejected.
    let own = prom.own_metrics()?;
    let own = Metrics::parse(&own).context("Prometheus's own /metrics")?;
    let rejected = [
        "prometheus_target_scrapes_sample_out_of_order_total",
        "prometheus_target_scrapes_sample_duplicate_timestamp_total",
        "prometheus_target_scrapes_sample_out_of_bounds_total",
        "prometheus_target_scrapes_exceeded_sample_limit_total",
        "prometheus_target_scrapes_exceeded_body_size_limit_total",
        "prometheus_target_scrape_pool_exceeded_label_limits_total",
    ];
    for name in rejected {
        let values: Vec<f64> = own.matching(name, &[]).map(|(_, v)| v).collect();
        if values.is_empty() {
            p.push(format!("Prometheus's /metrics has no {name}"));
        } else if values.iter().any(|v| *v != 0.0) {
            p.push(format!("Prometheus's {name} is {values:?}, want 0"));
        }
    }
    Ok(())
}

/// Servers for the round's kinds, their clients, and the refused connects.
fn make_round(netns: &NamedNetns, r: Round) -> Result<()> {
    let linger = server("server-linger0", netns, LINGER.0, r.linger, LINGER.1)?;
    let noresponse = server("noresponse", netns, NORESPONSE.0, r.noresponse, NORESPONSE.1)?;
    run_worker("client", netns, LINGER.0, r.linger, CLIENT)?;
    run_worker("client", netns, NORESPONSE.0, r.noresponse, CLIENT)?;
    run_worker("refused", netns, REFUSED.0, r.refused, REFUSED.1)?;
    linger.finish()?;
    noresponse.finish()
}

/// Waits until the daemon shows rounds 0..=i (`total`), then until Prometheus has stored a
/// scrape that started after that and holds the total; that scrape's timestamp.
fn wait_for_round(daemon: &Daemon, prom: &Prometheus, i: usize, total: Round) -> Result<Ms> {
    let (linger, refused, noresponse) =
        (u64::from(total.linger), u64::from(total.refused), u64::from(total.noresponse));
    // (peer_reset, local_reset, refused, eof_before_response, the server's closes, resets sent,
    // resets received), and what round i makes them.
    let counts = |m: &Metrics| {
        let kind = |comm, kind| m.sum("observer_tcp_premature_closes_total", &[("comm", comm), ("kind", kind)]);
        [
            kind(CLIENT, "peer_reset"),
            kind(LINGER.1, "local_reset"),
            kind(REFUSED.1, "refused"),
            kind(CLIENT, "eof_before_response"),
            m.sum("observer_tcp_closes_total", &[("comm", NORESPONSE.1)]),
            m.sum("observer_tcp_resets_sent_total", &[]),
            m.sum("observer_tcp_resets_received_total", &[]),
        ]
    };
    let want = [linger, linger, refused, noresponse, noresponse, linger + refused, linger + refused];
    daemon_shows(daemon, &format!("round {i}'s counts {want:?}"), |m| counts(m).iter().zip(want).all(|(g, w)| *g >= w))
        .map_err(|e| match daemon.metrics() {
            Ok(m) => e.context(format!("round {i}: the daemon counts {:?}, want at least {want:?}", counts(&m))),
            Err(_) => e,
        })?;
    let shown_by_daemon = now_ms();
    let q = "sum(observer_tcp_resets_received_total)";
    wait_for(prom, &format!("a scrape with round {i}'s total `{q}` = {}", total.resets()), || {
        Ok(match prom.last_scrape()? {
            Some(at) if at > shown_by_daemon && prom.value(q, Some(at))? == Some(total.resets()) => Some(at),
            _ => None,
        })
    })
}

/// Polls `f` until it gives `Some`, for up to [`PATIENCE`].
fn wait_for<T>(prom: &Prometheus, what: &str, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        ensure!(
            Instant::now() < deadline,
            "{what} did not happen within {PATIENCE:?}; Prometheus's log:\n{}",
            prom.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One value against what the traffic made.
fn eq(p: &mut Problems, what: &str, expr: &str, at: Ms, got: Option<f64>, want: f64) {
    if got != Some(want) {
        let got = got.map_or_else(|| "no sample".to_string(), |g| g.to_string());
        p.push(format!("{what}: `{expr}` at {}: got {got}, want {want}", shown(at)));
    }
}

/// A by-label answer against what the traffic made.
fn eq_map(p: &mut Problems, what: &str, expr: &str, at: Ms, got: BTreeMap<String, f64>, want: BTreeMap<String, f64>) {
    if got != want {
        p.push(format!("{what}: `{expr}` at {}: got {got:?}, want {want:?}", shown(at)));
    }
}
