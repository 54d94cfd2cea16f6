//! The daemon's state: what the event path writes and the HTTP endpoint reads.
//!
//! The event path ([`crate::pipeline`]) counts into [`DaemonState::metrics`] and feeds the
//! [`EventLog`]; the HTTP handlers ([`crate::http`]) only read: `/metrics` through
//! [`crate::exposition`], the status and the event log through the JSON of [`crate::api`].

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard, OnceLock},
    time::{Duration, Instant},
};

use crate::{
    REVISION, VERSION,
    aggregate::Limits,
    api::{ConfigSetting, EventsReport, ProbeReport, StatusReport, TopReport, TopSort},
    event_log::EventLog,
    metrics::Metrics,
    pods::Pods,
    probes::{
        KernelCounters, ProbeStatus,
        stats::{self, ProgramRuns},
    },
    reasons::ResetReasons,
    top::{self, Rates},
};

/// Premature closes listed in the status.
const RECENT_IN_STATUS: usize = 20;

/// Probes and what the kernel lacks, known once the programs are attached.
#[derive(Debug, Clone, Default)]
struct Probes {
    statuses: Vec<ProbeStatus>,
    degraded: Vec<String>,
    /// The daemon holds the kernel's BPF statistics on (`--probe-stats`).
    counting_runs: bool,
}

pub struct DaemonState {
    pub metrics: Metrics,
    /// Container id → pod, for the series, the gauges and the event log.
    pub pods: Arc<Pods>,
    started: Instant,
    kernel: String,
    /// Set once, when the programs are attached: the daemon is ready from then on.
    probes: OnceLock<Probes>,
    /// The programs' per-CPU counters; taken away before the programs are unloaded.
    kernel_counters: Mutex<Option<KernelCounters>>,
    event_log: Mutex<EventLog>,
    /// Per-row counts of the last minute, for `/api/v1/top` ([`Self::sample_rates`]).
    rates: Mutex<Rates>,
    /// The last copy of the aggregator's series, kept for its allocation.
    copied: Mutex<top::Copied>,
    /// The effective configuration, for the status; set once at start-up.
    config: OnceLock<BTreeMap<String, ConfigSetting>>,
    /// `follow=true` streams open now ([`crate::http`] caps them).
    pub follow_streams: std::sync::atomic::AtomicUsize,
    /// CLOCK_MONOTONIC when the event loop last began a drain that emptied the ring buffer:
    /// every event the kernel stamped before it has been handled ([`Self::drained_through`]).
    drained_through_ns: std::sync::atomic::AtomicU64,
}

impl DaemonState {
    pub fn new(kernel: String, limits: Limits, pods: Arc<Pods>) -> Self {
        Self {
            metrics: Metrics::new(limits),
            event_log: Mutex::new(EventLog::new(pods.clone())),
            pods,
            started: Instant::now(),
            kernel,
            probes: OnceLock::new(),
            kernel_counters: Mutex::new(None),
            config: OnceLock::new(),
            rates: Mutex::new(Rates::default()),
            copied: Mutex::new(Vec::new()),
            follow_streams: Default::default(),
            drained_through_ns: Default::default(),
        }
    }

    /// The event loop emptied the ring buffer in a drain it began at `ns` (CLOCK_MONOTONIC).
    pub fn set_drained_through(&self, ns: u64) {
        self.drained_through_ns.store(ns, std::sync::atomic::Ordering::Release);
    }

    /// The kernel time up to which every event has been handled: the start of the last drain
    /// that emptied the ring. Behind the clock while the event loop lags, so what waits a
    /// window of kernel time for a later event (the event log's cause pairing) keeps waiting
    /// until that event has had its chance to be handled.
    pub fn drained_through(&self) -> u64 {
        self.drained_through_ns.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Takes a tick of the per-row rates: copies the series out of the aggregator (its lock,
    /// which the event path waits for, is held for the copy only), then sums them per row.
    pub fn sample_rates(&self) {
        let mut copied = self.copied.lock().unwrap_or_else(|e| e.into_inner());
        top::copy(&self.metrics.aggregator(), &mut copied);
        let at = Instant::now();
        self.rates.lock().unwrap_or_else(|e| e.into_inner()).sample(at, &copied);
    }

    /// The rows of `/api/v1/top`.
    pub fn top(&self, interval: Duration, sort: TopSort, limit: usize) -> TopReport {
        let pods = self.pods.snapshot();
        self.rates.lock().unwrap_or_else(|e| e.into_inner()).report(interval, sort, limit, &pods)
    }

    /// The effective `observer run` configuration, each value with its source, for the status.
    pub fn set_config(&self, config: BTreeMap<String, ConfigSetting>) {
        let _ = self.config.set(config);
    }

    /// The event log (resets and premature closes, paired with their cause).
    pub fn event_log(&self) -> MutexGuard<'_, EventLog> {
        self.event_log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the daemon ready: probes attached. `counting_runs`: the daemon holds the kernel's
    /// BPF statistics on (`--probe-stats`).
    pub fn set_probes(
        &self,
        statuses: Vec<ProbeStatus>,
        degraded: Vec<String>,
        counters: KernelCounters,
        reasons: ResetReasons,
        counting_runs: bool,
    ) {
        self.metrics.set_probes(&statuses, reasons);
        *self.kernel_counters.lock().unwrap_or_else(|e| e.into_inner()) = Some(counters);
        let _ = self.probes.set(Probes { statuses, degraded, counting_runs });
    }

    /// True once the probes are attached (what `/healthz` reports).
    pub fn ready(&self) -> bool {
        self.probes.get().is_some()
    }

    /// Releases the kernel maps (before the programs are unloaded), keeping their last counts.
    pub fn clear_kernel_counters(&self) {
        self.sync_kernel_counters();
        *self.kernel_counters.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Brings the kernel's per-CPU counters (ring full, socket map full) into the metrics.
    pub fn sync_kernel_counters(&self) {
        if let Some(c) = self.kernel_counters.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            self.metrics.sync_kernel_counters(c.ring_full(), c.socket_map_full());
        }
    }

    /// The attached programs' run counters, while the kernel counts them: `--probe-stats`, or the
    /// sysctl `kernel.bpf_stats_enabled` (empty otherwise).
    pub fn program_runs(&self) -> Vec<ProgramRuns> {
        match self.probes.get() {
            Some(probes) if probes.counting_runs || stats::sysctl_on() => stats::read(&probes.statuses),
            _ => Vec::new(),
        }
    }

    pub fn status(&self) -> StatusReport {
        self.sync_kernel_counters();
        let runs = self.program_runs();
        let Probes { statuses, degraded, .. } = self.probes.get().cloned().unwrap_or_default();
        let seen_by_probe: BTreeMap<String, u64> = self.metrics.events_seen().into_iter().collect();
        let (series, series_folded) = self.metrics.series();
        let (paired, recent) = {
            let log = self.event_log();
            (log.paired(), log.recent_premature(RECENT_IN_STATUS))
        };
        StatusReport {
            version: VERSION.into(),
            revision: REVISION.into(),
            kernel: self.kernel.clone(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            ready: self.ready(),
            probes: statuses
                .into_iter()
                .map(|p| {
                    let counted = runs.iter().find(|r| r.probe == p.probe);
                    ProbeReport {
                        probe: p.probe.into(),
                        hook: p.hook.into(),
                        backend: p.backend.into(),
                        attach: p.attach,
                        state: p.state.name().into(),
                        error: p.error,
                        runs: counted.map(|r| r.runs),
                        ns_per_run: counted.and_then(ProgramRuns::ns_per_run),
                    }
                })
                .collect(),
            degraded,
            series: series as u64,
            series_folded,
            events: EventsReport {
                seen: seen_by_probe.values().sum(),
                seen_by_probe,
                lost: self.metrics.events_lost(),
                unattributed: self.metrics.events_unattributed(),
                paired,
            },
            recent_premature: recent,
            container_runtime: self.pods.report(),
            config: self.config.get().cloned().unwrap_or_default(),
        }
    }
}
