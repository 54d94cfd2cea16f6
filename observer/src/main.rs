mod cli;

use clap::Parser as _;
use cli::{Cli, Command};

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => {
            // One malloc arena: glibc gives each thread its own, and the threads that parse the
            // kernel's BTF at start-up would keep 15-25 MB resident in theirs for good. The
            // daemon's few threads do not contend enough on the allocator to need more.
            // SAFETY: mallopt before any other thread exists.
            unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
            run_daemon(args)
        }
        Command::Status(args) => cli::status::run(args),
        Command::Events(args) => cli::events::run(args),
        Command::Top(args) => cli::top::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("observer: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_daemon(args: cli::run::RunArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(cli::run::run(args)))
}
