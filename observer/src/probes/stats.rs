//! What observer's own kernel programs cost: the kernel's per-program run counters (`run_cnt`,
//! `run_time_ns` of `bpf_prog_info`).
//!
//! The kernel only counts while BPF statistics are on: system-wide through the
//! `kernel.bpf_stats_enabled` sysctl, or for as long as some process holds the file descriptor
//! `BPF_ENABLE_STATS` returns (5.8+), which is what `--probe-stats` does. Counting adds two clock
//! reads to every program run, so it is off by default.

use std::{fs, os::fd::OwnedFd};

use aya::{
    programs::loaded_programs,
    sys::{Stats, enable_stats},
};

use super::ProbeStatus;

const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Turns the kernel's run-time statistics on until the returned descriptor is dropped.
pub fn enable() -> Result<OwnedFd, String> {
    enable_stats(Stats::RunTime).map_err(|e| {
        format!(
            "--probe-stats: the kernel would not turn on BPF run-time statistics ({e}); it needs Linux 5.8+ and \
             CAP_SYS_ADMIN, or set the sysctl kernel.bpf_stats_enabled=1 instead"
        )
    })
}

/// Whether the sysctl `kernel.bpf_stats_enabled` is 1. It does not show a `BPF_ENABLE_STATS`
/// descriptor held by anyone (the kernel counts for both, but the sysctl reports only itself).
pub fn sysctl_on() -> bool {
    fs::read_to_string(SYSCTL).is_ok_and(|v| v.trim() == "1")
}

/// One attached program's totals since it was loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramRuns {
    /// `ProbeId::name()`: the `probe` label.
    pub probe: &'static str,
    pub runs: u64,
    pub run_ns: u64,
}

impl ProgramRuns {
    /// Mean nanoseconds per run, `None` before the first counted run.
    pub fn ns_per_run(&self) -> Option<f64> {
        (self.runs > 0).then(|| self.run_ns as f64 / self.runs as f64)
    }
}

/// The run counters of the attached programs among `probes`, read from the kernel by program id.
/// A program the kernel no longer lists (unloaded meanwhile) is left out.
pub fn read(probes: &[ProbeStatus]) -> Vec<ProgramRuns> {
    let ours: Vec<(u32, &'static str)> = probes.iter().filter_map(|p| Some((p.program_id?, p.probe))).collect();
    if ours.is_empty() {
        return Vec::new();
    }
    let mut runs = Vec::with_capacity(ours.len());
    for info in loaded_programs() {
        let info = match info {
            Ok(info) => info,
            Err(e) => {
                log::debug!("listing the kernel's BPF programs: {e}");
                continue;
            }
        };
        if let Some((_, probe)) = ours.iter().find(|(id, _)| *id == info.id()) {
            let run_ns = u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX);
            runs.push(ProgramRuns { probe, runs: info.run_count(), run_ns });
        }
    }
    // In the order the probes were attached, whatever order the kernel lists them in.
    runs.sort_by_key(|r| ours.iter().position(|(_, p)| *p == r.probe));
    runs
}
