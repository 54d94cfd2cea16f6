//! Ring buffer bytes → [`Event`]. The only place that interprets raw records.

use observer_common::{EventKind, ProbeId, SocketEvent};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than an event ({expected} bytes)")]
    Short { len: usize, expected: usize },
    #[error("unknown event kind {0}")]
    Kind(u16),
    #[error("unknown probe id {0}")]
    Probe(u16),
}

/// A decoded event: the raw record plus its validated kind and probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub probe: ProbeId,
    pub raw: SocketEvent,
}

/// Decodes one ring buffer record. Longer records are accepted (a newer kernel side may append
/// fields); shorter ones and unknown kinds are errors, never panics.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let expected = size_of::<SocketEvent>();
    if bytes.len() < expected {
        return Err(DecodeError::Short { len: bytes.len(), expected });
    }
    // SAFETY: length checked; SocketEvent is plain old data valid for any bit pattern, and
    // read_unaligned copes with any alignment of the ring buffer slice.
    let raw = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<SocketEvent>()) };
    let kind = EventKind::from_u16(raw.kind).ok_or(DecodeError::Kind(raw.kind))?;
    let probe = ProbeId::from_u16(raw.probe).ok_or(DecodeError::Probe(raw.probe))?;
    Ok(Event { kind, probe, raw })
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
        let ev = decode(&bytes_of(&raw)).unwrap();
        assert_eq!(ev.kind, EventKind::ResetSent);
        assert_eq!(ev.probe, ProbeId::TcpSendReset);
        assert_eq!(ev.raw, raw);
    }

    #[test]
    fn rejects_truncated_and_unknown_records() {
        let raw = SocketEvent { kind: 1, probe: 1, ..Default::default() };
        let bytes = bytes_of(&raw);
        assert_eq!(decode(&bytes[..159]), Err(DecodeError::Short { len: 159, expected: 160 }));
        assert_eq!(decode(&[]), Err(DecodeError::Short { len: 0, expected: 160 }));
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
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            match decode(&bytes) {
                Ok(_) => prop_assert!(bytes.len() >= size_of::<SocketEvent>()),
                Err(DecodeError::Short { len, expected }) => {
                    prop_assert_eq!(len, bytes.len());
                    prop_assert!(len < expected);
                }
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
