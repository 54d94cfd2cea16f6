//! Probe metadata: which kernel program emitted an event ([`ProbeId`], the `probe` field of a
//! `SocketEvent`), where each program attaches ([`AttachPoint`]), by which back end
//! ([`Backend`]), and which logical hook it serves ([`Hook`]). The kernel side only uses the
//! numbers; the daemon uses the rest to pick, load and attach the programs.

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
    /// tp_btf `inet_sock_set_state(sk, oldstate, newstate)`.
    BtfInetSockSetState = 13,
    /// tp_btf `tcp_receive_reset(sk)`.
    BtfTcpReceiveReset = 14,
    /// tp_btf `tcp_send_reset(sk, skb[, reason])`.
    BtfTcpSendReset = 15,
    /// tp_btf `tcp_destroy_sock(sk)`.
    BtfTcpDestroySock = 16,
    /// tp_btf `sock_send_length(sk, ret, flags)` (`--http`).
    BtfSockSendLength = 17,
    /// tp_btf `sock_recv_length(sk, ret, flags)` (`--http`).
    BtfSockRecvLength = 18,
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
    /// `--http`: the application's sends and receives, for the heads of HTTP/1.x messages.
    /// Not in [`Hook::ALL`]: attached only when asked for.
    HttpCapture,
}

impl Hook {
    /// The hooks every daemon attaches.
    pub const ALL: [Hook; 5] = [Self::SetState, Self::ReceiveReset, Self::SendReset, Self::Destroy, Self::Accept];

    pub const fn name(self) -> &'static str {
        match self {
            Self::SetState => "set_state",
            Self::ReceiveReset => "receive_reset",
            Self::SendReset => "send_reset",
            Self::Destroy => "destroy",
            Self::Accept => "accept",
            Self::HttpCapture => "http_capture",
        }
    }
}

/// How a program is attached. In the order `auto` prefers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Backend {
    /// A BTF-typed raw tracepoint (`tp_btf`, `BPF_PROG_TYPE_TRACING`): the tracepoint's
    /// arguments (`struct sock *`, ...) without a record; struct layout from BTF.
    Btf,
    /// A classic tracepoint (record layout from tracefs).
    Tracepoint,
    /// A kprobe or kretprobe on a kernel function (argument and struct layout from BTF).
    Kprobe,
}

impl Backend {
    pub const ALL: [Backend; 3] = [Self::Btf, Self::Tracepoint, Self::Kprobe];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Btf => "btf",
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
    /// A BTF-typed raw tracepoint, by the tracepoint's name (its type is `btf_trace_<name>`).
    BtfTracepoint(&'static str),
    /// Entry of a kernel function.
    Kprobe(&'static str),
    /// Return of a kernel function.
    Kretprobe(&'static str),
}

impl AttachPoint {
    /// The kernel function a (k|kret)probe attaches to.
    pub const fn function(self) -> Option<&'static str> {
        match self {
            Self::Tracepoint(..) | Self::BtfTracepoint(_) => None,
            Self::Kprobe(f) | Self::Kretprobe(f) => Some(f),
        }
    }
}

impl ProbeId {
    pub const ALL: [ProbeId; 19] = [
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
        Self::BtfInetSockSetState,
        Self::BtfTcpReceiveReset,
        Self::BtfTcpSendReset,
        Self::BtfTcpDestroySock,
        Self::BtfSockSendLength,
        Self::BtfSockRecvLength,
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
            13 => Some(Self::BtfInetSockSetState),
            14 => Some(Self::BtfTcpReceiveReset),
            15 => Some(Self::BtfTcpSendReset),
            16 => Some(Self::BtfTcpDestroySock),
            17 => Some(Self::BtfSockSendLength),
            18 => Some(Self::BtfSockRecvLength),
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
            Self::BtfInetSockSetState => "btf_inet_sock_set_state",
            Self::BtfTcpReceiveReset => "btf_tcp_receive_reset",
            Self::BtfTcpSendReset => "btf_tcp_send_reset",
            Self::BtfTcpDestroySock => "btf_tcp_destroy_sock",
            Self::BtfSockSendLength => "btf_sock_send_length",
            Self::BtfSockRecvLength => "btf_sock_recv_length",
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
            Self::BtfInetSockSetState => AttachPoint::BtfTracepoint("inet_sock_set_state"),
            Self::BtfTcpReceiveReset => AttachPoint::BtfTracepoint("tcp_receive_reset"),
            Self::BtfTcpSendReset => AttachPoint::BtfTracepoint("tcp_send_reset"),
            Self::BtfTcpDestroySock => AttachPoint::BtfTracepoint("tcp_destroy_sock"),
            Self::BtfSockSendLength => AttachPoint::BtfTracepoint("sock_send_length"),
            Self::BtfSockRecvLength => AttachPoint::BtfTracepoint("sock_recv_length"),
        }
    }

    pub const fn backend(self) -> Backend {
        match self.attach_point() {
            AttachPoint::Tracepoint(..) => Backend::Tracepoint,
            AttachPoint::BtfTracepoint(_) => Backend::Btf,
            AttachPoint::Kprobe(_) | AttachPoint::Kretprobe(_) => Backend::Kprobe,
        }
    }

    /// The hook the program serves.
    pub const fn hook(self) -> Hook {
        match self {
            Self::InetSockSetState | Self::TcpSetState | Self::BtfInetSockSetState => Hook::SetState,
            Self::TcpReceiveReset | Self::TcpReset | Self::BtfTcpReceiveReset => Hook::ReceiveReset,
            Self::TcpSendReset
            | Self::TcpSendActiveReset
            | Self::TcpV4SendReset
            | Self::TcpV6SendReset
            | Self::BtfTcpSendReset => Hook::SendReset,
            Self::TcpDestroySock | Self::TcpV4DestroySock | Self::BtfTcpDestroySock => Hook::Destroy,
            Self::SysExitAccept4 | Self::SysExitAccept | Self::InetCskAccept => Hook::Accept,
            Self::BtfSockSendLength | Self::BtfSockRecvLength => Hook::HttpCapture,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_ids_round_trip() {
        for (i, probe) in ProbeId::ALL.into_iter().enumerate() {
            assert_eq!(probe as usize, i, "ALL is in numeric order");
            assert_eq!(ProbeId::from_u16(probe as u16), Some(probe));
        }
        assert_eq!(ProbeId::from_u16(ProbeId::ALL.len() as u16), None);
    }
}
