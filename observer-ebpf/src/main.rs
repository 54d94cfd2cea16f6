//! observer's kernel programs.
//!
//! Five logical hooks, each served by one of two back ends the daemon picks per hook at start-up
//! (tracepoints where the kernel has them, kprobes otherwise; `--probes` forces one). Both back
//! ends call the same `on_*` functions below, so the logic lives in one place:
//!
//! | hook | tracepoint back end | kprobe back end | logic |
//! |---|---|---|---|
//! | set_state | `sock:inet_sock_set_state` | `tcp_set_state(sk, state)` | [`on_state_change`] |
//! | receive_reset | `tcp:tcp_receive_reset` | `tcp_reset(sk, skb)` | [`on_reset_received`] |
//! | send_reset | `tcp:tcp_send_reset` | `tcp_send_active_reset`, `tcp_v4_send_reset`, `tcp_v6_send_reset` | [`on_reset_sent`] |
//! | destroy | `tcp:tcp_destroy_sock` | `tcp_v4_destroy_sock(sk)` | [`on_destroy`] |
//! | accept | `syscalls:sys_exit_accept{,4}` | kretprobe `inet_csk_accept` | [`on_accept`] |
//!
//! * set_state follows each TCP socket's life. `CLOSE→SYN_SENT` runs inside `connect()`, so the
//!   current task *is* the owner (role client); `LISTEN→SYN_RECV` creates an accepted child in
//!   softirq (role server, owner learned at `accept()`); `X→CLOSE` ends the connection.
//! * accept records the accepting process as the owner of the new socket.
//! * receive_reset / send_reset report resets. They often run in softirq on whatever task was on
//!   the CPU (on loopback: the *peer*), so the owner always comes from the per-socket map, never
//!   from the current task.
//! * destroy is the socket's last event; the map entry goes with it.
//!
//! `ConnectionClosed` is emitted exactly once per connection, when everything needed to classify
//! it is known: at `X→CLOSE` if a reset was received or an error is set; otherwise after the
//! reset the kernel sends *after* `X→CLOSE` (close with unread data, SO_LINGER 0), or at
//! destroy when no reset follows (graceful close).
//!
//! Record offsets (tracepoints), struct offsets and argument positions (kprobes) come from the
//! `CONFIG` global, filled in by the daemon at load time from tracefs and the kernel's BTF.

#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated::{bpf_get_current_cgroup_id, bpf_get_current_task},
    },
    macros::{kprobe, kretprobe, map, tracepoint},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{ProbeContext, RetProbeContext, TracePointContext},
};
use aya_log_ebpf::debug;
use observer_common::{
    ABSENT, AF_INET, AF_INET6, ConnectionFacts, Endpoints, EventKind, Owner, ProbeConfig, ProbeId, REASON_NONE,
    Role, SkTupleFields, SocketEvent, SocketInfo, TASK_COMM_LEN, counter, flags, tcp_state,
};

/// Filled in by the daemon (`EbpfLoader::set_global`) before load. Read every field with
/// [`get`]: the compiler must not fold the `ABSENT` initialiser into the code.
#[unsafe(no_mangle)]
static CONFIG: ProbeConfig = ProbeConfig::ABSENT;

/// Per-socket state, keyed by the kernel address of `struct sock`. LRU so a socket we never see
/// destroyed (e.g. created before a restart) cannot fill it; the size is set by the daemon.
#[map]
static SOCKETS: LruHashMap<u64, SocketInfo> = LruHashMap::with_max_entries(65536, 0);

/// Sockets that were open before the daemon started, keyed by socket cookie: the daemon fills it
/// at start-up from the kernel's socket table (sock_diag, which also assigns every socket its
/// cookie) with the owner it found in /proc. A socket we have not seen is looked up here at its
/// first event and adopted into `SOCKETS`. Not preallocated: it is empty on most nodes.
#[map]
static SEEDS: HashMap<u64, SocketInfo> = HashMap::with_max_entries(65536, BPF_F_NO_PREALLOC);

/// The one ring buffer every event goes through; the size is set by the daemon.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// Room to build a new [`SocketInfo`] before inserting it: it does not fit on the 512-byte BPF
/// stack next to everything else.
#[map]
static SCRATCH: PerCpuArray<SocketInfo> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU counters (`observer_common::counter`): a full ring is counted here, never silent.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

const IPPROTO_TCP: u16 = 6;

#[inline(always)]
fn get(field: &u32) -> u32 {
    // SAFETY: plain read of a field of a static.
    unsafe { core::ptr::read_volatile(field) }
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(count) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *count += 1 }
    }
}

/// Reads a record field at a load-time offset; `T::default()` when this kernel lacks it.
#[inline(always)]
fn field<T: Default>(ctx: &TracePointContext, offset: u32) -> T {
    if offset == ABSENT {
        return T::default();
    }
    // SAFETY: bpf_probe_read_kernel checks the address; the offset comes from the format file.
    unsafe { ctx.read_at::<T>(offset as usize) }.unwrap_or_default()
}

/// Reads a kernel struct member at a BTF-derived offset.
#[inline(always)]
fn kread<T: Default>(base: u64, offset: u32) -> T {
    if base == 0 || offset == ABSENT {
        return T::default();
    }
    // SAFETY: bpf_probe_read_kernel checks the address.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T) }.unwrap_or_default()
}

#[inline(always)]
fn v4_mapped(addr: [u8; 4]) -> [u8; 16] {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, addr[0], addr[1], addr[2], addr[3]]
}

/// Endpoints from a record with the split `sport/dport/saddr/daddr` layout.
#[inline(always)]
fn read_tuple(ctx: &TracePointContext, f: &SkTupleFields) -> Endpoints {
    let mut e = Endpoints {
        local_port: field(ctx, get(&f.sport)),
        remote_port: field(ctx, get(&f.dport)),
        family: field(ctx, get(&f.family)),
        ..Endpoints::default()
    };
    if get(&f.saddr_v6) != ABSENT && e.family != AF_INET {
        // The v6 fields hold v4-mapped addresses for AF_INET sockets too.
        e.local_addr = field(ctx, get(&f.saddr_v6));
        e.remote_addr = field(ctx, get(&f.daddr_v6));
    } else {
        e.local_addr = v4_mapped(field(ctx, get(&f.saddr)));
        e.remote_addr = v4_mapped(field(ctx, get(&f.daddr)));
    }
    e
}

/// Reads a `struct sockaddr_in{,6}` as stored by `TP_STORE_ADDR_PORTS` (6.10+ `tcp_send_reset`)
/// into `port` / `addr`; returns the address family.
#[inline(always)]
fn read_sockaddr(ctx: &TracePointContext, offset: u32, port: &mut u16, addr: &mut [u8; 16]) -> u16 {
    let family: u16 = field(ctx, offset);
    *port = u16::from_be(field(ctx, offset + 2));
    *addr = if family == AF_INET6 { field(ctx, offset + 8) } else { v4_mapped(field(ctx, offset + 4)) };
    family
}

/// The endpoints a `tcp_send_reset` record names; `local` is the RST's sender (this host).
#[inline(always)]
fn read_send_reset_endpoints(ctx: &TracePointContext, e: &mut Endpoints) {
    let f = &CONFIG.send_reset;
    if get(&f.saddr_sockaddr) != ABSENT {
        e.family = read_sockaddr(ctx, get(&f.saddr_sockaddr), &mut e.local_port, &mut e.local_addr);
        read_sockaddr(ctx, get(&f.daddr_sockaddr), &mut e.remote_port, &mut e.remote_addr);
    } else {
        *e = read_tuple(ctx, &f.tuple);
    }
}

/// Inode number of the network namespace behind a `possible_net_t` at `base + offset`.
#[inline(always)]
fn netns_inum(base: u64, offset: u32) -> u32 {
    let net: u64 = kread(base, offset);
    kread(net, get(&CONFIG.kernel.net_inum))
}

/// False when a namespace filter is set and `sk` lives elsewhere.
#[inline(always)]
fn observed_sock(sk: u64) -> bool {
    let filter = get(&CONFIG.netns_filter);
    filter == 0 || netns_inum(sk, get(&CONFIG.kernel.sock_net)) == filter
}

/// The same for a segment that matched no socket, by the device it arrived on.
#[inline(always)]
fn observed_skb(skb: u64) -> bool {
    let filter = get(&CONFIG.netns_filter);
    if filter == 0 {
        return true;
    }
    let dev: u64 = kread(skb, get(&CONFIG.kernel.skb_dev));
    netns_inum(dev, get(&CONFIG.kernel.netdev_net)) == filter
}

/// The current process, for hooks that run in its syscall.
#[inline(always)]
fn current_owner() -> Owner {
    let kernel = &CONFIG.kernel;
    let mut owner = Owner { tgid: (bpf_get_current_pid_tgid() >> 32) as u32, ..Owner::default() };
    // SAFETY: helpers without arguments.
    owner.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let task = unsafe { bpf_get_current_task() };
    let leader: u64 = kread(task, get(&kernel.task_group_leader));
    let comm: [u8; TASK_COMM_LEN] = kread(leader, get(&kernel.task_comm));
    owner.comm = if comm[0] != 0 { comm } else { bpf_get_current_comm().unwrap_or_default() };
    owner
}

/// Writes one event for `sk` straight into the ring buffer (the BPF stack is too small for
/// copies); a full ring is counted per CPU.
#[inline(always)]
fn emit(kind: EventKind, probe: ProbeId, sk: u64, state: u8, info: &SocketInfo) {
    let Some(mut entry) = EVENTS.reserve::<SocketEvent>(0) else {
        bump(counter::RING_FULL);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at a reserved, exclusively owned record of the right size.
    unsafe {
        (*ev).kind = kind as u16;
        (*ev).probe = probe as u16;
        (*ev).role = info.role;
        (*ev).state = state;
        (*ev).reset_state = info.reset_state;
        (*ev).flags = info.flags;
        (*ev).timestamp_ns = bpf_ktime_get_ns();
        (*ev).sk = sk;
        (*ev).endpoints = info.endpoints;
        (*ev).owner = info.owner;
        (*ev).reason = info.reason;
        (*ev).unread_bytes = info.unread_bytes;
        (*ev).sk_err = info.sk_err;
        (*ev)._pad = 0;
        (*ev).facts = if kind == EventKind::ConnectionClosed { info.facts } else { ConnectionFacts::default() };
    }
    entry.submit(0);
}

/// Follows a socket's state: what the connection-state gauges and `states_seen` need.
#[inline(always)]
fn enter_state(info: &mut SocketInfo, state: u8, now: u64) {
    info.state = state;
    info.state_since_ns = now;
    if state < 16 {
        info.facts.states_seen |= 1 << state;
    }
}

/// Reads what `tcp_sock` knows about the connection as it reaches CLOSE.
#[inline(always)]
fn read_facts(sk: u64, info: &mut SocketInfo, now: u64) {
    let k = &CONFIG.kernel;
    let done_bit = get(&k.sock_done_bit);
    let fin = if done_bit < 64 { (kread::<u64>(sk, get(&k.sock_flags)) >> done_bit) & 1 } else { 0 };
    let f = &mut info.facts;
    f.fin_received = fin as u8;
    // Both counters are in sequence space: the FIN received counts one byte.
    f.bytes_received = kread::<u64>(sk, get(&k.tcp_bytes_received)).saturating_sub(fin);
    f.bytes_sent = kread::<u64>(sk, get(&k.tcp_bytes_sent)).saturating_sub(kread::<u64>(sk, get(&k.tcp_bytes_retrans)));
    f.srtt_us = kread::<u32>(sk, get(&k.tcp_srtt_us)) >> 3;
    f.retransmits = kread(sk, get(&k.tcp_total_retrans));
    f.data_segs_in = kread(sk, get(&k.tcp_data_segs_in));
    f.data_segs_out = kread(sk, get(&k.tcp_data_segs_out));
    f.duration_ns = if info.start_ns != 0 { now.saturating_sub(info.start_ns) } else { 0 };
}

/// Emits the ConnectionClosed owed for `sk`, if any.
#[inline(always)]
fn emit_close(probe: ProbeId, sk: u64, info: &mut SocketInfo) {
    if info.close_pending == 0 {
        return;
    }
    info.close_pending = 0;
    emit(EventKind::ConnectionClosed, probe, sk, info.close_state, info);
}

/// A zeroed [`SocketInfo`] in this CPU's scratch slot.
#[inline(always)]
fn fresh_info() -> Option<&'static mut SocketInfo> {
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
fn insert_new(sk: u64, info: &SocketInfo) {
    if SOCKETS.insert(&sk, info, 0).is_err() {
        bump(counter::SOCKET_MAP_FULL);
    }
}

/// The map entry for `sk`, adopted from `SEEDS` if the daemon found the socket at start-up.
#[inline(always)]
fn known_socket(sk: u64) -> Option<&'static mut SocketInfo> {
    if let Some(info) = SOCKETS.get_ptr_mut(&sk) {
        // SAFETY: map values live as long as the entry; programs on one socket are serialised
        // by the socket lock.
        return Some(unsafe { &mut *info });
    }
    let cookie: u64 = kread(sk, get(&CONFIG.kernel.sock_cookie));
    if cookie == 0 {
        return None;
    }
    // SAFETY: read-only use of the seed, copied into SOCKETS before it is removed.
    let seed = unsafe { SEEDS.get(&cookie) }?;
    insert_new(sk, seed);
    let _ = SEEDS.remove(&cookie);
    // SAFETY: as above.
    SOCKETS.get_ptr_mut(&sk).map(|info| unsafe { &mut *info })
}

/// The map entry for `sk`, created (owner unknown) if we have not seen the socket yet.
#[inline(always)]
fn socket_entry(sk: u64, endpoints: &Endpoints) -> Option<&'static mut SocketInfo> {
    if let Some(info) = known_socket(sk) {
        return Some(info);
    }
    create_entry(sk, endpoints, Role::Unknown, 0)
}

/// Creates the map entry for a socket not in the map yet (keeps one a racing program created).
#[inline(always)]
fn create_entry(sk: u64, endpoints: &Endpoints, role: Role, start_ns: u64) -> Option<&'static mut SocketInfo> {
    let info = fresh_info()?;
    info.endpoints = *endpoints;
    info.role = role as u8;
    info.start_ns = start_ns;
    if SOCKETS.insert(&sk, info, BPF_NOEXIST as u64).is_err() && SOCKETS.get_ptr_mut(&sk).is_none() {
        bump(counter::SOCKET_MAP_FULL);
        return None;
    }
    // SAFETY: as above.
    SOCKETS.get_ptr_mut(&sk).map(|info| unsafe { &mut *info })
}

// ---------------------------------------------------------------------------------------------
// The logic, shared by both back ends.
// ---------------------------------------------------------------------------------------------

/// `sk` (a TCP socket in an observed namespace) goes from state `old` to `new`.
#[inline(always)]
fn on_state_change(probe: ProbeId, sk: u64, old: u8, new: u8, endpoints: &Endpoints) {
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    match (old, new) {
        (tcp_state::CLOSE, tcp_state::SYN_SENT) => {
            // Inside connect(): process context, the current task owns the socket. A socket that
            // is connected again starts a new connection; settle the previous one first.
            if let Some(info) = SOCKETS.get_ptr_mut(&sk) {
                // SAFETY: see known_socket.
                emit_close(probe, sk, unsafe { &mut *info });
            }
            let Some(info) = fresh_info() else { return };
            info.endpoints = *endpoints;
            info.owner = current_owner();
            info.role = Role::Client as u8;
            info.flags = flags::OWNER_FROM_SYSCALL;
            info.start_ns = now;
            enter_state(info, new, now);
            insert_new(sk, info);
        }
        (tcp_state::LISTEN, tcp_state::SYN_RECV) => {
            // A child cloned from a listener, in softirq: the owner is learned at accept().
            // (Only the tracepoint sees this: the kernel sets SYN_RECV without tcp_set_state().)
            let Some(info) = fresh_info() else { return };
            info.endpoints = *endpoints;
            info.role = Role::Server as u8;
            info.start_ns = now;
            enter_state(info, new, now);
            insert_new(sk, info);
        }
        (_, tcp_state::ESTABLISHED) => {
            let info = match known_socket(sk) {
                Some(info) => info,
                // A child whose LISTEN→SYN_RECV was not seen: always so with the kprobe back end
                // (inet_csk_clone_lock() sets SYN_RECV directly), or the daemon started between.
                // Only passive opens leave SYN_RECV for ESTABLISHED on a socket new to us.
                None if old == tcp_state::SYN_RECV => {
                    let Some(info) = create_entry(sk, endpoints, Role::Server, now) else { return };
                    enter_state(info, old, now);
                    info
                }
                None => {
                    let Some(info) = create_entry(sk, endpoints, Role::Unknown, 0) else { return };
                    info
                }
            };
            // The source port of an active open is known from here on; tcp_disconnect() zeroes
            // the destination port later, so keep this copy.
            info.endpoints = *endpoints;
            enter_state(info, new, now);
        }
        (tcp_state::LISTEN, tcp_state::CLOSE) | (_, tcp_state::LISTEN) => {}
        (_, tcp_state::CLOSE) => {
            let Some(info) = socket_entry(sk, endpoints) else { return };
            if info.endpoints.remote_port == 0 || info.endpoints.local_port == 0 {
                info.endpoints = *endpoints;
            }
            let kernel = &CONFIG.kernel;
            // __tcp_close() purges the receive queue without advancing copied_seq, so this is
            // still the number of bytes the application never read.
            let rcv_nxt: u32 = kread(sk, get(&kernel.tcp_rcv_nxt));
            let copied_seq: u32 = kread(sk, get(&kernel.tcp_copied_seq));
            info.unread_bytes = rcv_nxt.wrapping_sub(copied_seq);
            info.sk_err = kread::<i32>(sk, get(&kernel.sock_err)) as u32;
            info.close_state = old;
            info.close_pending = 1;
            enter_state(info, new, now);
            read_facts(sk, info, now);
            // A received reset or an error is the whole story. Otherwise the kernel may still
            // send an RST for this close (unread data, SO_LINGER 0): wait for it or for destroy.
            if info.flags & (flags::RESET_RECEIVED | flags::RESET_SENT) != 0 || info.sk_err != 0 {
                emit_close(probe, sk, info);
            }
        }
        _ => {
            // FIN_WAIT*, CLOSE_WAIT, LAST_ACK, CLOSING, ...: follow the state of every socket,
            // including ones that predate the daemon (owner unknown).
            if let Some(info) = socket_entry(sk, endpoints) {
                enter_state(info, new, now);
            }
        }
    }
}

/// The kernel resets `sk` (an observed socket) because of an RST: `tcp_reset()`.
#[inline(always)]
fn on_reset_received(probe: ProbeId, sk: u64, endpoints: &Endpoints) {
    let Some(info) = socket_entry(sk, endpoints) else { return };
    info.flags |= flags::RESET_RECEIVED;
    info.reset_state = kread(sk, get(&CONFIG.kernel.sock_state));
    emit(EventKind::ResetReceived, probe, sk, info.reset_state, info);
}

/// This host sends an RST, on behalf of `sk` (0: a segment that matched no socket), in TCP state
/// `state` (0 without a socket). `endpoints` fills in what to report when `sk` is not a socket we
/// track; `local` is the RST's sender (this host).
#[inline(always)]
fn on_reset_sent(probe: ProbeId, sk: u64, reason: u32, state: u8, endpoints: impl FnOnce(&mut Endpoints)) {
    // A full socket we track: the reset is its owner's. Anything else (no socket, a TIME_WAIT
    // or request minisock, a listener) is reported with its endpoints and no owner.
    if sk != 0 && let Some(info) = known_socket(sk) {
        info.flags |= flags::RESET_SENT;
        info.reason = reason;
        emit(EventKind::ResetSent, probe, sk, state, info);
        emit_close(probe, sk, info);
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<SocketEvent>(0) else {
        bump(counter::RING_FULL);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at a reserved, exclusively owned record of the right size.
    unsafe {
        *ev = SocketEvent {
            kind: EventKind::ResetSent as u16,
            probe: probe as u16,
            state,
            flags: flags::RESET_SENT,
            timestamp_ns: bpf_ktime_get_ns(),
            sk,
            reason,
            ..SocketEvent::default()
        };
        endpoints(&mut (*ev).endpoints);
    }
    entry.submit(0);
}

/// `sk` is destroyed: its last event.
#[inline(always)]
fn on_destroy(probe: ProbeId, sk: u64) {
    if let Some(info) = SOCKETS.get_ptr_mut(&sk) {
        // SAFETY: see known_socket.
        emit_close(probe, sk, unsafe { &mut *info });
        let _ = SOCKETS.remove(&sk);
    }
}

/// `accept()` handed `sk` to the current process, in its context: it is the owner. `adopt`
/// creates the entry when the socket is new to us, for callers that know `sk` is a TCP child.
#[inline(always)]
fn on_accept(sk: u64, adopt: bool) {
    let info = match SOCKETS.get_ptr_mut(&sk) {
        // SAFETY: see known_socket.
        Some(info) => unsafe { &mut *info },
        None if adopt => {
            // SAFETY: helper without arguments.
            let now = unsafe { bpf_ktime_get_ns() };
            let mut endpoints = Endpoints::default();
            read_sock_endpoints(sk, &mut endpoints);
            let Some(info) = create_entry(sk, &endpoints, Role::Server, now) else { return };
            enter_state(info, kread(sk, get(&CONFIG.kernel.sock_state)), now);
            info
        }
        // Only sockets already known as TCP children (LISTEN→SYN_RECV) are touched, which also
        // leaves accept() on UNIX and other sockets alone.
        None => return,
    };
    info.owner = current_owner();
    info.role = Role::Server as u8;
    info.flags |= flags::OWNER_FROM_SYSCALL;
}

// ---------------------------------------------------------------------------------------------
// Tracepoint back end: endpoints from the record (layout from tracefs).
// ---------------------------------------------------------------------------------------------

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let f = &CONFIG.set_state;
    let protocol: u16 = if get(&f.protocol_size) == 1 {
        field::<u8>(&ctx, get(&f.protocol)) as u16
    } else {
        field(&ctx, get(&f.protocol))
    };
    if protocol != IPPROTO_TCP {
        return 0;
    }
    let sk: u64 = field(&ctx, get(&f.tuple.skaddr));
    if !observed_sock(sk) {
        return 0;
    }
    let old = field::<i32>(&ctx, get(&f.oldstate)) as u8;
    let new = field::<i32>(&ctx, get(&f.newstate)) as u8;
    let endpoints = read_tuple(&ctx, &f.tuple);
    on_state_change(ProbeId::InetSockSetState, sk, old, new, &endpoints);
    0
}

#[tracepoint]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    let f = &CONFIG.receive_reset;
    let sk: u64 = field(&ctx, get(&f.skaddr));
    if !observed_sock(sk) {
        return 0;
    }
    let endpoints = read_tuple(&ctx, f);
    on_reset_received(ProbeId::TcpReceiveReset, sk, &endpoints);
    0
}

#[tracepoint]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    let f = &CONFIG.send_reset;
    let sk: u64 = field(&ctx, get(&f.tuple.skaddr));
    let observed = if sk != 0 { observed_sock(sk) } else { observed_skb(field(&ctx, get(&f.skbaddr))) };
    if !observed {
        return 0;
    }
    let reason = if get(&f.reason) != ABSENT { field::<u32>(&ctx, get(&f.reason)) } else { REASON_NONE };
    let state = field::<i32>(&ctx, get(&f.state)) as u8;
    on_reset_sent(ProbeId::TcpSendReset, sk, reason, state, |e| read_send_reset_endpoints(&ctx, e));
    0
}

#[tracepoint]
pub fn tcp_destroy_sock(ctx: TracePointContext) -> u32 {
    on_destroy(ProbeId::TcpDestroySock, field(&ctx, get(&CONFIG.destroy_sock.skaddr)));
    0
}

/// `struct sock *` behind file descriptor `fd` of the current task, or 0.
#[inline(always)]
fn sock_of_fd(fd: u64) -> u64 {
    let k = &CONFIG.kernel;
    // SAFETY: helper without arguments.
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = kread(task, get(&k.task_files));
    let fdt: u64 = kread(files, get(&k.files_fdt));
    let max_fds: u32 = kread(fdt, get(&k.fdtable_max_fds));
    if fd >= max_fds as u64 {
        return 0;
    }
    let fd_array: u64 = kread(fdt, get(&k.fdtable_fd));
    if fd_array == 0 {
        return 0;
    }
    let file: u64 = kread(fd_array + fd * 8, 0);
    let socket: u64 = kread(file, get(&k.file_private_data));
    kread(socket, get(&k.socket_sk))
}

/// accept()/accept4() returned `fd` in process context: its owner is the current process.
#[inline(always)]
fn record_accept(ctx: &TracePointContext, ret_offset: u32) -> u32 {
    let ret: i64 = field(ctx, ret_offset);
    if ret < 0 {
        return 0;
    }
    let sk = sock_of_fd(ret as u64);
    if sk == 0 {
        debug!(ctx, "accept returned fd {} but its socket could not be read", ret);
        return 0;
    }
    // The fd may be any kind of socket: only known TCP children are touched.
    on_accept(sk, false);
    0
}

#[tracepoint]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    record_accept(&ctx, get(&CONFIG.accept4_ret))
}

#[tracepoint]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    record_accept(&ctx, get(&CONFIG.accept_ret))
}

// ---------------------------------------------------------------------------------------------
// Kprobe back end: arguments from registers (positions from BTF function prototypes),
// endpoints from `struct sock_common` or the segment's headers (offsets from BTF).
// ---------------------------------------------------------------------------------------------

/// A pointer argument of a kprobed function (0 if absent).
#[inline(always)]
fn ptr_arg(ctx: &ProbeContext, n: usize) -> u64 {
    ctx.arg::<u64>(n).unwrap_or(0)
}

/// The `enum sk_rst_reason` argument at position `index` (from the function's prototype in BTF:
/// the position differs between kernels, e.g. `tcp_send_active_reset(sk, reason)` on 6.12 and
/// `(sk, priority, reason)` on 6.18), [`REASON_NONE`] if the function has none (before 6.10).
#[inline(always)]
fn reason_arg(ctx: &ProbeContext, index: u32) -> u32 {
    // The verifier only allows `pt_regs` reads at constant offsets: read each candidate
    // register on its own (black_box keeps LLVM from turning the choice into one read at a
    // computed offset), then choose the value.
    let second = core::hint::black_box(ctx.arg::<u64>(1).unwrap_or(0));
    let third = core::hint::black_box(ctx.arg::<u64>(2).unwrap_or(0));
    match index {
        1 => second as u32,
        2 => third as u32,
        _ => REASON_NONE,
    }
}

/// A socket's endpoints from its `struct sock_common` (also valid for TIME_WAIT and request
/// minisocks, which share it). IPv4 addresses are stored v4-mapped, as the records have them.
#[inline(always)]
fn read_sock_endpoints(sk: u64, e: &mut Endpoints) {
    let k = &CONFIG.kernel;
    e.family = kread(sk, get(&k.sock_family));
    e.local_port = kread(sk, get(&k.sock_num));
    e.remote_port = u16::from_be(kread(sk, get(&k.sock_dport)));
    if e.family == AF_INET6 && get(&k.sock_v6_daddr) != ABSENT {
        // v4-mapped for an AF_INET6 socket talking IPv4, exactly as the tracepoints show it.
        e.local_addr = kread(sk, get(&k.sock_v6_rcv_saddr));
        e.remote_addr = kread(sk, get(&k.sock_v6_daddr));
    } else {
        e.local_addr = v4_mapped(kread(sk, get(&k.sock_rcv_saddr)));
        e.remote_addr = v4_mapped(kread(sk, get(&k.sock_daddr)));
    }
}

/// The endpoints of the RST answering segment `skb`: its destination is this host (`local`).
#[inline(always)]
fn read_skb_endpoints(skb: u64, e: &mut Endpoints) {
    let k = &CONFIG.kernel;
    let head: u64 = kread(skb, get(&k.skb_head));
    if head == 0 {
        return;
    }
    let ip = head + kread::<u16>(skb, get(&k.skb_network_header)) as u64;
    let th = head + kread::<u16>(skb, get(&k.skb_transport_header)) as u64;
    e.local_port = u16::from_be(kread(th, get(&k.tcphdr_dest)));
    e.remote_port = u16::from_be(kread(th, get(&k.tcphdr_source)));
    // The IP version is the first nibble of either header (wire format).
    if kread::<u8>(ip, 0) >> 4 == 6 {
        e.family = AF_INET6;
        e.local_addr = kread(ip, get(&k.ipv6hdr_daddr));
        e.remote_addr = kread(ip, get(&k.ipv6hdr_saddr));
    } else {
        e.family = AF_INET;
        e.local_addr = v4_mapped(kread(ip, get(&k.iphdr_daddr)));
        e.remote_addr = v4_mapped(kread(ip, get(&k.iphdr_saddr)));
    }
}

/// Byte 13 of a TCP header holds the flags; RST is bit 2 (wire format, RFC 9293).
const TCPHDR_FLAGS: u32 = 13;
const TCP_FLAG_RST: u8 = 0x04;

#[kprobe]
pub fn tcp_set_state(ctx: ProbeContext) -> u32 {
    let sk = ptr_arg(&ctx, 0);
    if sk == 0 || !observed_sock(sk) {
        return 0;
    }
    // Called before the state is stored: the socket still holds the old one.
    let old: u8 = kread(sk, get(&CONFIG.kernel.sock_state));
    let new = ctx.arg::<i32>(1).unwrap_or(0) as u8;
    let mut endpoints = Endpoints::default();
    read_sock_endpoints(sk, &mut endpoints);
    on_state_change(ProbeId::TcpSetState, sk, old, new, &endpoints);
    0
}

#[kprobe]
pub fn tcp_reset(ctx: ProbeContext) -> u32 {
    let sk = ptr_arg(&ctx, 0);
    if sk == 0 || !observed_sock(sk) {
        return 0;
    }
    let mut endpoints = Endpoints::default();
    read_sock_endpoints(sk, &mut endpoints);
    on_reset_received(ProbeId::TcpReset, sk, &endpoints);
    0
}

/// A reset this host initiates on a full socket (close with unread data, SO_LINGER 0, abort,
/// keepalive timeout, ...).
#[kprobe]
pub fn tcp_send_active_reset(ctx: ProbeContext) -> u32 {
    let sk = ptr_arg(&ctx, 0);
    if sk == 0 || !observed_sock(sk) {
        return 0;
    }
    let reason = reason_arg(&ctx, get(&CONFIG.kprobe.active_reset_reason));
    let state: u8 = kread(sk, get(&CONFIG.kernel.sock_state));
    on_reset_sent(ProbeId::TcpSendActiveReset, sk, reason, state, |e| read_sock_endpoints(sk, e));
    0
}

/// A reset answering segment `skb`, for socket `sk`: a full socket, a TIME_WAIT or request
/// minisock, a listener, or none (NULL: nothing matched the segment).
#[inline(always)]
fn passive_reset(ctx: &ProbeContext, probe: ProbeId, reason_index: u32) -> u32 {
    let sk = ptr_arg(ctx, 0);
    let skb = ptr_arg(ctx, 1);
    if skb == 0 {
        return 0;
    }
    // The kernel never answers an RST with an RST: it returns before sending (and before the
    // tracepoint), so do the same.
    let k = &CONFIG.kernel;
    let head: u64 = kread(skb, get(&k.skb_head));
    let th = head + kread::<u16>(skb, get(&k.skb_transport_header)) as u64;
    if head != 0 && kread::<u8>(th, TCPHDR_FLAGS) & TCP_FLAG_RST != 0 {
        return 0;
    }
    let observed = if sk != 0 { observed_sock(sk) } else { observed_skb(skb) };
    if !observed {
        return 0;
    }
    let reason = reason_arg(ctx, reason_index);
    let state: u8 = if sk != 0 { kread(sk, get(&k.sock_state)) } else { 0 };
    // A connection's own endpoints when it has them; a listener's or a minisock's are partial or
    // the same as the segment's, so take the segment's.
    let full = sk != 0
        && state != tcp_state::LISTEN
        && state != tcp_state::TIME_WAIT
        && state != tcp_state::NEW_SYN_RECV;
    on_reset_sent(probe, sk, reason, state, |e| if full { read_sock_endpoints(sk, e) } else { read_skb_endpoints(skb, e) });
    0
}

#[kprobe]
pub fn tcp_v4_send_reset(ctx: ProbeContext) -> u32 {
    passive_reset(&ctx, ProbeId::TcpV4SendReset, get(&CONFIG.kprobe.v4_reset_reason))
}

#[kprobe]
pub fn tcp_v6_send_reset(ctx: ProbeContext) -> u32 {
    passive_reset(&ctx, ProbeId::TcpV6SendReset, get(&CONFIG.kprobe.v6_reset_reason))
}

/// IPv6 TCP sockets are destroyed through `tcp_v4_destroy_sock()` too (directly since 6.3,
/// through `tcp_v6_destroy_sock()` before), the function that fires `tcp:tcp_destroy_sock`.
#[kprobe]
pub fn tcp_v4_destroy_sock(ctx: ProbeContext) -> u32 {
    on_destroy(ProbeId::TcpV4DestroySock, ptr_arg(&ctx, 0));
    0
}

/// `inet_csk_accept()` returns the accepted child in the accepting process's context (NULL on
/// error). It can return before the child's SYN_RECV→ESTABLISHED has been seen on another CPU,
/// so a child new to us is adopted here.
#[kretprobe]
pub fn inet_csk_accept(ctx: RetProbeContext) -> u32 {
    let sk: u64 = ctx.ret();
    if sk == 0 || !observed_sock(sk) {
        return 0;
    }
    on_accept(sk, true);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
