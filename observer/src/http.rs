//! The HTTP endpoint: `/metrics`, `/healthz`, `/api/v1/status`.

use std::{
    sync::{Arc, Mutex, OnceLock},
    time::Instant,
};

use axum::{
    Json, Router,
    extract::{Query, State},
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use tokio::net::TcpListener;

use crate::{
    api::{EventsReport, ProbeReport, STATUS_PATH, StatusReport},
    classify::Outcome,
    container::Container,
    decode::Event,
    events::{EVENTS_PATH, EventLog, EventsPage},
    metrics::{Limits, Metrics, REVISION, VERSION},
    probes::{KernelCounters, ProbeStatus, btf::ResetReasons},
};

/// State shared by the event loop and the HTTP handlers.
pub struct Shared {
    pub metrics: Metrics,
    started: Instant,
    kernel: String,
    probes: OnceLock<(Vec<ProbeStatus>, Vec<String>)>,
    kernel_counters: Mutex<Option<KernelCounters>>,
    events: Mutex<EventLog>,
}

impl Shared {
    pub fn new(kernel: String, limits: Limits) -> Self {
        Self {
            metrics: Metrics::new(limits),
            started: Instant::now(),
            kernel,
            probes: OnceLock::new(),
            kernel_counters: Mutex::new(None),
            events: Mutex::new(EventLog::default()),
        }
    }

    fn event_log(&self) -> std::sync::MutexGuard<'_, EventLog> {
        self.events.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds an event to the event log (`/api/v1/events`).
    pub fn record_event(&self, event: &Event, outcome: Outcome, reasons: &ResetReasons, container: Option<&Arc<Container>>) {
        self.event_log().record(event, outcome, reasons, container);
    }

    /// Marks the daemon ready: probes attached.
    pub fn set_probes(&self, statuses: Vec<ProbeStatus>, degraded: Vec<String>, counters: KernelCounters, reasons: ResetReasons) {
        self.metrics.set_probes(&statuses, reasons);
        *self.kernel_counters.lock().unwrap_or_else(|e| e.into_inner()) = Some(counters);
        let _ = self.probes.set((statuses, degraded));
    }

    /// Releases the kernel maps (before the programs are unloaded).
    pub fn clear_kernel_counters(&self) {
        self.sync_kernel_counters();
        *self.kernel_counters.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn sync_kernel_counters(&self) {
        if let Some(c) = self.kernel_counters.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            self.metrics.sync_kernel_counters(c.ring_full(), c.socket_map_full());
        }
    }

    pub fn status(&self) -> StatusReport {
        self.sync_kernel_counters();
        let (probes, degraded) = self.probes.get().cloned().unwrap_or_default();
        let seen_by_probe: std::collections::BTreeMap<String, u64> = self.metrics.events_seen().into_iter().collect();
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
            ready: self.probes.get().is_some(),
            probes: probes
                .into_iter()
                .map(|p| ProbeReport {
                    probe: p.probe.into(),
                    hook: p.hook.into(),
                    backend: p.backend.into(),
                    attach: p.attach,
                    state: p.state.into(),
                    error: p.error,
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
        }
    }
}

/// Premature closes listed in the status.
const RECENT_IN_STATUS: usize = 20;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route(STATUS_PATH, get(status))
        .route(EVENTS_PATH, get(events))
        .with_state(shared)
}

/// Serves until `shutdown` resolves.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
    axum::serve(listener, router(shared)).with_graceful_shutdown(shutdown).await
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    shared.sync_kernel_counters();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], shared.metrics.render())
}

async fn healthz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    if shared.probes.get().is_some() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "probes not attached yet\n")
    }
}

async fn status(State(shared): State<Arc<Shared>>) -> Json<StatusReport> {
    Json(shared.status())
}

#[derive(Debug, serde::Deserialize)]
struct EventsQuery {
    /// Only records after this sequence number.
    #[serde(default)]
    since: u64,
    /// At most this many (capped at the log's capacity).
    limit: Option<usize>,
}

async fn events(State(shared): State<Arc<Shared>>, Query(q): Query<EventsQuery>) -> Json<EventsPage> {
    let limit = q.limit.unwrap_or(1000).min(crate::events::LOG_CAPACITY);
    Json(shared.event_log().page(q.since, limit))
}

#[cfg(test)]
mod tests {
    use axum::{body::Body, http::Request};
    use proptest::prelude::*;
    use tower::ServiceExt as _;

    use super::*;

    fn shared() -> Arc<Shared> {
        Arc::new(Shared::new("test".into(), Limits::default()))
    }

    async fn get(router: Router, uri: &str) -> StatusCode {
        let request = Request::get(uri).body(Body::empty()).expect("a valid URI");
        router.oneshot(request).await.expect("the router is infallible").status()
    }

    #[tokio::test]
    async fn healthz_is_503_until_probes_attach() {
        assert_eq!(get(router(shared()), "/healthz").await, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(get(router(shared()), "/metrics").await, StatusCode::OK);
        assert_eq!(get(router(shared()), STATUS_PATH).await, StatusCode::OK);
        assert_eq!(get(router(shared()), "/nope").await, StatusCode::NOT_FOUND);
    }

    proptest! {
        /// Whatever query string a peer sends, every endpoint answers as it would without one.
        #[test]
        fn arbitrary_query_strings_are_ignored(
            query in "[ -~]{0,200}",
            (path, expected) in prop::sample::select(vec![
                ("/metrics", StatusCode::OK),
                ("/healthz", StatusCode::SERVICE_UNAVAILABLE), // no probes in a unit test
                (STATUS_PATH, StatusCode::OK),
                ("/", StatusCode::NOT_FOUND),
            ]),
        ) {
            // Only what the http crate accepts as a URI reaches a handler; hyper refuses the rest.
            let encoded: String = query.chars().map(|c| if c == ' ' || c == '#' { '+' } else { c }).collect();
            let uri = format!("{path}?{encoded}");
            let Ok(uri) = uri.parse::<axum::http::Uri>() else { return Ok(()) };
            let runtime = tokio::runtime::Builder::new_current_thread().build().expect("a runtime");
            let status = runtime.block_on(get(router(shared()), &uri.to_string()));
            prop_assert_eq!(status, expected, "{}", uri);
        }
    }
}
