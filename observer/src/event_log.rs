//! The event log, fed by the pipeline beside the metrics: recent resets and premature closes,
//! one record each, with who owned the socket and, when both ends of the connection live on this
//! node, who caused it (cause pairing).
//!
//! Pairing works because a reset crosses this node twice: the sender's `tcp_send_reset` names the
//! segment's endpoints (its local address and port, then the peer's), and the receiver's
//! `tcp_receive_reset` names the same four values mirrored. Either can come first: the kernel
//! traces an active reset *after* transmitting it, and on loopback the receiver may already have
//! processed it. So both sides wait for each other: recent sends by flow, and records still
//! without a cause by the flow of the reset they received; whichever arrives second completes
//! the pair, updating records already logged.
//!
//! Bounded: at most `RECENT_SENDS` remembered sends and waiting flows (each kept
//! `PAIRING_WINDOW_NS`), at most `PENDING_CAUSES` causes waiting for their close, and the
//! last [`LOG_CAPACITY`] records.

use std::{collections::VecDeque, sync::Arc};

use observer_common::{Endpoints, SocketEvent};

use crate::{
    HashMap,
    api::{Cause, EventRecord, EventsPage, Facts, PodLabels},
    classify::{Outcome, PrematureClose},
    container::Container,
    decode::Event,
    pods::{PodIdentity, Pods},
    query::{Filter, rfc3339, wall_offset_ns},
    reasons::ResetReasons,
    series::{comm_text, ip_text, role_text, tcp_state_label},
};

/// Records kept for `/api/v1/events`.
pub const LOG_CAPACITY: usize = 4096;
/// Resets sent remembered for pairing.
const RECENT_SENDS: usize = 8192;
/// How long a sent reset waits for its receiver.
const PAIRING_WINDOW_NS: u64 = 2_000_000_000;
/// Paired causes waiting for the receiving connection's close.
const PENDING_CAUSES: usize = 8192;

/// (local address, local port, remote address, remote port) as the sender saw them.
type Flow = ([u8; 16], u16, [u8; 16], u16);

fn flow(e: &Endpoints) -> Flow {
    (e.local_addr, e.local_port, e.remote_addr, e.remote_port)
}

fn mirrored(e: &Endpoints) -> Flow {
    (e.remote_addr, e.remote_port, e.local_addr, e.local_port)
}

/// Who sent a reset, as remembered for pairing; rendered into a [`Cause`] only when read.
#[derive(Debug, Clone)]
struct Sender {
    comm: [u8; 16],
    pid: u32,
    /// The reset answered a segment that matched no socket.
    no_socket: bool,
    reason: u32,
    container: Option<Arc<Container>>,
}

/// One logged event, kept raw: the event path only copies it; `/api/v1/events` renders it.
#[derive(Debug, Clone)]
struct Entry {
    seq: u64,
    raw: SocketEvent,
    outcome: Outcome,
    container: Option<Arc<Container>>,
    cause: Option<Sender>,
    /// Logged before the send of the reset it received was seen: its cause may still come,
    /// within the pairing window.
    awaits_cause: bool,
}

#[derive(Debug, Default)]
pub struct EventLog {
    /// Names the pods of the containers records come from.
    pods: Arc<Pods>,
    entries: VecDeque<Entry>,
    next_seq: u64,
    /// The kernel's reset reason names, for rendering (set by the first record).
    reasons: Option<ResetReasons>,
    /// Recent resets sent, by flow, with the time they were sent.
    sends: HashMap<Flow, (u64, Sender)>,
    sends_order: VecDeque<(u64, Flow)>,
    /// Causes found for a socket's received reset, kept for its close.
    pending: HashMap<u64, Sender>,
    pending_order: VecDeque<u64>,
    /// Records still without a cause, by the flow of the reset they received (as its sender
    /// saw it), with the time of the first.
    waiting: HashMap<Flow, (u64, Vec<(u64, u64)>)>,
    waiting_order: VecDeque<(u64, Flow)>,
    paired: u64,
    /// CLOCK_REALTIME − CLOCK_MONOTONIC as last read, for records' `time`: kept while the
    /// clocks agree within 10 ms, so a record renders the same wall time each time it is read.
    wall_offset: std::cell::Cell<u64>,
}

impl EventLog {
    /// An empty log whose records name their pods from `pods`.
    pub fn new(pods: Arc<Pods>) -> Self {
        Self { pods, ..Self::default() }
    }

    /// Records one event (resets and premature closes; openings and graceful closes are only
    /// counted).
    /// Allocation-free but for the tables' growth: rendering happens when the log is read.
    pub fn record(
        &mut self,
        event: &Event,
        outcome: Outcome,
        reasons: &ResetReasons,
        container: Option<&Arc<Container>>,
    ) {
        if self.reasons.is_none() {
            self.reasons = Some(reasons.clone());
        }
        let raw = &event.raw;
        let cause = match outcome {
            // Openings are counted only: the log is about how connections end.
            Outcome::Opened => return,
            Outcome::ResetSent { reason } => {
                self.remember_send(raw, reason, container);
                self.complete_waiting(flow(&raw.endpoints));
                None
            }
            Outcome::ResetReceived => {
                let cause = self.pair(raw);
                if let Some(cause) = &cause {
                    self.remember_pending(raw.sk, cause.clone());
                }
                cause
            }
            Outcome::Closed { premature: None } => {
                self.pending.remove(&raw.sk);
                return;
            }
            Outcome::Closed { premature: Some(PrematureClose::PeerReset | PrematureClose::Refused) } => {
                self.pending.remove(&raw.sk).or_else(|| self.pair(raw))
            }
            Outcome::Closed { premature: Some(_) } => None,
        };
        let awaits_cause = cause.is_none()
            && matches!(
                outcome,
                Outcome::ResetReceived
                    | Outcome::Closed { premature: Some(PrematureClose::PeerReset | PrematureClose::Refused) }
            );
        let seq = self.push(Entry { seq: 0, raw: *raw, outcome, container: container.cloned(), cause, awaits_cause });
        if awaits_cause {
            self.wait_for_cause(mirrored(&raw.endpoints), raw.timestamp_ns, seq, raw.sk);
        }
    }

    fn push(&mut self, mut entry: Entry) -> u64 {
        self.next_seq += 1;
        entry.seq = self.next_seq;
        if entry.cause.is_some() {
            self.paired += 1;
        }
        if self.entries.len() == LOG_CAPACITY {
            self.entries.pop_front();
        }
        self.entries.push_back(entry);
        self.next_seq
    }

    /// Record `seq` (about socket `sk`) waits for the send of the reset it received.
    fn wait_for_cause(&mut self, f: Flow, now: u64, seq: u64, sk: u64) {
        while let Some(&(at, old)) = self.waiting_order.front() {
            if self.waiting_order.len() < RECENT_SENDS && now.saturating_sub(at) < PAIRING_WINDOW_NS {
                break;
            }
            self.waiting_order.pop_front();
            if self.waiting.get(&old).is_some_and(|(t, _)| *t == at) {
                self.waiting.remove(&old);
            }
        }
        let entry = self.waiting.entry(f).or_insert_with(|| (now, Vec::new()));
        if entry.1.is_empty() {
            self.waiting_order.push_back((now, f));
        }
        if entry.1.len() < 8 {
            entry.1.push((seq, sk));
        }
    }

    /// A send just arrived for `f`: records that received it earlier get their cause now.
    fn complete_waiting(&mut self, f: Flow) {
        let Some((_, seqs)) = self.waiting.remove(&f) else { return };
        let Some((_, cause)) = self.sends.get(&f) else { return };
        let cause = cause.clone();
        let first = self.entries.front().map_or(0, |r| r.seq);
        let mut still_open = Vec::new();
        let mut closed = Vec::new();
        for (seq, sk) in seqs {
            let Some(entry) = seq.checked_sub(first).and_then(|i| self.entries.get_mut(i as usize)) else { continue };
            if entry.cause.is_none() {
                entry.cause = Some(cause.clone());
                self.paired += 1;
            }
            if entry.outcome == Outcome::ResetReceived { still_open.push(sk) } else { closed.push(sk) }
        }
        // A receiver whose close is not logged yet gets the cause when it comes.
        for sk in still_open.into_iter().filter(|sk| !closed.contains(sk)) {
            self.remember_pending(sk, cause.clone());
        }
    }

    fn remember_send(&mut self, raw: &SocketEvent, reason: u32, container: Option<&Arc<Container>>) {
        let now = raw.timestamp_ns;
        while let Some(&(at, f)) = self.sends_order.front() {
            if self.sends_order.len() < RECENT_SENDS && now.saturating_sub(at) < PAIRING_WINDOW_NS {
                break;
            }
            self.sends_order.pop_front();
            if self.sends.get(&f).is_some_and(|(t, _)| *t == at) {
                self.sends.remove(&f);
            }
        }
        let sender = Sender {
            comm: raw.owner.comm,
            pid: raw.owner.tgid,
            no_socket: raw.sk == 0,
            reason,
            container: container.cloned(),
        };
        let f = flow(&raw.endpoints);
        self.sends.insert(f, (now, sender));
        self.sends_order.push_back((now, f));
    }

    /// The remembered send whose segment this socket received.
    fn pair(&self, raw: &SocketEvent) -> Option<Sender> {
        let (at, cause) = self.sends.get(&mirrored(&raw.endpoints))?;
        (raw.timestamp_ns.saturating_sub(*at) < PAIRING_WINDOW_NS).then(|| cause.clone())
    }

    fn remember_pending(&mut self, sk: u64, cause: Sender) {
        if self.pending.insert(sk, cause).is_none() {
            self.pending_order.push_back(sk);
        }
        while self.pending_order.len() > PENDING_CAUSES {
            if let Some(old) = self.pending_order.pop_front() {
                self.pending.remove(&old);
            }
        }
    }

    /// Records after `since`, at most `limit`.
    /// The newest `seq` up to which every record is complete at kernel time `now_ns`: none of
    /// them can still gain a cause (paired, not waiting for one, or past the pairing window).
    /// `--log-events` writes records only up to it, so a line is never less than the API's.
    pub fn complete_through(&self, now_ns: u64) -> u64 {
        self.entries
            .iter()
            .find(|e| {
                e.awaits_cause && e.cause.is_none() && now_ns.saturating_sub(e.raw.timestamp_ns) < PAIRING_WINDOW_NS
            })
            .map_or(self.next_seq, |e| e.seq - 1)
    }

    pub fn page(&self, since: u64, limit: usize) -> EventsPage {
        self.query(since, limit, &Filter::default())
    }

    /// Records after `after` that `filter` selects, at most `limit`, oldest first. `next` is
    /// the last record looked at: with a filter, later pages go on from there.
    pub fn query(&self, after: u64, limit: usize, filter: &Filter) -> EventsPage {
        self.refresh_wall_offset();
        let mut events = Vec::new();
        let mut next = None;
        for e in self.entries.iter().filter(|e| e.seq > after) {
            if events.len() == limit {
                break;
            }
            let record = self.render(e);
            next = Some(e.seq);
            if filter.matches(&record) {
                events.push(record);
            }
        }
        let next = next.unwrap_or(after.min(self.next_seq).max(self.first_seq().saturating_sub(1)));
        EventsPage { next, latest: self.next_seq, events }
    }

    fn refresh_wall_offset(&self) {
        let now = wall_offset_ns();
        if now.abs_diff(self.wall_offset.get()) > 10_000_000 {
            self.wall_offset.set(now);
        }
    }

    fn first_seq(&self) -> u64 {
        self.entries.front().map_or(self.next_seq + 1, |r| r.seq)
    }

    /// The last `n` premature closes, oldest first.
    pub fn recent_premature(&self, n: usize) -> Vec<EventRecord> {
        self.refresh_wall_offset();
        let mut recent: Vec<EventRecord> = self
            .entries
            .iter()
            .rev()
            .filter(|e| matches!(e.outcome, Outcome::Closed { premature: Some(_) }))
            .take(n)
            .map(|e| self.render(e))
            .collect();
        recent.reverse();
        recent
    }

    /// Records that name their cause.
    pub fn paired(&self) -> u64 {
        self.paired
    }

    fn reason_label(&self, reason: u32) -> String {
        self.reasons.as_ref().map_or("not_specified", |r| r.label(reason)).to_string()
    }

    fn render(&self, entry: &Entry) -> EventRecord {
        let raw = &entry.raw;
        let (event, kind, reason) = match entry.outcome {
            Outcome::ResetSent { reason } => ("reset_sent", None, Some(self.reason_label(reason))),
            Outcome::ResetReceived => ("reset_received", None, None),
            Outcome::Closed { premature } => ("closed", premature.map(|k| k.label().to_string()), None),
            // Never recorded (see record); named for completeness.
            Outcome::Opened => ("opened", None, None),
        };
        let e = &raw.endpoints;
        let facts = (event == "closed").then(|| facts(raw, kind.as_deref()));
        EventRecord {
            seq: entry.seq,
            timestamp_ns: raw.timestamp_ns,
            time: rfc3339(raw.timestamp_ns, self.wall_offset.get()),
            event: event.to_string(),
            kind,
            reason,
            comm: comm_text(&raw.owner.comm),
            pid: raw.owner.tgid,
            role: role_text(raw.role).to_string(),
            owner: self.owned(entry.container.as_ref()),
            cgroup: entry.container.as_ref().map(|c| c.cgroup_path.clone()).unwrap_or_default(),
            local: endpoint_text(&e.local_addr, e.local_port),
            remote: endpoint_text(&e.remote_addr, e.remote_port),
            facts,
            cause: entry.cause.as_ref().map(|c| self.render_cause(c)),
        }
    }

    fn render_cause(&self, s: &Sender) -> Cause {
        let comm = comm_text(&s.comm);
        let reason = self.reason_label(s.reason);
        let owner = self.owned(s.container.as_ref());
        let pod =
            if owner.pod.is_empty() { String::new() } else { format!(" (pod {}/{})", owner.namespace, owner.pod) };
        let summary = if s.no_socket {
            format!("reset by the kernel, nothing listening: {reason}")
        } else if comm.is_empty() {
            format!("reset by an unknown process: {reason}")
        } else {
            format!("reset by {comm}[{}]{pod}: {reason}", s.pid)
        };
        Cause { comm, pid: s.pid, owner, reason, summary }
    }

    /// A record's container identity: the runtime's short id and, once the runtime named it,
    /// the pod (looked up when the record is read, so a name that came late is there).
    fn owned(&self, container: Option<&Arc<Container>>) -> PodLabels {
        let Some(c) = container.filter(|c| c.id.is_some()) else { return PodLabels::default() };
        let pod = self.pods.identity(&Pods::key_of(c));
        let PodIdentity { namespace, pod, container, .. } = pod.as_deref().cloned().unwrap_or_default();
        PodLabels { container_id: c.short_id().to_string(), namespace, pod, container }
    }
}

fn endpoint_text(addr: &[u8; 16], port: u16) -> String {
    let ip = ip_text(addr);
    if ip.contains(':') { format!("[{ip}]:{port}") } else { format!("{ip}:{port}") }
}

fn facts(raw: &SocketEvent, kind: Option<&str>) -> Facts {
    use observer_common::tcp_state::*;
    let f = &raw.facts;
    let close_initiator = match kind {
        Some("peer_reset" | "refused" | "unread_data" | "local_reset") => "reset",
        Some("timeout" | "connect_timeout") => "timeout",
        _ if f.entered(CLOSE_WAIT) => "peer",
        _ if f.entered(FIN_WAIT1) => "local",
        _ => "unknown",
    };
    Facts {
        duration_seconds: f.duration_ns as f64 / 1e9,
        bytes_received: f.bytes_received,
        bytes_sent: f.bytes_sent,
        srtt_us: f.srtt_us,
        retransmits: f.retransmits,
        final_state: tcp_state_label(raw.state).to_string(),
        close_initiator: close_initiator.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use observer_common::{EventKind, Owner, ProbeId, Role, flags, tcp_state};

    use super::*;

    fn v4(last: u8) -> [u8; 16] {
        let mut a = [0u8; 16];
        a[10] = 0xff;
        a[11] = 0xff;
        a[12] = 127;
        a[15] = last;
        a
    }

    fn ev(kind: EventKind, sk: u64, comm: &[u8], pid: u32, local: (u8, u16), remote: (u8, u16)) -> Event {
        let mut c = [0u8; 16];
        c[..comm.len()].copy_from_slice(comm);
        Event {
            kind,
            probe: ProbeId::TcpSendReset,
            raw: SocketEvent {
                kind: kind as u16,
                sk,
                timestamp_ns: 1_000,
                role: Role::Client as u8,
                state: tcp_state::ESTABLISHED,
                flags: flags::RESET_RECEIVED,
                endpoints: Endpoints {
                    local_addr: v4(local.0),
                    local_port: local.1,
                    remote_addr: v4(remote.0),
                    remote_port: remote.1,
                    family: 2,
                    _pad: 0,
                },
                owner: Owner { tgid: pid, comm: c, ..Owner::default() },
                ..SocketEvent::default()
            },
        }
    }

    fn reasons() -> ResetReasons {
        ResetReasons::from_pairs([(2, "SK_RST_REASON_TCP_ABORT_ON_CLOSE")])
    }

    #[test]
    fn a_record_waiting_for_its_cause_holds_back_the_log_until_paired_or_past_the_window() {
        let mut log = EventLog::default();
        let received = ev(EventKind::ResetReceived, 7, b"client", 2, (2, 40000), (1, 80));
        log.record(&received, Outcome::ResetReceived, &reasons(), None);
        assert_eq!(log.complete_through(1_000), 0, "its cause may still come");
        assert_eq!(log.complete_through(1_000 + PAIRING_WINDOW_NS), 1, "the window has passed");
        let sent = ev(EventKind::ResetSent, 9, b"server", 1, (1, 80), (2, 40000));
        log.record(&sent, Outcome::ResetSent { reason: 2 }, &reasons(), None);
        assert_eq!(log.complete_through(1_000), 2, "paired: both complete");
        assert!(log.page(0, 10).events[0].cause.is_some());
    }

    #[test]
    fn a_received_reset_and_its_close_name_the_sender_and_its_reason() {
        let mut log = EventLog::default();
        let sent = ev(EventKind::ResetSent, 0xa, b"userbackend", 4711, (1, 8080), (2, 40000));
        log.record(&sent, Outcome::ResetSent { reason: 2 }, &reasons(), None);
        let received = ev(EventKind::ResetReceived, 0xb, b"nginx", 99, (2, 40000), (1, 8080));
        log.record(&received, Outcome::ResetReceived, &reasons(), None);
        let closed = ev(EventKind::ConnectionClosed, 0xb, b"nginx", 99, (2, 40000), (1, 8080));
        log.record(&closed, Outcome::Closed { premature: Some(PrematureClose::PeerReset) }, &reasons(), None);
        let page = log.page(0, 100);
        assert_eq!(page.events.len(), 3);
        assert_eq!(page.next, 3);
        for r in &page.events[1..] {
            let cause = r.cause.as_ref().expect("paired");
            assert_eq!(cause.summary, "reset by userbackend[4711]: tcp_abort_on_close");
            assert_eq!((cause.comm.as_str(), cause.pid), ("userbackend", 4711));
        }
        assert_eq!(page.events[2].kind.as_deref(), Some("peer_reset"));
        assert_eq!(page.events[2].local, "127.0.0.2:40000");
        assert_eq!(log.paired(), 2);
        assert!(log.page(3, 100).events.is_empty());
    }

    #[test]
    fn a_send_traced_after_the_receive_still_pairs_both_records() {
        // The kernel traces an active reset after transmitting it; on loopback the receiver
        // may have processed it (and closed) already.
        let mut log = EventLog::default();
        let received = ev(EventKind::ResetReceived, 0xb, b"nginx", 99, (2, 40000), (1, 8080));
        log.record(&received, Outcome::ResetReceived, &reasons(), None);
        let closed = ev(EventKind::ConnectionClosed, 0xb, b"nginx", 99, (2, 40000), (1, 8080));
        log.record(&closed, Outcome::Closed { premature: Some(PrematureClose::PeerReset) }, &reasons(), None);
        let sent = ev(EventKind::ResetSent, 0xa, b"userbackend", 4711, (1, 8080), (2, 40000));
        log.record(&sent, Outcome::ResetSent { reason: 2 }, &reasons(), None);
        let page = log.page(0, 10);
        for r in &page.events[..2] {
            assert_eq!(
                r.cause.as_ref().map(|c| c.summary.as_str()),
                Some("reset by userbackend[4711]: tcp_abort_on_close"),
                "{r:?}"
            );
        }
        assert_eq!(log.paired(), 2);
        assert!(log.pending.is_empty(), "the close is logged: nothing left waiting for it");
        // Received first, closed after the send: the close gets the cause too.
        let mut log = EventLog::default();
        log.record(&received, Outcome::ResetReceived, &reasons(), None);
        log.record(&sent, Outcome::ResetSent { reason: 2 }, &reasons(), None);
        log.record(&closed, Outcome::Closed { premature: Some(PrematureClose::PeerReset) }, &reasons(), None);
        assert_eq!(log.paired(), 2);
        assert!(log.page(0, 10).events.iter().filter(|r| r.event != "reset_sent").all(|r| r.cause.is_some()));
    }

    #[test]
    fn unrelated_or_stale_sends_are_not_paired() {
        let mut log = EventLog::default();
        let sent = ev(EventKind::ResetSent, 0xa, b"srv", 1, (1, 8080), (2, 40001));
        log.record(&sent, Outcome::ResetSent { reason: 2 }, &reasons(), None);
        let other = ev(EventKind::ResetReceived, 0xb, b"cli", 2, (2, 40000), (1, 8080));
        log.record(&other, Outcome::ResetReceived, &reasons(), None);
        let mut late = ev(EventKind::ResetReceived, 0xc, b"cli", 2, (2, 40001), (1, 8080));
        late.raw.timestamp_ns += PAIRING_WINDOW_NS;
        log.record(&late, Outcome::ResetReceived, &reasons(), None);
        assert!(log.page(0, 10).events.iter().all(|r| r.cause.is_none()));
    }

    #[test]
    fn the_log_and_the_pairing_tables_are_bounded() {
        let mut log = EventLog::default();
        for i in 0..(LOG_CAPACITY as u64 + RECENT_SENDS as u64 + 10) {
            let mut sent = ev(EventKind::ResetSent, i, b"srv", 1, (1, (i % 60000) as u16), (2, (i / 60000) as u16));
            sent.raw.timestamp_ns = i;
            log.record(&sent, Outcome::ResetSent { reason: 2 }, &reasons(), None);
        }
        assert_eq!(log.entries.len(), LOG_CAPACITY);
        assert!(log.sends.len() <= RECENT_SENDS);
        assert!(log.sends_order.len() <= RECENT_SENDS);
        for i in 0..(RECENT_SENDS as u64 + 10) {
            let mut received =
                ev(EventKind::ResetReceived, i, b"cli", 2, (2, (i % 60000) as u16), (3, (i / 60000) as u16));
            received.raw.timestamp_ns = i;
            log.record(&received, Outcome::ResetReceived, &reasons(), None);
        }
        assert!(log.waiting.len() <= RECENT_SENDS);
        assert!(log.waiting_order.len() <= RECENT_SENDS);
        let page = log.page(0, 10);
        assert_eq!(page.events.len(), 10);
        assert_eq!(page.events[0].seq, log.next_seq - LOG_CAPACITY as u64 + 1);
    }
}
