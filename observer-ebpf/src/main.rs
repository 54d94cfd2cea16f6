//! observer's kernel programs.
//!
//! Five logical hooks, each served by one of three back ends the daemon picks per hook at
//! start-up (BTF tracepoints where the kernel has and loads them, tracepoints where it has them,
//! kprobes otherwise; `--probes` forces one). All back ends call the same `on_*` functions in
//! [`hooks`], so the logic lives in one place:
//!
//! | hook | BTF tracepoint back end | tracepoint back end | kprobe back end | logic |
//! |---|---|---|---|---|
//! | set_state | `tp_btf/inet_sock_set_state` | `sock:inet_sock_set_state` | `tcp_set_state(sk, state)` | [`hooks::on_state_change`] |
//! | receive_reset | `tp_btf/tcp_receive_reset` | `tcp:tcp_receive_reset` | `tcp_reset(sk, skb)` | [`hooks::on_reset_received`] |
//! | send_reset | `tp_btf/tcp_send_reset` | `tcp:tcp_send_reset` | `tcp_send_active_reset`, `tcp_v4_send_reset`, `tcp_v6_send_reset` | [`hooks::on_reset_sent`] |
//! | destroy | `tp_btf/tcp_destroy_sock` | `tcp:tcp_destroy_sock` | `tcp_v4_destroy_sock(sk)` | [`hooks::on_destroy`] |
//! | accept | (the syscall tracepoints) | `syscalls:sys_exit_accept{,4}` | kretprobe `inet_csk_accept` | [`hooks::on_accept`] |
//! | http_capture (`--http`) | `tp_btf/sock_send_length`, `tp_btf/sock_recv_length` | | | [`payload::on_payload`] |
//!
//! The modules, in the order an event passes them:
//!
//! 1. [`tracing`] / [`tracepoint`] / [`kprobe`]: the programs, one per attach point (named as
//!    `ProbeId::name`). Each reads its hook's arguments (the tracepoint's arguments, record
//!    fields, or registers), skips what is not observed
//!    (not TCP, another network namespace) and calls its hook.
//! 2. [`read`]: every read of kernel memory, at offsets from `CONFIG`: record fields, struct
//!    members, and what is built from them (endpoints, the owner, a connection's facts). A
//!    socket's own members are read through a `KernelMemory`: plain loads the verifier checks
//!    against BTF in the BTF tracepoint programs (their `struct sock *` is typed), a
//!    `bpf_probe_read_kernel` per read elsewhere.
//! 3. [`hooks`]: the logic both back ends share, one `on_*` function per hook; it decides what
//!    to remember and what to report. [`payload`]: the HTTP capture's (`--http`).
//! 4. [`socket`]: the per-socket state (`SocketInfo`, in the `SOCKETS` hash or, with
//!    `--socket-store storage`, in socket-local storage): lookup, creation, adoption of a start-up
//!    seed from `SEEDS`, the state it follows.
//! 5. [`emit`]: writes a tracked socket's `SocketEvent` into the ring buffer (`on_reset_sent`
//!    writes the one for a reset without a tracked socket itself).
//! 6. [`maps`]: the maps (`EVENTS`, `SOCKETS`, `SOCKET_STORAGE`, `SEEDS`, `COUNTERS`) and the `CONFIG`
//!    global all of the above use.
//!
//! Record offsets (tracepoints), struct offsets and argument positions (kprobes) come from the
//! `CONFIG` global, filled in by the daemon at load time from tracefs and the kernel's BTF.

#![no_std]
#![no_main]

mod emit;
mod hooks;
mod kprobe;
mod maps;
mod payload;
mod read;
mod socket;
mod tracepoint;
mod tracing;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
