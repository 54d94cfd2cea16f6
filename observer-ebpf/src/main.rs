//! observer's kernel programs.
//!
//! One event path, four tracepoints and two syscall exits:
//!
//! * `sock:inet_sock_set_state` follows each TCP socket's life. `CLOSE→SYN_SENT` runs inside
//!   `connect()`, so the current task *is* the owner (role client); `LISTEN→SYN_RECV` creates an
//!   accepted child in softirq (role server, owner learned at `accept()`); `X→CLOSE` ends the
//!   connection.
//! * `syscalls:sys_exit_accept{,4}` walk the new fd to its `struct sock` and record the accepting
//!   process as owner.
//! * `tcp:tcp_receive_reset` / `tcp:tcp_send_reset` report resets. They often run in softirq on
//!   whatever task was on the CPU (on loopback: the *peer*), so the owner always comes from the
//!   per-socket map, never from the current task.
//! * `tcp:tcp_destroy_sock` is the socket's last event; the map entry goes with it.
//!
//! `ConnectionClosed` is emitted exactly once per connection, when everything needed to classify
//! it is known: at `X→CLOSE` if a reset was received or an error is set; otherwise after the
//! reset the kernel sends *after* `X→CLOSE` (close with unread data, SO_LINGER 0), or at
//! `tcp_destroy_sock` when no reset follows (graceful close).
//!
//! Record and struct offsets come from the `CONFIG` global, filled in by the daemon at load time.

#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated::{bpf_get_current_cgroup_id, bpf_get_current_task},
    },
    macros::{map, tracepoint},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
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
    let info = fresh_info()?;
    info.endpoints = *endpoints;
    if SOCKETS.insert(&sk, info, BPF_NOEXIST as u64).is_err() && SOCKETS.get_ptr_mut(&sk).is_none() {
        bump(counter::SOCKET_MAP_FULL);
        return None;
    }
    // SAFETY: as above.
    SOCKETS.get_ptr_mut(&sk).map(|info| unsafe { &mut *info })
}

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
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    match (old, new) {
        (tcp_state::CLOSE, tcp_state::SYN_SENT) => {
            // Inside connect(): process context, the current task owns the socket. A socket that
            // is connected again starts a new connection; settle the previous one first.
            if let Some(info) = SOCKETS.get_ptr_mut(&sk) {
                // SAFETY: see socket_entry.
                emit_close(ProbeId::InetSockSetState, sk, unsafe { &mut *info });
            }
            let Some(info) = fresh_info() else { return 0 };
            info.endpoints = endpoints;
            info.owner = current_owner();
            info.role = Role::Client as u8;
            info.flags = flags::OWNER_FROM_SYSCALL;
            info.start_ns = now;
            enter_state(info, new, now);
            insert_new(sk, info);
        }
        (tcp_state::LISTEN, tcp_state::SYN_RECV) => {
            // A child cloned from a listener, in softirq: the owner is learned at accept().
            let Some(info) = fresh_info() else { return 0 };
            info.endpoints = endpoints;
            info.role = Role::Server as u8;
            info.start_ns = now;
            enter_state(info, new, now);
            insert_new(sk, info);
        }
        (_, tcp_state::ESTABLISHED) => {
            // The source port of an active open is known from here on; tcp_disconnect() zeroes
            // the destination port later, so keep this copy.
            if let Some(info) = socket_entry(sk, &endpoints) {
                info.endpoints = endpoints;
                enter_state(info, new, now);
            }
        }
        (tcp_state::LISTEN, tcp_state::CLOSE) | (_, tcp_state::LISTEN) => {}
        (_, tcp_state::CLOSE) => {
            let Some(info) = socket_entry(sk, &endpoints) else { return 0 };
            if info.endpoints.remote_port == 0 || info.endpoints.local_port == 0 {
                info.endpoints = endpoints;
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
                emit_close(ProbeId::InetSockSetState, sk, info);
            }
        }
        _ => {
            // FIN_WAIT*, CLOSE_WAIT, LAST_ACK, CLOSING, ...: follow the state of every socket,
            // including ones that predate the daemon (owner unknown).
            if let Some(info) = socket_entry(sk, &endpoints) {
                enter_state(info, new, now);
            }
        }
    }
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
    let Some(info) = socket_entry(sk, &endpoints) else { return 0 };
    info.flags |= flags::RESET_RECEIVED;
    info.reset_state = kread(sk, get(&CONFIG.kernel.sock_state));
    emit(EventKind::ResetReceived, ProbeId::TcpReceiveReset, sk, info.reset_state, info);
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

    // A full socket we track: the reset is its owner's. Anything else (no socket, a TIME_WAIT
    // or request minisock) is reported with what the record says and no owner.
    if sk != 0 && let Some(info) = known_socket(sk) {
        info.flags |= flags::RESET_SENT;
        info.reason = reason;
        emit(EventKind::ResetSent, ProbeId::TcpSendReset, sk, state, info);
        emit_close(ProbeId::TcpSendReset, sk, info);
        return 0;
    }
    let Some(mut entry) = EVENTS.reserve::<SocketEvent>(0) else {
        bump(counter::RING_FULL);
        return 0;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at a reserved, exclusively owned record of the right size.
    unsafe {
        *ev = SocketEvent {
            kind: EventKind::ResetSent as u16,
            probe: ProbeId::TcpSendReset as u16,
            state,
            flags: flags::RESET_SENT,
            timestamp_ns: bpf_ktime_get_ns(),
            sk,
            reason,
            ..SocketEvent::default()
        };
        read_send_reset_endpoints(&ctx, &mut (*ev).endpoints);
    }
    entry.submit(0);
    0
}

#[tracepoint]
pub fn tcp_destroy_sock(ctx: TracePointContext) -> u32 {
    let sk: u64 = field(&ctx, get(&CONFIG.destroy_sock.skaddr));
    if let Some(info) = SOCKETS.get_ptr_mut(&sk) {
        // SAFETY: see socket_entry.
        emit_close(ProbeId::TcpDestroySock, sk, unsafe { &mut *info });
        let _ = SOCKETS.remove(&sk);
    }
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
    // Only sockets already known as TCP children (LISTEN→SYN_RECV) are touched, which also
    // leaves accept() on UNIX and other sockets alone.
    if let Some(info) = SOCKETS.get_ptr_mut(&sk) {
        // SAFETY: see socket_entry.
        let info = unsafe { &mut *info };
        info.owner = current_owner();
        info.role = Role::Server as u8;
        info.flags |= flags::OWNER_FROM_SYSCALL;
    }
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
