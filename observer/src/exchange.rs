//! At which point of an HTTP/1.x exchange a TCP connection was cut.
//!
//! The kernel hands over, per socket, a *head record* for each send or receive whose data begins
//! with an HTTP token (a request method and a space, or `HTTP/1.`): the stream offset of its first
//! byte in that direction, the bytes the call moved and the first [`HEAD_CAPTURE`] of them. At
//! close it adds the stream length of each direction and the last (up to 8) bytes of the last
//! chunk of each. [`Exchanges`] keeps, per socket, the messages of each direction found in the
//! records and, at [`Exchanges::close`], says where the last exchange stood as a [`Verdict`].
//!
//! # Parsing
//!
//! - Request line `METHOD SP target SP HTTP/1.x`, status line `HTTP/1.x SP DDD [SP reason]`;
//!   header names are matched case-insensitively: `Content-Length` (a list of equal values is
//!   one value; differing or malformed values make the framing unknown), `Transfer-Encoding`
//!   (chunked when its last coding is `chunked`), `Connection` (`close`, `keep-alive`). The
//!   head ends at an empty line (CRLF CRLF; bare LF is accepted too).
//! - A message says the connection closes after it when it has `Connection: close`, or is
//!   HTTP/1.0 without `Connection: keep-alive`.
//! - Request bodies: chunked, or `Content-Length`, or none. A request with a transfer coding
//!   other than chunked has unknown framing.
//! - Response bodies: none for 1xx, 204, 304 and responses to `HEAD`; otherwise chunked, or
//!   `Content-Length`, or close-delimited (another transfer coding, or no length at all: the body
//!   runs to the end of the connection, so it is complete when the connection ends). 1xx
//!   responses are interim and do not answer the request, except `101 Switching Protocols`
//!   which, like a 2xx answer to `CONNECT`, ends HTTP on the connection: later records are
//!   ignored and the exchange counts as complete.
//! - Several messages may begin inside one record (pipelining, a small body followed by the
//!   next head): all those within the captured bytes are parsed, as far as each one's framing
//!   can be followed there. A record whose offset lies inside the body of the previous message
//!   of its direction (by that message's framing), or before its end, is body data and ignored.
//! - The first message seen decides which direction carries requests: the socket that sends the
//!   requests (or receives the responses) is the client side, whatever its TCP role. Requests in
//!   the other direction, and responses in the request direction, are ignored.
//! - A head whose end is not in the captured bytes: when the call moved more than was captured,
//!   or when the direction carried more bytes after the capture (at close, or another record
//!   came later), its end is unknown and it counts as complete headers with unknown framing,
//!   which never makes a truncation claim. Only when every byte of the direction after the
//!   head's start was captured and no empty line is there were the headers unfinished.
//! - Responses answer requests in order (interim ones excepted). When more final responses are
//!   seen than requests (a request whose head no record showed), the newest response answers
//!   the newest request.
//! - The request target is kept without its query (`?…`), at most 64 bytes cut on a character
//!   boundary, `…` appended when cut (also when the capture cut it).
//!
//! # The verdict at close
//!
//! Only the last request of the connection and what answers it are looked at. "Bytes of a
//! direction" are the stream lengths given at close; "transferred" body bytes are that length
//! minus the end of the message's head.
//!
//! - No request at all: [`Stage::NoRequest`] if the connection's server port (the remote port
//!   of a client socket, the local one of a server socket; of an unknown role, the local port if
//!   it is known, else the remote one) carried requests on earlier connections closed through
//!   this tracker (the 64 most recent such ports are kept) and the connection carried no byte in
//!   the request direction; otherwise no verdict (not HTTP as far as we can tell).
//! - The last request's headers unfinished, its body shorter than its `Content-Length`, or its
//!   chunked body not ended: [`Stage::InRequest`].
//! - No final response to it: [`Stage::InResponseHeaders`] if the last response-direction
//!   message is an interim one with unfinished headers. Otherwise, if the response direction
//!   carried bytes after the known end of its last message (or any byte, when there was none),
//!   the response came but no record showed it: the exchange counts as complete (below, from
//!   the request's `Connection` alone). Otherwise [`Stage::AwaitingResponse`] if no earlier
//!   request was answered, and [`Stage::IdleKeepalive`] (without `idle_ns`) if the earlier ones
//!   all were: a request sent on a reused connection the server was closing (Go's "server
//!   closed idle connection").
//! - The response's headers unfinished: [`Stage::InResponseHeaders`]; its body shorter than its
//!   `Content-Length`: [`Stage::InResponseBody`] with declared and transferred; a chunked body not
//!   ended: [`Stage::InResponseBody`] with the transferred bytes (chunk framing included) and no
//!   declared length.
//! - Everything complete: [`Stage::Complete`] if the request or the response said the
//!   connection closes after it (or the response was close-delimited, or switched protocols);
//!   otherwise [`Stage::IdleKeepalive`] with `idle_ns` = close time − time of the last data: the
//!   connection was kept alive and closed while idle. A request the server side never read (no
//!   record on that side) is invisible to it, so there the connection looks idle too.
//! - A chunked body has ended when its last chunk and trailer section (`0\r\n\r\n` without
//!   trailers) are in the captured bytes, or when the direction's stream ends with `0\r\n\r\n`
//!   (seen in its last chunk's tail, joined with the captured bytes just before it when the last
//!   chunk was shorter than 5 bytes). A stream end that could still be the end of a terminator
//!   split over chunks counts as ended, and a body shorter than 5 bytes as not ended.
//! - The server side's view follows from the same rules with the directions swapped: a server
//!   that declared `Content-Length: 100`, sent 8 body bytes and closed gets
//!   [`Stage::InResponseBody`] 100/8, and so does the client that received those 8.
//!
//! # Bounds
//!
//! At most `max_connections` sockets (the oldest inserted is forgotten to make room, counted in
//! [`Exchanges::evicted`]); a socket enters the table with its first recorded message. At most 8
//! messages per direction per socket (older ones are dropped, their counts kept), the method as
//! an enum and one 64-byte path per socket: no allocation per record except the returned
//! [`ResponseSeen`]s. Arithmetic on offsets and lengths saturates; no input panics.

use std::collections::VecDeque;

use crate::HashMap;

/// Bytes of a chunk the kernel captures for a head record.
pub const HEAD_CAPTURE: usize = 512;
/// Messages kept per direction per socket.
const KEEP: usize = 8;
/// Bytes of the request path kept.
const PATH_MAX: usize = 64;
/// Server ports of earlier HTTP connections remembered for [`Stage::NoRequest`].
const KNOWN_PORTS: usize = 64;
/// The end of a chunked body without trailers.
const LAST_CHUNK: &[u8] = b"0\r\n\r\n";
/// Bytes of the end of each record's capture kept, to join with a short close-time tail.
const CAPTURE_TAIL: usize = 8;

/// Which way data went, seen from the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Sent,
    Received,
}

impl Direction {
    const fn index(self) -> usize {
        match self {
            Self::Sent => 0,
            Self::Received => 1,
        }
    }

    const fn other(self) -> Self {
        match self {
            Self::Sent => Self::Received,
            Self::Received => Self::Sent,
        }
    }
}

/// A head record: a send or receive whose data begins with an HTTP token.
#[derive(Debug, Clone, Copy)]
pub struct Chunk<'a> {
    pub sk: u64,
    pub direction: Direction,
    /// Stream offset (in `direction`) of the chunk's first byte.
    pub offset: u64,
    /// Bytes the call moved.
    pub len: u32,
    /// The first `min(len, HEAD_CAPTURE)` of them.
    pub bytes: &'a [u8],
    pub timestamp_ns: u64,
}

/// The end of a connection, with what the kernel knows of its streams.
#[derive(Debug, Clone, Copy)]
pub struct Close<'a> {
    pub sk: u64,
    /// `Some(true)`: it connected; `Some(false)`: it was accepted.
    pub is_client_role: Option<bool>,
    pub local_port: u16,
    pub remote_port: u16,
    /// Stream length of each direction.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// The last (up to 8) bytes of the last chunk of each direction.
    pub tail_sent: &'a [u8],
    pub tail_received: &'a [u8],
    pub last_data_ns: u64,
    pub closed_ns: u64,
}

impl Close<'_> {
    const fn total(&self, direction: Direction) -> u64 {
        match direction {
            Direction::Sent => self.bytes_sent,
            Direction::Received => self.bytes_received,
        }
    }

    const fn tail(&self, direction: Direction) -> &[u8] {
        match direction {
            Direction::Sent => self.tail_sent,
            Direction::Received => self.tail_received,
        }
    }
}

/// Where the last exchange of a connection stood when it closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// No request on a connection to a port known to serve HTTP.
    NoRequest,
    /// The last request was not sent (or received) in full.
    InRequest,
    /// The first request was complete, no response came.
    AwaitingResponse,
    /// The response's headers were cut.
    InResponseHeaders,
    /// The response's body was cut.
    InResponseBody,
    /// Closed between exchanges of a kept-alive connection (or with a request the server had not
    /// answered on a reused connection).
    IdleKeepalive,
    /// The last exchange completed, and it said the connection closes after it.
    Complete,
}

impl Stage {
    pub const ALL: [Self; 7] = [
        Self::NoRequest,
        Self::InRequest,
        Self::AwaitingResponse,
        Self::InResponseHeaders,
        Self::InResponseBody,
        Self::IdleKeepalive,
        Self::Complete,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            Self::NoRequest => "no_request",
            Self::InRequest => "in_request",
            Self::AwaitingResponse => "awaiting_response",
            Self::InResponseHeaders => "in_response_headers",
            Self::InResponseBody => "in_response_body",
            Self::IdleKeepalive => "idle_keepalive",
            Self::Complete => "complete",
        }
    }

    /// The connection ended in the middle of a response.
    pub const fn truncated_response(self) -> bool {
        matches!(self, Self::InResponseHeaders | Self::InResponseBody)
    }
}

/// What [`Exchanges::close`] says of a connection.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub stage: Stage,
    /// This socket sent the requests.
    pub client_side: bool,
    /// Requests seen on the connection.
    pub requests: u32,
    /// Of the last request.
    pub method: Option<String>,
    /// Of the last request, without its query, at most 64 bytes (cut on a character boundary,
    /// `…` appended when cut).
    pub path: Option<String>,
    /// Of the last final (non-1xx, or 101) response.
    pub status: Option<u16>,
    /// `Content-Length` of the response being transferred (`InResponseBody`), or of the request
    /// (`InRequest`).
    pub declared_body: Option<u64>,
    /// Body bytes of that message that crossed (chunked: with the chunk framing).
    pub transferred_body: Option<u64>,
    /// `IdleKeepalive` of a connection idle after complete exchanges: `closed_ns - last_data_ns`.
    pub idle_ns: Option<u64>,
}

/// A response head seen in a chunk: for a `observer_http_responses_total{status_class}` counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseSeen {
    pub status: u16,
    pub direction: Direction,
}

/// Request methods the kernel recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Options,
    Patch,
    Connect,
    Trace,
}

impl Method {
    const ALL: [Self; 9] = [
        Self::Get,
        Self::Head,
        Self::Post,
        Self::Put,
        Self::Delete,
        Self::Options,
        Self::Patch,
        Self::Connect,
        Self::Trace,
    ];

    const fn name(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Head => "HEAD",
            Self::Post => "POST",
            Self::Put => "PUT",
            Self::Delete => "DELETE",
            Self::Options => "OPTIONS",
            Self::Patch => "PATCH",
            Self::Connect => "CONNECT",
            Self::Trace => "TRACE",
        }
    }
}

/// How a message's head ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Head {
    /// Not in the capture, and every byte moved was captured: unfinished unless more bytes follow.
    #[default]
    Pending,
    /// Not in the capture, and more bytes followed: complete, framing unknown.
    Unknown,
    /// Its length, from the message's first byte.
    Known(u64),
}

/// How a message's body ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Framing {
    #[default]
    Unknown,
    /// No body.
    Empty,
    Length(u64),
    /// `end`: the stream offset after the last chunk, when it was in the capture.
    Chunked {
        end: Option<u64>,
    },
    /// The body runs to the end of the connection.
    Close,
    /// HTTP ended on the connection (101, 2xx to CONNECT).
    Tunnel,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Msg {
    /// Stream offset of the first byte.
    offset: u64,
    /// End of the captured bytes of the record it began in.
    captured_end: u64,
    /// End of the chunk of that record.
    chunk_end: u64,
    head: Head,
    framing: Framing,
    /// Requests: number of the request; final responses: number of the final response; interim: 0.
    index: u32,
    method: Option<Method>,
    /// Responses: the status, 0 when the capture cut the status line.
    status: u16,
    interim: bool,
    /// The connection closes after it.
    close: bool,
}

impl Msg {
    /// The stream offset after the message, when its framing says.
    fn end(&self) -> Option<u64> {
        let Head::Known(head) = self.head else { return None };
        let body = self.offset.saturating_add(head);
        match self.framing {
            Framing::Empty => Some(body),
            Framing::Length(n) => Some(body.saturating_add(n)),
            Framing::Chunked { end } => end,
            Framing::Unknown | Framing::Close | Framing::Tunnel => None,
        }
    }

    /// The lowest stream offset the next message of the direction may begin at.
    fn frontier(&self) -> u64 {
        match self.framing {
            Framing::Close | Framing::Tunnel => u64::MAX,
            _ => self.end().unwrap_or(self.chunk_end),
        }
    }
}

/// The last [`KEEP`] messages of a direction.
#[derive(Debug, Clone, Copy, Default)]
struct Ring {
    msgs: [Msg; KEEP],
    first: usize,
    len: usize,
}

impl Ring {
    fn push(&mut self, msg: Msg) {
        if self.len == KEEP {
            self.msgs[self.first % KEEP] = msg;
            self.first = (self.first + 1) % KEEP;
        } else {
            self.msgs[(self.first + self.len) % KEEP] = msg;
            self.len += 1;
        }
    }

    fn iter(&self) -> impl DoubleEndedIterator<Item = &Msg> {
        (0..self.len).map(move |i| &self.msgs[(self.first + i) % KEEP])
    }

    fn last(&self) -> Option<&Msg> {
        self.iter().next_back()
    }

    fn last_mut(&mut self) -> Option<&mut Msg> {
        let i = self.len.checked_sub(1)?;
        Some(&mut self.msgs[(self.first + i) % KEEP])
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Dir {
    ring: Ring,
    /// Requests (request direction) or final responses (response direction) seen.
    count: u32,
    /// The last bytes of the newest record's capture, and their end offset.
    capture: [u8; CAPTURE_TAIL],
    capture_len: usize,
    capture_end: u64,
}

impl Dir {
    fn remember_capture(&mut self, bytes: &[u8], end: u64) {
        if end < self.capture_end {
            return;
        }
        let kept = &bytes[bytes.len().saturating_sub(CAPTURE_TAIL)..];
        self.capture[..kept.len()].copy_from_slice(kept);
        self.capture_len = kept.len();
        self.capture_end = end;
    }
}

/// One socket's exchange state.
#[derive(Debug, Clone)]
struct Conn {
    /// Insertion order, for eviction.
    generation: u64,
    /// The direction requests go, decided by the first message.
    requests: Option<Direction>,
    dirs: [Dir; 2],
    /// Final responses that answered requests no record showed: response `k` answers request
    /// `k - shift`.
    shift: u32,
    /// HTTP ended on the connection (101, CONNECT).
    tunnel: bool,
    path: [u8; PATH_MAX],
    path_len: usize,
    path_cut: bool,
}

impl Conn {
    fn new() -> Self {
        Self {
            generation: 0,
            requests: None,
            dirs: [Dir::default(); 2],
            shift: 0,
            tunnel: false,
            path: [0; PATH_MAX],
            path_len: 0,
            path_cut: false,
        }
    }

    /// Takes in a head record (its bytes already limited to `len`); whether a message was kept.
    fn record(&mut self, chunk: &Chunk<'_>, bytes: &[u8], seen: &mut Vec<ResponseSeen>) -> bool {
        if self.tunnel {
            return false;
        }
        let d = chunk.direction;
        let captured_end = chunk.offset.saturating_add(bytes.len() as u64);
        let chunk_end = chunk.offset.saturating_add(u64::from(chunk.len)).max(captured_end);
        let dir = &mut self.dirs[d.index()];
        dir.remember_capture(bytes, captured_end);
        if let Some(last) = dir.ring.last_mut()
            && last.head == Head::Pending
            && chunk.offset >= last.captured_end
        {
            last.head = Head::Unknown;
        }

        let mut recorded = false;
        let mut pos = 0usize;
        while let Some(rest) = bytes.get(pos..).filter(|rest| !rest.is_empty()) {
            let at = chunk.offset.saturating_add(pos as u64);
            if self.dirs[d.index()].ring.last().is_some_and(|last| at < last.frontier()) {
                break;
            }
            let Some(parsed) = parse(rest) else { break };
            let client = match parsed.start {
                Start::Request { .. } => d,
                Start::Response { .. } => d.other(),
            };
            if *self.requests.get_or_insert(client) != client {
                break;
            }
            let mut msg = Msg {
                offset: at,
                captured_end,
                chunk_end,
                head: match parsed.head_len {
                    Some(len) => Head::Known(len as u64),
                    None if chunk_end > captured_end => Head::Unknown,
                    None => Head::Pending,
                },
                close: parsed.close || (parsed.http10 && !parsed.keep_alive),
                ..Msg::default()
            };
            match parsed.start {
                Start::Request { method, target, target_cut } => {
                    let dir = &mut self.dirs[d.index()];
                    dir.count = dir.count.saturating_add(1);
                    msg.index = dir.count;
                    msg.method = Some(method);
                    msg.framing = parsed.request_framing();
                    self.set_path(target, target_cut);
                }
                Start::Response { status } => {
                    let code = status.unwrap_or(0);
                    msg.status = code;
                    msg.interim = (100..200).contains(&code) && code != 101;
                    let mut answers = None;
                    if !msg.interim {
                        let requests = self.dirs[d.other().index()].count;
                        let dir = &mut self.dirs[d.index()];
                        dir.count = dir.count.saturating_add(1);
                        msg.index = dir.count;
                        if msg.index.saturating_sub(self.shift) > requests {
                            self.shift = msg.index - requests;
                        }
                        let answered = msg.index.saturating_sub(self.shift);
                        answers = self.dirs[d.other().index()]
                            .ring
                            .iter()
                            .find(|request| request.index == answered)
                            .and_then(|request| request.method);
                        if let Some(status) = status
                            && status != 101
                        {
                            seen.push(ResponseSeen { status, direction: d });
                        }
                    }
                    msg.framing = parsed.response_framing(code, answers);
                }
            }
            match msg.head {
                Head::Known(head) => {
                    if let Framing::Chunked { .. } = msg.framing {
                        let body = rest.get(usize::try_from(head).unwrap_or(usize::MAX)..).unwrap_or_default();
                        msg.framing = match scan_chunked(body) {
                            Chunked::Ended(n) => {
                                Framing::Chunked { end: Some(at.saturating_add(head).saturating_add(n as u64)) }
                            }
                            Chunked::Open => Framing::Chunked { end: None },
                            Chunked::Invalid => Framing::Unknown,
                        }
                    }
                }
                Head::Pending | Head::Unknown => msg.framing = Framing::Unknown,
            }
            if msg.framing == Framing::Tunnel {
                self.tunnel = true;
            }
            let next = msg.end().and_then(|end| usize::try_from(end.saturating_sub(chunk.offset)).ok());
            self.dirs[d.index()].ring.push(msg);
            recorded = true;
            match next {
                Some(next) if next > pos && !self.tunnel => pos = next,
                _ => break,
            }
        }
        recorded
    }

    fn set_path(&mut self, target: &[u8], cut: bool) {
        let (target, cut) = match find(target, b'?') {
            Some(query) => (&target[..query], false),
            None => (target, cut),
        };
        let head = &target[..target.len().min(PATH_MAX + 4)];
        let text = String::from_utf8_lossy(head);
        let mut end = text.len().min(PATH_MAX);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        self.path[..end].copy_from_slice(&text.as_bytes()[..end]);
        self.path_len = end;
        self.path_cut = cut || end < text.len() || head.len() < target.len();
    }

    fn path(&self) -> Option<String> {
        let path = std::str::from_utf8(self.path.get(..self.path_len)?).ok()?;
        Some(if self.path_cut { format!("{path}…") } else { path.to_owned() })
    }

    fn request_count(&self) -> u32 {
        self.requests.map_or(0, |d| self.dirs[d.index()].count)
    }

    /// The verdict of a connection that carried requests.
    fn verdict(&self, close: &Close<'_>) -> Option<Verdict> {
        let c = self.requests?;
        let s = c.other();
        let requests = &self.dirs[c.index()];
        let responses = &self.dirs[s.index()];
        let request = *requests.ring.last()?;
        let last_final = responses.ring.iter().rev().find(|msg| !msg.interim);
        let mut verdict = Verdict {
            stage: Stage::Complete,
            client_side: c == Direction::Sent,
            requests: requests.count,
            method: request.method.map(|method| method.name().to_owned()),
            path: self.path(),
            status: last_final.map(|msg| msg.status).filter(|&status| status != 0),
            declared_body: None,
            transferred_body: None,
            idle_ns: None,
        };

        match progress(&request, close.total(c), close.tail(c), requests) {
            Progress::HeadUnfinished => {
                verdict.stage = Stage::InRequest;
                return Some(verdict);
            }
            Progress::BodyShort { declared, transferred } => {
                verdict.stage = Stage::InRequest;
                verdict.declared_body = declared;
                verdict.transferred_body = Some(transferred);
                return Some(verdict);
            }
            Progress::Done => {}
        }

        let answered = responses.count > 0 && responses.count.saturating_sub(self.shift) >= requests.count;
        if answered {
            let Some(response) = last_final else {
                verdict.stage = ended(&request, None, close, &mut verdict.idle_ns);
                return Some(verdict);
            };
            verdict.stage = match progress(response, close.total(s), close.tail(s), responses) {
                Progress::HeadUnfinished => Stage::InResponseHeaders,
                Progress::BodyShort { declared, transferred } => {
                    verdict.declared_body = declared;
                    verdict.transferred_body = Some(transferred);
                    Stage::InResponseBody
                }
                Progress::Done => ended(&request, Some(response), close, &mut verdict.idle_ns),
            };
            return Some(verdict);
        }

        let last = responses.ring.last();
        if let Some(interim) = last.filter(|msg| msg.interim)
            && progress(interim, close.total(s), close.tail(s), responses) == Progress::HeadUnfinished
        {
            verdict.stage = Stage::InResponseHeaders;
            return Some(verdict);
        }
        let total = close.total(s);
        let unseen = match last {
            None => total > 0,
            Some(msg) => match msg.end() {
                Some(end) => total > end,
                None => msg.interim && total > msg.chunk_end,
            },
        };
        verdict.stage = if unseen {
            ended(&request, None, close, &mut verdict.idle_ns)
        } else if responses.count > 0 && responses.count.saturating_sub(self.shift).saturating_add(1) >= requests.count
        {
            Stage::IdleKeepalive
        } else {
            Stage::AwaitingResponse
        };
        Some(verdict)
    }
}

/// The stage of a complete exchange.
fn ended(request: &Msg, response: Option<&Msg>, close: &Close<'_>, idle_ns: &mut Option<u64>) -> Stage {
    let closes =
        request.close || response.is_some_and(|r| r.close || matches!(r.framing, Framing::Close | Framing::Tunnel));
    if closes {
        Stage::Complete
    } else {
        *idle_ns = Some(close.closed_ns.saturating_sub(close.last_data_ns));
        Stage::IdleKeepalive
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    Done,
    HeadUnfinished,
    BodyShort { declared: Option<u64>, transferred: u64 },
}

/// How far the last message of a direction got, given the direction's length and tail at close.
fn progress(msg: &Msg, total: u64, tail: &[u8], dir: &Dir) -> Progress {
    let head = match msg.head {
        Head::Unknown => return Progress::Done,
        Head::Pending if total > msg.captured_end => return Progress::Done,
        Head::Pending => return Progress::HeadUnfinished,
        Head::Known(head) => head,
    };
    let body = msg.offset.saturating_add(head);
    let Some(transferred) = total.checked_sub(body) else { return Progress::HeadUnfinished };
    match msg.framing {
        Framing::Length(declared) if transferred < declared => {
            Progress::BodyShort { declared: Some(declared), transferred }
        }
        Framing::Chunked { end: None } => {
            let ended = transferred >= LAST_CHUNK.len() as u64
                && total > msg.captured_end
                && stream_ends_with_last_chunk(total, tail, dir) != Some(false);
            if ended { Progress::Done } else { Progress::BodyShort { declared: None, transferred } }
        }
        _ => Progress::Done,
    }
}

/// Whether a direction's stream ends with `0\r\n\r\n`: `None` when its known end is too short to
/// tell (a suffix of it).
fn stream_ends_with_last_chunk(total: u64, tail: &[u8], dir: &Dir) -> Option<bool> {
    if tail.len() >= LAST_CHUNK.len() {
        return Some(tail.ends_with(LAST_CHUNK));
    }
    let mut joined = [0u8; CAPTURE_TAIL * 2];
    let mut len = 0;
    if dir.capture_end == total.saturating_sub(tail.len() as u64) {
        joined[..dir.capture_len].copy_from_slice(&dir.capture[..dir.capture_len]);
        len = dir.capture_len;
    }
    joined[len..len + tail.len()].copy_from_slice(tail);
    let joined = &joined[..len + tail.len()];
    if joined.len() >= LAST_CHUNK.len() {
        Some(joined.ends_with(LAST_CHUNK))
    } else if LAST_CHUNK.ends_with(joined) {
        None
    } else {
        Some(false)
    }
}

/// HTTP connections, per socket.
#[derive(Debug)]
pub struct Exchanges {
    conns: HashMap<u64, Conn>,
    /// `(sk, generation)` in insertion order; entries of closed sockets are skipped (and
    /// compacted away).
    order: VecDeque<(u64, u64)>,
    generation: u64,
    max_connections: usize,
    evicted: u64,
    /// Server ports of connections that carried requests, newest last.
    ports: VecDeque<u16>,
}

impl Exchanges {
    /// At most `max_connections` sockets (at least 1).
    pub fn new(max_connections: usize) -> Self {
        Self {
            conns: HashMap::default(),
            order: VecDeque::new(),
            generation: 0,
            max_connections: max_connections.max(1),
            evicted: 0,
            ports: VecDeque::with_capacity(KNOWN_PORTS),
        }
    }

    /// A head record. Returns the final (non-1xx) responses whose heads begin in it (usually 0 or 1).
    pub fn chunk(&mut self, chunk: &Chunk<'_>) -> Vec<ResponseSeen> {
        let mut seen = Vec::new();
        let captured = usize::try_from(chunk.len).unwrap_or(usize::MAX).min(chunk.bytes.len());
        let bytes = &chunk.bytes[..captured];
        if token(bytes).is_none() {
            return seen;
        }
        if let Some(conn) = self.conns.get_mut(&chunk.sk) {
            conn.record(chunk, bytes, &mut seen);
        } else {
            let mut conn = Conn::new();
            if conn.record(chunk, bytes, &mut seen) {
                self.insert(chunk.sk, conn);
            }
        }
        seen
    }

    fn insert(&mut self, sk: u64, mut conn: Conn) {
        while self.conns.len() >= self.max_connections {
            let Some((old, generation)) = self.order.pop_front() else { break };
            if self.conns.get(&old).is_some_and(|c| c.generation == generation) {
                self.conns.remove(&old);
                self.evicted += 1;
            }
        }
        self.generation += 1;
        conn.generation = self.generation;
        self.order.push_back((sk, self.generation));
        self.conns.insert(sk, conn);
        if self.order.len() > 2 * self.max_connections + 16 {
            let conns = &self.conns;
            self.order.retain(|(sk, generation)| conns.get(sk).is_some_and(|c| c.generation == *generation));
        }
    }

    /// The connection on `sk` ended: its verdict (None if it was not HTTP as far as we can tell),
    /// and its state is forgotten.
    pub fn close(&mut self, close: &Close<'_>) -> Option<Verdict> {
        let conn = self.conns.remove(&close.sk);
        match conn.filter(|conn| conn.request_count() > 0) {
            Some(conn) => {
                let verdict = conn.verdict(close);
                let client = conn.requests == Some(Direction::Sent);
                self.remember_port(if client { close.remote_port } else { close.local_port });
                verdict
            }
            None => self.no_request(close),
        }
    }

    fn remember_port(&mut self, port: u16) {
        if port == 0 || self.ports.contains(&port) {
            return;
        }
        if self.ports.len() == KNOWN_PORTS {
            self.ports.pop_front();
        }
        self.ports.push_back(port);
    }

    fn no_request(&self, close: &Close<'_>) -> Option<Verdict> {
        let known = |port: u16| port != 0 && self.ports.contains(&port);
        let client = match close.is_client_role {
            Some(client) => client,
            None if known(close.local_port) => false,
            None => true,
        };
        let (port, request_direction) =
            if client { (close.remote_port, Direction::Sent) } else { (close.local_port, Direction::Received) };
        if !known(port) || close.total(request_direction) != 0 {
            return None;
        }
        Some(Verdict {
            stage: Stage::NoRequest,
            client_side: client,
            requests: 0,
            method: None,
            path: None,
            status: None,
            declared_body: None,
            transferred_body: None,
            idle_ns: None,
        })
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Connections forgotten because the table was full (oldest first).
    pub fn evicted(&self) -> u64 {
        self.evicted
    }
}

// Parsing.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Request(Method),
    Response,
}

/// The token the kernel keys head records on, at the start of `b`.
fn token(b: &[u8]) -> Option<Token> {
    if b.starts_with(b"HTTP/1.") {
        return Some(Token::Response);
    }
    Method::ALL
        .into_iter()
        .find(|m| b.starts_with(m.name().as_bytes()) && b.get(m.name().len()) == Some(&b' '))
        .map(Token::Request)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start<'a> {
    Request {
        method: Method,
        target: &'a [u8],
        target_cut: bool,
    },
    /// `status`: None when the capture cut the status line before it.
    Response {
        status: Option<u16>,
    },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Length {
    #[default]
    Absent,
    Value(u64),
    Invalid,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Coding {
    #[default]
    Absent,
    Chunked,
    Other,
}

/// A message head, as far as the capture shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Parsed<'a> {
    start: Start<'a>,
    http10: bool,
    /// Up to and including the empty line, when it is in the capture.
    head_len: Option<usize>,
    length: Length,
    coding: Coding,
    close: bool,
    keep_alive: bool,
}

impl Parsed<'_> {
    fn request_framing(&self) -> Framing {
        match (self.coding, self.length) {
            (Coding::Chunked, _) => Framing::Chunked { end: None },
            (Coding::Other, _) | (Coding::Absent, Length::Invalid) => Framing::Unknown,
            (Coding::Absent, Length::Absent | Length::Value(0)) => Framing::Empty,
            (Coding::Absent, Length::Value(n)) => Framing::Length(n),
        }
    }

    fn response_framing(&self, status: u16, answers: Option<Method>) -> Framing {
        match status {
            0 => Framing::Unknown,
            101 => Framing::Tunnel,
            200..=299 if answers == Some(Method::Connect) => Framing::Tunnel,
            100..=199 | 204 | 304 => Framing::Empty,
            _ if answers == Some(Method::Head) => Framing::Empty,
            _ => match (self.coding, self.length) {
                (Coding::Chunked, _) => Framing::Chunked { end: None },
                (Coding::Other, _) | (Coding::Absent, Length::Absent) => Framing::Close,
                (Coding::Absent, Length::Invalid) => Framing::Unknown,
                (Coding::Absent, Length::Value(0)) => Framing::Empty,
                (Coding::Absent, Length::Value(n)) => Framing::Length(n),
            },
        }
    }

    fn header(&mut self, line: &[u8]) {
        let Some(colon) = find(line, b':') else { return };
        let name = line[..colon].trim_ascii();
        let value = line[colon + 1..].trim_ascii();
        if name.eq_ignore_ascii_case(b"content-length") {
            for part in value.split(|&c| c == b',') {
                self.length = match (self.length, decimal(part.trim_ascii())) {
                    (Length::Invalid, _) | (_, None) => Length::Invalid,
                    (Length::Absent, Some(n)) => Length::Value(n),
                    (Length::Value(m), Some(n)) if m == n => Length::Value(n),
                    (Length::Value(_), Some(_)) => Length::Invalid,
                };
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if let Some(last) = value.split(|&c| c == b',').map(<[u8]>::trim_ascii).rfind(|c| !c.is_empty()) {
                self.coding = if last.eq_ignore_ascii_case(b"chunked") { Coding::Chunked } else { Coding::Other };
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            for option in value.split(|&c| c == b',').map(<[u8]>::trim_ascii) {
                self.close |= option.eq_ignore_ascii_case(b"close");
                self.keep_alive |= option.eq_ignore_ascii_case(b"keep-alive");
            }
        }
    }
}

/// The head of a message at the start of `b`; None if it is not HTTP/1.x.
fn parse(b: &[u8]) -> Option<Parsed<'_>> {
    let (line, after) = match find(b, b'\n') {
        Some(i) => (strip_cr(&b[..i]), Some(i + 1)),
        None => (strip_cr(b), None),
    };
    let complete = after.is_some();
    let (start, http10) = match token(b)? {
        Token::Response => status_line(line, complete)?,
        Token::Request(method) => request_line(method, line, complete)?,
    };
    let mut parsed = Parsed {
        start,
        http10,
        head_len: None,
        length: Length::Absent,
        coding: Coding::Absent,
        close: false,
        keep_alive: false,
    };
    let Some(mut pos) = after else { return Some(parsed) };
    while let Some(i) = b.get(pos..).and_then(|rest| find(rest, b'\n')) {
        let line = strip_cr(&b[pos..pos + i]);
        pos += i + 1;
        if line.is_empty() {
            parsed.head_len = Some(pos);
            break;
        }
        parsed.header(line);
    }
    Some(parsed)
}

/// `HTTP/1.x SP DDD [SP reason]` (`line` without its end); a prefix of one when not `complete`.
fn status_line(line: &[u8], complete: bool) -> Option<(Start<'static>, bool)> {
    let partial = |http10| (!complete).then_some((Start::Response { status: None }, http10));
    let rest = line.get("HTTP/1.".len()..).unwrap_or_default();
    let Some((&minor, rest)) = rest.split_first() else { return partial(false) };
    if !minor.is_ascii_digit() {
        return None;
    }
    let http10 = minor == b'0';
    let Some((&space, rest)) = rest.split_first() else { return partial(http10) };
    if space != b' ' {
        return None;
    }
    let digits = rest.iter().take(3).take_while(|c| c.is_ascii_digit()).count();
    if digits < 3 {
        return if digits == rest.len() { partial(http10) } else { None };
    }
    let status = rest[..3].iter().fold(0u16, |n, &d| n * 10 + u16::from(d - b'0'));
    match rest.get(3) {
        None | Some(b' ') if status >= 100 => Some((Start::Response { status: Some(status) }, http10)),
        _ => None,
    }
}

/// `METHOD SP target SP HTTP/1.x` (`line` without its end); a prefix of one when not `complete`.
fn request_line(method: Method, line: &[u8], complete: bool) -> Option<(Start<'_>, bool)> {
    let rest = line.get(method.name().len() + 1..).unwrap_or_default();
    let Some(space) = find(rest, b' ') else {
        return (!complete).then_some((Start::Request { method, target: rest, target_cut: true }, false));
    };
    let (target, version) = (&rest[..space], &rest[space + 1..]);
    const VERSION: &[u8] = b"HTTP/1.";
    let valid = if complete {
        version.len() == VERSION.len() + 1 && version.starts_with(VERSION)
    } else {
        version.len() <= VERSION.len() + 1 && VERSION.starts_with(&version[..version.len().min(VERSION.len())])
    } && version.get(VERSION.len()).is_none_or(u8::is_ascii_digit);
    (valid && !target.is_empty())
        .then_some((Start::Request { method, target, target_cut: false }, version == b"HTTP/1.0"))
}

enum Chunked {
    /// The last chunk and trailer section end this many bytes in.
    Ended(usize),
    /// The capture ends first.
    Open,
    /// Not chunked encoding.
    Invalid,
}

/// Follows chunked encoding from the start of a body.
fn scan_chunked(b: &[u8]) -> Chunked {
    let mut pos = 0usize;
    loop {
        let Some(i) = b.get(pos..).and_then(|rest| find(rest, b'\n')) else { return Chunked::Open };
        let line = strip_cr(&b[pos..pos + i]);
        pos += i + 1;
        let size = line.split(|&c| c == b';').next().unwrap_or_default().trim_ascii();
        let Some(size) = hex(size) else { return Chunked::Invalid };
        if size == 0 {
            while let Some(i) = b.get(pos..).and_then(|rest| find(rest, b'\n')) {
                let line = strip_cr(&b[pos..pos + i]);
                pos += i + 1;
                if line.is_empty() {
                    return Chunked::Ended(pos);
                }
            }
            return Chunked::Open;
        }
        let Some(end) = usize::try_from(size).ok().and_then(|size| pos.checked_add(size)) else {
            return Chunked::Open;
        };
        pos = end;
        match b.get(pos..) {
            None | Some([] | [b'\r']) => return Chunked::Open,
            Some([b'\n', ..]) => pos += 1,
            Some([b'\r', b'\n', ..]) => pos += 2,
            Some(_) => return Chunked::Invalid,
        }
    }
}

fn find(b: &[u8], byte: u8) -> Option<usize> {
    b.iter().position(|&c| c == byte)
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn decimal(b: &[u8]) -> Option<u64> {
    if b.is_empty() {
        return None;
    }
    b.iter().try_fold(
        0u64,
        |n, &d| {
            if d.is_ascii_digit() { n.checked_mul(10)?.checked_add(u64::from(d - b'0')) } else { None }
        },
    )
}

fn hex(b: &[u8]) -> Option<u64> {
    if b.is_empty() {
        return None;
    }
    b.iter().try_fold(0u64, |n, &d| {
        let digit = char::from(d).to_digit(16)?;
        n.checked_mul(16)?.checked_add(u64::from(digit))
    })
}

// ---------------------------------------------------------------------------------------------
// Heads read a little at a time.
// ---------------------------------------------------------------------------------------------

/// A message head as [`Heads`] assembles it: what [`Exchanges::chunk`] takes, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadChunk {
    pub sk: u64,
    pub direction: Direction,
    pub offset: u64,
    /// Bytes the calls moved, from `offset`.
    pub len: u64,
    /// The first of them, at most [`HEAD_CAPTURE`].
    pub bytes: Vec<u8>,
    pub timestamp_ns: u64,
}

impl HeadChunk {
    pub fn as_chunk(&self) -> Chunk<'_> {
        Chunk {
            sk: self.sk,
            direction: self.direction,
            offset: self.offset,
            len: u32::try_from(self.len).unwrap_or(u32::MAX),
            bytes: &self.bytes,
            timestamp_ns: self.timestamp_ns,
        }
    }

    /// Nothing more can be added: the header block's end is in it, it holds [`HEAD_CAPTURE`]
    /// bytes, or its capture stopped short of its calls' bytes (what follows would not be
    /// contiguous).
    fn whole(&self) -> bool {
        self.bytes.len() >= HEAD_CAPTURE
            || (self.bytes.len() as u64) < self.len
            || self.bytes.windows(4).any(|w| w == b"\r\n\r\n")
            || self.bytes.windows(2).any(|w| w == b"\n\n")
    }
}

/// Heads held at once, at most; past it every held head is handed on as it is.
const MAX_HELD: usize = 4096;

/// Joins a head's continuations (the calls after it within its first [`HEAD_CAPTURE`] bytes,
/// which the kernel side sends when an application reads or writes a head a little at a time:
/// Rust's `read_to_end` first reads 32 bytes) to the chunk that began it, so that
/// [`Exchanges::chunk`] sees the head whole. A head is held until it is whole, the connection's
/// next head or a record of its other direction comes, or it closes ([`Heads::flush`]).
#[derive(Debug, Default)]
pub struct Heads {
    held: HashMap<(u64, Direction), HeadChunk>,
}

impl Heads {
    /// One record (`continuation`: it continues the head before it); the heads now complete,
    /// in stream order (at most three).
    pub fn push(&mut self, record: HeadChunk, continuation: bool) -> Vec<HeadChunk> {
        let mut done = Vec::new();
        if self.held.len() >= MAX_HELD {
            done.extend(self.held.drain().map(|(_, h)| h));
        }
        let other = match record.direction {
            Direction::Sent => Direction::Received,
            Direction::Received => Direction::Sent,
        };
        // The other direction moved: what it held is as whole as it gets.
        done.extend(self.held.remove(&(record.sk, other)));
        let key = (record.sk, record.direction);
        if continuation {
            if let Some(head) = self.held.get_mut(&key)
                && head.offset.saturating_add(head.len) == record.offset
            {
                let room = HEAD_CAPTURE.saturating_sub(head.bytes.len());
                head.bytes.extend_from_slice(&record.bytes[..record.bytes.len().min(room)]);
                head.len = head.len.saturating_add(record.len);
                if head.whole() {
                    done.extend(self.held.remove(&key));
                }
            }
            // Otherwise it continues a head already handed on (whole), or one lost: nothing to
            // add to.
            return done;
        }
        done.extend(self.held.remove(&key));
        if record.whole() {
            done.push(record);
        } else {
            self.held.insert(key, record);
        }
        done
    }

    /// What is held for `sk`, as it is: the connection closed.
    pub fn flush(&mut self, sk: u64) -> Vec<HeadChunk> {
        [Direction::Sent, Direction::Received].into_iter().filter_map(|d| self.held.remove(&(sk, d))).collect()
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's test: which chunks make a head record.
    pub(super) fn kernel_token(b: &[u8]) -> bool {
        b.starts_with(b"HTTP/1.")
            || ["GET ", "HEAD ", "POST ", "PUT ", "DELETE ", "OPTIONS ", "PATCH ", "CONNECT ", "TRACE "]
                .iter()
                .any(|t| b.starts_with(t.as_bytes()))
    }

    /// One socket as the kernel sees it.
    pub(super) struct Socket {
        pub sk: u64,
        pub client_role: Option<bool>,
        pub local_port: u16,
        pub remote_port: u16,
        pub sent: u64,
        pub received: u64,
        pub tail_sent: Vec<u8>,
        pub tail_received: Vec<u8>,
        pub last_data_ns: u64,
    }

    impl Socket {
        pub fn new(sk: u64, client_role: Option<bool>, local_port: u16, remote_port: u16) -> Self {
            Self {
                sk,
                client_role,
                local_port,
                remote_port,
                sent: 0,
                received: 0,
                tail_sent: Vec::new(),
                tail_received: Vec::new(),
                last_data_ns: 0,
            }
        }

        /// One send or receive of `data`.
        pub fn io(&mut self, ex: &mut Exchanges, direction: Direction, data: &[u8], now: u64) -> Vec<ResponseSeen> {
            let (total, tail) = match direction {
                Direction::Sent => (&mut self.sent, &mut self.tail_sent),
                Direction::Received => (&mut self.received, &mut self.tail_received),
            };
            let offset = *total;
            *total += data.len() as u64;
            *tail = data[data.len().saturating_sub(8)..].to_vec();
            self.last_data_ns = now;
            if !kernel_token(data) {
                return Vec::new();
            }
            ex.chunk(&Chunk {
                sk: self.sk,
                direction,
                offset,
                len: u32::try_from(data.len()).unwrap(),
                bytes: &data[..data.len().min(HEAD_CAPTURE)],
                timestamp_ns: now,
            })
        }

        pub fn close(&self, ex: &mut Exchanges, now: u64) -> Option<Verdict> {
            ex.close(&Close {
                sk: self.sk,
                is_client_role: self.client_role,
                local_port: self.local_port,
                remote_port: self.remote_port,
                bytes_sent: self.sent,
                bytes_received: self.received,
                tail_sent: &self.tail_sent,
                tail_received: &self.tail_received,
                last_data_ns: self.last_data_ns,
                closed_ns: now,
            })
        }
    }

    /// Both ends of one connection on one host.
    struct Pair {
        ex: Exchanges,
        client: Socket,
        server: Socket,
        now: u64,
    }

    impl Pair {
        fn new() -> Self {
            Self::on(Exchanges::new(16), 1)
        }

        fn on(ex: Exchanges, sk: u64) -> Self {
            Self {
                ex,
                client: Socket::new(sk, Some(true), 40000 + sk as u16, 8080),
                server: Socket::new(sk + 1000, Some(false), 8080, 40000 + sk as u16),
                now: 1_000,
            }
        }

        fn tick(&mut self) -> u64 {
            self.now += 10;
            self.now
        }

        /// The client sends `data`, the server reads it.
        fn request(&mut self, data: &[u8]) {
            let now = self.tick();
            assert!(self.client.io(&mut self.ex, Direction::Sent, data, now).is_empty());
            assert!(self.server.io(&mut self.ex, Direction::Received, data, now).is_empty());
        }

        /// The client sends `data`, the server never reads it.
        fn request_unread(&mut self, data: &[u8]) {
            let now = self.tick();
            self.client.io(&mut self.ex, Direction::Sent, data, now);
            self.server.received += data.len() as u64;
        }

        /// The server sends `data`, the client reads it: the statuses each side reported.
        fn response(&mut self, data: &[u8]) -> (Vec<u16>, Vec<u16>) {
            let now = self.tick();
            let server = self.server.io(&mut self.ex, Direction::Sent, data, now);
            let client = self.client.io(&mut self.ex, Direction::Received, data, now);
            assert!(server.iter().all(|r| r.direction == Direction::Sent));
            assert!(client.iter().all(|r| r.direction == Direction::Received));
            (client.iter().map(|r| r.status).collect(), server.iter().map(|r| r.status).collect())
        }

        /// Both ends close `idle` after the last data: (client's verdict, server's).
        fn close(&mut self, idle: u64) -> (Option<Verdict>, Option<Verdict>) {
            self.now += idle;
            let now = self.now;
            let client = self.client.close(&mut self.ex, now);
            let server = self.server.close(&mut self.ex, now);
            assert!(self.ex.is_empty());
            (client, server)
        }

        /// Both ends close; both have a verdict; their stages.
        fn stages(&mut self) -> (Verdict, Verdict) {
            let (client, server) = self.close(0);
            let (client, server) = (client.unwrap(), server.unwrap());
            assert!(client.client_side);
            assert!(!server.client_side);
            (client, server)
        }
    }

    const GET: &[u8] = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n";
    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

    fn both(pair: &mut Pair, stage: Stage) -> (Verdict, Verdict) {
        let (client, server) = pair.stages();
        assert_eq!((client.stage, server.stage), (stage, stage), "{client:?}\n{server:?}");
        (client, server)
    }

    #[test]
    fn stage_labels() {
        let labels: Vec<_> = Stage::ALL.iter().map(|s| s.label()).collect();
        assert_eq!(
            labels,
            [
                "no_request",
                "in_request",
                "awaiting_response",
                "in_response_headers",
                "in_response_body",
                "idle_keepalive",
                "complete"
            ]
        );
        let truncated: Vec<_> = Stage::ALL.into_iter().filter(|s| s.truncated_response()).collect();
        assert_eq!(truncated, [Stage::InResponseHeaders, Stage::InResponseBody]);
    }

    #[test]
    fn status_line_without_headers_end_is_in_response_headers() {
        let mut pair = Pair::new();
        pair.request(GET);
        assert_eq!(pair.response(b"HTTP/1.1 404 Not Found\r\n"), (vec![404], vec![404]));
        let (client, server) = both(&mut pair, Stage::InResponseHeaders);
        for v in [client, server] {
            assert_eq!(v.status, Some(404));
            assert_eq!(v.requests, 1);
            assert_eq!(v.method.as_deref(), Some("GET"));
            assert_eq!(v.path.as_deref(), Some("/x"));
            assert_eq!((v.declared_body, v.transferred_body, v.idle_ns), (None, None, None));
        }
    }

    #[test]
    fn content_length_cut_is_in_response_body_on_both_sides() {
        for split in [false, true] {
            let mut pair = Pair::new();
            pair.request(GET);
            let head = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n";
            if split {
                pair.response(head);
                pair.response(b"12345678");
            } else {
                pair.response(&[&head[..], b"12345678"].concat());
            }
            let (client, server) = both(&mut pair, Stage::InResponseBody);
            for v in [client, server] {
                assert_eq!((v.declared_body, v.transferred_body), (Some(100), Some(8)));
                assert_eq!(v.status, Some(200));
            }
        }
    }

    #[test]
    fn chunked_cut_before_the_last_chunk_vs_complete() {
        let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
        let mut cut = Pair::new();
        cut.request(GET);
        cut.response(head);
        cut.response(b"5\r\nhello\r\n");
        let (client, _) = both(&mut cut, Stage::InResponseBody);
        assert_eq!((client.declared_body, client.transferred_body), (None, Some(10)));

        let mut done = Pair::new();
        done.request(GET);
        done.response(head);
        done.response(b"5\r\nhello\r\n");
        done.response(b"0\r\n\r\n");
        let (client, server) = both(&mut done, Stage::IdleKeepalive);
        assert_eq!(client.idle_ns, Some(0));
        assert_eq!(server.idle_ns, Some(0));

        // All of it in the head record: the last chunk is found there.
        let mut whole = Pair::new();
        whole.request(GET);
        whole.response(&[&head[..], b"5\r\nhello\r\n0\r\n\r\n"].concat());
        both(&mut whole, Stage::IdleKeepalive);

        // Cut inside the head record: nothing followed.
        let mut inside = Pair::new();
        inside.request(GET);
        inside.response(&[&head[..], b"5\r\nhello\r\n0\r\n"].concat());
        both(&mut inside, Stage::InResponseBody);
    }

    #[test]
    fn chunked_end_split_over_short_chunks() {
        let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        // The record's capture ends with `...0\r\n`, the last chunk is `\r\n`: joined, the end.
        let mut joined = Pair::new();
        joined.request(GET);
        joined.response(&[&head[..], b"5\r\nhello\r\n0\r\n"].concat());
        joined.response(b"\r\n");
        both(&mut joined, Stage::IdleKeepalive);

        // A short last chunk that cannot end the terminator: cut.
        let mut short = Pair::new();
        short.request(GET);
        short.response(head);
        short.response(b"5\r\nhello\r\n1");
        short.response(b"\r\na");
        both(&mut short, Stage::InResponseBody);

        // A short last chunk that could (`\n`), not adjacent to a capture: no claim.
        let mut unknown = Pair::new();
        unknown.request(GET);
        unknown.response(head);
        unknown.response(b"5\r\nhello\r\n0\r\n\r");
        unknown.response(b"\n");
        both(&mut unknown, Stage::IdleKeepalive);
    }

    #[test]
    fn first_request_without_response_awaits_it() {
        let mut pair = Pair::new();
        pair.request(GET);
        let (client, server) = both(&mut pair, Stage::AwaitingResponse);
        assert_eq!(client.idle_ns, None);
        assert_eq!(server.status, None);
    }

    #[test]
    fn request_on_a_reused_connection_without_response_is_idle_keepalive() {
        let mut pair = Pair::new();
        for _ in 0..2 {
            pair.request(GET);
            pair.response(OK);
        }
        pair.request(GET);
        let (client, server) = both(&mut pair, Stage::IdleKeepalive);
        assert_eq!((client.requests, client.idle_ns), (3, None));
        assert_eq!((server.requests, server.idle_ns), (3, None));
        // The last final response seen is the second one.
        assert_eq!(client.status, Some(200));
    }

    #[test]
    fn request_the_server_never_read_looks_idle_to_it() {
        let mut pair = Pair::new();
        pair.request(GET);
        pair.response(OK);
        pair.request_unread(GET);
        let (client, server) = pair.close(500);
        let (client, server) = (client.unwrap(), server.unwrap());
        assert_eq!((client.stage, client.requests, client.idle_ns), (Stage::IdleKeepalive, 2, None));
        assert_eq!((server.stage, server.requests, server.idle_ns), (Stage::IdleKeepalive, 1, Some(510)));
    }

    #[test]
    fn keepalive_conversation_closed_while_idle() {
        let mut pair = Pair::new();
        for i in 0..3 {
            pair.request(format!("GET /item/{i} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes());
            pair.response(OK);
        }
        let (client, server) = pair.close(5_000);
        let (client, server) = (client.unwrap(), server.unwrap());
        for v in [client, server] {
            assert_eq!(v.stage, Stage::IdleKeepalive);
            assert_eq!(v.requests, 3);
            assert_eq!(v.path.as_deref(), Some("/item/2"));
            assert_eq!(v.idle_ns, Some(5_000));
        }
    }

    #[test]
    fn connection_close_completes() {
        let mut pair = Pair::new();
        pair.request(GET);
        pair.response(b"HTTP/1.1 200 OK\r\nconnection: Close\r\ncontent-length: 2\r\n\r\nok");
        let (client, _) = both(&mut pair, Stage::Complete);
        assert_eq!(client.idle_ns, None);

        // Said by the request.
        let mut pair = Pair::new();
        pair.request(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
        pair.response(OK);
        both(&mut pair, Stage::Complete);

        // HTTP/1.0 without keep-alive, and with.
        let mut pair = Pair::new();
        pair.request(b"GET / HTTP/1.0\r\n\r\n");
        pair.response(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok");
        both(&mut pair, Stage::Complete);
        let mut pair = Pair::new();
        pair.request(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        pair.response(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok");
        both(&mut pair, Stage::IdleKeepalive);

        // Close-delimited: complete at the end of the connection.
        let mut pair = Pair::new();
        pair.request(GET);
        pair.response(b"HTTP/1.1 200 OK\r\n\r\n");
        pair.response(b"some body");
        both(&mut pair, Stage::Complete);
    }

    #[test]
    fn pipelined_requests_in_one_chunk() {
        for close in [false, true] {
            let mut pair = Pair::new();
            pair.request(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n");
            let last = if close { "Connection: close\r\n" } else { "" };
            let responses = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\naHTTP/1.1 201 Created\r\n{last}Content-Length: 1\r\n\r\nb"
            );
            assert_eq!(pair.response(responses.as_bytes()), (vec![200, 201], vec![200, 201]));
            let stage = if close { Stage::Complete } else { Stage::IdleKeepalive };
            let (client, server) = both(&mut pair, stage);
            for v in [client, server] {
                assert_eq!((v.requests, v.path.as_deref(), v.status), (2, Some("/b"), Some(201)));
            }
        }
    }

    #[test]
    fn pipelined_request_unanswered() {
        let mut pair = Pair::new();
        pair.request(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n");
        pair.response(OK);
        both(&mut pair, Stage::IdleKeepalive);

        let mut pair = Pair::new();
        pair.request(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n");
        both(&mut pair, Stage::AwaitingResponse);
    }

    #[test]
    fn small_body_then_next_head_in_one_chunk() {
        let mut pair = Pair::new();
        pair.request(
            b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcPOST /b HTTP/1.1\r\nContent-Length: 4\r\n\r\nab",
        );
        let (client, server) = both(&mut pair, Stage::InRequest);
        for v in [client, server] {
            assert_eq!((v.requests, v.path.as_deref()), (2, Some("/b")));
            assert_eq!((v.declared_body, v.transferred_body), (Some(4), Some(2)));
        }
    }

    #[test]
    fn bodiless_responses() {
        // HEAD: a Content-Length, no body.
        let mut pair = Pair::new();
        pair.request(b"HEAD /big HTTP/1.1\r\n\r\n");
        pair.response(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n");
        both(&mut pair, Stage::IdleKeepalive);
        // And the next exchange follows it.
        let mut pair = Pair::new();
        pair.request(b"HEAD /big HTTP/1.1\r\n\r\nGET /next HTTP/1.1\r\n\r\n");
        pair.response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe",
        );
        let (client, _) = both(&mut pair, Stage::InResponseBody);
        assert_eq!((client.declared_body, client.transferred_body), (Some(5), Some(2)));

        for response in
            [&b"HTTP/1.1 204 No Content\r\n\r\n"[..], b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n"]
        {
            let mut pair = Pair::new();
            pair.request(GET);
            pair.response(response);
            both(&mut pair, Stage::IdleKeepalive);
        }
    }

    #[test]
    fn expect_100_continue() {
        let head = b"PUT /f HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n";
        let cont = b"HTTP/1.1 100 Continue\r\n\r\n";
        // Cut before the body was sent.
        let mut pair = Pair::new();
        pair.request(head);
        assert_eq!(pair.response(cont), (vec![], vec![]));
        let (client, server) = both(&mut pair, Stage::InRequest);
        for v in [client, server] {
            assert_eq!((v.declared_body, v.transferred_body, v.status), (Some(10), Some(0), None));
        }
        // Body sent, no final response.
        let mut pair = Pair::new();
        pair.request(head);
        pair.response(cont);
        pair.request(b"0123456789");
        both(&mut pair, Stage::AwaitingResponse);
        // Answered.
        let mut pair = Pair::new();
        pair.request(head);
        pair.response(cont);
        pair.request(b"0123456789");
        assert_eq!(pair.response(OK), (vec![200], vec![200]));
        let (client, _) = both(&mut pair, Stage::IdleKeepalive);
        assert_eq!(client.status, Some(200));
        // The interim response cut (the body sent without waiting for it).
        let mut pair = Pair::new();
        pair.request(head);
        pair.request(b"0123456789");
        pair.response(b"HTTP/1.1 100 Continue\r\n");
        both(&mut pair, Stage::InResponseHeaders);
        // Interim and final in one chunk.
        let mut pair = Pair::new();
        pair.request(head);
        pair.request(b"0123456789");
        pair.response(&[&cont[..], OK].concat());
        both(&mut pair, Stage::IdleKeepalive);
    }

    #[test]
    fn head_record_inside_a_body_is_ignored() {
        let mut pair = Pair::new();
        let body = b"GET /not-a-request HTTP/1.1\r\n\r\n";
        pair.request(format!("POST /upload HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes());
        pair.request(body);
        pair.response(b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n");
        assert_eq!(pair.response(b"HTTP/1.1 500 Internal Server Error\r\n\r\n"), (vec![], vec![]));
        let (client, server) = both(&mut pair, Stage::InResponseBody);
        for v in [client, server] {
            assert_eq!((v.requests, v.path.as_deref(), v.status), (1, Some("/upload"), Some(200)));
            assert_eq!((v.declared_body, v.transferred_body), (Some(40), Some(38)));
        }
        // Close-delimited: all the rest is body.
        let mut pair = Pair::new();
        pair.request(GET);
        pair.response(b"HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(pair.response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"), (vec![], vec![]));
        both(&mut pair, Stage::Complete);
    }

    #[test]
    fn headers_longer_than_the_capture_claim_no_truncation() {
        let cookie = "a".repeat(600);
        let head = format!("HTTP/1.1 200 OK\r\nSet-Cookie: {cookie}\r\nContent-Length: 100\r\n\r\n");
        let mut pair = Pair::new();
        pair.request(GET);
        pair.response(&[head.as_bytes(), b"12345678"].concat());
        let (client, server) = pair.stages();
        assert!(!client.stage.truncated_response() && !server.stage.truncated_response());
        assert_eq!(client.status, Some(200));

        // Split over two reads, the first one captured in full.
        let mut pair = Pair::new();
        pair.request(GET);
        pair.response(b"HTTP/1.1 200 OK\r\nContent-Le");
        pair.response(b"ngth: 100\r\n\r\n12345678");
        let (client, server) = pair.stages();
        assert!(!client.stage.truncated_response() && !server.stage.truncated_response());

        // A long request line (the target cut by the capture).
        let mut pair = Pair::new();
        let path = "/".repeat(700);
        pair.request(format!("POST {path} HTTP/1.1\r\nContent-Length: 5\r\n\r\n").as_bytes());
        let (client, _) = both(&mut pair, Stage::AwaitingResponse);
        assert_eq!(client.path, Some(format!("{}…", "/".repeat(64))));

        // But the same first read and nothing after it: unfinished.
        let mut pair = Pair::new();
        pair.request(GET);
        pair.response(b"HTTP/1.1 200 OK\r\nContent-Le");
        both(&mut pair, Stage::InResponseHeaders);
    }

    #[test]
    fn request_cut() {
        let mut pair = Pair::new();
        pair.request(b"POST /u HTTP/1.1\r\nHost: a\r\n");
        both(&mut pair, Stage::InRequest);

        let mut pair = Pair::new();
        pair.request(b"POST /u HTTP/1.1\r\nContent-Length: 100\r\n\r\n0123456789");
        let (client, server) = both(&mut pair, Stage::InRequest);
        for v in [client, server] {
            assert_eq!((v.declared_body, v.transferred_body), (Some(100), Some(10)));
        }

        let mut pair = Pair::new();
        pair.request(b"POST /u HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        pair.request(b"5\r\nhello\r\n");
        let (client, _) = both(&mut pair, Stage::InRequest);
        assert_eq!((client.declared_body, client.transferred_body), (None, Some(10)));

        let mut pair = Pair::new();
        pair.request(b"POST /u HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        pair.request(b"5\r\nhello\r\n0\r\n\r\n");
        both(&mut pair, Stage::AwaitingResponse);
    }

    #[test]
    fn no_request_on_a_known_http_port() {
        // Nothing known yet.
        let mut ex = Exchanges::new(16);
        assert_eq!(Socket::new(3, Some(true), 40003, 8080).close(&mut ex, 0), None);
        let mut pair = Pair::on(ex, 1);
        pair.request(GET);
        pair.response(OK);
        pair.close(0);
        let mut ex = pair.ex;

        let idle = Socket::new(3, Some(true), 40003, 8080);
        let v = idle.close(&mut ex, 0).unwrap();
        assert_eq!((v.stage, v.client_side, v.requests), (Stage::NoRequest, true, 0));
        let accepted = Socket::new(4, Some(false), 8080, 40004);
        let v = accepted.close(&mut ex, 0).unwrap();
        assert_eq!((v.stage, v.client_side), (Stage::NoRequest, false));
        let unknown = Socket::new(5, None, 8080, 40005);
        assert!(!unknown.close(&mut ex, 0).unwrap().client_side);
        // Another port; or payload but no request (TLS, say): not HTTP.
        assert_eq!(Socket::new(6, Some(true), 40006, 9090).close(&mut ex, 0), None);
        let mut tls = Socket::new(7, Some(true), 40007, 8080);
        tls.io(&mut ex, Direction::Sent, b"\x16\x03\x01\x02\x00", 1);
        assert_eq!(tls.close(&mut ex, 2), None);
        // The server port of a socket that answered is its local port.
        let mut server = Socket::new(8, Some(false), 9999, 40008);
        server.io(&mut ex, Direction::Received, GET, 1);
        server.close(&mut ex, 2).unwrap();
        assert_eq!(Socket::new(9, Some(true), 40009, 9999).close(&mut ex, 0).unwrap().stage, Stage::NoRequest);
    }

    #[test]
    fn eviction_forgets_the_oldest() {
        let mut ex = Exchanges::new(2);
        let mut sockets: Vec<_> = (1..=3).map(|sk| Socket::new(sk, Some(true), 40000, 8080)).collect();
        for socket in &mut sockets {
            socket.io(&mut ex, Direction::Sent, GET, 1);
        }
        assert_eq!((ex.len(), ex.evicted()), (2, 1));
        // More records of a tracked socket do not evict.
        sockets[2].io(&mut ex, Direction::Received, OK, 2);
        assert_eq!((ex.len(), ex.evicted()), (2, 1));
        assert_eq!(sockets[0].close(&mut ex, 3), None);
        assert_eq!(sockets[1].close(&mut ex, 3).unwrap().stage, Stage::AwaitingResponse);
        assert_eq!(sockets[2].close(&mut ex, 3).unwrap().stage, Stage::IdleKeepalive);
        assert!(ex.is_empty());
        // Closed sockets' order entries do not pile up.
        for sk in 10..1000 {
            let mut socket = Socket::new(sk, Some(true), 40000, 8080);
            socket.io(&mut ex, Direction::Sent, GET, 1);
            socket.close(&mut ex, 2);
        }
        assert!(ex.order.len() <= 2 * 2 + 16 + 1);
        assert_eq!(ex.evicted(), 1);
    }

    #[test]
    fn messages_kept_per_direction_are_bounded() {
        let mut pair = Pair::new();
        for _ in 0..20 {
            pair.request(GET);
            pair.response(OK);
        }
        let conn = &pair.ex.conns[&pair.client.sk];
        assert_eq!(conn.dirs.iter().map(|d| (d.ring.len, d.count)).collect::<Vec<_>>(), [(KEEP, 20), (KEEP, 20)]);
        let (client, _) = both(&mut pair, Stage::IdleKeepalive);
        assert_eq!(client.requests, 20);
    }

    #[test]
    fn protocol_switch_ends_http() {
        let mut pair = Pair::new();
        pair.request(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n");
        assert_eq!(pair.response(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"), (vec![], vec![]));
        pair.request(b"GET / HTTP/1.1\r\n\r\n");
        let (client, _) = both(&mut pair, Stage::Complete);
        assert_eq!((client.status, client.requests, client.path.as_deref()), (Some(101), 1, Some("/ws")));

        let mut pair = Pair::new();
        pair.request(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n");
        assert_eq!(pair.response(b"HTTP/1.1 200 Connection established\r\n\r\n"), (vec![200], vec![200]));
        pair.request(b"\x16\x03\x01");
        both(&mut pair, Stage::Complete);
    }

    #[test]
    fn paths() {
        let mut pair = Pair::new();
        pair.request(b"GET /search?q=secret HTTP/1.1\r\n\r\n");
        assert_eq!(pair.stages().0.path.as_deref(), Some("/search"));

        let long = format!("/{}", "é".repeat(40));
        let mut pair = Pair::new();
        pair.request(format!("GET {long} HTTP/1.1\r\n\r\n").as_bytes());
        let path = pair.stages().0.path.unwrap();
        assert!(path.ends_with('…'));
        assert!(path.len() <= PATH_MAX + '…'.len_utf8());
        assert!(long.starts_with(path.trim_end_matches('…')));

        let mut pair = Pair::new();
        pair.request(b"GET /\xff\xfe HTTP/1.1\r\n\r\n");
        assert_eq!(pair.stages().0.path.as_deref(), Some("/\u{fffd}\u{fffd}"));
    }

    #[test]
    fn malformed_heads_are_not_messages() {
        let mut ex = Exchanges::new(4);
        for bytes in [
            &b"GET /\r\n\r\n"[..],
            b"GET / HTTP/2.0\r\n\r\n",
            b"HTTP/1.1 20x OK\r\n\r\n",
            b"HTTP/1.1 099 Low\r\n\r\n",
            b"HTTP/1.x 200 OK\r\n",
            b"GET  HTTP/1.1\r\n",
        ] {
            let mut socket = Socket::new(1, Some(true), 40000, 8080);
            socket.io(&mut ex, Direction::Sent, bytes, 1);
            assert!(ex.is_empty(), "{}", String::from_utf8_lossy(bytes));
        }
        assert_eq!(
            parse(b"HTTP/1.1 2"),
            Some(Parsed {
                start: Start::Response { status: None },
                http10: false,
                head_len: None,
                length: Length::Absent,
                coding: Coding::Absent,
                close: false,
                keep_alive: false,
            })
        );
        let parsed = parse(b"POST / HTTP/1.1\nContent-Length: 5, 5\nTransfer-Encoding: chunked, gzip\n\nbody").unwrap();
        assert_eq!((parsed.head_len, parsed.length, parsed.coding), (Some(71), Length::Value(5), Coding::Other));
        assert_eq!(parse(b"POST / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n").unwrap().length, Length::Invalid);
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n").unwrap().length,
            Length::Invalid
        );
    }

    fn head_chunk(direction: Direction, offset: u64, bytes: &[u8]) -> HeadChunk {
        HeadChunk { sk: 7, direction, offset, len: bytes.len() as u64, bytes: bytes.to_vec(), timestamp_ns: 1 }
    }

    #[test]
    fn heads_read_a_little_at_a_time_are_joined_before_the_tracker_sees_them() {
        let response = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n12345678";
        let mut heads = Heads::default();
        // Rust's read_to_end: 32 bytes first, then the rest.
        assert!(heads.push(head_chunk(Direction::Received, 0, &response[..32]), false).is_empty());
        let done = heads.push(head_chunk(Direction::Received, 32, &response[32..]), true);
        assert_eq!(done, vec![head_chunk(Direction::Received, 0, response)]);
        assert!(heads.is_empty());
        // Fed to the tracker, the head is whole: a sized body cut at 8 of 100.
        let mut ex = Exchanges::new(16);
        let request = b"GET /order HTTP/1.1\r\n\r\n";
        ex.chunk(&head_chunk(Direction::Sent, 0, request).as_chunk());
        ex.chunk(&done[0].as_chunk());
        let v = ex
            .close(&Close {
                sk: 7,
                is_client_role: Some(true),
                local_port: 40000,
                remote_port: 8080,
                bytes_sent: request.len() as u64,
                bytes_received: response.len() as u64,
                tail_sent: b"\r\n\r\n",
                tail_received: b"12345678",
                last_data_ns: 1,
                closed_ns: 2,
            })
            .expect("HTTP");
        assert_eq!(v.stage, Stage::InResponseBody);
        assert_eq!((v.declared_body, v.transferred_body), (Some(100), Some(8)));
    }

    #[test]
    fn a_held_head_goes_on_at_the_next_head_the_other_direction_or_the_close() {
        let mut heads = Heads::default();
        assert!(heads.push(head_chunk(Direction::Sent, 0, b"GET /a HTTP/1.1\r\nHo"), false).is_empty());
        // A continuation that does not follow on is ignored; the next head hands the held one on.
        assert!(heads.push(head_chunk(Direction::Sent, 99, b"st: x\r\n\r\n"), true).is_empty());
        let done = heads.push(head_chunk(Direction::Sent, 30, b"GET /b HTTP/1.1\r\n\r\n"), false);
        assert_eq!(done.len(), 2);
        assert_eq!((done[0].offset, done[1].offset), (0, 30));
        assert!(heads.push(head_chunk(Direction::Sent, 60, b"GET /c HT"), false).is_empty());
        let done = heads.push(head_chunk(Direction::Received, 0, b"HTTP/1.1 200 OK\r\n\r\n"), false);
        assert_eq!(
            done.iter().map(|h| (h.direction, h.offset)).collect::<Vec<_>>(),
            vec![(Direction::Sent, 60), (Direction::Received, 0)]
        );
        assert!(heads.push(head_chunk(Direction::Sent, 90, b"GET /d"), false).is_empty());
        assert_eq!(heads.flush(7).len(), 1);
        assert!(heads.flush(7).is_empty());
        // Captured short of its bytes, or HEAD_CAPTURE long: whole at once.
        let mut short = head_chunk(Direction::Sent, 0, b"GET /e HTTP/1.1\r\n");
        short.len = 4000;
        assert_eq!(heads.push(short, false).len(), 1);
    }
}

#[cfg(test)]
mod properties {
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::sample::select;

    use super::tests::{Socket, kernel_token};
    use super::*;

    // (1) Arbitrary input never panics.

    fn fragment() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            select(vec!["GET ", "HEAD ", "POST ", "CONNECT ", "HTTP/1.1 ", "HTTP/1.0 ", "HTTP/1."])
                .prop_map(|s| s.as_bytes().to_vec()),
            select(vec![
                "/ HTTP/1.1\r\n",
                "200 OK\r\n",
                "101 x\r\n",
                "100 c\r\n",
                "\r\n",
                "\n",
                "\r\n\r\n",
                "Content-Length: ",
                "content-length: 0\r\n",
                "Transfer-Encoding: chunked\r\n",
                "Connection: close\r\n",
                "0\r\n\r\n",
                "5\r\n",
                "ffffffffffffffffff\r\n",
                "18446744073709551616"
            ])
            .prop_map(|s| s.as_bytes().to_vec()),
            (0u64..2000).prop_map(|n| n.to_string().into_bytes()),
            vec(any::<u8>(), 0..24),
        ]
    }

    fn data() -> impl Strategy<Value = Vec<u8>> {
        vec(fragment(), 0..24).prop_map(|fragments| fragments.concat())
    }

    #[derive(Debug, Clone)]
    enum Op {
        Chunk {
            sk: u64,
            sent: bool,
            offset: u64,
            len: u32,
            bytes: Vec<u8>,
        },
        Close {
            sk: u64,
            role: Option<bool>,
            ports: (u16, u16),
            totals: (u64, u64),
            tails: (Vec<u8>, Vec<u8>),
            ns: (u64, u64),
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        let small_or_any = || prop_oneof![0u64..4000, any::<u64>()];
        prop_oneof![
            4 => (0u64..4, any::<bool>(), small_or_any(), prop_oneof![0u32..4000, any::<u32>()], data())
                .prop_map(|(sk, sent, offset, len, bytes)| Op::Chunk { sk, sent, offset, len, bytes }),
            1 => (0u64..4, prop::option::of(any::<bool>()), (select(vec![0u16, 80, 8080]), select(vec![0u16, 80, 8080])),
                  (small_or_any(), small_or_any()), (vec(any::<u8>(), 0..10), vec(any::<u8>(), 0..10)), (any::<u64>(), any::<u64>()))
                .prop_map(|(sk, role, ports, totals, tails, ns)| Op::Close { sk, role, ports, totals, tails, ns }),
        ]
    }

    // (2), (3) Clean conversations.

    #[derive(Debug, Clone)]
    struct Body {
        data: Vec<u8>,
        /// Chunked, with these chunk sizes (repeated as needed), or Content-Length.
        chunks: Option<Vec<usize>>,
    }

    impl Body {
        fn header(&self) -> String {
            match self.chunks {
                Some(_) => "Transfer-Encoding: chunked\r\n".to_owned(),
                None => format!("Content-Length: {}\r\n", self.data.len()),
            }
        }

        fn encoded(&self) -> Vec<u8> {
            let Some(sizes) = &self.chunks else { return self.data.clone() };
            let mut out = Vec::new();
            let mut rest = &self.data[..];
            for size in sizes.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (chunk, tail) = rest.split_at((*size).min(rest.len()));
                out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                out.extend_from_slice(chunk);
                out.extend_from_slice(b"\r\n");
                rest = tail;
            }
            out.extend_from_slice(b"0\r\n\r\n");
            out
        }
    }

    fn body(len: std::ops::Range<usize>) -> impl Strategy<Value = Body> {
        (vec(select(b"abcdefghijklmnopqrstuvwxyz0123456789 ".to_vec()), len), prop::option::of(vec(1usize..64, 1..6)))
            .prop_map(|(data, chunks)| Body { data, chunks })
    }

    #[derive(Debug, Clone)]
    struct Exchange {
        method: &'static str,
        request_body: Body,
        status: u16,
        response_body: Body,
    }

    fn exchange() -> impl Strategy<Value = Exchange> {
        (
            select(vec!["GET", "HEAD", "POST", "PUT", "DELETE"]),
            body(0..300),
            select(vec![200u16, 201, 204, 304, 404, 500]),
            body(0..300),
        )
            .prop_map(|(method, request_body, status, response_body)| Exchange {
                method,
                request_body,
                status,
                response_body,
            })
    }

    /// The last exchange of a conversation cut inside its response body: one with a body.
    fn exchange_with_body() -> impl Strategy<Value = Exchange> {
        (select(vec!["GET", "POST"]), body(0..300), select(vec![200u16, 404, 500]), body(1..300)).prop_map(
            |(method, request_body, status, response_body)| Exchange { method, request_body, status, response_body },
        )
    }

    struct Message {
        request: bool,
        bytes: Vec<u8>,
        head_len: usize,
    }

    impl Exchange {
        fn messages(&self, i: usize, close: bool) -> [Message; 2] {
            let has_body = matches!(self.method, "POST" | "PUT");
            let mut head = format!("{} /r{i} HTTP/1.1\r\nHost: example\r\n", self.method);
            if has_body {
                head.push_str(&self.request_body.header());
            }
            head.push_str("\r\n");
            let head_len = head.len();
            let mut request = head.into_bytes();
            if has_body {
                request.extend(self.request_body.encoded());
            }

            let mut head = format!("HTTP/1.1 {} Whatever\r\nServer: test\r\n", self.status);
            let bodiless = self.method == "HEAD" || matches!(self.status, 204 | 304);
            if self.status != 204 {
                head.push_str(&self.response_body.header());
            }
            if close {
                head.push_str("Connection: close\r\n");
            }
            head.push_str("\r\n");
            let response_head_len = head.len();
            let mut response = head.into_bytes();
            if !bodiless {
                response.extend(self.response_body.encoded());
            }
            [
                Message { request: true, bytes: request, head_len },
                Message { request: false, bytes: response, head_len: response_head_len },
            ]
        }
    }

    fn conversation(exchanges: &[Exchange], close: bool) -> Vec<Message> {
        let n = exchanges.len();
        exchanges.iter().enumerate().flat_map(|(i, e)| e.messages(i, close && i + 1 == n)).collect()
    }

    /// What a socket saw of a conversation.
    struct Fed {
        socket: Socket,
        /// Statuses reported by `chunk`.
        seen: Vec<u16>,
        /// Whether the last message's head was whole in its first chunk.
        last_head_whole: bool,
    }

    /// Feeds `messages` to one side (`client` or server) the way the kernel would: each message
    /// cut into chunks of `sizes` (cycled; the first at least 16 bytes, as a token and status
    /// line arrive together), a record for each chunk that begins with a token.
    fn feed(ex: &mut Exchanges, messages: &[Message], sizes: &[usize], client: bool) -> Fed {
        let mut socket =
            if client { Socket::new(1, Some(true), 40000, 80) } else { Socket::new(2, Some(false), 80, 40000) };
        let mut fed = Fed { socket: Socket::new(0, None, 0, 0), seen: Vec::new(), last_head_whole: false };
        let mut size = sizes.iter().cycle();
        let mut now = 1_000;
        for message in messages {
            let direction = if message.request == client { Direction::Sent } else { Direction::Received };
            let mut rest = &message.bytes[..];
            let mut first = true;
            while !rest.is_empty() {
                let mut n = *size.next().unwrap();
                if first {
                    n = n.max(16);
                    fed.last_head_whole = n >= message.head_len;
                    first = false;
                }
                let (piece, tail) = rest.split_at(n.min(rest.len()));
                // Bodies and header continuations never begin with a token.
                assert!(rest.len() == message.bytes.len() || !kernel_token(piece));
                now += 7;
                for response in socket.io(ex, direction, piece, now) {
                    assert_eq!(response.direction, direction);
                    fed.seen.push(response.status);
                }
                rest = tail;
            }
        }
        fed.socket = socket;
        fed
    }

    proptest! {
        #[test]
        fn arbitrary_input_never_panics(ops in vec(op(), 0..40), max in 0usize..4) {
            let mut ex = Exchanges::new(max);
            for op in ops {
                match op {
                    Op::Chunk { sk, sent, offset, len, bytes } => {
                        let direction = if sent { Direction::Sent } else { Direction::Received };
                        let seen = ex.chunk(&Chunk { sk, direction, offset, len, bytes: &bytes, timestamp_ns: 0 });
                        prop_assert!(seen.iter().all(|r| r.direction == direction && !(100..200).contains(&r.status)));
                    }
                    Op::Close { sk, role, ports, totals, tails, ns } => {
                        let verdict = ex.close(&Close {
                            sk, is_client_role: role, local_port: ports.0, remote_port: ports.1,
                            bytes_sent: totals.0, bytes_received: totals.1, tail_sent: &tails.0, tail_received: &tails.1,
                            last_data_ns: ns.0, closed_ns: ns.1,
                        });
                        if let Some(v) = verdict {
                            prop_assert!(v.path.as_ref().is_none_or(|p| p.trim_end_matches('…').len() <= PATH_MAX));
                            prop_assert_eq!(v.idle_ns.is_some(), v.stage == Stage::IdleKeepalive && v.idle_ns.is_some());
                            prop_assert_eq!(v.stage == Stage::NoRequest, v.requests == 0);
                        }
                    }
                }
                prop_assert!(ex.len() <= max.max(1));
            }
        }

        #[test]
        fn clean_conversations_end_complete_or_idle(
            exchanges in vec(exchange(), 1..=5),
            close in any::<bool>(),
            sizes in (vec(1usize..700, 1..12), vec(1usize..700, 1..12)),
        ) {
            let messages = conversation(&exchanges, close);
            let last = exchanges.last().unwrap();
            for (client, sizes) in [(true, &sizes.0), (false, &sizes.1)] {
                let mut ex = Exchanges::new(4);
                let fed = feed(&mut ex, &messages, sizes, client);
                prop_assert_eq!(&fed.seen, &exchanges.iter().map(|e| e.status).collect::<Vec<_>>());
                let v = fed.socket.close(&mut ex, 1_000_000).unwrap();
                prop_assert_eq!(v.client_side, client);
                prop_assert_eq!(v.requests as usize, exchanges.len());
                prop_assert_eq!(v.method.as_deref(), Some(last.method));
                prop_assert_eq!(v.status, Some(last.status));
                prop_assert_eq!(v.path.clone(), Some(format!("/r{}", exchanges.len() - 1)));
                prop_assert_eq!((v.declared_body, v.transferred_body), (None, None));
                if !close {
                    prop_assert_eq!(v.stage, Stage::IdleKeepalive, "{:?}", v);
                    prop_assert_eq!(v.idle_ns, Some(1_000_000 - fed.socket.last_data_ns));
                } else if fed.last_head_whole {
                    prop_assert_eq!(v.stage, Stage::Complete, "{:?}", v);
                } else {
                    prop_assert!(matches!(v.stage, Stage::Complete | Stage::IdleKeepalive), "{:?}", v);
                }
            }
        }

        #[test]
        fn cut_inside_the_last_response_body_is_never_complete(
            earlier in vec(exchange(), 0..4),
            last in exchange_with_body(),
            close in any::<bool>(),
            cut in any::<prop::sample::Index>(),
            sizes in (vec(1usize..700, 1..12), vec(1usize..700, 1..12)),
        ) {
            let mut exchanges = earlier;
            exchanges.push(last.clone());
            let mut messages = conversation(&exchanges, close);
            let response = messages.last_mut().unwrap();
            let body = response.bytes.len() - response.head_len;
            let transferred = cut.index(body);
            response.bytes.truncate(response.head_len + transferred);
            for (client, sizes) in [(true, &sizes.0), (false, &sizes.1)] {
                let mut ex = Exchanges::new(4);
                let fed = feed(&mut ex, &messages, sizes, client);
                let v = fed.socket.close(&mut ex, 1_000_000).unwrap();
                prop_assert_eq!(v.requests as usize, exchanges.len());
                prop_assert!(!matches!(v.stage, Stage::NoRequest | Stage::InRequest | Stage::AwaitingResponse | Stage::InResponseHeaders), "{:?}", v);
                if !fed.last_head_whole {
                    // The headers' end unknown: no claim either way.
                    continue;
                }
                let chunked = last.response_body.chunks.is_some();
                let tail = if client { &fed.socket.tail_received } else { &fed.socket.tail_sent };
                if chunked && tail.len() < LAST_CHUNK.len() && LAST_CHUNK.ends_with(tail) && transferred >= LAST_CHUNK.len() {
                    // A short last chunk that could end a terminator split over chunks: no claim.
                    continue;
                }
                prop_assert_eq!(v.stage, Stage::InResponseBody, "{:?}", v);
                let declared = (!chunked).then_some(last.response_body.data.len() as u64);
                prop_assert_eq!((v.declared_body, v.transferred_body), (declared, Some(transferred as u64)));
            }
        }
    }
}
