//! observer: an eBPF TCP connection observer.
//!
//! One event, followed from probe to metric, one module per step (each step only uses the ones
//! before it and the shared vocabulary below):
//!
//! 1. [`probes`] loads and attaches the kernel programs (`observer-ebpf`), which write
//!    `SocketEvent`s into a ring buffer; [`daemon`] drains it into the [`pipeline`];
//! 2. [`decode`] checks a record's bytes; with `--http`, [`exchange`] follows each connection's
//!    HTTP/1.x exchange from the message heads and gives a closed connection its verdict;
//! 3. [`classify`] decides how the connection ended;
//! 4. [`attribution`] names owner, role, peer, port and container: the series key (and tells
//!    [`pods`] of each container, which asks the container runtime for its pod);
//! 5. [`aggregate`] counts it under bounded cardinality (inside [`metrics`], which also holds
//!    the daemon's own counters), and [`event_log`] logs it, paired with its cause;
//! 6. [`exposition`] renders `/metrics`; [`http`] serves it and the JSON of [`api`] from the
//!    [`state`] the pipeline writes, and the per-row rates of [`top`].
//!
//! Beside the event path: [`connections`] reads the kernel's socket map for the state gauges,
//! [`seed`] takes the connections open at start-up from the socket table. Shared vocabulary:
//! [`series`] (series keys and label values), [`reasons`] (reset reason names), [`container`]
//! (cgroup id → cgroup path → container id), [`pods`] (container id → namespace, pod and
//! container name, from the runtime's CRI API).

pub mod aggregate;
pub mod api;
pub mod attribution;
pub mod classify;
pub mod connections;
pub mod container;
pub mod daemon;
pub mod decode;
pub mod event_log;
pub mod exchange;
pub mod exposition;
pub mod http;
pub mod metrics;
pub mod openapi;
pub mod pipeline;
pub mod pods;
pub mod probes;
pub mod query;
pub mod reasons;
pub mod seed;
pub mod series;
pub mod sock_diag;
pub mod state;
pub mod top;

pub use observer_common::ProbeId;

pub(crate) const ALL_PROBES: [ProbeId; ProbeId::ALL.len()] = ProbeId::ALL;

/// The version `observer_build_info` and the status report.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git revision this binary was built from (`unknown` outside a checkout).
pub const REVISION: &str = env!("OBSERVER_GIT_REVISION");

/// Maps on the event path: keys are attacker-chosen (peers, ports), so the hash must be seeded
/// per process, but SipHash is more than these small keys need. foldhash is both.
pub type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
