//! How a connection ended: the decision from an event's facts (and, with `--http`, the HTTP/1.x
//! exchange's [`Verdict`]) to an [`Outcome`].

use observer_common::{EventKind, Role, SocketEvent, flags, tcp_state};

use crate::{
    decode::Event,
    exchange::{Stage, Verdict},
    reasons::ResetReasons,
};

/// Ways a connection ends prematurely, mutually exclusive. When several facts hold, the first
/// listed wins: `Refused` > `ConnectTimeout` > `TruncatedResponse` > `PeerReset` > `Timeout` >
/// `UnreadData` > `LocalReset` > `EofBeforeResponse` > `Abandoned` (README "How a connection
/// ended").
/// The discriminants are stable: they key aggregated series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum PrematureClose {
    /// A connect() was answered with RST.
    Refused = 1,
    /// The connection got an RST from its peer.
    PeerReset = 2,
    /// The local process closed it with received bytes unread, so the kernel sent RST.
    UnreadData = 3,
    /// The local side aborted it with RST (SO_LINGER 0, `ss -K`, ...).
    LocalReset = 4,
    /// Client: it sent a request (≥ 1 payload byte), received nothing, and the peer closed with
    /// FIN: what a Go client reports as `EOF`.
    EofBeforeResponse = 5,
    /// Server: the peer sent ≥ 1 payload byte and closed before the local side sent any (the
    /// client gave up; nginx's 499).
    Abandoned = 6,
    /// An established connection aborted by retransmission, user or keepalive timeout
    /// (`ETIMEDOUT`).
    Timeout = 7,
    /// SYN retries exhausted: `connect()` gave `ETIMEDOUT`.
    ConnectTimeout = 8,
    /// `--http`: the connection ended (FIN or RST) while an HTTP/1.x response was incomplete by
    /// its own framing: headers unfinished, fewer body bytes than its `Content-Length`, or a
    /// chunked body without its last chunk. Both ends get it: the sender and the receiver.
    TruncatedResponse = 9,
}

impl PrematureClose {
    pub const ALL: [Self; 9] = [
        Self::Refused,
        Self::ConnectTimeout,
        Self::TruncatedResponse,
        Self::PeerReset,
        Self::Timeout,
        Self::UnreadData,
        Self::LocalReset,
        Self::EofBeforeResponse,
        Self::Abandoned,
    ];

    pub const fn from_index(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Refused),
            2 => Some(Self::PeerReset),
            3 => Some(Self::UnreadData),
            4 => Some(Self::LocalReset),
            5 => Some(Self::EofBeforeResponse),
            6 => Some(Self::Abandoned),
            7 => Some(Self::Timeout),
            8 => Some(Self::ConnectTimeout),
            9 => Some(Self::TruncatedResponse),
            _ => None,
        }
    }

    /// The `kind` label value.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::PeerReset => "peer_reset",
            Self::UnreadData => "unread_data",
            Self::LocalReset => "local_reset",
            Self::EofBeforeResponse => "eof_before_response",
            Self::Abandoned => "abandoned",
            Self::Timeout => "timeout",
            Self::ConnectTimeout => "connect_timeout",
            Self::TruncatedResponse => "truncated_response",
        }
    }
}

/// What one event means for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A connect() began or accept() returned a connection.
    Opened,
    ResetReceived,
    ResetSent {
        reason: u32,
    },
    Closed {
        premature: Option<PrematureClose>,
    },
}

/// `ETIMEDOUT` as the kernel stores it in `sk_err` (positive).
const ETIMEDOUT: u32 = libc::ETIMEDOUT as u32;

/// What `event` means; `http` is the exchange's verdict for a closed connection (`--http`).
/// `MessageHead` records are not events: they never reach here (see `pipeline`).
pub fn classify(event: &Event, reasons: &ResetReasons, http: Option<&Verdict>) -> Outcome {
    let raw = &event.raw;
    match event.kind {
        EventKind::ResetReceived => Outcome::ResetReceived,
        EventKind::ResetSent => Outcome::ResetSent { reason: raw.reason },
        EventKind::ConnectionClosed | EventKind::MessageHead => {
            Outcome::Closed { premature: premature(raw, reasons, http) }
        }
        EventKind::ConnectionOpened => Outcome::Opened,
    }
}

/// With the HTTP verdict: a request was outstanding when the connection ended (sent and not
/// answered on the client's side, received and not answered on the server's), on its first
/// exchange or on a reused connection (`idle_keepalive` without an idle time: the keep-alive
/// race).
fn request_outstanding(http: Option<&Verdict>) -> bool {
    http.is_some_and(|v| v.stage == Stage::AwaitingResponse || (v.stage == Stage::IdleKeepalive && v.idle_ns.is_none()))
}

/// How a closed connection ended, in precedence order. `raw.state` is the state it left for
/// CLOSE.
fn premature(raw: &SocketEvent, reasons: &ResetReasons, http: Option<&Verdict>) -> Option<PrematureClose> {
    let reset_received = raw.flags & flags::RESET_RECEIVED != 0;
    let reset_sent = raw.flags & flags::RESET_SENT != 0;
    let timed_out = raw.sk_err == ETIMEDOUT && !reset_received;
    let f = &raw.facts;
    // The peer's FIN arrived while the local side was still open: it closed first.
    let peer_closed_first = f.entered(tcp_state::CLOSE_WAIT);
    let sent_payload = f.data_segs_out > 0 || f.bytes_sent > 0;
    let received_payload = f.data_segs_in > 0 || f.bytes_received > 0;
    if reset_received && (raw.reset_state == tcp_state::SYN_SENT || raw.state == tcp_state::SYN_SENT) {
        Some(PrematureClose::Refused)
    } else if timed_out && raw.state == tcp_state::SYN_SENT {
        Some(PrematureClose::ConnectTimeout)
    } else if http.is_some_and(|v| v.stage.truncated_response()) {
        Some(PrematureClose::TruncatedResponse)
    } else if reset_received {
        Some(PrematureClose::PeerReset)
    } else if timed_out {
        // Keepalive timeouts send an RST too; the timeout is the story.
        Some(PrematureClose::Timeout)
    } else if reset_sent {
        // Before 6.12 the kernel reports no reason for active resets, so unread bytes (read at
        // close) decide; the reason confirms it where the kernel gives one.
        let abort_on_close = reasons.value_of("tcp_abort_on_close");
        if raw.unread_bytes > 0 || abort_on_close == Some(raw.reason) {
            Some(PrematureClose::UnreadData)
        } else {
            Some(PrematureClose::LocalReset)
        }
    } else if !peer_closed_first {
        None
    } else {
        // The HTTP verdict sees past the first exchange: a request outstanding on a reused
        // connection is the same story as on a new one.
        let outstanding = request_outstanding(http);
        let client_side = http.map(|v| v.client_side);
        match Role::from_u8(raw.role) {
            Role::Client if (sent_payload && !received_payload) || (outstanding && client_side == Some(true)) => {
                Some(PrematureClose::EofBeforeResponse)
            }
            Role::Server if (received_payload && !sent_payload) || (outstanding && client_side == Some(false)) => {
                Some(PrematureClose::Abandoned)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use observer_common::{ConnectionFacts, ProbeId, REASON_NONE};

    fn closed(flags: u8, state: u8, reset_state: u8, reason: u32, unread: u32) -> Event {
        Event {
            kind: EventKind::ConnectionClosed,
            probe: ProbeId::InetSockSetState,
            raw: SocketEvent { flags, state, reset_state, reason, unread_bytes: unread, ..Default::default() },
        }
    }

    fn reasons() -> ResetReasons {
        ResetReasons::from_pairs([
            (0, "SK_RST_REASON_NOT_SPECIFIED"),
            (11, "SK_RST_REASON_TCP_ABORT_ON_CLOSE"),
            (14, "SK_RST_REASON_TCP_STATE"),
        ])
    }

    fn kind(ev: &Event) -> Option<PrematureClose> {
        kind_with(ev, None)
    }

    fn kind_with(ev: &Event, http: Option<&Verdict>) -> Option<PrematureClose> {
        match classify(ev, &reasons(), http) {
            Outcome::Closed { premature } => premature,
            other => panic!("not a close: {other:?}"),
        }
    }

    #[test]
    fn graceful_close_is_not_premature() {
        assert_eq!(kind(&closed(0, tcp_state::LAST_ACK, 0, REASON_NONE, 0)), None);
        assert_eq!(kind(&closed(0, tcp_state::FIN_WAIT2, 0, REASON_NONE, 0)), None);
    }

    #[test]
    fn reset_in_syn_sent_is_refused_not_peer_reset() {
        assert_eq!(
            kind(&closed(flags::RESET_RECEIVED, tcp_state::SYN_SENT, tcp_state::SYN_SENT, REASON_NONE, 0)),
            Some(PrematureClose::Refused)
        );
        assert_eq!(
            kind(&closed(flags::RESET_RECEIVED, tcp_state::ESTABLISHED, tcp_state::ESTABLISHED, REASON_NONE, 0)),
            Some(PrematureClose::PeerReset)
        );
    }

    #[test]
    fn unread_data_by_bytes_or_by_reason() {
        assert_eq!(
            kind(&closed(flags::RESET_SENT, tcp_state::ESTABLISHED, 0, 11, 0)),
            Some(PrematureClose::UnreadData)
        );
        // Kernels before 6.12 say not_specified: the unread byte count decides.
        assert_eq!(
            kind(&closed(flags::RESET_SENT, tcp_state::ESTABLISHED, 0, 0, 90)),
            Some(PrematureClose::UnreadData)
        );
        assert_eq!(
            kind(&closed(flags::RESET_SENT, tcp_state::ESTABLISHED, 0, 14, 0)),
            Some(PrematureClose::LocalReset)
        );
    }

    #[test]
    fn received_reset_wins_over_sent_reset() {
        let both = flags::RESET_RECEIVED | flags::RESET_SENT;
        assert_eq!(
            kind(&closed(both, tcp_state::ESTABLISHED, tcp_state::ESTABLISHED, 11, 5)),
            Some(PrematureClose::PeerReset)
        );
    }

    /// A connection that closed without any reset, with these facts.
    fn ended(role: Role, states: &[u8], segs_in: u32, segs_out: u32, sk_err: u32, close_state: u8) -> Event {
        let mut facts = ConnectionFacts { data_segs_in: segs_in, data_segs_out: segs_out, ..Default::default() };
        for s in states {
            facts.states_seen |= 1 << s;
        }
        Event {
            kind: EventKind::ConnectionClosed,
            probe: ProbeId::InetSockSetState,
            raw: SocketEvent { role: role as u8, state: close_state, sk_err, facts, ..Default::default() },
        }
    }

    use tcp_state::{CLOSE_WAIT, ESTABLISHED, FIN_WAIT1, FIN_WAIT2, LAST_ACK, SYN_SENT};

    #[test]
    fn eof_before_response_needs_a_request_no_response_and_the_peer_closing_first() {
        let eof = ended(Role::Client, &[SYN_SENT, ESTABLISHED, CLOSE_WAIT, LAST_ACK], 0, 1, 0, LAST_ACK);
        assert_eq!(kind(&eof), Some(PrematureClose::EofBeforeResponse));
        // A response arrived: a normal close.
        assert_eq!(kind(&ended(Role::Client, &[SYN_SENT, ESTABLISHED, CLOSE_WAIT, LAST_ACK], 1, 1, 0, LAST_ACK)), None);
        // Nothing was sent (an idle pooled connection the server closed): normal.
        assert_eq!(kind(&ended(Role::Client, &[SYN_SENT, ESTABLISHED, CLOSE_WAIT, LAST_ACK], 0, 0, 0, LAST_ACK)), None);
        // The client closed first (it gave up): not EOF.
        assert_eq!(
            kind(&ended(Role::Client, &[SYN_SENT, ESTABLISHED, FIN_WAIT1, FIN_WAIT2], 0, 1, 0, FIN_WAIT2)),
            None
        );
    }

    #[test]
    fn abandoned_is_a_request_the_peer_gave_up_on() {
        let gave_up = ended(Role::Server, &[ESTABLISHED, CLOSE_WAIT, LAST_ACK], 1, 0, 0, LAST_ACK);
        assert_eq!(kind(&gave_up), Some(PrematureClose::Abandoned));
        // The server answered: normal.
        assert_eq!(kind(&ended(Role::Server, &[ESTABLISHED, CLOSE_WAIT, LAST_ACK], 1, 1, 0, LAST_ACK)), None);
        // The server closed first without answering: the client sees EOF, the server did it.
        assert_eq!(kind(&ended(Role::Server, &[ESTABLISHED, FIN_WAIT1, FIN_WAIT2], 1, 0, 0, FIN_WAIT2)), None);
        // Role decides which kind applies.
        assert_eq!(kind(&ended(Role::Unknown, &[ESTABLISHED, CLOSE_WAIT, LAST_ACK], 1, 0, 0, LAST_ACK)), None);
    }

    #[test]
    fn timeouts_by_state() {
        let etimedout = libc::ETIMEDOUT as u32;
        assert_eq!(
            kind(&ended(Role::Client, &[SYN_SENT], 0, 0, etimedout, SYN_SENT)),
            Some(PrematureClose::ConnectTimeout)
        );
        assert_eq!(
            kind(&ended(Role::Client, &[SYN_SENT, ESTABLISHED], 0, 3, etimedout, ESTABLISHED)),
            Some(PrematureClose::Timeout)
        );
        // Keepalive timeouts send an RST: still a timeout.
        let mut keepalive = ended(Role::Client, &[SYN_SENT, ESTABLISHED], 0, 0, etimedout, ESTABLISHED);
        keepalive.raw.flags = flags::RESET_SENT;
        assert_eq!(kind(&keepalive), Some(PrematureClose::Timeout));
        // A timeout wins over EOF facts; a received reset wins over a timeout.
        assert_eq!(
            kind(&ended(Role::Client, &[SYN_SENT, ESTABLISHED, CLOSE_WAIT], 0, 1, etimedout, CLOSE_WAIT)),
            Some(PrematureClose::Timeout)
        );
        let mut reset = ended(Role::Client, &[SYN_SENT, ESTABLISHED], 0, 1, etimedout, ESTABLISHED);
        reset.raw.flags = flags::RESET_RECEIVED;
        reset.raw.reset_state = ESTABLISHED;
        assert_eq!(kind(&reset), Some(PrematureClose::PeerReset));
    }

    #[test]
    fn reset_kinds_win_over_eof_and_abandoned() {
        let mut ev = ended(Role::Server, &[ESTABLISHED, CLOSE_WAIT, LAST_ACK], 1, 0, 0, LAST_ACK);
        ev.raw.flags = flags::RESET_SENT;
        ev.raw.unread_bytes = 10;
        assert_eq!(kind(&ev), Some(PrematureClose::UnreadData));
    }

    #[test]
    fn kinds_have_stable_numbers_and_unique_labels() {
        let mut labels = std::collections::BTreeSet::new();
        for k in PrematureClose::ALL {
            assert_eq!(PrematureClose::from_index(k as u32), Some(k));
            assert!(labels.insert(k.label()));
        }
        assert_eq!(PrematureClose::from_index(0), None);
        assert_eq!(PrematureClose::from_index(10), None);
    }

    #[test]
    fn resets_are_reported_as_such() {
        let ev = Event {
            kind: EventKind::ResetSent,
            probe: ProbeId::TcpSendReset,
            raw: SocketEvent { reason: 14, ..Default::default() },
        };
        assert_eq!(classify(&ev, &reasons(), None), Outcome::ResetSent { reason: 14 });
    }

    fn verdict(stage: Stage, client_side: bool, idle_ns: Option<u64>) -> Verdict {
        Verdict {
            stage,
            client_side,
            requests: 3,
            method: Some("POST".into()),
            path: Some("/order".into()),
            status: Some(200),
            declared_body: None,
            transferred_body: None,
            idle_ns,
        }
    }

    #[test]
    fn a_truncated_response_wins_over_the_reset_that_cut_it_on_both_ends() {
        let cut = verdict(Stage::InResponseHeaders, true, None);
        let mut receiver = ended(Role::Client, &[SYN_SENT, ESTABLISHED], 1, 1, 0, ESTABLISHED);
        receiver.raw.flags = flags::RESET_RECEIVED;
        receiver.raw.reset_state = ESTABLISHED;
        assert_eq!(kind_with(&receiver, Some(&cut)), Some(PrematureClose::TruncatedResponse));
        assert_eq!(kind(&receiver), Some(PrematureClose::PeerReset));
        let mut sender = ended(Role::Server, &[ESTABLISHED], 1, 1, 0, ESTABLISHED);
        sender.raw.flags = flags::RESET_SENT;
        let body = verdict(Stage::InResponseBody, false, None);
        assert_eq!(kind_with(&sender, Some(&body)), Some(PrematureClose::TruncatedResponse));
        // A FIN after part of the body: no TCP-level kind at all without the verdict.
        let fin = ended(Role::Client, &[SYN_SENT, ESTABLISHED, CLOSE_WAIT, LAST_ACK], 2, 1, 0, LAST_ACK);
        assert_eq!(kind(&fin), None);
        assert_eq!(
            kind_with(&fin, Some(&verdict(Stage::InResponseBody, true, None))),
            Some(PrematureClose::TruncatedResponse)
        );
        // A refused connect is still refused.
        let refused = closed(flags::RESET_RECEIVED, SYN_SENT, SYN_SENT, REASON_NONE, 0);
        assert_eq!(kind_with(&refused, Some(&cut)), Some(PrematureClose::Refused));
    }

    #[test]
    fn the_keepalive_race_is_eof_before_response_on_a_reused_connection() {
        // Earlier responses arrived, so the TCP facts alone see a normal close.
        let reused = ended(Role::Client, &[SYN_SENT, ESTABLISHED, CLOSE_WAIT, LAST_ACK], 4, 3, 0, LAST_ACK);
        assert_eq!(kind(&reused), None);
        let race = verdict(Stage::IdleKeepalive, true, None);
        assert_eq!(kind_with(&reused, Some(&race)), Some(PrematureClose::EofBeforeResponse));
        // Closed while truly idle (an idle time): normal.
        let idle = verdict(Stage::IdleKeepalive, true, Some(5_000_000_000));
        assert_eq!(kind_with(&reused, Some(&idle)), None);
        // The server side of a reused connection whose client gave up on a request.
        let gave_up = ended(Role::Server, &[ESTABLISHED, CLOSE_WAIT, LAST_ACK], 3, 2, 0, LAST_ACK);
        assert_eq!(kind(&gave_up), None);
        let pending = verdict(Stage::AwaitingResponse, false, None);
        assert_eq!(kind_with(&gave_up, Some(&pending)), Some(PrematureClose::Abandoned));
        // Complete exchanges stay clean.
        assert_eq!(kind_with(&reused, Some(&verdict(Stage::Complete, true, None))), None);
    }
}
