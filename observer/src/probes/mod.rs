//! Loading and attaching the kernel programs.
//!
//! Start-up reads the running kernel's record layouts (tracefs) and struct offsets (BTF), hands
//! them to the programs as the `CONFIG` global, loads the object embedded in this binary, and
//! attaches each program whose hook this kernel has. A missing hook is a warning and shows in
//! the status; no hook at all is an error.

pub mod btf;
pub mod tracefs;

use std::{fs, io};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
};
use observer_common::{ProbeConfig, ProbeId, counter};

use self::{
    btf::{KernelBtf, ResetReasons},
    tracefs::{EventFormat, TracefsError},
};

/// The kernel programs, built by build.rs from `observer-ebpf`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer"));

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "observer needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN) to load its kernel programs, \
         and this process has neither: run it as root (`sudo observer run`) or, in Kubernetes, as \
         the privileged DaemonSet in deploy/"
    )]
    Permission,
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error("loading the kernel programs: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("none of observer's probes could be attached on this kernel: {0}")]
    NothingAttached(String),
    #[error("--netns needs the kernel's BTF to find a socket's namespace, and it lacks {0}")]
    NetnsFilter(String),
    #[error("kernel map {0} is missing from the eBPF object (build mismatch)")]
    MissingMap(&'static str),
    #[error("opening kernel map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
}

/// Sizes of the kernel-side buffers.
#[derive(Debug, Clone, Copy)]
pub struct ProbeOptions {
    /// Bytes in the event ring buffer (a power of two, multiple of the page size).
    pub ring_buffer_bytes: u32,
    /// Sockets tracked at once (LRU beyond that).
    pub max_sockets: u32,
    /// Observe only the network namespace with this inode number.
    pub netns: Option<u32>,
}

/// What became of one probe.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProbeStatus {
    pub probe: &'static str,
    /// `tracepoint/<category>/<name>`.
    pub attach: String,
    /// `attached`, `unavailable` (this kernel lacks the hook) or `failed`.
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Attached programs and the maps the daemon reads. Dropping it detaches and unloads everything.
pub struct LoadedProbes {
    pub statuses: Vec<ProbeStatus>,
    pub reasons: ResetReasons,
    /// Things the running kernel lacks that cost precision (missing BTF members, ...).
    pub degraded: Vec<String>,
    pub events: RingBuf<MapData>,
    pub counters: KernelCounters,
    /// The programs' per-socket map (owner, role, state): read for the connection-state gauges.
    pub sockets: BpfHashMap<MapData, u64, observer_common::SocketInfo>,
    /// Sockets found open at start-up, by cookie, for the programs to adopt (`seed` module).
    pub seeds: BpfHashMap<MapData, u64, observer_common::SocketInfo>,
    /// Forwards the programs' aya-log messages to the daemon's log; poll it when readable.
    pub logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// Owns the programs and their links: dropping it detaches and unloads them.
    pub ebpf: Ebpf,
}

/// Per-CPU counters kept by the programs (ring full, socket map full).
pub struct KernelCounters {
    map: PerCpuArray<MapData, u64>,
}

impl KernelCounters {
    fn sum(&self, index: u32) -> u64 {
        self.map.get(&index, 0).map(|per_cpu| per_cpu.iter().sum()).unwrap_or(0)
    }

    /// Events the programs could not put in the full ring buffer.
    pub fn ring_full(&self) -> u64 {
        self.sum(counter::RING_FULL)
    }

    /// Sockets that could not be tracked because the per-socket map was full.
    pub fn socket_map_full(&self) -> u64 {
        self.sum(counter::SOCKET_MAP_FULL)
    }
}

/// Fails early, with what to do, when this process cannot load BPF programs at all.
pub fn check_permissions() -> Result<(), LoadError> {
    if has_bpf_capabilities() { Ok(()) } else { Err(LoadError::Permission) }
}

/// Loads and attaches every probe the running kernel offers.
pub fn load(options: ProbeOptions) -> Result<LoadedProbes, LoadError> {
    check_permissions()?;
    raise_memlock_limit();

    let root = tracefs::tracefs_root()?;
    let mut config = ProbeConfig::ABSENT;
    let mut unavailable: Vec<(ProbeId, String)> = Vec::new();
    for probe in ProbeId::ALL {
        let (category, name) = probe.tracepoint();
        let format = match tracefs::read_format(&root, category, name)? {
            Some(format) => format,
            None => {
                unavailable.push((probe, format!("this kernel has no tracepoint {category}:{name}")));
                continue;
            }
        };
        if let Err(e) = fill_config(&mut config, probe, &format) {
            unavailable.push((probe, e.to_string()));
        }
    }

    let mut degraded = Vec::new();
    let reasons = match KernelBtf::load() {
        Ok(btf) => {
            config.kernel = btf.kernel_offsets(&mut degraded);
            let reasons = ResetReasons::from_btf(&btf);
            if reasons.is_empty() {
                degraded.push("kernel has no enum sk_rst_reason (before 6.10): reset reasons are reported as not_specified".into());
            }
            reasons
        }
        Err(e) => {
            degraded.push(format!("{e}; process attribution at accept(), unread bytes and reset reasons are unavailable"));
            ResetReasons::default()
        }
    };

    if let Some(inum) = options.netns {
        let k = &config.kernel;
        if [k.sock_net, k.net_inum, k.skb_dev, k.netdev_net].contains(&observer_common::ABSENT) {
            return Err(LoadError::NetnsFilter("one of sock.__sk_common.skc_net, net.ns.inum, sk_buff.dev, net_device.nd_net".into()));
        }
        config.netns_filter = inum;
    }

    let mut ebpf = EbpfLoader::new()
        .override_global("CONFIG", &config, true)
        .map_max_entries("EVENTS", options.ring_buffer_bytes)
        .map_max_entries("SOCKETS", options.max_sockets)
        .load(EBPF_OBJECT)
        .map_err(|e| if is_permission_error(&e) { LoadError::Permission } else { LoadError::Load(e) })?;
    // Must be initialised before the programs load: it owns the log map they reference.
    let logger = aya_log::EbpfLogger::init(&mut ebpf)
        .inspect_err(|e| log::warn!("kernel-side log messages unavailable: {e}"))
        .ok();

    let mut statuses = Vec::new();
    for probe in ProbeId::ALL {
        let (category, name) = probe.tracepoint();
        let attach = format!("tracepoint/{category}/{name}");
        if let Some((_, why)) = unavailable.iter().find(|(p, _)| *p == probe) {
            log::warn!("probe {} not attached: {why}", probe.name());
            statuses.push(ProbeStatus { probe: probe.name(), attach, state: "unavailable", error: Some(why.clone()) });
            continue;
        }
        match attach_tracepoint(&mut ebpf, probe, category, name) {
            Ok(()) => {
                log::info!("probe {} attached to {attach}", probe.name());
                statuses.push(ProbeStatus { probe: probe.name(), attach, state: "attached", error: None });
            }
            Err(e) => {
                log::warn!("probe {} failed to attach to {attach}: {e}", probe.name());
                statuses.push(ProbeStatus { probe: probe.name(), attach, state: "failed", error: Some(e) });
            }
        }
    }
    if statuses.iter().all(|s| s.state != "attached") {
        let why: Vec<String> = statuses.iter().filter_map(|s| s.error.as_ref().map(|e| format!("{}: {e}", s.probe))).collect();
        return Err(LoadError::NothingAttached(why.join("; ")));
    }
    for d in &degraded {
        log::warn!("{d}");
    }

    let events = ebpf.take_map("EVENTS").ok_or(LoadError::MissingMap("EVENTS"))?;
    let events = RingBuf::try_from(events).map_err(|source| LoadError::Map { name: "EVENTS", source })?;
    let counters = ebpf.take_map("COUNTERS").ok_or(LoadError::MissingMap("COUNTERS"))?;
    let counters = PerCpuArray::try_from(counters).map_err(|source| LoadError::Map { name: "COUNTERS", source })?;
    let sockets = ebpf.take_map("SOCKETS").ok_or(LoadError::MissingMap("SOCKETS"))?;
    let sockets = BpfHashMap::try_from(sockets).map_err(|source| LoadError::Map { name: "SOCKETS", source })?;
    let seeds = ebpf.take_map("SEEDS").ok_or(LoadError::MissingMap("SEEDS"))?;
    let seeds = BpfHashMap::try_from(seeds).map_err(|source| LoadError::Map { name: "SEEDS", source })?;
    Ok(LoadedProbes { statuses, reasons, degraded, events, counters: KernelCounters { map: counters }, sockets, seeds, logger, ebpf })
}

fn fill_config(config: &mut ProbeConfig, probe: ProbeId, format: &EventFormat) -> Result<(), TracefsError> {
    match probe {
        ProbeId::InetSockSetState => config.set_state = format.set_state_fields()?,
        ProbeId::TcpReceiveReset => config.receive_reset = format.sk_tuple_fields()?,
        ProbeId::TcpSendReset => config.send_reset = format.send_reset_fields()?,
        ProbeId::TcpDestroySock => config.destroy_sock = format.sk_tuple_fields()?,
        ProbeId::SysExitAccept4 => config.accept4_ret = format.required("ret")?,
        ProbeId::SysExitAccept => config.accept_ret = format.required("ret")?,
    }
    Ok(())
}

fn attach_tracepoint(ebpf: &mut Ebpf, probe: ProbeId, category: &str, name: &str) -> Result<(), String> {
    let program: &mut TracePoint = ebpf
        .program_mut(probe.name())
        .ok_or_else(|| "program missing from the eBPF object".to_string())?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    program.load().map_err(|e| format!("verifier rejected it: {e}"))?;
    program.attach(category, name).map_err(|e| format!("{e}"))?;
    Ok(())
}

/// CAP_SYS_ADMIN, or CAP_BPF together with CAP_PERFMON, in the effective set.
fn has_bpf_capabilities() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let Ok(status) = fs::read_to_string("/proc/self/status") else { return true };
    let Some(eff) = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    else {
        return true;
    };
    let has = |cap: u32| eff & (1u64 << cap) != 0;
    has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))
}

fn is_permission_error(e: &aya::EbpfError) -> bool {
    let text = format!("{e:?}");
    text.contains("PermissionDenied") || text.contains("Operation not permitted")
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; newer ones ignore it.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: plain syscall with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        log::debug!(
            "could not raise RLIMIT_MEMLOCK ({}); kernels >= 5.11 do not need it",
            io::Error::last_os_error()
        );
    }
}

/// `uname -r` of the running kernel.
pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_else(|_| "unknown".into())
}
