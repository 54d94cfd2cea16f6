//! Sockets for the load generator: the exchange it makes, on the test kit's socket helpers.
use std::{
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
};

pub use observer_testkit::net::{poll_readable, set_linger0, shutdown, wait_readable};

/// What the generator sends and the server answers: one small HTTP-like exchange, so "using" a
/// connection moves data both ways.
pub const REQUEST: &[u8] = b"GET /bench HTTP/1.1\r\nHost: bench\r\n\r\n";
pub const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";

/// A listener on `addr` with a backlog deep enough that bursts of connects never hit a full
/// accept queue (a dropped SYN costs a one-second retransmit and would distort the rates).
/// With `reuseport`, several listeners share the port and the kernel spreads connections over
/// them, so each accepting thread blocks on its own listener (no thundering herd).
pub fn listen(addr: SocketAddrV4, reuseport: bool) -> io::Result<TcpListener> {
    observer_testkit::net::listen(addr.into(), reuseport, 4096)
}

/// Connects to `to`, from `from` when given (its address only: the port is chosen at connect
/// time with IP_BIND_ADDRESS_NO_PORT, so ports are shared across destinations as without bind).
pub fn connect(from: Option<Ipv4Addr>, to: SocketAddrV4) -> io::Result<TcpStream> {
    observer_testkit::net::connect_from(from, to.into())
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
    if &buf[..got] == RESPONSE { Ok(()) } else { Err(io::Error::other(format!("unexpected response of {got} bytes"))) }
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
