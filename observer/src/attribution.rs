//! Who and with whom: the third step of an event's path (after [`crate::decode`] and
//! [`crate::classify`]). It turns an event's owner, role, endpoints and cgroup into one value,
//! [`Attributed`]: the series key the event counts under (no strings on the event path), the
//! owner's container identity, and whether the owner is unknown.

use std::{
    collections::HashMap,
    fs,
    ops::RangeInclusive,
    sync::{Arc, Mutex},
    time::Instant,
};

use observer_common::{EventKind, Owner, Role, SocketEvent, flags};

use crate::{
    container::{Container, SharedResolver},
    decode::Event,
    pods::Pods,
    series::{ContainerKey, NO_CONTAINER, Peer, Port, SeriesKey, container_key},
};

/// What attribution found out about one event.
#[derive(Debug, Clone)]
pub struct Attributed {
    /// The series the event counts under; `detail` is 0 (each family sets its extra label).
    pub key: SeriesKey,
    /// The owner's cgroup and container id; `None` when the cgroup is unknown.
    pub container: Option<Arc<Container>>,
    /// The event is about a socket whose owner is unknown (the socket predates the daemon, or
    /// was accepted by a path the programs do not see). Resets answering a segment that matched
    /// no socket belong to no process by nature and are not unattributed.
    pub unattributed: bool,
}

/// Turns events into [`Attributed`] values. Knows the local ephemeral port range, so that
/// ephemeral ports never become label values, and resolves owners' cgroups through the
/// daemon's one [`SharedResolver`].
#[derive(Debug, Clone)]
pub struct Attribution {
    ephemeral: RangeInclusive<u16>,
    resolver: SharedResolver,
    /// Told of every container an event comes from, so that its pod gets named.
    pods: Arc<Pods>,
}

impl Attribution {
    pub fn new(ephemeral: RangeInclusive<u16>, resolver: SharedResolver, pods: Arc<Pods>) -> Self {
        Self { ephemeral, resolver, pods }
    }

    /// With this host's ephemeral port range (`net.ipv4.ip_local_port_range`).
    pub fn for_host(resolver: SharedResolver, pods: Arc<Pods>) -> Self {
        Self::new(Self::read_ephemeral_range().unwrap_or(32768..=60999), resolver, pods)
    }

    /// `net.ipv4.ip_local_port_range` of this host.
    fn read_ephemeral_range() -> Option<RangeInclusive<u16>> {
        let text = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
        let mut it = text.split_whitespace().map(|v| v.parse::<u16>());
        let (Some(Ok(lo)), Some(Ok(hi))) = (it.next(), it.next()) else { return None };
        Some(lo..=hi)
    }

    /// Who owns the event's socket, in which container, and the series it counts under.
    pub fn attribute(&self, event: &Event) -> Attributed {
        let raw = &event.raw;
        let container = match raw.owner.cgroup_id {
            // No cgroup to resolve: the lock is not worth taking.
            0 => None,
            id => self.resolver.lock().unwrap_or_else(|e| e.into_inner()).resolve(id),
        };
        let container_key = match &container {
            Some(c) if c.id.is_some() => {
                let key = container_key(c.short_id());
                self.pods.note(key, c);
                key
            }
            _ => NO_CONTAINER,
        };
        Attributed { key: self.key(raw, container_key), container, unattributed: raw.owner.tgid == 0 && raw.sk != 0 }
    }

    /// The series an event counts under; `container` is the owner's short container id.
    fn key(&self, ev: &SocketEvent, container: ContainerKey) -> SeriesKey {
        let e = &ev.endpoints;
        let port = match Role::from_u8(ev.role) {
            Role::Client => Some(e.remote_port),
            Role::Server => Some(e.local_port),
            // No owner to ask (a no-socket reset, a socket from before start-up): the side that
            // is not ephemeral is the service, the local one first (a no-socket RST answers a
            // segment sent to a local port).
            Role::Unknown => [e.local_port, e.remote_port].into_iter().find(|p| *p != 0 && !self.ephemeral.contains(p)),
        };
        SeriesKey {
            comm: ev.owner.comm,
            role: ev.role,
            peer: Peer::Addr(e.remote_addr),
            port: port.filter(|p| *p != 0).map_or(Port::None, Port::Num),
            container,
            detail: 0,
        }
    }
}

/// Accepted sockets whose owner the kernel's entry lacks, by `sk`. With socket-local storage
/// (the BTF back end) the accept programs, classic tracepoints, cannot write the socket's entry:
/// they report the owner in the connection's `ConnectionOpened`, and the daemon joins it here
/// to the socket's later events ([`AcceptedOwners::complete`]) and to the connection-state scan
/// ([`AcceptedOwners::owner_of`]). An owner goes with the connection's `ConnectionClosed`, or,
/// when that close was lost to a full ring buffer, once a scan no longer finds the socket and
/// every event the kernel stamped before that scan has been handled ([`AcceptedOwners::gone`],
/// [`AcceptedOwners::forget_drained`]): a socket closes before its close event is read, so a
/// scan alone would take the owner from a close still on its way.
#[derive(Debug, Default)]
pub struct AcceptedOwners {
    owners: Mutex<HashMap<u64, Accepted>>,
}

#[derive(Debug, Clone, Copy)]
struct Accepted {
    owner: Owner,
    /// When it was remembered.
    since: Instant,
    /// The kernel time (CLOCK_MONOTONIC ns) by which a scan found the socket gone.
    gone_by_ns: Option<u64>,
}

/// Accepted connections open at once whose owner is remembered (about 64 bytes each); beyond
/// that, a connection's later events go unattributed, as they would without the join.
const MAX_ACCEPTED_OWNERS: usize = 1 << 20;

impl AcceptedOwners {
    fn owners(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Accepted>> {
        self.owners.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Remembers the owner an accept program reported, or gives a later event of the same
    /// socket the owner it lacks (the owner goes with the connection's close).
    pub fn complete(&self, event: &mut SocketEvent) {
        if event.sk == 0 || event.role != Role::Server as u8 {
            return;
        }
        if event.owner.tgid != 0 {
            if event.kind == EventKind::ConnectionOpened as u16 && event.flags & flags::OWNER_FROM_SYSCALL != 0 {
                let mut owners = self.owners();
                if owners.len() < MAX_ACCEPTED_OWNERS || owners.contains_key(&event.sk) {
                    let accepted = Accepted { owner: event.owner, since: Instant::now(), gone_by_ns: None };
                    owners.insert(event.sk, accepted);
                }
            }
            return;
        }
        let mut owners = self.owners();
        let owner = if event.kind == EventKind::ConnectionClosed as u16 {
            owners.remove(&event.sk).map(|a| a.owner)
        } else {
            owners.get(&event.sk).map(|a| a.owner)
        };
        if let Some(owner) = owner {
            event.owner = owner;
            event.flags |= flags::OWNER_FROM_SYSCALL;
        }
    }

    /// The owner of accepted socket `sk`, for the connection-state scan.
    pub fn owner_of(&self, sk: u64) -> Option<Owner> {
        self.owners().get(&sk).map(|a| a.owner)
    }

    /// A scan that started at `scan_start` and ended at kernel time `scan_end_ns` found the
    /// sockets `live`: the others remembered before it started are gone by `scan_end_ns`.
    /// Their owners stay until the events stamped before then are handled: their closes may be
    /// among them.
    pub fn gone(&self, live: &std::collections::HashSet<u64>, scan_start: Instant, scan_end_ns: u64) {
        for (sk, accepted) in self.owners().iter_mut() {
            if live.contains(sk) {
                accepted.gone_by_ns = None;
            } else if accepted.since < scan_start && accepted.gone_by_ns.is_none() {
                accepted.gone_by_ns = Some(scan_end_ns);
            }
        }
    }

    /// Forgets the owners of gone sockets whose closes, had they come, would have been handled
    /// by now: every event stamped before `drained_through_ns` has been.
    pub fn forget_drained(&self, drained_through_ns: u64) {
        self.owners().retain(|_, a| a.gone_by_ns.is_none_or(|gone| gone > drained_through_ns));
    }

    /// Owners remembered now.
    pub fn count(&self) -> usize {
        self.owners().len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use observer_common::{Endpoints, EventKind, Owner, ProbeId};

    use super::*;
    use crate::{container::CgroupResolver, series::label_values};

    fn v4(a: [u8; 4]) -> [u8; 16] {
        std::net::Ipv4Addr::from(a).to_ipv6_mapped().octets()
    }

    fn attribution() -> Attribution {
        Attribution::new(
            32768..=60999,
            Arc::new(Mutex::new(CgroupResolver::without_mount())),
            Arc::new(Pods::new(std::time::Duration::from_secs(60), None)),
        )
    }

    fn event(role: Role, local_port: u16, remote_port: u16) -> SocketEvent {
        let mut comm = [0u8; 16];
        comm[..7].copy_from_slice(b"backend");
        SocketEvent {
            role: role as u8,
            sk: 0xffff_8881_0000_0000,
            endpoints: Endpoints {
                local_addr: v4([127, 0, 0, 1]),
                remote_addr: v4([10, 1, 2, 3]),
                local_port,
                remote_port,
                family: 2,
                _pad: 0,
            },
            owner: Owner { tgid: 42, comm, ..Owner::default() },
            ..Default::default()
        }
    }

    fn labels(role: Role, local_port: u16, remote_port: u16) -> [String; 5] {
        label_values(&attribution().key(&event(role, local_port, remote_port), container_key("3f2a9c1b7d4e")))
    }

    #[test]
    fn client_port_is_remote_server_port_is_local() {
        assert_eq!(labels(Role::Client, 45000, 8080), ["backend", "client", "10.1.2.3", "8080", "3f2a9c1b7d4e"]);
        assert_eq!(labels(Role::Server, 8080, 45000), ["backend", "server", "10.1.2.3", "8080", "3f2a9c1b7d4e"]);
    }

    #[test]
    fn unknown_role_never_labels_an_ephemeral_port() {
        assert_eq!(labels(Role::Unknown, 45000, 443)[3], "443");
        assert_eq!(labels(Role::Unknown, 9999, 45000)[3], "9999");
        assert_eq!(labels(Role::Unknown, 40000, 45000)[3], "");
        assert_eq!(labels(Role::Unknown, 40000, 45000)[1], "");
    }

    #[test]
    fn accepted_owner_joins_the_sockets_later_events_until_its_close() {
        let owners = AcceptedOwners::default();
        let accepted = event(Role::Server, 8080, 45000);
        let opened = SocketEvent {
            kind: EventKind::ConnectionOpened as u16,
            flags: flags::OWNER_FROM_SYSCALL | flags::OPEN_REPORTED,
            ..accepted
        };
        owners.complete(&mut opened.clone());
        let ownerless =
            |kind: EventKind| SocketEvent { kind: kind as u16, owner: Owner::default(), flags: 0, ..accepted };
        let mut reset = ownerless(EventKind::ResetReceived);
        owners.complete(&mut reset);
        assert_eq!((reset.owner, reset.flags), (accepted.owner, flags::OWNER_FROM_SYSCALL));
        assert_eq!(owners.owner_of(accepted.sk), Some(accepted.owner), "the scan sees it too");
        let mut closed = ownerless(EventKind::ConnectionClosed);
        owners.complete(&mut closed);
        assert_eq!(closed.owner, accepted.owner);
        assert_eq!(owners.count(), 0, "the owner goes with the close");
        let mut after = ownerless(EventKind::ConnectionClosed);
        owners.complete(&mut after);
        assert_eq!(after.owner, Owner::default());
        let mut client = SocketEvent { role: Role::Client as u8, ..ownerless(EventKind::ResetReceived) };
        owners.complete(&mut opened.clone());
        owners.complete(&mut client);
        assert_eq!(client.owner, Owner::default(), "only server sockets are joined");
    }

    #[test]
    fn a_gone_socket_keeps_its_owner_until_the_events_before_the_scan_are_handled() {
        let owners = AcceptedOwners::default();
        let opened = |sk| SocketEvent {
            kind: EventKind::ConnectionOpened as u16,
            flags: flags::OWNER_FROM_SYSCALL,
            sk,
            ..event(Role::Server, 8080, 45000)
        };
        owners.complete(&mut opened(1));
        owners.complete(&mut opened(2));
        let scan_start = Instant::now();
        owners.complete(&mut opened(3));
        // Socket 1 closed before the scan (ended at kernel time 1000); its close is still in
        // the ring buffer. 3 was accepted during the scan: not judged by it.
        owners.gone(&[2].into_iter().collect(), scan_start, 1000);
        owners.forget_drained(999);
        assert!(owners.owner_of(1).is_some(), "events up to 999 are handled, the close may be later");
        let mut closed = SocketEvent { kind: EventKind::ConnectionClosed as u16, owner: Owner::default(), ..opened(1) };
        owners.complete(&mut closed);
        assert_eq!(closed.owner, opened(1).owner, "the close on its way gets its owner");
        // Socket 2 goes too and its close is lost: forgotten once the kernel time of the scan
        // that missed it has been drained.
        let later_scan = Instant::now();
        owners.gone(&[3].into_iter().collect(), later_scan, 2000);
        owners.forget_drained(1999);
        assert!(owners.owner_of(2).is_some());
        owners.forget_drained(2000);
        assert_eq!((owners.owner_of(2), owners.owner_of(3).is_some()), (None, true));
    }

    #[test]
    fn a_socket_found_again_is_not_gone() {
        let owners = AcceptedOwners::default();
        let mut opened = SocketEvent {
            kind: EventKind::ConnectionOpened as u16,
            flags: flags::OWNER_FROM_SYSCALL,
            sk: 7,
            ..event(Role::Server, 8080, 45000)
        };
        owners.complete(&mut opened);
        owners.gone(&Default::default(), Instant::now(), 10);
        owners.gone(&[7].into_iter().collect(), Instant::now(), 20);
        owners.forget_drained(u64::MAX);
        assert!(owners.owner_of(7).is_some());
    }

    #[test]
    fn only_sockets_without_a_known_owner_are_unattributed() {
        let a = attribution();
        let attributed =
            |raw| a.attribute(&Event { kind: EventKind::ResetReceived, probe: ProbeId::TcpReceiveReset, raw });
        let owned = attributed(event(Role::Client, 45000, 8080));
        assert!(!owned.unattributed);
        assert_eq!(owned.container, None, "no cgroup id, no container");
        assert_eq!(owned.key.container, NO_CONTAINER);
        let orphan = SocketEvent { owner: Owner::default(), ..event(Role::Unknown, 8080, 45000) };
        assert!(attributed(orphan).unattributed, "a socket nobody was seen to own");
        let no_socket = SocketEvent { sk: 0, ..orphan };
        assert!(!attributed(no_socket).unattributed, "a no-socket reset belongs to no process");
    }
}
