//! observer's benchmarks, run side by side on this machine, with raw results in
//! `target/bench/results.json` and the report in `BENCHMARKS.md`. `cargo xtask bench [--quick]`
//! sets the machine up, builds the release daemon and runs this binary with `--observer` and
//! `--root`; run directly it benchmarks the daemon it is given.
//!
//! One run, in this order: start-up (several starts), connection churn (three tools, each run
//! bracketed by runs with nothing attached), scrape latency (1,000 and 10,000 series), then one
//! daemon for the reset storm followed by the soak, with its memory read after start, after the
//! storm and after the soak; last, diagnostics (BPF program costs) that feed no target. All
//! traffic is made by load generator processes (`worker`) in private network namespaces that the
//! daemon is told to watch (`--netns`), so the counts can be checked exactly against what was made.
//!
//! `--quick` shortens everything to try it out and writes `target/bench/results-quick.json` and
//! `target/bench/BENCHMARKS-quick.md`, leaving the published `BENCHMARKS.md` alone.
mod churn;
mod daemon;
mod diagnose;
mod footprint;
mod micro;
mod net;
mod procfs;
mod report;
mod scrape;
mod soak;
mod storm;
mod tools;
mod worker;

use std::{
    fs,
    path::{Path, PathBuf},
    process::ExitCode,
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result};
use clap::Parser;
use daemon::Measured as _;
use observer_testkit::process as cmd;
use serde::{Deserialize, Serialize};

#[derive(Parser)]
#[command(name = "observer-bench", about = "observer's benchmarks: run them (as root) and write BENCHMARKS.md")]
pub struct Args {
    /// Short runs (seconds instead of minutes) to try the benchmark out. Writes
    /// target/bench/results-quick.json and target/bench/BENCHMARKS-quick.md, not BENCHMARKS.md.
    #[arg(long)]
    pub quick: bool,
    /// Only regenerate the report from the last run's results (target/bench/results.json, or
    /// results-quick.json with --quick).
    #[arg(long)]
    pub report_only: bool,
    /// The observer binary to benchmark (`cargo xtask bench` builds the release one, or passes
    /// its own --observer on).
    #[arg(long, value_name = "PATH", required_unless_present_any = ["report_only", "worker"])]
    pub observer: Option<PathBuf>,
    /// How that binary was built, for the report (default: "(prebuilt, --observer PATH)").
    #[arg(long, value_name = "COMMAND")]
    pub build_command: Option<String>,
    /// The repository: where BENCHMARKS.md is written and whose revision the report names.
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub root: PathBuf,
    /// Where `bench/` (results, the daemon's copy, the quick report) goes: default
    /// CARGO_TARGET_DIR, else ROOT/target.
    #[arg(long, value_name = "DIR")]
    pub target_dir: Option<PathBuf>,
    /// The command line the report names (default: how this binary was invoked).
    #[arg(long, value_name = "COMMAND")]
    pub command: Option<String>,
    /// Criterion's output directory after `cargo bench -p observer --bench pipeline` (what
    /// `cargo xtask bench` runs first): its results go into the report. Without it the report
    /// has no in-process section.
    #[arg(long, value_name = "DIR")]
    pub criterion_dir: Option<PathBuf>,
    /// The command that ran those in-process benchmarks, for the report.
    #[arg(long, value_name = "COMMAND", default_value = "cargo bench -p observer --bench pipeline")]
    pub micro_command: String,
    /// Only what each kernel program costs under the churn load (the diagnostics run: every
    /// back end and bpftrace, with the kernel's BPF statistics): printed and written to
    /// target/bench/cost.json; BENCHMARKS.md is left alone.
    #[arg(long, conflicts_with = "report_only")]
    pub cost: bool,
    /// Internal: run as the load generator process named NAME.
    #[arg(long, hide = true, value_name = "NAME")]
    pub worker: Option<String>,
}

/// How long and how hard each benchmark runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// Traffic runs this long before a measured window starts.
    pub warmup_seconds: f64,
    pub startups: usize,
    pub churn_seconds: f64,
    pub churn_rounds: usize,
    pub churn_clients: usize,
    pub churn_servers: usize,
    pub storm_seconds: f64,
    /// Paced storm rates tried first (events per second), each for `storm_sweep_seconds`.
    pub storm_sweep: Vec<f64>,
    pub storm_sweep_seconds: f64,
    pub storm_refused_threads: usize,
    pub storm_linger_threads: usize,
    pub scrapes: usize,
    pub scrape_interval_ms: u64,
    /// Connections per second flowing while scraping.
    pub scrape_background_rate: u64,
    pub soak_seconds: f64,
    pub soak_rate_per_kind: u64,
    pub soak_sample_seconds: f64,
    /// Churn run per tool with the kernel's BPF statistics on, after everything else.
    #[serde(default)]
    pub diagnose_seconds: f64,
}

impl Plan {
    fn new(quick: bool) -> Self {
        let full = Self {
            warmup_seconds: 2.0,
            startups: 10,
            churn_seconds: 10.0,
            churn_rounds: 5,
            churn_clients: 4,
            churn_servers: 4,
            storm_seconds: 20.0,
            storm_sweep: vec![50_000.0, 100_000.0, 150_000.0, 200_000.0, 250_000.0],
            storm_sweep_seconds: 10.0,
            storm_refused_threads: 3,
            storm_linger_threads: 1,
            scrapes: 300,
            scrape_interval_ms: 100,
            scrape_background_rate: 5_000,
            soak_seconds: 600.0,
            soak_rate_per_kind: 1_000,
            soak_sample_seconds: 10.0,
            diagnose_seconds: 10.0,
        };
        if !quick {
            return full;
        }
        Self {
            warmup_seconds: 1.0,
            startups: 3,
            churn_seconds: 4.0,
            churn_rounds: 1,
            storm_seconds: 5.0,
            storm_sweep_seconds: 3.0,
            scrapes: 40,
            soak_seconds: 30.0,
            soak_sample_seconds: 5.0,
            diagnose_seconds: 4.0,
            ..full
        }
    }
}

/// What every benchmark needs: the daemon binary and the comparison tools.
pub struct Setup {
    pub observer: PathBuf,
    pub tcplife: PathBuf,
    pub build_command: String,
}

/// One exactness check: a count the daemon reported against what the generator made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    pub what: String,
    pub expected: u64,
    pub got: u64,
}

impl Check {
    pub fn new(what: impl Into<String>, expected: u64, got: u64) -> Self {
        Self { what: what.into(), expected, got }
    }

    pub fn ok(&self) -> bool {
        self.expected == self.got
    }
}

/// Everything one run measured: `results.json`, from which the report is written.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub quick: bool,
    pub command: String,
    pub build_command: String,
    pub machine: procfs::Machine,
    /// `observer_build_info{revision}` of the daemon that ran.
    pub observer_revision: String,
    pub plan: Plan,
    pub worker_command: String,
    pub bpftrace_script: String,
    pub startup: footprint::Startup,
    pub churn: churn::Churn,
    pub scrape: scrape::Scrape,
    pub storm: storm::Storm,
    pub soak: soak::Soak,
    pub footprint: footprint::Footprint,
    /// The in-process benchmarks of the userspace hot path (criterion).
    #[serde(default)]
    pub micro: micro::Micro,
    /// Where the cost goes (measured after everything else, not part of any number above).
    #[serde(default)]
    pub diagnostics: diagnose::Diagnostics,
    /// Log lines the storm/soak daemon wrote (warnings would show here).
    pub daemon_log: Vec<String>,
    /// Other processes holding BPF programs before the run, at the storm's start and at the
    /// soak's end (`when: pid comm, ...`).
    #[serde(default)]
    pub other_bpf: Vec<String>,
}

fn main() -> ExitCode {
    match bench(Args::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("observer bench: error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("    caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn bench(args: Args) -> Result<ExitCode> {
    if let Some(name) = &args.worker {
        worker::main(name)?;
        return Ok(ExitCode::SUCCESS);
    }
    let root = fs::canonicalize(&args.root).with_context(|| format!("--root {}", args.root.display()))?;
    let target = args.target_dir.clone().map_or_else(|| target_dir(&root), |dir| root.join(dir));
    let (results_name, report_path) =
        if args.quick { ("results-quick.json", None) } else { ("results.json", Some(root.join("BENCHMARKS.md"))) };
    if args.report_only {
        let path = target.join("bench").join(results_name);
        let text = fs::read_to_string(&path)
            .with_context(|| format!("reading {} (run `cargo xtask bench` first)", path.display()))?;
        let results: Results = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        write_report(&results, &target, report_path.as_deref())?;
        return Ok(ExitCode::SUCCESS);
    }
    if !cmd::is_root() {
        eprintln!(
            "observer bench loads eBPF programs and creates network namespaces: run it as root (sudo -E cargo xtask bench)"
        );
        return Ok(ExitCode::FAILURE);
    }
    let tcplife = tools::tcplife_path()?;
    let path = args.observer.clone().context("--observer PATH is required")?;
    let built = fs::canonicalize(&path).with_context(|| format!("--observer {}", path.display()))?;
    let build_command =
        args.build_command.clone().unwrap_or_else(|| format!("(prebuilt, --observer {})", built.display()));
    let command = args.command.clone().unwrap_or_else(|| std::env::args().collect::<Vec<_>>().join(" "));
    // The daemon is started many times over the run; a copy keeps every start on this binary
    // even if something rebuilds target/release meanwhile.
    let dir = target.join("bench");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // Copied beside, then renamed over: `--observer target/bench/observer` must not truncate
    // its own source.
    let observer = dir.join("observer");
    let staging = dir.join("observer.new");
    fs::copy(&built, &staging)
        .and_then(|_| fs::rename(&staging, &observer))
        .with_context(|| format!("copying {} to {}", built.display(), observer.display()))?;
    // Read first: a missing criterion result should fail now, not after 25 minutes.
    let micro = match &args.criterion_dir {
        Some(dir) => micro::read(&root.join(dir), args.micro_command.clone())?,
        None => micro::Micro::default(),
    };
    let setup = Setup { observer, tcplife, build_command };
    let plan = Plan::new(args.quick);
    if args.cost {
        let diagnostics = diagnose::run(&setup, &plan).context("kernel program costs")?;
        print!("{}", report::program_costs(&diagnostics));
        let path = dir.join("cost.json");
        fs::write(&path, serde_json::to_string_pretty(&diagnostics)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("observer bench: raw results in {}", path.display());
        return Ok(ExitCode::SUCCESS);
    }
    let mut results = run(&setup, &plan, &root, args.quick, command)?;
    results.micro = micro;

    let path = dir.join(results_name);
    fs::write(&path, serde_json::to_string_pretty(&results)?).with_context(|| format!("writing {}", path.display()))?;
    println!("observer bench: raw results in {}", path.display());
    write_report(&results, &target, report_path.as_deref())?;
    Ok(ExitCode::SUCCESS)
}

fn write_report(results: &Results, target: &Path, published: Option<&Path>) -> Result<()> {
    let text = report::markdown(results);
    let path = published.map_or_else(|| target.join("bench").join("BENCHMARKS-quick.md"), Path::to_path_buf);
    fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
    println!("observer bench: report in {}", path.display());
    for line in report::verdicts(results) {
        println!("observer bench: {line}");
    }
    Ok(())
}

fn run(setup: &Setup, plan: &Plan, root: &Path, quick: bool, command: String) -> Result<Results> {
    let machine = procfs::Machine::describe(root);
    println!(
        "observer bench: {} on {} ({} cores, {} MiB, kernel {}); load average now {}",
        if quick { "quick run" } else { "full run (about 25 minutes)" },
        machine.cpu_model,
        machine.cores,
        machine.ram_mib,
        machine.kernel,
        procfs::loadavg()
    );
    let mut other_bpf = Vec::new();
    note_other_bpf(&mut other_bpf, "before the run", &[]);
    let startup = footprint::startup(setup, plan).context("start-up benchmark")?;
    let churn = churn::run(setup, plan).context("churn benchmark")?;
    let scrape = scrape::run(setup, plan).context("scrape benchmark")?;

    // One daemon for storm and soak: the footprint is its memory through that life.
    let mut worker = worker::Worker::spawn("bench-load")?;
    let daemon = daemon::start(&setup.observer, &["--netns".into(), worker.netns.display().to_string()])?;
    note_other_bpf(&mut other_bpf, "at the storm's start", &[daemon.pid]);
    let observer_revision = daemon.metrics()?.revision().unwrap_or_else(|| "unknown".into());
    thread::sleep(Duration::from_secs(1));
    let rss_after_start_kib = daemon.memory_kib()?.0;
    let mut breakdown = vec![("after start".to_string(), procfs::memory_breakdown(daemon.pid)?)];
    let storm = storm::run(plan, &daemon, &mut worker).context("reset storm benchmark")?;
    let rss_after_storm_kib = daemon.memory_kib()?.0;
    breakdown.push(("after the storm".into(), procfs::memory_breakdown(daemon.pid)?));
    println!(
        "observer bench: storm: {} resets made, {:.0} events/s, {} seen, {} lost, daemon {:.1} % of a core per 10,000 events/s; RSS {rss_after_storm_kib} KiB",
        storm.max.resets_made,
        storm.max.events_per_second,
        storm.max.events_seen,
        storm.max.events_lost,
        storm.max.core_percent_per_10k
    );
    let soak = soak::run(plan, &daemon, &mut worker).context("soak benchmark")?;
    let (rss_after_soak_kib, peak_kib) = daemon.memory_kib()?;
    breakdown.push(("after the soak".into(), procfs::memory_breakdown(daemon.pid)?));
    println!(
        "observer bench: soak: {:.0} s, {} connections, RSS {} → {} KiB ({:+.1} %), {} lost",
        soak.seconds,
        soak.total.connections(),
        soak.rss_start_kib,
        soak.rss_end_kib,
        soak.rss_growth_percent,
        soak.events_lost
    );
    let footprint = footprint::Footprint {
        daemon_command: daemon.command.clone(),
        rss_after_start_kib,
        rss_after_storm_kib,
        rss_after_soak_kib,
        peak_kib,
        breakdown,
    };
    let daemon_log = daemon.log();
    note_other_bpf(&mut other_bpf, "at the soak's end", &[daemon.pid]);
    daemon.stop()?;
    drop(worker);

    let diagnostics = diagnose::run(setup, plan).context("diagnostics")?;
    for t in &diagnostics.churn_programs {
        println!(
            "observer bench: diagnostics: {}'s kernel programs take {:.0} ns per churn connection",
            t.tool, t.ns_per_connection
        );
    }

    Ok(Results {
        quick,
        command,
        build_command: setup.build_command.clone(),
        machine,
        observer_revision,
        plan: plan.clone(),
        worker_command: "observer-bench --worker NAME (the benchmark binary run again: unshare(CLONE_NEWNET), lo up, traffic on command)".into(),
        bpftrace_script: tools::BPFTRACE_SCRIPT.into(),
        startup,
        churn,
        scrape,
        storm,
        soak,
        footprint,
        micro: micro::Micro::default(),
        diagnostics,
        daemon_log,
        other_bpf,
    })
}

/// Records (and warns about) other processes holding BPF programs at `when`.
fn note_other_bpf(notes: &mut Vec<String>, when: &str, ours: &[u32]) {
    let found = procfs::other_bpf_holders(ours);
    if !found.is_empty() {
        println!(
            "observer bench: warning: {when}, other processes hold BPF programs ({}); on the same hooks they slow the measurements",
            found.join(", ")
        );
        notes.push(format!("{when}: {}", found.join(", ")));
    }
}

/// Exactness of the daemon's counts for traffic `made` by the process named `comm`, between
/// two scrapes. Every kind of connection has a known set of events and series (see
/// [`worker::Tally`]).
pub fn count_checks(before: &daemon::Metrics, after: &daemon::Metrics, made: &worker::Tally, comm: &str) -> Vec<Check> {
    let delta = |name: &str, filter: &[(&str, &str)]| after.sum(name, filter).saturating_sub(before.sum(name, filter));
    let lost = after.events_lost() - before.events_lost();
    let premature =
        |kind: &'static str| delta("observer_tcp_premature_closes_total", &[("comm", comm), ("kind", kind)]);
    vec![
        Check::new("events seen + lost = events made", made.events(), delta("observer_events_total", &[]) + lost),
        Check::new("events lost", 0, lost),
        Check::new("events unattributed", 0, delta("observer_events_unattributed_total", &[])),
        Check::new(
            format!("observer_tcp_closes_total{{comm=\"{comm}\"}}"),
            made.closes(),
            delta("observer_tcp_closes_total", &[("comm", comm)]),
        ),
        Check::new(
            format!("observer_tcp_resets_received_total{{comm=\"{comm}\"}}"),
            made.resets(),
            delta("observer_tcp_resets_received_total", &[("comm", comm)]),
        ),
        Check::new(
            format!("observer_tcp_resets_sent_total{{comm=\"{comm}\"}}"),
            made.linger0 + made.unread,
            delta("observer_tcp_resets_sent_total", &[("comm", comm)]),
        ),
        Check::new(
            "observer_tcp_resets_sent_total{comm=\"\",reason=\"no_socket\"}",
            made.refused,
            delta("observer_tcp_resets_sent_total", &[("comm", ""), ("reason", "no_socket")]),
        ),
        Check::new(format!("premature closes kind=\"refused\" (comm {comm})"), made.refused, premature("refused")),
        Check::new(
            format!("premature closes kind=\"peer_reset\" (comm {comm})"),
            made.linger0 + made.unread,
            premature("peer_reset"),
        ),
        Check::new(
            format!("premature closes kind=\"local_reset\" (comm {comm})"),
            made.linger0,
            premature("local_reset"),
        ),
        Check::new(
            format!("premature closes kind=\"unread_data\" (comm {comm})"),
            made.unread,
            premature("unread_data"),
        ),
    ]
}

/// CARGO_TARGET_DIR, else `<workspace>/target`.
fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        Some(dir) if Path::new(&dir).is_absolute() => PathBuf::from(dir),
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}
