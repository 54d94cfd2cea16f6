//! Builds the kernel programs (`observer-ebpf`) with aya-build and embeds them in the binary.
//!
//! Two toolchains can build them (see README "Building"): Debian's `rustc-web` (stable, with a
//! prebuilt BPF `core`), registered with rustup as `debian-web`; or a rustup nightly with
//! `rust-src` (then aya-build adds `-Z build-std=core`). `OBSERVER_EBPF_TOOLCHAIN` picks one;
//! otherwise `debian-web` is used when rustup knows it, else `nightly`.
use std::{env, process::Command};

use anyhow::{Context as _, bail};

/// Crates of the eBPF build that use `#![feature]`. Naming them (rather than RUSTC_BOOTSTRAP=1)
/// unlocks features on a stable compiler without asking aya-build for `-Z build-std`, which
/// Debian's toolchain neither needs nor supports.
const UNSTABLE_CRATES: &str = "aya_ebpf,aya_ebpf_bindings,aya_ebpf_cty,aya_ebpf_macros,aya_log_ebpf,aya_log_common,aya_log_ebpf_macros,observer_ebpf,observer_common";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=OBSERVER_EBPF_TOOLCHAIN");
    println!("cargo:rerun-if-changed=../observer-common/src");
    emit_git_revision();

    let toolchain = match env::var("OBSERVER_EBPF_TOOLCHAIN") {
        Ok(t) if !t.is_empty() => t,
        _ => {
            let list = Command::new("rustup")
                .args(["toolchain", "list"])
                .output()
                .context("running `rustup toolchain list` (rustup is needed to build the eBPF programs; run `cargo xtask setup`)")?;
            let list = String::from_utf8_lossy(&list.stdout);
            if list.lines().any(|l| l.starts_with("debian-web")) {
                "debian-web".to_string()
            } else if list.lines().any(|l| l.starts_with("nightly")) {
                "nightly".to_string()
            } else {
                bail!(
                    "no toolchain can build the eBPF programs: run `cargo xtask setup` \
                     (installs Debian's rustc-web and registers it as the rustup toolchain `debian-web`)"
                );
            }
        }
    };
    if toolchain != "nightly" && !toolchain.starts_with("nightly-") {
        // SAFETY: build scripts are single-threaded; the child cargo inherits this.
        unsafe { env::set_var("RUSTC_BOOTSTRAP", UNSTABLE_CRATES) };
    }
    let ebpf = aya_build::Package {
        name: "observer-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../observer-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::Custom(&toolchain))
        .with_context(|| format!("building the eBPF programs with toolchain `{toolchain}` (bpf-linker must be on PATH; `cargo xtask setup` installs it)"))
}

/// `observer_build_info{revision}`: the commit being built, when this is a git checkout.
fn emit_git_revision() {
    let revision = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=OBSERVER_GIT_REVISION={revision}");
    // HEAD names the branch; a commit moves the branch's ref, not HEAD: watch both.
    println!("cargo:rerun-if-changed=../.git/HEAD");
    if let Ok(head) = std::fs::read_to_string("../.git/HEAD")
        && let Some(reference) = head.trim().strip_prefix("ref: ")
    {
        println!("cargo:rerun-if-changed=../.git/{reference}");
        println!("cargo:rerun-if-changed=../.git/packed-refs");
    }
}
