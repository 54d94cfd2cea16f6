//! The event log's query surface: the parameters of `GET /api/v1/events` (what `observer events`
//! sends), parsed and checked, and the filter they make. A bad parameter is an error naming it
//! and what is allowed, served as HTTP 400.

use std::{net::IpAddr, time::Duration};

use crate::api::EventRecord;

/// Every value `kind` takes: the premature kinds of `closed` records and the two reset events.
pub const KINDS: [&str; 11] = [
    "refused",
    "peer_reset",
    "unread_data",
    "local_reset",
    "eof_before_response",
    "abandoned",
    "timeout",
    "connect_timeout",
    "truncated_response",
    "reset_received",
    "reset_sent",
];

/// The parameters `GET /api/v1/events` knows.
pub const PARAMETERS: [&str; 10] =
    ["after", "since", "limit", "comm", "pid", "peer", "port", "kind", "follow", "timeout"];

/// An address or a CIDR block (`10.0.0.0/8`, `fd00::/8`); a bare address is its own /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Option<Self> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr.trim_start_matches('[').trim_end_matches(']').parse().ok()?;
        let addr = canonical(addr);
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max)?,
            None => max,
        };
        Some(Self { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                masked(u32::from(net).into(), 32, self.prefix) == masked(u32::from(ip).into(), 32, self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                masked(net.into(), 128, self.prefix) == masked(ip.into(), 128, self.prefix)
            }
            _ => false,
        }
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn masked(bits: u128, width: u32, prefix: u8) -> u128 {
    let keep = u32::from(prefix).min(width);
    if keep == 0 { 0 } else { bits >> (width - keep) }
}

/// The address and port of an endpoint as records write it: `1.2.3.4:80`, `[::1]:8443`.
pub fn split_endpoint(text: &str) -> Option<(IpAddr, u16)> {
    let (addr, port) = text.rsplit_once(':')?;
    let addr = addr.trim_start_matches('[').trim_end_matches(']');
    Some((addr.parse().ok()?, port.parse().ok()?))
}

/// Which records a query selects; every field set must match.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    pub comm: Option<String>,
    pub pid: Option<u32>,
    pub peer: Option<Cidr>,
    pub port: Option<u16>,
    /// Any of these (empty: all).
    pub kinds: Vec<String>,
    /// Only records at or after this kernel monotonic time (ns).
    pub not_before_ns: Option<u64>,
}

impl Filter {
    pub fn matches(&self, r: &EventRecord) -> bool {
        if self.comm.as_ref().is_some_and(|c| *c != r.comm) || self.pid.is_some_and(|p| p != r.pid) {
            return false;
        }
        if self.not_before_ns.is_some_and(|t| r.timestamp_ns < t) {
            return false;
        }
        if !self.kinds.is_empty() {
            let kind = r.kind.as_deref().unwrap_or(r.event.as_str());
            if !self.kinds.iter().any(|k| k == kind) {
                return false;
            }
        }
        let remote = split_endpoint(&r.remote);
        if let Some(peer) = &self.peer
            && !remote.is_some_and(|(ip, _)| peer.contains(ip))
        {
            return false;
        }
        if let Some(port) = self.port {
            // The service port, as the metrics' `port` label: the remote port of a client, the
            // local port of a server; either when the role is unknown.
            let local = split_endpoint(&r.local).map(|(_, p)| p);
            let remote = remote.map(|(_, p)| p);
            let hit = match r.role.as_str() {
                "client" => remote == Some(port),
                "server" => local == Some(port),
                _ => local == Some(port) || remote == Some(port),
            };
            if !hit {
                return false;
            }
        }
        true
    }
}

/// A parsed `GET /api/v1/events` query.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventsQuery {
    /// Only records with a greater sequence number (`after`, or `since` given a bare number).
    pub after: Option<u64>,
    pub limit: Option<usize>,
    /// Records of the last this long (`since=5m`).
    pub since: Option<Duration>,
    pub filter: Filter,
    pub follow: bool,
    /// With `follow`: end the stream after this long.
    pub timeout: Option<Duration>,
}

/// A duration as `5m`, `30s`, `1h30m`, `250ms`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    humantime::parse_duration(text).ok()
}

impl EventsQuery {
    /// Parses a raw query string (percent-encoded `a=b&c=d`).
    pub fn parse(raw: &str) -> Result<Self, String> {
        let mut q = Self::default();
        let mut seen: Vec<String> = Vec::new();
        for (name, value) in form_urlencoded::parse(raw.as_bytes()) {
            let (name, value) = (name.as_ref(), value.as_ref());
            if !PARAMETERS.contains(&name) {
                return Err(format!("unknown parameter {name:?}; the parameters are {}", PARAMETERS.join(", ")));
            }
            if name != "kind" {
                if seen.iter().any(|s| s == name) {
                    return Err(format!("{name}: given more than once"));
                }
                seen.push(name.to_string());
            }
            let number = |what: &str| format!("{name}: {value:?} is not {what}");
            match name {
                "after" => {
                    let seq = value.parse().map_err(|_| number("a sequence number (0 or more)"))?;
                    if q.after.replace(seq).is_some() {
                        return Err("since: a sequence number and `after` both given; use `after`".into());
                    }
                }
                // `since=SEQ` (a bare number) is the sequence cursor of earlier versions.
                "since" => match value.parse::<u64>() {
                    Ok(seq) => {
                        if q.after.replace(seq).is_some() {
                            return Err("since: a sequence number and `after` both given; use `after`".into());
                        }
                    }
                    _ => {
                        q.since = Some(parse_duration(value).ok_or_else(|| {
                            number("a duration such as 30s, 5m, 1h (or, for since, a sequence number)")
                        })?);
                    }
                },
                "limit" => {
                    q.limit =
                        Some(value.parse().ok().filter(|n| *n > 0).ok_or_else(|| number("a count of 1 or more"))?);
                }
                "comm" => {
                    if value.is_empty() || value.len() > 15 {
                        return Err(number("a command name (1 to 15 bytes)"));
                    }
                    q.filter.comm = Some(value.to_string());
                }
                "pid" => q.filter.pid = Some(value.parse().map_err(|_| number("a process id"))?),
                "peer" => {
                    q.filter.peer =
                        Some(Cidr::parse(value).ok_or_else(|| number("an IPv4/IPv6 address or CIDR block"))?);
                }
                "port" => {
                    q.filter.port =
                        Some(value.parse().ok().filter(|p| *p > 0).ok_or_else(|| number("a port (1-65535)"))?);
                }
                "kind" => {
                    for k in value.split(',') {
                        if !KINDS.contains(&k) {
                            return Err(format!("kind: {k:?} is not one of {}", KINDS.join(", ")));
                        }
                        if !q.filter.kinds.iter().any(|have| have == k) {
                            q.filter.kinds.push(k.to_string());
                        }
                    }
                }
                "follow" => {
                    q.follow = match value {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        _ => return Err(number("true or false")),
                    }
                }
                "timeout" => q.timeout = Some(parse_duration(value).ok_or_else(|| number("a duration such as 30s"))?),
                _ => {}
            }
        }
        Ok(q)
    }

    /// The filter, with `since` made a kernel monotonic time against `now_ns` (that clock).
    pub fn filter_at(&self, now_ns: u64) -> Filter {
        let mut f = self.filter.clone();
        f.not_before_ns = self.since.map(|d| now_ns.saturating_sub(d.as_nanos().min(u64::MAX as u128) as u64));
        f
    }
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid clock id and a timespec to write.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

/// The kernel monotonic clock the records' `timestamp_ns` are on (`bpf_ktime_get_ns`).
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// CLOCK_REALTIME − CLOCK_MONOTONIC, in ns: what turns a record's timestamp into wall time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WallOffset {
    pub offset_ns: u64,
    /// How far off `offset_ns` may be: the time between the monotonic reads around the
    /// realtime read.
    pub uncertainty_ns: u64,
}

/// Reads the [`WallOffset`] with the realtime clock between two monotonic reads, the tightest
/// of up to four tries. One read of each clock is off by however long the thread waited
/// between them: on a loaded machine, or in an emulated VM where each read is a syscall and a
/// chance to be preempted, that is tens of milliseconds now and then.
pub fn wall_offset() -> WallOffset {
    let mut best = WallOffset { offset_ns: 0, uncertainty_ns: u64::MAX };
    for _ in 0..4 {
        let before = monotonic_ns();
        let real = clock_ns(libc::CLOCK_REALTIME);
        let after = monotonic_ns();
        let width = after.saturating_sub(before);
        if width < best.uncertainty_ns {
            best = WallOffset { offset_ns: real.saturating_sub(before + width / 2), uncertainty_ns: width };
        }
        if width < 100_000 {
            break;
        }
    }
    best
}

/// A monotonic timestamp as RFC 3339 UTC wall time, to the microsecond.
pub fn rfc3339(timestamp_ns: u64, offset_ns: u64) -> String {
    let wall = std::time::UNIX_EPOCH + Duration::from_nanos(timestamp_ns.saturating_add(offset_ns));
    humantime::format_rfc3339_micros(wall).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(role: &str, local: &str, remote: &str, kind: Option<&str>, event: &str) -> EventRecord {
        EventRecord {
            seq: 1,
            timestamp_ns: 100,
            time: String::new(),
            event: event.into(),
            kind: kind.map(Into::into),
            reason: None,
            comm: "curl".into(),
            pid: 7,
            role: role.into(),
            owner: Default::default(),
            cgroup: String::new(),
            local: local.into(),
            remote: remote.into(),
            facts: None,
            http: None,
            cause: None,
        }
    }

    #[test]
    fn cidrs_match_v4_v6_and_mapped_addresses() {
        let c = Cidr::parse("10.1.0.0/16").expect("cidr");
        assert!(c.contains("10.1.2.3".parse().expect("ip")));
        assert!(c.contains("::ffff:10.1.2.3".parse().expect("ip")));
        assert!(!c.contains("10.2.0.1".parse().expect("ip")));
        let c = Cidr::parse("fd00::/8").expect("cidr");
        assert!(c.contains("fd12::1".parse().expect("ip")));
        assert!(!c.contains("fe80::1".parse().expect("ip")));
        assert!(!c.contains("10.0.0.1".parse().expect("ip")));
        assert!(Cidr::parse("0.0.0.0/0").expect("cidr").contains("1.2.3.4".parse().expect("ip")));
        assert_eq!(Cidr::parse("::1"), Cidr::parse("[::1]"));
        for bad in ["10.0.0.0/33", "::/129", "nope", "10.0.0.0/x", ""] {
            assert_eq!(Cidr::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_port_is_the_service_port() {
        let f = Filter { port: Some(8080), ..Filter::default() };
        assert!(f.matches(&record("client", "127.0.0.1:40000", "127.0.0.2:8080", None, "reset_received")));
        assert!(!f.matches(&record("client", "127.0.0.1:8080", "127.0.0.2:40000", None, "reset_received")));
        assert!(f.matches(&record("server", "[::1]:8080", "[::1]:40000", None, "reset_received")));
        assert!(f.matches(&record("", "127.0.0.1:8080", "127.0.0.2:40000", None, "reset_sent")));
    }

    #[test]
    fn kinds_match_premature_kinds_and_reset_events() {
        let q = EventsQuery::parse("kind=peer_reset,reset_sent&kind=refused").expect("valid");
        assert_eq!(q.filter.kinds, ["peer_reset", "reset_sent", "refused"]);
        assert!(q.filter.matches(&record("client", "a:1", "b:2", Some("peer_reset"), "closed")));
        assert!(q.filter.matches(&record("", "a:1", "b:2", None, "reset_sent")));
        assert!(!q.filter.matches(&record("client", "a:1", "b:2", None, "reset_received")));
    }

    #[test]
    fn since_is_a_duration_or_the_old_sequence_cursor() {
        let q = EventsQuery::parse("since=5m").expect("valid");
        assert_eq!((q.since, q.after), (Some(Duration::from_secs(300)), None));
        let q = EventsQuery::parse("since=42&limit=3").expect("valid");
        assert_eq!((q.since, q.after, q.limit), (None, Some(42), Some(3)));
        let q = EventsQuery::parse("after=42&since=30s").expect("valid");
        assert_eq!((q.since, q.after), (Some(Duration::from_secs(30)), Some(42)));
        assert_eq!(q.filter_at(100_000_000_000).not_before_ns, Some(70_000_000_000));
    }

    #[test]
    fn bad_parameters_name_themselves_and_what_is_allowed() {
        for (query, says) in [
            ("kind=foo", "kind: \"foo\" is not one of refused, peer_reset"),
            ("pid=x", "pid: \"x\" is not a process id"),
            ("peer=10.0.0.0/40", "peer: \"10.0.0.0/40\" is not an IPv4/IPv6 address or CIDR block"),
            ("port=0", "port: \"0\" is not a port"),
            ("limit=0", "limit: \"0\" is not a count"),
            ("since=5 parsecs", "since: \"5 parsecs\" is not a duration"),
            ("follow=maybe", "follow: \"maybe\" is not true or false"),
            ("bogus=1", "unknown parameter \"bogus\""),
            ("pid=1&pid=2", "pid: given more than once"),
            ("since=3&after=4", "since: a sequence number and `after` both given"),
            ("after=4&since=3", "since: a sequence number and `after` both given"),
        ] {
            let err = EventsQuery::parse(query).expect_err(query);
            assert!(err.starts_with(says), "{query}: {err}");
        }
    }

    #[test]
    fn timestamps_become_rfc3339_wall_time() {
        assert_eq!(rfc3339(1_500_000, 1_000_000_000_000_000_000), "2001-09-09T01:46:40.001500Z");
        let offset = wall_offset();
        assert!(offset.offset_ns > 1_700_000_000_000_000_000 - monotonic_ns(), "realtime is after 2023");
        assert!(offset.uncertainty_ns < 1_000_000_000, "{offset:?}");
    }
}
