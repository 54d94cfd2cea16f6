//! The JSON the daemon serves at `/api/v1/status` and `observer status` reads.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const STATUS_PATH: &str = "/api/v1/status";

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
    pub recent_premature: Vec<crate::events::EventRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProbeReport {
    pub probe: String,
    /// The logical hook it serves: `set_state`, `receive_reset`, `send_reset`, `destroy`, `accept`.
    #[serde(default)]
    pub hook: String,
    /// The back end chosen for that hook: `tracepoint` or `kprobe`.
    #[serde(default)]
    pub backend: String,
    /// `tracepoint/<category>/<name>`, `kprobe/<function>` or `kretprobe/<function>`.
    pub attach: String,
    /// `attached`, `unavailable` or `failed`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
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
