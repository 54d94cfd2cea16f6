//! `cargo xtask lint`: the formatting and lint gates CI applies (`.ci/run` calls it first).
use anyhow::Result;

use crate::{cmd, setup};

pub fn lint() -> Result<()> {
    // observer's build script builds the eBPF programs, so clippy needs the same set-up as a
    // build.
    let ready = setup::setup()?;
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
