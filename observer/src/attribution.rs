//! Who and with whom: the third step of an event's path (after [`crate::decode`] and
//! [`crate::classify`]). It turns an event's owner, role, endpoints and cgroup into one value,
//! [`Attributed`]: the series key the event counts under (no strings on the event path), the
//! owner's container identity, and whether the owner is unknown.

use std::{fs, ops::RangeInclusive, sync::Arc};

use observer_common::{Role, SocketEvent};

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
