//! Load-time configuration handed to the kernel programs as one global (`CONFIG`).
//!
//! Tracepoint record layouts and kernel struct layouts differ between kernel versions, so nothing
//! here is compiled in: the daemon reads record offsets from tracefs `format` files and struct
//! member offsets from the running kernel's BTF, and writes them into this global before loading.
//! Every offset is a byte offset; [`ABSENT`] means "this kernel does not have that field". The
//! tracepoint back end reads the record offsets, the kprobe back end the struct offsets and the
//! argument positions ([`KprobeArgs`]), the BTF tracepoint back end the struct offsets and its
//! argument positions ([`BtfArgs`]); all use the struct offsets for what records lack.

/// Offset value for a field the running kernel does not have.
pub const ABSENT: u32 = u32::MAX;

/// The address fields of the `tcp_event_sk` record class (`tcp_receive_reset`,
/// `tcp_destroy_sock`) and of the pre-6.10 `tcp_send_reset`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SkTupleFields {
    pub skaddr: u32,
    /// `__u16`, host byte order.
    pub sport: u32,
    /// `__u16`, host byte order.
    pub dport: u32,
    /// `__u16`; absent before 5.12.
    pub family: u32,
    /// `__u8[4]`.
    pub saddr: u32,
    pub daddr: u32,
    /// `__u8[16]`, v4-mapped for AF_INET.
    pub saddr_v6: u32,
    pub daddr_v6: u32,
}

impl SkTupleFields {
    pub const ABSENT: Self = Self {
        skaddr: ABSENT,
        sport: ABSENT,
        dport: ABSENT,
        family: ABSENT,
        saddr: ABSENT,
        daddr: ABSENT,
        saddr_v6: ABSENT,
        daddr_v6: ABSENT,
    };
}

/// `sock:inet_sock_set_state`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetStateFields {
    pub tuple: SkTupleFields,
    pub oldstate: u32,
    pub newstate: u32,
    pub protocol: u32,
    /// 1 before 5.6 (`__u8`), 2 since (`__u16`).
    pub protocol_size: u32,
}

/// `tcp:tcp_send_reset`. Since 6.10 the addresses are 28-byte `struct sockaddr_in{,6}` blobs
/// (`saddr_sockaddr`/`daddr_sockaddr`, ports in network order) and `reason` exists; before, the
/// record has the split `tuple` fields and only reports resets sent for full sockets.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendResetFields {
    pub tuple: SkTupleFields,
    pub skbaddr: u32,
    pub state: u32,
    /// `enum sk_rst_reason`; absent before 6.10.
    pub reason: u32,
    pub saddr_sockaddr: u32,
    pub daddr_sockaddr: u32,
}

/// Kernel struct member offsets from BTF. Used to find a socket's owner and close-time facts.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `task_struct.group_leader`.
    pub task_group_leader: u32,
    /// `task_struct.comm`.
    pub task_comm: u32,
    /// `task_struct.files`.
    pub task_files: u32,
    /// `files_struct.fdt`.
    pub files_fdt: u32,
    /// `fdtable.max_fds`.
    pub fdtable_max_fds: u32,
    /// `fdtable.fd`.
    pub fdtable_fd: u32,
    /// `file.private_data` (a `struct socket *` for socket files).
    pub file_private_data: u32,
    /// `socket.sk`.
    pub socket_sk: u32,
    /// `sock.__sk_common.skc_state`.
    pub sock_state: u32,
    /// `sock.sk_err`.
    pub sock_err: u32,
    /// `tcp_sock.rcv_nxt`.
    pub tcp_rcv_nxt: u32,
    /// `tcp_sock.copied_seq`.
    pub tcp_copied_seq: u32,
    /// `sock.__sk_common.skc_net` (a `possible_net_t`, i.e. a `struct net *`).
    pub sock_net: u32,
    /// `net.ns.inum`: the namespace's inode number, as `stat /proc/PID/ns/net` shows it.
    pub net_inum: u32,
    /// `sk_buff.dev`.
    pub skb_dev: u32,
    /// `net_device.nd_net` (a `possible_net_t`).
    pub netdev_net: u32,
    /// `sock.sk_flags` (an `unsigned long` bit set of `enum sock_flags`).
    pub sock_flags: u32,
    /// Bit number of `SOCK_DONE` in `enum sock_flags` (set by `tcp_fin`), from BTF.
    pub sock_done_bit: u32,
    /// `tcp_sock.bytes_received` (u64, sequence space).
    pub tcp_bytes_received: u32,
    /// `tcp_sock.bytes_sent` (u64, payload incl. retransmissions; 4.19+).
    pub tcp_bytes_sent: u32,
    /// `tcp_sock.bytes_retrans` (u64; 4.19+).
    pub tcp_bytes_retrans: u32,
    /// `tcp_sock.srtt_us` (u32, microseconds << 3).
    pub tcp_srtt_us: u32,
    /// `tcp_sock.total_retrans` (u32).
    pub tcp_total_retrans: u32,
    /// `tcp_sock.data_segs_in` (u32).
    pub tcp_data_segs_in: u32,
    /// `tcp_sock.data_segs_out` (u32).
    pub tcp_data_segs_out: u32,
    /// `sock.__sk_common.skc_cookie` (u64): the socket cookie sock_diag reports.
    pub sock_cookie: u32,
    // The kprobe back end reads a socket's endpoints from `struct sock_common` and, for resets
    // answering a segment that matched no socket, from the segment's IP and TCP headers.
    /// `sock.__sk_common.skc_family` (u16).
    pub sock_family: u32,
    /// `sock.__sk_common.skc_num` (u16, local port, host byte order).
    pub sock_num: u32,
    /// `sock.__sk_common.skc_dport` (u16, remote port, network byte order).
    pub sock_dport: u32,
    /// `sock.__sk_common.skc_rcv_saddr` (4 bytes, local IPv4 address).
    pub sock_rcv_saddr: u32,
    /// `sock.__sk_common.skc_daddr` (4 bytes, remote IPv4 address).
    pub sock_daddr: u32,
    /// `sock.__sk_common.skc_v6_rcv_saddr` (16 bytes; absent without CONFIG_IPV6).
    pub sock_v6_rcv_saddr: u32,
    /// `sock.__sk_common.skc_v6_daddr` (16 bytes; absent without CONFIG_IPV6).
    pub sock_v6_daddr: u32,
    /// `sk_buff.head` (pointer).
    pub skb_head: u32,
    /// `sk_buff.network_header` (u16 offset from `head`).
    pub skb_network_header: u32,
    /// `sk_buff.transport_header` (u16 offset from `head`).
    pub skb_transport_header: u32,
    /// `iphdr.saddr`.
    pub iphdr_saddr: u32,
    /// `iphdr.daddr`.
    pub iphdr_daddr: u32,
    /// `ipv6hdr.saddr`.
    pub ipv6hdr_saddr: u32,
    /// `ipv6hdr.daddr`.
    pub ipv6hdr_daddr: u32,
    /// `tcphdr.source` (network byte order).
    pub tcphdr_source: u32,
    /// `tcphdr.dest` (network byte order).
    pub tcphdr_dest: u32,
    /// `sock.sk_protocol` (u16 since 5.6; a bitfield before, then absent): the BTF
    /// `inet_sock_set_state` program filters TCP with it, as the record's `protocol` does.
    pub sock_protocol: u32,
    /// Not an offset: `BPF_FUNC_get_current_task_btf` from the kernel's `enum bpf_func_id`
    /// (5.11+), absent where the kernel has no such helper. Where it has it, every program
    /// reads the current task (its files, its group leader's `comm`) with plain typed loads
    /// instead of `bpf_probe_read_kernel` calls.
    pub current_task_btf: u32,
}

impl KernelOffsets {
    pub const ABSENT: Self = Self {
        task_group_leader: ABSENT,
        task_comm: ABSENT,
        task_files: ABSENT,
        files_fdt: ABSENT,
        fdtable_max_fds: ABSENT,
        fdtable_fd: ABSENT,
        file_private_data: ABSENT,
        socket_sk: ABSENT,
        sock_state: ABSENT,
        sock_err: ABSENT,
        tcp_rcv_nxt: ABSENT,
        tcp_copied_seq: ABSENT,
        sock_net: ABSENT,
        net_inum: ABSENT,
        skb_dev: ABSENT,
        netdev_net: ABSENT,
        sock_flags: ABSENT,
        sock_done_bit: ABSENT,
        tcp_bytes_received: ABSENT,
        tcp_bytes_sent: ABSENT,
        tcp_bytes_retrans: ABSENT,
        tcp_srtt_us: ABSENT,
        tcp_total_retrans: ABSENT,
        tcp_data_segs_in: ABSENT,
        tcp_data_segs_out: ABSENT,
        sock_cookie: ABSENT,
        sock_family: ABSENT,
        sock_num: ABSENT,
        sock_dport: ABSENT,
        sock_rcv_saddr: ABSENT,
        sock_daddr: ABSENT,
        sock_v6_rcv_saddr: ABSENT,
        sock_v6_daddr: ABSENT,
        skb_head: ABSENT,
        skb_network_header: ABSENT,
        skb_transport_header: ABSENT,
        iphdr_saddr: ABSENT,
        iphdr_daddr: ABSENT,
        ipv6hdr_saddr: ABSENT,
        ipv6hdr_daddr: ABSENT,
        tcphdr_source: ABSENT,
        tcphdr_dest: ABSENT,
        sock_protocol: ABSENT,
        current_task_btf: ABSENT,
    };
}

/// The argument positions the kprobe programs can read a reset reason from (0-based; the
/// reason is the second or third argument in the kernels that pass one). Any other position is
/// reported and ignored.
pub const KPROBE_REASON_ARGS: [u32; 2] = [1, 2];

/// Argument positions (0-based) of the kprobed functions, from their prototypes in BTF.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KprobeArgs {
    /// `reason` of `tcp_send_active_reset(sk, priority, reason)` (6.10+).
    pub active_reset_reason: u32,
    /// `reason` of `tcp_v4_send_reset(sk, skb, reason)` (6.10+).
    pub v4_reset_reason: u32,
    /// `reason` of `tcp_v6_send_reset(sk, skb, reason)` (6.10+).
    pub v6_reset_reason: u32,
}

impl KprobeArgs {
    pub const ABSENT: Self = Self { active_reset_reason: ABSENT, v4_reset_reason: ABSENT, v6_reset_reason: ABSENT };
}

/// Argument positions (0-based, in the program's context: the tracepoint's arguments after its
/// hidden `void *__data`) of the BTF tracepoints, from their `btf_trace_<name>` prototypes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BtfArgs {
    /// `reason` of `tcp_send_reset(sk, skb, reason)` (6.10+; 2 there).
    pub send_reset_reason: u32,
}

impl BtfArgs {
    pub const ABSENT: Self = Self { send_reset_reason: ABSENT };
}

/// The argument positions the BTF `tcp_send_reset` program can read a reason from.
pub const BTF_REASON_ARGS: [u32; 1] = [2];

/// What the HTTP capture programs (`--http`) need to find the application's buffer: where the
/// current task's syscall number and arguments sit in its `struct pt_regs` (BTF; x86_64 only so
/// far), the members of the user-space structs an argument may point to (BTF), and the numbers
/// of the syscalls whose buffer they read (the architecture's syscall ABI). Any other way into
/// `sock_sendmsg`/`sock_recvmsg` (sendfile, splice, io_uring, `sendmmsg`) is counted but not
/// captured.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PayloadConfig {
    /// `pt_regs.orig_ax`: the syscall number.
    pub regs_syscall: u32,
    /// `pt_regs.si`: the second argument (the buffer, the iovec array or the msghdr).
    pub regs_arg1: u32,
    /// `pt_regs.dx`: the third argument (the iovec count of `readv`/`writev`).
    pub regs_arg2: u32,
    /// `iovec.iov_base`, `iovec.iov_len`, and `sizeof(struct iovec)`.
    pub iovec_base: u32,
    pub iovec_len: u32,
    pub iovec_size: u32,
    /// `user_msghdr.msg_iov`, `user_msghdr.msg_iovlen`.
    pub msghdr_iov: u32,
    pub msghdr_iovlen: u32,
    pub nr_read: u32,
    pub nr_write: u32,
    pub nr_readv: u32,
    pub nr_writev: u32,
    pub nr_recvfrom: u32,
    pub nr_sendto: u32,
    pub nr_recvmsg: u32,
    pub nr_sendmsg: u32,
}

impl PayloadConfig {
    pub const ABSENT: Self = Self {
        regs_syscall: ABSENT,
        regs_arg1: ABSENT,
        regs_arg2: ABSENT,
        iovec_base: ABSENT,
        iovec_len: ABSENT,
        iovec_size: ABSENT,
        msghdr_iov: ABSENT,
        msghdr_iovlen: ABSENT,
        nr_read: ABSENT,
        nr_write: ABSENT,
        nr_readv: ABSENT,
        nr_writev: ABSENT,
        nr_recvfrom: ABSENT,
        nr_sendto: ABSENT,
        nr_recvmsg: ABSENT,
        nr_sendmsg: ABSENT,
    };
}

/// `ProbeConfig::socket_store`: where the kernel programs keep each socket's
/// [`SocketInfo`](crate::SocketInfo).
///
/// With the BTF tracepoint back end on every socket hook, the entry lives in socket-local storage
/// (`BPF_MAP_TYPE_SK_STORAGE`, `SOCKET_STORAGE`): on the socket itself, found without a hash
/// lookup and freed with it. The classic tracepoint and kprobe programs cannot reach it (only
/// tracing programs may call `bpf_sk_storage_get`), so with them it lives in the `SOCKETS` LRU
/// hash.
pub const SOCKET_STORE_HASH: u32 = 0;
/// See [`SOCKET_STORE_HASH`].
pub const SOCKET_STORE_LOCAL: u32 = 1;

/// Everything the kernel programs need to know about the running kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeConfig {
    pub set_state: SetStateFields,
    pub receive_reset: SkTupleFields,
    pub destroy_sock: SkTupleFields,
    pub send_reset: SendResetFields,
    /// `ret` of `syscalls:sys_exit_accept4`.
    pub accept4_ret: u32,
    /// `ret` of `syscalls:sys_exit_accept`.
    pub accept_ret: u32,
    /// Only sockets in the network namespace with this inode number are observed; 0: all.
    pub netns_filter: u32,
    pub kernel: KernelOffsets,
    pub kprobe: KprobeArgs,
    pub btf: BtfArgs,
    pub payload: PayloadConfig,
    /// [`SOCKET_STORE_HASH`] or [`SOCKET_STORE_LOCAL`].
    pub socket_store: u32,
}

impl ProbeConfig {
    /// A configuration where every field is absent: programs loaded with it do nothing.
    pub const ABSENT: Self = Self {
        set_state: SetStateFields {
            tuple: SkTupleFields::ABSENT,
            oldstate: ABSENT,
            newstate: ABSENT,
            protocol: ABSENT,
            protocol_size: ABSENT,
        },
        receive_reset: SkTupleFields::ABSENT,
        destroy_sock: SkTupleFields::ABSENT,
        send_reset: SendResetFields {
            tuple: SkTupleFields::ABSENT,
            skbaddr: ABSENT,
            state: ABSENT,
            reason: ABSENT,
            saddr_sockaddr: ABSENT,
            daddr_sockaddr: ABSENT,
        },
        accept4_ret: ABSENT,
        accept_ret: ABSENT,
        netns_filter: 0,
        kernel: KernelOffsets::ABSENT,
        kprobe: KprobeArgs::ABSENT,
        btf: BtfArgs::ABSENT,
        payload: PayloadConfig::ABSENT,
        socket_store: SOCKET_STORE_HASH,
    };
}

/// Index of the per-CPU counters array (`COUNTERS`).
pub mod counter {
    /// Events dropped because the ring buffer was full.
    pub const RING_FULL: u32 = 0;
    /// Sockets whose entry could not be created in the per-socket map.
    pub const SOCKET_MAP_FULL: u32 = 1;
    pub const COUNT: u32 = 2;
}

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::ProbeConfig {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn probe_config_is_all_u32_without_padding() {
        assert_eq!(size_of::<SkTupleFields>(), 8 * 4);
        assert_eq!(size_of::<SetStateFields>(), 12 * 4);
        assert_eq!(size_of::<SendResetFields>(), 13 * 4);
        assert_eq!(size_of::<KernelOffsets>(), 44 * 4);
        assert_eq!(size_of::<KprobeArgs>(), 3 * 4);
        assert_eq!(size_of::<BtfArgs>(), 4);
        assert_eq!(size_of::<PayloadConfig>(), 16 * 4);
        assert_eq!(size_of::<ProbeConfig>(), (12 + 8 + 8 + 13 + 3 + 44 + 3 + 1 + 16 + 1) * 4);
    }
}
