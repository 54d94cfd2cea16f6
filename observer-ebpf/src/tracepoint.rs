//! The tracepoint back end: one program per tracepoint, each reading its hook's arguments from
//! the record (field offsets from tracefs, in `CONFIG`) and calling the shared logic in `hooks`.
//! The program names are the `ProbeId` names the daemon loads them by.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use aya_log_ebpf::debug;
use observer_common::{ABSENT, ProbeId, REASON_NONE};

use crate::{
    hooks::{on_accept, on_destroy, on_reset_received, on_reset_sent, on_state_change},
    maps::{CONFIG, get},
    read::{
        IPPROTO_TCP, ProbeRead, field, observed_skb, observed_sock, read_send_reset_endpoints, read_tuple, sock_of_fd,
    },
    socket::HashStore,
};

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let f = &CONFIG.set_state;
    let protocol: u16 = if get(&f.protocol_size) == 1 {
        field::<u8>(&ctx, get(&f.protocol)) as u16
    } else {
        field(&ctx, get(&f.protocol))
    };
    if protocol != IPPROTO_TCP {
        return 0;
    }
    let sk: u64 = field(&ctx, get(&f.tuple.skaddr));
    if !observed_sock(ProbeRead, sk) {
        return 0;
    }
    let old = field::<i32>(&ctx, get(&f.oldstate)) as u8;
    let new = field::<i32>(&ctx, get(&f.newstate)) as u8;
    on_state_change(HashStore, ProbeRead, ProbeId::InetSockSetState, sk, old, new, |e| *e = read_tuple(&ctx, &f.tuple));
    0
}

#[tracepoint]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    let f = &CONFIG.receive_reset;
    let sk: u64 = field(&ctx, get(&f.skaddr));
    if !observed_sock(ProbeRead, sk) {
        return 0;
    }
    on_reset_received(HashStore, ProbeRead, ProbeId::TcpReceiveReset, sk, |e| *e = read_tuple(&ctx, f));
    0
}

#[tracepoint]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    let f = &CONFIG.send_reset;
    let sk: u64 = field(&ctx, get(&f.tuple.skaddr));
    let observed = if sk != 0 { observed_sock(ProbeRead, sk) } else { observed_skb(field(&ctx, get(&f.skbaddr))) };
    if !observed {
        return 0;
    }
    let reason = if get(&f.reason) != ABSENT { field::<u32>(&ctx, get(&f.reason)) } else { REASON_NONE };
    let state = field::<i32>(&ctx, get(&f.state)) as u8;
    on_reset_sent(HashStore, ProbeRead, ProbeId::TcpSendReset, sk, reason, state, |e| {
        read_send_reset_endpoints(&ctx, e)
    });
    0
}

#[tracepoint]
pub fn tcp_destroy_sock(ctx: TracePointContext) -> u32 {
    on_destroy(HashStore, ProbeId::TcpDestroySock, field(&ctx, get(&CONFIG.destroy_sock.skaddr)));
    0
}

/// accept()/accept4() returned `fd` in process context: its owner is the current process.
#[inline(always)]
fn record_accept(ctx: &TracePointContext, probe: ProbeId, ret_offset: u32) -> u32 {
    let ret: i64 = field(ctx, ret_offset);
    if ret < 0 {
        return 0;
    }
    let sk = sock_of_fd(ret as u64);
    if sk == 0 {
        debug!(ctx, "accept returned fd {} but its socket could not be read", ret);
        return 0;
    }
    // The fd may be any kind of socket: only known TCP children are touched.
    on_accept(probe, sk, false);
    0
}

#[tracepoint]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    record_accept(&ctx, ProbeId::SysExitAccept4, get(&CONFIG.accept4_ret))
}

#[tracepoint]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    record_accept(&ctx, ProbeId::SysExitAccept, get(&CONFIG.accept_ret))
}
