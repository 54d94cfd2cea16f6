//! The maps and the `CONFIG` global every program shares, and the two accessors everything else
//! uses on them: [`get`] for a `CONFIG` field, [`bump`] for a per-CPU counter.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use observer_common::{ProbeConfig, SocketInfo, counter};

/// Filled in by the daemon (`EbpfLoader::set_global`) before load. Read every field with
/// [`get`]: the compiler must not fold the `ABSENT` initialiser into the code.
#[unsafe(no_mangle)]
pub static CONFIG: ProbeConfig = ProbeConfig::ABSENT;

/// Per-socket state on the socket itself (socket-local storage), for the BTF tracepoint
/// programs: see `socket::LocalStore`. No size: an entry per tracked socket, freed with it.
#[btf_map]
pub static SOCKET_STORAGE: SkStorage<SocketInfo> = SkStorage::new();

/// Per-socket state for the classic tracepoint and kprobe programs, keyed by the kernel address
/// of `struct sock`. LRU so a socket we never see destroyed (e.g. created before a restart)
/// cannot fill it; the size is set by the daemon (1 entry when the storage above is used).
#[map]
pub static SOCKETS: LruHashMap<u64, SocketInfo> = LruHashMap::with_max_entries(65536, 0);

/// Sockets that were open before the daemon started, keyed by socket cookie: the daemon fills it
/// at start-up from the kernel's socket table (sock_diag, which also assigns every socket its
/// cookie) with the owner it found in /proc. A socket we have not seen is looked up here at its
/// first event and adopted into the socket's entry (`socket::known_socket`). Not preallocated: it is
/// empty on most nodes.
#[map]
pub static SEEDS: HashMap<u64, SocketInfo> = HashMap::with_max_entries(65536, BPF_F_NO_PREALLOC);

/// The one ring buffer every event goes through; the size is set by the daemon.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// Per-CPU counters (`observer_common::counter`): a full ring is counted here, never silent.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// A field of [`CONFIG`], read as the daemon set it.
#[inline(always)]
pub fn get(field: &u32) -> u32 {
    // SAFETY: plain read of a field of a static.
    unsafe { core::ptr::read_volatile(field) }
}

/// Adds one to this CPU's counter `index` (`observer_common::counter`).
#[inline(always)]
pub fn bump(index: u32) {
    if let Some(count) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *count += 1 }
    }
}
