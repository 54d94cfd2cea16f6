//! Real container runtimes for the tests of pod and container identity: a containerd of the
//! test's own driven through its CRI socket exactly as the kubelet drives it, a dockerd of the
//! test's own, and the registry-less OCI images they run.
//!
//! | module | what |
//! |---|---|
//! | [`image`] | OCI image archives (OCI layout + `docker save` files in one tarball), busybox or any files |
//! | [`containerd`] | containerd in a directory of its own: config, socket, log, image import, full cleanup |
//! | [`cri`] | a CRI v1 client making the kubelet's calls (pods, containers, status, logs) |
//! | [`docker`] | dockerd in a directory of its own (backed by a [`containerd::Containerd`]): load, run, rm |
//! | [`host`] | what an instance leaves on the host (processes, mounts), found by what is its own and removed |
//!
//! The API is synchronous. Every instance lives in one directory, which it creates empty and
//! deletes when dropped, after stopping everything it started: two instances in two directories
//! run side by side, beside the system's runtimes. Everything needs root and the Debian packages
//! `containerd runc docker.io busybox-static`; a missing one is an error naming it.
//!
//! ```no_run
//! use observer_testkit::runtime::{containerd::{Containerd, BUSYBOX_IMAGE}, cri::{ContainerSpec, PodSpec}};
//!
//! let containerd = Containerd::start("/tmp/observer-rt-example".as_ref())?;
//! let cri = containerd.cri()?;
//! let pod = cri.run_pod(&PodSpec::new("web", "default", "0b5e3c4e-1111-2222-3333-444455556666"))?;
//! let id = cri.create_container(&pod, &ContainerSpec::new("app", BUSYBOX_IMAGE).command(["sleep", "60"]))?;
//! let status = cri.container_status(&id)?;
//! assert_eq!(std::fs::read_to_string(format!("/proc/{}/cgroup", status.pid))?.lines().last(),
//!            Some(format!("0::{}", pod.spec.container_cgroup(&id)).as_str()));
//! drop(containerd); // removes the pod, stops containerd and its shims, unmounts, deletes the dir
//! # Ok::<(), anyhow::Error>(())
//! ```
pub mod containerd;
pub mod cri;
pub mod docker;
pub mod host;
pub mod image;

use std::path::PathBuf;

/// A short directory for one instance, `/tmp/observer-rt-PID-NAME`: short because Unix socket
/// paths under it must stay below 108 bytes (`sun_path`), wherever the checkout is.
pub fn scratch_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("observer-rt-{}-{name}", std::process::id()))
}

/// The cgroup2 path of process `pid` (the `0::` line of `/proc/PID/cgroup`).
pub fn cgroup_v2_path(pid: u32) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map_err(|e| anyhow::anyhow!("reading /proc/{pid}/cgroup: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("/proc/{pid}/cgroup has no cgroup2 (`0::`) line:\n{text}"))
}
