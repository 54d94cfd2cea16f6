//! `cargo xtask bench [--quick | --cost]`: sets up, builds the release daemon, installs the tools the
//! churn benchmark compares with, then runs the benchmarks (the `observer-bench` crate) on it.
use std::{
    path::{Path, PathBuf},
    process::{ExitCode, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::{cmd, setup};

/// The tools the churn benchmark runs side by side with the daemon.
const TOOLS: &[&str] = &["bpftrace", "libbpf-tools"];

#[derive(clap::Args)]
pub struct Args {
    /// Short runs (seconds instead of minutes) to try the benchmark out. Writes
    /// target/bench/results-quick.json and target/bench/BENCHMARKS-quick.md, not BENCHMARKS.md.
    #[arg(long)]
    pub quick: bool,
    /// Only regenerate the report from the last run's results (target/bench/results.json, or
    /// results-quick.json with --quick).
    #[arg(long)]
    pub report_only: bool,
    /// Benchmark this observer binary instead of building one (e.g. another revision's).
    #[arg(long, value_name = "PATH")]
    pub observer: Option<PathBuf>,
    /// Only what each kernel program costs (ns per run and per connection under the churn load,
    /// every back end and bpftrace; about two minutes): printed and written to
    /// target/bench/cost.json, BENCHMARKS.md left alone. For working on the kernel programs.
    #[arg(long, conflicts_with = "report_only")]
    pub cost: bool,
}

pub fn bench(args: Args) -> Result<ExitCode> {
    let root = cmd::workspace_root()?;
    let mut bench = vec![format!("--root={}", root.display())];
    if args.quick {
        bench.push("--quick".into());
    }
    if args.cost {
        bench.push("--cost".into());
    }
    let invoked =
        std::iter::once("cargo xtask bench".to_string()).chain(std::env::args().skip(2)).collect::<Vec<_>>().join(" ");
    bench.push(format!("--command={invoked}"));
    if args.report_only {
        bench.push("--report-only".into());
        return run_bench(&root, &std::env::var_os("PATH").unwrap_or_default(), &bench);
    }
    if !cmd::is_root() {
        eprintln!(
            "observer bench loads eBPF programs and creates network namespaces: run it as root (sudo -E cargo xtask bench)"
        );
        return Ok(ExitCode::FAILURE);
    }
    setup::install_missing(TOOLS, "observer bench", "the tools the churn benchmark compares with")?;
    let path = match args.observer {
        Some(observer) => {
            bench.push(format!("--observer={}", observer.display()));
            std::env::var_os("PATH").unwrap_or_default()
        }
        None => {
            let ready = setup::setup()?;
            let (exe, display) = build_observer(&ready)?;
            if let Some(target) = exe.parent().and_then(Path::parent) {
                bench.push(format!("--target-dir={}", target.display()));
            }
            if let Some(target) = exe.parent().and_then(Path::parent).filter(|_| !args.cost) {
                // The in-process benchmarks of the same source, first (about a minute).
                let micro = run_micro(&ready, args.quick)?;
                bench.push(format!("--criterion-dir={}", target.join("criterion").display()));
                bench.push(format!("--micro-command={micro}"));
            }
            bench.push(format!("--observer={}", exe.display()));
            bench.push(format!("--build-command={display}"));
            ready.path
        }
    };
    run_bench(&root, &path, &bench)
}

/// `cargo run --release -p observer-bench -- ARGS`, with its exit status.
fn run_bench(root: &Path, path: &std::ffi::OsStr, args: &[String]) -> Result<ExitCode> {
    let mut cargo = cmd::cargo_command(root, path);
    cargo.args(["run", "--quiet", "--release", "-p", "observer-bench", "--"]).args(args);
    println!("observer bench: {}", cmd::display(&cargo));
    let status = cmd::status(&mut cargo)?;
    Ok(ExitCode::from(u8::try_from(cmd::exit_code(status)).unwrap_or(1)))
}

/// `cargo bench -p observer --bench pipeline` (criterion; shorter with --quick); returns the
/// command as run.
fn run_micro(ready: &setup::Ready, quick: bool) -> Result<String> {
    let mut cargo = cmd::cargo_command(&ready.root, &ready.path);
    cargo.args(["bench", "-p", "observer", "--bench", "pipeline"]);
    if quick {
        cargo.args(["--", "--warm-up-time", "1", "--measurement-time", "2"]);
    }
    println!("observer bench: {}", cmd::display(&cargo));
    cmd::run(&mut cargo)?;
    // As a reader would type it (cargo's own path is of no interest in the report).
    let quick = if quick { " -- --warm-up-time 1 --measurement-time 2" } else { "" };
    Ok(format!("cargo bench -p observer --bench pipeline{quick}"))
}

/// `cargo build --release -p observer`, with the toolchain `setup` found; the binary's path
/// comes from cargo's own JSON messages (which honour every target-dir setting).
fn build_observer(ready: &setup::Ready) -> Result<(PathBuf, String)> {
    let mut cargo = cmd::cargo_command(&ready.root, &ready.path);
    cargo.args(["build", "--release", "-p", "observer", "--message-format=json-render-diagnostics"]);
    let display = cmd::display(&cargo);
    println!("observer bench: {display}");
    let out = cargo
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("could not start `{display}`"))?;
    if !out.status.success() {
        bail!("`{display}` failed ({})", cmd::describe(out.status));
    }
    let exe = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "observer")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("`{display}` reported no observer executable"))?;
    Ok((exe, display.replace(" --message-format=json-render-diagnostics", "")))
}
