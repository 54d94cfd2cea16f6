//! Writing the events of sockets with a map entry: each [`SocketEvent`] is built in place in the
//! ring buffer ([`EVENTS`]), since the BPF stack is too small for copies; a full ring is counted
//! per CPU, never silent. Events without an entry ([`emit_detached`]) go the same way.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use observer_common::{EventKind, ProbeId, SocketEvent, SocketInfo, counter};

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
        (*ev).reason = info.reason;
        (*ev).unread_bytes = info.unread_bytes;
        (*ev).sk_err = info.sk_err;
        (*ev)._pad = 0;
        // Copied with `copy`, not assigned: `ev` and `info` are both raw memory to the compiler,
        // so an assignment may become a call to a byte-at-a-time `memmove`, and a zeroed struct
        // one to `memset`; a copy of a known size between distinct objects is a few word loads
        // and stores.
        copy(&info.endpoints, &raw mut (*ev).endpoints);
        copy(&info.owner, &raw mut (*ev).owner);
        let closed = kind == EventKind::ConnectionClosed;
        if closed {
            copy(&info.facts, &raw mut (*ev).facts);
            copy(&info.payload, &raw mut (*ev).payload);
        } else {
            zero(&raw mut (*ev).facts);
            zero(&raw mut (*ev).payload);
        }
    }
    entry.submit(0);
}

/// `*dst = *src` for two distinct objects, as word loads and stores.
#[inline(always)]
unsafe fn copy<T: Copy>(src: &T, dst: *mut T) {
    // SAFETY: the caller's `dst` is valid for a `T` and does not overlap `src`.
    unsafe { core::ptr::copy_nonoverlapping(src, dst, 1) }
}

/// Zeroes `*dst` (a struct of whole, aligned u64 words) with word stores. Volatile, because
/// the compiler turns plain zeroing, even a copy of a zeroed static, into a `memset` call.
#[inline(always)]
unsafe fn zero<T: Copy>(dst: *mut T) {
    const { assert!(size_of::<T>() % 8 == 0 && align_of::<T>() == 8) };
    let words = dst.cast::<u64>();
    for i in 0..size_of::<T>() / 8 {
        // SAFETY: the caller's `dst` is valid for a `T`, which is `size_of::<T>() / 8` words.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
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
/// track; an accepted socket whose entry the accept programs cannot reach): a zeroed event
/// that `fill` completes. Filled in place rather than built and copied: a copy of a mostly-zero
/// event becomes `memset` calls, a byte at a time.
#[inline(always)]
pub fn emit_detached(fill: impl FnOnce(&mut SocketEvent)) {
    let Some(mut entry) = EVENTS.reserve::<SocketEvent>(0) else {
        bump(counter::RING_FULL);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at a reserved, exclusively owned record of the right size.
    unsafe {
        zero(ev);
        fill(&mut *ev);
    }
    entry.submit(0);
}
