//! One ring buffer record, from bytes to metrics and the event log, in one direction:
//! [`decode`] → [`classify`] → [`Attribution::attribute`] → [`Metrics::record`] (which counts it
//! in the [`crate::aggregate::Aggregator`]) and [`crate::event_log::EventLog::record`].
//! [`crate::exposition`] renders what was counted when `/metrics` is scraped.
//!
//! [`Metrics::record`]: crate::metrics::Metrics::record

use std::sync::Arc;

use crate::{attribution::Attribution, classify::classify, decode::decode, reasons::ResetReasons, state::DaemonState};

/// What the event path needs besides the record: the kernel's reset reason names, who owns
/// what, and where the counts go.
pub struct Pipeline {
    reasons: ResetReasons,
    attribution: Attribution,
    state: Arc<DaemonState>,
}

impl Pipeline {
    pub fn new(reasons: ResetReasons, attribution: Attribution, state: Arc<DaemonState>) -> Self {
        Self { reasons, attribution, state }
    }

    /// Handles one ring buffer record. A record that does not decode is counted in
    /// `observer_events_malformed_total` and dropped; nothing here panics on what the kernel
    /// hands over.
    pub fn handle(&self, record: &[u8]) {
        let event = match decode(record) {
            Ok(event) => event,
            Err(e) => {
                log::debug!("dropping malformed record: {e}");
                self.state.metrics.record_malformed();
                return;
            }
        };
        let outcome = classify(&event, &self.reasons);
        let attributed = self.attribution.attribute(&event);
        self.state.metrics.record(&event, outcome, &attributed);
        self.state.event_log().record(&event, outcome, &self.reasons, attributed.container.as_ref());
    }
}

/// Property tests: records with valid kind and probe but arbitrary fields (a buggy or hostile
/// kernel side) go through the whole event path without panicking.
#[cfg(test)]
mod properties {
    use std::sync::Mutex;

    use observer_common::SocketEvent;
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
            let pipeline = Pipeline::new(reasons, Attribution::for_host(resolver, state.pods.clone()), state.clone());
            pipeline.handle(&bytes);
            prop_assert!(state.event_log().page(0, 10).events.len() <= 1);
            prop_assert!(!exposition::render(&state.metrics, &state.pods.snapshot(), &[]).is_empty());
            prop_assert_eq!(state.metrics.events_seen().iter().map(|(_, n)| n).sum::<u64>(), 1);
        }
    }
}
