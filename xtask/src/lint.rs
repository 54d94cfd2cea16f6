//! `cargo xtask lint`: the formatting and lint gates CI applies (`.ci/run` calls it first).
use anyhow::Result;

use crate::{cmd, setup};

pub fn lint() -> Result<()> {
    // observer's build script builds the eBPF programs, so clippy needs the same set-up as a
    // build.
    let ready = setup::setup()?;
    for (tool, component) in [("fmt", "rustfmt"), ("clippy", "clippy")] {
        let mut version = cmd::cargo_command(&ready.root, &ready.path);
        version.args([tool, "--version"]);
        if !cmd::output(&mut version)?.status.success() {
            anyhow::bail!(
                "`cargo {tool}` is not installed with this toolchain: `rustup component add {component}` \
                 (rustup's stable toolchain ships it where the Rust project's servers can be reached)"
            );
        }
    }
    let mut fmt = cmd::cargo_command(&ready.root, &ready.path);
    // Every workspace member, the eBPF crate included (rustfmt does not compile).
    fmt.args(["fmt", "--all", "--check"]);
    println!("observer: {}", cmd::display(&fmt));
    cmd::run(&mut fmt).map_err(|e| e.context("formatting differs from rustfmt.toml: run `cargo fmt --all`"))?;
    let mut clippy = cmd::cargo_command(&ready.root, &ready.path);
    // observer-ebpf only builds for the BPF target; observer's build.rs builds it.
    clippy.args(["clippy", "--workspace", "--exclude", "observer-ebpf", "--all-targets", "--", "-D", "warnings"]);
    println!("observer: {}", cmd::display(&clippy));
    cmd::run(&mut clippy).map_err(|e| e.context("clippy found warnings (the workspace lints are in Cargo.toml)"))?;
    println!("observer: lint: rustfmt and clippy are clean");
    Ok(())
}
