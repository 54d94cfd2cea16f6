//! GET against the daemon, through `ureq` (status line, headers and a de-chunked body). Each
//! request opens a connection of its own, closed after the answer: a scrape as a Prometheus
//! server makes it, and what the benchmarks time.
//!
//! Tests that must send what no client library would (half requests, huge headers, bytes an
//! URL may not hold) speak raw TCP themselves.
use std::{net::SocketAddr, time::Duration};

use anyhow::{Result, anyhow};

/// One answer.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names in lower case, in the order they came.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    /// The first header named `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// `GET http://ADDR/PATH`, waiting up to `timeout` for the whole answer. Any status is an
/// answer; only a failure to connect or to read one is an error.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Response> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        // Loopback only: never a proxy from the environment.
        .proxy(None)
        .max_idle_connections(0)
        .build()
        .into();
    let url = format!("http://{addr}{path}");
    let mut answer = agent.get(&url).call().map_err(|e| anyhow!("GET {url}: {e}"))?;
    let status = answer.status().as_u16();
    let headers = answer
        .headers()
        .iter()
        .map(|(name, value)| (name.as_str().to_string(), String::from_utf8_lossy(value.as_bytes()).into_owned()))
        .collect();
    let body = answer
        .body_mut()
        .with_config()
        .limit(u64::MAX)
        .read_to_string()
        .map_err(|e| anyhow!("GET {url}: reading the body: {e}"))?;
    Ok(Response { status, headers, body })
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::TcpListener,
        time::Duration,
    };

    /// A one-shot server on loopback answering `answer` to the first request.
    fn serve_once(answer: &'static [u8]) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.ends_with(b"\r\n\r\n") {
                let n = conn.read(&mut buf).unwrap();
                if n == 0 {
                    return;
                }
                request.extend_from_slice(&buf[..n]);
            }
            conn.write_all(answer).unwrap();
        });
        addr
    }

    #[test]
    fn chunked_bodies_are_joined() {
        let addr = serve_once(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n");
        let r = super::get(addr, "/metrics", Duration::from_secs(10)).unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "abcde"));
        assert_eq!(r.header("content-type"), Some("text/plain"));
    }

    #[test]
    fn error_statuses_are_answers() {
        let addr = serve_once(b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\nConnection: close\r\n\r\nnope");
        let r = super::get(addr, "/nope", Duration::from_secs(10)).unwrap();
        assert_eq!((r.status, r.body.as_str()), (404, "nope"));
    }

    #[test]
    fn nothing_listening_is_an_error() {
        let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        assert!(super::get(addr, "/healthz", Duration::from_secs(10)).is_err());
    }
}
