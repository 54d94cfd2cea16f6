//! `cargo xtask test [--kernel DEB] [-- ARGS...]`: the workspace's tests, as root.
use std::{process::ExitCode, time::Duration};

use anyhow::Result;

use crate::{cmd, setup, vm};

#[derive(clap::Args)]
pub struct Args {
    /// Instead of the whole suite on this machine's kernel, run the end-to-end suite inside QEMU
    /// on a Debian kernel: a version (`6.1`, `6.12`: the newest cloud kernel of that series in
    /// apt's lists) or a package name (`linux-image-6.1.0-56-cloud-amd64`). ARGS then go to the
    /// e2e test binary (a test-name filter, `--exact`, ...).
    #[arg(long, value_name = "DEB")]
    pub kernel: Option<String>,
    /// With --kernel: fail if the VM has not finished the suite after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 2400, requires = "kernel")]
    pub vm_timeout: u64,
    /// Passed to `cargo test` (after `--`; a second `--` reaches the test binaries); with
    /// --kernel, to the e2e test binary.
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
    if let Some(kernel) = &args.kernel {
        return vm::test(
            &ready,
            vm::Options {
                kernel,
                test_args: &args.args,
                timeout: Duration::from_secs(args.vm_timeout),
            },
        );
    }
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
