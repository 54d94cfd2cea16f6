//! `--http`: the heads of HTTP/1.x messages on tracked connections, from the application's own
//! sends and receives (`tp_btf/sock_send_length`, `tp_btf/sock_recv_length`: after every
//! `sock_sendmsg`/`sock_recvmsg`, in the caller's context, with the byte count).
//!
//! Those hooks hand over the socket and the count, not the data: the data is in the caller's
//! buffer, which the syscall's arguments name. So the program takes the current task's user
//! registers (`bpf_task_pt_regs`), the syscall number and its buffer argument (a buffer, an iovec
//! array or a msghdr, by syscall), and copies from there with `bpf_probe_read_user`.
//!
//! Per connection, the first captured bytes decide: a request method or `HTTP/1.` makes it HTTP,
//! anything else makes it `OTHER`, and from then on it costs one map lookup and a flag check per
//! call. On an HTTP connection every call adds its count to its direction's total (the stream
//! offset of the next chunk), stamps the time and rolls the direction's last 8 bytes; a call
//! whose data begins like a message head emits a [`MessageHead`] with up to `HEAD_CAPTURE`
//! bytes, and so do the calls after it within the head's first `HEAD_CAPTURE` bytes
//! (continuations: an application may read a head a few bytes at a time). The daemon does the
//! parsing, and at close it has the totals and the tails with the connection's
//! `ConnectionClosed` (`SocketInfo::payload`).

use aya_ebpf::helpers::generated::{bpf_get_current_task_btf, bpf_ktime_get_ns, bpf_probe_read_user, bpf_task_pt_regs};
use observer_common::{
    ABSENT, EventKind, HEAD_CAPTURE, MessageHead, PayloadFacts, ProbeId, SOCKET_STORE_LOCAL, SocketInfo, counter,
    direction, payload_protocol, tcp_state,
};

use crate::{
    emit::emit_close,
    maps::{CONFIG, EVENTS, bump, get},
    read::{KernelMemory, TypedLoad, is_tcp},
    socket::{HashStore, LocalStore, SocketStore},
};

/// `MSG_PEEK`: a peek moves no byte out of the stream.
const MSG_PEEK: i32 = 2;

/// `sk` (a BTF-typed `struct sock *`) sent (`dir` = `direction::SENT`) or received `ret` bytes,
/// with `flags` (`MSG_*`); `ret` ≤ 0 is an error or the end of the stream.
#[inline(always)]
pub fn on_payload(probe: ProbeId, dir: u8, sk: u64, ret: i32, flags: i32) {
    if flags & MSG_PEEK != 0 || !is_tcp(TypedLoad, sk) {
        return;
    }
    // Only connections the state hooks track (an observed namespace, start seen) are followed,
    // in whichever store they use (`CONFIG` is frozen: the verifier keeps one branch).
    let found = if get(&CONFIG.socket_store) == SOCKET_STORE_LOCAL { LocalStore.find(sk) } else { HashStore.find(sk) };
    let Some(info) = found else { return };
    if info.payload.protocol == payload_protocol::OTHER {
        return;
    }
    if ret > 0 {
        follow(probe, dir, sk, ret as u32 as u64, info);
    }
    // An HTTP connection that a reset or an error ended waits for the call that was running
    // when it happened (on loopback the peer's RST arrives inside our own send) before its
    // ConnectionClosed goes out, so that what that call moved is counted in it.
    if info.close_pending != 0 && info.state == tcp_state::CLOSE {
        emit_close(probe, sk, info);
    }
}

/// What one send or receive of `len` bytes on a followed connection adds.
#[inline(always)]
fn follow(probe: ProbeId, dir: u8, sk: u64, len: u64, info: &mut SocketInfo) {
    let p = &mut info.payload;
    if info.start_ns == 0 {
        // Followed from the middle (the socket predates the daemon): no stream offsets.
        p.protocol = payload_protocol::OTHER;
        return;
    }
    let offset = if dir == direction::SENT { p.sent } else { p.received };
    if dir == direction::SENT {
        p.sent = offset + len;
    } else {
        p.received = offset + len;
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    p.last_data_ns = now;
    let Some(data) = user_data(len) else { return };
    let (prefix, prefix_len) = read_user_word(data.start, data.first_len);
    if p.protocol == payload_protocol::UNKNOWN {
        if !begins_message(prefix, prefix_len) {
            p.protocol = payload_protocol::OTHER;
            return;
        }
        p.protocol = payload_protocol::HTTP;
    }
    roll_tail(p, dir, data.end, data.tail_len);
    let until = &mut info.head_until[if dir == direction::SENT { 0 } else { 1 }];
    if begins_message(prefix, prefix_len) {
        *until = offset + HEAD_CAPTURE as u64;
        emit_head(probe, dir, 0, sk, offset, len, now, data.start, data.first_len);
    } else if offset < *until {
        emit_head(probe, dir, 1, sk, offset, len, now, data.start, data.first_len);
    }
}

/// Where a call's bytes are in the caller's memory.
struct UserData {
    /// The first byte.
    start: u64,
    /// Bytes contiguous from `start` (all of them, or the first iovec's).
    first_len: u64,
    /// Just past the last byte, 0 if not found (more iovecs than are walked).
    end: u64,
    /// Bytes contiguous before `end`, at most 8.
    tail_len: u64,
}

/// iovecs walked to find where a vectored call's bytes end.
const MAX_IOVECS: u64 = 8;

/// The current syscall's buffer, for the syscalls whose buffer argument is known; `None` for the
/// others (sendfile, splice, io_uring, ...) and where `CONFIG` has no register layout.
#[inline(always)]
fn user_data(len: u64) -> Option<UserData> {
    let c = &CONFIG.payload;
    if get(&c.regs_syscall) == ABSENT {
        return None;
    }
    // SAFETY: helpers on the current task; the result is a BTF-typed `struct pt_regs *`.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as u64;
    let nr = TypedLoad.read::<u64>(regs, get(&c.regs_syscall)) as u32;
    let arg1: u64 = TypedLoad.read(regs, get(&c.regs_arg1));
    if nr == get(&c.nr_read) || nr == get(&c.nr_write) || nr == get(&c.nr_recvfrom) || nr == get(&c.nr_sendto) {
        return Some(UserData { start: arg1, first_len: len, end: arg1 + len, tail_len: len.min(8) });
    }
    let (iov, count) = if nr == get(&c.nr_readv) || nr == get(&c.nr_writev) {
        (arg1, TypedLoad.read::<u64>(regs, get(&c.regs_arg2)))
    } else if nr == get(&c.nr_recvmsg) || nr == get(&c.nr_sendmsg) {
        (user::<u64>(arg1, get(&c.msghdr_iov)), user::<u64>(arg1, get(&c.msghdr_iovlen)))
    } else {
        return None;
    };
    let size = get(&c.iovec_size) as u64;
    let start: u64 = user(iov, get(&c.iovec_base));
    let first_len = user::<u64>(iov, get(&c.iovec_len)).min(len);
    let (mut end, mut tail_len, mut remaining) = (0, 0, len);
    for i in 0..MAX_IOVECS {
        if i >= count {
            break;
        }
        let piece = iov + i * size;
        let piece_len: u64 = user(piece, get(&c.iovec_len));
        if remaining <= piece_len {
            end = user::<u64>(piece, get(&c.iovec_base)) + remaining;
            tail_len = remaining.min(8);
            break;
        }
        remaining -= piece_len;
    }
    Some(UserData { start, first_len, end, tail_len })
}

/// A `T` at `base + offset` in the caller's memory; default if unreadable or `ABSENT`.
#[inline(always)]
fn user<T: Default>(base: u64, offset: u32) -> T {
    if base == 0 || offset == ABSENT {
        return T::default();
    }
    let mut value = T::default();
    // SAFETY: the helper checks the user address and writes at most size_of::<T>() bytes.
    let r = unsafe {
        bpf_probe_read_user(
            &mut value as *mut T as *mut core::ffi::c_void,
            core::mem::size_of::<T>() as u32,
            (base + offset as u64) as *const core::ffi::c_void,
        )
    };
    if r == 0 { value } else { T::default() }
}

/// Up to 8 bytes at `addr` (`len` of them at most), as a little-endian word (the first byte in
/// the low bits), with how many were read.
#[inline(always)]
fn read_user_word(addr: u64, len: u64) -> (u64, u64) {
    let n = len.min(8);
    if addr == 0 || n == 0 {
        return (0, 0);
    }
    let mut word: u64 = 0;
    // SAFETY: at most 8 bytes into an 8-byte local.
    let r = unsafe {
        bpf_probe_read_user(&mut word as *mut u64 as *mut core::ffi::c_void, n as u32, addr as *const core::ffi::c_void)
    };
    if r == 0 { (word, n) } else { (0, 0) }
}

/// The tokens a message head begins with: the request methods (with their space) and the
/// status line's `HTTP/1.`.
const TOKENS: [&[u8]; 10] =
    [b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE ", b"HTTP/1."];

/// `token` as the low bytes of a little-endian word.
const fn word(token: &[u8]) -> u64 {
    let mut w = 0u64;
    let mut i = 0;
    while i < token.len() {
        w |= (token[i] as u64) << (8 * i);
        i += 1;
    }
    w
}

/// The mask of a word's first `n` bytes (n ≤ 8).
const fn mask(n: usize) -> u64 {
    if n >= 8 { u64::MAX } else { (1u64 << (8 * n)) - 1 }
}

/// Whether the `n` bytes of `prefix` begin with one of [`TOKENS`].
#[inline(always)]
fn begins_message(prefix: u64, n: u64) -> bool {
    let mut i = 0;
    while i < TOKENS.len() {
        let t = TOKENS[i];
        if n >= t.len() as u64 && prefix & mask(t.len()) == word(t) {
            return true;
        }
        i += 1;
    }
    false
}

/// Appends the `n` (≤ 8) bytes before `end` to the direction's last 8 bytes.
#[inline(always)]
fn roll_tail(p: &mut PayloadFacts, dir: u8, end: u64, n: u64) {
    if end == 0 || n == 0 {
        return;
    }
    let (new, n) = read_user_word(end - n, n);
    if n == 0 {
        return;
    }
    let tail = if dir == direction::SENT { &mut p.tail_sent } else { &mut p.tail_received };
    let old = u64::from_le_bytes(*tail);
    // The oldest bytes leave at the low end; the new ones enter at the high end.
    let rolled = if n >= 8 { new } else { (old >> (8 * n)) | (new << (8 * (8 - n))) };
    *tail = rolled.to_le_bytes();
}

/// Writes a [`MessageHead`] with up to `HEAD_CAPTURE` bytes from `start`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn emit_head(
    probe: ProbeId,
    dir: u8,
    continuation: u8,
    sk: u64,
    offset: u64,
    len: u64,
    now: u64,
    start: u64,
    first_len: u64,
) {
    let Some(mut entry) = EVENTS.reserve::<MessageHead>(0) else {
        bump(counter::RING_FULL);
        return;
    };
    let ev = entry.as_mut_ptr();
    let mut n = first_len as u32;
    if n > HEAD_CAPTURE as u32 {
        n = HEAD_CAPTURE as u32;
    }
    // SAFETY: `ev` points at a reserved, exclusively owned record of the right size; the read
    // writes at most `n` ≤ HEAD_CAPTURE bytes into `head`.
    unsafe {
        (*ev).kind = EventKind::MessageHead as u16;
        (*ev).probe = probe as u16;
        (*ev).direction = dir;
        (*ev).continuation = continuation;
        (*ev)._pad = [0; 2];
        (*ev).timestamp_ns = now;
        (*ev).sk = sk;
        (*ev).offset = offset;
        (*ev).len = len as u32;
        let head = (*ev).head.as_mut_ptr() as *mut core::ffi::c_void;
        let read = bpf_probe_read_user(head, n, start as *const core::ffi::c_void);
        (*ev).captured = if read == 0 { n } else { 0 };
    }
    entry.submit(0);
}
