//! `observer events`: the daemon's event log (resets and premature closes, with their cause),
//! filtered by the daemon (`GET /api/v1/events` takes the same filters).

use std::{io::Write as _, time::Duration};

use anyhow::Context as _;
use clap::Args;
use observer::api::{EVENTS_PATH, EventRecord, EventsPage};

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Base URL of a running daemon.
    #[arg(long, value_name = "URL", default_value_t = format!("http://127.0.0.1:{}", super::DEFAULT_PORT), env = "OBSERVER_ENDPOINT")]
    pub endpoint: String,
    /// Keep printing new matching events as they arrive (Ctrl-C to stop).
    #[arg(long, short)]
    pub follow: bool,
    /// One JSON object per line (the EventRecord schema of /api/v1/openapi.json) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Only the last N matching events already logged (the log holds the latest 4096).
    #[arg(long, visible_alias = "last", value_name = "N", default_value_t = 50)]
    pub limit: usize,
    /// Only events of this process name.
    #[arg(long, value_name = "NAME")]
    pub comm: Option<String>,
    /// Only events of this process id.
    #[arg(long, value_name = "N")]
    pub pid: Option<u32>,
    /// Only events whose remote address is ADDR or in CIDR (IPv4 or IPv6).
    #[arg(long, value_name = "ADDR|CIDR")]
    pub peer: Option<String>,
    /// Only events of this service port (the remote port of a client, the local port of a server).
    #[arg(long, value_name = "N")]
    pub port: Option<u16>,
    /// Only these kinds: a premature kind (peer_reset, refused, ...), reset_received or reset_sent;
    /// repeatable or comma-separated.
    #[arg(long, value_name = "KIND", value_delimiter = ',')]
    pub kind: Vec<String>,
    /// Only events of the last DURATION (30s, 5m, 1h).
    #[arg(long, value_name = "DURATION", value_parser = super::parse_timeout)]
    pub since: Option<Duration>,
    /// How long to wait for each answer of the daemon.
    #[arg(long, value_name = "DURATION", default_value = super::DEFAULT_TIMEOUT, value_parser = super::parse_timeout)]
    pub timeout: Duration,
}

impl EventsArgs {
    /// The filters as query parameters.
    fn filters(&self) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        if let Some(comm) = &self.comm {
            q.append_pair("comm", comm);
        }
        if let Some(pid) = self.pid {
            q.append_pair("pid", &pid.to_string());
        }
        if let Some(peer) = &self.peer {
            q.append_pair("peer", peer);
        }
        if let Some(port) = self.port {
            q.append_pair("port", &port.to_string());
        }
        if !self.kind.is_empty() {
            q.append_pair("kind", &self.kind.join(","));
        }
        if let Some(since) = self.since {
            q.append_pair("since", &format!("{}ms", since.as_millis()));
        }
        q.finish()
    }
}

pub fn run(args: EventsArgs) -> anyhow::Result<()> {
    let filters = args.filters();
    let fetch = |after: u64| -> anyhow::Result<EventsPage> {
        let path = format!("{EVENTS_PATH}?after={after}&limit=1000&{filters}");
        let body = super::get(&args.endpoint, &path, args.timeout)?;
        serde_json::from_str(&body).with_context(|| {
            format!(
                "{}{EVENTS_PATH} answered, but not with observer's events JSON (is it an observer daemon?)",
                args.endpoint
            )
        })
    };
    let color = anstream::AutoStream::choice(&std::io::stdout()) != anstream::ColorChoice::Never;
    let mut out = anstream::AutoStream::auto(std::io::stdout().lock());
    let mut print = |records: &[EventRecord]| -> anyhow::Result<()> {
        for record in records {
            let line = if args.json {
                serde_json::to_string(record).context("encoding an event")?
            } else {
                format!("{} {}", local_time(&record.time), render_colored(record, color))
            };
            if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                // The reader went away (`| head`): done.
                std::process::exit(0);
            }
        }
        Ok(())
    };
    // Everything already logged that matches; the last `limit` of it.
    let mut after = 0;
    let mut matched: std::collections::VecDeque<EventRecord> = Default::default();
    loop {
        let page = fetch(after)?;
        matched.extend(page.events);
        while matched.len() > args.limit {
            matched.pop_front();
        }
        let done = page.next >= page.latest || page.next <= after;
        after = page.next;
        if done {
            break;
        }
    }
    print(matched.make_contiguous())?;
    if !args.follow {
        return Ok(());
    }
    loop {
        let page = fetch(after)?;
        print(&page.events)?;
        if page.next < after {
            // The daemon restarted: its sequence began again.
            after = 0;
            continue;
        }
        after = page.next;
        if page.events.is_empty() {
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// A record's RFC 3339 UTC `time` as local time, `2026-12-02 01:53:38.123`.
fn local_time(rfc3339: &str) -> String {
    let Ok(t) = humantime::parse_rfc3339(rfc3339) else { return format!("{:<23}", "-") };
    let Ok(since_epoch) = t.duration_since(std::time::UNIX_EPOCH) else { return format!("{:<23}", "-") };
    let secs = since_epoch.as_secs() as libc::time_t;
    // SAFETY: localtime_r writes only the `tm` it is given.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&secs, &mut tm) }.is_null() {
        return format!("{:<23}", "-");
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:03}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        since_epoch.subsec_millis()
    )
}

/// [`render`], with the kind in colour and the cause highlighted, when `color`.
fn render_colored(r: &EventRecord, color: bool) -> String {
    let line = render(r);
    if !color {
        return line;
    }
    let (head, cause) = match line.split_once("  <- ") {
        Some((h, c)) => (h.to_string(), Some(c.to_string())),
        None => (line.clone(), None),
    };
    let code = match r.event.as_str() {
        "reset_sent" => "35",
        "reset_received" => "31",
        _ => "33",
    };
    let width = head.find(' ').unwrap_or(head.len());
    let mut out = format!("\x1b[1;{code}m{}\x1b[0m{}", &head[..width], &head[width..]);
    if let Some(c) = cause {
        out.push_str(&format!("  \x1b[36m<- {c}\x1b[0m"));
    }
    out
}

/// One line: what, who, with whom, how, and who caused it.
pub fn render(r: &EventRecord) -> String {
    let what = match (&r.kind, &r.reason) {
        (Some(kind), _) => kind.clone(),
        (None, Some(reason)) => format!("{} ({reason})", r.event),
        (None, None) => r.event.clone(),
    };
    let who = if r.comm.is_empty() { "-".to_string() } else { format!("{}[{}]", r.comm, r.pid) };
    let mut line = format!(
        "{:<22} {:<24} {:<7} {} -> {}",
        what,
        who,
        if r.role.is_empty() { "-" } else { &r.role },
        r.local,
        r.remote
    );
    let o = &r.owner;
    if !o.pod.is_empty() {
        line.push_str(&format!(" pod={}/{} container={}", o.namespace, o.pod, o.container));
    }
    if !o.container_id.is_empty() {
        line.push_str(&format!(" container_id={}", o.container_id));
    }
    if let Some(f) = &r.facts {
        let duration = if f.duration_seconds < 1.0 {
            format!("{:.3}ms", f.duration_seconds * 1e3)
        } else {
            format!("{:.3}s", f.duration_seconds)
        };
        line.push_str(&format!(
            " dur={duration} rx={}B tx={}B rtt={}us retrans={} closed-by={}",
            f.bytes_received, f.bytes_sent, f.srtt_us, f.retransmits, f.close_initiator
        ));
    }
    if let Some(h) = &r.http {
        line.push_str(&format!(" http={}: {}", h.stage, h.summary));
    }
    if let Some(c) = &r.cause {
        line.push_str(&format!("  <- {}", c.summary));
    }
    line
}
