//! Prometheus: the per-connection families (from [`Aggregator`]) and the daemon's own counters,
//! rendered in the text exposition format.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use prometheus::{
    Encoder as _, HistogramOpts, HistogramVec, IntCounter, IntGaugeVec, Opts, Registry, TextEncoder,
    core::{Collector, Desc},
    proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType},
};

use crate::{
    ALL_PROBES,
    aggregate::{Aggregator, ContainerKey, Family, SeriesKey},
    attribution::{Attribution, label_values},
    classify::{Outcome, PrematureClose},
    decode::Event,
    probes::{ProbeStatus, btf::ResetReasons},
};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const REVISION: &str = env!("OBSERVER_GIT_REVISION");

/// Cardinality caps (README "Bounded cardinality").
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_peers: usize,
    pub max_series: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_peers: 50, max_series: 20_000 }
    }
}

/// Every metric observer exports. Names and labels are a contract (README "Metrics").
pub struct Metrics {
    registry: Registry,
    connections: Arc<Mutex<Aggregator>>,
    reasons: Arc<OnceLock<ResetReasons>>,
    /// Indexed by `ProbeId as usize`.
    events: Vec<IntCounter>,
    events_lost: IntCounter,
    events_unattributed: IntCounter,
    events_malformed: IntCounter,
    sockets_untracked: IntCounter,
    probe_info: IntGaugeVec,
    /// By `role` and `premature` ("yes" / "no"): few series, whatever the traffic.
    duration: HistogramVec,
    connections_by_state: IntGaugeVec,
    close_wait_oldest: prometheus::GaugeVec,
    /// Held while the gauges are replaced, so a scrape never sees half a snapshot.
    gauges_lock: Mutex<()>,
}

/// Connection lifetimes span a millisecond health check to a day-long stream.
const DURATION_BUCKETS: [f64; 14] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 600.0, 3600.0];

impl Metrics {
    pub fn new(limits: Limits) -> Self {
        let registry = Registry::new();
        let connections = Arc::new(Mutex::new(Aggregator::new(limits.max_peers, limits.max_series)));
        let reasons = Arc::new(OnceLock::new());
        register(&registry, ConnectionCollector::new(connections.clone(), reasons.clone()));
        let events_vec = register(
            &registry,
            prometheus::IntCounterVec::new(Opts::new("observer_events_total", "Events received from the kernel, by the probe that emitted them."), &["probe"])
                .expect("valid metric definition"),
        );
        let metrics = Self {
            events: ALL_PROBES.iter().map(|p| events_vec.with_label_values(&[p.name()])).collect(),
            events_lost: register(&registry, counter("observer_events_lost_total", "Events the kernel dropped because the ring buffer was full.")),
            events_unattributed: register(&registry, counter("observer_events_unattributed_total", "Events about a socket whose owning process is unknown.")),
            events_malformed: register(&registry, counter("observer_events_malformed_total", "Ring buffer records that could not be decoded.")),
            sockets_untracked: register(&registry, counter("observer_sockets_untracked_total", "Sockets the kernel side could not track because its socket map was full.")),
            probe_info: register(&registry, gauge_vec("observer_probe_info", "Attached probes and their attach points (1 per attached probe).", &["probe", "attach"])),
            duration: register(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "observer_tcp_connection_duration_seconds",
                        "Connection lifetimes from connect() or the SYN to CLOSE, by role and whether the connection ended prematurely.",
                    )
                    .buckets(DURATION_BUCKETS.to_vec()),
                    &["role", "premature"],
                )
                .expect("valid metric definition"),
            ),
            connections_by_state: register(
                &registry,
                gauge_vec("observer_tcp_connections", "Open TCP connections by owning process, role and state (as ss names states).", &["comm", "role", "state", "container"]),
            ),
            close_wait_oldest: register(
                &registry,
                prometheus::GaugeVec::new(
                    Opts::new("observer_tcp_close_wait_oldest_seconds", "How long the process's oldest CLOSE-WAIT socket has waited for it to close it."),
                    &["comm", "container"],
                )
                .expect("valid metric definition"),
            ),
            gauges_lock: Mutex::new(()),
            connections,
            reasons,
            registry,
        };
        let build = register(&metrics.registry, gauge_vec("observer_build_info", "observer's version and source revision.", &["version", "revision"]));
        build.with_label_values(&[VERSION, REVISION]).set(1);
        metrics
    }

    pub fn set_probes(&self, statuses: &[ProbeStatus], reasons: ResetReasons) {
        for s in statuses.iter().filter(|s| s.state == "attached") {
            self.probe_info.with_label_values(&[s.probe, s.attach.as_str()]).set(1);
        }
        let _ = self.reasons.set(reasons);
    }

    fn aggregator(&self) -> MutexGuard<'_, Aggregator> {
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one event; `container` is its owner's short container id.
    pub fn record(&self, event: &Event, outcome: Outcome, attribution: &Attribution, container: ContainerKey, unattributed: bool) {
        self.events[event.probe as usize].inc();
        if unattributed {
            self.events_unattributed.inc();
        }
        let raw = &event.raw;
        let key = |detail| attribution.key(raw, detail, container);
        let mut agg = self.aggregator();
        match outcome {
            Outcome::ResetReceived => agg.add(Family::ResetsReceived, key(0), 1),
            Outcome::ResetSent { reason } => agg.add(Family::ResetsSent, key(reason), 1),
            Outcome::Closed { premature } => {
                agg.add(Family::Closes, key(0), 1);
                if let Some(kind) = premature {
                    agg.add(Family::PrematureCloses, key(kind as u32), 1);
                }
                let facts = &raw.facts;
                if facts.retransmits > 0 {
                    agg.add(Family::Retransmits, key(0), u64::from(facts.retransmits));
                }
                drop(agg);
                if facts.duration_ns > 0 {
                    let role = crate::attribution::role_text(raw.role);
                    let premature = if premature.is_some() { "yes" } else { "no" };
                    self.duration.with_label_values(&[role, premature]).observe(facts.duration_ns as f64 / 1e9);
                }
            }
        }
    }

    /// Replaces the connection-state gauges with a new scan of the socket map.
    pub fn set_connections(&self, by_state: &crate::connections::ByState, oldest: &crate::connections::OldestCloseWait) {
        let _guard = self.gauges_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.connections_by_state.reset();
        for ((comm, role, state, container), n) in by_state {
            self.connections_by_state.with_label_values(&[comm.as_str(), role, state, container.as_str()]).set(*n);
        }
        self.close_wait_oldest.reset();
        for ((comm, container), age) in oldest {
            self.close_wait_oldest.with_label_values(&[comm.as_str(), container.as_str()]).set(*age);
        }
    }

    pub fn record_malformed(&self) {
        self.events_malformed.inc();
    }

    /// Brings the kernel-side totals (read from per-CPU maps) into the counters.
    pub fn sync_kernel_counters(&self, ring_full: u64, socket_map_full: u64) {
        for (counter, total) in [(&self.events_lost, ring_full), (&self.sockets_untracked, socket_map_full)] {
            let seen = counter.get();
            if total > seen {
                counter.inc_by(total - seen);
            }
        }
    }

    pub fn events_seen(&self) -> Vec<(String, u64)> {
        ALL_PROBES.iter().map(|p| (p.name().to_string(), self.events[*p as usize].get())).collect()
    }

    pub fn events_lost(&self) -> u64 {
        self.events_lost.get()
    }

    pub fn events_unattributed(&self) -> u64 {
        self.events_unattributed.get()
    }

    /// (series, counts folded into `other`).
    pub fn series(&self) -> (usize, u64) {
        let agg = self.aggregator();
        (agg.series(), agg.folded())
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 * 1024);
        let families = {
            let _guard = self.gauges_lock.lock().unwrap_or_else(|e| e.into_inner());
            self.registry.gather()
        };
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            log::error!("encoding metrics: {e}");
        }
        out
    }
}

/// Renders the per-connection families from the aggregator at scrape time.
struct ConnectionCollector {
    connections: Arc<Mutex<Aggregator>>,
    reasons: Arc<OnceLock<ResetReasons>>,
    descs: Vec<Desc>,
}

/// (family, name, help, extra label).
const FAMILIES: [(Family, &str, &str, Option<&str>); 5] = [
    (Family::ResetsReceived, "observer_tcp_resets_received_total", "RST segments accepted on a socket, by the socket's owner.", None),
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
    (Family::Retransmits, "observer_tcp_retransmits_total", "Segments retransmitted, counted when the connection closes.", None),
];

const SERIES_FOLDED: (&str, &str) = (
    "observer_series_folded_total",
    "Counts put in a peer=\"other\" (or overflow) series instead of their own because of --max-peers / --max-series.",
);
const SERIES: (&str, &str) = ("observer_series", "Per-connection series currently exported.");

impl ConnectionCollector {
    fn new(connections: Arc<Mutex<Aggregator>>, reasons: Arc<OnceLock<ResetReasons>>) -> Self {
        let mut descs: Vec<Desc> = FAMILIES
            .iter()
            .map(|(_, name, help, extra)| {
                let mut labels: Vec<String> = ["comm", "role", "peer", "port", "container"].map(String::from).to_vec();
                labels.extend(extra.map(String::from));
                Desc::new(name.to_string(), help.to_string(), labels, Default::default()).expect("valid metric definition")
            })
            .collect();
        for (name, help) in [SERIES_FOLDED, SERIES] {
            descs.push(Desc::new(name.into(), help.into(), vec![], Default::default()).expect("valid metric definition"));
        }
        Self { connections, reasons, descs }
    }

    fn detail_label(&self, family: Family, key: &SeriesKey) -> Option<String> {
        match family {
            Family::ResetsSent => {
                Some(self.reasons.get().map_or("not_specified", |r| r.label(key.detail)).to_string())
            }
            Family::PrematureCloses => Some(PrematureClose::from_index(key.detail).map_or("unknown", |k| k.label()).to_string()),
            _ => None,
        }
    }
}

impl Collector for ConnectionCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let agg = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        let mut families = Vec::with_capacity(FAMILIES.len() + 2);
        for (family, name, help, extra) in FAMILIES {
            let metrics: Vec<Metric> = agg
                .iter(family)
                .map(|(key, value)| {
                    let [comm, role, peer, port, container] = label_values(key);
                    let mut labels = vec![pair("comm", comm), pair("container", container), pair("peer", peer), pair("port", port), pair("role", role)];
                    if let (Some(extra), Some(v)) = (extra, self.detail_label(family, key)) {
                        labels.push(pair(extra, v));
                    }
                    labels.sort_by(|a, b| a.name().cmp(b.name()));
                    counter_metric(labels, value as f64)
                })
                .collect();
            if !metrics.is_empty() {
                families.push(family_of(name, help, MetricType::COUNTER, metrics));
            }
        }
        families.push(family_of(SERIES_FOLDED.0, SERIES_FOLDED.1, MetricType::COUNTER, vec![counter_metric(vec![], agg.folded() as f64)]));
        let mut gauge = Gauge::default();
        gauge.set_value(agg.series() as f64);
        let mut series = Metric::default();
        series.set_gauge(gauge);
        families.push(family_of(SERIES.0, SERIES.1, MetricType::GAUGE, vec![series]));
        families
    }
}

fn pair(name: &str, value: String) -> LabelPair {
    let mut p = LabelPair::default();
    p.set_name(name.to_string());
    p.set_value(value);
    p
}

fn counter_metric(labels: Vec<LabelPair>, value: f64) -> Metric {
    let mut c = Counter::default();
    c.set_value(value);
    let mut m = Metric::default();
    m.set_label(labels);
    m.set_counter(c);
    m
}

fn family_of(name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_string());
    f.set_help(help.to_string());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

// Metric definitions are static: a failure here is a programming error caught by any test.
fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("valid metric definition")
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition")
}

fn register<C: Collector + Clone + 'static>(registry: &Registry, collector: C) -> C {
    registry.register(Box::new(collector.clone())).expect("each metric is registered once");
    collector
}

impl Clone for ConnectionCollector {
    fn clone(&self) -> Self {
        Self { connections: self.connections.clone(), reasons: self.reasons.clone(), descs: self.descs.clone() }
    }
}
