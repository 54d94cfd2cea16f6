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

use std::{
    collections::{VecDeque, hash_map},
    sync::Arc,
};

use observer_common::{Endpoints, SocketEvent};

use crate::{
    HashMap,
    api::{Cause, EventRecord, EventsPage, Facts, HttpExchange, PodLabels},
    classify::Outcome,
    container::Container,
    decode::Event,
    exchange::{Stage, Verdict},
    pods::{PodIdentity, Pods},
    query::{Filter, rfc3339, wall_offset},
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

/// Values by flow, each kept for the pairing window from when it was first inserted, at most
/// `RECENT_SENDS` of them: what one side of a pairing remembers until the other side comes.
#[derive(Debug)]
struct Recent<V> {
    map: HashMap<Flow, (u64, V)>,
    order: VecDeque<(u64, Flow)>,
}

impl<V> Default for Recent<V> {
    fn default() -> Self {
        Self { map: HashMap::default(), order: VecDeque::new() }
    }
}

impl<V> Recent<V> {
    /// Forgets what is past the window at `now`, and the oldest beyond the bound.
    fn expire(&mut self, now: u64) {
        while let Some(&(at, old)) = self.order.front() {
            if self.order.len() < RECENT_SENDS && now.saturating_sub(at) < PAIRING_WINDOW_NS {
                break;
            }
            self.order.pop_front();
            // One lookup: the entry goes only if it is still the one this item inserted, not a
            // later insert of the same flow.
            if let hash_map::Entry::Occupied(item) = self.map.entry(old)
                && item.get().0 == at
            {
                item.remove();
            }
        }
    }

    /// The value for `f`, inserted with `make` at `now` if there is none.
    fn entry(&mut self, f: Flow, now: u64, make: impl FnOnce() -> V) -> &mut V {
        self.expire(now);
        let order = &mut self.order;
        &mut self
            .map
            .entry(f)
            .or_insert_with(|| {
                order.push_back((now, f));
                (now, make())
            })
            .1
    }

    /// Replaces the value for `f`, as of `now`.
    fn insert(&mut self, f: Flow, now: u64, v: V) {
        self.expire(now);
        self.map.insert(f, (now, v));
        self.order.push_back((now, f));
    }

    /// The value for `f` if it was inserted within the window before `now`.
    fn recent(&self, f: &Flow, now: u64) -> Option<&V> {
        self.map.get(f).filter(|(at, _)| now.saturating_sub(*at) < PAIRING_WINDOW_NS).map(|(_, v)| v)
    }

    fn remove(&mut self, f: &Flow) -> Option<V> {
        // Most of these maps are empty most of the time (nothing waits): skip hashing the flow.
        if self.map.is_empty() {
            return None;
        }
        self.map.remove(f).map(|(_, v)| v)
    }
}

/// Who sent a reset, or closed the connection first (its FIN), as remembered for pairing;
/// rendered into a [`Cause`] only when read.
#[derive(Debug, Clone)]
struct Sender {
    comm: [u8; 16],
    pid: u32,
    /// The reset answered a segment that matched no socket.
    no_socket: bool,
    /// `None`: not a reset but the first FIN.
    reason: Option<u32>,
    container: Option<Arc<Container>>,
}

/// Which pairing a record waits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Awaits {
    Nothing,
    /// The send of the reset it received.
    Reset,
    /// The close of the other end, which closed first (a FIN close with a premature kind).
    Close,
}

/// One logged event, kept raw: the event path only copies it; `/api/v1/events` renders it.
#[derive(Debug, Clone)]
struct Entry {
    seq: u64,
    raw: SocketEvent,
    outcome: Outcome,
    container: Option<Arc<Container>>,
    cause: Option<Sender>,
    /// Logged before the other end's reset or close was seen: its cause may still come,
    /// within the pairing window.
    awaits_cause: Awaits,
    /// `--http`: the HTTP/1.x exchange's verdict, for a closed connection that carried one.
    http: Option<Box<Verdict>>,
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
    sends: Recent<Sender>,
    /// Causes found for a socket's received reset, kept for its close.
    pending: HashMap<u64, Sender>,
    pending_order: VecDeque<u64>,
    /// Records still without a cause, by the flow of the reset they received (as its sender
    /// saw it), with the time of the first: (seq, sk) each.
    waiting: Recent<Vec<(u64, u64)>>,
    /// Connections closed by this end first (FIN) and not by a reset, by flow: their closer.
    closers: Recent<Sender>,
    /// FIN-closed premature records without their closer yet, by the closer's flow: seq each.
    waiting_close: Recent<Vec<u64>>,
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
    /// counted), with the HTTP/1.x verdict of a closed connection (`--http`).
    /// Allocation-free but for the tables' growth and a verdict: rendering happens when the log
    /// is read.
    pub fn record(
        &mut self,
        event: &Event,
        outcome: Outcome,
        reasons: &ResetReasons,
        container: Option<&Arc<Container>>,
        http: Option<Verdict>,
    ) {
        if self.reasons.is_none() {
            self.reasons = Some(reasons.clone());
        }
        let raw = &event.raw;
        let reset_received = raw.flags & observer_common::flags::RESET_RECEIVED != 0;
        if let Outcome::Closed { .. } = outcome
            && closed_first(raw)
        {
            self.remember_closer(raw, container);
        }
        let (cause, awaits) = match outcome {
            // Openings are counted only: the log is about how connections end.
            Outcome::Opened => return,
            Outcome::ResetSent { reason } => {
                self.remember_send(raw, reason, container);
                self.complete_waiting(flow(&raw.endpoints));
                (None, Awaits::Nothing)
            }
            Outcome::ResetReceived => {
                let cause = self.pair(raw);
                if let Some(cause) = &cause {
                    self.remember_pending(raw.sk, cause.clone());
                }
                (cause, Awaits::Reset)
            }
            Outcome::Closed { premature: None } => {
                self.pending.remove(&raw.sk);
                return;
            }
            // The other end closed first (its FIN came while this end was open): its closer, also
            // when a reset followed (the kernel's answer to a request sent into the closed
            // connection: the keep-alive race).
            Outcome::Closed { premature: Some(_) } if raw.facts.entered(observer_common::tcp_state::CLOSE_WAIT) => {
                let reset_by = self.pending.remove(&raw.sk).filter(|s| s.pid != 0);
                let closer = self.closers.recent(&mirrored(&raw.endpoints), raw.timestamp_ns).cloned();
                (closer.or(reset_by), Awaits::Close)
            }
            // Ended by a reset it received (refused, peer_reset, a response it cut): its sender.
            Outcome::Closed { premature: Some(_) } if reset_received => {
                (self.pending.remove(&raw.sk).or_else(|| self.pair(raw)), Awaits::Reset)
            }
            Outcome::Closed { premature: Some(_) } => (None, Awaits::Nothing),
        };
        let awaits_cause = if cause.is_none() { awaits } else { Awaits::Nothing };
        let http = http.map(Box::new);
        let seq =
            self.push(Entry { seq: 0, raw: *raw, outcome, container: container.cloned(), cause, awaits_cause, http });
        match awaits_cause {
            Awaits::Reset => self.wait_for_cause(mirrored(&raw.endpoints), raw.timestamp_ns, seq, raw.sk),
            Awaits::Close => {
                let waiting = self.waiting_close.entry(mirrored(&raw.endpoints), raw.timestamp_ns, Vec::new);
                if waiting.len() < 8 {
                    waiting.push(seq);
                }
            }
            Awaits::Nothing => {}
        }
    }

    /// Remembers the owner of a connection this end closed first, with a FIN, and hands it to
    /// records of the other end that wait for it.
    fn remember_closer(&mut self, raw: &SocketEvent, container: Option<&Arc<Container>>) {
        let closer = Sender {
            comm: raw.owner.comm,
            pid: raw.owner.tgid,
            no_socket: false,
            reason: None,
            container: container.cloned(),
        };
        let f = flow(&raw.endpoints);
        if let Some(seqs) = self.waiting_close.remove(&f) {
            let first = self.first_seq();
            for seq in seqs {
                if let Some(entry) = seq.checked_sub(first).and_then(|i| self.entries.get_mut(i as usize))
                    && entry.cause.is_none()
                {
                    entry.cause = Some(closer.clone());
                    self.paired += 1;
                }
            }
        }
        self.closers.insert(f, raw.timestamp_ns, closer);
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
        let waiting = self.waiting.entry(f, now, Vec::new);
        if waiting.len() < 8 {
            waiting.push((seq, sk));
        }
    }

    /// A send just arrived for `f`: records that received it earlier get their cause now.
    fn complete_waiting(&mut self, f: Flow) {
        let Some(seqs) = self.waiting.remove(&f) else { return };
        let Some((_, cause)) = self.sends.map.get(&f) else { return };
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
        let sender = Sender {
            comm: raw.owner.comm,
            pid: raw.owner.tgid,
            no_socket: raw.sk == 0,
            reason: Some(reason),
            container: container.cloned(),
        };
        self.sends.insert(flow(&raw.endpoints), raw.timestamp_ns, sender);
    }

    /// The remembered send whose segment this socket received.
    fn pair(&self, raw: &SocketEvent) -> Option<Sender> {
        self.sends.recent(&mirrored(&raw.endpoints), raw.timestamp_ns).cloned()
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
                e.awaits_cause != Awaits::Nothing
                    && e.cause.is_none()
                    && now_ns.saturating_sub(e.raw.timestamp_ns) < PAIRING_WINDOW_NS
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

    /// Takes a new wall-clock offset only when the clock was set (it moved by more than 10 ms)
    /// and the reading is trustworthy (within 1 ms), so a record renders the same `time` each
    /// time it is read: `--log-events` writes it once, `/api/v1/events` serves it again.
    fn refresh_wall_offset(&self) {
        let now = wall_offset();
        let kept = self.wall_offset.get();
        if kept == 0 || (now.uncertainty_ns <= 1_000_000 && now.offset_ns.abs_diff(kept) > 10_000_000) {
            self.wall_offset.set(now.offset_ns);
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
        let cause = entry.cause.as_ref().map(|c| self.render_cause(c, kind.as_deref()));
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
            http: entry.http.as_deref().map(http_exchange),
            cause,
        }
    }

    fn render_cause(&self, s: &Sender, kind: Option<&str>) -> Cause {
        let comm = comm_text(&s.comm);
        let owner = self.owned(s.container.as_ref());
        let pod =
            if owner.pod.is_empty() { String::new() } else { format!(" (pod {}/{})", owner.namespace, owner.pod) };
        let Some(reason) = s.reason else {
            // A FIN close: what it cut short.
            let what = match kind {
                Some("truncated_response") => ", with the response incomplete",
                Some("eof_before_response") => ", before any response",
                _ => "",
            };
            let who =
                if comm.is_empty() { "an unknown process".to_string() } else { format!("{comm}[{}]{pod}", s.pid) };
            let summary = format!("closed by {who}{what}");
            return Cause { comm, pid: s.pid, owner, reason: "fin".to_string(), summary };
        };
        let reason = self.reason_label(reason);
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

/// This end closed first (its FIN went out while the peer was still open), whatever followed (a
/// reset of data that came after it, say): its owner is the closer the other end's record names.
fn closed_first(raw: &SocketEvent) -> bool {
    use observer_common::tcp_state;
    raw.facts.entered(tcp_state::FIN_WAIT1) && !raw.facts.entered(tcp_state::CLOSE_WAIT)
}

fn endpoint_text(addr: &[u8; 16], port: u16) -> String {
    let ip = ip_text(addr);
    if ip.contains(':') { format!("[{ip}]:{port}") } else { format!("{ip}:{port}") }
}

/// A verdict as the API shows it, with a line that says it.
fn http_exchange(v: &Verdict) -> HttpExchange {
    let side = if v.client_side { "client" } else { "server" };
    let request = match (&v.method, &v.path) {
        (Some(m), Some(p)) => format!("{m} {p}"),
        (Some(m), None) => m.clone(),
        _ => "the request".to_string(),
    };
    let nth = if v.requests > 1 { format!(" (request {} on this connection)", v.requests) } else { String::new() };
    let (verb, crossed) = if v.client_side { ("received", "receiving") } else { ("sent", "sending") };
    let body = match (v.declared_body, v.transferred_body) {
        (Some(d), Some(t)) => format!("{verb} {t} of {d} body bytes"),
        (None, Some(t)) => format!("{verb} {t} body bytes of a chunked body without its last chunk"),
        _ => format!("{crossed} the body"),
    };
    let status = v.status.map(|s| format!("{s} ")).unwrap_or_default();
    let summary = match v.stage {
        Stage::NoRequest => "ended before any request".to_string(),
        Stage::InRequest => format!("ended while {request} was being sent{nth}"),
        Stage::AwaitingResponse => format!("ended awaiting the response to {request}{nth}"),
        Stage::InResponseHeaders => format!("ended in the response headers to {request}{nth}"),
        Stage::InResponseBody => format!("ended in the {status}response to {request}{nth}: {body}"),
        Stage::IdleKeepalive => match v.idle_ns {
            Some(idle) => {
                format!("ended idle between exchanges after {} requests, idle {:.3} s", v.requests, idle as f64 / 1e9)
            }
            None => format!("ended as {request} was sent on a reused connection{nth}: the keep-alive race"),
        },
        Stage::Complete => format!("ended after {} complete exchanges", v.requests),
    };
    HttpExchange {
        stage: v.stage.label().to_string(),
        side: side.to_string(),
        requests: v.requests,
        method: v.method.clone(),
        path: v.path.clone(),
        status: v.status,
        declared_body_bytes: v.declared_body,
        transferred_body_bytes: v.transferred_body,
        idle_seconds: v.idle_ns.map(|ns| ns as f64 / 1e9),
        summary,
    }
}

fn facts(raw: &SocketEvent, kind: Option<&str>) -> Facts {
    use observer_common::{flags, tcp_state::*};
    let f = &raw.facts;
    let close_initiator = match kind {
        Some("peer_reset" | "refused" | "unread_data" | "local_reset") => "reset",
        Some("timeout" | "connect_timeout") => "timeout",
        // A truncated response ended by FIN or by RST: say which.
        _ if raw.flags & (flags::RESET_RECEIVED | flags::RESET_SENT) != 0 => "reset",
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
    use crate::classify::PrematureClose;

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
        log.record(&received, Outcome::ResetReceived, &reasons(), None, None);
        assert_eq!(log.complete_through(1_000), 0, "its cause may still come");
        assert_eq!(log.complete_through(1_000 + PAIRING_WINDOW_NS), 1, "the window has passed");
        let sent = ev(EventKind::ResetSent, 9, b"server", 1, (1, 80), (2, 40000));
        log.record(&sent, Outcome::ResetSent { reason: 2 }, &reasons(), None, None);
        assert_eq!(log.complete_through(1_000), 2, "paired: both complete");
        assert!(log.page(0, 10).events[0].cause.is_some());
    }

    #[test]
    fn a_received_reset_and_its_close_name_the_sender_and_its_reason() {
        let mut log = EventLog::default();
        let sent = ev(EventKind::ResetSent, 0xa, b"userbackend", 4711, (1, 8080), (2, 40000));
        log.record(&sent, Outcome::ResetSent { reason: 2 }, &reasons(), None, None);
        let received = ev(EventKind::ResetReceived, 0xb, b"nginx", 99, (2, 40000), (1, 8080));
        log.record(&received, Outcome::ResetReceived, &reasons(), None, None);
        let closed = ev(EventKind::ConnectionClosed, 0xb, b"nginx", 99, (2, 40000), (1, 8080));
        log.record(&closed, Outcome::Closed { premature: Some(PrematureClose::PeerReset) }, &reasons(), None, None);
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
        log.record(&received, Outcome::ResetReceived, &reasons(), None, None);
        let closed = ev(EventKind::ConnectionClosed, 0xb, b"nginx", 99, (2, 40000), (1, 8080));
        log.record(&closed, Outcome::Closed { premature: Some(PrematureClose::PeerReset) }, &reasons(), None, None);
        let sent = ev(EventKind::ResetSent, 0xa, b"userbackend", 4711, (1, 8080), (2, 40000));
        log.record(&sent, Outcome::ResetSent { reason: 2 }, &reasons(), None, None);
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
        log.record(&received, Outcome::ResetReceived, &reasons(), None, None);
        log.record(&sent, Outcome::ResetSent { reason: 2 }, &reasons(), None, None);
        log.record(&closed, Outcome::Closed { premature: Some(PrematureClose::PeerReset) }, &reasons(), None, None);
        assert_eq!(log.paired(), 2);
        assert!(log.page(0, 10).events.iter().filter(|r| r.event != "reset_sent").all(|r| r.cause.is_some()));
    }

    /// A close without resets, through `states`.
    fn fin_close(sk: u64, comm: &[u8], pid: u32, local: (u8, u16), remote: (u8, u16), states: &[u8]) -> Event {
        let mut e = ev(EventKind::ConnectionClosed, sk, comm, pid, local, remote);
        e.raw.flags = 0;
        for s in states {
            e.raw.facts.states_seen |= 1 << s;
        }
        e
    }

    #[test]
    fn a_fin_closed_premature_close_names_the_closer_whichever_comes_first() {
        use tcp_state::{CLOSE_WAIT, ESTABLISHED, FIN_WAIT1, FIN_WAIT2, LAST_ACK};
        let server = fin_close(0xa, b"gobackend", 5120, (1, 8080), (2, 40000), &[ESTABLISHED, FIN_WAIT1, FIN_WAIT2]);
        let client = fin_close(0xb, b"nginx", 99, (2, 40000), (1, 8080), &[ESTABLISHED, CLOSE_WAIT, LAST_ACK]);
        let eof = Outcome::Closed { premature: Some(PrematureClose::EofBeforeResponse) };
        for server_first in [true, false] {
            let mut log = EventLog::default();
            if server_first {
                log.record(&server, Outcome::Closed { premature: None }, &reasons(), None, None);
            }
            log.record(&client, eof, &reasons(), None, None);
            if !server_first {
                assert_eq!(log.complete_through(1_000), 0, "its closer may still come");
                log.record(&server, Outcome::Closed { premature: None }, &reasons(), None, None);
            }
            let page = log.page(0, 10);
            assert_eq!(page.events.len(), 1, "a graceful close is not logged");
            let cause = page.events[0].cause.as_ref().expect("paired");
            assert_eq!(cause.summary, "closed by gobackend[5120], before any response");
            assert_eq!(cause.reason, "fin");
            assert_eq!(log.paired(), 1);
            assert_eq!(log.complete_through(1_000), 1);
        }
        // The keep-alive race: the client's request went into the closed connection and the
        // closer's kernel answered with an RST, which names no process: the closer is the story.
        let mut log = EventLog::default();
        log.record(&server, Outcome::Closed { premature: None }, &reasons(), None, None);
        let mut raced = client;
        raced.raw.flags = flags::RESET_RECEIVED;
        log.record(&raced, Outcome::Closed { premature: Some(PrematureClose::PeerReset) }, &reasons(), None, None);
        let page = log.page(0, 10);
        assert_eq!(page.events[0].cause.as_ref().map(|c| c.comm.as_str()), Some("gobackend"));
        // The closer of another connection, or one that reset without closing first, is not named.
        let mut log = EventLog::default();
        let other = fin_close(0xc, b"other", 1, (1, 8080), (2, 40001), &[ESTABLISHED, FIN_WAIT1, FIN_WAIT2]);
        log.record(&other, Outcome::Closed { premature: None }, &reasons(), None, None);
        let mut reset = fin_close(0xa, b"gobackend", 5120, (1, 8080), (2, 40000), &[ESTABLISHED]);
        reset.raw.flags = flags::RESET_SENT;
        log.record(&reset, Outcome::Closed { premature: Some(PrematureClose::LocalReset) }, &reasons(), None, None);
        let truncated = Outcome::Closed { premature: Some(PrematureClose::TruncatedResponse) };
        log.record(&client, truncated, &reasons(), None, None);
        assert!(log.page(0, 10).events.iter().all(|r| r.cause.is_none()));
    }

    #[test]
    fn unrelated_or_stale_sends_are_not_paired() {
        let mut log = EventLog::default();
        let sent = ev(EventKind::ResetSent, 0xa, b"srv", 1, (1, 8080), (2, 40001));
        log.record(&sent, Outcome::ResetSent { reason: 2 }, &reasons(), None, None);
        let other = ev(EventKind::ResetReceived, 0xb, b"cli", 2, (2, 40000), (1, 8080));
        log.record(&other, Outcome::ResetReceived, &reasons(), None, None);
        let mut late = ev(EventKind::ResetReceived, 0xc, b"cli", 2, (2, 40001), (1, 8080));
        late.raw.timestamp_ns += PAIRING_WINDOW_NS;
        log.record(&late, Outcome::ResetReceived, &reasons(), None, None);
        assert!(log.page(0, 10).events.iter().all(|r| r.cause.is_none()));
    }

    #[test]
    fn the_log_and_the_pairing_tables_are_bounded() {
        let mut log = EventLog::default();
        for i in 0..(LOG_CAPACITY as u64 + RECENT_SENDS as u64 + 10) {
            let mut sent = ev(EventKind::ResetSent, i, b"srv", 1, (1, (i % 60000) as u16), (2, (i / 60000) as u16));
            sent.raw.timestamp_ns = i;
            log.record(&sent, Outcome::ResetSent { reason: 2 }, &reasons(), None, None);
        }
        assert_eq!(log.entries.len(), LOG_CAPACITY);
        assert!(log.sends.map.len() <= RECENT_SENDS);
        assert!(log.sends.order.len() <= RECENT_SENDS);
        for i in 0..(RECENT_SENDS as u64 + 10) {
            let mut received =
                ev(EventKind::ResetReceived, i, b"cli", 2, (2, (i % 60000) as u16), (3, (i / 60000) as u16));
            received.raw.timestamp_ns = i;
            log.record(&received, Outcome::ResetReceived, &reasons(), None, None);
        }
        assert!(log.waiting.map.len() <= RECENT_SENDS);
        assert!(log.waiting.order.len() <= RECENT_SENDS);
        let page = log.page(0, 10);
        assert_eq!(page.events.len(), 10);
        assert_eq!(page.events[0].seq, log.next_seq - LOG_CAPACITY as u64 + 1);
    }
}
