//! Everything the daemon counts: the per-connection families (an [`Aggregator`]), the connection
//! durations, the connection-state gauges and the daemon's own counters (events per probe,
//! lost, unattributed, malformed). [`crate::exposition`] writes them out.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntGaugeVec, Opts, Registry, core::Collector};

use observer_common::Role;

use crate::{
    ALL_PROBES, REVISION, VERSION,
    aggregate::{Aggregator, Limits},
    api::RuntimeReport,
    attribution::Attributed,
    classify::Outcome,
    connections::{ByState, OldestCloseWait},
    decode::Event,
    pods::PodNames,
    probes::{ProbeState, ProbeStatus},
    reasons::ResetReasons,
    series::{container_key, role_text},
};

/// Every metric observer exports. Names and labels are a contract (README "Metrics").
pub struct Metrics {
    registry: Registry,
    connections: Arc<Mutex<Aggregator>>,
    reasons: Arc<OnceLock<ResetReasons>>,
    /// `observer_events_total`, one series per probe, created when the probe is attached (or
    /// first emits): probes of the back end not chosen do not show.
    events_total: prometheus::IntCounterVec,
    /// Indexed by `ProbeId as usize`.
    events_by_probe: Vec<OnceLock<IntCounter>>,
    events_lost: IntCounter,
    events_unattributed: IntCounter,
    events_malformed: IntCounter,
    sockets_untracked: IntCounter,
    probe_info: IntGaugeVec,
    /// By `role` and `premature` ("yes" / "no"): few series, whatever the traffic. Resolved
    /// once, indexed by `Role as usize` and premature (0: no, 1: yes): no label lookup per event.
    durations: [[prometheus::Histogram; 2]; 3],
    connections_by_state: IntGaugeVec,
    close_wait_oldest: prometheus::GaugeVec,
    /// `observer_container_runtime_info{runtime,version,socket}`.
    runtime_info: IntGaugeVec,
    /// `observer_container_runtime_errors_total{operation}`.
    runtime_errors: prometheus::IntCounterVec,
    /// Held while the gauges are replaced, so a scrape never sees half a snapshot.
    gauges_lock: Mutex<()>,
}

/// Connection lifetimes span a millisecond health check to a day-long stream.
const DURATION_BUCKETS: [f64; 14] =
    [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 600.0, 3600.0];

impl Metrics {
    pub fn new(limits: Limits) -> Self {
        let registry = Registry::new();
        let connections = Arc::new(Mutex::new(Aggregator::with_limits(limits)));
        let reasons = Arc::new(OnceLock::new());
        let events_total = register(
            &registry,
            prometheus::IntCounterVec::new(
                Opts::new("observer_events_total", "Events received from the kernel, by the probe that emitted them."),
                &["probe"],
            )
            .expect("valid metric definition"),
        );
        let metrics = Self {
            events_by_probe: ALL_PROBES.iter().map(|_| OnceLock::new()).collect(),
            events_total,
            events_lost: register(
                &registry,
                counter("observer_events_lost_total", "Events the kernel dropped because the ring buffer was full."),
            ),
            events_unattributed: register(
                &registry,
                counter("observer_events_unattributed_total", "Events about a socket whose owning process is unknown."),
            ),
            events_malformed: register(
                &registry,
                counter("observer_events_malformed_total", "Ring buffer records that could not be decoded."),
            ),
            sockets_untracked: register(
                &registry,
                counter(
                    "observer_sockets_untracked_total",
                    "Sockets the kernel side could not track because its socket map was full.",
                ),
            ),
            probe_info: register(
                &registry,
                gauge_vec(
                    "observer_probe_info",
                    "Attached probes, their attach points and back ends (1 per attached probe).",
                    &["probe", "attach", "backend"],
                ),
            ),
            durations: durations(&registry),
            connections_by_state: register(
                &registry,
                gauge_vec(
                    "observer_tcp_connections",
                    "Open TCP connections by owning process, role and state (established, close_wait, ...).",
                    &["comm", "role", "state", "namespace", "pod", "container", "container_id"],
                ),
            ),
            close_wait_oldest: register(
                &registry,
                prometheus::GaugeVec::new(
                    Opts::new(
                        "observer_tcp_close_wait_oldest_seconds",
                        "How long the process's oldest CLOSE-WAIT socket has waited for it to close it.",
                    ),
                    &["comm", "namespace", "pod", "container", "container_id"],
                )
                .expect("valid metric definition"),
            ),
            runtime_info: register(
                &registry,
                gauge_vec(
                    "observer_container_runtime_info",
                    "The container runtime observer names pods through (its CRI socket): state is connected, unreachable or none.",
                    &["state", "runtime", "version", "socket"],
                ),
            ),
            runtime_errors: register(
                &registry,
                prometheus::IntCounterVec::new(
                    Opts::new(
                        "observer_container_runtime_errors_total",
                        "Calls to the container runtime's CRI API that failed (series then carry container ids only).",
                    ),
                    &["operation"],
                )
                .expect("valid metric definition"),
            ),
            gauges_lock: Mutex::new(()),
            connections,
            reasons,
            registry,
        };
        let build = register(
            &metrics.registry,
            gauge_vec("observer_build_info", "observer's version and source revision.", &["version", "revision"]),
        );
        build.with_label_values(&[VERSION, REVISION]).set(1);
        metrics.set_runtime(&RuntimeReport { state: "none".into(), ..RuntimeReport::default() });
        // Zero from the start, so that rate() and alerts see the first error.
        for operation in ["version", "list_containers"] {
            metrics.runtime_errors.with_label_values(&[operation]);
        }
        metrics
    }

    pub fn set_probes(&self, statuses: &[ProbeStatus], reasons: ResetReasons) {
        for s in statuses.iter().filter(|s| s.state == ProbeState::Attached) {
            self.probe_info.with_label_values(&[s.probe, s.attach.as_str(), s.backend]).set(1);
            if let Some(probe) = ALL_PROBES.iter().find(|p| p.name() == s.probe) {
                self.probe_events(*probe);
            }
        }
        let _ = self.reasons.set(reasons);
    }

    /// The per-connection series; held briefly: the event path waits for it.
    pub fn aggregator(&self) -> MutexGuard<'_, Aggregator> {
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The kernel's reset reason names, once the probes are loaded.
    pub fn reasons(&self) -> Option<&ResetReasons> {
        self.reasons.get()
    }

    /// Counts one classified, attributed event.
    pub fn record(&self, event: &Event, outcome: Outcome, attributed: &Attributed) {
        self.probe_events(event.probe).inc();
        if attributed.unattributed {
            self.events_unattributed.inc();
        }
        let facts = &event.raw.facts;
        self.aggregator().count(outcome, attributed.key, facts);
        if let Outcome::Closed { premature } = outcome
            && facts.duration_ns > 0
        {
            let role = Role::from_u8(event.raw.role) as usize;
            self.durations[role][usize::from(premature.is_some())].observe(facts.duration_ns as f64 / 1e9);
        }
    }

    /// Counts a message head (`--http`): the event path's work for it is the exchange tracker's.
    pub fn record_head(&self, probe: crate::ProbeId) {
        self.probe_events(probe).inc();
    }

    /// Replaces the connection-state gauges with a new scan of the socket map; `pods` names the
    /// containers' pods.
    pub fn set_connections(&self, by_state: &ByState, oldest: &OldestCloseWait, pods: &PodNames) {
        // namespace, pod, container name of a short container id.
        let pod_of = |id: &str| match pods.get(&container_key(id)) {
            Some(p) if !id.is_empty() => [p.namespace.clone(), p.pod.clone(), p.container.clone()],
            _ => Default::default(),
        };
        let _guard = self.gauges_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.connections_by_state.reset();
        for ((comm, role, state, container), n) in by_state {
            let [namespace, pod, name] = pod_of(container);
            self.connections_by_state
                .with_label_values(&[comm.as_str(), role, state, &namespace, &pod, &name, container.as_str()])
                .set(*n);
        }
        self.close_wait_oldest.reset();
        for ((comm, container), age) in oldest {
            let [namespace, pod, name] = pod_of(container);
            self.close_wait_oldest
                .with_label_values(&[comm.as_str(), &namespace, &pod, &name, container.as_str()])
                .set(*age);
        }
    }

    /// `observer_container_runtime_info`: one series, with the runtime's state (`connected`,
    /// `unreachable`, `none`), name, version and socket.
    pub fn set_runtime(&self, report: &RuntimeReport) {
        let _guard = self.gauges_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.runtime_info.reset();
        self.runtime_info
            .with_label_values(&[report.state.as_str(), &report.runtime, &report.version, &report.socket])
            .set(1);
    }

    /// A call to the container runtime failed (`operation`: `version`, `list_containers`).
    pub fn record_runtime_error(&self, operation: &str) {
        self.runtime_errors.with_label_values(&[operation]).inc();
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

    /// `observer_events_total{probe}` for `probe`, created on first use.
    fn probe_events(&self, probe: crate::ProbeId) -> &IntCounter {
        self.events_by_probe[probe as usize].get_or_init(|| self.events_total.with_label_values(&[probe.name()]))
    }

    /// Events seen per attached (or emitting) probe.
    pub fn events_seen(&self) -> Vec<(String, u64)> {
        ALL_PROBES
            .iter()
            .filter_map(|p| self.events_by_probe[*p as usize].get().map(|c| (p.name().to_string(), c.get())))
            .collect()
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

    /// The daemon's own metric families (everything but the per-connection ones), as one
    /// consistent snapshot of the gauges.
    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        let _guard = self.gauges_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.registry.gather()
    }
}

/// `observer_tcp_connection_duration_seconds`, registered, with its six series resolved.
fn durations(registry: &Registry) -> [[prometheus::Histogram; 2]; 3] {
    let vec = register(
        registry,
        HistogramVec::new(
            HistogramOpts::new(
                "observer_tcp_connection_duration_seconds",
                "Connection lifetimes from connect() or the SYN to CLOSE, by role and whether the connection ended prematurely.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["role", "premature"],
        )
        .expect("valid metric definition"),
    );
    let by_role = |role: Role| {
        let role = role_text(role as u8);
        [vec.with_label_values(&[role, "no"]), vec.with_label_values(&[role, "yes"])]
    };
    // Indexed by `Role as usize`: Unknown, Client, Server.
    [by_role(Role::Unknown), by_role(Role::Client), by_role(Role::Server)]
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
