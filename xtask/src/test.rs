//! `cargo xtask test [-- ARGS...]`: the workspace's tests, as root.
use std::process::ExitCode;

use anyhow::Result;

use crate::{cmd, setup};

#[derive(clap::Args)]
pub struct Args {
    /// Passed to `cargo test` (after `--`; a second `--` reaches the test binaries).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    pub args: Vec<String>,
}

pub fn test(args: Args) -> Result<ExitCode> {
    // Privileged tests must never silently pass (or skip) as an ordinary user.
    if !cmd::is_root() {
        eprintln!(
            "observer tests load eBPF programs and create network namespaces: \
             run them as root (sudo -E cargo xtask test)"
        );
        return Ok(ExitCode::FAILURE);
    }
    let ready = setup::setup()?;
    let mut cargo = cmd::cargo_command(&ready.root, &ready.path);
    // observer-ebpf only builds for the BPF target; observer's build.rs builds it.
    cargo.args(["test", "--workspace", "--exclude", "observer-ebpf"]);
    cargo.args(&args.args);
    println!("observer: {}", cmd::display(&cargo));
    let status = cmd::status(&mut cargo)?;
    if !status.success() {
        eprintln!(
            "observer: `{}` failed ({})",
            cmd::display(&cargo),
            cmd::describe(status)
        );
    }
    Ok(ExitCode::from(
        u8::try_from(cmd::exit_code(status)).unwrap_or(1),
    ))
}
