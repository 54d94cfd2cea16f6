//! Ring buffer bytes → [`Record`]: an [`Event`] about a socket, or (`--http`) a [`Head`]. The
//! only place that interprets raw records.

use observer_common::{EventKind, HEAD_CAPTURE, MessageHead, ProbeId, SocketEvent, direction};

use crate::exchange::Direction;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than an event ({expected} bytes)")]
    Short { len: usize, expected: usize },
    #[error("unknown event kind {0}")]
    Kind(u16),
    #[error("unknown probe id {0}")]
    Probe(u16),
    #[error("unknown direction {0} in a message head")]
    Direction(u8),
}

/// A decoded event: the raw record plus its validated kind and probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub probe: ProbeId,
    pub raw: SocketEvent,
}

/// The first bytes of a send or receive that begins like an HTTP/1.x message (`--http`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub probe: ProbeId,
    pub direction: Direction,
    pub raw: MessageHead,
}

impl Head {
    /// The captured bytes (never more than the record holds).
    pub fn bytes(&self) -> &[u8] {
        &self.raw.head[..(self.raw.captured as usize).min(HEAD_CAPTURE)]
    }
}

/// One ring buffer record.
// A record is decoded into a local and handled at once, never stored: boxing a variant to even
// the sizes out would add an allocation per record on the event path.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    Event(Event),
    Head(Head),
}

/// Decodes one ring buffer record. Longer records are accepted (a newer kernel side may append
/// fields); shorter ones and unknown kinds are errors, never panics.
// Inlined into the event path, the record is read straight into the caller's `Event` instead of
// being copied through a returned `Record` (sized for a 552-byte message head) twice.
#[inline]
pub fn decode(bytes: &[u8]) -> Result<Record, DecodeError> {
    let kind = match bytes {
        [a, b, ..] => u16::from_ne_bytes([*a, *b]),
        _ => return Err(DecodeError::Short { len: bytes.len(), expected: size_of::<SocketEvent>() }),
    };
    let kind = EventKind::from_u16(kind).ok_or(DecodeError::Kind(kind))?;
    if kind == EventKind::MessageHead {
        let raw: MessageHead = read(bytes)?;
        let probe = ProbeId::from_u16(raw.probe).ok_or(DecodeError::Probe(raw.probe))?;
        let direction = match raw.direction {
            direction::SENT => Direction::Sent,
            direction::RECEIVED => Direction::Received,
            other => return Err(DecodeError::Direction(other)),
        };
        return Ok(Record::Head(Head { probe, direction, raw }));
    }
    let raw: SocketEvent = read(bytes)?;
    let probe = ProbeId::from_u16(raw.probe).ok_or(DecodeError::Probe(raw.probe))?;
    Ok(Record::Event(Event { kind, probe, raw }))
}

/// A `T` from the start of `bytes`, if they are long enough.
fn read<T: aya::Pod>(bytes: &[u8]) -> Result<T, DecodeError> {
    let expected = size_of::<T>();
    if bytes.len() < expected {
        return Err(DecodeError::Short { len: bytes.len(), expected });
    }
    // SAFETY: length checked; T is plain old data valid for any bit pattern (aya::Pod), and
    // read_unaligned copes with any alignment of the ring buffer slice.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of(ev: &SocketEvent) -> Vec<u8> {
        // SAFETY: SocketEvent is repr(C) without padding.
        unsafe { std::slice::from_raw_parts((ev as *const SocketEvent).cast::<u8>(), size_of::<SocketEvent>()) }
            .to_vec()
    }

    #[test]
    fn round_trips_a_record() {
        let raw = SocketEvent { kind: 2, probe: 2, reason: 11, sk: 0xffff_8881_0000_0000, ..Default::default() };
        let Ok(Record::Event(ev)) = decode(&bytes_of(&raw)) else { panic!("not an event") };
        assert_eq!(ev.kind, EventKind::ResetSent);
        assert_eq!(ev.probe, ProbeId::TcpSendReset);
        assert_eq!(ev.raw, raw);
    }

    #[test]
    fn message_heads_decode_with_their_captured_bytes_only() {
        let mut raw =
            MessageHead { kind: 5, probe: 18, direction: direction::RECEIVED, len: 900, ..Default::default() };
        raw.head[..14].copy_from_slice(b"HTTP/1.1 200 O");
        raw.captured = 14;
        // SAFETY: MessageHead is repr(C) without padding.
        let bytes =
            unsafe { std::slice::from_raw_parts((&raw as *const MessageHead).cast::<u8>(), size_of::<MessageHead>()) };
        let Ok(Record::Head(head)) = decode(bytes) else { panic!("not a head") };
        assert_eq!(head.direction, Direction::Received);
        assert_eq!(head.probe, ProbeId::BtfSockRecvLength);
        assert_eq!(head.bytes(), b"HTTP/1.1 200 O");
        // A capture length past the record is cut to it, a short record and a bad direction
        // are errors.
        let mut long = raw;
        long.captured = 100_000;
        assert_eq!(Head { probe: head.probe, direction: head.direction, raw: long }.bytes().len(), HEAD_CAPTURE);
        assert_eq!(decode(&bytes[..300]), Err(DecodeError::Short { len: 300, expected: size_of::<MessageHead>() }));
        let mut bad = bytes.to_vec();
        bad[4] = 9;
        assert_eq!(decode(&bad), Err(DecodeError::Direction(9)));
    }

    #[test]
    fn rejects_truncated_and_unknown_records() {
        let raw = SocketEvent { kind: 1, probe: 1, ..Default::default() };
        let bytes = bytes_of(&raw);
        assert_eq!(decode(&bytes[..159]), Err(DecodeError::Short { len: 159, expected: 208 }));
        assert_eq!(decode(&[]), Err(DecodeError::Short { len: 0, expected: 208 }));
        let mut unknown = bytes.clone();
        unknown[0] = 77;
        assert_eq!(decode(&unknown), Err(DecodeError::Kind(77)));
        let mut bad_probe = bytes;
        bad_probe[2] = 200;
        assert_eq!(decode(&bad_probe), Err(DecodeError::Probe(200)));
    }
}

/// Property tests: whatever the ring buffer hands over, decoding returns an error or a value,
/// never a panic (the whole event path is exercised the same way in [`crate::pipeline`]).
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            match decode(&bytes) {
                Ok(Record::Event(_)) => prop_assert!(bytes.len() >= size_of::<SocketEvent>()),
                Ok(Record::Head(_)) => prop_assert!(bytes.len() >= size_of::<MessageHead>()),
                Err(DecodeError::Short { len, expected }) => {
                    prop_assert_eq!(len, bytes.len());
                    prop_assert!(len < expected);
                }
                // The kind is read from the first two bytes, the rest once the length is known.
                Err(DecodeError::Kind(_)) => prop_assert!(bytes.len() >= 2),
                Err(_) => prop_assert!(bytes.len() >= size_of::<SocketEvent>()),
            }
        }

        #[test]
        fn every_truncation_of_a_valid_record_is_an_error(kind in 1u16..=4, probe in 0u16..=5, cut in 0usize..size_of::<SocketEvent>()) {
            let raw = SocketEvent { kind, probe, ..Default::default() };
            // SAFETY: SocketEvent is repr(C) without padding.
            let bytes = unsafe { std::slice::from_raw_parts((&raw as *const SocketEvent).cast::<u8>(), size_of::<SocketEvent>()) };
            prop_assert_eq!(decode(&bytes[..cut]), Err(DecodeError::Short { len: cut, expected: size_of::<SocketEvent>() }));
            prop_assert!(decode(bytes).is_ok());
        }
    }
}
