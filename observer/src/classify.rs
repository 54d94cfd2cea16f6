//! How a connection ended: the decision from an event's facts to an [`Outcome`].

use observer_common::{EventKind, flags, tcp_state};

use crate::{decode::Event, probes::btf::ResetReasons};

/// Ways a connection ends prematurely, mutually exclusive. When several facts hold, the first
/// listed wins (`Refused` > `PeerReset` > `UnreadData` > `LocalReset`).
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
}

impl PrematureClose {
    pub const fn from_index(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Refused),
            2 => Some(Self::PeerReset),
            3 => Some(Self::UnreadData),
            4 => Some(Self::LocalReset),
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
        }
    }
}

/// What one event means for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    ResetReceived,
    ResetSent { reason: u32 },
    Closed { premature: Option<PrematureClose> },
}

pub fn classify(event: &Event, reasons: &ResetReasons) -> Outcome {
    let raw = &event.raw;
    match event.kind {
        EventKind::ResetReceived => Outcome::ResetReceived,
        EventKind::ResetSent => Outcome::ResetSent { reason: raw.reason },
        EventKind::ConnectionClosed => {
            let premature = if raw.flags & flags::RESET_RECEIVED != 0 {
                if raw.reset_state == tcp_state::SYN_SENT || raw.state == tcp_state::SYN_SENT {
                    Some(PrematureClose::Refused)
                } else {
                    Some(PrematureClose::PeerReset)
                }
            } else if raw.flags & flags::RESET_SENT != 0 {
                // Before 6.12 the kernel reports no reason for active resets, so unread bytes
                // (read at close) decide; the reason confirms it where the kernel gives one.
                let abort_on_close = reasons.value_of("tcp_abort_on_close");
                if raw.unread_bytes > 0 || abort_on_close == Some(raw.reason) {
                    Some(PrematureClose::UnreadData)
                } else {
                    Some(PrematureClose::LocalReset)
                }
            } else {
                None
            };
            Outcome::Closed { premature }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use observer_common::{ProbeId, REASON_NONE, SocketEvent};

    fn closed(flags: u8, state: u8, reset_state: u8, reason: u32, unread: u32) -> Event {
        Event {
            kind: EventKind::ConnectionClosed,
            probe: ProbeId::InetSockSetState,
            raw: SocketEvent { flags, state, reset_state, reason, unread_bytes: unread, ..Default::default() },
        }
    }

    fn reasons() -> ResetReasons {
        ResetReasons::from_pairs([(0, "SK_RST_REASON_NOT_SPECIFIED"), (11, "SK_RST_REASON_TCP_ABORT_ON_CLOSE"), (14, "SK_RST_REASON_TCP_STATE")])
    }

    fn kind(ev: &Event) -> Option<PrematureClose> {
        match classify(ev, &reasons()) {
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
        assert_eq!(kind(&closed(flags::RESET_RECEIVED, tcp_state::SYN_SENT, tcp_state::SYN_SENT, REASON_NONE, 0)), Some(PrematureClose::Refused));
        assert_eq!(kind(&closed(flags::RESET_RECEIVED, tcp_state::ESTABLISHED, tcp_state::ESTABLISHED, REASON_NONE, 0)), Some(PrematureClose::PeerReset));
    }

    #[test]
    fn unread_data_by_bytes_or_by_reason() {
        assert_eq!(kind(&closed(flags::RESET_SENT, tcp_state::ESTABLISHED, 0, 11, 0)), Some(PrematureClose::UnreadData));
        // Kernels before 6.12 say not_specified: the unread byte count decides.
        assert_eq!(kind(&closed(flags::RESET_SENT, tcp_state::ESTABLISHED, 0, 0, 90)), Some(PrematureClose::UnreadData));
        assert_eq!(kind(&closed(flags::RESET_SENT, tcp_state::ESTABLISHED, 0, 14, 0)), Some(PrematureClose::LocalReset));
    }

    #[test]
    fn received_reset_wins_over_sent_reset() {
        let both = flags::RESET_RECEIVED | flags::RESET_SENT;
        assert_eq!(kind(&closed(both, tcp_state::ESTABLISHED, tcp_state::ESTABLISHED, 11, 5)), Some(PrematureClose::PeerReset));
    }

    #[test]
    fn resets_are_reported_as_such() {
        let ev = Event { kind: EventKind::ResetSent, probe: ProbeId::TcpSendReset, raw: SocketEvent { reason: 14, ..Default::default() } };
        assert_eq!(classify(&ev, &reasons()), Outcome::ResetSent { reason: 14 });
    }
}
