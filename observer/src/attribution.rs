//! Who and with whom: the owner, role, peer and service port of an event, as label values.

use std::{fs, net::IpAddr, ops::RangeInclusive};

use observer_common::{Role, SocketEvent};

/// The labels shared by every per-connection metric.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConnectionLabels {
    /// Owning process's command name; empty when there is no owner (no-socket resets) or it is
    /// unknown.
    pub comm: String,
    /// `client`, `server`, or empty when unknown.
    pub role: &'static str,
    /// Remote IP address as text (IPv4 for v4-mapped addresses).
    pub peer: String,
    /// Service port: remote port for a client, local port for a server; empty rather than an
    /// ephemeral port.
    pub port: String,
}

/// Turns events into labels. Knows the local ephemeral port range, so that ephemeral ports never
/// become label values.
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

    pub fn labels(&self, ev: &SocketEvent) -> ConnectionLabels {
        let e = &ev.endpoints;
        let role = Role::from_u8(ev.role);
        let port = match role {
            Role::Client => Some(e.remote_port),
            Role::Server => Some(e.local_port),
            // No owner to ask (a no-socket reset, a socket from before start-up): the side that
            // is not ephemeral is the service, the local one first (a no-socket RST answers a
            // segment sent to a local port).
            Role::Unknown => [e.local_port, e.remote_port]
                .into_iter()
                .find(|p| *p != 0 && !self.ephemeral.contains(p)),
        };
        ConnectionLabels {
            comm: comm_text(&ev.owner.comm),
            role: match role {
                Role::Client => "client",
                Role::Server => "server",
                Role::Unknown => "",
            },
            peer: ip_text(&e.remote_addr),
            port: port.filter(|p| *p != 0).map(|p| p.to_string()).unwrap_or_default(),
        }
    }
}

/// NUL-padded kernel comm → text.
pub fn comm_text(comm: &[u8]) -> String {
    let end = comm.iter().position(|b| *b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// 16-byte address (v4-mapped for IPv4) → text.
pub fn ip_text(addr: &[u8; 16]) -> String {
    let v6 = std::net::Ipv6Addr::from(*addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4).to_string(),
        None => IpAddr::V6(v6).to_string(),
    }
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

    fn event(role: Role, local_port: u16, remote_port: u16) -> SocketEvent {
        let mut comm = [0u8; 16];
        comm[..7].copy_from_slice(b"backend");
        SocketEvent {
            role: role as u8,
            endpoints: Endpoints { local_addr: v4([127, 0, 0, 1]), remote_addr: v4([10, 1, 2, 3]), local_port, remote_port, family: 2, _pad: 0 },
            owner: Owner { tgid: 42, comm },
            ..Default::default()
        }
    }

    #[test]
    fn client_port_is_remote_server_port_is_local() {
        let a = Attribution::new(32768..=60999);
        let client = a.labels(&event(Role::Client, 45000, 8080));
        assert_eq!((client.role, client.port.as_str(), client.peer.as_str(), client.comm.as_str()), ("client", "8080", "10.1.2.3", "backend"));
        let server = a.labels(&event(Role::Server, 8080, 45000));
        assert_eq!((server.role, server.port.as_str()), ("server", "8080"));
    }

    #[test]
    fn unknown_role_never_labels_an_ephemeral_port() {
        let a = Attribution::new(32768..=60999);
        assert_eq!(a.labels(&event(Role::Unknown, 45000, 443)).port, "443");
        assert_eq!(a.labels(&event(Role::Unknown, 9999, 45000)).port, "9999");
        assert_eq!(a.labels(&event(Role::Unknown, 40000, 45000)).port, "");
        assert_eq!(a.labels(&event(Role::Unknown, 40000, 45000)).role, "");
    }

    #[test]
    fn addresses_render_as_ipv4_or_ipv6() {
        assert_eq!(ip_text(&v4([192, 168, 1, 9])), "192.168.1.9");
        let mut v6 = [0u8; 16];
        v6[15] = 1;
        assert_eq!(ip_text(&v6), "::1");
        assert_eq!(comm_text(b"nginx\0\0\0garbage"), "nginx");
    }
}
