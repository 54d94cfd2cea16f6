//! `observer run`.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use clap::Args;
use observer::{
    aggregate::Limits,
    api::ConfigSetting,
    daemon::{self, CriSocket, DaemonOptions, PodOptions},
    probes::{ProbeMode, ProbeOptions, SocketStore},
};

use super::logging::LogFormat;

/// `observer run`'s options: each one is a flag (`--max-peers`), an environment variable
/// (`OBSERVER_MAX_PEERS`) and a key of the `--config` file (`max_peers`), all three checked by
/// the same value parser (see [`super::config`]). Precedence: flag > env > file > default.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// A TOML file of `observer run` options, one `key = value` per option, the keys named as
    /// the flags with `_` for `-` (`max_peers = 100`). Flags and environment variables override
    /// it.
    #[arg(long, value_name = "PATH", env = "OBSERVER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address for /metrics, /healthz and /api/v1/status.
    #[arg(long, value_name = "ADDR", default_value_t = SocketAddr::from(([0, 0, 0, 0], super::DEFAULT_PORT)), value_parser = parse_listen, env = "OBSERVER_LISTEN")]
    pub listen: SocketAddr,
    /// Size of the kernel event ring buffer in bytes: a power of two, at least 4096.
    #[arg(long, value_name = "BYTES", default_value_t = 4 << 20, value_parser = parse_ring_size, env = "OBSERVER_RING_BUFFER_SIZE")]
    pub ring_buffer_size: u32,
    /// Sockets the kernel side tracks at once (least recently used ones are evicted).
    #[arg(long, value_name = "N", default_value_t = 65536, value_parser = count(1024, 16_777_216), env = "OBSERVER_MAX_SOCKETS")]
    pub max_sockets: u32,
    /// Peers that keep their own series per (metric, comm, port); less recently active ones are
    /// folded into peer="other".
    #[arg(long, value_name = "N", default_value_t = 50, value_parser = count(1, u32::MAX), env = "OBSERVER_MAX_PEERS")]
    pub max_peers: u32,
    /// Per-connection series in all; past it, new series are folded into one overflow series per
    /// metric (comm, peer and port "other").
    #[arg(long, value_name = "N", default_value_t = 20_000, value_parser = count(100, u32::MAX), env = "OBSERVER_MAX_SERIES")]
    pub max_series: u32,
    /// Observe only one network namespace, e.g. /proc/PID/ns/net or /run/netns/NAME (one pod,
    /// one test). By default every namespace on the host is observed.
    #[arg(long, value_name = "PATH", env = "OBSERVER_NETNS")]
    pub netns: Option<std::path::PathBuf>,
    /// Kernel hooks to use: per hook the tracepoints if the kernel has them, else kprobes
    /// (auto), or one back end for every hook.
    #[arg(long, value_name = "BACKEND", value_enum, default_value_t = ProbeMode::Auto, env = "OBSERVER_PROBES")]
    pub probes: ProbeMode,
    /// Where the kernel programs keep each socket's state: a preallocated hash map of
    /// --max-sockets entries (hash, the cheapest per connection), or socket-local storage on the
    /// socket itself (storage: no size limit and no eviction, memory only for open sockets, but
    /// a kernel allocation per connection; BPF tracepoints only, see BENCHMARKS.md).
    #[arg(long, value_name = "STORE", value_enum, default_value_t = SocketStore::Hash, env = "OBSERVER_SOCKET_STORE")]
    pub socket_store: SocketStore,
    /// Have the kernel count each program's runs and run time (BPF_ENABLE_STATS; adds two clock
    /// reads per run) and export them as observer_probe_runs_total and
    /// observer_probe_run_seconds_total. Also exported, without the flag, while the sysctl
    /// kernel.bpf_stats_enabled is 1.
    #[arg(long, value_parser = parse_switch, env = "OBSERVER_PROBE_STATS")]
    pub probe_stats: bool,
    /// Follow the HTTP/1.x exchanges on TCP connections (plain-text HTTP/1.x only: not TLS, not
    /// HTTP/2): each closed connection says where in its exchange it ended (`http` in
    /// /api/v1/events), and a response cut short counts as premature kind truncated_response.
    /// Needs the BTF tracepoints sock_send_length and sock_recv_length (Linux 6.3+, x86_64).
    /// Costs a map lookup per send and receive on tracked TCP sockets (BENCHMARKS.md).
    #[arg(long, value_parser = parse_switch, env = "OBSERVER_HTTP")]
    pub http: bool,
    /// The container runtime's CRI socket, asked which pod each container belongs to (the
    /// namespace, pod and container labels). By default the usual sockets of containerd, CRI-O,
    /// k3s and cri-dockerd are tried (also under /host); `none` turns pod names off.
    #[arg(long, value_name = "PATH", env = "OBSERVER_CRI_SOCKET")]
    pub cri_socket: Option<PathBuf>,
    /// Deadline of each call to the container runtime: a slow runtime delays pod names, never
    /// the event path.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration, env = "OBSERVER_CRI_TIMEOUT")]
    pub cri_timeout: Duration,
    /// How long the series of a container that is gone (its cgroup removed: the pod deleted or
    /// the container restarted) are still exported, so that every scrape collects their final
    /// counts; then they are removed (observer_series_expired_total).
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration, env = "OBSERVER_EXPIRE_GONE_AFTER")]
    pub expire_gone_after: Duration,
    /// Write each event-log record (resets and premature closes) as one JSON line on stdout,
    /// in the schema of /api/v1/events, for the cluster's log pipeline (Fluent Bit, Vector,
    /// Loki). The daemon's own log stays on stderr.
    #[arg(long, value_parser = parse_switch, env = "OBSERVER_LOG_EVENTS")]
    pub log_events: bool,
    /// The daemon's own log on stderr: human-readable lines, or one JSON object per line
    /// (timestamp, level, target, fields with the message). RUST_LOG sets the level (default
    /// info).
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = LogFormat::Text, env = "OBSERVER_LOG_FORMAT")]
    pub log_format: LogFormat,
}

/// A switch: also from the environment and the file, where it is a value.
fn parse_switch(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Ok(true),
        "false" | "no" | "off" | "0" => Ok(false),
        _ => Err("must be true or false".into()),
    }
}

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| "must be IP:PORT, e.g. 0.0.0.0:9645 or [::]:9645".to_string())
}

/// A whole number from `min` to `max`, saying so when it is not.
fn count(min: u32, max: u32) -> impl Fn(&str) -> Result<u32, String> + Clone + Send + Sync + 'static {
    move |s| {
        let allowed = if max == u32::MAX { format!("at least {min}") } else { format!("from {min} to {max}") };
        match s.trim().parse::<u32>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            Ok(_) => Err(format!("must be {allowed}")),
            Err(_) if s.trim().parse::<u64>().is_ok() || s.trim().starts_with('-') => Err(format!("must be {allowed}")),
            Err(_) => Err(format!("must be a whole number {allowed}")),
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("must be a duration such as 500ms, 2s or 5m ({e})"))
}

fn parse_ring_size(s: &str) -> Result<u32, String> {
    let allowed = "must be a power of two of at least 4096 (e.g. 4194304 for 4 MiB)";
    match s.trim().parse::<u32>() {
        Ok(n) if n >= 4096 && n.is_power_of_two() => Ok(n),
        _ => Err(allowed.to_string()),
    }
}

/// Opens a network namespace file and returns it with its inode number. The caller keeps the
/// file open while the daemon runs: an open namespace cannot die, so its inode number cannot be
/// handed to a new namespace that the filter would then watch by mistake.
fn open_netns(path: &std::path::Path) -> anyhow::Result<(std::fs::File, u32)> {
    use std::os::unix::fs::MetadataExt as _;
    let hint = "give a network namespace file such as /proc/PID/ns/net or /run/netns/NAME";
    let file = std::fs::File::open(path).map_err(|e| anyhow::anyhow!("--netns {}: {e}; {hint}", path.display()))?;
    let meta = file.metadata().map_err(|e| anyhow::anyhow!("--netns {}: {e}; {hint}", path.display()))?;
    // SAFETY: fstatfs on an open fd into a zeroed statfs.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    let is_nsfs =
        unsafe { libc::fstatfs(std::os::fd::AsRawFd::as_raw_fd(&file), &mut fs) } == 0 && fs.f_type == NSFS_MAGIC;
    if !is_nsfs {
        anyhow::bail!("--netns {}: not a namespace file; {hint}", path.display());
    }
    let inode = u32::try_from(meta.ino())
        .map_err(|_| anyhow::anyhow!("--netns {}: inode {} is not a namespace inode", path.display(), meta.ino()))?;
    Ok((file, inode))
}

/// `NSFS_MAGIC` from linux/magic.h: the file system of /proc/PID/ns/*.
const NSFS_MAGIC: libc::__fsword_t = 0x6e73_6673;

/// Runs the daemon with `args`; `config` is what [`super::config`] resolved them from, for the
/// status.
pub async fn run(args: RunArgs, config: BTreeMap<String, ConfigSetting>) -> anyhow::Result<()> {
    let netns = args.netns.as_deref().map(open_netns).transpose()?;
    // Held open until the daemon exits (see open_netns).
    let (_netns_file, netns) = match netns {
        Some((file, inode)) => (Some(file), Some(inode)),
        None => (None, None),
    };
    daemon::run(DaemonOptions {
        listen: args.listen,
        probes: ProbeOptions {
            ring_buffer_bytes: args.ring_buffer_size,
            max_sockets: args.max_sockets,
            netns,
            mode: args.probes,
            socket_store: args.socket_store,
            http: args.http,
        },
        limits: Limits { max_peers: args.max_peers as usize, max_series: args.max_series as usize },
        probe_stats: args.probe_stats,
        pods: PodOptions {
            socket: match args.cri_socket {
                None => CriSocket::Discover,
                Some(p) if p.as_os_str() == "none" => CriSocket::Off,
                Some(p) => CriSocket::Path(p),
            },
            timeout: args.cri_timeout,
            expire_after: args.expire_gone_after,
        },
        log_events: args.log_events,
        config,
    })
    .await
}
