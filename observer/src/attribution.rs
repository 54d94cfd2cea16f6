//! Who and with whom: an event's owner, role, peer and service port, as a series key (no strings
//! on the event path) and, at scrape time, as label values.

use std::{fs, ops::RangeInclusive};

use observer_common::{Role, SocketEvent};

use crate::aggregate::{COMM_OTHER, CONTAINER_OTHER, ContainerKey, SeriesKey};

/// The `peer` label: a remote address, or `other` for peers folded by the cardinality cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Peer {
    /// 16 bytes, IPv4 v4-mapped.
    Addr([u8; 16]),
    Other,
}

/// The `port` label: the service port, none (`""`) when only ephemeral ports are known, or
/// `other` for the overflow series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Port {
    None,
    Num(u16),
    Other,
}

/// Turns events into series keys. Knows the local ephemeral port range, so that ephemeral ports
/// never become label values.
#[derive(Debug, Clone)]
pub struct Attribution {
    ephemeral: RangeInclusive<u16>,
}

impl Default for Attribution {
    fn default() -> Self {
        Self::new(Self::read_ephemeral_range().unwrap_or(32768..=60999))
    }
}

impl Attribution {
    pub fn new(ephemeral: RangeInclusive<u16>) -> Self {
        Self { ephemeral }
    }

    /// `net.ipv4.ip_local_port_range` of this host.
    fn read_ephemeral_range() -> Option<RangeInclusive<u16>> {
        let text = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
        let mut it = text.split_whitespace().map(|v| v.parse::<u16>());
        let (Some(Ok(lo)), Some(Ok(hi))) = (it.next(), it.next()) else { return None };
        Some(lo..=hi)
    }

    /// The series an event counts in; `detail` is the family's extra label (reason, kind),
    /// `container` the owner's short container id.
    pub fn key(&self, ev: &SocketEvent, detail: u32, container: ContainerKey) -> SeriesKey {
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
            detail,
        }
    }
}

/// Label values `[comm, role, peer, port, container]` of a series.
pub fn label_values(key: &SeriesKey) -> [String; 5] {
    [
        Label::Comm(&key.comm).to_string(),
        role_text(key.role).to_string(),
        Label::Peer(&key.peer).to_string(),
        Label::Port(&key.port).to_string(),
        Label::Container(&key.container).to_string(),
    ]
}

/// A label value of a series key, written without allocating (the exposition writes thousands
/// per scrape). Not escaped: the writer escapes.
pub enum Label<'a> {
    Comm(&'a [u8; 16]),
    Peer(&'a Peer),
    Port(&'a Port),
    Container(&'a ContainerKey),
}

impl std::fmt::Display for Label<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Label::Comm(comm) if **comm == COMM_OTHER => f.write_str("other"),
            Label::Comm(comm) => f.write_str(&String::from_utf8_lossy(until_nul(&comm[..]))),
            Label::Container(id) if **id == CONTAINER_OTHER => f.write_str("other"),
            Label::Container(id) => f.write_str(&String::from_utf8_lossy(until_nul(&id[..]))),
            Label::Peer(Peer::Addr(addr)) => {
                let v6 = std::net::Ipv6Addr::from(*addr);
                match v6.to_ipv4_mapped() {
                    Some(v4) => v4.fmt(f),
                    None => v6.fmt(f),
                }
            }
            Label::Peer(Peer::Other) | Label::Port(Port::Other) => f.write_str("other"),
            Label::Port(Port::None) => Ok(()),
            Label::Port(Port::Num(p)) => p.fmt(f),
        }
    }
}

fn until_nul(bytes: &[u8]) -> &[u8] {
    &bytes[..bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len())]
}

/// A short container id as a series key (12 bytes; longer ids are cut, as `docker ps` does).
pub fn container_key(short_id: &str) -> ContainerKey {
    let mut key = ContainerKey::default();
    for (dst, src) in key.iter_mut().zip(short_id.bytes()) {
        *dst = src;
    }
    key
}

/// The `role` label value.
pub fn role_text(role: u8) -> &'static str {
    match Role::from_u8(role) {
        Role::Client => "client",
        Role::Server => "server",
        Role::Unknown => "",
    }
}

/// NUL-padded kernel comm → text.
pub fn comm_text(comm: &[u8]) -> String {
    String::from_utf8_lossy(until_nul(comm)).into_owned()
}

/// 16-byte address (v4-mapped for IPv4) → text.
pub fn ip_text(addr: &[u8; 16]) -> String {
    Label::Peer(&Peer::Addr(*addr)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use observer_common::{Endpoints, Owner};

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut m = [0u8; 16];
        m[10] = 0xff;
        m[11] = 0xff;
        m[12..].copy_from_slice(&a);
        m
    }

    fn labels(role: Role, local_port: u16, remote_port: u16) -> [String; 5] {
        let mut comm = [0u8; 16];
        comm[..7].copy_from_slice(b"backend");
        let ev = SocketEvent {
            role: role as u8,
            endpoints: Endpoints { local_addr: v4([127, 0, 0, 1]), remote_addr: v4([10, 1, 2, 3]), local_port, remote_port, family: 2, _pad: 0 },
            owner: Owner { tgid: 42, comm, ..Owner::default() },
            ..Default::default()
        };
        label_values(&Attribution::new(32768..=60999).key(&ev, 0, container_key("3f2a9c1b7d4e")))
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
    fn addresses_render_as_ipv4_or_ipv6_and_folded_values_as_other() {
        assert_eq!(ip_text(&v4([192, 168, 1, 9])), "192.168.1.9");
        let mut v6 = [0u8; 16];
        v6[15] = 1;
        assert_eq!(ip_text(&v6), "::1");
        assert_eq!(comm_text(b"nginx\0\0\0garbage"), "nginx");
        let folded = SeriesKey { comm: COMM_OTHER, role: 0, peer: Peer::Other, port: Port::Other, container: CONTAINER_OTHER, detail: 0 };
        assert_eq!(label_values(&folded), ["other", "", "other", "other", "other"]);
        let host = SeriesKey { container: crate::aggregate::NO_CONTAINER, ..folded };
        assert_eq!(label_values(&host)[4], "");
    }
}
