//! The logic of the five hooks, shared by the three back ends: each program (`tracing`,
//! `tracepoint`, `kprobe`) reads its hook's arguments, filters (TCP only, observed namespace)
//! and calls one `on_*` function here with the socket's address and how to read its endpoints
//! (read only where they are kept).
//!
//! * [`on_state_change`] follows each TCP socket's life. `CLOSE→SYN_SENT` runs inside
//!   `connect()`, so the current task *is* the owner (role client); `LISTEN→SYN_RECV` creates an
//!   accepted child in softirq (role server, owner learned at `accept()`); `X→CLOSE` ends the
//!   connection.
//! * [`on_accept`] records the accepting process as the owner of the new socket.
//! * `ConnectionOpened` is emitted once per connection, where its owner is first known: in
//!   `connect()` (CLOSE→SYN_SENT) and in `accept()`.
//! * [`on_reset_received`] / [`on_reset_sent`] report resets. They often run in softirq on
//!   whatever task was on the CPU (on loopback: the *peer*), so the owner always comes from the
//!   per-socket map, never from the current task.
//! * [`on_destroy`] handles the socket's last event; the map entry goes with it.
//!
//! `ConnectionClosed` is emitted exactly once per connection, when everything needed to classify
//! it is known: at `X→CLOSE` if a reset was received or an error is set (for an HTTP connection
//! under `--http`, at the end of the send or receive running then: `payload::on_payload`);
//! otherwise after the reset the kernel sends *after* `X→CLOSE` (close with unread data,
//! SO_LINGER 0), or at destroy when no reset follows (graceful close).

use aya_ebpf::helpers::bpf_ktime_get_ns;
use observer_common::{
    AF_INET, AF_INET6, Endpoints, EventKind, ProbeId, Role, SOCKET_STORE_LOCAL, SocketInfo, flags, payload_protocol,
    tcp_state,
};

use crate::{
    emit::{emit, emit_at, emit_close, emit_detached},
    maps::{CONFIG, get},
    read::{KernelMemory, ProbeRead, current_owner, is_tcp, kread, observed_sock, read_close, read_sock_endpoints},
    socket::{HashStore, SocketStore, create_entry, enter_state, known_socket, socket_entry, start_entry},
};

/// `sk` (a TCP socket in an observed namespace) goes from state `old` to `new`. `endpoints`
/// reads the socket's addresses: only called where they are kept (at the start, when the
/// connection is established, for a socket new to us), never on the other transitions. `m`
/// reads the socket's members.
///
/// This runs about ten times per connection, so each arm does only what its transition needs:
/// no map access for transitions nothing counts (a listener's), one lookup for the others, the
/// clock only where a time is kept (start, CLOSE-WAIT's age, the duration at CLOSE).
#[inline(always)]
pub fn on_state_change(
    s: impl SocketStore,
    m: impl KernelMemory,
    probe: ProbeId,
    sk: u64,
    old: u8,
    new: u8,
    endpoints: impl Fn(&mut Endpoints),
) {
    match (old, new) {
        // A listener's own life: no connection.
        (tcp_state::LISTEN, tcp_state::CLOSE) | (_, tcp_state::LISTEN) => {}
        (tcp_state::CLOSE, tcp_state::SYN_SENT) => {
            // Inside connect(): process context, the current task owns the socket. Every
            // connect() attempt is an opened connection, refused or not: a retry storm shows as
            // their rate. A socket connected again settles its previous connection first.
            let start = now();
            let Some(info) = start_entry(s, sk, Role::Client, start, &endpoints, |previous| {
                emit_close(probe, sk, previous);
            }) else {
                return;
            };
            info.owner = current_owner();
            info.flags = flags::OWNER_FROM_SYSCALL | flags::OPEN_REPORTED;
            enter_state(info, new, start);
            emit_at(EventKind::ConnectionOpened, probe, sk, info.state, info, start);
        }
        (tcp_state::LISTEN, tcp_state::SYN_RECV) => {
            // A child cloned from a listener, in softirq: the owner is learned at accept().
            // (Only the tracepoints see this: the kernel sets SYN_RECV without tcp_set_state().)
            let start = now();
            let Some(info) = start_entry(s, sk, Role::Server, start, &endpoints, |_| {}) else { return };
            enter_state(info, new, start);
        }
        (_, tcp_state::ESTABLISHED) => {
            let info = match known_socket(s, m, sk) {
                Some(info) => info,
                // A child whose LISTEN→SYN_RECV was not seen: always so with the kprobe back end
                // (inet_csk_clone_lock() sets SYN_RECV directly), or the daemon started between.
                // Only passive opens leave SYN_RECV for ESTABLISHED on a socket new to us.
                None if old == tcp_state::SYN_RECV => {
                    let start = now();
                    let Some(info) = create_entry(s, sk, |_| {}, Role::Server, start) else { return };
                    enter_state(info, old, start);
                    info
                }
                None => {
                    let Some(info) = create_entry(s, sk, |_| {}, Role::Unknown, 0) else { return };
                    info
                }
            };
            // The source port of an active open is known from here on; tcp_disconnect() zeroes
            // the destination port later, so keep this copy. A passive open is read again too:
            // on 6.1 the clone's LISTEN→SYN_RECV fires inside inet_csk_clone_lock(), before it
            // sets the clone's ports and tcp_v4_syn_recv_sock() its addresses, so SYN_RECV saw
            // the listener's endpoints.
            endpoints(&mut info.endpoints);
            enter_state(info, new, 0);
        }
        (_, tcp_state::CLOSE) => {
            let Some(info) = socket_entry(s, m, sk, &endpoints) else { return };
            if info.endpoints.remote_port == 0 || info.endpoints.local_port == 0 {
                endpoints(&mut info.endpoints);
            }
            info.close_state = old;
            info.close_pending = 1;
            let now = now();
            enter_state(info, new, now);
            read_close(m, sk, info, now);
            // A received reset or an error is the whole story. Otherwise the kernel may still
            // send an RST for this close (unread data, SO_LINGER 0): wait for it or for destroy.
            // An HTTP connection (`--http`) waits for the end of the send or receive in which
            // this happened, or for destroy (`payload::on_payload`).
            if (info.flags & (flags::RESET_RECEIVED | flags::RESET_SENT) != 0 || info.sk_err != 0)
                && info.payload.protocol != payload_protocol::HTTP
            {
                emit_close(probe, sk, info);
            }
        }
        _ => {
            // FIN_WAIT*, CLOSE_WAIT, LAST_ACK, CLOSING, ...: follow the state of every socket,
            // including ones that predate the daemon (owner unknown). Only CLOSE-WAIT's age is
            // reported (a leak waits there), so only it reads the clock.
            if let Some(info) = socket_entry(s, m, sk, &endpoints) {
                enter_state(info, new, if new == tcp_state::CLOSE_WAIT { now() } else { 0 });
            }
        }
    }
}

/// CLOCK_MONOTONIC in ns.
#[inline(always)]
fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// The kernel resets `sk` (an observed socket) because of an RST: `tcp_reset()`.
#[inline(always)]
pub fn on_reset_received(
    s: impl SocketStore,
    m: impl KernelMemory,
    probe: ProbeId,
    sk: u64,
    endpoints: impl Fn(&mut Endpoints),
) {
    let Some(info) = socket_entry(s, m, sk, endpoints) else { return };
    info.flags |= flags::RESET_RECEIVED;
    info.reset_state = m.read(sk, get(&CONFIG.kernel.sock_state));
    emit(EventKind::ResetReceived, probe, sk, info.reset_state, info);
}

/// This host sends an RST, on behalf of `sk` (0: a segment that matched no socket), in TCP state
/// `state` (0 without a socket). `endpoints` fills in what to report when `sk` is not a socket we
/// track; `local` is the RST's sender (this host).
#[inline(always)]
pub fn on_reset_sent(
    s: impl SocketStore,
    m: impl KernelMemory,
    probe: ProbeId,
    sk: u64,
    reason: u32,
    state: u8,
    endpoints: impl FnOnce(&mut Endpoints),
) {
    // A full socket we track: the reset is its owner's. Anything else (no socket, a TIME_WAIT
    // or request minisock, a listener) is reported with its endpoints and no owner.
    if sk != 0
        && let Some(info) = known_socket(s, m, sk)
    {
        info.flags |= flags::RESET_SENT;
        info.reason = reason;
        emit(EventKind::ResetSent, probe, sk, state, info);
        emit_close(probe, sk, info);
        return;
    }
    emit_detached(|ev| {
        ev.kind = EventKind::ResetSent as u16;
        ev.probe = probe as u16;
        ev.state = state;
        ev.flags = flags::RESET_SENT;
        ev.timestamp_ns = now();
        ev.sk = sk;
        ev.reason = reason;
        endpoints(&mut ev.endpoints);
    });
}

/// `sk` is destroyed: its last event.
#[inline(always)]
pub fn on_destroy(s: impl SocketStore, probe: ProbeId, sk: u64) {
    if let Some(info) = s.find(sk) {
        emit_close(probe, sk, info);
        s.forget(sk);
    }
}

/// `accept()` handed `sk` to the current process, in its context: it is the owner, and the
/// connection counts as opened. `adopt` creates the entry when the socket is new to us, for
/// callers that know `sk` is a TCP child. Both accept programs hold `sk` as an untyped address
/// (read from the fd table, or a kretprobe's return value): probe reads.
///
/// Where the socket's entry is in socket-local storage (`CONFIG.store`), which these programs
/// cannot reach, the `ConnectionOpened` is built from the socket itself and the entry keeps no
/// owner: the daemon joins the owner to the connection's later events by `sk`.
#[inline(always)]
pub fn on_accept(probe: ProbeId, sk: u64, adopt: bool) {
    if get(&CONFIG.socket_store) == SOCKET_STORE_LOCAL {
        report_accept(probe, sk);
        return;
    }
    let info = match HashStore.find(sk) {
        Some(info) => info,
        None if adopt => {
            let now = now();
            let Some(info) = create_entry(HashStore, sk, |e| read_sock_endpoints(ProbeRead, sk, e), Role::Server, now)
            else {
                return;
            };
            enter_state(info, kread(sk, get(&CONFIG.kernel.sock_state)), now);
            info
        }
        // Only sockets already known as TCP children (LISTEN→SYN_RECV) are touched, which also
        // leaves accept() on UNIX and other sockets alone.
        None => return,
    };
    info.owner = current_owner();
    info.role = Role::Server as u8;
    info.flags |= flags::OWNER_FROM_SYSCALL;
    report_open(probe, sk, info);
}

/// The `ConnectionOpened` of a socket `accept()` returned, from the socket's own members: the
/// accept programs are handed any kind of socket, so only TCP over IPv4/IPv6 is reported.
#[inline(always)]
fn report_accept(probe: ProbeId, sk: u64) {
    if !is_tcp(ProbeRead, sk) || !observed_sock(ProbeRead, sk) {
        return;
    }
    let family: u16 = kread(sk, get(&CONFIG.kernel.sock_family));
    if family != AF_INET && family != AF_INET6 {
        return;
    }
    emit_detached(|ev| {
        ev.kind = EventKind::ConnectionOpened as u16;
        ev.probe = probe as u16;
        ev.role = Role::Server as u8;
        ev.state = kread(sk, get(&CONFIG.kernel.sock_state));
        ev.flags = flags::OWNER_FROM_SYSCALL | flags::OPEN_REPORTED;
        ev.timestamp_ns = now();
        ev.sk = sk;
        ev.owner = current_owner();
        read_sock_endpoints(ProbeRead, sk, &mut ev.endpoints);
    });
}

/// Emits the connection's `ConnectionOpened`, once: the first time its owner is known from the
/// syscall that opened it (connect, accept).
#[inline(always)]
fn report_open(probe: ProbeId, sk: u64, info: &mut SocketInfo) {
    if info.flags & flags::OPEN_REPORTED != 0 {
        return;
    }
    info.flags |= flags::OPEN_REPORTED;
    emit(EventKind::ConnectionOpened, probe, sk, info.state, info);
}
