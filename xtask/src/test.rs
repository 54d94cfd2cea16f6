//! `cargo xtask test [--kernel DEB] [-- ARGS...]`: the workspace's tests, as root.
use std::{env, os::unix::fs::PermissionsExt as _, path::Path, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result};

use crate::{cmd, image, run, setup, vm};

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
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "ARGS")]
    pub args: Vec<String>,
}

/// Tells the runtime tests where `cargo xtask image` wrote the image archive.
const IMAGE_ARCHIVE_ENV: &str = "OBSERVER_IMAGE_ARCHIVE";

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
            vm::Options { kernel, test_args: &args.args, timeout: Duration::from_secs(args.vm_timeout) },
        );
    }
    // The suite's real peers and runtimes (not needed by `cargo xtask run`, so not in `setup`).
    setup::install_missing(
        setup::SUITE_PACKAGES,
        "cargo xtask test",
        "the test suite runs real containers, Prometheus, nginx and Go peers",
    )?;
    // The deploy test renders the Kubernetes manifests with kubectl. Where the machine has none,
    // Debian's kubernetes-client (kubectl 1.20, kustomize v2, which the kustomizations support).
    if !env::split_paths(&ready.path).any(|dir| dir.join("kubectl").is_file()) {
        setup::install_missing(
            &["kubernetes-client"],
            "cargo xtask test",
            "the deploy test renders the Kubernetes manifests with kubectl kustomize",
        )?;
    }
    // The image the DaemonSet runs, for the runtime tests that run it as the DaemonSet does.
    image::image(image::Args { output: None, tag: None, source: None, print_name: false, print_path: false })
        .context("building observer's image (cargo xtask image) for the runtime tests")?;
    let archive = image::default_output(&run::target_dir(&ready)?, env!("CARGO_PKG_VERSION"));
    let mut cargo = cmd::cargo_command(&ready.root, &ready.path);
    cargo.env(IMAGE_ARCHIVE_ENV, &archive);
    // observer-ebpf only builds for the BPF target; observer's build.rs builds it.
    cargo.args(["test", "--workspace", "--exclude", "observer-ebpf"]);
    cargo.args(&args.args);
    println!("observer: {}", cmd::display(&cargo));
    let status = cmd::status(&mut cargo)?;
    if !status.success() {
        eprintln!("observer: `{}` failed ({})", cmd::display(&cargo), cmd::describe(status));
        return Ok(ExitCode::from(u8::try_from(cmd::exit_code(status)).unwrap_or(1)));
    }
    // Unit tests must not need privileges (the root-only ones live in the e2e suite): run them
    // again as an unprivileged user. A filter in ARGS applies to the suite above only.
    if args.args.is_empty() {
        unit_tests_unprivileged(&ready)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The user the unit tests run as the second time: `nobody`, with no groups and no capabilities.
const UNPRIVILEGED: &str = "65534";

/// Runs every crate's unit-test binary (`cargo test --lib`) as an unprivileged user.
fn unit_tests_unprivileged(ready: &setup::Ready) -> Result<()> {
    let mut build = cmd::cargo_command(&ready.root, &ready.path);
    build.args(["test", "--workspace", "--exclude", "observer-ebpf", "--lib", "--no-run", "--message-format=json"]);
    let out = cmd::stdout(&mut build)?;
    let executables: Vec<String> = out
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["profile"]["test"] == true)
        .filter_map(|m| m["executable"].as_str().map(str::to_owned))
        .collect();
    if executables.is_empty() {
        anyhow::bail!("`{}` built no unit-test binary", cmd::display(&build));
    }
    // The checkout may sit where `nobody` cannot enter (under /root): run copies of the test
    // binaries from a directory of their own that it can read. They need nothing beside them
    // (the eBPF object is compiled in).
    let dir = std::env::temp_dir().join(format!("observer-unit-tests-{}", std::process::id()));
    let result = (|| -> Result<()> {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {} readable", dir.display()))?;
        for exe in executables {
            let name = Path::new(&exe).file_name().with_context(|| format!("test binary {exe} has no file name"))?;
            let copy = dir.join(name);
            std::fs::copy(&exe, &copy).with_context(|| format!("copying {exe} to {}", dir.display()))?;
            let mut unit = std::process::Command::new("setpriv");
            unit.args([
                "--reuid",
                UNPRIVILEGED,
                "--regid",
                UNPRIVILEGED,
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
                "--",
            ]);
            unit.arg(&copy);
            // Somewhere nobody may write (the tests' temporary trees go to the temp dir).
            unit.current_dir(std::env::temp_dir());
            println!("observer: unit tests unprivileged ({exe}): {}", cmd::display(&unit));
            cmd::run(&mut unit)
                .map_err(|e| e.context("a unit test needs privileges: root-only tests belong in the e2e suite"))?;
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
