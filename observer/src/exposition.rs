//! The last step of an event's path: `/metrics` in the Prometheus text format. The
//! per-connection families are written straight from the [`Aggregator`], then the daemon's own
//! metrics ([`Metrics::gather`]) through the `prometheus` crate.
//!
//! Why not the `prometheus` crate's collector: at 10,000 series it builds a protobuf message per
//! sample (a `String` per label, a `Vec` per series) and then encodes them, all while holding the
//! aggregator's lock, which the event loop needs. Writing the text directly is one pass with no
//! allocation per series. The daemon's own few counters still go through the crate.

use std::fmt::Write as _;

use prometheus::{Encoder as _, TextEncoder};

use crate::{
    aggregate::{Aggregator, Family},
    classify::PrematureClose,
    metrics::Metrics,
    pods::{PodIdentity, PodNames},
    probes::stats::ProgramRuns,
    reasons::ResetReasons,
    series::{Label, SeriesKey, role_text},
};

/// `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Everything `/metrics` serves: the per-connection families, the kernel programs' own cost when
/// the kernel counts it (`runs`, empty otherwise), then the daemon's own metrics. `pods` names
/// the containers' pods.
pub fn render(metrics: &Metrics, pods: &PodNames, runs: &[ProgramRuns]) -> Vec<u8> {
    let mut text = String::with_capacity(64 * 1024);
    write_connections(&mut text, &metrics.aggregator(), metrics.reasons(), pods);
    write_program_runs(&mut text, runs);
    let mut out = text.into_bytes();
    if let Err(e) = TextEncoder::new().encode(&metrics.gather(), &mut out) {
        log::error!("encoding metrics: {e}");
    }
    out
}

/// A per-connection family: (family, name, help, extra label).
pub type FamilySpec = (Family, &'static str, &'static str, Option<&'static str>);

/// Every per-connection family, in exposition order. Names and labels are a contract (README).
pub const FAMILIES: [FamilySpec; 6] = [
    (
        Family::Opened,
        "observer_tcp_connections_opened_total",
        "Connections opened, each counted once: every connect() attempt (role=\"client\", refused or not) and every connection accept() returned (role=\"server\").",
        None,
    ),
    (
        Family::ResetsReceived,
        "observer_tcp_resets_received_total",
        "RST segments accepted on a socket, by the socket's owner.",
        None,
    ),
    (
        Family::ResetsSent,
        "observer_tcp_resets_sent_total",
        "RST segments this host sent, by the socket's owner (comm=\"\" for segments that matched no socket) and the kernel's reason.",
        Some("reason"),
    ),
    (Family::Closes, "observer_tcp_closes_total", "Connections that reached CLOSE, each counted once.", None),
    (
        Family::PrematureCloses,
        "observer_tcp_premature_closes_total",
        "Connections that ended prematurely, each counted once, by how they ended.",
        Some("kind"),
    ),
    (
        Family::Retransmits,
        "observer_tcp_retransmits_total",
        "Segments retransmitted, counted when the connection closes.",
        None,
    ),
];

const SERIES_FOLDED: (&str, &str) = (
    "observer_series_folded_total",
    "Counts put in a peer=\"other\" (or overflow) series instead of their own because of --max-peers / --max-series.",
);
const SERIES: (&str, &str) = ("observer_series", "Per-connection series currently exported.");
const SERIES_EXPIRED: (&str, &str) = (
    "observer_series_expired_total",
    "Per-connection series removed because their container had been gone longer than --expire-gone-after.",
);

/// Appends every per-connection family, `observer_series_folded_total` and `observer_series`.
pub fn write_connections(out: &mut String, agg: &Aggregator, reasons: Option<&ResetReasons>, pods: &PodNames) {
    for (family, name, help, extra) in FAMILIES {
        let mut series = agg.iter(family).peekable();
        if series.peek().is_none() {
            continue;
        }
        header(out, name, help, "counter");
        for (key, value) in series {
            out.push_str(name);
            labels(out, key, pods.get(&key.container).map(|p| &**p));
            if let Some(extra) = extra {
                out.push(',');
                out.push_str(extra);
                out.push_str("=\"");
                match family {
                    Family::ResetsSent => escaped(out, reasons.map_or("not_specified", |r| r.label(key.detail))),
                    _ => out.push_str(PrematureClose::from_index(key.detail).map_or("unknown", |k| k.label())),
                }
                out.push('"');
            }
            let _ = writeln!(out, "}} {value}");
        }
    }
    header(out, SERIES_FOLDED.0, SERIES_FOLDED.1, "counter");
    let _ = writeln!(out, "{} {}", SERIES_FOLDED.0, agg.folded());
    header(out, SERIES.0, SERIES.1, "gauge");
    let _ = writeln!(out, "{} {}", SERIES.0, agg.series());
    header(out, SERIES_EXPIRED.0, SERIES_EXPIRED.1, "counter");
    let _ = writeln!(out, "{} {}", SERIES_EXPIRED.0, agg.expired());
}

const PROBE_RUNS: (&str, &str) = (
    "observer_probe_runs_total",
    "Runs of each of observer's kernel programs since it was loaded, counted while the kernel's BPF statistics are on (--probe-stats or kernel.bpf_stats_enabled).",
);
const PROBE_RUN_SECONDS: (&str, &str) = (
    "observer_probe_run_seconds_total",
    "Time each of observer's kernel programs ran since it was loaded, counted while the kernel's BPF statistics are on (--probe-stats or kernel.bpf_stats_enabled).",
);

/// `observer_probe_runs_total{probe}` and `observer_probe_run_seconds_total{probe}`; nothing
/// when the kernel is not counting.
fn write_program_runs(out: &mut String, runs: &[ProgramRuns]) {
    if runs.is_empty() {
        return;
    }
    header(out, PROBE_RUNS.0, PROBE_RUNS.1, "counter");
    for r in runs {
        let _ = writeln!(out, "{}{{probe=\"{}\"}} {}", PROBE_RUNS.0, r.probe, r.runs);
    }
    header(out, PROBE_RUN_SECONDS.0, PROBE_RUN_SECONDS.1, "counter");
    for r in runs {
        let _ = writeln!(out, "{}{{probe=\"{}\"}} {}", PROBE_RUN_SECONDS.0, r.probe, r.run_ns as f64 / 1e9);
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = write!(out, "# HELP {name} ");
    for c in help.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    let _ = writeln!(out, "\n# TYPE {name} {kind}");
}

/// `{comm="..",container="..",container_id="..",namespace="..",peer="..",pod="..",port="..",role=".."`
/// (no closing brace: an extra label may follow). `container` is the container's name in its pod,
/// `container_id` the runtime's short id, as kube-state-metrics and cAdvisor name them.
fn labels(out: &mut String, key: &SeriesKey, pod: Option<&PodIdentity>) {
    out.push_str("{comm=\"");
    escaped(out, Label::Comm(&key.comm));
    out.push_str("\",container=\"");
    if let Some(pod) = pod {
        escaped(out, &pod.container);
    }
    out.push_str("\",container_id=\"");
    escaped(out, Label::Container(&key.container));
    out.push_str("\",namespace=\"");
    if let Some(pod) = pod {
        escaped(out, &pod.namespace);
    }
    // Addresses need no escaping.
    let _ = write!(out, "\",peer=\"{}\",pod=\"", Label::Peer(&key.peer));
    if let Some(pod) = pod {
        escaped(out, &pod.pod);
    }
    let _ = write!(out, "\",port=\"{}\",role=\"{}\"", Label::Port(&key.port), role_text(key.role));
}

/// A label value as the text format wants it: backslash, double quote and newline escaped.
fn escaped(out: &mut String, value: impl std::fmt::Display) {
    let start = out.len();
    let _ = write!(out, "{value}");
    if !out[start..].contains(['\\', '"', '\n']) {
        return;
    }
    let raw = out.split_off(start);
    for c in raw.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use std::sync::Arc;

    use super::*;
    use crate::series::{NO_CONTAINER, Peer, Port};

    fn key(comm: &[u8], peer: [u8; 16], port: Port, detail: u32) -> SeriesKey {
        let mut c = [0u8; 16];
        c[..comm.len()].copy_from_slice(comm);
        SeriesKey { comm: c, role: 1, peer: Peer::Addr(peer), port, container: NO_CONTAINER, detail }
    }

    fn v4(a: [u8; 4]) -> [u8; 16] {
        std::net::Ipv4Addr::from(a).to_ipv6_mapped().octets()
    }

    #[test]
    fn writes_the_text_format_with_escaped_values() {
        let mut agg = Aggregator::new(50, 1000);
        agg.add(Family::Closes, key(b"nginx", v4([10, 0, 0, 1]), Port::Num(443), 0), 3);
        agg.add(
            Family::PrematureCloses,
            key(b"a\"b\\c\nd", Ipv6Addr::LOCALHOST.octets(), Port::None, PrematureClose::EofBeforeResponse as u32),
            1,
        );
        agg.add(Family::ResetsSent, key(b"", v4([10, 0, 0, 2]), Port::Num(80), 7), 2);
        let reasons = ResetReasons::from_pairs([(7, "SK_RST_REASON_NO_SOCKET")]);
        let mut out = String::new();
        write_connections(&mut out, &agg, Some(&reasons), &PodNames::default());
        let expected = [
            "# HELP observer_tcp_resets_sent_total RST segments this host sent, by the socket's owner (comm=\"\" for segments that matched no socket) and the kernel's reason.",
            "# TYPE observer_tcp_resets_sent_total counter",
            "observer_tcp_resets_sent_total{comm=\"\",container=\"\",container_id=\"\",namespace=\"\",peer=\"10.0.0.2\",pod=\"\",port=\"80\",role=\"client\",reason=\"no_socket\"} 2",
            "# HELP observer_tcp_closes_total Connections that reached CLOSE, each counted once.",
            "# TYPE observer_tcp_closes_total counter",
            "observer_tcp_closes_total{comm=\"nginx\",container=\"\",container_id=\"\",namespace=\"\",peer=\"10.0.0.1\",pod=\"\",port=\"443\",role=\"client\"} 3",
            "# HELP observer_tcp_premature_closes_total Connections that ended prematurely, each counted once, by how they ended.",
            "# TYPE observer_tcp_premature_closes_total counter",
            "observer_tcp_premature_closes_total{comm=\"a\\\"b\\\\c\\nd\",container=\"\",container_id=\"\",namespace=\"\",peer=\"::1\",pod=\"\",port=\"\",role=\"client\",kind=\"eof_before_response\"} 1",
            "# HELP observer_series_folded_total Counts put in a peer=\"other\" (or overflow) series instead of their own because of --max-peers / --max-series.",
            "# TYPE observer_series_folded_total counter",
            "observer_series_folded_total 0",
            "# HELP observer_series Per-connection series currently exported.",
            "# TYPE observer_series gauge",
            "observer_series 3",
            "# HELP observer_series_expired_total Per-connection series removed because their container had been gone longer than --expire-gone-after.",
            "# TYPE observer_series_expired_total counter",
            "observer_series_expired_total 0",
        ];
        assert_eq!(out.lines().collect::<Vec<_>>(), expected);
    }

    #[test]
    fn program_runs_are_counters_by_probe_and_absent_when_not_counted() {
        let mut out = String::new();
        write_program_runs(&mut out, &[]);
        assert_eq!(out, "");
        let runs = [ProgramRuns { probe: "inet_sock_set_state", runs: 10, run_ns: 4_810 }];
        write_program_runs(&mut out, &runs);
        let samples: Vec<&str> = out.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            samples,
            [
                "observer_probe_runs_total{probe=\"inet_sock_set_state\"} 10",
                "observer_probe_run_seconds_total{probe=\"inet_sock_set_state\"} 0.00000481"
            ]
        );
        assert!(out.contains("# TYPE observer_probe_run_seconds_total counter\n"), "{out}");
    }

    #[test]
    fn a_named_containers_series_carry_its_pod_and_its_id() {
        let id = crate::series::container_key("3f2a9c1b7d4e");
        let mut agg = Aggregator::new(50, 1000);
        agg.add(Family::Closes, SeriesKey { container: id, ..key(b"app", v4([10, 0, 0, 1]), Port::Num(80), 0) }, 1);
        let mut pods = PodNames::default();
        let pod = PodIdentity {
            namespace: "shop".into(),
            pod: "orders-0".into(),
            pod_uid: "u".into(),
            container: "app".into(),
        };
        pods.insert(id, Arc::new(pod));
        let mut out = String::new();
        write_connections(&mut out, &agg, None, &pods);
        assert!(
            out.contains(
                "observer_tcp_closes_total{comm=\"app\",container=\"app\",container_id=\"3f2a9c1b7d4e\",namespace=\"shop\",peer=\"10.0.0.1\",pod=\"orders-0\",port=\"80\",role=\"client\"} 1\n"
            ),
            "{out}"
        );
        let mut unnamed = String::new();
        write_connections(&mut unnamed, &agg, None, &PodNames::default());
        assert!(unnamed.contains("container=\"\",container_id=\"3f2a9c1b7d4e\",namespace=\"\""), "{unnamed}");
    }

    #[test]
    fn folded_series_render_as_other() {
        let mut agg = Aggregator::new(1, 1000);
        agg.add(Family::Closes, key(b"srv", v4([1, 1, 1, 1]), Port::Num(80), 0), 1);
        agg.add(Family::Closes, key(b"srv", v4([1, 1, 1, 2]), Port::Num(80), 0), 1);
        let mut out = String::new();
        write_connections(&mut out, &agg, None, &PodNames::default());
        assert!(
            out.contains(
                "observer_tcp_closes_total{comm=\"srv\",container=\"\",container_id=\"\",namespace=\"\",peer=\"other\",pod=\"\",port=\"80\",role=\"client\"} 1\n"
            ),
            "{out}"
        );
        assert!(out.contains("observer_series_folded_total 1\n"));
    }
}
