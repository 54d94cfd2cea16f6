//! The HTTP endpoint: `/metrics`, `/healthz`, `/api/v1/status`, `/api/v1/events`. It only reads
//! the [`DaemonState`]; the daemon's event path writes it.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Query, State},
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use tokio::net::TcpListener;

use crate::{
    api::{EVENTS_PATH, EventsPage, STATUS_PATH, StatusReport, TOP_PATH, TopReport},
    event_log::LOG_CAPACITY,
    exposition,
    state::DaemonState,
    top,
};

pub fn router(state: Arc<DaemonState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route(STATUS_PATH, get(status))
        .route(EVENTS_PATH, get(events))
        .route(TOP_PATH, get(top_rows))
        .with_state(state)
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    state: Arc<DaemonState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await
}

async fn metrics(State(state): State<Arc<DaemonState>>) -> impl IntoResponse {
    state.sync_kernel_counters();
    (
        [(header::CONTENT_TYPE, exposition::CONTENT_TYPE)],
        exposition::render(&state.metrics, &state.pods.snapshot(), &state.program_runs()),
    )
}

async fn healthz(State(state): State<Arc<DaemonState>>) -> impl IntoResponse {
    if state.ready() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "probes not attached yet\n")
    }
}

async fn status(State(state): State<Arc<DaemonState>>) -> Json<StatusReport> {
    Json(state.status())
}

#[derive(Debug, serde::Deserialize)]
struct EventsQuery {
    /// Only records after this sequence number.
    #[serde(default)]
    since: u64,
    /// At most this many (capped at the log's capacity).
    limit: Option<usize>,
}

async fn events(State(state): State<Arc<DaemonState>>, Query(q): Query<EventsQuery>) -> Json<EventsPage> {
    let limit = q.limit.unwrap_or(1000).min(LOG_CAPACITY);
    Json(state.event_log().page(q.since, limit))
}

#[derive(Debug, serde::Deserialize)]
struct TopQuery {
    interval: Option<String>,
    sort: Option<String>,
    limit: Option<String>,
}

/// Rates per row over `interval`; 400 naming the parameter and its allowed values.
async fn top_rows(
    State(state): State<Arc<DaemonState>>,
    Query(q): Query<TopQuery>,
) -> Result<Json<TopReport>, (StatusCode, String)> {
    let (interval, sort, limit) = top::parse_query(q.interval.as_deref(), q.sort.as_deref(), q.limit.as_deref())
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("{e}\n")))?;
    Ok(Json(state.top(interval, sort, limit)))
}

#[cfg(test)]
mod tests {
    use axum::{body::Body, http::Request};
    use proptest::prelude::*;
    use tower::ServiceExt as _;

    use super::*;
    use crate::aggregate::Limits;

    fn state() -> Arc<DaemonState> {
        Arc::new(DaemonState::new("test".into(), Limits::default(), Default::default()))
    }

    async fn get(router: Router, uri: &str) -> StatusCode {
        let request = Request::get(uri).body(Body::empty()).expect("a valid URI");
        router.oneshot(request).await.expect("the router is infallible").status()
    }

    #[tokio::test]
    async fn healthz_is_503_until_probes_attach() {
        assert_eq!(get(router(state()), "/healthz").await, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(get(router(state()), "/metrics").await, StatusCode::OK);
        assert_eq!(get(router(state()), STATUS_PATH).await, StatusCode::OK);
        assert_eq!(get(router(state()), "/nope").await, StatusCode::NOT_FOUND);
        assert_eq!(get(router(state()), "/api/v1/top?interval=2s&sort=closes&limit=5").await, StatusCode::OK);
        assert_eq!(get(router(state()), "/api/v1/top?sort=bytes").await, StatusCode::BAD_REQUEST);
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
            let status = runtime.block_on(get(router(state()), &uri.to_string()));
            prop_assert_eq!(status, expected, "{}", uri);
        }
    }
}
