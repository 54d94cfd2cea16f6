//! The OpenAPI 3 description of the HTTP endpoint, served at `/api/v1/openapi.json`.
//!
//! Written by hand as one `json!` document rather than derived (utoipa): the API is four
//! routes and a handful of types, the query parameters are parsed by hand (`crate::query`,
//! for its error messages) so a derive would describe them separately anyway, and a derive
//! crate would add proc-macro build time to every build for little. The unit tests below keep
//! it in sync: every documented path is served, and real records, pages and statuses carry
//! exactly the properties the schemas list, with their required ones. The fuzz test
//! (`observer/tests/api`) checks real answers against it.

use serde_json::{Value, json};

use crate::{
    api::TopSort,
    query::{KINDS, PARAMETERS},
};

fn string() -> Value {
    json!({ "type": "string" })
}

fn count() -> Value {
    json!({ "type": "integer", "minimum": 0 })
}

fn query_param(name: &str, description: &str, schema: Value) -> Value {
    json!({ "name": name, "in": "query", "required": false, "description": description, "schema": schema })
}

fn bad_request() -> Value {
    json!({
        "description": "A bad parameter, named with what it allows.",
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ApiError" } } }
    })
}

/// The pod labels flattened into records and causes.
fn pod_properties() -> serde_json::Map<String, Value> {
    ["container_id", "namespace", "pod", "container"].iter().map(|k| (k.to_string(), string())).collect()
}

fn with_pod(mut properties: serde_json::Map<String, Value>) -> Value {
    properties.extend(pod_properties());
    Value::Object(properties)
}

pub fn document() -> Value {
    let rate = || json!({ "type": "number", "minimum": 0 });
    let mut top_properties: serde_json::Map<String, Value> = [
        ("comm", string()),
        ("role", string()),
        ("peer", string()),
        ("port", string()),
        ("resets_in_per_s", rate()),
        ("resets_out_per_s", rate()),
        ("premature_per_s", rate()),
        ("premature_by_kind", json!({ "type": "object", "additionalProperties": rate() })),
        ("closes_per_s", rate()),
        ("opened_per_s", rate()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    top_properties.extend(pod_properties());
    let top_row = json!({
        "type": "object",
        "required": ["comm", "role", "peer", "port", "resets_in_per_s", "resets_out_per_s", "premature_per_s", "closes_per_s", "opened_per_s"],
        "properties": top_properties
    });
    let duration = json!({ "type": "string", "pattern": "^([0-9]+ ?[a-zA-Zµ]+ ?)+$", "example": "5m" });
    let parameters = vec![
        query_param("after", "Only records with a greater `seq` (the `next` of the previous page).", count()),
        query_param(
            "since",
            "A duration (`30s`, `5m`, `1h`): only records of that last span. A bare number is the sequence cursor of earlier versions, as `after`.",
            json!({ "oneOf": [duration.clone(), count()] }),
        ),
        query_param(
            "limit",
            "At most this many records (at most 4096); with `follow`, end after this many.",
            json!({ "type": "integer", "minimum": 1 }),
        ),
        query_param(
            "comm",
            "Only records of this process name.",
            json!({ "type": "string", "minLength": 1, "maxLength": 15 }),
        ),
        query_param(
            "pid",
            "Only records of this process id.",
            json!({ "type": "integer", "minimum": 0, "maximum": u32::MAX }),
        ),
        query_param(
            "peer",
            "Only records whose `remote` address is this address or in this CIDR block (IPv4 or IPv6).",
            json!({ "type": "string", "example": "10.0.0.0/8" }),
        ),
        query_param(
            "port",
            "Only records of this service port: the remote port of a client, the local port of a server, either when the role is unknown.",
            json!({ "type": "integer", "minimum": 1, "maximum": 65535 }),
        ),
        json!({
            "name": "kind", "in": "query", "required": false, "style": "form", "explode": true,
            "description": "Only records of these kinds (repeatable, or comma-separated): a premature kind, `reset_received` or `reset_sent`.",
            "schema": { "type": "array", "items": { "type": "string", "enum": KINDS } }
        }),
        query_param(
            "follow",
            "Stream matching records as they come, one JSON object per line (`application/x-ndjson`), until the client goes away.",
            json!({ "type": "boolean" }),
        ),
        query_param("timeout", "With `follow`: end the stream after this long.", duration.clone()),
    ];
    debug_assert_eq!(parameters.len(), PARAMETERS.len());
    let record_properties: serde_json::Map<String, Value> = serde_json::from_value(json!({
        "seq": count(),
        "timestamp_ns": count(),
        "time": { "type": "string", "format": "date-time" },
        "event": { "type": "string", "enum": ["reset_received", "reset_sent", "closed"] },
        "kind": { "type": "string", "enum": &KINDS[..9] },
        "reason": string(),
        "comm": string(),
        "pid": count(),
        "role": { "type": "string", "enum": ["client", "server", ""] },
        "cgroup": string(),
        "local": string(),
        "remote": string(),
        "facts": { "$ref": "#/components/schemas/Facts" },
        "http": { "$ref": "#/components/schemas/HttpExchange" },
        "cause": { "$ref": "#/components/schemas/Cause" },
    }))
    .unwrap_or_default();
    let cause_properties: serde_json::Map<String, Value> = serde_json::from_value(json!({
        "comm": string(), "pid": count(), "reason": string(), "summary": string(),
    }))
    .unwrap_or_default();
    let mut record = json!({
        "type": "object",
        "description": "One event-log record. Stable: fields are only ever added.",
        "required": ["seq", "timestamp_ns", "time", "event", "comm", "pid", "role", "local", "remote"],
    });
    record["properties"] = with_pod(record_properties);
    let mut cause = json!({ "type": "object", "required": ["comm", "pid", "reason", "summary"] });
    cause["properties"] = with_pod(cause_properties);
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "observer",
            "version": crate::VERSION,
            "description": "eBPF TCP connection observer: metrics, health, status and the event log of resets and premature closes.",
        },
        "paths": {
            "/metrics": { "get": {
                "operationId": "metrics",
                "summary": "Prometheus text format.",
                "responses": { "200": { "description": "The metrics.", "content": { "text/plain": { "schema": string() } } } }
            }},
            "/healthz": { "get": {
                "operationId": "healthz",
                "summary": "Ready once the probes are attached.",
                "responses": {
                    "200": { "description": "Ready.", "content": { "text/plain": { "schema": string() } } },
                    "503": { "description": "Probes not attached yet.", "content": { "text/plain": { "schema": string() } } }
                }
            }},
            "/api/v1/status": { "get": {
                "operationId": "status",
                "summary": "Probes, event counts, the container runtime and the latest premature closes.",
                "responses": { "200": { "description": "The status.", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/StatusReport" } } } } }
            }},
            "/api/v1/events": { "get": {
                "operationId": "events",
                "summary": "The event log (the latest 4096 resets and premature closes), filtered; with follow=true a stream.",
                "parameters": parameters,
                "responses": {
                    "200": {
                        "description": "A page of records, oldest first; with `follow=true`, one EventRecord per line.",
                        "content": {
                            "application/json": { "schema": { "$ref": "#/components/schemas/EventsPage" } },
                            "application/x-ndjson": { "schema": { "$ref": "#/components/schemas/EventRecord" } }
                        }
                    },
                    "400": bad_request(),
                    "503": {
                        "description": "follow=true while the most streams the daemon serves at once (64) are open.",
                        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ApiError" } } }
                    }
                }
            }},
            "/api/v1/openapi.json": { "get": {
                "operationId": "openapi",
                "summary": "This document.",
                "responses": { "200": { "description": "OpenAPI 3.", "content": { "application/json": { "schema": { "type": "object" } } } } }
            }},
            "/api/v1/top": { "get": {
                "operationId": "top",
                "summary": "Rates per row (process, pod, role, peer, port) that the daemon computes from its own counts.",
                "parameters": [
                    query_param("interval", "The rates' interval, 1s to 60s (default 2s).", duration.clone()),
                    query_param("sort", "What the rows are sorted by, highest first (default resets_in).", json!({ "type": "string", "enum": TopSort::ALL.map(TopSort::as_str) })),
                    query_param("limit", "At most this many rows (1 to 10000, default 100).", json!({ "type": "integer", "minimum": 1, "maximum": 10000 }))
                ],
                "responses": {
                    "200": { "description": "The rows.", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/TopReport" } } } },
                    "400": bad_request()
                }
            }},
        },
        "components": { "schemas": {
            "ApiError": { "type": "object", "required": ["error"], "properties": { "error": string() } },
            "EventsPage": {
                "type": "object",
                "required": ["next", "latest", "events"],
                "properties": {
                    "next": { "type": "integer", "minimum": 0, "description": "Pass as `after` for the next page." },
                    "latest": { "type": "integer", "minimum": 0, "description": "The newest `seq` in the log (0: none)." },
                    "events": { "type": "array", "items": { "$ref": "#/components/schemas/EventRecord" } }
                }
            },
            "EventRecord": record,
            "Cause": cause,
            "Facts": {
                "type": "object",
                "required": ["duration_seconds", "bytes_received", "bytes_sent", "srtt_us", "retransmits", "final_state", "close_initiator"],
                "properties": {
                    "duration_seconds": { "type": "number", "minimum": 0 },
                    "bytes_received": count(), "bytes_sent": count(), "srtt_us": count(), "retransmits": count(),
                    "final_state": string(),
                    "close_initiator": { "type": "string", "enum": ["local", "peer", "reset", "timeout", "unknown"] }
                }
            },
            "HttpExchange": {
                "type": "object",
                "description": "`--http`: where in the HTTP/1.x exchange a closed connection ended, from this end's view.",
                "required": ["stage", "side", "requests", "summary"],
                "properties": {
                    "stage": { "type": "string", "enum": crate::exchange::Stage::ALL.map(crate::exchange::Stage::label) },
                    "side": { "type": "string", "enum": ["client", "server"] },
                    "requests": count(),
                    "method": string(), "path": string(),
                    "status": { "type": "integer", "minimum": 100, "maximum": 999 },
                    "declared_body_bytes": count(), "transferred_body_bytes": count(),
                    "idle_seconds": { "type": "number", "minimum": 0 },
                    "summary": string()
                }
            },
            "StatusReport": {
                "type": "object",
                "required": ["version", "revision", "kernel", "uptime_seconds", "ready", "probes", "degraded", "series", "series_folded", "events"],
                "properties": {
                    "version": string(), "revision": string(), "kernel": string(),
                    "uptime_seconds": { "type": "number", "minimum": 0 },
                    "ready": { "type": "boolean" },
                    "probes": { "type": "array", "items": { "$ref": "#/components/schemas/ProbeReport" } },
                    "degraded": { "type": "array", "items": string() },
                    "series": count(), "series_folded": count(),
                    "events": { "$ref": "#/components/schemas/EventsReport" },
                    "recent_premature": { "type": "array", "items": { "$ref": "#/components/schemas/EventRecord" } },
                    "container_runtime": { "$ref": "#/components/schemas/RuntimeReport" },
                    "config": { "type": "object", "additionalProperties": { "$ref": "#/components/schemas/ConfigSetting" } }
                }
            },
            "ConfigSetting": {
                "type": "object",
                "required": ["source"],
                "properties": {
                    "value": string(),
                    "source": { "type": "string", "enum": ["default", "file", "env", "flag"] }
                }
            },
            "TopReport": {
                "type": "object",
                "required": ["interval_seconds", "window_seconds", "sort", "total_rows", "rows"],
                "properties": {
                    "interval_seconds": { "type": "number", "minimum": 0 },
                    "window_seconds": { "type": "number", "minimum": 0 },
                    "sort": { "type": "string", "enum": TopSort::ALL.map(TopSort::as_str) },
                    "total_rows": count(),
                    "rows": { "type": "array", "items": { "$ref": "#/components/schemas/TopRow" } }
                }
            },
            "TopRow": top_row,
            "ProbeReport": {
                "type": "object",
                "required": ["probe", "hook", "backend", "attach", "state"],
                "properties": {
                    "probe": string(), "hook": string(), "backend": string(), "attach": string(),
                    "state": { "type": "string", "enum": ["attached", "unavailable", "failed"] },
                    "error": string(), "runs": count(), "ns_per_run": { "type": "number" }
                }
            },
            "EventsReport": {
                "type": "object",
                "required": ["seen", "seen_by_probe", "lost", "unattributed", "paired"],
                "properties": {
                    "seen": count(),
                    "seen_by_probe": { "type": "object", "additionalProperties": count() },
                    "lost": count(), "unattributed": count(), "paired": count()
                }
            },
            "RuntimeReport": {
                "type": "object",
                "required": ["state", "containers", "pods_named"],
                "properties": {
                    "state": { "type": "string", "enum": ["connected", "unreachable", "none"] },
                    "socket": string(), "runtime": string(), "version": string(), "error": string(),
                    "containers": count(), "pods_named": count()
                }
            }
        }}
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::{body::Body, http::Request};
    use tower::ServiceExt as _;

    use super::*;
    use crate::{
        aggregate::Limits,
        api::{Cause, EventRecord, EventsPage, Facts, HttpExchange, PodLabels},
        state::DaemonState,
    };

    /// Every property of `value` is one `schema` lists, and every required one is there.
    fn conforms(doc: &Value, schema: &str, value: &Value) -> Result<(), String> {
        let s = &doc["components"]["schemas"][schema];
        let properties = s["properties"].as_object().ok_or(format!("{schema} has no properties"))?;
        let object = value.as_object().ok_or(format!("{schema}: not an object: {value}"))?;
        for key in object.keys() {
            if !properties.contains_key(key) {
                return Err(format!("{schema}: `{key}` is not described"));
            }
        }
        for key in s["required"].as_array().into_iter().flatten().filter_map(Value::as_str) {
            if !object.contains_key(key) {
                return Err(format!("{schema}: required `{key}` missing from {value}"));
            }
        }
        Ok(())
    }

    fn full_record() -> EventRecord {
        let pod = PodLabels { container_id: "c".into(), namespace: "n".into(), pod: "p".into(), container: "k".into() };
        EventRecord {
            seq: 1,
            timestamp_ns: 2,
            time: "2026-01-01T00:00:00Z".into(),
            event: "closed".into(),
            kind: Some("peer_reset".into()),
            reason: Some("tcp_state".into()),
            comm: "a".into(),
            pid: 3,
            role: "client".into(),
            owner: pod.clone(),
            cgroup: "/x".into(),
            local: "1.2.3.4:5".into(),
            remote: "5.6.7.8:9".into(),
            facts: Some(Facts {
                duration_seconds: 0.5,
                bytes_received: 1,
                bytes_sent: 2,
                srtt_us: 3,
                retransmits: 4,
                final_state: "ESTABLISHED".into(),
                close_initiator: "reset".into(),
            }),
            http: Some(HttpExchange {
                stage: "in_response_body".into(),
                side: "client".into(),
                requests: 2,
                method: Some("GET".into()),
                path: Some("/orders".into()),
                status: Some(200),
                declared_body_bytes: Some(100),
                transferred_body_bytes: Some(8),
                idle_seconds: Some(0.5),
                summary: "s".into(),
            }),
            cause: Some(Cause { comm: "b".into(), pid: 4, owner: pod, reason: "r".into(), summary: "s".into() }),
        }
    }

    #[test]
    fn the_types_carry_exactly_the_described_properties() {
        let doc = document();
        let record = serde_json::to_value(full_record()).expect("serializable");
        conforms(&doc, "EventRecord", &record).expect("record");
        conforms(&doc, "Cause", &record["cause"]).expect("cause");
        conforms(&doc, "Facts", &record["facts"]).expect("facts");
        conforms(&doc, "HttpExchange", &record["http"]).expect("http");
        let page = serde_json::to_value(EventsPage { next: 1, latest: 1, events: vec![full_record()] }).expect("page");
        conforms(&doc, "EventsPage", &page).expect("page");
        // Every field of the record is described, none more: the document lists no property
        // the record lacks.
        let described = doc["components"]["schemas"]["EventRecord"]["properties"].as_object().expect("props").len();
        assert_eq!(described, record.as_object().expect("object").len());
        let state = DaemonState::new("k".into(), Limits::default(), Default::default());
        let status = serde_json::to_value(state.status()).expect("status");
        conforms(&doc, "StatusReport", &status).expect("status");
        conforms(&doc, "EventsReport", &status["events"]).expect("events report");
        conforms(&doc, "RuntimeReport", &status["container_runtime"]).expect("runtime");
        let names: Vec<&str> = doc["paths"]["/api/v1/events"]["get"]["parameters"]
            .as_array()
            .expect("parameters")
            .iter()
            .filter_map(|p| p["name"].as_str())
            .collect();
        assert_eq!(names, PARAMETERS);
    }

    #[tokio::test]
    async fn every_described_path_is_served() {
        let state = Arc::new(DaemonState::new("k".into(), Limits::default(), Default::default()));
        let doc = document();
        for path in doc["paths"].as_object().expect("paths").keys() {
            let request = Request::get(path.as_str()).body(Body::empty()).expect("a request");
            let status = crate::http::router(state.clone()).oneshot(request).await.expect("infallible").status();
            assert_ne!(status, axum::http::StatusCode::NOT_FOUND, "{path}");
        }
    }
}
