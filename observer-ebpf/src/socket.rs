//! Per-socket state: the [`SocketInfo`] entry each socket has, where it lives (a
//! [`SocketStore`]), how it is found, created or adopted from a start-up seed ([`SEEDS`]), and the
//! state it follows.
//!
//! Two stores, one per kind of program (`StoreConfig` in `observer-common` says which one the
//! daemon reads):
//! * [`LocalStore`], socket-local storage (`SOCKET_STORAGE`): the BTF tracepoint programs'. The
//!   entry hangs off the socket itself, so finding it is a walk of the socket's (short) storage
//!   list instead of a hash lookup, a new one comes zeroed, and it goes with the socket: no
//!   insert copy, no delete, no LRU eviction. Only tracing programs may use it, with the
//!   kernel's own (BTF-typed) `struct sock *`.
//! * [`HashStore`], the `SOCKETS` LRU hash keyed by the socket's address: the classic tracepoint
//!   and kprobe programs', which hold the socket as a plain number.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, BPF_SK_STORAGE_GET_F_CREATE},
    helpers::generated::bpf_sk_storage_get,
};
use observer_common::{Endpoints, Role, SocketInfo, counter};

use crate::{
    maps::{CONFIG, SEEDS, SOCKET_STORAGE, SOCKETS, bump, get},
    read::KernelMemory,
};

/// Where a socket's entry lives. `find_or_make` hands out a zeroed entry for a socket that has
/// none (`tracked` 0: the caller fills it in); both return `None` only when there is no room,
/// which `find_or_make` counts.
pub trait SocketStore: Copy {
    fn find(self, sk: u64) -> Option<&'static mut SocketInfo>;
    fn find_or_make(self, sk: u64) -> Option<&'static mut SocketInfo>;
    /// `sk` is destroyed: its entry is no longer needed.
    fn forget(self, sk: u64);
}

/// Socket-local storage, for the BTF tracepoint programs (`sk` must be the kernel's BTF-typed
/// `struct sock *`, as their arguments are).
#[derive(Clone, Copy)]
pub struct LocalStore;

impl LocalStore {
    #[inline(always)]
    fn get(sk: u64, flags: u64) -> Option<&'static mut SocketInfo> {
        let map = core::ptr::from_ref(&SOCKET_STORAGE).cast_mut().cast();
        // SAFETY: the helper checks `sk` (a typed socket pointer) and returns the socket's entry
        // or NULL; the entry lives as long as the socket, which outlives this program run.
        let info = unsafe { bpf_sk_storage_get(map, sk as *mut _, core::ptr::null_mut(), flags) };
        // SAFETY: as above; programs on one socket are serialised by the socket lock.
        (!info.is_null()).then(|| unsafe { &mut *info.cast::<SocketInfo>() })
    }
}

impl SocketStore for LocalStore {
    #[inline(always)]
    fn find(self, sk: u64) -> Option<&'static mut SocketInfo> {
        Self::get(sk, 0)
    }

    #[inline(always)]
    fn find_or_make(self, sk: u64) -> Option<&'static mut SocketInfo> {
        let info = Self::get(sk, BPF_SK_STORAGE_GET_F_CREATE as u64);
        if info.is_none() {
            bump(counter::SOCKET_MAP_FULL);
        }
        info
    }

    /// The entry goes with the socket.
    #[inline(always)]
    fn forget(self, _sk: u64) {}
}

/// The `SOCKETS` hash, for the classic tracepoint and kprobe programs.
#[derive(Clone, Copy)]
pub struct HashStore;

/// What a new `SOCKETS` entry starts as (read-only data: inserting copies it).
static EMPTY_INFO: SocketInfo = unsafe { core::mem::zeroed() };

impl SocketStore for HashStore {
    #[inline(always)]
    fn find(self, sk: u64) -> Option<&'static mut SocketInfo> {
        // SAFETY: map values live as long as the entry; programs on one socket are serialised
        // by the socket lock.
        SOCKETS.get_ptr_mut(&sk).map(|info| unsafe { &mut *info })
    }

    /// Inserts first: callers make entries for sockets that are new, the common case.
    #[inline(always)]
    fn find_or_make(self, sk: u64) -> Option<&'static mut SocketInfo> {
        let _ = SOCKETS.insert(&sk, &EMPTY_INFO, BPF_NOEXIST as u64);
        let info = self.find(sk);
        if info.is_none() {
            bump(counter::SOCKET_MAP_FULL);
        }
        info
    }

    #[inline(always)]
    fn forget(self, sk: u64) {
        let _ = SOCKETS.remove(&sk);
    }
}

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

/// The entry of a connection starting on `sk` now, empty but for `role`, its endpoints and
/// `start_ns`. An entry `sk` already has belongs to an earlier connection (a socket connected
/// again, or a stale hash entry at a reused address): `settle` gets it first, then it is
/// cleared.
#[inline(always)]
pub fn start_entry(
    s: impl SocketStore,
    sk: u64,
    role: Role,
    start_ns: u64,
    endpoints: impl FnOnce(&mut Endpoints),
    settle: impl FnOnce(&mut SocketInfo),
) -> Option<&'static mut SocketInfo> {
    let info = s.find_or_make(sk)?;
    if info.tracked != 0 {
        settle(info);
        // SAFETY: all-zero bytes are a valid SocketInfo.
        unsafe { core::ptr::write_bytes(info as *mut SocketInfo, 0, 1) };
    }
    fill(info, sk, role, start_ns, endpoints);
    Some(info)
}

#[inline(always)]
fn fill(info: &mut SocketInfo, sk: u64, role: Role, start_ns: u64, endpoints: impl FnOnce(&mut Endpoints)) {
    endpoints(&mut info.endpoints);
    info.role = role as u8;
    info.start_ns = start_ns;
    info.sk = sk;
    info.tracked = 1;
}

/// The entry for `sk`, adopted from `SEEDS` if the daemon found the socket at start-up.
#[inline(always)]
pub fn known_socket(s: impl SocketStore, m: impl KernelMemory, sk: u64) -> Option<&'static mut SocketInfo> {
    if let Some(info) = s.find(sk) {
        return Some(info);
    }
    let cookie: u64 = m.read(sk, get(&CONFIG.kernel.sock_cookie));
    if cookie == 0 {
        return None;
    }
    // SAFETY: read-only use of the seed, copied into the store before it is removed.
    let seed = unsafe { SEEDS.get(&cookie) }?;
    let info = s.find_or_make(sk)?;
    *info = *seed;
    info.sk = sk;
    info.tracked = 1;
    let _ = SEEDS.remove(&cookie);
    Some(info)
}

/// The entry for `sk`, created (owner unknown) if we have not seen the socket yet.
#[inline(always)]
pub fn socket_entry(
    s: impl SocketStore,
    m: impl KernelMemory,
    sk: u64,
    endpoints: impl FnOnce(&mut Endpoints),
) -> Option<&'static mut SocketInfo> {
    if let Some(info) = known_socket(s, m, sk) {
        return Some(info);
    }
    create_entry(s, sk, endpoints, Role::Unknown, 0)
}

/// Creates the entry for a socket not seen yet (keeps one a racing program created).
#[inline(always)]
pub fn create_entry(
    s: impl SocketStore,
    sk: u64,
    endpoints: impl FnOnce(&mut Endpoints),
    role: Role,
    start_ns: u64,
) -> Option<&'static mut SocketInfo> {
    let info = s.find_or_make(sk)?;
    if info.tracked == 0 {
        fill(info, sk, role, start_ns, endpoints);
    }
    Some(info)
}
