//! A containerd of the test's own: its config, root, state, sockets and log all in one
//! directory, so two of them (and the system's, and Docker's) run side by side without sharing
//! anything but the kernel.
//!
//! The config is `containerd config default` with the keys below set, edited in place so every
//! other default stays the installed containerd's own:
//! - `root`, `state`, `grpc.address`, `ttrpc.address` into the directory; `debug.address` and
//!   `metrics.address` empty (no other sockets or ports);
//! - the CRI plugin's `sandbox_image` is the busybox image written and imported here (no
//!   registry: `registry.k8s.io/pause` cannot be pulled), `restrict_oom_score_adj = true` (the
//!   sandbox asks for `oomScoreAdj -998`, which fails without CAP_SYS_RESOURCE), the CNI
//!   directories point into the test directory (pods use the host network, no CNI config is
//!   read), and runc's state `Root` is the test directory's;
//! - runc is called through [`RUNC_WRAPPER`], a script in the directory that hands everything
//!   to runc unchanged, except that `create` first expands a systemd-style cgroups path. See
//!   [`CgroupLayout::Systemd`](super::cri::CgroupLayout::Systemd) for why;
//! - the snapshotters that cannot work here (aufs, btrfs, devmapper, zfs) are disabled, so the
//!   log holds only what matters.
//!
//! Dropping it (or [`Containerd::shutdown`]) removes every pod and container through CRI, stops
//! containerd (SIGTERM, then SIGKILL), kills any shim of this instance still running with its
//! containers, unmounts what is left under the directory and deletes it.
use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use super::{
    cri::Cri,
    host::{self, Footprint},
    image::{OciImage, WrittenImage},
};
use crate::process;

/// The busybox image every instance imports; it is also the CRI pod sandbox image.
pub const BUSYBOX_IMAGE: &str = "localhost/observer-testkit/busybox:latest";

/// The containerd namespace the kubelet's pods live in (CRI's).
pub const K8S_NAMESPACE: &str = "k8s.io";

/// The runc wrapper's file name in the instance's directory.
pub const RUNC_WRAPPER: &str = "runc-wrapper";

const CRI_PLUGIN: &str = r#"plugins."io.containerd.grpc.v1.cri""#;

/// How to start an instance.
#[derive(Debug, Clone)]
pub struct Options {
    /// Load the CRI plugin (`false` for a containerd that only backs `dockerd`).
    pub cri: bool,
    /// The namespace images are imported into (`k8s.io` for CRI; Docker's is `moby`).
    pub namespace: String,
    /// How long containerd may take to open its socket.
    pub ready_within: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self { cri: true, namespace: K8S_NAMESPACE.to_string(), ready_within: Duration::from_secs(20) }
    }
}

/// A running containerd of the test's own.
pub struct Containerd {
    child: Option<Child>,
    /// Its directory (config, root, state, sockets, logs).
    pub dir: PathBuf,
    /// Its gRPC socket (CRI and containerd's own API).
    pub socket: PathBuf,
    /// Its log (stdout and stderr).
    pub log: PathBuf,
    /// The busybox image it wrote, and imported when it has CRI (also the pod sandbox image).
    pub busybox: WrittenImage,
    options: Options,
}

impl Containerd {
    /// Starts containerd in `dir` (created empty; what an earlier run left there is removed)
    /// with the CRI plugin, and imports the busybox image.
    pub fn start(dir: &Path) -> Result<Self> {
        Self::start_with(dir, &Options::default())
    }

    /// Starts containerd in `dir` with `options`.
    pub fn start_with(dir: &Path, options: &Options) -> Result<Self> {
        host::require("containerd", "containerd")?;
        host::require("ctr", "containerd")?;
        host::require("containerd-shim-runc-v2", "containerd")?;
        host::require("runc", "runc")?;
        if !process::is_root() {
            bail!("containerd needs root to run containers: run the tests as root");
        }
        let dir = std::path::absolute(dir).with_context(|| format!("resolving {}", dir.display()))?;
        host::fresh_dir(&dir)?;
        let socket = dir.join("containerd.sock");
        host::check_socket_path(&dir.join("containerd.sock.ttrpc"))?;
        let busybox = OciImage::busybox(BUSYBOX_IMAGE)?.write(&dir.join("busybox.tar"))?;

        let runc = host::which("runc").context("runc not installed: apt-get install runc")?;
        let wrapper = dir.join(RUNC_WRAPPER);
        fs::write(&wrapper, runc_wrapper(&runc)).with_context(|| format!("writing {}", wrapper.display()))?;
        fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {} executable", wrapper.display()))?;

        let default = process::stdout(Command::new("containerd").args(["config", "default"]))?;
        let config = config(&default, &dir, options.cri, &busybox.name);
        let config_path = dir.join("config.toml");
        fs::write(&config_path, config).with_context(|| format!("writing {}", config_path.display()))?;

        let log = dir.join("containerd.log");
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(&config_path).args(["--log-level", "info"]);
        let child = host::spawn_logged(&mut cmd, &log)?;
        let mut this = Self { child: Some(child), dir, socket, log, busybox, options: options.clone() };
        if let Some(child) = this.child.as_mut() {
            host::wait_for_socket(child, "containerd", &this.socket, &this.log, options.ready_within)?;
        }
        if options.cri {
            let busybox = this.busybox.path.clone();
            this.import(&busybox)?;
        }
        Ok(this)
    }

    /// containerd's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// A CRI client on this instance's socket (as the kubelet's). Fails when the instance was
    /// started without the CRI plugin.
    pub fn cri(&self) -> Result<Cri> {
        if !self.options.cri {
            bail!("this containerd was started without its CRI plugin (Options::cri = false)");
        }
        Cri::connect(&self.socket, &self.dir.join("pods"))
    }

    /// `ctr -n NAMESPACE image import ARCHIVE` (unpacked for the default snapshotter, so CRI and
    /// `ctr run` can use it at once).
    pub fn import(&self, archive: &Path) -> Result<()> {
        let out = self.ctr(&["image", "import", &archive.to_string_lossy()])?;
        if !out.contains("done") && !out.contains("unpacking") {
            // ctr prints `unpacking NAME (sha256:...)...done`; anything else is suspicious.
            bail!("`ctr image import {}` said neither `unpacking` nor `done`: {out}", archive.display());
        }
        Ok(())
    }

    /// Runs `ctr --address SOCKET -n NAMESPACE ARGS...` and returns its stdout.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(&self.socket).args(["-n", &self.options.namespace]).args(args);
        process::stdout(&mut cmd)
    }

    /// What this instance has on the host now, to check with [`Footprint::leftovers`] after it
    /// was dropped.
    pub fn footprint(&self) -> Footprint {
        Footprint::take(&self.dir, &[self.pid()])
    }

    /// The last `lines` lines of containerd's log.
    pub fn log_tail(&self, lines: usize) -> String {
        host::tail(&self.log, lines)
    }

    /// Stops everything this instance started and removes its directory; an error says what
    /// could not be removed (dropping does the same and prints that error).
    pub fn shutdown(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        let mut problems = Vec::new();
        // Its shims (their `-address` names the socket) and their containers, seen while they
        // run: shims outlive containerd by design, so what is left is killed by pid.
        let procs: Vec<_> =
            host::processes_of(&self.dir.to_string_lossy(), &[]).into_iter().filter(|p| p.pid != child.id()).collect();
        if self.options.cri
            && child.try_wait().ok().flatten().is_none()
            && let Err(e) = Cri::connect(&self.socket, &self.dir.join("pods")).and_then(|cri| cri.remove_everything())
        {
            problems.push(format!("removing the pods through CRI: {e:#}"));
        }
        host::stop_child(&mut child, Duration::from_secs(10));
        host::finish_teardown("containerd", &procs, &self.dir, problems)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("{e:#}");
        }
    }
}

/// `default` (the output of `containerd config default`) with this instance's settings.
fn config(default: &str, dir: &Path, cri: bool, sandbox_image: &str) -> String {
    let p = |name: &str| toml_string(&dir.join(name).to_string_lossy());
    let mut disabled = vec![
        "io.containerd.snapshotter.v1.aufs",
        "io.containerd.snapshotter.v1.btrfs",
        "io.containerd.snapshotter.v1.devmapper",
        "io.containerd.snapshotter.v1.zfs",
    ];
    if !cri {
        disabled.push("io.containerd.grpc.v1.cri");
    }
    let disabled = format!("[{}]", disabled.iter().map(|d| toml_string(d)).collect::<Vec<_>>().join(", "));
    let cri_section = |sub: &str| format!("{CRI_PLUGIN}{sub}");
    let settings: [(String, &str, String); 14] = [
        (String::new(), "root", p("root")),
        (String::new(), "state", p("state")),
        (String::new(), "disabled_plugins", disabled),
        ("grpc".into(), "address", p("containerd.sock")),
        ("ttrpc".into(), "address", p("containerd.sock.ttrpc")),
        ("debug".into(), "address", toml_string("")),
        ("metrics".into(), "address", toml_string("")),
        (r#"plugins."io.containerd.internal.v1.opt""#.into(), "path", p("opt")),
        (cri_section(""), "sandbox_image", toml_string(sandbox_image)),
        (cri_section(""), "restrict_oom_score_adj", "true".into()),
        (cri_section(".cni"), "conf_dir", p("cni/net.d")),
        (cri_section(".cni"), "bin_dir", p("cni/bin")),
        (cri_section(".containerd.runtimes.runc.options"), "Root", p("runc")),
        (cri_section(".containerd.runtimes.runc.options"), "BinaryName", p(RUNC_WRAPPER)),
    ];
    let mut text = default.to_string();
    for (section, key, value) in &settings {
        text = set_toml_key(&text, section, key, value);
    }
    text
}

/// The script containerd's shims run as runc (`BinaryName`). containerd turns a pod's `.slice`
/// cgroup parent into the cgroups path `SLICE:cri-containerd:ID`, the form only runc's systemd
/// driver understands; that driver needs a running systemd, which this host lacks, and runc's
/// cgroupfs driver would take the string literally (`/kubepods-...slice:cri-containerd:ID`). So
/// before `runc create` the script rewrites it in the bundle's `config.json` into what the systemd
/// driver makes of it (systemd's slice expansion, `a-b.slice` → `/a.slice/a-b.slice`, plus
/// `PREFIX-ID.scope`), and the container lands where it would on a systemd node. Any other
/// cgroups path, and every other runc command, passes through untouched.
fn runc_wrapper(runc: &Path) -> String {
    format!(
        r#"#!/bin/sh
# Written by observer-testkit (runtime::containerd): runc, with systemd-style cgroups paths
# expanded before `create` as runc's systemd driver would (this host runs no systemd).
set -f
bundle= prev= create=
for arg in "$@"; do
  case "$prev" in --bundle|-b) bundle=$arg ;; esac
  case "$arg" in --bundle=*) bundle=${{arg#--bundle=}} ;; create) create=1 ;; esac
  prev=$arg
done
config="${{bundle:-.}}/config.json"
if [ -n "$create" ] && [ -f "$config" ]; then
  spec=$(sed -n 's/.*"cgroupsPath": *"\([^"/:]*\.slice\):\([^":]*\):\([^":]*\)".*/\1 \2 \3/p' "$config")
  if [ -n "$spec" ]; then
    slice=${{spec%% *}}; rest=${{spec#* }}; prefix=${{rest%% *}}; name=${{rest#* }}
    expanded= acc=
    IFS=-
    for part in ${{slice%.slice}}; do
      acc=${{acc:+$acc-}}$part
      expanded="$expanded/$acc.slice"
    done
    unset IFS
    sed -i "s|\"cgroupsPath\": *\"[^\"]*\"|\"cgroupsPath\":\"$expanded/$prefix-$name.scope\"|" "$config"
  fi
fi
exec {runc} "$@"
"#,
        runc = runc.display()
    )
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Sets `key = value` in `[section]` of a TOML text (`""`: the top-level table) line by line:
/// replaces the key's line when the section has it, else adds it right after the header, or adds
/// the section at the end when the text has none (a containerd whose defaults differ from 1.6's).
fn set_toml_key(text: &str, section: &str, key: &str, value: &str) -> String {
    let mut out = Vec::new();
    let (mut in_section, mut found_section, mut done) = (section.is_empty(), section.is_empty(), false);
    let mut insert_at = if section.is_empty() { Some(0) } else { None };
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') && !trimmed.starts_with("[[") && trimmed.ends_with(']') && !trimmed.contains('=') {
            in_section = trimmed[1..trimmed.len() - 1] == *section;
            if in_section {
                found_section = true;
                out.push(line.to_string());
                insert_at = Some(out.len());
                continue;
            }
        }
        if in_section
            && !done
            && let Some((k, _)) = trimmed.split_once('=')
            && k.trim() == key
        {
            let indent = &line[..line.len() - line.trim_start().len()];
            out.push(format!("{indent}{key} = {value}"));
            done = true;
            continue;
        }
        out.push(line.to_string());
    }
    if !found_section {
        out.push(String::new());
        out.push(format!("[{section}]"));
        out.push(format!("  {key} = {value}"));
    } else if !done {
        let at = insert_at.unwrap_or(out.len());
        out.insert(at, format!("{key} = {value}"));
    }
    out.join("\n") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: &str = r#"disabled_plugins = []
root = "/var/lib/containerd"
version = 2

[grpc]
  address = "/run/containerd/containerd.sock"
  uid = 0

[plugins]

  [plugins."io.containerd.grpc.v1.cri"]
    restrict_oom_score_adj = false
    sandbox_image = "registry.k8s.io/pause:3.6"

    [plugins."io.containerd.grpc.v1.cri".cni]
      conf_dir = "/etc/cni/net.d"

[ttrpc]
  address = ""
"#;

    #[test]
    fn keys_are_replaced_in_their_section_only() {
        let t = set_toml_key(DEFAULT, "grpc", "address", "\"/x.sock\"");
        assert!(t.contains("  address = \"/x.sock\"\n  uid = 0"));
        assert!(t.contains("[ttrpc]\n  address = \"\""));
        let t = set_toml_key(&t, CRI_PLUGIN, "restrict_oom_score_adj", "true");
        assert!(t.contains("restrict_oom_score_adj = true"));
        let t = set_toml_key(&t, "", "state", "\"/s\"");
        assert!(t.starts_with("state = \"/s\"\n"));
        let t = set_toml_key(&t, "", "root", "\"/r\"");
        assert!(t.contains("\nroot = \"/r\"\n"));
        let t = set_toml_key(&t, &format!("{CRI_PLUGIN}.cni"), "bin_dir", "\"/b\"");
        assert!(t.contains("[plugins.\"io.containerd.grpc.v1.cri\".cni]\nbin_dir = \"/b\"\n      conf_dir"));
        assert!(set_toml_key(DEFAULT, "new", "a", "1").ends_with("\n[new]\n  a = 1\n"));
    }

    #[test]
    fn the_config_moves_everything_into_the_directory() {
        let t = config(DEFAULT, Path::new("/t/d"), true, BUSYBOX_IMAGE);
        assert!(t.contains("root = \"/t/d/root\""));
        assert!(t.contains("address = \"/t/d/containerd.sock\""));
        assert!(t.contains("address = \"/t/d/containerd.sock.ttrpc\""));
        assert!(t.contains(&format!("sandbox_image = \"{BUSYBOX_IMAGE}\"")));
        assert!(t.contains("conf_dir = \"/t/d/cni/net.d\""));
        assert!(t.contains("restrict_oom_score_adj = true") && t.contains("Root = \"/t/d/runc\""));
        assert!(!t.contains("\"io.containerd.grpc.v1.cri\", "));
        assert!(config(DEFAULT, Path::new("/t/d"), false, BUSYBOX_IMAGE).contains("\"io.containerd.grpc.v1.cri\"]\n"));
    }
}
