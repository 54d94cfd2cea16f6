//! Aggregation: classified, attributed events → Prometheus counters.

use prometheus::{Encoder as _, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::{
    attribution::ConnectionLabels,
    classify::Outcome,
    decode::Event,
    probes::{ProbeStatus, btf::ResetReasons},
};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const REVISION: &str = env!("OBSERVER_GIT_REVISION");

/// Every metric observer exports. Names and labels are a contract (README "Metrics").
pub struct Metrics {
    registry: Registry,
    resets_received: IntCounterVec,
    resets_sent: IntCounterVec,
    closes: IntCounterVec,
    premature_closes: IntCounterVec,
    events: IntCounterVec,
    events_lost: IntCounter,
    events_unattributed: IntCounter,
    events_malformed: IntCounter,
    sockets_untracked: IntCounter,
    probe_info: IntGaugeVec,
}

const CONNECTION: [&str; 4] = ["comm", "role", "peer", "port"];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let metrics = Self {
            resets_received: register(&registry, counter_vec("observer_tcp_resets_received_total", "RST segments accepted on a socket, by the socket's owner.", &CONNECTION)),
            resets_sent: register(
                &registry,
                counter_vec(
                    "observer_tcp_resets_sent_total",
                    "RST segments this host sent, by the socket's owner (comm=\"\" for segments that matched no socket) and the kernel's reason.",
                    &["comm", "role", "peer", "port", "reason"],
                ),
            ),
            closes: register(&registry, counter_vec("observer_tcp_closes_total", "Connections that reached CLOSE, each counted once.", &CONNECTION)),
            premature_closes: register(
                &registry,
                counter_vec(
                    "observer_tcp_premature_closes_total",
                    "Connections that ended prematurely, each counted once, by how they ended.",
                    &["comm", "role", "peer", "port", "kind"],
                ),
            ),
            events: register(&registry, counter_vec("observer_events_total", "Events received from the kernel, by the probe that emitted them.", &["probe"])),
            events_lost: register(&registry, counter("observer_events_lost_total", "Events the kernel dropped because the ring buffer was full.")),
            events_unattributed: register(&registry, counter("observer_events_unattributed_total", "Events about a socket whose owning process is unknown.")),
            events_malformed: register(&registry, counter("observer_events_malformed_total", "Ring buffer records that could not be decoded.")),
            sockets_untracked: register(&registry, counter("observer_sockets_untracked_total", "Sockets the kernel side could not track because its socket map was full.")),
            probe_info: register(&registry, gauge_vec("observer_probe_info", "Attached probes and their attach points (1 per attached probe).", &["probe", "attach"])),
            registry,
        };
        let build = register(&metrics.registry, gauge_vec("observer_build_info", "observer's version and source revision.", &["version", "revision"]));
        build.with_label_values(&[VERSION, REVISION]).set(1);
        for probe in crate::ALL_PROBES {
            // Every probe's series exists from the first scrape, at 0.
            metrics.events.with_label_values(&[probe.name()]);
        }
        metrics
    }

    pub fn set_probes(&self, statuses: &[ProbeStatus]) {
        for s in statuses.iter().filter(|s| s.state == "attached") {
            self.probe_info.with_label_values(&[s.probe, s.attach.as_str()]).set(1);
        }
    }

    /// Counts one event.
    pub fn record(&self, event: &Event, outcome: Outcome, labels: &ConnectionLabels, reasons: &ResetReasons, unattributed: bool) {
        self.events.with_label_values(&[event.probe.name()]).inc();
        if unattributed {
            self.events_unattributed.inc();
        }
        let conn = [labels.comm.as_str(), labels.role, labels.peer.as_str(), labels.port.as_str()];
        match outcome {
            Outcome::ResetReceived => self.resets_received.with_label_values(&conn).inc(),
            Outcome::ResetSent { reason } => {
                let [comm, role, peer, port] = conn;
                self.resets_sent.with_label_values(&[comm, role, peer, port, reasons.label(reason)]).inc();
            }
            Outcome::Closed { premature } => {
                self.closes.with_label_values(&conn).inc();
                if let Some(kind) = premature {
                    let [comm, role, peer, port] = conn;
                    self.premature_closes.with_label_values(&[comm, role, peer, port, kind.label()]).inc();
                }
            }
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
        crate::ALL_PROBES
            .iter()
            .map(|p| (p.name().to_string(), self.events.with_label_values(&[p.name()]).get()))
            .collect()
    }

    pub fn events_lost(&self) -> u64 {
        self.events_lost.get()
    }

    pub fn events_unattributed(&self) -> u64 {
        self.events_unattributed.get()
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail for well-formed families.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            log::error!("encoding metrics: {e}");
        }
        out
    }
}

// Metric definitions are static: a failure here is a programming error caught by any test.
fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition")
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("valid metric definition")
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition")
}

fn register<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, collector: C) -> C {
    registry.register(Box::new(collector.clone())).expect("each metric is registered once");
    collector
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
