//! The HTTP endpoint: `/metrics`, `/healthz`, `/api/v1/status`, `/api/v1/events` (with
//! `follow=true`, a stream of NDJSON), `/api/v1/openapi.json`. It only reads the
//! [`DaemonState`]; the daemon's event path writes it.

use std::sync::Arc;

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::{RawQuery, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::net::TcpListener;

use crate::{
    api::{ApiError, EVENTS_PATH, OPENAPI_PATH, STATUS_PATH, StatusReport, TOP_PATH, TopReport},
    event_log::LOG_CAPACITY,
    exposition, openapi,
    query::{EventsQuery, Filter, monotonic_ns},
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
        .route(OPENAPI_PATH, get(openapi_document))
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

/// The OpenAPI 3 description of these endpoints (`crate::openapi`).
async fn openapi_document() -> Json<serde_json::Value> {
    Json(openapi::document())
}

/// `GET /api/v1/events`: a page of the event log, or with `follow=true` a stream.
async fn events(State(state): State<Arc<DaemonState>>, RawQuery(raw): RawQuery) -> Response {
    let q = match EventsQuery::parse(raw.as_deref().unwrap_or("")) {
        Ok(q) => q,
        Err(error) => return (StatusCode::BAD_REQUEST, Json(ApiError { error })).into_response(),
    };
    let filter = q.filter_at(monotonic_ns());
    if q.follow {
        return follow(state, &q, filter);
    }
    let limit = q.limit.unwrap_or(1000).min(LOG_CAPACITY);
    Json(state.event_log().query(q.after.unwrap_or(0), limit, &filter)).into_response()
}

/// `follow=true` streams opened so far, for their log lines.
static STREAMS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// At most this many `follow=true` streams at once: each polls the event log (whose lock the
/// event path takes) every [`FOLLOW_POLL`], so a client opening streams without end must not
/// slow the counting. Past it: 503, naming the cap.
pub const MAX_FOLLOW_STREAMS: usize = 64;

/// One `follow=true` stream: the records after `after` that `filter` selects, as they come.
/// Dropped (and logged) when it ends or when the client goes away: hyper drops the body then.
struct Follow {
    id: u64,
    state: Arc<DaemonState>,
    filter: Filter,
    after: u64,
    /// Records still to send (`limit`).
    remaining: Option<usize>,
    /// The stream ends here (`timeout`).
    deadline: Option<tokio::time::Instant>,
    ready: std::collections::VecDeque<Bytes>,
    sent: u64,
}

impl Drop for Follow {
    fn drop(&mut self) {
        self.state.follow_streams.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        log::info!("events stream {} closed after {} records", self.id, self.sent);
    }
}

/// How often a stream looks for new records.
const FOLLOW_POLL: std::time::Duration = std::time::Duration::from_millis(100);

fn follow(state: Arc<DaemonState>, q: &EventsQuery, filter: Filter) -> Response {
    use std::sync::atomic::Ordering;
    let open = state.follow_streams.fetch_add(1, Ordering::Relaxed);
    if open >= MAX_FOLLOW_STREAMS {
        state.follow_streams.fetch_sub(1, Ordering::Relaxed);
        let error = format!(
            "follow: {MAX_FOLLOW_STREAMS} event streams are open already, the most this daemon serves; close one, or page with after=SEQ instead of following"
        );
        return (StatusCode::SERVICE_UNAVAILABLE, Json(ApiError { error })).into_response();
    }
    // From here on the stream's Drop gives its place back.
    let after = q.after.unwrap_or_else(|| state.event_log().page(u64::MAX, 0).latest);
    let id = STREAMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    log::info!("events stream {id} opened");
    let stream = Follow {
        id,
        state,
        filter,
        after,
        remaining: q.limit,
        deadline: q.timeout.map(|t| tokio::time::Instant::now() + t),
        ready: Default::default(),
        sent: 0,
    };
    let body = futures_util::stream::unfold(stream, |mut f| async move {
        loop {
            if f.remaining == Some(0) {
                return None;
            }
            if let Some(line) = f.ready.pop_front() {
                f.sent += 1;
                f.remaining = f.remaining.map(|n| n - 1);
                return Some((Ok::<_, std::convert::Infallible>(line), f));
            }
            let now = tokio::time::Instant::now();
            if f.deadline.is_some_and(|d| now >= d) {
                return None;
            }
            let page = f.state.event_log().query(f.after, 1000, &f.filter);
            f.after = page.next;
            for record in &page.events {
                let mut line = serde_json::to_vec(record).unwrap_or_default();
                line.push(b'\n');
                f.ready.push_back(line.into());
            }
            if f.ready.is_empty() {
                let wake = f.deadline.map_or(now + FOLLOW_POLL, |d| d.min(now + FOLLOW_POLL));
                tokio::time::sleep_until(wake).await;
            }
        }
    });
    ([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(body)).into_response()
}

/// The parameters of `/api/v1/top`.
const TOP_PARAMETERS: [&str; 3] = ["interval", "sort", "limit"];

/// Rates per row over `interval`; 400 naming the parameter and its allowed values (also for
/// unknown and repeated parameters, as `/api/v1/events` answers them).
async fn top_rows(
    State(state): State<Arc<DaemonState>>,
    RawQuery(raw): RawQuery,
) -> Result<Json<TopReport>, (StatusCode, Json<ApiError>)> {
    let bad = |error: String| (StatusCode::BAD_REQUEST, Json(ApiError { error }));
    let mut given: [Option<String>; 3] = Default::default();
    for (name, value) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        let Some(i) = TOP_PARAMETERS.iter().position(|p| *p == name) else {
            return Err(bad(format!("unknown parameter {name:?}; the parameters are {}", TOP_PARAMETERS.join(", "))));
        };
        if given[i].replace(value.into_owned()).is_some() {
            return Err(bad(format!("{name}: given more than once")));
        }
    }
    let [interval, sort, limit] = &given;
    let (interval, sort, limit) =
        top::parse_query(interval.as_deref(), sort.as_deref(), limit.as_deref()).map_err(|e| bad(e.to_string()))?;
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
        assert_eq!(get(router(state()), "/api/v1/top?sort=closes&sort=closes").await, StatusCode::BAD_REQUEST);
        assert_eq!(get(router(state()), "/api/v1/top?bytes=1").await, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn follow_streams_are_capped_and_a_closed_one_frees_its_place() {
        let state = state();
        let follow = || {
            let request = Request::get("/api/v1/events?follow=true").body(Body::empty()).expect("a valid URI");
            router(state.clone()).oneshot(request)
        };
        // Held responses keep their streams open.
        let mut open = Vec::new();
        for _ in 0..MAX_FOLLOW_STREAMS {
            let response = follow().await.expect("the router is infallible");
            assert_eq!(response.status(), StatusCode::OK);
            open.push(response);
        }
        let refused = follow().await.expect("the router is infallible");
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = axum::body::to_bytes(refused.into_body(), 4096).await.expect("a short body");
        assert!(String::from_utf8_lossy(&body).contains("64 event streams are open"), "{body:?}");
        drop(open.pop());
        assert_eq!(follow().await.expect("the router is infallible").status(), StatusCode::OK);
        drop(open);
        assert_eq!(state.follow_streams.load(std::sync::atomic::Ordering::Relaxed), 0);
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
