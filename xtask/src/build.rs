//! `cargo xtask build [--release]`.
use anyhow::Result;

use crate::{cmd, setup};

#[derive(clap::Args)]
pub struct Args {
    /// Build with the release profile.
    #[arg(long)]
    pub release: bool,
}

pub fn build(args: Args) -> Result<()> {
    let ready = setup::setup()?;
    cargo_build(&ready, args.release)
}

/// `cargo build -p observer [--release]` in the workspace root, with bpf-linker on PATH.
pub fn cargo_build(ready: &setup::Ready, release: bool) -> Result<()> {
    let mut cargo = cmd::cargo_command(&ready.root, &ready.path);
    cargo.args(["build", "-p", "observer"]);
    if release {
        cargo.arg("--release");
    }
    println!("observer: {}", cmd::display(&cargo));
    cmd::run(&mut cargo)
}
