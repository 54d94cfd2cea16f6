//! Socket helpers for the load generator: plain libc where std has no knob (SO_LINGER, binding
//! a source address without reserving a port, non-blocking accept).
use std::{
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, RawFd},
    time::Duration,
};

/// What the generator sends and the server answers: one small HTTP-like exchange, so "using" a
/// connection moves data both ways.
pub const REQUEST: &[u8] = b"GET /bench HTTP/1.1\r\nHost: bench\r\n\r\n";
pub const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";

/// `ip link set lo up`, by ioctl (a fresh network namespace has `lo` down).
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: a datagram socket used only for interface ioctls; `Socket` closes it.
    let fd = Socket(check(unsafe {
        libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0)
    })?);
    // SAFETY: an all-zero ifreq is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: interface ioctls on an open socket with a valid ifreq.
    check(unsafe { libc::ioctl(fd.0, libc::SIOCGIFFLAGS, &mut req) })?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: as above.
    check(unsafe { libc::ioctl(fd.0, libc::SIOCSIFFLAGS, &req) })?;
    Ok(())
}

/// A listener on `addr` with a backlog deep enough that bursts of connects never hit a full
/// accept queue (a dropped SYN costs a one-second retransmit and would distort the rates).
/// With `reuseport`, several listeners share the port and the kernel spreads connections over
/// them, so each accepting thread blocks on its own listener (no thundering herd).
pub fn listen(addr: SocketAddrV4, reuseport: bool) -> io::Result<TcpListener> {
    // SAFETY: plain socket(2); `Socket` owns the fd until it is handed to the TcpListener.
    let fd = Socket(check(unsafe {
        libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0)
    })?);
    set_int(fd.0, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    if reuseport {
        set_int(fd.0, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    }
    bind(fd.0, addr)?;
    // SAFETY: listen on our bound socket.
    check(unsafe { libc::listen(fd.0, 4096) })?;
    // SAFETY: the fd is an open listening socket whose ownership moves to the TcpListener.
    Ok(unsafe { TcpListener::from_raw_fd(fd.into_raw()) })
}

/// bind(2) of socket `fd` to `addr`.
fn bind(fd: i32, addr: SocketAddrV4) -> io::Result<()> {
    let sa = sockaddr(addr);
    // SAFETY: bind with a valid sockaddr_in of the right length on an open socket.
    check(unsafe { libc::bind(fd, (&raw const sa).cast(), size_of::<libc::sockaddr_in>() as u32) })?;
    Ok(())
}

/// Connects to `to`, from `from` when given (its address only: the port is chosen at connect
/// time with IP_BIND_ADDRESS_NO_PORT, so ports are shared across destinations as without bind).
pub fn connect(from: Option<Ipv4Addr>, to: SocketAddrV4) -> io::Result<TcpStream> {
    // SAFETY: plain socket(2); `Socket` closes it on every error path.
    let fd = Socket(check(unsafe {
        libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0)
    })?);
    if let Some(ip) = from {
        set_int(fd.0, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)?;
        bind(fd.0, SocketAddrV4::new(ip, 0))?;
    }
    let sa = sockaddr(to);
    // SAFETY: connect with a valid sockaddr_in on a blocking socket.
    check(unsafe {
        libc::connect(
            fd.0,
            (&raw const sa).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        )
    })?;
    // SAFETY: the fd is a connected socket whose ownership moves to the TcpStream.
    Ok(unsafe { TcpStream::from_raw_fd(fd.into_raw()) })
}

/// SO_LINGER {1, 0}: the next close() aborts the connection with an RST.
pub fn set_linger0(conn: &TcpStream) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt with a valid linger struct on an open socket.
    check(unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Waits until `fd` is readable or `timeout` passes; true if readable.
pub fn wait_readable(fd: RawFd, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    loop {
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc >= 0 {
            return Ok(rc == 1);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Waits until one of `fds` is readable (or `timeout`); the indices of the readable ones.
pub fn poll_readable(fds: &[RawFd], timeout: Duration) -> io::Result<Vec<usize>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: a valid array of pollfds of the given length.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(Vec::new())
        } else {
            Err(e)
        };
    }
    Ok(pfds
        .iter()
        .enumerate()
        .filter(|(_, p)| p.revents != 0)
        .map(|(i, _)| i)
        .collect())
}

/// Client half of a graceful exchange: send the request, read the whole response to EOF.
pub fn exchange(conn: &mut TcpStream) -> io::Result<()> {
    conn.write_all(REQUEST)?;
    let mut buf = [0u8; 256];
    let mut got = 0;
    loop {
        let n = conn.read(&mut buf[got..])?;
        if n == 0 {
            break;
        }
        got += n;
        if got == buf.len() {
            return Err(io::Error::other("response longer than expected"));
        }
    }
    if &buf[..got] == RESPONSE {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "unexpected response of {got} bytes"
        )))
    }
}

/// Server half of a graceful exchange: read the request, answer, close (server closes first, so
/// TIME_WAIT stays on the server side and client ports are free for reuse at once).
pub fn serve_graceful(mut conn: TcpStream) -> io::Result<()> {
    let mut buf = [0u8; REQUEST.len()];
    conn.read_exact(&mut buf)?;
    conn.write_all(RESPONSE)
}

/// Reads until EOF or error; `Ok(true)` if the connection was reset (ECONNRESET).
pub fn read_until_reset(conn: &mut TcpStream) -> io::Result<bool> {
    let mut buf = [0u8; 256];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return Ok(false),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Wakes threads blocked on (or polling) `listener`: after shutdown, accept fails at once.
pub fn shutdown(listener: &TcpListener) {
    // SAFETY: shutdown(2) on an open socket; an error only means it was already shut.
    unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) };
}

pub fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// The first free TCP port on 127.0.0.1 the kernel hands out (for the daemon's --listen).
pub fn free_port() -> io::Result<u16> {
    let probe = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
    Ok(probe.local_addr()?.port())
}

fn set_int(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: setsockopt with a valid int on an open socket.
    check(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// An fd closed on drop unless handed on with `into_raw`.
struct Socket(RawFd);

impl Socket {
    fn into_raw(self) -> RawFd {
        let fd = self.0;
        std::mem::forget(self);
        fd
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: closing an fd this wrapper owns.
        unsafe { libc::close(self.0) };
    }
}
