//! One ring buffer record, from bytes to metrics and the event log, in one direction:
//! [`decode`] → (socket-local storage: the accepted socket's owner, [`AcceptedOwners`]) → (`--http`: [`Exchanges`], for a closed connection's [`Verdict`]) → [`classify`]
//! → [`Attribution::attribute`] → [`Metrics::record`] (which counts it in the
//! [`crate::aggregate::Aggregator`]) and [`crate::event_log::EventLog::record`].
//! [`crate::exposition`] renders what was counted when `/metrics` is scraped. A message head
//! (`--http`) only feeds the [`Exchanges`].
//!
//! [`Metrics::record`]: crate::metrics::Metrics::record
//! [`Verdict`]: crate::exchange::Verdict

use std::sync::Arc;

use observer_common::{EventKind, Role};

use crate::{
    attribution::{AcceptedOwners, Attribution},
    classify::classify,
    decode::{Event, Head, Record, decode},
    exchange::{Close, Exchanges, HeadChunk, Heads, Verdict},
    reasons::ResetReasons,
    state::DaemonState,
};

/// Connections whose HTTP/1.x exchange is followed at once (`--http`; about 1.2 KB each, so at
/// most about 20 MB); the oldest is forgotten beyond that, and its close gets no verdict.
const MAX_EXCHANGES: usize = 16_384;

/// What the event path needs besides the record: the kernel's reset reason names, who owns
/// what, the HTTP/1.x exchanges in progress, and where the counts go.
pub struct Pipeline {
    reasons: ResetReasons,
    attribution: Attribution,
    /// Message heads read a little at a time, joined before the exchanges see them.
    heads: Heads,
    exchanges: Exchanges,
    /// A message head has come (`--http` is on and saw HTTP): until then a close costs no
    /// lookup in the tables above.
    http_seen: bool,
    /// With socket-local storage: the owners of accepted sockets, joined to their events here.
    accepted: Option<Arc<AcceptedOwners>>,
    state: Arc<DaemonState>,
}

impl Pipeline {
    pub fn new(reasons: ResetReasons, attribution: Attribution, state: Arc<DaemonState>) -> Self {
        Self {
            reasons,
            attribution,
            heads: Heads::default(),
            exchanges: Exchanges::new(MAX_EXCHANGES),
            http_seen: false,
            accepted: None,
            state,
        }
    }

    /// Joins accepted sockets' owners to their events (the kernel's entries lack them: see
    /// [`AcceptedOwners`]).
    pub fn with_accepted_owners(mut self, owners: Arc<AcceptedOwners>) -> Self {
        self.accepted = Some(owners);
        self
    }

    /// Handles one ring buffer record. A record that does not decode is counted in
    /// `observer_events_malformed_total` and dropped; nothing here panics on what the kernel
    /// hands over.
    pub fn handle(&mut self, record: &[u8]) {
        let mut event = match decode(record) {
            Ok(Record::Event(event)) => event,
            Ok(Record::Head(head)) => return self.head(&head),
            Err(e) => {
                log::debug!("dropping malformed record: {e}");
                self.state.metrics.record_malformed();
                return;
            }
        };
        if let Some(accepted) = &self.accepted {
            accepted.complete(&mut event.raw);
        }
        let http = (self.http_seen && event.kind == EventKind::ConnectionClosed)
            .then(|| self.close_exchange(&event))
            .flatten();
        let outcome = classify(&event, &self.reasons, http.as_ref());
        let attributed = self.attribution.attribute(&event);
        self.state.metrics.record(&event, outcome, &attributed);
        self.state.event_log().record(&event, outcome, &self.reasons, attributed.container.as_ref(), http);
    }

    fn head(&mut self, head: &Head) {
        self.http_seen = true;
        self.state.metrics.record_head(head.probe);
        let raw = &head.raw;
        let record = HeadChunk {
            sk: raw.sk,
            direction: head.direction,
            offset: raw.offset,
            len: u64::from(raw.len),
            bytes: head.bytes().to_vec(),
            timestamp_ns: raw.timestamp_ns,
        };
        for whole in self.heads.push(record, raw.continuation != 0) {
            self.exchanges.chunk(&whole.as_chunk());
        }
    }

    /// The verdict on the HTTP/1.x exchange of the connection `event` closes, if it carried one.
    fn close_exchange(&mut self, event: &Event) -> Option<Verdict> {
        let raw = &event.raw;
        for held in self.heads.flush(raw.sk) {
            self.exchanges.chunk(&held.as_chunk());
        }
        let p = &raw.payload;
        self.exchanges.close(&Close {
            sk: raw.sk,
            is_client_role: match Role::from_u8(raw.role) {
                Role::Client => Some(true),
                Role::Server => Some(false),
                Role::Unknown => None,
            },
            local_port: raw.endpoints.local_port,
            remote_port: raw.endpoints.remote_port,
            // What the application sent; what arrived (read or not: unread bytes crossed too).
            bytes_sent: p.sent,
            bytes_received: p.received.max(raw.facts.bytes_received),
            tail_sent: tail(&p.tail_sent, p.sent),
            tail_received: tail(&p.tail_received, p.received),
            last_data_ns: p.last_data_ns,
            closed_ns: raw.timestamp_ns,
        })
    }
}

/// The bytes of a `PayloadFacts` tail that crossed: its last `min(total, 8)` (the rest is the
/// zero fill of a stream shorter than the tail).
fn tail(bytes: &[u8; 8], total: u64) -> &[u8] {
    let n = total.min(8) as usize;
    &bytes[8 - n..]
}

/// Property tests: records with valid kind and probe but arbitrary fields (a buggy or hostile
/// kernel side) go through the whole event path without panicking.
#[cfg(test)]
mod properties {
    use std::sync::Mutex;

    use observer_common::{MessageHead, SocketEvent};
    use proptest::prelude::*;

    use super::*;
    use crate::{aggregate::Limits, container::CgroupResolver, exposition};

    proptest! {
        #[test]
        fn arbitrary_valid_records_flow_to_metrics_and_the_event_log(
            mut bytes in proptest::collection::vec(any::<u8>(), size_of::<SocketEvent>()..=size_of::<SocketEvent>() + 32),
            kind in 1u16..=4,
            probe in 0u16..=5,
        ) {
            bytes[0..2].copy_from_slice(&kind.to_ne_bytes());
            bytes[2..4].copy_from_slice(&probe.to_ne_bytes());
            let state = Arc::new(DaemonState::new("test".into(), Limits { max_peers: 2, max_series: 4 }, Default::default()));
            let reasons = ResetReasons::from_pairs([(1, "no_socket"), (2, "tcp_abort_on_close")]);
            let resolver = Arc::new(Mutex::new(CgroupResolver::without_mount()));
            let mut pipeline = Pipeline::new(reasons, Attribution::for_host(resolver, state.pods.clone()), state.clone());
            pipeline.handle(&bytes);
            prop_assert!(state.event_log().page(0, 10).events.len() <= 1);
            prop_assert!(!exposition::render(&state.metrics, &state.pods.snapshot(), &[]).is_empty());
            prop_assert_eq!(state.metrics.events_seen().iter().map(|(_, n)| n).sum::<u64>(), 1);
        }

        #[test]
        fn arbitrary_message_heads_then_their_close_flow_without_panicking(
            mut head in proptest::collection::vec(any::<u8>(), size_of::<MessageHead>()..=size_of::<MessageHead>() + 32),
            mut close in proptest::collection::vec(any::<u8>(), size_of::<SocketEvent>()..=size_of::<SocketEvent>()),
            probe in 17u16..=18,
            direction in 1u8..=2,
            captured in 0u32..=600,
        ) {
            head[0..2].copy_from_slice(&5u16.to_ne_bytes());
            head[2..4].copy_from_slice(&probe.to_ne_bytes());
            head[4] = direction;
            head[36..40].copy_from_slice(&captured.to_ne_bytes());
            // The close of the same socket.
            close[0..2].copy_from_slice(&3u16.to_ne_bytes());
            close[2..4].copy_from_slice(&0u16.to_ne_bytes());
            close[16..24].copy_from_slice(&head[16..24]);
            let state = Arc::new(DaemonState::new("test".into(), Limits { max_peers: 2, max_series: 4 }, Default::default()));
            let resolver = Arc::new(Mutex::new(CgroupResolver::without_mount()));
            let mut pipeline = Pipeline::new(ResetReasons::default(), Attribution::for_host(resolver, state.pods.clone()), state.clone());
            pipeline.handle(&head);
            pipeline.handle(&close);
            prop_assert_eq!(state.metrics.events_seen().iter().map(|(_, n)| n).sum::<u64>(), 2);
        }
    }
}
