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
//! | [`metrics`] | the Prometheus text format the daemon serves, parsed and summed by labels |
//! | [`net`] | network namespaces (unshare, `lo` up, interface flags, veth pairs) and socket knobs (SO_LINGER 0, TCP_USER_TIMEOUT, TCP_SYNCNT, bind before connect, poll) |
//! | [`process`] | naming a process (PR_SET_NAME), signals, and running commands with failures that name them |
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
pub mod metrics;
pub mod net;
pub mod process;
#[cfg(feature = "runtime")]
pub mod runtime;
pub mod worker;

pub use daemon::Daemon;
pub use metrics::Metrics;

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
