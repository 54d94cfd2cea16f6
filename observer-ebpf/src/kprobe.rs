//! The kprobe back end: kprobes (and one kretprobe) on the kernel functions behind each hook,
//! for kernels without the tracepoints. Arguments come from registers (the position of a
//! `reason` argument from the function's prototype in BTF), endpoints from `struct sock_common`
//! or the segment's headers (`read`, member offsets from BTF); then the shared logic in `hooks`.
//! The program names are the `ProbeId` names the daemon loads them by.

use aya_ebpf::{
    macros::{kprobe, kretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use observer_common::{ProbeId, REASON_NONE, tcp_state};

use crate::{
    hooks::{on_accept, on_destroy, on_reset_received, on_reset_sent, on_state_change},
    maps::{CONFIG, get},
    read::{ProbeRead, kread, observed_skb, observed_sock, read_skb_endpoints, read_sock_endpoints},
    socket::HashStore,
};

/// A pointer argument of a kprobed function (0 if absent).
#[inline(always)]
fn ptr_arg(ctx: &ProbeContext, n: usize) -> u64 {
    ctx.arg::<u64>(n).unwrap_or(0)
}

/// The `enum sk_rst_reason` argument at position `index` (from the function's prototype in BTF:
/// the position differs between kernels, e.g. `tcp_send_active_reset(sk, reason)` on 6.12 and
/// `(sk, priority, reason)` on 6.18), [`REASON_NONE`] if the function has none (before 6.10).
#[inline(always)]
fn reason_arg(ctx: &ProbeContext, index: u32) -> u32 {
    // The verifier only allows `pt_regs` reads at constant offsets: read each candidate
    // register on its own (black_box keeps LLVM from turning the choice into one read at a
    // computed offset), then choose the value.
    let second = core::hint::black_box(ctx.arg::<u64>(1).unwrap_or(0));
    let third = core::hint::black_box(ctx.arg::<u64>(2).unwrap_or(0));
    match index {
        1 => second as u32,
        2 => third as u32,
        _ => REASON_NONE,
    }
}

/// Byte 13 of a TCP header holds the flags; RST is bit 2 (wire format, RFC 9293).
const TCPHDR_FLAGS: u32 = 13;
const TCP_FLAG_RST: u8 = 0x04;

#[kprobe]
pub fn tcp_set_state(ctx: ProbeContext) -> u32 {
    let sk = ptr_arg(&ctx, 0);
    if sk == 0 || !observed_sock(ProbeRead, sk) {
        return 0;
    }
    // Called before the state is stored: the socket still holds the old one.
    let old: u8 = kread(sk, get(&CONFIG.kernel.sock_state));
    let new = ctx.arg::<i32>(1).unwrap_or(0) as u8;
    on_state_change(HashStore, ProbeRead, ProbeId::TcpSetState, sk, old, new, |e| {
        read_sock_endpoints(ProbeRead, sk, e)
    });
    0
}

#[kprobe]
pub fn tcp_reset(ctx: ProbeContext) -> u32 {
    let sk = ptr_arg(&ctx, 0);
    if sk == 0 || !observed_sock(ProbeRead, sk) {
        return 0;
    }
    on_reset_received(HashStore, ProbeRead, ProbeId::TcpReset, sk, |e| read_sock_endpoints(ProbeRead, sk, e));
    0
}

/// A reset this host initiates on a full socket (close with unread data, SO_LINGER 0, abort,
/// keepalive timeout, ...).
#[kprobe]
pub fn tcp_send_active_reset(ctx: ProbeContext) -> u32 {
    let sk = ptr_arg(&ctx, 0);
    if sk == 0 || !observed_sock(ProbeRead, sk) {
        return 0;
    }
    let reason = reason_arg(&ctx, get(&CONFIG.kprobe.active_reset_reason));
    let state: u8 = kread(sk, get(&CONFIG.kernel.sock_state));
    on_reset_sent(HashStore, ProbeRead, ProbeId::TcpSendActiveReset, sk, reason, state, |e| {
        read_sock_endpoints(ProbeRead, sk, e)
    });
    0
}

/// A reset answering segment `skb`, for socket `sk`: a full socket, a TIME_WAIT or request
/// minisock, a listener, or none (NULL: nothing matched the segment).
#[inline(always)]
fn passive_reset(ctx: &ProbeContext, probe: ProbeId, reason_index: u32) -> u32 {
    let sk = ptr_arg(ctx, 0);
    let skb = ptr_arg(ctx, 1);
    if skb == 0 {
        return 0;
    }
    // The kernel never answers an RST with an RST: it returns before sending (and before the
    // tracepoint), so do the same.
    let k = &CONFIG.kernel;
    let head: u64 = kread(skb, get(&k.skb_head));
    let th = head + kread::<u16>(skb, get(&k.skb_transport_header)) as u64;
    if head != 0 && kread::<u8>(th, TCPHDR_FLAGS) & TCP_FLAG_RST != 0 {
        return 0;
    }
    let observed = if sk != 0 { observed_sock(ProbeRead, sk) } else { observed_skb(skb) };
    if !observed {
        return 0;
    }
    let reason = reason_arg(ctx, reason_index);
    let state: u8 = if sk != 0 { kread(sk, get(&k.sock_state)) } else { 0 };
    // A connection's own endpoints when it has them; a listener's or a minisock's are partial or
    // the same as the segment's, so take the segment's.
    let full =
        sk != 0 && state != tcp_state::LISTEN && state != tcp_state::TIME_WAIT && state != tcp_state::NEW_SYN_RECV;
    on_reset_sent(HashStore, ProbeRead, probe, sk, reason, state, |e| {
        if full { read_sock_endpoints(ProbeRead, sk, e) } else { read_skb_endpoints(skb, e) }
    });
    0
}

#[kprobe]
pub fn tcp_v4_send_reset(ctx: ProbeContext) -> u32 {
    passive_reset(&ctx, ProbeId::TcpV4SendReset, get(&CONFIG.kprobe.v4_reset_reason))
}

#[kprobe]
pub fn tcp_v6_send_reset(ctx: ProbeContext) -> u32 {
    passive_reset(&ctx, ProbeId::TcpV6SendReset, get(&CONFIG.kprobe.v6_reset_reason))
}

/// IPv6 TCP sockets are destroyed through `tcp_v4_destroy_sock()` too (directly since 6.3,
/// through `tcp_v6_destroy_sock()` before), the function that fires `tcp:tcp_destroy_sock`.
#[kprobe]
pub fn tcp_v4_destroy_sock(ctx: ProbeContext) -> u32 {
    on_destroy(HashStore, ProbeId::TcpV4DestroySock, ptr_arg(&ctx, 0));
    0
}

/// `inet_csk_accept()` returns the accepted child in the accepting process's context (NULL on
/// error). It can return before the child's SYN_RECV→ESTABLISHED has been seen on another CPU,
/// so a child new to us is adopted here.
#[kretprobe]
pub fn inet_csk_accept(ctx: RetProbeContext) -> u32 {
    let sk: u64 = ctx.ret();
    if sk == 0 || !observed_sock(ProbeRead, sk) {
        return 0;
    }
    on_accept(ProbeId::InetCskAccept, sk, true);
    0
}
