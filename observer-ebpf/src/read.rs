//! Kernel reads. Nothing about the kernel's layout is compiled in: every offset comes from
//! [`CONFIG`], filled in by the daemon from tracefs (tracepoint records) and the kernel's BTF
//! (struct members), and a field this kernel lacks is `ABSENT` and reads as its default.
//!
//! * tracepoint records: [`field`], and the endpoints a record names ([`read_tuple`],
//!   [`read_send_reset_endpoints`]);
//! * kernel structs: [`kread`], for untyped pointers (a segment's headers, the fd array, a file's
//!   `private_data`);
//! * a socket's members (its endpoints, the namespace filter, a connection's facts at CLOSE) and
//!   the current task's (the socket behind a file descriptor, the owner's `comm`) through a
//!   [`KernelMemory`]: [`ProbeRead`] (a helper call per read, for any pointer) or [`TypedLoad`]
//!   (plain loads the verifier checks against the kernel's BTF, with no helper call) for the BTF
//!   tracepoint programs' socket and, on 5.11+, the current task.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_kernel,
        generated::{bpf_get_current_cgroup_id, bpf_get_current_task, bpf_get_current_task_btf, bpf_skc_to_tcp_sock},
    },
    programs::TracePointContext,
};
use observer_common::{ABSENT, AF_INET, AF_INET6, Endpoints, Owner, SkTupleFields, SocketInfo, TASK_COMM_LEN};

use crate::maps::{CONFIG, get};

// ---------------------------------------------------------------------------------------------
// Tracepoint records (layout from tracefs).
// ---------------------------------------------------------------------------------------------

/// Reads a record field at a load-time offset; `T::default()` when this kernel lacks it.
#[inline(always)]
pub fn field<T: Default>(ctx: &TracePointContext, offset: u32) -> T {
    if offset == ABSENT {
        return T::default();
    }
    // SAFETY: bpf_probe_read_kernel checks the address; the offset comes from the format file.
    unsafe { ctx.read_at::<T>(offset as usize) }.unwrap_or_default()
}

/// `::ffff:a.b.c.d`. Built from words: as bytes, the compiler zeroes the first ten with a call to
/// a byte-at-a-time `memset`, on every endpoint read.
#[inline(always)]
fn v4_mapped(addr: [u8; 4]) -> [u8; 16] {
    let words = [0u32, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), u32::from_ne_bytes(addr)];
    // SAFETY: four u32s are sixteen bytes, any of which is a valid u8.
    unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(words) }
}

/// Endpoints from a record with the split `sport/dport/saddr/daddr` layout.
#[inline(always)]
pub fn read_tuple(ctx: &TracePointContext, f: &SkTupleFields) -> Endpoints {
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
pub fn read_send_reset_endpoints(ctx: &TracePointContext, e: &mut Endpoints) {
    let f = &CONFIG.send_reset;
    if get(&f.saddr_sockaddr) != ABSENT {
        e.family = read_sockaddr(ctx, get(&f.saddr_sockaddr), &mut e.local_port, &mut e.local_addr);
        read_sockaddr(ctx, get(&f.daddr_sockaddr), &mut e.remote_port, &mut e.remote_addr);
    } else {
        *e = read_tuple(ctx, &f.tuple);
    }
}

// ---------------------------------------------------------------------------------------------
// Kernel structs (member offsets from BTF).
// ---------------------------------------------------------------------------------------------

/// Reads a kernel struct member at a BTF-derived offset.
#[inline(always)]
pub fn kread<T: Default>(base: u64, offset: u32) -> T {
    if base == 0 || offset == ABSENT {
        return T::default();
    }
    // SAFETY: bpf_probe_read_kernel checks the address.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T) }.unwrap_or_default()
}

/// How a program reads the members of a kernel struct it holds a pointer to: a socket's (its
/// `struct sock`, the `struct tcp_sock` around it, the `struct net` it points to) or the current
/// task's. Offsets come from `CONFIG` either way.
///
/// A state change runs about ten times per connection and each run reads several members, so
/// the read itself matters: a `bpf_probe_read_kernel` call costs far more than a load.
pub trait KernelMemory: Copy {
    /// The member at `offset` of the struct `base` points to; `T::default()` for a NULL `base`
    /// or an `ABSENT` member.
    fn read<T: Default>(self, base: u64, offset: u32) -> T;
    /// `sk` as a `struct tcp_sock *`, for the members past `struct sock` (0 if it is not a full
    /// TCP socket).
    fn tcp_sock(self, sk: u64) -> u64;
}

/// Reads through `bpf_probe_read_kernel`: works on any address, as the classic tracepoint and
/// kprobe programs have them (untyped integers).
#[derive(Clone, Copy)]
pub struct ProbeRead;

impl KernelMemory for ProbeRead {
    #[inline(always)]
    fn read<T: Default>(self, base: u64, offset: u32) -> T {
        kread(base, offset)
    }

    #[inline(always)]
    fn tcp_sock(self, sk: u64) -> u64 {
        sk
    }
}

/// Plain loads, for BTF-typed pointers: the BTF tracepoint programs' `struct sock *` argument,
/// the current task from `bpf_get_current_task_btf` (any program, 5.11+), and the struct
/// pointers loaded from either. The verifier checks each load at a constant offset (`CONFIG` is
/// frozen, so its offsets are constants to the verifier) against the member the kernel's BTF has
/// there and turns it into a fault-safe load: no helper call. Only members of the pointed-to
/// struct can be read this way, so `tcp_sock` members go through `bpf_skc_to_tcp_sock`, which
/// hands back a `struct tcp_sock *` (NULL unless `sk` is a full TCP socket).
#[derive(Clone, Copy)]
pub struct TypedLoad;

impl KernelMemory for TypedLoad {
    #[inline(always)]
    fn read<T: Default>(self, base: u64, offset: u32) -> T {
        if base == 0 || offset == ABSENT {
            return T::default();
        }
        // SAFETY: `base` is a BTF-typed kernel pointer (a tracepoint argument or a pointer member
        // loaded from one): the verifier checks the offset and size against the kernel's type
        // and makes the load fault-safe.
        unsafe { core::ptr::read_volatile((base + offset as u64) as *const T) }
    }

    #[inline(always)]
    fn tcp_sock(self, sk: u64) -> u64 {
        if sk == 0 {
            return 0;
        }
        // SAFETY: `sk` is a BTF-typed `struct sock *`; the helper checks what it is.
        unsafe { bpf_skc_to_tcp_sock(sk as *mut core::ffi::c_void) as u64 }
    }
}

/// A socket's endpoints from its `struct sock_common` (also valid for TIME_WAIT and request
/// minisocks, which share it). IPv4 addresses are stored v4-mapped, as the records have them.
#[inline(always)]
pub fn read_sock_endpoints(m: impl KernelMemory, sk: u64, e: &mut Endpoints) {
    let k = &CONFIG.kernel;
    e.family = m.read(sk, get(&k.sock_family));
    e.local_port = m.read(sk, get(&k.sock_num));
    e.remote_port = u16::from_be(m.read(sk, get(&k.sock_dport)));
    if e.family == AF_INET6 && get(&k.sock_v6_daddr) != ABSENT {
        // v4-mapped for an AF_INET6 socket talking IPv4, exactly as the tracepoints show it.
        e.local_addr = m.read(sk, get(&k.sock_v6_rcv_saddr));
        e.remote_addr = m.read(sk, get(&k.sock_v6_daddr));
    } else {
        e.local_addr = v4_mapped(m.read(sk, get(&k.sock_rcv_saddr)));
        e.remote_addr = v4_mapped(m.read(sk, get(&k.sock_daddr)));
    }
}

/// The endpoints of the RST answering segment `skb`: its destination is this host (`local`).
#[inline(always)]
pub fn read_skb_endpoints(skb: u64, e: &mut Endpoints) {
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

/// True where the kernel has `bpf_get_current_task_btf` (5.11+): the current task is then a
/// BTF-typed pointer whose members are plain loads ([`TypedLoad`]). `CONFIG` is frozen, so the
/// verifier drops the branch a kernel cannot take, helper call and all.
#[inline(always)]
fn typed_task() -> bool {
    get(&CONFIG.kernel.current_task_btf) != ABSENT
}

/// `struct sock *` behind file descriptor `fd` of the current task, or 0.
#[inline(always)]
pub fn sock_of_fd(fd: u64) -> u64 {
    if typed_task() {
        // SAFETY: helper without arguments.
        sock_of_fd_in(TypedLoad, unsafe { bpf_get_current_task_btf() } as u64, fd)
    } else {
        // SAFETY: helper without arguments.
        sock_of_fd_in(ProbeRead, unsafe { bpf_get_current_task() }, fd)
    }
}

/// The walk task → files → fd table, through `m` as far as the pointers are typed: the fd
/// array is `struct file **` and a file's `private_data` a `void *`, which BTF types say
/// nothing about, so the rest is probe reads.
#[inline(always)]
fn sock_of_fd_in(m: impl KernelMemory, task: u64, fd: u64) -> u64 {
    let k = &CONFIG.kernel;
    let files: u64 = m.read(task, get(&k.task_files));
    let fdt: u64 = m.read(files, get(&k.files_fdt));
    let max_fds: u32 = m.read(fdt, get(&k.fdtable_max_fds));
    if fd >= max_fds as u64 {
        return 0;
    }
    let fd_array: u64 = m.read(fdt, get(&k.fdtable_fd));
    if fd_array == 0 {
        return 0;
    }
    let file: u64 = kread(fd_array + fd * 8, 0);
    let socket: u64 = kread(file, get(&k.file_private_data));
    kread(socket, get(&k.socket_sk))
}

/// Whether the network namespace behind a `possible_net_t` at `base + offset` is the one with
/// inode number `filter`. The first match leaves the namespace's address in [`OBSERVED_NET`],
/// so later sockets in it are matched by address, without reading `net.ns.inum`: that
/// `ns_common` shares its cache line with the namespace's reference count, which every socket
/// created or freed in it writes, so under connection churn the read is a cache miss on nearly
/// every run. The address cannot come to name another namespace: the daemon holds the observed
/// one open while it runs (`cli::run`), so it is never freed.
#[inline(always)]
fn in_netns(m: impl KernelMemory, base: u64, offset: u32, filter: u32) -> bool {
    let net: u64 = m.read(base, offset);
    // SAFETY: a plain read of a global; a stale value only means one more inum read below.
    if net != 0 && net == unsafe { core::ptr::read_volatile(&raw const OBSERVED_NET) } {
        return true;
    }
    if m.read::<u32>(net, get(&CONFIG.kernel.net_inum)) != filter {
        return false;
    }
    // SAFETY: a plain write of a global; every CPU that writes it writes the same address.
    unsafe { core::ptr::write_volatile(&raw mut OBSERVED_NET, net) };
    true
}

/// The address of the observed network namespace's `struct net`, once a socket in it has been
/// seen: see [`in_netns`]. Zero until then, and without a namespace filter.
#[unsafe(no_mangle)]
static mut OBSERVED_NET: u64 = 0;

/// `IPPROTO_TCP`, as `sock.sk_protocol` and the `inet_sock_set_state` record's `protocol` say it.
pub const IPPROTO_TCP: u16 = 6;

/// Whether `sk` is a TCP socket (other protocols pass `inet_sock_set_state` and the socket
/// send and receive hooks too).
#[inline(always)]
pub fn is_tcp(m: impl KernelMemory, sk: u64) -> bool {
    m.read::<u16>(sk, get(&CONFIG.kernel.sock_protocol)) == IPPROTO_TCP
}

/// False when a namespace filter is set and `sk` lives elsewhere.
#[inline(always)]
pub fn observed_sock(m: impl KernelMemory, sk: u64) -> bool {
    let filter = get(&CONFIG.netns_filter);
    filter == 0 || in_netns(m, sk, get(&CONFIG.kernel.sock_net), filter)
}

/// The same for a segment that matched no socket, by the device it arrived on.
#[inline(always)]
pub fn observed_skb(skb: u64) -> bool {
    let filter = get(&CONFIG.netns_filter);
    if filter == 0 {
        return true;
    }
    let dev: u64 = kread(skb, get(&CONFIG.kernel.skb_dev));
    in_netns(ProbeRead, dev, get(&CONFIG.kernel.netdev_net), filter)
}

/// The current process, for hooks that run in its syscall.
#[inline(always)]
pub fn current_owner() -> Owner {
    let mut owner = Owner { tgid: (bpf_get_current_pid_tgid() >> 32) as u32, ..Owner::default() };
    // SAFETY: helpers without arguments.
    owner.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let comm = if typed_task() {
        // SAFETY: helper without arguments.
        leader_comm(TypedLoad, unsafe { bpf_get_current_task_btf() } as u64)
    } else {
        // SAFETY: helper without arguments.
        leader_comm(ProbeRead, unsafe { bpf_get_current_task() })
    };
    owner.comm = if comm[0] != 0 { comm } else { bpf_get_current_comm().unwrap_or_default() };
    owner
}

/// The `comm` of `task`'s thread group leader: the process's name, whichever thread runs.
#[inline(always)]
fn leader_comm(m: impl KernelMemory, task: u64) -> [u8; TASK_COMM_LEN] {
    let kernel = &CONFIG.kernel;
    let leader: u64 = m.read(task, get(&kernel.task_group_leader));
    m.read(leader, get(&kernel.task_comm))
}

/// Reads what the socket knows about the connection as it reaches CLOSE: the bytes the
/// application never read and the error (for the classification), and its `tcp_sock` facts.
#[inline(always)]
pub fn read_close(m: impl KernelMemory, sk: u64, info: &mut SocketInfo, now: u64) {
    let k = &CONFIG.kernel;
    let tp = m.tcp_sock(sk);
    // __tcp_close() purges the receive queue without advancing copied_seq, so this is still the
    // number of bytes the application never read.
    let rcv_nxt: u32 = m.read(tp, get(&k.tcp_rcv_nxt));
    let copied_seq: u32 = m.read(tp, get(&k.tcp_copied_seq));
    info.unread_bytes = rcv_nxt.wrapping_sub(copied_seq);
    info.sk_err = m.read::<i32>(sk, get(&k.sock_err)) as u32;
    let done_bit = get(&k.sock_done_bit);
    let fin = if done_bit < 64 { (m.read::<u64>(sk, get(&k.sock_flags)) >> done_bit) & 1 } else { 0 };
    let f = &mut info.facts;
    f.fin_received = fin as u8;
    // Both counters are in sequence space: the FIN received counts one byte.
    f.bytes_received = m.read::<u64>(tp, get(&k.tcp_bytes_received)).saturating_sub(fin);
    f.bytes_sent =
        m.read::<u64>(tp, get(&k.tcp_bytes_sent)).saturating_sub(m.read::<u64>(tp, get(&k.tcp_bytes_retrans)));
    f.srtt_us = m.read::<u32>(tp, get(&k.tcp_srtt_us)) >> 3;
    f.retransmits = m.read(tp, get(&k.tcp_total_retrans));
    f.data_segs_in = m.read(tp, get(&k.tcp_data_segs_in));
    f.data_segs_out = m.read(tp, get(&k.tcp_data_segs_out));
    f.duration_ns = if info.start_ns != 0 { now.saturating_sub(info.start_ns) } else { 0 };
}
