//! observer: an eBPF TCP connection observer.
//!
//! One event, followed from probe to metric: the kernel programs (`observer-ebpf`) write a
//! `SocketEvent` into the ring buffer → [`daemon`] drains it → [`decode`] checks it →
//! [`classify`] decides how the connection ended → [`attribution`] names owner, role, peer and
//! port → [`aggregate`] counts it under bounded cardinality → [`metrics`] renders it and [`events`] logs it, paired with its cause → [`http`] serves both; [`container`] names the owner's container. [`probes`] loads and attaches the programs.

pub mod aggregate;
pub mod api;
pub mod attribution;
pub mod classify;
pub mod connections;
pub mod container;
pub mod daemon;
pub mod decode;
pub mod events;
pub mod exposition;
pub mod http;
pub mod metrics;
pub mod probes;
pub mod seed;

pub use observer_common::ProbeId;

pub(crate) const ALL_PROBES: [ProbeId; ProbeId::ALL.len()] = ProbeId::ALL;
