//! The BTF tracepoint back end (`tp_btf`, `BPF_PROG_TYPE_TRACING`): one program per tracepoint
//! of the tracepoint back end, on the same hook points, but the kernel hands it the tracepoint's
//! arguments (`struct sock *`, `struct sk_buff *`, ...) directly instead of building a record
//! first, which is most of what a classic tracepoint costs. Endpoints come from `struct
//! sock_common` or the segment's headers (member offsets from BTF, as for the kprobes), the
//! socket's members by plain typed loads (`read::TypedLoad`: no helper call per read); the
//! position of `tcp_send_reset`'s `reason` from its `btf_trace_tcp_send_reset` prototype. Then
//! the shared logic in `hooks`. The program names are the `ProbeId` names the daemon loads them
//! by. There is no BTF tracepoint for `accept()`: that hook keeps the syscall tracepoints.
//!
//! With `--http`, two more: `sock_send_length` and `sock_recv_length`, the application's sends
//! and receives, for `payload`.

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use observer_common::{ProbeId, REASON_NONE, SOCKET_STORE_LOCAL, direction, tcp_state};

use crate::{
    hooks::{on_destroy, on_reset_received, on_reset_sent, on_state_change},
    maps::{CONFIG, get},
    payload::on_payload,
    read::{KernelMemory, TypedLoad, is_tcp, observed_skb, observed_sock, read_skb_endpoints, read_sock_endpoints},
    socket::{HashStore, LocalStore},
};

/// Runs `$body` with `$store` bound to the store `CONFIG` names: the `SOCKETS` hash (the
/// default) or socket-local storage (`--socket-store storage`). `CONFIG` is frozen, so the
/// verifier keeps one branch and the other costs nothing.
macro_rules! with_store {
    ($store:ident => $body:expr) => {
        if get(&CONFIG.socket_store) == SOCKET_STORE_LOCAL {
            let $store = LocalStore;
            $body
        } else {
            let $store = HashStore;
            $body
        }
    };
}

/// Pointer argument `n` of the tracepoint (`ctx` is the array of its arguments).
#[inline(always)]
fn ptr_arg(ctx: &BtfTracePointContext, n: usize) -> u64 {
    ctx.arg::<u64>(n)
}

/// `inet_sock_set_state(sk, oldstate, newstate)`: every protocol's sockets pass here (TCP, and
/// e.g. SCTP, MPTCP), so filter on `sk_protocol` as the record's `protocol` does.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn btf_inet_sock_set_state(ctx: BtfTracePointContext) -> i32 {
    let sk = ptr_arg(&ctx, 0);
    if !is_tcp(TypedLoad, sk) || !observed_sock(TypedLoad, sk) {
        return 0;
    }
    let old = ctx.arg::<i32>(1) as u8;
    let new = ctx.arg::<i32>(2) as u8;
    with_store!(s => on_state_change(s, TypedLoad, ProbeId::BtfInetSockSetState, sk, old, new, |e| {
        read_sock_endpoints(TypedLoad, sk, e)
    }));
    0
}

#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn btf_tcp_receive_reset(ctx: BtfTracePointContext) -> i32 {
    let sk = ptr_arg(&ctx, 0);
    if sk == 0 || !observed_sock(TypedLoad, sk) {
        return 0;
    }
    with_store!(s => on_reset_received(s, TypedLoad, ProbeId::BtfTcpReceiveReset, sk, |e| {
        read_sock_endpoints(TypedLoad, sk, e)
    }));
    0
}

/// `tcp_send_reset(sk, skb[, reason])`: a reset for a full socket (active: `skb` NULL), or one
/// answering segment `skb` for a listener, a TIME_WAIT or request minisock, or no socket (`sk`
/// NULL, 6.10+). Fired after the kernel decided to send (never for an RST answering an RST).
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn btf_tcp_send_reset(ctx: BtfTracePointContext) -> i32 {
    let sk = ptr_arg(&ctx, 0);
    let skb = ptr_arg(&ctx, 1);
    let observed = if sk != 0 { observed_sock(TypedLoad, sk) } else { skb != 0 && observed_skb(skb) };
    if !observed {
        return 0;
    }
    // Only the one position the 6.10+ prototype has: reading an argument the tracepoint does
    // not have is rejected by the verifier, so the read exists only where CONFIG says it does
    // (the verifier prunes on the frozen CONFIG).
    let reason = match get(&CONFIG.btf.send_reset_reason) {
        2 => ctx.arg::<u64>(2) as u32,
        _ => REASON_NONE,
    };
    let state: u8 = if sk != 0 { TypedLoad.read(sk, get(&CONFIG.kernel.sock_state)) } else { 0 };
    // A connection's own endpoints when it has them; a listener's or a minisock's are partial or
    // the same as the segment's, so take the segment's (as the kprobe back end does).
    let full = sk != 0
        && (skb == 0
            || (state != tcp_state::LISTEN && state != tcp_state::TIME_WAIT && state != tcp_state::NEW_SYN_RECV));
    with_store!(s => on_reset_sent(s, TypedLoad, ProbeId::BtfTcpSendReset, sk, reason, state, |e| {
        if full { read_sock_endpoints(TypedLoad, sk, e) } else { read_skb_endpoints(skb, e) }
    }));
    0
}

#[btf_tracepoint(function = "tcp_destroy_sock")]
pub fn btf_tcp_destroy_sock(ctx: BtfTracePointContext) -> i32 {
    let sk = ptr_arg(&ctx, 0);
    with_store!(s => on_destroy(s, ProbeId::BtfTcpDestroySock, sk));
    0
}

/// `sock_send_length(sk, ret, flags)`: `sock_sendmsg()` returned `ret` for `sk`, in the sender's
/// context.
#[btf_tracepoint(function = "sock_send_length")]
pub fn btf_sock_send_length(ctx: BtfTracePointContext) -> i32 {
    let sk = ptr_arg(&ctx, 0);
    if sk != 0 {
        on_payload(ProbeId::BtfSockSendLength, direction::SENT, sk, ctx.arg::<i32>(1), ctx.arg::<i32>(2));
    }
    0
}

/// `sock_recv_length(sk, ret, flags)`: `sock_recvmsg()` returned `ret` for `sk`, in the
/// receiver's context.
#[btf_tracepoint(function = "sock_recv_length")]
pub fn btf_sock_recv_length(ctx: BtfTracePointContext) -> i32 {
    let sk = ptr_arg(&ctx, 0);
    if sk != 0 {
        on_payload(ProbeId::BtfSockRecvLength, direction::RECEIVED, sk, ctx.arg::<i32>(1), ctx.arg::<i32>(2));
    }
    0
}
