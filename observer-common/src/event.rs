//! The event layouts: the records that cross the ring buffer, each starting with a stable numeric
//! kind: a [`SocketEvent`] and what it is made of ([`Endpoints`], [`Owner`], [`ConnectionFacts`],
//! [`PayloadFacts`], [`flags`], [`tcp_state`]), and, with `--http`, a [`MessageHead`]; plus
//! [`SocketInfo`], the per-socket map value the daemon reads too.
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
    /// `--http`: the application sent or received a chunk of a tracked connection's byte stream
    /// that begins like an HTTP/1.x message (a request method or `HTTP/1.`). A [`MessageHead`],
    /// not a [`SocketEvent`].
    MessageHead = 5,
}

impl EventKind {
    pub const fn from_u16(v: u16) -> Option<Self> {
        match v {
            1 => Some(Self::ResetReceived),
            2 => Some(Self::ResetSent),
            3 => Some(Self::ConnectionClosed),
            4 => Some(Self::ConnectionOpened),
            5 => Some(Self::MessageHead),
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

/// What the HTTP capture (`--http`) follows of a connection's byte streams: the application's
/// sends and receives, counted where they return. Zero without `--http`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PayloadFacts {
    /// Bytes the application handed to `send()`/`write()` (and friends) that the kernel took.
    pub sent: u64,
    /// Bytes the application read (`recv()`/`read()` and friends; `MSG_PEEK` excluded).
    pub received: u64,
    /// `bpf_ktime_get_ns()` of the last send or receive.
    pub last_data_ns: u64,
    /// The last 8 bytes sent and received, oldest first (zero-filled while fewer crossed): a
    /// chunked body's last chunk (`0\r\n\r\n`) is at the end of its stream.
    pub tail_sent: [u8; 8],
    pub tail_received: [u8; 8],
    /// A [`payload_protocol`] value: what the first bytes looked like.
    pub protocol: u8,
    pub _pad: [u8; 7],
}

/// [`PayloadFacts::protocol`]: decided once per connection, by its first captured bytes.
pub mod payload_protocol {
    /// Nothing captured yet.
    pub const UNKNOWN: u8 = 0;
    /// The first bytes were an HTTP/1.x request or status line: heads are captured.
    pub const HTTP: u8 = 1;
    /// Anything else, or a connection whose start was not seen: ignored from then on.
    pub const OTHER: u8 = 2;
}

/// Bytes of a chunk a [`MessageHead`] carries at most: enough for a request or status line and
/// the framing headers of most messages.
pub const HEAD_CAPTURE: usize = 512;

/// [`MessageHead::direction`].
pub mod direction {
    /// The socket's application sent the chunk.
    pub const SENT: u8 = 1;
    /// The socket's application received it.
    pub const RECEIVED: u8 = 2;
}

/// `--http`: the first bytes of a send or receive that begins like an HTTP/1.x message, with
/// where it sits in its direction's byte stream. 552 bytes, 8-aligned, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MessageHead {
    /// [`EventKind::MessageHead`] as u16.
    pub kind: u16,
    /// [`ProbeId`](crate::probe::ProbeId) of the program that emitted it.
    pub probe: u16,
    /// A [`direction`] value.
    pub direction: u8,
    /// 1: the chunk does not begin a message but continues the head of the one before, within
    /// its first `HEAD_CAPTURE` bytes (an application that reads a little at a time); 0: it
    /// begins a message.
    pub continuation: u8,
    pub _pad: [u8; 2],
    /// `bpf_ktime_get_ns()` at the send or receive.
    pub timestamp_ns: u64,
    /// Kernel address of the socket.
    pub sk: u64,
    /// Offset of the chunk's first byte in its direction's stream (bytes before it).
    pub offset: u64,
    /// Bytes the call moved.
    pub len: u32,
    /// Bytes of `head` filled: `min(len, HEAD_CAPTURE)`, or less where the buffer was in pieces
    /// (the first piece of a `writev`/`sendmsg`) or unreadable.
    pub captured: u32,
    pub head: [u8; HEAD_CAPTURE],
}

impl Default for MessageHead {
    fn default() -> Self {
        Self {
            kind: 0,
            probe: 0,
            direction: 0,
            continuation: 0,
            _pad: [0; 2],
            timestamp_ns: 0,
            sk: 0,
            offset: 0,
            len: 0,
            captured: 0,
            head: [0; HEAD_CAPTURE],
        }
    }
}

/// What the kernel side keeps per socket (the `SOCKETS` map value, or the socket's entry in
/// socket-local storage). Shared because the daemon reads it back to count open connections by
/// state (`observer_tcp_connections`).
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
    /// 1 once a program has filled the entry in: socket-local storage hands out a zeroed entry
    /// on first use, and this tells it apart from one that was already there.
    pub tracked: u8,
    pub _pad: [u8; 2],
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
    /// `--http`: followed at every send and receive.
    pub payload: PayloadFacts,
    /// `--http`: per direction (sent, received), the stream offset up to which chunks continue
    /// the head of the last message begun: `HEAD_CAPTURE` bytes past its start.
    pub head_until: [u64; 2],
    /// The kernel address of the socket (the `sk` of its events), so that an entry read back
    /// from socket-local storage, which has no key, can be joined to them.
    pub sk: u64,
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

/// One event, as written to the ring buffer. 208 bytes, 8-aligned, no implicit padding.
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
    /// With `ConnectionClosed`, under `--http`; zero otherwise.
    pub payload: PayloadFacts,
}

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::SocketEvent {}
    unsafe impl aya::Pod for super::Endpoints {}
    unsafe impl aya::Pod for super::Owner {}
    unsafe impl aya::Pod for super::ConnectionFacts {}
    unsafe impl aya::Pod for super::SocketInfo {}
    unsafe impl aya::Pod for super::PayloadFacts {}
    unsafe impl aya::Pod for super::MessageHead {}
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
        assert_eq!(size_of::<PayloadFacts>(), 48);
        assert_eq!(offset_of!(PayloadFacts, protocol), 40);
        assert_eq!(offset_of!(SocketEvent, payload), 160);
        assert_eq!(size_of::<SocketEvent>(), 208);
        assert_eq!(align_of::<SocketEvent>(), 8);
    }

    #[test]
    fn message_head_layout_has_no_implicit_padding() {
        assert_eq!(offset_of!(MessageHead, timestamp_ns), 8);
        assert_eq!(offset_of!(MessageHead, offset), 24);
        assert_eq!(offset_of!(MessageHead, captured), 36);
        assert_eq!(offset_of!(MessageHead, head), 40);
        assert_eq!(size_of::<MessageHead>(), 40 + HEAD_CAPTURE);
        assert_eq!(align_of::<MessageHead>(), 8);
    }

    #[test]
    fn socket_info_layout_has_no_implicit_padding() {
        assert_eq!(offset_of!(SocketInfo, owner), 40);
        assert_eq!(offset_of!(SocketInfo, role), 72);
        assert_eq!(offset_of!(SocketInfo, reason), 80);
        assert_eq!(offset_of!(SocketInfo, start_ns), 96);
        assert_eq!(offset_of!(SocketInfo, facts), 112);
        assert_eq!(offset_of!(SocketInfo, payload), 160);
        assert_eq!(size_of::<SocketInfo>(), 232);
    }

    #[test]
    fn event_kinds_round_trip() {
        for kind in [
            EventKind::ResetReceived,
            EventKind::ResetSent,
            EventKind::ConnectionClosed,
            EventKind::ConnectionOpened,
            EventKind::MessageHead,
        ] {
            assert_eq!(EventKind::from_u16(kind as u16), Some(kind));
        }
        assert_eq!(EventKind::from_u16(0), None);
    }
}
