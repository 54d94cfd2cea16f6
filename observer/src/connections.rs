//! Open connections by TCP state, per process: `observer_tcp_connections` and
//! `observer_tcp_close_wait_oldest_seconds`, for leaks and pool exhaustion.
//!
//! The kernel programs already follow every socket's state (owner, role, state and since when),
//! in socket-local storage or the `SOCKETS` map ([`SocketSource`]), so the daemon reads it every
//! [`SCAN_INTERVAL`] instead of sending every state change through the ring buffer. A process
//! that never closes sockets its peers have closed shows a growing CLOSE-WAIT count and age.
//! In socket-local storage an accepted socket's entry has no owner: it comes from
//! [`AcceptedOwners`], which the scan also clears of sockets that are gone.
//!
//! Connections opened before the daemon started are in the `SEEDS` map (see [`crate::seed`])
//! until their next event moves them into `SOCKETS`; both are counted, each connection once.

use std::{
    collections::{BTreeMap, HashSet},
    os::fd::AsFd as _,
    sync::Arc,
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use observer_common::{Role, SocketInfo, tcp_state};

use crate::{
    attribution::AcceptedOwners,
    container::SharedResolver,
    pods::Pods,
    probes::SocketSource,
    series::{comm_text, role_text, tcp_state_value},
};

pub const SCAN_INTERVAL: Duration = Duration::from_secs(2);

/// (comm, role, state, container) → open sockets.
pub type ByState = BTreeMap<(String, &'static str, &'static str, String), i64>;
/// (comm, container) → seconds the oldest CLOSE-WAIT socket has waited.
pub type OldestCloseWait = BTreeMap<(String, String), f64>;

/// The kernel's per-socket state, read from user space.
pub struct SocketTable {
    sockets: SocketSource,
    /// Owners of accepted sockets, where `sockets` is socket-local storage.
    accepted: Arc<AcceptedOwners>,
    seeds: BpfHashMap<MapData, u64, SocketInfo>,
    /// The daemon's one cgroup resolver, shared with the event path.
    resolver: SharedResolver,
    /// Told of the containers the open connections belong to: a pod whose connections only
    /// pile up (a CLOSE-WAIT leak) gets named before any of them closes.
    pods: Arc<Pods>,
}

impl SocketTable {
    pub fn new(
        sockets: SocketSource,
        accepted: Arc<AcceptedOwners>,
        seeds: BpfHashMap<MapData, u64, SocketInfo>,
        resolver: SharedResolver,
        pods: Arc<Pods>,
    ) -> Self {
        Self { sockets, accepted, seeds, resolver, pods }
    }

    /// Every tracked socket's entry, owners joined. Entries that vanish while we read are
    /// skipped.
    fn tracked(&self, drained_through_ns: u64) -> Vec<SocketInfo> {
        match &self.sockets {
            SocketSource::Hash(map) => values(map),
            SocketSource::Storage { map, netns } => {
                let scan_start = Instant::now();
                let (mut infos, failures) = crate::sock_diag::read_storage(map.fd().as_fd(), *netns);
                if let Some(first) = failures.first() {
                    log::warn!(
                        "reading socket storage failed in {} network namespaces; first: {first}",
                        failures.len()
                    );
                }
                // Only a scan that read every namespace says which sockets are gone: a socket
                // in one it could not read is not.
                if failures.is_empty() {
                    let live: HashSet<u64> = infos.iter().map(|i| i.sk).collect();
                    self.accepted.gone(&live, scan_start, crate::query::monotonic_ns());
                }
                self.accepted.forget_drained(drained_through_ns);
                for info in &mut infos {
                    if info.owner.tgid == 0
                        && info.role == Role::Server as u8
                        && let Some(owner) = self.accepted.owner_of(info.sk)
                    {
                        info.owner = owner;
                    }
                }
                infos
            }
        }
    }

    /// One pass over the sockets and the seeds. `drained_through_ns`: every event the kernel
    /// stamped before this time has been handled (the owners of gone sockets can go).
    pub fn scan(&mut self, drained_through_ns: u64) -> (ByState, OldestCloseWait) {
        let now = crate::query::monotonic_ns();
        let tracked: Vec<SocketInfo> = self.tracked(drained_through_ns);
        // A connection opened while the daemon was starting can be both tracked and seeded (its
        // seed is then never adopted): count it once, by its endpoints.
        let known: std::collections::HashSet<_> = tracked.iter().map(endpoints_key).collect();
        let mut infos = tracked;
        infos.extend(values(&self.seeds).into_iter().filter(|i| !known.contains(&endpoints_key(i))));
        // Locked per lookup, not for the whole scan: the event path resolves through it too.
        let resolve = |cgroup_id| self.resolver.lock().unwrap_or_else(|e| e.into_inner()).resolve(cgroup_id);
        summarize(&infos, now, |cgroup_id| match resolve(cgroup_id) {
            Some(c) if c.id.is_some() => {
                self.pods.note(Pods::key_of(&c), &c);
                c.short_id().to_string()
            }
            _ => String::new(),
        })
    }
}

fn values(map: &BpfHashMap<MapData, u64, SocketInfo>) -> Vec<SocketInfo> {
    let mut infos = Vec::new();
    for entry in map.iter() {
        match entry {
            Ok((_, info)) => infos.push(info),
            Err(e) => log::debug!("reading a socket map: {e}"),
        }
    }
    infos
}

fn endpoints_key(info: &SocketInfo) -> ([u8; 16], u16, [u8; 16], u16) {
    let e = &info.endpoints;
    (e.local_addr, e.local_port, e.remote_addr, e.remote_port)
}

/// Counts open sockets by (comm, role, state, container) and the oldest CLOSE-WAIT per process.
pub fn summarize(
    infos: &[SocketInfo],
    now_ns: u64,
    mut container: impl FnMut(u64) -> String,
) -> (ByState, OldestCloseWait) {
    let mut by_state = ByState::new();
    let mut oldest = OldestCloseWait::new();
    for info in infos {
        // Closed sockets wait only for their destruction; listeners are not connections.
        if matches!(info.state, 0 | tcp_state::CLOSE | tcp_state::LISTEN) {
            continue;
        }
        let comm = comm_text(&info.owner.comm);
        let container = if info.owner.cgroup_id == 0 { String::new() } else { container(info.owner.cgroup_id) };
        if info.state == tcp_state::CLOSE_WAIT {
            let age = now_ns.saturating_sub(info.state_since_ns) as f64 / 1e9;
            let slot = oldest.entry((comm.clone(), container.clone())).or_insert(0.0);
            *slot = slot.max(age);
        }
        *by_state.entry((comm, role_text(info.role), tcp_state_value(info.state), container)).or_insert(0) += 1;
    }
    (by_state, oldest)
}

#[cfg(test)]
mod tests {
    use observer_common::{Owner, Role};

    use super::*;

    fn info(comm: &[u8], role: Role, state: u8, since: u64, cgroup_id: u64) -> SocketInfo {
        let mut c = [0u8; 16];
        c[..comm.len()].copy_from_slice(comm);
        SocketInfo {
            owner: Owner { comm: c, tgid: 1, cgroup_id, ..Owner::default() },
            role: role as u8,
            state,
            state_since_ns: since,
            ..SocketInfo::default()
        }
    }

    #[test]
    fn counts_by_state_and_ages_close_wait() {
        let infos = [
            info(b"leaky", Role::Server, tcp_state::CLOSE_WAIT, 1_000_000_000, 0),
            info(b"leaky", Role::Server, tcp_state::CLOSE_WAIT, 4_000_000_000, 0),
            info(b"leaky", Role::Server, tcp_state::ESTABLISHED, 0, 0),
            info(b"client", Role::Client, tcp_state::FIN_WAIT2, 0, 7),
            info(b"gone", Role::Client, tcp_state::CLOSE, 0, 0),
            info(b"", Role::Unknown, 0, 0, 0),
        ];
        let (by_state, oldest) = summarize(&infos, 11_000_000_000, |id| format!("ctr{id}"));
        assert_eq!(by_state[&("leaky".into(), "server", "close_wait", String::new())], 2);
        assert_eq!(by_state[&("leaky".into(), "server", "established", String::new())], 1);
        assert_eq!(by_state[&("client".into(), "client", "fin_wait2", "ctr7".into())], 1);
        assert_eq!(by_state.len(), 3, "closed and unknown-state sockets are not open connections");
        assert_eq!(oldest[&("leaky".into(), String::new())], 10.0);
        assert_eq!(oldest.len(), 1);
    }
}
