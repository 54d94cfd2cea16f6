//! The kernel's socket table through sock_diag (the netlink interface `ss` uses), one network
//! namespace at a time: what start-up seeding lists ([`crate::seed`]), and how the daemon reads
//! socket-local storage back ([`read_storage`]).
//!
//! Socket-local storage (where the BTF tracepoint programs keep each socket's `SocketInfo`) has
//! no keys to walk from user space; a sock_diag dump that names the map
//! (`INET_DIAG_REQ_SK_BPF_STORAGES`) returns every socket's value in it instead. (A
//! `bpf_sk_storage_map` iterator would too, but some kernels refuse tracing programs other than
//! BTF tracepoints: this works wherever sock_diag does.)

use std::{
    collections::BTreeMap,
    fs, io,
    os::{
        fd::{AsRawFd as _, BorrowedFd},
        unix::fs::MetadataExt as _,
    },
};

use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload, Nla as _};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};
use observer_common::SocketInfo;

/// `INET_DIAG_REQ_SK_BPF_STORAGES` (include/uapi/linux/inet_diag.h): the request's list of
/// socket-storage maps, each an `SK_DIAG_BPF_STORAGE_REQ_MAP_FD` (linux/sock_diag.h).
const INET_DIAG_REQ_SK_BPF_STORAGES: u16 = 2;
const SK_DIAG_BPF_STORAGE_REQ_MAP_FD: u16 = 1;
/// `INET_DIAG_SK_BPF_STORAGES` in an answer: `SK_DIAG_BPF_STORAGE` entries, each with the
/// map's `SK_DIAG_BPF_STORAGE_MAP_VALUE`.
const INET_DIAG_SK_BPF_STORAGES: u16 = 20;
const SK_DIAG_BPF_STORAGE: u16 = 1;
const SK_DIAG_BPF_STORAGE_MAP_VALUE: u16 = 3;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !((1 << 15) | (1 << 14));

/// One socket of a dump.
#[derive(Debug, Clone)]
pub struct DiagSocket {
    pub header: InetResponseHeader,
    /// The socket's value in the socket-storage map the dump asked for, if it has one.
    pub storage: Option<Vec<u8>>,
}

/// A network namespace, held open: it cannot go away while we read it, and a dump of it lists
/// exactly what it holds (a namespace reached through a pid that exited is not "empty").
#[derive(Debug)]
pub struct Namespace {
    /// The namespace's inode (what `--netns` names).
    pub inode: u64,
    handle: fs::File,
    /// Where it was found: `pid 1234`, or a bind mount's path.
    pub found_via: String,
}

/// Every network namespace with a process in it, and every one `ip netns` keeps in
/// [`BIND_MOUNTS`] (its sockets may outlive the processes that made them), each opened once, as
/// it is found, from the first process in it that is still there. `only`: just the namespace
/// with this inode (`--netns`), if it is found.
pub fn namespaces(only: Option<u64>) -> Vec<Namespace> {
    let mut found: BTreeMap<u64, Namespace> = BTreeMap::new();
    let pid_paths = pids().into_iter().map(|pid| (format!("/proc/{pid}/ns/net"), format!("pid {pid}")));
    let bind_mounts = BIND_MOUNTS
        .iter()
        .filter_map(|dir| fs::read_dir(dir).ok())
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| (e.path().display().to_string(), e.path().display().to_string()));
    for (path, found_via) in pid_paths.chain(bind_mounts) {
        // A stat first: most processes share a namespace already opened.
        match fs::metadata(&path) {
            Ok(meta) if !found.contains_key(&meta.ino()) && only.is_none_or(|inode| inode == meta.ino()) => {}
            _ => continue,
        }
        // Opened, it is held; its inode read from the open file, as the pid may have been
        // reused since the stat.
        let Ok(handle) = fs::File::open(&path) else { continue };
        let Ok(meta) = handle.metadata() else { continue };
        if only.is_some_and(|inode| inode != meta.ino()) {
            continue;
        }
        // A file left in a bind-mount directory, no longer mounted, is not a namespace.
        if !is_network_namespace(&handle) {
            continue;
        }
        found.entry(meta.ino()).or_insert(Namespace { inode: meta.ino(), handle, found_via });
        if only.is_some() {
            break;
        }
    }
    found.into_values().collect()
}

/// Where `ip netns add` bind-mounts the namespaces it names.
const BIND_MOUNTS: [&str; 2] = ["/run/netns", "/var/run/netns"];

/// `handle` is a network namespace (NS_GET_NSTYPE says CLONE_NEWNET).
fn is_network_namespace(handle: &fs::File) -> bool {
    /// `NS_GET_NSTYPE` (linux/nsfs.h): `_IO(0xb7, 0x3)`.
    const NS_GET_NSTYPE: libc::c_ulong = 0xb7 << 8 | 0x3;
    // SAFETY: an ioctl without arguments on an open fd.
    unsafe { libc::ioctl(handle.as_raw_fd(), NS_GET_NSTYPE as _) == libc::CLONE_NEWNET }
}

pub fn pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|dir| dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

/// The TCP sockets in `states` of namespace `ns`, from a thread that joins it, with their
/// values in socket-storage map `storage` if given.
pub fn dump_in_namespace(
    ns: &Namespace,
    states: StateFlags,
    storage: Option<BorrowedFd<'_>>,
) -> io::Result<Vec<DiagSocket>> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on this short-lived thread only; the fd is open.
                if unsafe { libc::setns(ns.handle.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                let mut all = dump(AF_INET, states.clone(), storage)?;
                all.extend(dump(AF_INET6, states, storage)?);
                Ok(all)
            })
            .join()
            .map_err(|_| io::Error::other("the sock_diag thread panicked"))?
    })
}

/// One sock_diag dump of the TCP sockets of `family` in `states` in the current namespace.
pub fn dump(family: u8, states: StateFlags, storage: Option<BorrowedFd<'_>>) -> io::Result<Vec<DiagSocket>> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let socket_id = if family == AF_INET { SocketId::new_v4() } else { SocketId::new_v6() };
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states,
            socket_id,
        })
        .into(),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    if let Some(map) = storage {
        // The crate builds no request attributes: append the map list and fix the length.
        let fd = map.as_raw_fd() as u32;
        let inner = nla(SK_DIAG_BPF_STORAGE_REQ_MAP_FD, &fd.to_ne_bytes());
        buf.extend_from_slice(&nla(INET_DIAG_REQ_SK_BPF_STORAGES | NLA_F_NESTED, &inner));
        let len = buf.len() as u32;
        buf[..4].copy_from_slice(&len.to_ne_bytes());
    }
    socket.send(&buf, 0)?;

    let mut sockets = Vec::new();
    let mut receive = vec![0u8; 1 << 16];
    loop {
        let size = socket.recv(&mut &mut receive[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let message = <NetlinkMessage<SockDiagMessage>>::deserialize(&receive[offset..size])
                .map_err(|e| io::Error::other(format!("decoding a sock_diag answer: {e}")))?;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    let storage = response.nlas.iter().find_map(|attr| match attr {
                        Nla::Other(other) if other.kind() & NLA_TYPE_MASK == INET_DIAG_SK_BPF_STORAGES => {
                            let mut value = vec![0; other.value_len()];
                            other.emit_value(&mut value);
                            storage_value(&value)
                        }
                        _ => None,
                    });
                    sockets.push(DiagSocket { header: response.header, storage });
                }
                NetlinkPayload::Done(_) => return Ok(sockets),
                NetlinkPayload::Error(e) => return Err(io::Error::other(format!("sock_diag: {e:?}"))),
                _ => {}
            }
            let len = message.header.length as usize;
            if len == 0 {
                break;
            }
            offset += len;
        }
        if size == 0 {
            return Ok(sockets);
        }
    }
}

/// Every entry socket-storage map `map` holds, in the namespace with inode `netns_filter` or in
/// all of them, as the programs wrote it. The first error of each namespace that could not be
/// read comes back beside what could.
pub fn read_storage(map: BorrowedFd<'_>, netns_filter: Option<u32>) -> (Vec<SocketInfo>, Vec<String>) {
    // Listeners and TIME-WAIT sockets never have an entry; asking only for the rest keeps the
    // dump small.
    let states = StateFlags::all() - StateFlags::LISTEN - StateFlags::TIME_WAIT;
    let mut infos = Vec::new();
    let mut failures = Vec::new();
    for ns in namespaces(netns_filter.map(u64::from)) {
        match dump_in_namespace(&ns, states.clone(), Some(map)) {
            Ok(sockets) => infos.extend(sockets.iter().filter_map(|s| s.storage.as_deref().and_then(socket_info))),
            Err(e) => failures.push(format!("network namespace {} (via {}): {e}", ns.inode, ns.found_via)),
        }
    }
    (infos, failures)
}

/// The `SocketInfo` an entry's bytes hold; `None` for a value of another size (another build's
/// map).
fn socket_info(bytes: &[u8]) -> Option<SocketInfo> {
    if bytes.len() != size_of::<SocketInfo>() {
        return None;
    }
    // SAFETY: exactly size_of::<SocketInfo>() bytes of a plain-old-data repr(C) struct that any
    // bytes are valid for; read_unaligned because netlink attributes are only 4-aligned.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<SocketInfo>()) })
}

/// The first map value in an `INET_DIAG_SK_BPF_STORAGES` attribute's payload (the dump asks
/// for one map).
fn storage_value(payload: &[u8]) -> Option<Vec<u8>> {
    attributes(payload)
        .filter(|(kind, _)| *kind == SK_DIAG_BPF_STORAGE)
        .flat_map(|(_, storage)| attributes(storage))
        .find(|(kind, _)| *kind == SK_DIAG_BPF_STORAGE_MAP_VALUE)
        .map(|(_, value)| value.to_vec())
}

/// The (type, payload) of each netlink attribute in `bytes`.
fn attributes(mut bytes: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if bytes.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([bytes[0], bytes[1]]));
        let kind = u16::from_ne_bytes([bytes[2], bytes[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > bytes.len() {
            return None;
        }
        let payload = &bytes[4..len];
        bytes = &bytes[len.next_multiple_of(4).min(bytes.len())..];
        Some((kind, payload))
    })
}

/// A netlink attribute: length, type, payload, padded to 4 bytes.
fn nla(kind: u16, payload: &[u8]) -> Vec<u8> {
    let len = 4 + payload.len();
    let mut out = Vec::with_capacity(len.next_multiple_of(4));
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(len.next_multiple_of(4), 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_map_value_in_nested_storage_attributes() {
        let value = [7u8; 12];
        let storage = [nla(2, &42u32.to_ne_bytes()), nla(SK_DIAG_BPF_STORAGE_MAP_VALUE, &value)].concat();
        let payload = nla(SK_DIAG_BPF_STORAGE | NLA_F_NESTED, &storage);
        assert_eq!(storage_value(&payload).as_deref(), Some(&value[..]));
        assert_eq!(storage_value(&nla(SK_DIAG_BPF_STORAGE, &nla(2, &[0; 4]))), None, "no value");
        assert_eq!(storage_value(&[1, 0]), None, "truncated");
        assert_eq!(attributes(&[200, 0, 1, 0, 0, 0, 0, 0]).count(), 0, "a length past the end");
    }

    #[test]
    fn only_values_of_the_right_size_are_entries() {
        assert!(socket_info(&[0; 3]).is_none());
        let info = socket_info(&vec![0; size_of::<SocketInfo>()]).expect("right size");
        assert_eq!(info, SocketInfo::default());
    }
}
