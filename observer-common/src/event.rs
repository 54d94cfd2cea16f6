//! The event layouts: the one record that crosses the ring buffer, a [`SocketEvent`] with a
//! stable numeric kind, and what it is made of ([`Endpoints`], [`Owner`], [`ConnectionFacts`],
//! [`flags`], [`tcp_state`]), plus [`SocketInfo`], the per-socket map value the daemon reads too.
//! Which program emitted an event (`SocketEvent::probe`) is a [`ProbeId`](crate::probe::ProbeId).

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
    /// A connection was opened: a `connect()` began (client, at CLOSE→SYN_SENT, whether or not
    /// it succeeds) or `accept()` returned it (server). Once per connection, with its owner.
    ConnectionOpened = 4,
}

impl EventKind {
    pub const fn from_u16(v: u16) -> Option<Self> {
        match v {
            1 => Some(Self::ResetReceived),
            2 => Some(Self::ResetSent),
            3 => Some(Self::ConnectionClosed),
            4 => Some(Self::ConnectionOpened),
            _ => None,
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
    /// `bpf_ktime_get_ns()` when it entered `state`, for the states whose age is reported
    /// (CLOSE-WAIT, `observer_tcp_close_wait_oldest_seconds`) and CLOSE; 0 for the others, so
    /// the programs read no clock on those transitions.
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
    /// The connection's `ConnectionOpened` was emitted: it is emitted once.
    pub const OPEN_REPORTED: u8 = 1 << 3;
}

/// `reason` value when the kernel gave none (kernels before 6.10 have no reason field).
pub const REASON_NONE: u32 = u32::MAX;

/// One event, as written to the ring buffer. 160 bytes, 8-aligned, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketEvent {
    /// [`EventKind`] as u16.
    pub kind: u16,
    /// [`ProbeId`](crate::probe::ProbeId) of the program that emitted it.
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
    fn event_kinds_round_trip() {
        for kind in
            [EventKind::ResetReceived, EventKind::ResetSent, EventKind::ConnectionClosed, EventKind::ConnectionOpened]
        {
            assert_eq!(EventKind::from_u16(kind as u16), Some(kind));
        }
        assert_eq!(EventKind::from_u16(0), None);
    }
}
