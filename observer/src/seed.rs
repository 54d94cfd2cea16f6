//! Connections already open when the daemon starts, taken from the kernel's socket table.
//!
//! The kernel programs learn a socket's owner when it connects or is accepted, which for a
//! connection opened before the daemon started has already happened. So at start-up the daemon
//! dumps every TCP socket of every network namespace with sock_diag ([`crate::sock_diag`]),
//! finds each socket's process through `/proc/PID/fd`, and puts what it knows into the programs'
//! `SEEDS` map, keyed by socket cookie. sock_diag assigns every socket its cookie as it
//! dumps it; a program that meets a socket it does not know reads the cookie from the socket and
//! adopts the seed. The connection-state gauges count seeds not yet adopted, so they are right
//! from the first scrape.

use std::{collections::HashMap, fs, net::IpAddr, os::unix::fs::MetadataExt as _, path::PathBuf};

use aya::maps::{HashMap as BpfHashMap, MapData};
use netlink_packet_sock_diag::{
    constants::AF_INET,
    inet::{InetResponseHeader, StateFlags},
};
use observer_common::{
    AF_INET as AF_INET_U16, AF_INET6 as AF_INET6_U16, Endpoints, Owner, Role, SocketInfo, TASK_COMM_LEN, tcp_state,
};

use crate::sock_diag::{dump_in_namespace, namespaces, pids};

/// What start-up seeding found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Seeded {
    pub namespaces: usize,
    /// Connections put into the map.
    pub connections: usize,
    /// Of those, with an owning process found in /proc.
    pub owned: usize,
    /// The first error of each namespace whose sockets could not be listed.
    pub failures: Vec<String>,
}

/// A process that holds a socket.
#[derive(Debug, Clone)]
struct Holder {
    tgid: u32,
    comm: [u8; TASK_COMM_LEN],
    cgroup_id: u64,
}

/// Seeds `map` with the connections open now, in the namespace with inode `netns_filter` or in
/// all of them. Errors in one namespace are logged and skipped.
pub fn seed(map: &mut BpfHashMap<MapData, u64, SocketInfo>, netns_filter: Option<u32>) -> Seeded {
    let holders = socket_holders();
    let mut seeded = Seeded::default();
    let now = crate::query::monotonic_ns();
    for ns in namespaces(netns_filter.map(u64::from)) {
        let sockets = match dump_in_namespace(&ns, StateFlags::all(), None) {
            Ok(sockets) => sockets.into_iter().map(|s| s.header).collect::<Vec<_>>(),
            Err(e) => {
                seeded.failures.push(format!("network namespace {} (via {}): {e}", ns.inode, ns.found_via));
                continue;
            }
        };
        seeded.namespaces += 1;
        let listening: Vec<(IpAddr, u16)> = sockets
            .iter()
            .filter(|s| s.state == tcp_state::LISTEN)
            .map(|s| (s.socket_id.source_address, s.socket_id.source_port))
            .collect();
        for s in &sockets {
            if !is_connection(s.state) {
                continue;
            }
            let cookie = u64::from_ne_bytes(s.socket_id.cookie);
            let holder = holders.get(&s.inode);
            let info = seed_info(s, holder, &listening, now);
            if let Err(e) = map.insert(cookie, info, 0) {
                log::warn!("seeding the socket map stopped at {} connections: {e}", seeded.connections);
                return seeded;
            }
            seeded.connections += 1;
            seeded.owned += usize::from(holder.is_some());
        }
    }
    seeded
}

/// Established or closing: a connection. Listeners, timewait and request sockets are not.
fn is_connection(state: u8) -> bool {
    !matches!(state, tcp_state::LISTEN | tcp_state::TIME_WAIT | tcp_state::NEW_SYN_RECV | tcp_state::CLOSE)
}

fn seed_info(s: &InetResponseHeader, holder: Option<&Holder>, listening: &[(IpAddr, u16)], now: u64) -> SocketInfo {
    let id = &s.socket_id;
    let local_port = id.source_port;
    // Accepted from a listener on the same port (on its address or on any): a server.
    let server = listening
        .iter()
        .any(|(addr, port)| *port == local_port && (*addr == id.source_address || addr.is_unspecified()));
    let mut info = SocketInfo {
        endpoints: Endpoints {
            local_addr: mapped(id.source_address),
            remote_addr: mapped(id.destination_address),
            local_port,
            remote_port: id.destination_port,
            family: if s.family == AF_INET { AF_INET_U16 } else { AF_INET6_U16 },
            _pad: 0,
        },
        role: if server { Role::Server as u8 } else { Role::Client as u8 },
        state: s.state,
        // The connection is at least this old; its real start is unknown (duration stays 0).
        state_since_ns: now,
        ..SocketInfo::default()
    };
    if let Some(h) = holder {
        info.owner = Owner { cgroup_id: h.cgroup_id, tgid: h.tgid, comm: h.comm, _pad: 0 };
    }
    info.facts.states_seen = 1 << s.state;
    info
}

fn mapped(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Socket inode → the process holding it, from every process's fd table (what `ss -p` does).
fn socket_holders() -> HashMap<u32, Holder> {
    let cgroup_root = fs::read_to_string("/proc/self/mountinfo").ok().and_then(|m| crate::container::cgroup2_mount(&m));
    let mut holders = HashMap::new();
    for pid in pids() {
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        let mut holder = None;
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else { continue };
            let Some(inode) =
                target.to_str().and_then(|t| t.strip_prefix("socket:[")?.strip_suffix(']')?.parse::<u32>().ok())
            else {
                continue;
            };
            let holder = holder.get_or_insert_with(|| process(pid, cgroup_root.as_ref()));
            holders.entry(inode).or_insert_with(|| holder.clone());
        }
    }
    holders
}

fn process(pid: u32, cgroup_root: Option<&PathBuf>) -> Holder {
    let mut comm = [0u8; TASK_COMM_LEN];
    if let Ok(name) = fs::read_to_string(format!("/proc/{pid}/comm")) {
        for (dst, src) in comm.iter_mut().take(TASK_COMM_LEN - 1).zip(name.trim_end_matches('\n').bytes()) {
            *dst = src;
        }
    }
    // The cgroup id is the inode of the process's cgroup2 directory ("0::/path").
    let cgroup_id = fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()
        .and_then(|text| text.lines().find_map(|l| l.strip_prefix("0::").map(str::to_string)))
        .zip(cgroup_root)
        .and_then(|(path, root)| fs::metadata(root.join(path.trim_start_matches('/'))).ok())
        .map_or(0, |m| m.ino());
    Holder { tgid: pid, comm, cgroup_id }
}

#[cfg(test)]
mod tests {
    use std::{
        io::Read as _,
        net::{TcpListener, TcpStream},
    };

    use super::*;
    use crate::sock_diag::dump;

    #[test]
    fn sock_diag_lists_a_connection_with_its_cookie_and_its_holder() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a listener");
        let port = listener.local_addr().expect("its address").port();
        let client = TcpStream::connect(("127.0.0.1", port)).expect("a connection");
        let (mut server, _) = listener.accept().expect("accepted");
        let client_port = client.local_addr().expect("client address").port();
        let sockets: Vec<InetResponseHeader> = dump(AF_INET, StateFlags::all(), None)
            .expect("sock_diag works as root")
            .into_iter()
            .map(|s| s.header)
            .collect();
        let theirs: Vec<&InetResponseHeader> = sockets
            .iter()
            .filter(|s| s.socket_id.source_port == client_port && s.socket_id.destination_port == port)
            .collect();
        assert_eq!(theirs.len(), 1, "the client end, once");
        let s = theirs[0];
        assert_eq!(s.state, tcp_state::ESTABLISHED);
        assert_ne!(u64::from_ne_bytes(s.socket_id.cookie), 0, "sock_diag gives it a cookie");
        let holders = socket_holders();
        assert_eq!(holders.get(&s.inode).map(|h| h.tgid), Some(std::process::id()), "this process holds it");
        let listening: Vec<(IpAddr, u16)> = sockets
            .iter()
            .filter(|s| s.state == tcp_state::LISTEN)
            .map(|s| (s.socket_id.source_address, s.socket_id.source_port))
            .collect();
        assert_eq!(seed_info(s, holders.get(&s.inode), &listening, 1).role, Role::Client as u8);
        let server_end = sockets
            .iter()
            .find(|s| s.socket_id.source_port == port && s.socket_id.destination_port == client_port)
            .expect("the server end");
        assert_eq!(seed_info(server_end, None, &listening, 1).role, Role::Server as u8);
        assert!(
            !is_connection(tcp_state::LISTEN)
                && !is_connection(tcp_state::TIME_WAIT)
                && is_connection(tcp_state::CLOSE_WAIT)
        );
        drop(client);
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).expect("EOF");
    }
}
