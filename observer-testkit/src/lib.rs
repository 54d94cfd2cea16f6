//! # observer-testkit
//!
//! What observer's end-to-end tests (`observer/tests/e2e`) and its benchmarks (`observer-bench`,
//! run by `cargo xtask bench`) both need, written once. Dev-only: never published, never linked
//! into the daemon.
//!
//! | module | what |
//! |---|---|
//! | [`daemon`] | spawn `observer run ...`, wait until `/healthz` answers 200, read its log, signal and stop it (SIGTERM, wait) |
//! | [`http`] | GET against the daemon with `ureq` (status line, headers, de-chunked body) |
//! | [`incident`] | the incident of the README's walk-through: nginx, a Go backend that cuts, closes and aborts, a Go client that retries; nginx's logs parsed as ground truth |
//! | [`metrics`] | the Prometheus text format the daemon serves, parsed and summed by labels |
//! | [`net`] | network namespaces (unshare, `lo` up, interface flags, veth pairs) and socket knobs (SO_LINGER 0, TCP_USER_TIMEOUT, TCP_SYNCNT, bind before connect, poll) |
//! | [`process`] | naming a process (PR_SET_NAME), signals, and running commands with failures that name them |
//! | [`prometheus`] | a real Prometheus server of a test's own scraping the daemon, and PromQL through its HTTP API |
//! | [`runtime`] | real container runtimes: containerd driven through CRI as the kubelet does, dockerd, registry-less OCI images |
//!
//! System calls go through `socket2` and `rustix` where those crates have them; the few they
//! lack (TCP_SYNCNT, IP_BIND_ADDRESS_NO_PORT, the interface-flags ioctls, `unshare`, which
//! rustix marks unsafe) are small `unsafe` blocks in [`net`], each with its reason.
//!
//! Nothing here needs a file at run time beyond what the tests already use (`ip`, `bpftool`): the
//! e2e test binary keeps working inside the initramfs of `cargo xtask test --kernel`. The one
//! exception is [`runtime`], which runs the host's containerd, runc and dockerd: only the
//! host-only `runtime` test target uses it, through the `runtime` feature (off for xtask, which
//! must build before `cargo xtask setup` has installed protoc).
//!
//! ```no_run
//! use std::{path::Path, time::Duration};
//! use observer_testkit::daemon::{Daemon, Options};
//!
//! let daemon = Daemon::start(Path::new("target/debug/observer"), &["--netns", "/proc/1/ns/net"], &Options::default())?;
//! let metrics = daemon.metrics()?;
//! println!("{} events seen", metrics.events_seen());
//! daemon.stop()?;
//! # Ok::<(), anyhow::Error>(())
//! ```
pub mod daemon;
pub mod http;
pub mod incident;
pub mod metrics;
pub mod net;
pub mod process;
pub mod prometheus;
#[cfg(feature = "runtime")]
pub mod runtime;
pub mod worker;

pub use daemon::Daemon;
pub use metrics::Metrics;

/// The problems one trial found: it goes on checking after the first, and fails with all of them.
#[derive(Default)]
pub struct Problems(Vec<String>);

impl Problems {
    pub fn push(&mut self, problem: impl Into<String>) {
        self.0.push(problem.into());
    }

    /// Notes a problem unless `got == want`: `what` names the count.
    pub fn eq<T: PartialEq + std::fmt::Debug>(&mut self, what: &str, got: T, want: T) {
        if got != want {
            self.push(format!("{what}: got {got:?}, want {want:?}"));
        }
    }

    pub fn finish(self) -> anyhow::Result<()> {
        if self.0.is_empty() {
            return Ok(());
        }
        anyhow::bail!("{} problem(s):\n- {}", self.0.len(), self.0.join("\n- "))
    }
}

/// The `reason` label the running kernel gives an active reset named `name`: 6.12 named them;
/// 6.10-6.11 and older kernels report none.
pub fn active_reset_reason(name: &'static str) -> &'static str {
    if kernel_version() >= (6, 12) { name } else { "not_specified" }
}

/// The running kernel's version as (major, minor), from `/proc/sys/kernel/osrelease`.
pub fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    parse_kernel_version(&release)
}

fn parse_kernel_version(release: &str) -> (u32, u32) {
    let mut it = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    #[test]
    fn kernel_versions() {
        assert_eq!(super::parse_kernel_version("6.18.44-fc-v657\n"), (6, 18));
        assert_eq!(super::parse_kernel_version("6.1.0-56-cloud-amd64"), (6, 1));
        assert_eq!(super::parse_kernel_version(""), (0, 0));
    }
}
