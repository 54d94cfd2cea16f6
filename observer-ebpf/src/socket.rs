//! Per-socket state: the [`SocketInfo`] entry each socket has in [`SOCKETS`], found, created or
//! adopted from a start-up seed ([`SEEDS`]), and the state it follows.

use aya_ebpf::bindings::BPF_NOEXIST;
use observer_common::{Endpoints, Role, SocketInfo, counter};

use crate::{
    maps::{CONFIG, SCRATCH, SEEDS, SOCKETS, bump, get},
    read::KernelMemory,
};

/// Follows a socket's state: what the connection-state gauges and `states_seen` need. `since`
/// is when it entered `state` where that is kept (see `SocketInfo::state_since_ns`), else 0.
#[inline(always)]
pub fn enter_state(info: &mut SocketInfo, state: u8, since: u64) {
    info.state = state;
    info.state_since_ns = since;
    if state < 16 {
        info.facts.states_seen |= 1 << state;
    }
}

/// A zeroed [`SocketInfo`] in this CPU's scratch slot.
#[inline(always)]
pub fn fresh_info() -> Option<&'static mut SocketInfo> {
    let info = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot, used only until the program inserts it into SOCKETS; all-zero
    // bytes are a valid SocketInfo.
    unsafe {
        core::ptr::write_bytes(info, 0, 1);
        Some(&mut *info)
    }
}

/// Inserts a new entry for `sk` (replacing any), counting a full map.
#[inline(always)]
pub fn insert_new(sk: u64, info: &SocketInfo) {
    if SOCKETS.insert(&sk, info, 0).is_err() {
        bump(counter::SOCKET_MAP_FULL);
    }
}

/// The map entry for `sk`, adopted from `SEEDS` if the daemon found the socket at start-up.
#[inline(always)]
pub fn known_socket(m: impl KernelMemory, sk: u64) -> Option<&'static mut SocketInfo> {
    if let Some(info) = SOCKETS.get_ptr_mut(&sk) {
        // SAFETY: map values live as long as the entry; programs on one socket are serialised
        // by the socket lock.
        return Some(unsafe { &mut *info });
    }
    let cookie: u64 = m.read(sk, get(&CONFIG.kernel.sock_cookie));
    if cookie == 0 {
        return None;
    }
    // SAFETY: read-only use of the seed, copied into SOCKETS before it is removed.
    let seed = unsafe { SEEDS.get(&cookie) }?;
    insert_new(sk, seed);
    let _ = SEEDS.remove(&cookie);
    // SAFETY: as for the SOCKETS entry above.
    SOCKETS.get_ptr_mut(&sk).map(|info| unsafe { &mut *info })
}

/// The map entry for `sk`, created (owner unknown) if we have not seen the socket yet.
#[inline(always)]
pub fn socket_entry(
    m: impl KernelMemory,
    sk: u64,
    endpoints: impl FnOnce(&mut Endpoints),
) -> Option<&'static mut SocketInfo> {
    if let Some(info) = known_socket(m, sk) {
        return Some(info);
    }
    create_entry(sk, endpoints, Role::Unknown, 0)
}

/// Creates the map entry for a socket not in the map yet (keeps one a racing program created).
#[inline(always)]
pub fn create_entry(
    sk: u64,
    endpoints: impl FnOnce(&mut Endpoints),
    role: Role,
    start_ns: u64,
) -> Option<&'static mut SocketInfo> {
    let info = fresh_info()?;
    endpoints(&mut info.endpoints);
    info.role = role as u8;
    info.start_ns = start_ns;
    if SOCKETS.insert(&sk, info, BPF_NOEXIST as u64).is_err() && SOCKETS.get_ptr_mut(&sk).is_none() {
        bump(counter::SOCKET_MAP_FULL);
        return None;
    }
    // SAFETY: as in known_socket.
    SOCKETS.get_ptr_mut(&sk).map(|info| unsafe { &mut *info })
}
