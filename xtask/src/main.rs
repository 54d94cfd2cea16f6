//! `cargo xtask`: observer's set-up, build, run, test and bench tasks.
mod bench;
mod build;
mod cmd;
mod image;
mod incident;
mod lint;
mod run;
mod setup;
mod test;
mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "observer's set-up, build, run, test and bench tasks"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building the eBPF programs needs (Debian packages, bpf-linker, the
    /// `debian-web` rustup toolchain) and mount tracefs. Does nothing when all is present.
    Setup,
    /// Set up, then build the daemon (which builds and embeds the eBPF programs).
    Build(build::Args),
    /// Set up, build, then run `observer run ARGS...` in the foreground.
    Run(run::Args),
    /// Set up, then run the workspace's tests (as root: they load eBPF programs), then the
    /// unit tests again as an unprivileged user.
    Test(test::Args),
    /// Set up, then check formatting (`cargo fmt --check`) and lints (`cargo clippy -D warnings`).
    Lint,
    /// Set up, build the daemon (release), then run the benchmarks (as root) and write
    /// BENCHMARKS.md; `--quick` for a short trial run.
    Bench(bench::Args),
    /// Set up, build the daemon (release), then write its container image as an OCI image
    /// archive (also a `docker save` archive) without a registry or a container engine:
    /// the binary and exactly what it links, reproducibly.
    Image(image::Args),
    /// Set up, build, then reproduce the README's incident (nginx, a Go backend that cuts,
    /// closes and aborts, a Go client that retries) in a network namespace of its own, with a
    /// daemon observing it on 127.0.0.1:9645 and Prometheus on 127.0.0.1:9090, until Ctrl-C.
    Incident(incident::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Setup => setup::setup().map(|_| ExitCode::SUCCESS),
        Task::Build(args) => build::build(args).map(|()| ExitCode::SUCCESS),
        Task::Run(args) => run::run(args).map(|()| ExitCode::SUCCESS),
        Task::Test(args) => test::test(args),
        Task::Lint => lint::lint().map(|()| ExitCode::SUCCESS),
        Task::Bench(args) => bench::bench(args),
        Task::Image(args) => image::image(args).map(|()| ExitCode::SUCCESS),
        Task::Incident(args) => incident::incident(args).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // Not `{e:?}`: with RUST_BACKTRACE set that adds a backtrace nobody needs here.
            eprintln!("cargo xtask: error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("    caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
