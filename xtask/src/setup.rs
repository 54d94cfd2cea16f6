//! `cargo xtask setup`: make this machine able to build (and test) the eBPF programs.
//!
//! Two toolchains can build them (see /work/shared/notes/toolchain.md and observer/build.rs):
//! Debian's `rustc-web` (stable, with a prebuilt BPF `core`), registered with rustup as
//! `debian-web` — the one this installs — or a rustup nightly with `rust-src`. Either way
//! `bpf-linker` (built against LLVM 22) must be on PATH.
//!
//! Each check is cheap, so a machine that has everything pays a few process spawns. As root,
//! whatever is missing is installed (one line first says what); otherwise the commands to run are
//! printed and nothing is changed.
use std::{
    collections::HashSet,
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd;

/// Debian's compiler that builds the eBPF crate (not needed with a nightly that has rust-src).
const COMPILER_PACKAGES: &[&str] = &["rustc-web", "cargo-web", "libstd-rust-web-dev-bpf"];
/// LLVM 22 and its link dependencies, to build bpf-linker.
const LLVM_PACKAGES: &[&str] = &["llvm-22-dev", "libpolly-22-dev", "zlib1g-dev", "libzstd-dev"];
/// `protoc`: the CRI client (`k8s-cri`) compiles the kubelet's gRPC proto at build time.
const BUILD_PACKAGES: &[&str] = &["protobuf-compiler"];
/// Used by the tests.
const TEST_PACKAGES: &[&str] = &["bpftool", "iproute2"];
/// Only `cargo xtask test` installs these (`cargo xtask run` does not need them): real container
/// runtimes (containerd with its CRI plugin, runc, Docker), the busybox the test images are made
/// of, Prometheus (`promtool` and a real server), and a Python venv (schema validation of the
/// Kubernetes manifests).
pub const SUITE_PACKAGES: &[&str] =
    &["containerd", "runc", "docker.io", "busybox-static", "prometheus", "nginx-light", "golang-go", "python3-venv"];

const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
const TOOLCHAIN: &str = "debian-web";
const TRACEFS: &str = "/sys/kernel/tracing";

const BPF_LINKER_INSTALL: &[&str] = &["install", "bpf-linker", "--no-default-features", "--features", "llvm-22"];

/// What later steps need: the workspace root and the PATH their children must use (with
/// bpf-linker's directory on it).
pub struct Ready {
    pub root: PathBuf,
    pub path: OsString,
}

enum Compiler {
    Debian,
    Nightly,
}

pub fn setup() -> Result<Ready> {
    let root = cmd::workspace_root()?;
    let is_root = cmd::is_root();
    let mut path = env::var_os("PATH").unwrap_or_default();
    // rustup's proxies (and `cargo install`'s output) live in ~/.cargo/bin: observer's build.rs
    // and aya-build call `rustup`, so children need it on PATH even if this shell lacks it.
    if let Some(bin) = cargo_bin_dir()
        && is_executable(&bin.join("rustup"))
        && !env::split_paths(&path).any(|d| d == bin)
    {
        path = prepend(&bin, &path)?;
    }

    // 1. Debian packages.
    let wanted: Vec<&str> = [COMPILER_PACKAGES, LLVM_PACKAGES, BUILD_PACKAGES, TEST_PACKAGES].concat();
    let installed = installed_packages(&wanted)?;
    let mut missing: Vec<&str> = wanted.iter().copied().filter(|p| !installed.contains(*p)).collect();
    let compiler = if COMPILER_PACKAGES.iter().any(|p| missing.contains(p)) && nightly_has_rust_src(&path) {
        missing.retain(|p| !COMPILER_PACKAGES.contains(p));
        Compiler::Nightly
    } else {
        Compiler::Debian
    };

    // 2. bpf-linker.
    let linker = find_bpf_linker(&path);
    // 3. Debian's compiler as a rustup toolchain (checked even if rustc-web is about to be
    //    installed: linking it is the last step either way).
    let link_missing = matches!(compiler, Compiler::Debian) && !toolchain_linked(&path)?;

    if !is_root && (!missing.is_empty() || linker.is_none() || link_missing) {
        not_root(&missing, linker.is_none(), link_missing);
    }

    if !missing.is_empty() {
        let why = if missing.iter().any(|p| TEST_PACKAGES.contains(p)) {
            "needed to build the eBPF programs and by the tests"
        } else {
            "needed to build the eBPF programs"
        };
        install_missing(&missing, "observer setup", why)?;
    }

    let linker = match linker {
        Some(linker) => linker,
        None => {
            println!(
                "observer setup: installing bpf-linker with `cargo install` against LLVM 22 (links the eBPF programs; takes about a minute)"
            );
            let mut install = Command::new(cmd::cargo());
            install.args(BPF_LINKER_INSTALL).current_dir(&root).env("PATH", prepend(Path::new(LLVM_BIN), &path)?);
            cmd::run(&mut install).context("installing bpf-linker")?;
            find_bpf_linker(&path).with_context(|| {
                format!(
                    "`cargo install bpf-linker` succeeded but bpf-linker is neither on PATH nor in {}",
                    cargo_bin_dir().map_or_else(|| "~/.cargo/bin".to_string(), |d| d.display().to_string())
                )
            })?
        }
    };
    if !linker.on_path {
        // Children (cargo, aya-build's cargo) must find it.
        let dir = linker.path.parent().unwrap_or(Path::new("/"));
        path = prepend(dir, &path)?;
    }

    if link_missing {
        println!(
            "observer setup: linking Debian's compiler in /usr as the rustup toolchain `{TOOLCHAIN}` (observer's build.rs builds the eBPF programs with it)"
        );
        cmd::run(rustup(&path).args(["toolchain", "link", TOOLCHAIN, "/usr"]))?;
    }

    // 4. tracefs (the tracepoint programs attach through it; the daemon mounts it too).
    let tracefs_note = if Path::new(TRACEFS).join("events").is_dir() {
        String::new()
    } else if is_root {
        println!("observer setup: mounting tracefs on {TRACEFS}");
        match cmd::run(Command::new("mount").args(["-t", "tracefs", "tracefs", TRACEFS])) {
            Ok(()) => String::new(),
            Err(e) => {
                eprintln!("observer setup: warning: could not mount tracefs (the daemon will try again): {e:#}");
                ", tracefs not mounted".to_string()
            }
        }
    } else {
        eprintln!(
            "observer setup: warning: tracefs is not mounted (or not readable) at {TRACEFS} (as root: mount -t tracefs tracefs {TRACEFS}; the daemon also mounts it)"
        );
        ", tracefs not mounted".to_string()
    };

    let compiler = match compiler {
        Compiler::Debian => format!("Debian rustc-web as rustup toolchain `{TOOLCHAIN}`"),
        Compiler::Nightly => "rustup nightly with rust-src".to_string(),
    };
    println!("observer setup: toolchain ready ({compiler}, bpf-linker {}{tracefs_note})", linker.path.display());
    Ok(Ready { root, path })
}

/// Which of `packages` dpkg reports as "install ok installed" (one dpkg-query for all).
/// Installs those of `packages` that are missing with apt-get, first printing one line that
/// says who installs what and `why`; checks afterwards that they are installed.
pub fn install_missing(packages: &[&str], who: &str, why: &str) -> Result<()> {
    let installed = installed_packages(packages)?;
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed.contains(*p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !cmd::is_root() {
        bail!("{who} needs the Debian packages {0}; install them as root: apt-get install -y {0}", missing.join(" "));
    }
    println!("{who}: installing Debian packages {} ({why})", missing.join(" "));
    cmd::run(Command::new("apt-get").arg("update"))?;
    cmd::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
    )?;
    let installed = installed_packages(&missing)?;
    let still: Vec<&str> = missing.iter().copied().filter(|p| !installed.contains(*p)).collect();
    if !still.is_empty() {
        bail!("apt-get install finished but {} still not installed", still.join(" "));
    }
    Ok(())
}

fn installed_packages(packages: &[&str]) -> Result<HashSet<String>> {
    // dpkg-query exits 1 when some package is unknown but still reports the others.
    let out = cmd::output(Command::new("dpkg-query").args(["-W", "-f=${Package}\t${Status}\n"]).args(packages))
        .context("observer setup supports Debian-based machines (it installs packages with apt-get)")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(_, status)| status.trim() == "install ok installed")
        .map(|(pkg, _)| pkg.to_string())
        .collect())
}

/// `rustup component list --toolchain nightly --installed` lists rust-src.
fn nightly_has_rust_src(path: &OsString) -> bool {
    rustup(path)
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.starts_with("rust-src")))
}

fn toolchain_linked(path: &OsString) -> Result<bool> {
    let list = cmd::stdout(rustup(path).args(["toolchain", "list"]))
        .context("rustup is needed to build the eBPF programs (https://rustup.rs)")?;
    Ok(list.lines().any(|l| l.starts_with(TOOLCHAIN)))
}

/// `rustup`, looked up in (and run with) `path`.
fn rustup(path: &OsString) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.env("PATH", path);
    cmd
}

struct Linker {
    path: PathBuf,
    on_path: bool,
}

/// bpf-linker on `path`, else in $CARGO_HOME/bin or ~/.cargo/bin.
fn find_bpf_linker(path: &OsString) -> Option<Linker> {
    if let Some(found) = env::split_paths(path).map(|d| d.join("bpf-linker")).find(|p| is_executable(p)) {
        return Some(Linker { path: found, on_path: true });
    }
    let found = cargo_bin_dir()?.join("bpf-linker");
    is_executable(&found).then_some(Linker { path: found, on_path: false })
}

fn cargo_bin_dir() -> Option<PathBuf> {
    env::var_os("CARGO_HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").filter(|h| !h.is_empty()).map(|h| Path::new(&h).join(".cargo")))
        .map(|h| h.join("bin"))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn prepend(dir: &Path, path: &OsString) -> Result<OsString> {
    env::join_paths(std::iter::once(dir.to_path_buf()).chain(env::split_paths(path)))
        .with_context(|| format!("cannot put {} on PATH", dir.display()))
}

/// Not root and something is missing: say what to run, change nothing, exit 1.
fn not_root(missing: &[&str], linker_missing: bool, link_missing: bool) -> ! {
    let mut steps = Vec::new();
    if !missing.is_empty() {
        steps.push("sudo apt-get update".to_string());
        steps.push(format!(
            "sudo DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {}",
            missing.join(" ")
        ));
    }
    if linker_missing {
        steps.push(format!("PATH={LLVM_BIN}:$PATH cargo {}", BPF_LINKER_INSTALL.join(" ")));
    }
    if link_missing {
        steps.push(format!("rustup toolchain link {TOOLCHAIN} /usr"));
    }
    let mut what = Vec::new();
    if !missing.is_empty() {
        what.push(format!("Debian packages {}", missing.join(" ")));
    }
    if linker_missing {
        what.push("bpf-linker".to_string());
    }
    if link_missing {
        what.push(format!("the rustup toolchain `{TOOLCHAIN}`"));
    }
    eprintln!("observer setup: not running as root, so nothing was installed; missing: {}.", what.join(", "));
    eprintln!("Run `sudo -E cargo xtask setup`, or these commands:");
    for step in &steps {
        eprintln!("    {step}");
    }
    eprintln!(
        "(Alternatively, a rustup nightly with rust-src — `rustup toolchain install nightly --component rust-src` — \
         replaces rustc-web, cargo-web and libstd-rust-web-dev-bpf and the `{TOOLCHAIN}` link; bpf-linker is still needed.)"
    );
    std::process::exit(1);
}
