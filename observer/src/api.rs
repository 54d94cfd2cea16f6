//! The JSON the daemon serves under `/api/v1/` and the CLI reads: the status and the event log's
//! records. One definition for both ends.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const STATUS_PATH: &str = "/api/v1/status";
pub const EVENTS_PATH: &str = "/api/v1/events";
pub const OPENAPI_PATH: &str = "/api/v1/openapi.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    pub version: String,
    pub revision: String,
    /// `uname -r` of the node.
    pub kernel: String,
    pub uptime_seconds: f64,
    /// True once the probes are attached (what `/healthz` reports).
    pub ready: bool,
    pub probes: Vec<ProbeReport>,
    /// What the running kernel lacks that costs precision.
    pub degraded: Vec<String>,
    /// Per-connection series exported now.
    pub series: u64,
    /// Counts folded into `other` series by the cardinality caps.
    pub series_folded: u64,
    pub events: EventsReport,
    /// The latest premature closes, newest last, with their cause where it was found.
    #[serde(default)]
    pub recent_premature: Vec<EventRecord>,
    /// The container runtime observer names pods through.
    #[serde(default)]
    pub container_runtime: RuntimeReport,
    /// The effective `observer run` configuration: every option, by its `--config` file key.
    #[serde(default)]
    pub config: BTreeMap<String, ConfigSetting>,
}

/// One `observer run` option as the daemon runs with it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ConfigSetting {
    /// As given (or the default's text); absent for an option that is not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Where it came from: `default`, `file`, `env` or `flag` (flag > env > file > default).
    pub source: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProbeReport {
    pub probe: String,
    /// The logical hook it serves: `set_state`, `receive_reset`, `send_reset`, `destroy`, `accept`.
    #[serde(default)]
    pub hook: String,
    /// The back end chosen for that hook: `btf`, `tracepoint` or `kprobe`.
    #[serde(default)]
    pub backend: String,
    /// `tp_btf/<name>`, `tracepoint/<category>/<name>`, `kprobe/<function>` or
    /// `kretprobe/<function>`.
    pub attach: String,
    /// `attached`, `unavailable` or `failed`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Runs of the program since it was loaded, while the kernel counts them (`--probe-stats`
    /// or `kernel.bpf_stats_enabled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runs: Option<u64>,
    /// Mean nanoseconds per run over those runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ns_per_run: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EventsReport {
    /// Events received from the kernel.
    pub seen: u64,
    pub seen_by_probe: BTreeMap<String, u64>,
    /// Events dropped in the kernel because the ring buffer was full.
    pub lost: u64,
    /// Events about sockets whose owner is unknown.
    pub unattributed: u64,
    /// Event-log records that name their cause (the other end's process and reason).
    #[serde(default)]
    pub paired: u64,
}

/// The runtime's state, for `/api/v1/status` and `observer status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RuntimeReport {
    /// `connected`, `unreachable` (configured, not answering) or `none` (no socket found).
    pub state: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub socket: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub runtime: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
    /// The latest error, while unreachable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Containers seen in socket owners' cgroups, and how many of them the runtime named.
    pub containers: u64,
    pub pods_named: u64,
}

/// A socket owner's container and pod, as the series' labels name them; every field is empty
/// on the host, and the pod's when the container runtime did not name it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PodLabels {
    /// The runtime's short container id (12 hex digits), from the owner's cgroup.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub container_id: String,
    /// From the container runtime (the kubelet's labels).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod: String,
    /// The container's name in its pod.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub container: String,
}

/// Who caused a reset or premature close: the other end of the connection, on this node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Cause {
    /// The process that sent the RST, or that closed the connection first; empty for a reset
    /// answering a segment that matched no socket (nothing listens: `reason` `no_socket`).
    pub comm: String,
    pub pid: u32,
    /// The sender's container and pod.
    #[serde(flatten)]
    pub owner: PodLabels,
    /// The kernel's reason on the sending side; `fin` when the other end closed first (its FIN)
    /// rather than by a reset.
    pub reason: String,
    /// `reset by backend[4711]: tcp_abort_on_close`, `closed by backend[4711], before any
    /// response`.
    pub summary: String,
}

/// One record of the event log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EventRecord {
    /// Increases by one per record; `/api/v1/events?after=SEQ` returns the later ones.
    pub seq: u64,
    /// Kernel monotonic clock (ns) at the event.
    pub timestamp_ns: u64,
    /// The same instant as RFC 3339 UTC wall time (`2026-12-02T01:53:38.123456Z`), from
    /// CLOCK_REALTIME − CLOCK_MONOTONIC when the record is served.
    #[serde(default)]
    pub time: String,
    /// `reset_received`, `reset_sent` or `closed`.
    pub event: String,
    /// For `closed`: the premature kind (`peer_reset`, `eof_before_response`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// For `reset_sent`: the kernel's reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub comm: String,
    pub pid: u32,
    pub role: String,
    /// The owner's container and pod.
    #[serde(flatten)]
    pub owner: PodLabels,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cgroup: String,
    pub local: String,
    pub remote: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub facts: Option<Facts>,
    /// `--http`: where in the HTTP/1.x exchange a `closed` connection ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpExchange>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<Cause>,
}

/// Where in its HTTP/1.x exchange a connection ended (`--http`), from this end's view.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HttpExchange {
    /// `no_request`, `in_request`, `awaiting_response`, `in_response_headers`,
    /// `in_response_body`, `idle_keepalive` or `complete`.
    pub stage: String,
    /// `client` (this end sent the requests) or `server`.
    pub side: String,
    /// Requests seen on the connection.
    pub requests: u32,
    /// The last request's method and path (at most 64 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The last final response's status code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// `in_response_body` / `in_request`: the body's `Content-Length`, and the body bytes that
    /// crossed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub declared_body_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transferred_body_bytes: Option<u64>,
    /// `idle_keepalive` while truly idle: how long since the last byte.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_seconds: Option<f64>,
    /// `ended in the 200 response to GET /orders: received 8 of 100 body bytes`.
    pub summary: String,
}

/// Per-connection facts of a `closed` record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Facts {
    pub duration_seconds: f64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub srtt_us: u32,
    pub retransmits: u32,
    /// The state the connection left for CLOSE.
    pub final_state: String,
    /// `local` (this side sent the first FIN), `peer`, `reset`, `timeout` or `unknown`.
    pub close_initiator: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EventsPage {
    /// Pass as `after` to get what comes after this page.
    pub next: u64,
    /// Sequence number of the newest record in the log (0: none yet).
    pub latest: u64,
    pub events: Vec<EventRecord>,
}

pub const TOP_PATH: &str = "/api/v1/top";

/// What `/api/v1/top` sorts its rows by (`sort=`), highest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TopSort {
    #[default]
    ResetsIn,
    ResetsOut,
    Premature,
    Closes,
    Opened,
}

impl TopSort {
    pub const ALL: [Self; 5] = [Self::ResetsIn, Self::ResetsOut, Self::Premature, Self::Closes, Self::Opened];

    /// The `sort=` value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::ResetsIn => "resets_in",
            Self::ResetsOut => "resets_out",
            Self::Premature => "premature",
            Self::Closes => "closes",
            Self::Opened => "opened",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The allowed values, for error messages: `resets_in, resets_out, premature, closes, opened`.
    pub fn allowed() -> String {
        Self::ALL.map(Self::as_str).join(", ")
    }

    /// The rate of `row` this sorts by.
    pub fn rate(self, row: &TopRow) -> f64 {
        match self {
            Self::ResetsIn => row.resets_in_per_s,
            Self::ResetsOut => row.resets_out_per_s,
            Self::Premature => row.premature_per_s,
            Self::Closes => row.closes_per_s,
            Self::Opened => row.opened_per_s,
        }
    }
}

/// `/api/v1/top`: per row (a series' labels less its family's own), the rates of the
/// per-connection families over the last `window_seconds`, computed by the daemon.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TopReport {
    /// The interval asked for.
    pub interval_seconds: f64,
    /// What the rates are over: the interval rounded up to the daemon's 1 s snapshots, less
    /// while the daemon is younger (0: no two snapshots yet, no rates).
    pub window_seconds: f64,
    /// `resets_in`, `resets_out`, `premature`, `closes` or `opened`.
    pub sort: String,
    /// Rows that counted anything in the window, before `limit`.
    pub total_rows: u64,
    pub rows: Vec<TopRow>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TopRow {
    pub comm: String,
    /// The owner's container and pod.
    #[serde(flatten)]
    pub owner: PodLabels,
    pub role: String,
    pub peer: String,
    pub port: String,
    /// RSTs received (`observer_tcp_resets_received_total`) per second.
    pub resets_in_per_s: f64,
    /// RSTs sent, every reason summed (`observer_tcp_resets_sent_total`).
    pub resets_out_per_s: f64,
    /// Premature closes, every kind summed (`observer_tcp_premature_closes_total`).
    pub premature_per_s: f64,
    /// Per kind that counted in the window.
    #[serde(default)]
    pub premature_by_kind: BTreeMap<String, f64>,
    /// Connections closed (`observer_tcp_closes_total`).
    pub closes_per_s: f64,
    /// Connections opened (`observer_tcp_connections_opened_total`): connect() attempts and
    /// accepted connections. A retry storm shows here first.
    #[serde(default)]
    pub opened_per_s: f64,
}

/// The answer to a request the API refuses (HTTP 400): what is wrong, naming the parameter and
/// what it allows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ApiError {
    pub error: String,
}
