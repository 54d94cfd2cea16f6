//! Network namespaces and sockets for made-up traffic: a fresh namespace with `lo` up, veth
//! links, interface flags, and the socket knobs the scenarios turn (SO_LINGER 0,
//! TCP_USER_TIMEOUT, TCP_SYNCNT, a source address bound before connect), on `socket2` and
//! `rustix`.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsFd, AsRawFd as _, BorrowedFd},
    process::Command,
    time::{Duration, Instant},
};

use rustix::event::{PollFd, PollFlags, Timespec};
use socket2::{Domain, Protocol, SockRef, Socket, Type};

/// Moves this thread, and the processes and threads it starts from now on, into a new network
/// namespace (`unshare(CLONE_NEWNET)`), then brings its `lo` up. Call it before starting
/// threads: other threads stay where they were.
pub fn enter_new_netns() -> io::Result<()> {
    // SAFETY: rustix marks unshare unsafe for CLONE_FILES (fds of other threads); a network
    // namespace changes no fd table.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }
        .map_err(|e| io::Error::other(format!("unshare(CLONE_NEWNET) failed: {e} (this needs root)")))?;
    set_interface_up("lo")
}

/// `/proc/PID/ns/net` of this process, for `observer run --netns`.
pub fn own_netns_path() -> String {
    format!("/proc/{}/ns/net", std::process::id())
}

/// An interface's flags (`SIOCGIFFLAGS`): `libc::IFF_UP`, `libc::IFF_RUNNING`, ...
pub fn interface_flags(ifname: &str) -> io::Result<libc::c_short> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
    let mut req = ifreq(ifname)?;
    // SAFETY: SIOCGIFFLAGS on an open socket with a valid ifreq, which it fills (no crate
    // wraps this ioctl).
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    Ok(unsafe { req.ifr_ifru.ifru_flags })
}

/// `ip link set IFNAME up`, by ioctl (`SIOCSIFFLAGS`).
pub fn set_interface_up(ifname: &str) -> io::Result<()> {
    let flags = interface_flags(ifname)?;
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
    let mut req = ifreq(ifname)?;
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS on an open socket with a valid ifreq.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn ifreq(ifname: &str) -> io::Result<libc::ifreq> {
    // SAFETY: an all-zero ifreq is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if ifname.len() >= req.ifr_name.len() || ifname.contains('\0') {
        return Err(io::Error::other(format!("bad interface name {ifname:?}")));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(ifname.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

/// Waits up to `within` until `ifname` has lost its carrier (its peer went down).
pub fn wait_carrier_lost(ifname: &str, within: Duration) -> io::Result<()> {
    let deadline = Instant::now() + within;
    while interface_flags(ifname)? & libc::IFF_RUNNING as libc::c_short != 0 {
        if Instant::now() > deadline {
            return Err(io::Error::other(format!("{ifname} never lost its carrier")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Runs `ip ARGS...` (iproute2), failing with its output.
pub fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| io::Error::other(format!("running ip (iproute2, installed by `cargo xtask setup`): {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr))))
    }
}

/// A veth pair: `local` in this namespace, `peer` moved into the network namespace of process
/// `peer_pid`.
pub fn add_veth(local: &str, peer: &str, peer_pid: u32) -> io::Result<()> {
    ip(&["link", "add", local, "type", "veth", "peer", "name", peer, "netns", &peer_pid.to_string()])
}

/// A TCP socket bound to `ip` (port chosen by the kernel), not yet connected: the connection's
/// source address is the caller's choice. With `defer_port` the port is picked only at connect
/// (`IP_BIND_ADDRESS_NO_PORT`), so binding reserves no port and ports are shared across
/// destinations as without a bind.
pub fn tcp_socket_bound_to(ip: IpAddr, defer_port: bool) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(SocketAddr::new(ip, 0)), Type::STREAM, Some(Protocol::TCP))?;
    if defer_port {
        set_int(socket.as_fd(), libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)?;
    }
    socket.bind(&SocketAddr::new(ip, 0).into())?;
    Ok(socket)
}

/// Connects `socket` (blocking) and hands it over as a stream.
pub fn connect(socket: Socket, to: SocketAddr) -> io::Result<TcpStream> {
    socket.connect(&to.into())?;
    Ok(socket.into())
}

/// Connects to `to`, from `from` when given (its address only: see [`tcp_socket_bound_to`]).
pub fn connect_from(from: Option<Ipv4Addr>, to: SocketAddr) -> io::Result<TcpStream> {
    let socket = match from {
        Some(ip) => tcp_socket_bound_to(ip.into(), true)?,
        None => Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))?,
    };
    connect(socket, to)
}

/// A listener on `addr` with a backlog of `backlog`; with `reuseport` several listeners can
/// share the port (the kernel spreads connections over them).
pub fn listen(addr: SocketAddr, reuseport: bool, backlog: i32) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuseport {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

/// SO_LINGER {1, 0}: the next close() aborts the connection with an RST.
pub fn set_linger0(conn: &TcpStream) -> io::Result<()> {
    SockRef::from(conn).set_linger(Some(Duration::ZERO))
}

/// TCP_USER_TIMEOUT: how long sent data may stay unacknowledged before the kernel gives up.
pub fn set_user_timeout(socket: &Socket, timeout: Duration) -> io::Result<()> {
    socket.set_tcp_user_timeout(Some(timeout))
}

/// TCP_SYNCNT: how many SYN retransmits connect() makes before it times out.
pub fn set_syn_count(socket: &Socket, count: i32) -> io::Result<()> {
    set_int(socket.as_fd(), libc::IPPROTO_TCP, libc::TCP_SYNCNT, count)
}

/// Wakes threads blocked on (or polling) `listener`: after shutdown, accept fails at once.
pub fn shutdown(listener: &TcpListener) {
    // An error only means it was already shut.
    let _ = SockRef::from(listener).shutdown(std::net::Shutdown::Both);
}

/// Waits until `fd` is readable or `timeout` passes; true if readable.
pub fn wait_readable(fd: impl AsFd, timeout: Duration) -> io::Result<bool> {
    Ok(!poll_readable(&[fd.as_fd()], timeout)?.is_empty())
}

/// Waits until one of `fds` is readable (or `timeout`): the indices of the readable ones. An
/// interrupted wait returns none.
pub fn poll_readable(fds: &[BorrowedFd<'_>], timeout: Duration) -> io::Result<Vec<usize>> {
    let mut pfds: Vec<PollFd<'_>> = fds.iter().map(|fd| PollFd::new(fd, PollFlags::IN)).collect();
    let timeout = Timespec::try_from(timeout).map_err(|_| io::Error::other("poll timeout out of range"))?;
    match rustix::event::poll(&mut pfds, Some(&timeout)) {
        Ok(_) => {}
        Err(rustix::io::Errno::INTR) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    }
    Ok(pfds.iter().enumerate().filter(|(_, p)| !p.revents().is_empty()).map(|(i, _)| i).collect())
}

/// A TCP port on 127.0.0.1 that was free a moment ago (for a daemon's `--listen`).
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port())
}

/// setsockopt of an int option that neither socket2 nor rustix wraps.
fn set_int(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: setsockopt with a valid int of the right length on an open socket.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Sets up `obs-va`, a veth in this network namespace whose peer (`obs-vb`) stays down, with a
/// static neighbour for the far address, so that SYNs sent there are transmitted and lost (not
/// failed at neighbour resolution): connects time out. Returns (local, remote) addresses.
pub fn dead_end_link() -> io::Result<(Ipv4Addr, Ipv4Addr)> {
    let (local, remote) = (Ipv4Addr::new(10, 77, 250, 1), Ipv4Addr::new(10, 77, 250, 2));
    ip(&["link", "add", "obs-va", "type", "veth", "peer", "name", "obs-vb"])?;
    ip(&["addr", "add", &format!("{local}/24"), "dev", "obs-va"])?;
    ip(&["link", "set", "obs-va", "up"])?;
    let remote_text = remote.to_string();
    ip(&["neigh", "replace", &remote_text, "lladdr", "02:00:00:00:00:02", "dev", "obs-va", "nud", "permanent"])?;
    Ok((local, remote))
}

/// A named network namespace of a test's own (`ip netns add`, mounted at `/run/netns/NAME`,
/// with `lo` up), deleted when dropped. Processes join it by path (a worker's `NETNS`), and a
/// daemon can be restricted to it (`--netns`).
pub struct NamedNetns {
    pub name: String,
}

impl NamedNetns {
    /// `obs-<suite>-<tag>-<pid>`: unique per test process and tag.
    pub fn new(suite: &str, tag: &str) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let name = format!("obs-{suite}-{tag}-{}", std::process::id());
        ip(&["netns", "add", &name]).with_context(|| format!("ip netns add {name}"))?;
        let ns = Self { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]).context("bringing lo up")?;
        Ok(ns)
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Makes the namespace's loopback acknowledge every segment at once (the `quickack` metric
    /// on its local routes), so that a test can count its RSTs exactly (`Tcp: OutRsts`).
    ///
    /// A server that closes first (FIN) otherwise makes one RST more now and then, under CPU
    /// load: the client delays its ACK of the FIN (a socket that has just received a FIN waits
    /// to send its own with it); when the client is slow to close, its delayed-ACK timer sends
    /// the bare ACK on one CPU while the client's own FIN goes out on another, and loopback,
    /// which queues each segment on the sending CPU, can deliver the FIN first. The server's
    /// TIME-WAIT socket acknowledges that FIN and the client's socket is gone; the stale bare ACK
    /// arriving next is answered with an ACK (out of window), and that ACK, finding no socket,
    /// with an RST no traffic meant (seen as `TcpExt: DelayedACKs` and an RST by no socket from
    /// the client's port). With every ACK sent at once there is no timer: the ACK of the FIN is
    /// sent and delivered inside the server's own close(), before the client can answer.
    /// `TcpExt: DelayedACKs` staying 0 shows it held.
    pub fn acknowledge_at_once(&self) -> anyhow::Result<()> {
        use anyhow::Context as _;
        for prefix in ["127.0.0.0/8", "127.0.0.1"] {
            ip(&[
                "-n",
                &self.name,
                "route",
                "replace",
                "local",
                prefix,
                "dev",
                "lo",
                "table",
                "local",
                "proto",
                "kernel",
                "scope",
                "host",
                "src",
                "127.0.0.1",
                "quickack",
                "1",
            ])
            .with_context(|| format!("setting quickack on the local route {prefix}"))?;
        }
        let routes =
            crate::process::stdout(Command::new("ip").args(["-n", &self.name, "route", "show", "table", "local"]))?;
        let set = routes.lines().filter(|l| l.starts_with("local 127.") && l.contains("quickack 1")).count();
        anyhow::ensure!(set == 2, "namespace {}: quickack is not on both loopback routes:\n{routes}", self.name);
        Ok(())
    }

    /// `Tcp: OutRsts` of the namespace: the RST segments its kernel sent (ground truth for the
    /// resets a test made).
    pub fn out_rsts(&self) -> anyhow::Result<u64> {
        self.tcp_counter("OutRsts")
    }

    /// A `Tcp:` counter of the namespace's `/proc/net/snmp` ([`snmp_tcp`]).
    pub fn tcp_counter(&self, counter: &str) -> anyhow::Result<u64> {
        let snmp =
            crate::process::stdout(Command::new("ip").args(["netns", "exec", &self.name, "cat", "/proc/net/snmp"]))?;
        snmp_tcp(&snmp, counter)
    }

    /// Every `Tcp:` and `TcpExt:` counter of the namespace (`/proc/net/snmp` and
    /// `/proc/net/netstat`), as `Tcp:OutRsts`, `TcpExt:TCPAbortOnData`, ...: taken before and
    /// after a test's traffic, [`counter_changes`] says which kernel paths it went through.
    pub fn tcp_counters(&self) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
        let text = crate::process::stdout(Command::new("ip").args([
            "netns",
            "exec",
            &self.name,
            "cat",
            "/proc/net/snmp",
            "/proc/net/netstat",
        ]))?;
        Ok(tcp_counters(&text))
    }
}

/// The `Tcp:` and `TcpExt:` counters of `/proc/net/snmp` and `/proc/net/netstat` texts (a line
/// of names, then a line of values, per group), keyed `Group:Name`.
pub fn tcp_counters(text: &str) -> std::collections::BTreeMap<String, u64> {
    let mut counters = std::collections::BTreeMap::new();
    for group in ["Tcp:", "TcpExt:"] {
        let mut lines = text.lines().filter(|l| l.starts_with(group));
        while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
            for (n, v) in names.split_whitespace().zip(values.split_whitespace()).skip(1) {
                if let Ok(v) = v.parse() {
                    counters.insert(format!("{group}{n}"), v);
                }
            }
        }
    }
    counters
}

/// The counters that changed from `before` to `after`, as `Name +N` (for a failure message).
pub fn counter_changes(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
) -> String {
    after
        .iter()
        .filter_map(|(name, v)| {
            let was = before.get(name).copied().unwrap_or(0);
            (*v != was).then(|| format!("{name} {:+}", *v as i128 - was as i128))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A `Tcp:` counter (`OutRsts`, `ActiveOpens`, `PassiveOpens`, ...) of a `/proc/net/snmp` text:
/// the kernel's own count, per network namespace. A process's namespace's is in
/// `/proc/PID/net/snmp`.
pub fn snmp_tcp(snmp: &str, counter: &str) -> anyhow::Result<u64> {
    use anyhow::Context as _;
    tcp_counters(snmp).get(&format!("Tcp:{counter}")).copied().with_context(|| format!("no Tcp: {counter} in {snmp}"))
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::{Ipv4Addr, SocketAddr},
        os::fd::AsFd as _,
        time::Duration,
    };

    #[test]
    fn bound_connect_readable_and_linger0_reset() {
        let listener = super::listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), false, 16).unwrap();
        let to = listener.local_addr().unwrap();
        let socket = super::tcp_socket_bound_to(Ipv4Addr::LOCALHOST.into(), false).unwrap();
        super::set_syn_count(&socket, 2).unwrap();
        super::set_user_timeout(&socket, Duration::from_secs(1)).unwrap();
        let mut client = super::connect(socket, to).unwrap();
        let (server, _) = listener.accept().unwrap();
        assert!(!super::wait_readable(server.as_fd(), Duration::from_millis(10)).unwrap());
        client.write_all(b"x").unwrap();
        assert!(super::wait_readable(server.as_fd(), Duration::from_secs(10)).unwrap());
        super::set_linger0(&server).unwrap();
        drop(server);
        let mut buf = [0u8; 1];
        assert_eq!(client.read(&mut buf).unwrap_err().kind(), std::io::ErrorKind::ConnectionReset);
    }

    #[test]
    fn tcp_counters_of_both_files_and_their_changes() {
        let snmp = "Ip: Forwarding\nIp: 1\nTcp: RtoAlgorithm OutRsts\nTcp: 1 18\n";
        let netstat = "TcpExt: SyncookiesSent TCPAbortOnData\nTcpExt: 0 3\nIpExt: InNoRoutes\nIpExt: 0\n";
        let before = super::tcp_counters(&format!("{snmp}{netstat}"));
        assert_eq!(before.get("Tcp:OutRsts"), Some(&18));
        assert_eq!(before.get("TcpExt:TCPAbortOnData"), Some(&3));
        assert_eq!(before.len(), 4);
        let mut after = before.clone();
        after.insert("Tcp:OutRsts".into(), 19);
        after.insert("TcpExt:TCPAbortOnData".into(), 4);
        assert_eq!(super::counter_changes(&before, &after), "Tcp:OutRsts +1, TcpExt:TCPAbortOnData +1");
    }

    #[test]
    fn deferred_port_bind_and_shutdown_wakes_accept() {
        let listener = super::listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), true, 16).unwrap();
        let to = listener.local_addr().unwrap();
        let conn = super::connect_from(Some(Ipv4Addr::LOCALHOST), to).unwrap();
        assert_eq!(conn.local_addr().unwrap().ip(), Ipv4Addr::LOCALHOST);
        let (a, b) = (listener.as_fd(), listener.as_fd());
        assert_eq!(super::poll_readable(&[a, b], Duration::from_secs(10)).unwrap(), vec![0, 1]);
        listener.accept().unwrap();
        super::shutdown(&listener);
        assert!(listener.accept().is_err());
    }

    #[test]
    fn loopback_flags_and_bad_names() {
        let flags = super::interface_flags("lo").unwrap();
        assert_ne!(flags & libc::IFF_LOOPBACK as libc::c_short, 0);
        assert!(super::interface_flags("a-name-far-too-long-for-ifreq").is_err());
    }
}
