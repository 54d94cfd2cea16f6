mod cli;

use cli::{Command, config, logging::LogFormat};

fn main() -> std::process::ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let parsed = match config::parse(&args) {
        Ok(parsed) => parsed,
        Err(config::Error::Usage(e)) => e.exit(),
        Err(config::Error::Config(e)) => {
            eprintln!("observer: error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let format = match &parsed.cli.command {
        Command::Run(args) => args.log_format,
        _ => LogFormat::Text,
    };
    cli::logging::init(format);
    let result = match parsed.cli.command {
        Command::Run(args) => {
            // One malloc arena: glibc gives each thread its own, and the threads that parse the
            // kernel's BTF at start-up would keep 15-25 MB resident in theirs for good. The
            // daemon's few threads do not contend enough on the allocator to need more.
            // SAFETY: mallopt before any other thread exists.
            unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
            run_daemon(args, parsed.config)
        }
        Command::Status(args) => cli::status::run(args),
        Command::Events(args) => cli::events::run(args),
        Command::Top(args) => cli::top::run(args),
        Command::Completions(args) => cli::docs::completions(args),
        Command::Man => cli::docs::man(),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // A JSON log stays JSON to its last line.
        Err(e) if format == LogFormat::Json => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("observer: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_daemon(
    args: cli::run::RunArgs,
    config: std::collections::BTreeMap<String, observer::api::ConfigSetting>,
) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(cli::run::run(args, config)))
}
