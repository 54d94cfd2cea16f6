//! Series keys and their label values: who (`comm`, `container`), in which `role`, with which
//! `peer`, on which service `port`.
//!
//! A [`SeriesKey`] holds no strings, so the event path hashes and copies a few bytes per event;
//! label text is written only at scrape time ([`Label`]). The `*_OTHER` values are the folded
//! series of the cardinality caps ([`crate::aggregate`]). Both attribution (which builds keys)
//! and aggregation (which counts under them) depend on this module, and nothing here depends on
//! them.

use observer_common::Role;

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

/// Command name bytes that render as `other` (no real comm is all 0xff).
pub const COMM_OTHER: [u8; 16] = [0xff; 16];

/// A short container id (12 hex characters) as bytes; all zero on the host.
pub type ContainerKey = [u8; 12];

/// The host: no container.
pub const NO_CONTAINER: ContainerKey = [0; 12];

/// Container bytes that render as `other` (overflow series).
pub const CONTAINER_OTHER: ContainerKey = [0xff; 12];

/// One series' labels, without strings: rendered only at scrape time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SeriesKey {
    pub comm: [u8; 16],
    /// `observer_common::Role` as u8.
    pub role: u8,
    pub peer: Peer,
    pub port: Port,
    /// The owner's short container id.
    pub container: ContainerKey,
    /// The family's extra label: reset reason value, or premature kind index; 0 otherwise.
    pub detail: u32,
}

impl SeriesKey {
    pub(crate) fn with_peer(self, peer: Peer) -> Self {
        Self { peer, ..self }
    }

    pub(crate) fn overflow(self) -> Self {
        Self {
            comm: COMM_OTHER,
            role: 0,
            peer: Peer::Other,
            port: Port::Other,
            container: CONTAINER_OTHER,
            detail: self.detail,
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

/// TCP state names as label values, as node_exporter's `node_tcp_connection_states` writes them
/// (`state="close_wait"`): the kernel's names, lower case.
pub fn tcp_state_value(state: u8) -> &'static str {
    use observer_common::tcp_state::*;
    match state {
        ESTABLISHED => "established",
        SYN_SENT => "syn_sent",
        SYN_RECV => "syn_recv",
        FIN_WAIT1 => "fin_wait1",
        FIN_WAIT2 => "fin_wait2",
        TIME_WAIT => "time_wait",
        CLOSE => "close",
        CLOSE_WAIT => "close_wait",
        LAST_ACK => "last_ack",
        LISTEN => "listen",
        CLOSING => "closing",
        NEW_SYN_RECV => "new_syn_recv",
        _ => "unknown",
    }
}

/// TCP state names as `ss` prints them (for people: the CLI and the event log).
pub fn tcp_state_label(state: u8) -> &'static str {
    use observer_common::tcp_state::*;
    match state {
        ESTABLISHED => "ESTAB",
        SYN_SENT => "SYN-SENT",
        SYN_RECV => "SYN-RECV",
        FIN_WAIT1 => "FIN-WAIT-1",
        FIN_WAIT2 => "FIN-WAIT-2",
        TIME_WAIT => "TIME-WAIT",
        CLOSE => "CLOSE",
        CLOSE_WAIT => "CLOSE-WAIT",
        LAST_ACK => "LAST-ACK",
        LISTEN => "LISTEN",
        CLOSING => "CLOSING",
        NEW_SYN_RECV => "NEW-SYN-RECV",
        _ => "UNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: [u8; 4]) -> [u8; 16] {
        std::net::Ipv4Addr::from(a).to_ipv6_mapped().octets()
    }

    #[test]
    fn addresses_render_as_ipv4_or_ipv6_and_folded_values_as_other() {
        assert_eq!(ip_text(&v4([192, 168, 1, 9])), "192.168.1.9");
        let mut v6 = [0u8; 16];
        v6[15] = 1;
        assert_eq!(ip_text(&v6), "::1");
        assert_eq!(comm_text(b"nginx\0\0\0garbage"), "nginx");
        let folded = SeriesKey {
            comm: COMM_OTHER,
            role: 0,
            peer: Peer::Other,
            port: Port::Other,
            container: CONTAINER_OTHER,
            detail: 0,
        };
        assert_eq!(label_values(&folded), ["other", "", "other", "other", "other"]);
        let host = SeriesKey { container: NO_CONTAINER, ..folded };
        assert_eq!(label_values(&host)[4], "");
    }
}
