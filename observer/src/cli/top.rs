//! `observer top`: the rows with the most resets, premature closes, closes or new connections per
//! second, as the
//! daemon computes them (`/api/v1/top`); the command never computes rates itself.
//!
//! On a terminal: a table redrawn in place every `--interval` (alternate screen; keys `r`, `o`,
//! `p`, `c`, `n` sort, `q` quits). Not on a terminal (a pipe, a file): plain text without escape
//! codes, a new table per refresh (or one with `--once`). `--json`: one report per line.

use std::{
    io::{IsTerminal as _, Write as _},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Args;
use comfy_table::{CellAlignment, ContentArrangement, Table, presets};
use crossterm::{
    cursor, event, execute, queue,
    terminal::{self, ClearType},
};
use observer::api::{TOP_PATH, TopReport, TopRow, TopSort};

#[derive(Debug, Args)]
pub struct TopArgs {
    /// Base URL of a running daemon.
    #[arg(long, value_name = "URL", default_value_t = format!("http://127.0.0.1:{}", super::DEFAULT_PORT), env = "OBSERVER_ENDPOINT")]
    pub endpoint: String,
    /// The rates' interval and how often the table is refreshed (1s to 60s; the daemon keeps
    /// a snapshot per second, so intervals are rounded up to whole seconds).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_interval)]
    pub interval: Duration,
    /// Sort by: resets_in, resets_out, premature, closes or opened (highest first).
    #[arg(long, value_name = "KEY", default_value = "resets_in", value_parser = parse_sort)]
    pub sort: TopSort,
    /// At most this many rows (on a terminal, also at most what fits).
    #[arg(long, value_name = "N", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub limit: u32,
    /// Print one table (or report) and exit.
    #[arg(long)]
    pub once: bool,
    /// The daemon's report as JSON, one document per line per refresh.
    #[arg(long)]
    pub json: bool,
    /// How long to wait for the daemon's answer.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_timeout)]
    pub timeout: Duration,
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .ok()
        .filter(|d| (Duration::from_secs(1)..=Duration::from_secs(60)).contains(d))
        .ok_or_else(|| format!("`{s}` is not a duration from 1s to 60s (e.g. 2s, 1m)"))
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("`{s}` is not a duration (e.g. 500ms, 5s)"))
}

fn parse_sort(s: &str) -> Result<TopSort, String> {
    TopSort::parse(s).ok_or_else(|| format!("`{s}` is not one of {}", TopSort::allowed()))
}

pub fn run(args: TopArgs) -> anyhow::Result<()> {
    let terminal = std::io::stdout().is_terminal();
    if terminal && !args.once && !args.json {
        return interactive(&args);
    }
    let mut stdout = std::io::stdout().lock();
    loop {
        let started = Instant::now();
        let report = fetch(&args, args.sort, args.limit)?;
        let text = if args.json {
            format!("{}\n", serde_json::to_string(&report).context("encoding the report")?)
        } else {
            format!("{}\n{}\n", heading(&report, None), table(&report, None))
        };
        // A closed pipe (`| head`) ends the command quietly.
        if stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()).is_err() || args.once {
            return Ok(());
        }
        if !args.json {
            let _ = stdout.write_all(b"\n");
        }
        std::thread::sleep(args.interval.saturating_sub(started.elapsed()));
    }
}

/// One report from the daemon.
fn fetch(args: &TopArgs, sort: TopSort, limit: u32) -> anyhow::Result<TopReport> {
    let path = format!("{TOP_PATH}?interval={}ms&sort={}&limit={limit}", args.interval.as_millis(), sort.as_str());
    let body = super::get(&args.endpoint, &path, args.timeout)?;
    serde_json::from_str(&body)
        .with_context(|| format!("{}{TOP_PATH} did not answer with observer's top JSON", args.endpoint))
}

/// Restores the terminal however the table ends (an error, a panic).
struct Screen;

impl Screen {
    fn enter() -> anyhow::Result<Self> {
        terminal::enable_raw_mode().context("setting the terminal to raw mode")?;
        let screen = Self;
        execute!(std::io::stdout(), terminal::EnterAlternateScreen, cursor::Hide).context("drawing on the terminal")?;
        Ok(screen)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = execute!(std::io::stdout(), cursor::Show, terminal::LeaveAlternateScreen);
        let _ = terminal::disable_raw_mode();
    }
}

/// The table redrawn in place until `q` (or Esc, Ctrl-C); `r`, `o`, `p`, `c`, `n` change the sort.
fn interactive(args: &TopArgs) -> anyhow::Result<()> {
    let screen = Screen::enter()?;
    let mut sort = args.sort;
    let result = (|| loop {
        // A terminal that does not say its size (0 × 0) gets a common one.
        let (width, height) = terminal::size().ok().filter(|&(w, h)| w > 0 && h > 0).unwrap_or((120, 40));
        // The heading, the table's header and a blank line take three lines.
        let fits = u32::from(height.saturating_sub(3)).clamp(1, args.limit);
        let report = fetch(args, sort, fits)?;
        let mut out = std::io::stdout().lock();
        queue!(out, cursor::MoveTo(0, 0), terminal::Clear(ClearType::All)).context("drawing on the terminal")?;
        let text = format!("{}\n{}", heading(&report, Some(sort)), table(&report, Some(width)));
        // Raw mode: a line feed does not return the carriage.
        for line in text.lines() {
            queue!(out, crossterm::style::Print(line), cursor::MoveToNextLine(1)).context("drawing on the terminal")?;
        }
        out.flush().context("drawing on the terminal")?;
        drop(out);
        let next = Instant::now() + args.interval;
        loop {
            let left = next.saturating_duration_since(Instant::now());
            if left.is_zero() || !event::poll(left).context("reading the keyboard")? {
                break;
            }
            if let event::Event::Key(key) = event::read().context("reading the keyboard")? {
                if key.kind != event::KeyEventKind::Press {
                    continue;
                }
                let ctrl_c =
                    key.modifiers.contains(event::KeyModifiers::CONTROL) && key.code == event::KeyCode::Char('c');
                let chosen = match key.code {
                    _ if ctrl_c => return Ok(()),
                    event::KeyCode::Char('q') | event::KeyCode::Esc => return Ok(()),
                    event::KeyCode::Char('r') => TopSort::ResetsIn,
                    event::KeyCode::Char('o') => TopSort::ResetsOut,
                    event::KeyCode::Char('p') => TopSort::Premature,
                    event::KeyCode::Char('c') => TopSort::Closes,
                    event::KeyCode::Char('n') => TopSort::Opened,
                    _ => continue,
                };
                sort = chosen;
                break;
            }
        }
    })();
    drop(screen);
    result
}

/// `observer top: 12 rows, rates over 2.0s, sorted by resets_in` (and the keys on a terminal).
fn heading(report: &TopReport, keys: Option<TopSort>) -> String {
    let shown = if report.total_rows as usize > report.rows.len() {
        format!("{} of {} rows", report.rows.len(), report.total_rows)
    } else {
        format!("{} rows", report.rows.len())
    };
    let window = if report.window_seconds > 0.0 {
        format!("rates over {:.1}s", report.window_seconds)
    } else {
        "no rates yet (the daemon just started)".to_string()
    };
    let mut line = format!("observer top: {shown}, {window}, sorted by {}", report.sort);
    if keys.is_some() {
        line.push_str("   (sort: r resets in, o resets out, p premature, c closes, n new; q quits)");
    }
    line
}

/// The rows as a table without borders or escape codes; `width` on a terminal.
fn table(report: &TopReport, width: Option<u16>) -> String {
    let mut t = Table::new();
    t.load_style(presets::NOTHING);
    match width {
        Some(w) => t.set_content_arrangement(ContentArrangement::Dynamic).set_width(w),
        None => t.set_content_arrangement(ContentArrangement::Disabled),
    };
    t.set_header([
        "COMM",
        "ROLE",
        "PEER",
        "PORT",
        "POD",
        "RST_IN/s",
        "RST_OUT/s",
        "PREMATURE/s",
        "CLOSES/s",
        "NEW/s",
        "PREMATURE BY KIND",
    ]);
    for r in &report.rows {
        t.add_row(cells(r));
    }
    for column in 5..10 {
        if let Some(c) = t.column_mut(column) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    t.to_string()
}

fn cells(r: &TopRow) -> [String; 11] {
    let o = &r.owner;
    let pod = if !o.pod.is_empty() {
        format!("{}/{}/{}", o.namespace, o.pod, o.container)
    } else if !o.container_id.is_empty() {
        o.container_id.clone()
    } else {
        "-".to_string()
    };
    let or_dash = |s: &str| if s.is_empty() { "-".to_string() } else { s.to_string() };
    let kinds: Vec<String> = r.premature_by_kind.iter().map(|(k, v)| format!("{k}={}", rate(*v))).collect();
    [
        or_dash(&r.comm),
        or_dash(&r.role),
        r.peer.clone(),
        or_dash(&r.port),
        pod,
        rate(r.resets_in_per_s),
        rate(r.resets_out_per_s),
        rate(r.premature_per_s),
        rate(r.closes_per_s),
        rate(r.opened_per_s),
        kinds.join(" "),
    ]
}

fn rate(v: f64) -> String {
    if v == 0.0 { "0".to_string() } else { format!("{v:.2}") }
}
