//! What the benchmark reads from /proc: a process's memory and CPU time, the machine's CPU
//! time (to notice load that is not ours), and the machine's description.
use std::{collections::HashMap, fs, process::Command, time::Instant};

use anyhow::{Context as _, Result, anyhow};
use serde::{Deserialize, Serialize};

use observer_testkit::process as cmd;

/// `VmRSS` and `VmHWM` (peak RSS) of `pid`, in KiB.
pub fn memory_kib(pid: u32) -> Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| anyhow!("{path} has no {name} line"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Where a process's resident memory is, in KiB.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MemoryBreakdown {
    pub rss: u64,
    /// Heap and other private anonymous memory.
    pub anon: u64,
    /// File-backed pages (the binary, libraries) and mmapped BPF maps (the ring buffer).
    pub file: u64,
    /// Of `file`: mappings of BPF maps (`anon_inode:bpf-map`); the ring buffer's data pages
    /// are mapped twice, so they count double here, as they do in VmRSS.
    pub bpf_maps: u64,
}

pub fn memory_breakdown(pid: u32) -> Result<MemoryBreakdown> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    let smaps_path = format!("/proc/{pid}/smaps");
    let smaps = fs::read_to_string(&smaps_path).with_context(|| format!("reading {smaps_path}"))?;
    let mut bpf_maps = 0;
    let mut in_bpf_map = false;
    for line in smaps.lines() {
        if let Some(rss) = line.strip_prefix("Rss:") {
            if in_bpf_map {
                bpf_maps += rss.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap_or(0);
            }
        } else if line
            .split_whitespace()
            .next()
            .is_some_and(|w| w.contains('-') && w.chars().all(|c| c.is_ascii_hexdigit() || c == '-'))
        {
            in_bpf_map = line.ends_with("anon_inode:bpf-map");
        }
    }
    Ok(MemoryBreakdown { rss: field("VmRSS:"), anon: field("RssAnon:"), file: field("RssFile:"), bpf_maps })
}

/// Context switches (voluntary and not) of all of `pid`'s threads so far: how often it went to
/// sleep and was woken, or was preempted.
pub fn context_switches(pid: u32) -> Result<u64> {
    let dir = format!("/proc/{pid}/task");
    let mut total = 0;
    for task in fs::read_dir(&dir).with_context(|| format!("reading {dir}"))?.filter_map(std::result::Result::ok) {
        // A thread may exit between listing and reading: skip it.
        let Ok(status) = fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        total += status
            .lines()
            .filter(|l| l.starts_with("voluntary_ctxt_switches:") || l.starts_with("nonvoluntary_ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
    }
    Ok(total)
}

/// CPU time of `pid`'s current threads in nanoseconds (`/proc/PID/task/*/schedstat`): finer
/// than the clock ticks of /proc/PID/stat, for short measurements.
pub fn thread_cpu_ns(pid: u32) -> Result<u64> {
    let dir = format!("/proc/{pid}/task");
    let mut total = 0;
    for task in fs::read_dir(&dir).with_context(|| format!("reading {dir}"))?.filter_map(std::result::Result::ok) {
        let Ok(stat) = fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        total += stat.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    Ok(total)
}

/// User + system CPU time `pid` has used (all its threads), in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) may contain spaces and parentheses: count from the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or_else(|| anyhow!("{path}: no ')' in {stat:?}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime field 14, stime field 15 (proc(5)).
    let ticks = |i: usize| -> Result<u64> {
        fields.get(i - 3).and_then(|f| f.parse().ok()).ok_or_else(|| anyhow!("{path}: field {i} missing"))
    };
    Ok((ticks(14)? + ticks(15)?) as f64 / clock_ticks())
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// Processes other than `ours` that hold BPF programs (`pid comm`): anything attached to the
/// same hooks slows every arm of a comparison, the baseline included, so it is recorded.
pub fn other_bpf_holders(ours: &[u32]) -> Vec<String> {
    let Ok(procs) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in procs.filter_map(std::result::Result::ok) {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if ours.contains(&pid) || pid == std::process::id() {
            continue;
        }
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let holds = fds
            .filter_map(std::result::Result::ok)
            .any(|fd| fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:bpf-prog"));
        if holds {
            let comm = fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            found.push(format!("{pid} {}", comm.trim()));
        }
    }
    found
}

/// CPU seconds of every task except `ours`, and whether each is another user-space process
/// (kernel threads, children of kthreadd, are not: ksoftirqd and kworkers also carry our own
/// traffic's work; nor is this xtask, which only measures).
fn other_tasks(ours: &[u32]) -> HashMap<u32, (f64, bool)> {
    let Ok(procs) = fs::read_dir("/proc") else {
        return HashMap::new();
    };
    let me = std::process::id();
    procs
        .filter_map(std::result::Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| !ours.contains(pid))
        .filter_map(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            // Field 4 is the parent pid; utime and stime are fields 14 and 15.
            let ppid: u32 = fields.get(1)?.parse().ok()?;
            let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
            let user_space = pid != 2 && ppid != 2 && pid != me;
            Some((pid, (ticks as f64 / clock_ticks(), user_space)))
        })
        .collect()
}

/// The first three fields of /proc/loadavg.
pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// What only /proc/stat knows (its `cpu` line), in seconds so far.
#[derive(Debug, Clone, Copy)]
pub struct MachineCpu {
    pub at: Instant,
    pub softirq: f64,
    /// Time the hypervisor ran something else on our virtual CPUs.
    pub steal: f64,
}

impl MachineCpu {
    pub fn now() -> Result<Self> {
        let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let line = stat.lines().find(|l| l.starts_with("cpu ")).context("/proc/stat has no cpu line")?;
        let v: Vec<f64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
        // user nice system idle iowait irq softirq steal ...
        if v.len() < 8 {
            anyhow::bail!("/proc/stat cpu line too short: {line}");
        }
        let hz = clock_ticks();
        Ok(Self { at: Instant::now(), softirq: v[6] / hz, steal: v[7] / hz })
    }
}

/// CPU use over one measured window, in cores (1.0 = one core fully busy), from each task's
/// own CPU account.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CpuUse {
    /// The whole machine: every task, kernel threads included.
    pub machine: f64,
    /// Softirq time from /proc/stat (loopback packet processing), tick-sampled and so only
    /// indicative; it is also in the account of the task it interrupted, mostly the generator.
    pub softirq: f64,
    /// The load generator.
    pub load: f64,
    /// The tool under test (daemon, bpftrace, tcplife), 0 without one.
    pub tool: f64,
    /// Other user-space processes on the machine (builds by others, virtual machines), as
    /// sampled from /proc at both ends of the window.
    pub other: f64,
    /// Stolen by the hypervisor (other virtual machines on the host).
    #[serde(default)]
    pub steal: f64,
}

/// Samples of the machine and of our processes at one instant.
pub struct CpuSample {
    machine: MachineCpu,
    load: f64,
    tool: f64,
    /// CPU seconds so far of every other task on the machine, by pid, and whether it is a
    /// user-space process (not a kernel thread, not this xtask).
    others: HashMap<u32, (f64, bool)>,
}

impl CpuSample {
    pub fn now(load_pid: u32, tool_pid: Option<u32>) -> Result<Self> {
        Ok(Self {
            machine: MachineCpu::now()?,
            load: cpu_seconds(load_pid)?,
            tool: tool_pid.map(cpu_seconds).transpose()?.unwrap_or(0.0),
            others: other_tasks(&[load_pid, tool_pid.unwrap_or(0)]),
        })
    }

    pub fn until(&self, later: &CpuSample) -> CpuUse {
        let secs = later.machine.at.duration_since(self.machine.at).as_secs_f64().max(1e-9);
        let softirq = (later.machine.softirq - self.machine.softirq) / secs;
        let load = (later.load - self.load) / secs;
        let tool = (later.tool - self.tool) / secs;
        let steal = (later.machine.steal - self.machine.steal) / secs;
        // Processes that started during the window count from zero; those that ended during
        // it are missed (their CPU time is gone with them).
        let (mut all, mut user) = (0.0, 0.0);
        for (pid, (t, user_space)) in &later.others {
            let d = t - self.others.get(pid).map_or(0.0, |o| o.0);
            if d > 0.0 {
                all += d;
                if *user_space {
                    user += d;
                }
            }
        }
        CpuUse {
            // Summed over tasks, not taken from /proc/stat: with a tickless kernel that misses
            // most of a bursty (paced) load's time, while each task's own account does not.
            machine: load + tool + all / secs,
            softirq,
            load,
            tool,
            other: user / secs,
            steal,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub ram_mib: u64,
    pub kernel: String,
    pub os: String,
    pub date_utc: String,
    /// `git describe`-like revision of the working tree the daemon was built from.
    pub git_revision: String,
}

impl Machine {
    pub fn describe(root: &std::path::Path) -> Self {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let cores = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
        let ram_mib = fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines().find_map(|l| {
                    l.strip_prefix("MemTotal:").and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                })
            })
            .map_or(0, |kib| kib / 1024);
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let os = fs::read_to_string("/etc/os-release")
            .ok()
            .and_then(|r| {
                r.lines().find_map(|l| l.strip_prefix("PRETTY_NAME=").map(|v| v.trim_matches('"').to_string()))
            })
            .unwrap_or_else(|| "unknown".into());
        let date_utc = cmd::stdout(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M:%S UTC"]))
            .map(|d| d.trim().to_string())
            .unwrap_or_default();
        let git =
            |args: &[&str]| cmd::stdout(Command::new("git").current_dir(root).args(args)).map(|s| s.trim().to_string());
        let git_revision = match (
            git(&["rev-parse", "--short=12", "HEAD"]),
            git(&["status", "--porcelain", "--untracked-files=no"]),
        ) {
            (Ok(rev), Ok(changes)) if !changes.is_empty() => format!("{rev} + uncommitted changes"),
            (Ok(rev), _) => rev,
            (Err(_), _) => "unknown".into(),
        };
        Self { cpu_model, cores, ram_mib, kernel, os, date_utc, git_revision }
    }
}
