//! Writing the events of sockets with a map entry: each [`SocketEvent`] is built in place in the
//! ring buffer ([`EVENTS`]), since the BPF stack is too small for copies; a full ring is counted
//! per CPU, never silent. Events without an entry ([`emit_detached`]) go the same way.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use observer_common::{ConnectionFacts, Endpoints, EventKind, PayloadFacts, ProbeId, SocketEvent, SocketInfo, counter};

use crate::maps::{EVENTS, bump};

/// Writes one event for `sk`, from its entry `info`, stamped now.
#[inline(always)]
pub fn emit(kind: EventKind, probe: ProbeId, sk: u64, state: u8, info: &SocketInfo) {
    // SAFETY: helper without arguments.
    emit_at(kind, probe, sk, state, info, unsafe { bpf_ktime_get_ns() });
}

/// [`emit`], stamped `timestamp_ns` (a clock the caller has already read).
#[inline(always)]
pub fn emit_at(kind: EventKind, probe: ProbeId, sk: u64, state: u8, info: &SocketInfo, timestamp_ns: u64) {
    let Some(mut entry) = EVENTS.reserve::<SocketEvent>(0) else {
        bump(counter::RING_FULL);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at a reserved, exclusively owned record of the right size.
    unsafe {
        (*ev).kind = kind as u16;
        (*ev).probe = probe as u16;
        (*ev).role = info.role;
        (*ev).state = state;
        (*ev).reset_state = info.reset_state;
        (*ev).flags = info.flags;
        (*ev).timestamp_ns = timestamp_ns;
        (*ev).sk = sk;
        (*ev).endpoints = info.endpoints;
        (*ev).owner = info.owner;
        (*ev).reason = info.reason;
        (*ev).unread_bytes = info.unread_bytes;
        (*ev).sk_err = info.sk_err;
        (*ev)._pad = 0;
        let closed = kind == EventKind::ConnectionClosed;
        (*ev).facts = if closed { info.facts } else { ConnectionFacts::default() };
        (*ev).payload = if closed { info.payload } else { PayloadFacts::default() };
    }
    entry.submit(0);
}

/// Emits the ConnectionClosed owed for `sk`, if any, stamped when the connection reached CLOSE
/// (`state_since_ns`, read then), not when the close could be classified: no second clock read.
#[inline(always)]
pub fn emit_close(probe: ProbeId, sk: u64, info: &mut SocketInfo) {
    if info.close_pending == 0 {
        return;
    }
    info.close_pending = 0;
    if info.state_since_ns != 0 {
        emit_at(EventKind::ConnectionClosed, probe, sk, info.close_state, info, info.state_since_ns);
    } else {
        emit(EventKind::ConnectionClosed, probe, sk, info.close_state, info);
    }
}

/// Writes an event that has no entry behind it (a reset for a segment or a socket we do not
/// track; an accepted socket whose entry the accept programs cannot reach): `event` as given,
/// with the endpoints `endpoints` fills in.
#[inline(always)]
pub fn emit_detached(event: SocketEvent, endpoints: impl FnOnce(&mut Endpoints)) {
    let Some(mut entry) = EVENTS.reserve::<SocketEvent>(0) else {
        bump(counter::RING_FULL);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at a reserved, exclusively owned record of the right size.
    unsafe {
        *ev = event;
        endpoints(&mut (*ev).endpoints);
    }
    entry.submit(0);
}
