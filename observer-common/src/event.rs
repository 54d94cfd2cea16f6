//! The one record that crosses the ring buffer: a [`SocketEvent`] with a stable numeric kind.

/// Linux TCP states (`include/net/tcp_states.h`); stable kernel ABI.
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
    pub const NEW_SYN_RECV: u8 = 12;
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const TASK_COMM_LEN: usize = 16;

/// What a [`SocketEvent`] reports. The numbers are part of the wire format: never renumber.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// `tcp:tcp_receive_reset`: the kernel reset a socket because an RST arrived (see
    /// [`SocketEvent`] docs for the local abort-on-data exception).
    ResetReceived = 1,
    /// `tcp:tcp_send_reset`: the host sent an RST, for a socket (`sk != 0`) or for a segment that
    /// matched no socket (`sk == 0`).
    ResetSent = 2,
    /// A connection reached TCP_CLOSE; emitted exactly once per connection, when every fact needed
    /// to classify how it ended is known.
    ConnectionClosed = 3,
}

impl EventKind {
    pub const fn from_u16(v: u16) -> Option<Self> {
        match v {
            1 => Some(Self::ResetReceived),
            2 => Some(Self::ResetSent),
            3 => Some(Self::ConnectionClosed),
            _ => None,
        }
    }
}

/// Which kernel program emitted an event. Stable numbers (new programs go at the end); also the
/// index of the per-probe counters. The name is the program's name in the object file and the
/// `probe` label value.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProbeId {
    InetSockSetState = 0,
    TcpReceiveReset = 1,
    TcpSendReset = 2,
    TcpDestroySock = 3,
    SysExitAccept4 = 4,
    SysExitAccept = 5,
    /// kprobe `tcp_set_state(sk, state)`.
    TcpSetState = 6,
    /// kprobe `tcp_reset(sk, skb)`.
    TcpReset = 7,
    /// kprobe `tcp_send_active_reset(sk, priority[, reason])`.
    TcpSendActiveReset = 8,
    /// kprobe `tcp_v4_send_reset(sk, skb[, reason])`.
    TcpV4SendReset = 9,
    /// kprobe `tcp_v6_send_reset(sk, skb[, reason])`.
    TcpV6SendReset = 10,
    /// kprobe `tcp_v4_destroy_sock(sk)` (IPv6 sockets are destroyed through it too).
    TcpV4DestroySock = 11,
    /// kretprobe `inet_csk_accept()`: returns the accepted `struct sock *`.
    InetCskAccept = 12,
}

/// The logical hooks the kernel programs need; each is served by one back end at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    /// TCP state changes: a connection's life.
    SetState,
    /// An RST accepted on a socket.
    ReceiveReset,
    /// An RST sent by this host.
    SendReset,
    /// A socket's destruction: its last event.
    Destroy,
    /// `accept()` returned a socket in its owner's context.
    Accept,
}

impl Hook {
    pub const ALL: [Hook; 5] = [Self::SetState, Self::ReceiveReset, Self::SendReset, Self::Destroy, Self::Accept];

    pub const fn name(self) -> &'static str {
        match self {
            Self::SetState => "set_state",
            Self::ReceiveReset => "receive_reset",
            Self::SendReset => "send_reset",
            Self::Destroy => "destroy",
            Self::Accept => "accept",
        }
    }
}

/// How a program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Backend {
    /// A classic tracepoint (record layout from tracefs).
    Tracepoint,
    /// A kprobe or kretprobe on a kernel function (argument and struct layout from BTF).
    Kprobe,
}

impl Backend {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Tracepoint => "tracepoint",
            Self::Kprobe => "kprobe",
        }
    }
}

/// Where a program attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachPoint {
    /// `category:name`.
    Tracepoint(&'static str, &'static str),
    /// Entry of a kernel function.
    Kprobe(&'static str),
    /// Return of a kernel function.
    Kretprobe(&'static str),
}

impl AttachPoint {
    /// The kernel function a (k|kret)probe attaches to.
    pub const fn function(self) -> Option<&'static str> {
        match self {
            Self::Tracepoint(..) => None,
            Self::Kprobe(f) | Self::Kretprobe(f) => Some(f),
        }
    }
}

impl ProbeId {
    pub const ALL: [ProbeId; 13] = [
        Self::InetSockSetState,
        Self::TcpReceiveReset,
        Self::TcpSendReset,
        Self::TcpDestroySock,
        Self::SysExitAccept4,
        Self::SysExitAccept,
        Self::TcpSetState,
        Self::TcpReset,
        Self::TcpSendActiveReset,
        Self::TcpV4SendReset,
        Self::TcpV6SendReset,
        Self::TcpV4DestroySock,
        Self::InetCskAccept,
    ];

    pub const fn from_u16(v: u16) -> Option<Self> {
        match v {
            0 => Some(Self::InetSockSetState),
            1 => Some(Self::TcpReceiveReset),
            2 => Some(Self::TcpSendReset),
            3 => Some(Self::TcpDestroySock),
            4 => Some(Self::SysExitAccept4),
            5 => Some(Self::SysExitAccept),
            6 => Some(Self::TcpSetState),
            7 => Some(Self::TcpReset),
            8 => Some(Self::TcpSendActiveReset),
            9 => Some(Self::TcpV4SendReset),
            10 => Some(Self::TcpV6SendReset),
            11 => Some(Self::TcpV4DestroySock),
            12 => Some(Self::InetCskAccept),
            _ => None,
        }
    }

    /// The program's name in the object file, and the `probe` label value.
    pub const fn name(self) -> &'static str {
        match self {
            Self::InetSockSetState => "inet_sock_set_state",
            Self::TcpReceiveReset => "tcp_receive_reset",
            Self::TcpSendReset => "tcp_send_reset",
            Self::TcpDestroySock => "tcp_destroy_sock",
            Self::SysExitAccept4 => "sys_exit_accept4",
            Self::SysExitAccept => "sys_exit_accept",
            Self::TcpSetState => "tcp_set_state",
            Self::TcpReset => "tcp_reset",
            Self::TcpSendActiveReset => "tcp_send_active_reset",
            Self::TcpV4SendReset => "tcp_v4_send_reset",
            Self::TcpV6SendReset => "tcp_v6_send_reset",
            Self::TcpV4DestroySock => "tcp_v4_destroy_sock",
            Self::InetCskAccept => "inet_csk_accept",
        }
    }

    /// Where the program attaches.
    pub const fn attach_point(self) -> AttachPoint {
        match self {
            Self::InetSockSetState => AttachPoint::Tracepoint("sock", "inet_sock_set_state"),
            Self::TcpReceiveReset => AttachPoint::Tracepoint("tcp", "tcp_receive_reset"),
            Self::TcpSendReset => AttachPoint::Tracepoint("tcp", "tcp_send_reset"),
            Self::TcpDestroySock => AttachPoint::Tracepoint("tcp", "tcp_destroy_sock"),
            Self::SysExitAccept4 => AttachPoint::Tracepoint("syscalls", "sys_exit_accept4"),
            Self::SysExitAccept => AttachPoint::Tracepoint("syscalls", "sys_exit_accept"),
            Self::TcpSetState => AttachPoint::Kprobe("tcp_set_state"),
            Self::TcpReset => AttachPoint::Kprobe("tcp_reset"),
            Self::TcpSendActiveReset => AttachPoint::Kprobe("tcp_send_active_reset"),
            Self::TcpV4SendReset => AttachPoint::Kprobe("tcp_v4_send_reset"),
            Self::TcpV6SendReset => AttachPoint::Kprobe("tcp_v6_send_reset"),
            Self::TcpV4DestroySock => AttachPoint::Kprobe("tcp_v4_destroy_sock"),
            Self::InetCskAccept => AttachPoint::Kretprobe("inet_csk_accept"),
        }
    }

    pub const fn backend(self) -> Backend {
        match self.attach_point() {
            AttachPoint::Tracepoint(..) => Backend::Tracepoint,
            AttachPoint::Kprobe(_) | AttachPoint::Kretprobe(_) => Backend::Kprobe,
        }
    }

    /// The hook the program serves.
    pub const fn hook(self) -> Hook {
        match self {
            Self::InetSockSetState | Self::TcpSetState => Hook::SetState,
            Self::TcpReceiveReset | Self::TcpReset => Hook::ReceiveReset,
            Self::TcpSendReset | Self::TcpSendActiveReset | Self::TcpV4SendReset | Self::TcpV6SendReset => Hook::SendReset,
            Self::TcpDestroySock | Self::TcpV4DestroySock => Hook::Destroy,
            Self::SysExitAccept4 | Self::SysExitAccept | Self::InetCskAccept => Hook::Accept,
        }
    }
}

/// Which side opened the connection.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Unknown = 0,
    /// The socket connected out (`connect()`).
    Client = 1,
    /// The socket was accepted from a listener.
    Server = 2,
}

impl Role {
    pub const fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Client,
            2 => Self::Server,
            _ => Self::Unknown,
        }
    }
}

/// A connection's addresses. IPv4 addresses are stored v4-mapped (`::ffff:a.b.c.d`) so one layout
/// serves both families. `local_port` / `remote_port` are in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoints {
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    /// `AF_INET`, `AF_INET6`, or 0 when the kernel did not say.
    pub family: u16,
    pub _pad: u16,
}

/// The process that owns a socket, recorded in process context (connect, accept).
/// `tgid == 0` means the owner is unknown.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Owner {
    /// The owner's cgroup v2 id (`bpf_get_current_cgroup_id`): the inode of its cgroup directory,
    /// which the daemon resolves to a cgroup path and a container id.
    pub cgroup_id: u64,
    pub tgid: u32,
    /// The thread group leader's command name, NUL padded.
    pub comm: [u8; TASK_COMM_LEN],
    pub _pad: u32,
}

/// What the kernel knew about a connection when it reached CLOSE, read from `tcp_sock`.
/// Emitted with `ConnectionClosed`; zero in other events.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectionFacts {
    /// From `connect()` (SYN_SENT) or the SYN (SYN_RECV) to CLOSE; 0 if the start was not seen
    /// (the socket predates the daemon).
    pub duration_ns: u64,
    /// Payload bytes received: `bytes_received` minus the FIN, which counts in sequence space.
    pub bytes_received: u64,
    /// Payload bytes sent, retransmissions excluded: `bytes_sent - bytes_retrans` (4.19+).
    pub bytes_sent: u64,
    /// Smoothed RTT in microseconds (`srtt_us >> 3`).
    pub srtt_us: u32,
    /// Segments retransmitted (`total_retrans`).
    pub retransmits: u32,
    /// Segments with payload received / sent (`data_segs_in` / `data_segs_out`): whether any
    /// payload crossed, independent of the sequence-space byte counters.
    pub data_segs_in: u32,
    pub data_segs_out: u32,
    /// Bit `1 << state` for every TCP state the connection entered while observed.
    pub states_seen: u16,
    /// 1 if a FIN was received (the kernel's `SOCK_DONE`).
    pub fin_received: u8,
    pub _pad: [u8; 5],
}

impl ConnectionFacts {
    pub const fn entered(&self, state: u8) -> bool {
        state < 16 && self.states_seen & (1 << state) != 0
    }
}

/// What the kernel side keeps per socket (the `SOCKETS` map value). Shared because the daemon
/// reads the map to count open connections by state (`observer_tcp_connections`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketInfo {
    pub endpoints: Endpoints,
    pub owner: Owner,
    /// [`Role`] as u8.
    pub role: u8,
    /// [`flags`] bits.
    pub flags: u8,
    /// State at `tcp_receive_reset`.
    pub reset_state: u8,
    /// State the connection left when it reached CLOSE (0: still open).
    pub close_state: u8,
    /// Current TCP state.
    pub state: u8,
    pub _pad: [u8; 3],
    /// `enum sk_rst_reason` of the RST this host sent for it.
    pub reason: u32,
    pub unread_bytes: u32,
    pub sk_err: u32,
    /// 1 while a ConnectionClosed is owed for this socket.
    pub close_pending: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the connection started; 0 if not seen.
    pub start_ns: u64,
    /// `bpf_ktime_get_ns()` when it entered `state`.
    pub state_since_ns: u64,
    /// Read at CLOSE.
    pub facts: ConnectionFacts,
}

/// Bits of [`SocketEvent::flags`].
pub mod flags {
    /// The socket went through `tcp_receive_reset` (state in `reset_state`).
    pub const RESET_RECEIVED: u8 = 1 << 0;
    /// The host sent an RST for this socket (reason in `reason`).
    pub const RESET_SENT: u8 = 1 << 1;
    /// The socket was seen being accepted or connected, so `role` is known first-hand.
    pub const OWNER_FROM_SYSCALL: u8 = 1 << 2;
}

/// `reason` value when the kernel gave none (kernels before 6.10 have no reason field).
pub const REASON_NONE: u32 = u32::MAX;

/// One event, as written to the ring buffer. 160 bytes, 8-aligned, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketEvent {
    /// [`EventKind`] as u16.
    pub kind: u16,
    /// [`ProbeId`] of the program that emitted it.
    pub probe: u16,
    /// [`Role`] as u8.
    pub role: u8,
    /// TCP state: at the reset for resets; the state the connection left for ConnectionClosed.
    pub state: u8,
    /// TCP state the socket was in when `tcp_receive_reset` ran (0 if it did not).
    pub reset_state: u8,
    /// [`flags`] bits.
    pub flags: u8,
    /// `bpf_ktime_get_ns()` at emission.
    pub timestamp_ns: u64,
    /// Kernel address of the socket, 0 for resets that answered a segment matching no socket.
    pub sk: u64,
    pub endpoints: Endpoints,
    pub owner: Owner,
    /// `enum sk_rst_reason` value of the RST sent, [`REASON_NONE`] if none or unknown.
    pub reason: u32,
    /// Received bytes the application never read (`rcv_nxt - copied_seq`) when the socket closed.
    pub unread_bytes: u32,
    /// `sk->sk_err` when the socket closed (positive errno), 0 if none.
    pub sk_err: u32,
    pub _pad: u32,
    pub facts: ConnectionFacts,
}

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::SocketEvent {}
    unsafe impl aya::Pod for super::Endpoints {}
    unsafe impl aya::Pod for super::Owner {}
    unsafe impl aya::Pod for super::ConnectionFacts {}
    unsafe impl aya::Pod for super::SocketInfo {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, offset_of, size_of};

    #[test]
    fn socket_event_layout_has_no_implicit_padding() {
        assert_eq!(size_of::<Endpoints>(), 40);
        assert_eq!(size_of::<Owner>(), 32);
        assert_eq!(offset_of!(Owner, tgid), 8);
        assert_eq!(offset_of!(Owner, comm), 12);
        assert_eq!(size_of::<ConnectionFacts>(), 48);
        assert_eq!(offset_of!(ConnectionFacts, states_seen), 40);
        assert_eq!(offset_of!(SocketEvent, timestamp_ns), 8);
        assert_eq!(offset_of!(SocketEvent, sk), 16);
        assert_eq!(offset_of!(SocketEvent, endpoints), 24);
        assert_eq!(offset_of!(SocketEvent, owner), 64);
        assert_eq!(offset_of!(SocketEvent, reason), 96);
        assert_eq!(offset_of!(SocketEvent, unread_bytes), 100);
        assert_eq!(offset_of!(SocketEvent, sk_err), 104);
        assert_eq!(offset_of!(SocketEvent, facts), 112);
        assert_eq!(size_of::<SocketEvent>(), 160);
        assert_eq!(align_of::<SocketEvent>(), 8);
    }

    #[test]
    fn socket_info_layout_has_no_implicit_padding() {
        assert_eq!(offset_of!(SocketInfo, owner), 40);
        assert_eq!(offset_of!(SocketInfo, role), 72);
        assert_eq!(offset_of!(SocketInfo, reason), 80);
        assert_eq!(offset_of!(SocketInfo, start_ns), 96);
        assert_eq!(offset_of!(SocketInfo, facts), 112);
        assert_eq!(size_of::<SocketInfo>(), 160);
    }

    #[test]
    fn numeric_kinds_round_trip() {
        for kind in [EventKind::ResetReceived, EventKind::ResetSent, EventKind::ConnectionClosed] {
            assert_eq!(EventKind::from_u16(kind as u16), Some(kind));
        }
        assert_eq!(EventKind::from_u16(0), None);
        for (i, probe) in ProbeId::ALL.into_iter().enumerate() {
            assert_eq!(probe as usize, i, "ALL is in numeric order");
            assert_eq!(ProbeId::from_u16(probe as u16), Some(probe));
        }
        assert_eq!(ProbeId::from_u16(ProbeId::ALL.len() as u16), None);
    }
}
