//! `cargo xtask test --kernel DEB`: the end-to-end suite on another kernel, in QEMU.
//!
//! A Debian kernel package (`6.1` → the newest `linux-image-6.1.*-cloud-amd64`, `6.12` → the
//! newest `linux-image-6.12.*-cloud-amd64`, or an exact package name) is fetched with
//! `apt-get download` and unpacked under `target/vm/` (never installed into /boot). The e2e test
//! binary and the daemon are built on the host and packed, with busybox, bpftool, ip, their shared
//! libraries and the few kernel modules the tests need, into an initramfs whose `/init` loads the
//! modules, mounts what the tests need, runs the suite and prints a marker line with its exit
//! status before powering off. QEMU runs under software
//! emulation (`-accel tcg`: KVM does not work on these machines); its console is streamed to the
//! terminal and to `target/vm/<kernel release>.log`. A missing marker — the kernel panicked, the
//! init failed, the time ran out — is a failure, never a pass.
//!
//! The binaries are put at the same absolute paths as on the host, so the test binary's
//! `env!("CARGO_BIN_EXE_observer")` finds the daemon without any override.
use std::{
    collections::{BTreeMap, HashSet},
    env, fs,
    io::{Read as _, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::{
    cmd,
    setup::{self, Ready},
};

/// Host packages the VM run needs (besides what `setup` installs).
const VM_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static"];
const QEMU: &str = "qemu-system-x86_64";
const BUSYBOX: &str = "/bin/busybox";
/// Host programs the tests run, with the package that has them (`cargo xtask setup` installs
/// both). They go into the guest at the same path, with their shared libraries.
const HOST_TOOLS: &[(&str, &str)] = &[("/usr/sbin/bpftool", "bpftool"), ("/usr/bin/ip", "iproute2")];
/// Kernel modules the tests need where a kernel builds them as modules (Debian's cloud kernels
/// do), loaded by `/init` since the guest has no modprobe to load them on demand: veth pairs for
/// the scenarios whose link goes down, sock_diag for TCP (`tcp_diag`, needs `inet_diag`) for the
/// daemon's start-up seeding from the socket table.
const MODULES: &[&str] = &["veth", "tcp_diag"];
/// The line `/init` prints after the suite; the number after it is the suite's exit status.
const MARKER: &str = "OBSERVER_VM_SUITE_EXIT_STATUS=";
const LOG_PREFIX: &str = "observer vm:";

pub struct Options<'a> {
    /// `6.1`, `6.12`, `6.12.57` or a package name.
    pub kernel: &'a str,
    /// Arguments for the e2e test binary (a test-name filter, `--exact`, ...).
    pub test_args: &'a [String],
    pub timeout: Duration,
}

pub fn test(ready: &Ready, opts: Options<'_>) -> Result<ExitCode> {
    let started = Instant::now();
    let vm_dir = target_dir(&ready.root).join("vm");
    fs::create_dir_all(&vm_dir).with_context(|| format!("creating {}", vm_dir.display()))?;

    install_host_packages()?;
    let package = resolve_kernel(opts.kernel)?;
    let kernel = fetch_kernel(&package, &vm_dir)?;
    println!("{LOG_PREFIX} kernel {} from {package} ({})", kernel.release, kernel.vmlinuz.display());

    let bins = build_tests(ready)?;
    let initramfs = vm_dir.join(format!("{}.cpio", kernel.release));
    make_initramfs(&kernel, &bins, opts.test_args, &vm_dir, &initramfs)?;
    let prepared = started.elapsed();

    let log_path = vm_dir.join(format!("{}.log", kernel.release));
    let outcome = boot(&kernel, &initramfs, &log_path, opts.timeout)?;
    let total = started.elapsed();
    match outcome {
        Outcome::Finished { status, booted_in, suite_in } => {
            let verdict = if status == 0 { "passed" } else { "FAILED" };
            println!(
                "{LOG_PREFIX} e2e suite {verdict} on kernel {} (exit status {status}); set-up {:.0}s, \
                 boot to /init {:.1}s, suite {:.0}s, total {:.0}s; console log in {}",
                kernel.release,
                prepared.as_secs_f64(),
                booted_in.as_secs_f64(),
                suite_in.as_secs_f64(),
                total.as_secs_f64(),
                log_path.display()
            );
            Ok(ExitCode::from(u8::try_from(status).unwrap_or(1).max(u8::from(status != 0))))
        }
        Outcome::NoMarker { why } => {
            eprintln!(
                "{LOG_PREFIX} FAILED: the e2e suite on kernel {} did not report an exit status ({why}); \
                 console log in {}",
                kernel.release,
                log_path.display()
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

fn target_dir(root: &Path) -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .filter(|d| !d.is_empty())
        .map(|d| root.join(d))
        .unwrap_or_else(|| root.join("target"))
}

// ---------------------------------------------------------------------------------------------
// Host packages and the kernel package.

fn install_host_packages() -> Result<()> {
    setup::install_missing(
        VM_PACKAGES,
        LOG_PREFIX.trim_end_matches(':'),
        "QEMU and the initramfs' shell, to boot other kernels",
    )
}

/// The package `spec` names: itself if it is a package name, else the newest cloud kernel of that
/// version (`6.1` → `linux-image-6.1.0-N-cloud-amd64`, `6.12` → `linux-image-6.12.N+deb12-cloud-amd64`)
/// or that release (`6.1.0-57-cloud-amd64` → `linux-image-6.1.0-57-cloud-amd64`).
fn resolve_kernel(spec: &str) -> Result<String> {
    let spec = spec.trim();
    if spec.is_empty() {
        bail!("--kernel needs a Debian kernel version (6.1, 6.12) or package name");
    }
    for attempt in 0..2 {
        let names = cmd::stdout(Command::new("apt-cache").args(["pkgnames", "linux-image-"]))?;
        let names: Vec<&str> = names.lines().map(str::trim).collect();
        if let Some(found) = pick_kernel(spec, &names) {
            return Ok(found);
        }
        if attempt == 0 {
            println!("{LOG_PREFIX} no package matches `{spec}` in apt's lists: updating them (apt-get update)");
            cmd::run(Command::new("apt-get").arg("update"))?;
        } else {
            let mut cloud: Vec<&str> = names.iter().copied().filter(|n| n.ends_with("-cloud-amd64")).collect();
            cloud.sort_by_key(|n| version_key(n));
            bail!(
                "no Debian kernel package matches `{spec}`; give a version (6.1, 6.12), a release (6.1.0-57-cloud-amd64) or one of: {}",
                cloud.join(" ")
            );
        }
    }
    unreachable!()
}

fn pick_kernel(spec: &str, names: &[&str]) -> Option<String> {
    if spec.starts_with("linux-image-") {
        return names.contains(&spec).then(|| spec.to_string());
    }
    let prefix = format!("linux-image-{spec}");
    names
        .iter()
        .copied()
        .filter(|n| {
            // `6.1` must not match `6.12...`, nor `6.1.0-4` match `6.1.0-47-...`; a whole release
            // (`6.1.0-57-cloud-amd64`, as `uname -r` and the console log print it) matches itself.
            n.strip_prefix(&prefix).is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '-', '+']))
                && n.ends_with("-cloud-amd64")
        })
        .max_by_key(|n| version_key(n))
        .map(str::to_string)
}

/// The numbers in a package name, for ordering `6.1.0-47` before `6.1.0-50`.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap_or(u64::MAX)).collect()
}

struct Kernel {
    release: String,
    vmlinuz: PathBuf,
    /// The package's `lib/modules/RELEASE`.
    modules: PathBuf,
}

/// `apt-get download` + `dpkg-deb -x` into `target/vm/kernels/PACKAGE` (once).
fn fetch_kernel(package: &str, vm_dir: &Path) -> Result<Kernel> {
    let dir = vm_dir.join("kernels").join(package);
    let done = dir.join(".unpacked");
    if !done.exists() {
        let debs = vm_dir.join("debs");
        fs::create_dir_all(&debs)?;
        println!(
            "{LOG_PREFIX} downloading the kernel package {package} (apt-get download) and unpacking it into {} (not installed into /boot)",
            dir.display()
        );
        let download = || cmd::run(Command::new("apt-get").args(["download", package]).current_dir(&debs));
        if download().is_err() {
            println!("{LOG_PREFIX} download failed; updating apt's lists (apt-get update) and trying again");
            cmd::run(Command::new("apt-get").arg("update"))?;
            download()?;
        }
        let deb = fs::read_dir(&debs)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
            })
            .max()
            .ok_or_else(|| anyhow!("apt-get download {package} left no .deb in {}", debs.display()))?;
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        fs::create_dir_all(&dir)?;
        cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir))?;
        fs::write(&done, format!("{}\n", deb.display()))?;
        let _ = fs::remove_file(&deb);
    }
    let boot = dir.join("boot");
    let vmlinuz = fs::read_dir(&boot)
        .with_context(|| format!("{} has no boot/ directory", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vmlinuz-")))
        .ok_or_else(|| anyhow!("no vmlinuz-* in {}", boot.display()))?;
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or(package)
        .to_string();
    let modules = dir.join("lib/modules").join(&release);
    Ok(Kernel { release, vmlinuz, modules })
}

// ---------------------------------------------------------------------------------------------
// The binaries under test.

struct Binaries {
    e2e: PathBuf,
    observer: PathBuf,
}

/// `cargo test --no-run` for the e2e test, reading the executables from cargo's JSON messages.
fn build_tests(ready: &Ready) -> Result<Binaries> {
    let mut cargo = cmd::cargo_command(&ready.root, &ready.path);
    cargo.args(["test", "--no-run", "--message-format=json-render-diagnostics", "-p", "observer", "--test", "e2e"]);
    println!("{LOG_PREFIX} {}", cmd::display(&cargo));
    cargo.stdout(Stdio::piped()).stderr(Stdio::inherit());
    let out = cmd::output(&mut cargo)?;
    if !out.status.success() {
        bail!("`{}` failed ({})", cmd::display(&cargo), cmd::describe(out.status));
    }
    let (mut e2e, mut observer) = (None, None);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        let kinds = msg["target"]["kind"].as_array().cloned().unwrap_or_default();
        let is = |k: &str| kinds.iter().any(|v| v == k);
        match msg["target"]["name"].as_str() {
            Some("e2e") if is("test") => e2e = Some(PathBuf::from(exe)),
            Some("observer") if is("bin") => observer = Some(PathBuf::from(exe)),
            _ => {}
        }
    }
    Ok(Binaries {
        e2e: e2e.ok_or_else(|| anyhow!("cargo did not report the e2e test executable"))?,
        observer: observer.ok_or_else(|| anyhow!("cargo did not report the observer executable"))?,
    })
}

// ---------------------------------------------------------------------------------------------
// The initramfs.

fn init_script(bins: &Binaries, test_args: &[String], modules: &[String]) -> String {
    let mut args: Vec<String> = test_args.to_vec();
    // `cargo xtask test -- -- FILTER` (the host form, where the second `--` reaches the test
    // binaries) means the same here.
    if args.first().is_some_and(|a| a == "--") {
        args.remove(0);
    }
    let command = std::iter::once(bins.e2e.to_string_lossy().into_owned())
        .chain(args)
        .map(|w| sh_quote(&w))
        .collect::<Vec<_>>()
        .join(" ");
    let insmod: String = modules
        .iter()
        .map(|m| format!("insmod {} || echo \"observer vm: could not load {}\"\n", sh_quote(m), sh_quote(m)))
        .collect();
    // The binaries keep their host paths; a tmpfs mounted over a directory that holds them (a
    // checkout under /tmp) would hide them. The initramfs itself is writable, so such a
    // directory simply stays part of it.
    let scratch: String = ["/tmp", "/run"]
        .into_iter()
        .filter(|dir| ![&bins.e2e, &bins.observer].iter().any(|b| b.starts_with(dir)))
        .map(|dir| format!("mount -t tmpfs tmpfs {dir}\n"))
        .collect();
    format!(
        r#"#!/bin/busybox sh
# Generated by `cargo xtask test --kernel`: run the e2e suite, print its exit status, power off.
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
{scratch}mount -t tracefs tracefs /sys/kernel/tracing || echo "observer vm: could not mount tracefs"
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t bpf bpf /sys/fs/bpf || echo "observer vm: could not mount bpffs"
mount -t cgroup2 cgroup2 /sys/fs/cgroup || echo "observer vm: could not mount cgroup2"
{insmod}ip link set lo up
ulimit -n 65536
cd /
up=$(cut -d' ' -f1 /proc/uptime)
echo
echo "observer vm: /init on $(uname -r) after ${{up}}s of uptime; BTF: $(test -e /sys/kernel/btf/vmlinux && echo yes || echo no), kprobe PMU: $(test -e /sys/bus/event_source/devices/kprobe && echo yes || echo no), clock source: $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource 2>/dev/null || echo unknown)"
echo "observer vm: tcp_send_reset fields: $(grep -o 'field:[^;]*' /sys/kernel/tracing/events/tcp/tcp_send_reset/format 2>/dev/null | grep -v common_ | sed 's/field://' | tr '\n' ';')"
echo "observer vm: running {command}"
{command}
rc=$?
echo "{MARKER}$rc"
echo "observer vm: suite done after $(cut -d' ' -f1 /proc/uptime)s of uptime"
poweroff -f
"#
    )
}

fn sh_quote(word: &str) -> String {
    if !word.is_empty() && word.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c)) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

fn make_initramfs(kernel: &Kernel, bins: &Binaries, test_args: &[String], vm_dir: &Path, out: &Path) -> Result<()> {
    // Per kernel, so runs for two kernels can share a target directory.
    let stage = vm_dir.join("stage").join(&kernel.release);
    fs::create_dir_all(&stage)?;
    let mut cpio = Cpio::default();
    for dir in ["/bin", "/sbin", "/usr/bin", "/usr/sbin", "/proc", "/sys", "/dev", "/tmp", "/run", "/etc", "/root"] {
        cpio.dir(dir);
    }
    cpio.char_dev("/dev/console", 0o600, 5, 1);
    cpio.char_dev("/dev/null", 0o666, 1, 3);
    cpio.file("/etc/hosts", 0o644, b"127.0.0.1 localhost\n::1 localhost\n".to_vec());
    cpio.file("/etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n".to_vec());
    cpio.file("/etc/group", 0o644, b"root:x:0:\n".to_vec());
    let modules = kernel_modules(kernel, &mut cpio)?;
    cpio.file("/init", 0o755, init_script(bins, test_args, &modules).into_bytes());

    let busybox = Path::new(BUSYBOX);
    if !busybox.exists() {
        bail!("{BUSYBOX} is missing (package busybox-static)");
    }
    cpio.host_file(busybox, busybox)?;
    let mut programs = vec![(bins.e2e.as_path(), true), (bins.observer.as_path(), true)];
    for (tool, package) in HOST_TOOLS {
        let tool = Path::new(tool);
        if !tool.exists() {
            bail!("{} is missing (package {package}; `cargo xtask setup` installs it)", tool.display());
        }
        programs.push((tool, false));
    }
    let mut libs = BTreeMap::new();
    for (exe, strip) in programs {
        for lib in shared_libraries(exe)? {
            libs.insert(lib.clone(), lib);
        }
        let src = if strip { stripped(exe, &stage)? } else { exe.to_path_buf() };
        cpio.host_file(exe, &src)?;
    }
    for lib in libs.keys() {
        cpio.host_file(lib, lib)?;
    }
    let bytes = cpio.finish();
    fs::write(out, &bytes).with_context(|| format!("writing {}", out.display()))?;
    println!(
        "{LOG_PREFIX} initramfs {} ({} MB: busybox, {}, the e2e test binary, observer, {} shared libraries, modules: {})",
        out.display(),
        bytes.len() / (1 << 20),
        HOST_TOOLS.iter().map(|(t, _)| *t).collect::<Vec<_>>().join(", "),
        libs.len(),
        if modules.is_empty() { "none needed".to_string() } else { modules.join(" ") }
    );
    Ok(())
}

/// Puts [`MODULES`] that `kernel` builds as modules, and the modules they depend on, into the
/// archive (decompressed), and returns their paths in the order to load them.
fn kernel_modules(kernel: &Kernel, cpio: &mut Cpio) -> Result<Vec<String>> {
    let builtin = fs::read_to_string(kernel.modules.join("modules.builtin")).unwrap_or_default();
    let builtin: HashSet<String> =
        builtin.lines().filter_map(|l| l.rsplit('/').next()).map(|f| module_name(f.trim_end_matches(".ko"))).collect();
    let mut files = BTreeMap::new();
    collect_module_files(&kernel.modules.join("kernel"), &mut files)?;
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    for name in MODULES {
        add_module(&module_name(name), &builtin, &files, &mut seen, &mut order)?;
    }
    let mut loaded = Vec::new();
    for (name, path) in order {
        let data = decompressed_module(&path)?;
        let guest = format!("/lib/modules/{}/{name}.ko", kernel.release);
        cpio.file(&guest, 0o644, data);
        loaded.push(guest);
    }
    Ok(loaded)
}

/// Module names treat `-` and `_` alike.
fn module_name(name: &str) -> String {
    name.replace('-', "_")
}

fn add_module(
    name: &str,
    builtin: &HashSet<String>,
    files: &BTreeMap<String, PathBuf>,
    seen: &mut HashSet<String>,
    order: &mut Vec<(String, PathBuf)>,
) -> Result<()> {
    if builtin.contains(name) || !seen.insert(name.to_string()) {
        return Ok(());
    }
    let path = files.get(name).ok_or_else(|| anyhow!("the kernel has module {name} neither built in nor as a file"))?;
    let data = decompressed_module(path)?;
    for dep in modinfo(&data, "depends").split(',').filter(|d| !d.is_empty()) {
        add_module(&module_name(dep), builtin, files, seen, order)?;
    }
    order.push((name.to_string(), path.clone()));
    Ok(())
}

/// Every `*.ko`, `*.ko.xz`, `*.ko.zst`, `*.ko.gz` under `dir`, by module name.
fn collect_module_files(dir: &Path, out: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries {
        let path = entry?.path();
        if path.is_dir() {
            collect_module_files(&path, out)?;
        } else if let Some(file) = path.file_name().and_then(|n| n.to_str())
            && let Some((stem, _)) = file.split_once(".ko")
        {
            out.insert(module_name(stem), path.clone());
        }
    }
    Ok(())
}

/// A module file's contents, decompressed with the tool its extension names.
fn decompressed_module(path: &Path) -> Result<Vec<u8>> {
    let tool = match path.extension().and_then(|e| e.to_str()) {
        Some("xz") => "xz",
        Some("zst") => "zstd",
        Some("gz") => "gzip",
        _ => return fs::read(path).with_context(|| format!("reading {}", path.display())),
    };
    let out = cmd::output(Command::new(tool).arg("-dc").arg(path))?;
    if !out.status.success() {
        bail!("`{tool} -dc {}` failed", path.display());
    }
    Ok(out.stdout)
}

/// A `.modinfo` field (`depends=...`) of a module image; empty when absent.
fn modinfo(image: &[u8], field: &str) -> String {
    let key = format!("{field}=");
    image
        .split(|&b| b == 0)
        .find_map(|s| s.strip_prefix(key.as_bytes()))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

/// A copy of `exe` without debug information (it is most of a debug build's size), in `stage`.
fn stripped(exe: &Path, stage: &Path) -> Result<PathBuf> {
    let name = exe.file_name().ok_or_else(|| anyhow!("{} has no file name", exe.display()))?;
    let out = stage.join(name);
    let status = Command::new("strip").arg("--strip-debug").arg("-o").arg(&out).arg(exe).status();
    match status {
        Ok(s) if s.success() => Ok(out),
        _ => {
            eprintln!("{LOG_PREFIX} warning: could not strip {} (packing it whole)", exe.display());
            Ok(exe.to_path_buf())
        }
    }
}

/// The shared libraries `exe` loads, including the dynamic loader, from `ldd`.
fn shared_libraries(exe: &Path) -> Result<Vec<PathBuf>> {
    let out = cmd::output(Command::new("ldd").arg(exe))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // A static executable: "not a dynamic executable".
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("not found") {
            bail!("{}: shared library {line}", exe.display());
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line,
        };
        let path = path.split_whitespace().next().unwrap_or("");
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// A `newc` cpio archive (what the kernel unpacks as initramfs), built in memory. Parent
/// directories are added before their entries.
#[derive(Default)]
struct Cpio {
    entries: BTreeMap<String, CpioEntry>,
}

enum CpioEntry {
    Dir,
    File { mode: u32, data: Vec<u8> },
    CharDev { mode: u32, major: u32, minor: u32 },
}

impl Cpio {
    fn dir(&mut self, path: &str) {
        let path = path.trim_matches('/');
        let mut prefix = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            self.entries.entry(prefix.clone()).or_insert(CpioEntry::Dir);
        }
    }

    fn parent(&mut self, path: &str) -> String {
        let path = path.trim_start_matches('/').to_string();
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        path
    }

    fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) {
        let path = self.parent(path);
        self.entries.insert(path, CpioEntry::File { mode, data });
    }

    fn char_dev(&mut self, path: &str, mode: u32, major: u32, minor: u32) {
        let path = self.parent(path);
        self.entries.insert(path, CpioEntry::CharDev { mode, major, minor });
    }

    /// The contents of host file `src` (symlinks followed) at `path` in the archive.
    fn host_file(&mut self, path: &Path, src: &Path) -> Result<()> {
        let data = fs::read(src).with_context(|| format!("reading {}", src.display()))?;
        let mode = fs::metadata(src)?.permissions().mode() & 0o7777;
        self.file(&path.to_string_lossy(), mode | 0o444, data);
        Ok(())
    }

    fn finish(self) -> Vec<u8> {
        let mut out = Vec::new();
        for (ino, (name, entry)) in (1..).zip(&self.entries) {
            let (mode, data, rdev): (u32, &[u8], (u32, u32)) = match entry {
                CpioEntry::Dir => (0o040_755, &[], (0, 0)),
                CpioEntry::File { mode, data } => (0o100_000 | mode, data, (0, 0)),
                CpioEntry::CharDev { mode, major, minor } => (0o020_000 | mode, &[], (*major, *minor)),
            };
            let nlink = if matches!(entry, CpioEntry::Dir) { 2 } else { 1 };
            cpio_entry(&mut out, ino, name, mode, nlink, data, rdev);
        }
        cpio_entry(&mut out, 0, "TRAILER!!!", 0, 1, &[], (0, 0));
        out
    }
}

fn cpio_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, nlink: u32, data: &[u8], rdev: (u32, u32)) {
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        u32::try_from(data.len()).expect("initramfs file under 4 GiB"),
        0, // devmajor
        0, // devminor
        rdev.0,
        rdev.1,
        u32::try_from(name.len() + 1).expect("short name"),
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

// ---------------------------------------------------------------------------------------------
// Booting.

enum Outcome {
    Finished { status: i32, booted_in: Duration, suite_in: Duration },
    NoMarker { why: String },
}

/// The guest kernel's command line. `OBSERVER_PROBES` and `OBSERVER_SOCKET_STORE` from the host
/// (`kprobe` to test the kprobe back end, `storage` socket-local storage) travel on it: the
/// kernel hands `KEY=value` words it does not know to init as environment variables, and the
/// tests and the daemon read them from there.
fn kernel_command_line() -> String {
    let mut line = String::from("console=ttyS0 panic=-1 quiet");
    for key in ["OBSERVER_PROBES", "OBSERVER_SOCKET_STORE"] {
        if let Ok(value) = std::env::var(key)
            && !value.is_empty()
            && value.chars().all(|c| c.is_ascii_alphanumeric())
        {
            line.push_str(&format!(" {key}={value}"));
        }
    }
    line
}

fn boot(kernel: &Kernel, initramfs: &Path, log_path: &Path, timeout: Duration) -> Result<Outcome> {
    let mut qemu = Command::new(QEMU);
    qemu.args(["-accel", "tcg", "-m", "2048", "-smp", "2", "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        // No network card: the tests use loopback only (and the firmware skips its PXE ROM).
        .args(["-nic", "none"])
        .args(["-append", &kernel_command_line()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    println!(
        "{LOG_PREFIX} booting (software emulation; gives up after {}s): {}",
        timeout.as_secs(),
        cmd::display(&qemu)
    );
    let mut log = fs::File::create(log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let start = Instant::now();
    let mut child = qemu.spawn().with_context(|| format!("could not start `{}`", cmd::display(&qemu)))?;

    // Console → terminal, log file and (for the marker) memory, with the time /init started.
    let transcript = Arc::new(Mutex::new(Vec::<u8>::new()));
    let init_at = Arc::new(Mutex::new(None::<Duration>));
    let mut stdout = child.stdout.take().ok_or_else(|| anyhow!("no QEMU stdout"))?;
    let reader = {
        let transcript = Arc::clone(&transcript);
        let init_at = Arc::clone(&init_at);
        let mut log = log.try_clone()?;
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            let mut console = ConsoleFilter::default();
            let mut term = std::io::stdout();
            loop {
                let n = match stdout.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let chunk = console.clean(&buf[..n]);
                let _ = term.write_all(&chunk);
                let _ = term.flush();
                let _ = log.write_all(&chunk);
                let mut t = transcript.lock().expect("transcript lock");
                t.extend_from_slice(&chunk);
                let mut init = init_at.lock().expect("init lock");
                if init.is_none() && memfind(&t, b"observer vm: /init on ") {
                    *init = Some(start.elapsed());
                }
            }
        })
    };
    let mut stderr = child.stderr.take().ok_or_else(|| anyhow!("no QEMU stderr"))?;
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });

    let deadline = start + timeout;
    let (status, timed_out) = loop {
        if let Some(status) = child.try_wait()? {
            break (status, false);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break (child.wait()?, true);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let elapsed = start.elapsed();
    let _ = reader.join();
    let qemu_err = err_reader.join().unwrap_or_default();
    if !qemu_err.trim().is_empty() {
        eprint!("{qemu_err}");
        let _ = log.write_all(qemu_err.as_bytes());
    }
    let transcript = transcript.lock().expect("transcript lock");
    let text = String::from_utf8_lossy(&transcript);
    let marker = text
        .lines()
        .rev()
        .filter_map(|l| l.split_once(MARKER))
        .filter_map(|(_, rest)| {
            rest.trim().split(|c: char| !c.is_ascii_digit()).next().and_then(|d| d.parse::<i32>().ok())
        })
        .next();
    let booted_in = init_at.lock().expect("init lock").unwrap_or_default();
    Ok(match marker {
        Some(status) => Outcome::Finished { status, booted_in, suite_in: elapsed.saturating_sub(booted_in) },
        None => Outcome::NoMarker {
            why: if timed_out {
                format!("killed QEMU after the {}s time limit", timeout.as_secs())
            } else if booted_in.is_zero() {
                format!("the guest never reached /init; QEMU {}", cmd::describe(status))
            } else {
                format!("QEMU {} before the suite finished", cmd::describe(status))
            },
        },
    })
}

/// Drops carriage returns and terminal escape sequences (the firmware clears and resets the
/// screen) from the console stream, keeping text and newlines.
#[derive(Default)]
struct ConsoleFilter {
    state: Escape,
}

#[derive(Default, Clone, Copy)]
enum Escape {
    #[default]
    Text,
    /// After ESC.
    Start,
    /// Inside `ESC [ ...` until its final byte.
    Csi,
}

impl ConsoleFilter {
    fn clean(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(bytes.len());
        for &b in bytes {
            self.state = match (self.state, b) {
                (Escape::Text, 0x1b) => Escape::Start,
                (Escape::Text, b'\r') => Escape::Text,
                (Escape::Text, b) => {
                    out.push(b);
                    Escape::Text
                }
                (Escape::Start, b'[') => Escape::Csi,
                (Escape::Start, _) => Escape::Text,
                (Escape::Csi, 0x40..=0x7e) => Escape::Text,
                (Escape::Csi, _) => Escape::Csi,
            };
        }
        out
    }
}

fn memfind(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: &[&str] = &[
        "linux-image-6.1.0-47-cloud-amd64",
        "linux-image-6.1.0-50-cloud-amd64",
        "linux-image-6.1.0-50-cloud-amd64-dbg",
        "linux-image-6.1.0-50-amd64",
        "linux-image-6.12.100+deb12-cloud-amd64",
        "linux-image-6.12.117+deb12-cloud-amd64",
        "linux-image-6.12.117+deb12-cloud-amd64-unsigned",
    ];

    #[test]
    fn versions_pick_the_newest_cloud_kernel_of_that_series() {
        assert_eq!(pick_kernel("6.1", NAMES).as_deref(), Some("linux-image-6.1.0-50-cloud-amd64"));
        assert_eq!(pick_kernel("6.12", NAMES).as_deref(), Some("linux-image-6.12.117+deb12-cloud-amd64"));
        assert_eq!(pick_kernel("6.12.100", NAMES).as_deref(), Some("linux-image-6.12.100+deb12-cloud-amd64"));
        assert_eq!(pick_kernel("6.1.0-47", NAMES).as_deref(), Some("linux-image-6.1.0-47-cloud-amd64"));
        assert_eq!(pick_kernel("6.1.0-47-cloud-amd64", NAMES).as_deref(), Some("linux-image-6.1.0-47-cloud-amd64"));
        assert_eq!(pick_kernel("6.2", NAMES), None);
        assert_eq!(pick_kernel("6.1.0-4", NAMES), None);
    }

    #[test]
    fn package_names_are_taken_as_they_are() {
        assert_eq!(pick_kernel("linux-image-6.1.0-50-amd64", NAMES).as_deref(), Some("linux-image-6.1.0-50-amd64"));
        assert_eq!(pick_kernel("linux-image-6.1.0-51-amd64", NAMES), None);
    }

    #[test]
    fn console_filter_drops_escapes_split_across_reads() {
        let mut f = ConsoleFilter::default();
        let mut out = f.clean(b"\x1bc\x1b[?7l\x1b[2");
        out.extend(f.clean(b"JSeaBIOS\r\nok\x1b[0m\n"));
        assert_eq!(out, b"SeaBIOS\nok\n");
    }

    #[test]
    fn modinfo_reads_a_field_of_the_modinfo_strings() {
        let image = b"\x7fELF...\0license=GPL\0depends=ipv6,nf_defrag_ipv4\0name=x\0";
        assert_eq!(modinfo(image, "depends"), "ipv6,nf_defrag_ipv4");
        assert_eq!(modinfo(image, "intree"), "");
    }

    #[test]
    fn cpio_lists_parents_first_and_is_aligned() {
        let mut c = Cpio::default();
        c.file("/usr/sbin/bpftool", 0o755, b"abc".to_vec());
        c.dir("/proc");
        let names: Vec<&String> = c.entries.keys().collect();
        assert_eq!(names, ["proc", "usr", "usr/sbin", "usr/sbin/bpftool"]);
        let bytes = c.finish();
        assert_eq!(bytes.len() % 4, 0);
        assert!(memfind(&bytes, b"TRAILER!!!\0"));
    }
}
