//! `observer events`: the daemon's event log (resets and premature closes, with their cause).

use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use observer::api::{EVENTS_PATH, EventRecord, EventsPage};

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Base URL of a running daemon.
    #[arg(long, value_name = "URL", default_value_t = format!("http://127.0.0.1:{}", super::DEFAULT_PORT), env = "OBSERVER_ENDPOINT")]
    pub endpoint: String,
    /// Keep printing new events as they arrive (Ctrl-C to stop).
    #[arg(long, short)]
    pub follow: bool,
    /// One JSON object per line instead of text.
    #[arg(long)]
    pub json: bool,
    /// Only the last N events already logged (the log holds the latest 4096).
    #[arg(long, value_name = "N", default_value_t = 50)]
    pub last: usize,
}

pub fn run(args: EventsArgs) -> anyhow::Result<()> {
    let fetch = |since: u64, limit: usize| -> anyhow::Result<EventsPage> {
        let path = format!("{EVENTS_PATH}?since={since}&limit={limit}");
        let body = super::get(&args.endpoint, &path)?;
        serde_json::from_str(&body)
            .with_context(|| format!("{}{path} did not answer with observer's events JSON", args.endpoint))
    };
    // Start `last` records before the newest.
    let mut since = fetch(0, 0)?.latest.saturating_sub(args.last as u64);
    loop {
        let page = fetch(since, 1000)?;
        for record in &page.events {
            if args.json {
                println!("{}", serde_json::to_string(record).context("encoding an event")?);
            } else {
                println!("{}", render(record));
            }
        }
        since = page.next.max(since);
        if !args.follow {
            return Ok(());
        }
        if page.events.is_empty() {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
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
    if let Some(c) = &r.cause {
        line.push_str(&format!("  <- {}", c.summary));
    }
    line
}
