//! Loading and attaching the kernel programs.
//!
//! Start-up reads the running kernel's record layouts (tracefs), struct offsets and function
//! prototypes (BTF), hands them to the programs as the `CONFIG` global, loads the object
//! embedded in this binary, picks a back end per hook (`select`: the BTF tracepoints where the
//! kernel has and loads them, the tracepoints where it has them, kprobes otherwise, or what
//! `--probes` forces) and attaches that back end's programs. A program whose hook point is missing is a warning and shows in the status; nothing
//! attached at all is an error.

pub mod btf;
pub mod select;
pub mod stats;
pub mod tracefs;

use std::{
    collections::HashSet,
    fs,
    io::{self, BufRead as _},
    path::Path,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, KProbe, TracePoint},
};
use observer_common::{
    ABSENT, AttachPoint, Backend, Hook, KernelOffsets, ProbeConfig, ProbeId, SOCKET_STORE_HASH, SOCKET_STORE_LOCAL,
    counter,
};

pub use self::select::{ProbeMode, SocketStore};
use self::{
    btf::KernelBtf,
    select::Unavailable,
    tracefs::{EventFormat, TracefsError},
};
use crate::reasons::ResetReasons;

/// The kernel programs, built by build.rs from `observer-ebpf`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer"));

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "observer needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN) to load its kernel programs, \
         and this process lacks {missing}: run it as root (`sudo observer run`) or, in Kubernetes, \
         with deploy/kubernetes/overlays/least-privilege (or privileged)"
    )]
    Permission { missing: String },
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error("loading the kernel programs: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("none of observer's probes could be attached on this kernel: {0}")]
    NothingAttached(String),
    #[error("--netns needs the kernel's BTF to find a socket's namespace, and it lacks {0}")]
    NetnsFilter(String),
    #[error("--http cannot follow HTTP exchanges on this kernel: {0}. Run without --http (every other metric works)")]
    HttpCapture(String),
    #[error("--socket-store storage cannot be used here: {0}. Run with --socket-store hash (the default)")]
    SocketStorage(String),
    #[error("kernel map {0} is missing from the eBPF object (build mismatch)")]
    MissingMap(&'static str),
    #[error("opening kernel map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
}

/// Sizes of the kernel-side buffers, and which back ends to use.
#[derive(Debug, Clone, Copy)]
pub struct ProbeOptions {
    /// Bytes in the event ring buffer (a power of two, multiple of the page size).
    pub ring_buffer_bytes: u32,
    /// Sockets tracked at once (LRU beyond that).
    pub max_sockets: u32,
    /// Observe only the network namespace with this inode number.
    pub netns: Option<u32>,
    /// `--probes`: the back end of every hook, or `auto` to pick per hook.
    pub mode: ProbeMode,
    /// `--socket-store`: where the programs keep per-socket state.
    pub socket_store: SocketStore,
    /// `--http`: attach the HTTP capture programs too.
    pub http: bool,
}

/// The HTTP capture's programs (`--http`): BTF tracepoints whatever `--probes` says, since no
/// other back end has them.
pub const HTTP_CAPTURE: [ProbeId; 2] = [ProbeId::BtfSockSendLength, ProbeId::BtfSockRecvLength];

/// Whether a probe is attached and, if not, why not, in a word (the `error` says the rest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeState {
    /// Loaded and attached: its events count.
    Attached,
    /// This kernel lacks its hook point (or what the program needs to read).
    Unavailable,
    /// The hook exists but loading or attaching failed (verifier, permissions, ...).
    Failed,
}

impl ProbeState {
    /// `attached`, `unavailable`, `failed`: as the status API and `observer status` show it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Attached => "attached",
            Self::Unavailable => "unavailable",
            Self::Failed => "failed",
        }
    }
}

/// Why one program could not be loaded or attached.
#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    #[error("program missing from the eBPF object (build mismatch)")]
    Missing,
    #[error("verifier rejected it: {0}")]
    Verifier(String),
    #[error("the kernel's BTF could not be read, and a BTF tracepoint is loaded against it")]
    NoBtf,
    #[error(transparent)]
    Aya(#[from] aya::programs::ProgramError),
}

/// What became of one probe.
#[derive(Debug, Clone)]
pub struct ProbeStatus {
    pub probe: &'static str,
    /// The logical hook it serves (`set_state`, `receive_reset`, `send_reset`, `destroy`,
    /// `accept`).
    pub hook: &'static str,
    /// `btf`, `tracepoint` or `kprobe`: the back end chosen for its hook.
    pub backend: &'static str,
    /// `tp_btf/<name>`, `tracepoint/<category>/<name>`, `kprobe/<function>` or
    /// `kretprobe/<function>`.
    pub attach: String,
    pub state: ProbeState,
    pub error: Option<String>,
    /// The kernel's id of the attached program (`bpftool prog show id N`).
    pub program_id: Option<u32>,
}

/// Attached programs and the maps the daemon reads. Dropping it detaches and unloads everything.
pub struct LoadedProbes {
    pub statuses: Vec<ProbeStatus>,
    pub reasons: ResetReasons,
    /// Things the running kernel lacks that cost precision (missing BTF members, ...).
    pub degraded: Vec<String>,
    pub ring_buffer: RingBuf<MapData>,
    pub counters: KernelCounters,
    /// The programs' per-socket state (owner, role, state): read for the connection-state
    /// gauges.
    pub sockets: SocketSource,
    /// Sockets found open at start-up, by cookie, for the programs to adopt (`seed` module).
    pub seeds: BpfHashMap<MapData, u64, observer_common::SocketInfo>,
    /// Forwards the programs' aya-log messages to the daemon's log; poll it when readable.
    pub logger: Option<KernelLogger>,
    /// Owns the programs and their links: dropping it detaches and unloads them.
    pub ebpf: Ebpf,
}

/// Forwards the programs' aya-log messages to the daemon's log.
pub type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// Where the daemon reads the programs' per-socket state from: socket-local storage when the
/// BTF tracepoints serve every socket hook (read back through sock_diag, in the observed
/// namespace or all of them), else the `SOCKETS` hash.
pub enum SocketSource {
    Storage { map: MapData, netns: Option<u32> },
    Hash(BpfHashMap<MapData, u64, observer_common::SocketInfo>),
}

impl SocketSource {
    /// In socket-local storage, an accepted socket's entry has no owner: the accept programs
    /// cannot reach it, so the daemon joins the owner from their `ConnectionOpened`.
    pub fn owners_joined_by_daemon(&self) -> bool {
        matches!(self, Self::Storage { .. })
    }
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
    match missing_bpf_capabilities() {
        None => Ok(()),
        Some(missing) => Err(LoadError::Permission { missing }),
    }
}

/// What the running kernel offers, read before anything is loaded.
pub struct KernelSetup {
    pub config: ProbeConfig,
    /// Programs that cannot be attached here, and why.
    pub unavailable: Unavailable,
    pub reasons: ResetReasons,
    pub degraded: Vec<String>,
    /// BTF members only the kprobe and BTF tracepoint back ends use that this kernel lacks, and
    /// arguments they cannot read.
    pub kprobe_missing: Vec<String>,
}

/// Where the kernel lists its kprobe PMU (4.17+); older kernels create kprobes in tracefs.
const KPROBE_PMU: &str = "/sys/bus/event_source/devices/kprobe";
const KALLSYMS: &str = "/proc/kallsyms";

/// The BTF tracepoint programs of the socket hooks (all but the HTTP capture's): with
/// `--socket-store storage` they keep each socket's state where the other back ends' programs
/// cannot reach it, so they must serve all four socket hooks (see [`load`]).
fn btf_socket_programs() -> impl Iterator<Item = ProbeId> {
    ProbeId::ALL.into_iter().filter(|p| p.backend() == Backend::Btf && !HTTP_CAPTURE.contains(p))
}

/// Reads record layouts, BTF and the kernel's kprobe support into a configuration and the list
/// of programs that cannot be attached.
pub fn kernel_setup() -> Result<KernelSetup, LoadError> {
    let root = tracefs::tracefs_root()?;
    let mut config = ProbeConfig::ABSENT;
    let mut unavailable = Unavailable::new();
    for probe in ProbeId::ALL {
        let AttachPoint::Tracepoint(category, name) = probe.attach_point() else { continue };
        let format = match tracefs::read_format(&root, category, name)? {
            Some(format) => format,
            None => {
                unavailable.insert(probe, format!("this kernel has no tracepoint {category}:{name}"));
                continue;
            }
        };
        if let Err(e) = fill_config(&mut config, probe, &format) {
            unavailable.insert(probe, e.to_string());
        }
    }

    let mut degraded = Vec::new();
    let mut kprobe_missing = Vec::new();
    let (reasons, btf_error) = match KernelBtf::load() {
        Ok(btf) => {
            config.kernel = btf.kernel_offsets(&mut degraded);
            btf.endpoint_offsets(&mut config.kernel, &mut kprobe_missing);
            config.kprobe = btf.kprobe_args();
            config.btf = btf.btf_args();
            match btf.payload_config() {
                Ok(payload) => config.payload = payload,
                Err(why) => {
                    for probe in HTTP_CAPTURE {
                        unavailable.insert(probe, why.clone());
                    }
                }
            }
            if config.btf.send_reset_reason != ABSENT
                && !observer_common::BTF_REASON_ARGS.contains(&config.btf.send_reset_reason)
            {
                kprobe_missing.push(format!("tp_btf/tcp_send_reset takes its reason as argument {}, which the program is not built to read: its resets are reported as not_specified", config.btf.send_reset_reason));
                config.btf.send_reset_reason = ABSENT;
            }
            for probe in ProbeId::ALL {
                let AttachPoint::BtfTracepoint(name) = probe.attach_point() else { continue };
                if btf.btf_tracepoint_args(name).is_none() {
                    unavailable.insert(
                        probe,
                        format!("this kernel has no BTF tracepoint {name} (no btf_trace_{name} in its BTF)"),
                    );
                }
            }
            let args = &mut config.kprobe;
            for (function, index) in [
                ("tcp_send_active_reset", &mut args.active_reset_reason),
                ("tcp_v4_send_reset", &mut args.v4_reset_reason),
                ("tcp_v6_send_reset", &mut args.v6_reset_reason),
            ] {
                if *index != ABSENT && !observer_common::KPROBE_REASON_ARGS.contains(index) {
                    kprobe_missing.push(format!("{function}() takes its reason as argument {index}, which the kprobe is not built to read: its resets are reported as not_specified"));
                    *index = ABSENT;
                }
            }
            let reasons = btf.reset_reasons();
            if reasons.is_empty() {
                degraded.push(
                    "kernel has no enum sk_rst_reason (before 6.10): reset reasons are reported as not_specified"
                        .into(),
                );
            }
            (reasons, None)
        }
        Err(e) => {
            degraded
                .push(format!("{e}; process attribution at accept(), unread bytes and reset reasons are unavailable"));
            for probe in ProbeId::ALL.into_iter().filter(|p| p.backend() == Backend::Btf) {
                unavailable.insert(probe, format!("BTF tracepoints need the kernel's BTF: {e}"));
            }
            (ResetReasons::default(), Some(e.to_string()))
        }
    };
    for probe in ProbeId::ALL.into_iter().filter(|p| p.backend() == Backend::Btf) {
        let missing = missing_endpoint_offsets(probe, &config.kernel);
        if !missing.is_empty() && !unavailable.contains_key(&probe) {
            unavailable.insert(probe, format!("kernel BTF lacks {}", missing.join(", ")));
        }
    }

    let kprobes = kprobe_support(&root);
    let functions = kernel_functions();
    for probe in ProbeId::ALL {
        let Some(function) = probe.attach_point().function() else { continue };
        let why = if let Err(why) = &kprobes {
            why.clone()
        } else if let Some(e) = &btf_error {
            format!("kprobes need the kernel's BTF for struct offsets: {e}")
        } else if functions.as_ref().is_ok_and(|f| !f.contains(function)) {
            format!(
                "this kernel has no function {function} to probe (not in {KALLSYMS}: not built, inlined or renamed)"
            )
        } else if let missing = missing_endpoint_offsets(probe, &config.kernel)
            && !missing.is_empty()
        {
            format!("kernel BTF lacks {}", missing.join(", "))
        } else {
            continue;
        };
        unavailable.insert(probe, why);
    }
    if let Err(e) = &functions {
        log::debug!("{KALLSYMS}: {e}; assuming the kprobed functions exist");
    }
    Ok(KernelSetup { config, unavailable, reasons, degraded, kprobe_missing })
}

/// Whether kprobes can be created: a kprobe PMU, or tracefs's `kprobe_events` (before 4.17).
pub fn kprobe_support(tracefs_root: &Path) -> Result<(), String> {
    if Path::new(KPROBE_PMU).exists() || tracefs_root.join("kprobe_events").exists() {
        Ok(())
    } else {
        Err(format!(
            "this kernel has no kprobes (no {KPROBE_PMU}, no kprobe_events in tracefs: it was built without CONFIG_KPROBES)"
        ))
    }
}

/// The kprobed functions the kernel has (text symbols in /proc/kallsyms, modules included).
pub fn kernel_functions() -> io::Result<HashSet<String>> {
    let wanted: HashSet<&str> = ProbeId::ALL.iter().filter_map(|p| p.attach_point().function()).collect();
    let mut found = HashSet::new();
    for line in io::BufReader::new(fs::File::open(KALLSYMS)?).lines() {
        let line = line?;
        let mut parts = line.split_ascii_whitespace();
        let (Some(_addr), Some(kind), Some(name)) = (parts.next(), parts.next(), parts.next()) else { continue };
        if matches!(kind, "t" | "T") && wanted.contains(name) {
            found.insert(name.to_string());
        }
    }
    Ok(found)
}

/// The BTF members a kprobe or BTF tracepoint program cannot work without that this kernel
/// lacks (both read a socket's endpoints from `sock_common`, a segment's from its headers).
fn missing_endpoint_offsets(probe: ProbeId, k: &KernelOffsets) -> Vec<&'static str> {
    let mut needed = vec![
        ("sock_common.skc_state", k.sock_state),
        ("sock_common.skc_family", k.sock_family),
        ("sock_common.skc_num", k.sock_num),
        ("sock_common.skc_dport", k.sock_dport),
        ("sock_common.skc_rcv_saddr", k.sock_rcv_saddr),
        ("sock_common.skc_daddr", k.sock_daddr),
    ];
    if probe == ProbeId::BtfInetSockSetState {
        needed.push(("sock.sk_protocol (a byte-aligned member since 5.6)", k.sock_protocol));
    }
    if matches!(probe, ProbeId::TcpV4SendReset | ProbeId::TcpV6SendReset | ProbeId::BtfTcpSendReset) {
        needed.extend([
            ("sk_buff.head", k.skb_head),
            ("sk_buff.network_header", k.skb_network_header),
            ("sk_buff.transport_header", k.skb_transport_header),
            ("tcphdr.source", k.tcphdr_source),
            ("tcphdr.dest", k.tcphdr_dest),
            ("iphdr.saddr", k.iphdr_saddr),
            ("iphdr.daddr", k.iphdr_daddr),
        ]);
    }
    needed.into_iter().filter(|(_, offset)| *offset == ABSENT).map(|(name, _)| name).collect()
}

/// Loads the object with `config` as `CONFIG` (maps created, no program loaded yet).
pub fn load_object(config: &ProbeConfig, ring_buffer_bytes: u32, max_sockets: u32) -> Result<Ebpf, LoadError> {
    EbpfLoader::new()
        .override_global("CONFIG", config, true)
        .map_max_entries("EVENTS", ring_buffer_bytes)
        .map_max_entries("SOCKETS", max_sockets)
        .load(EBPF_OBJECT)
        .map_err(|e| {
            if is_permission_error(&e) {
                LoadError::Permission {
                    missing: missing_bpf_capabilities()
                        .unwrap_or_else(|| "a permission the kernel wants (a BPF LSM, a seccomp profile?)".into()),
                }
            } else {
                LoadError::Load(e)
            }
        })
}

/// Loads and attaches, per hook, the back end the running kernel offers (or `--probes` forces).
pub fn load(options: ProbeOptions) -> Result<LoadedProbes, LoadError> {
    check_permissions()?;
    raise_memlock_limit();

    let KernelSetup { mut config, mut unavailable, reasons, mut degraded, kprobe_missing } = kernel_setup()?;

    if let Some(inum) = options.netns {
        let k = &config.kernel;
        if [k.sock_net, k.net_inum, k.skb_dev, k.netdev_net].contains(&ABSENT) {
            return Err(LoadError::NetnsFilter(
                "one of sock.__sk_common.skc_net, net.ns.inum, sk_buff.dev, net_device.nd_net".into(),
            ));
        }
        config.netns_filter = inum;
    }

    // Where the programs keep per-socket state is fixed when the object is loaded (`CONFIG`).
    // Socket-local storage is reachable from the BTF tracepoint programs alone, so it needs them
    // on all four socket hooks.
    let storage = options.socket_store == SocketStore::Storage;
    if storage {
        if !matches!(options.mode, ProbeMode::Auto | ProbeMode::Btf) {
            return Err(LoadError::SocketStorage(format!(
                "only the BTF tracepoint programs can reach it, and --probes {} asks for other ones",
                options.mode.name()
            )));
        }
        if let Some((probe, why)) = btf_socket_programs().find_map(|p| unavailable.get(&p).map(|why| (p, why))) {
            return Err(LoadError::SocketStorage(format!("{}: {why}", probe.name())));
        }
    }
    config.socket_store = if storage { SOCKET_STORE_LOCAL } else { SOCKET_STORE_HASH };
    let (mut ebpf, logger) = load_with_logger(&config, &options)?;

    // The BTF tracepoint programs are loaded against the kernel's BTF (aya's own parse of it,
    // dropped once everything is attached). `auto` uses one only where the kernel loads it: the
    // programs are loaded here, before the choice, and one the kernel refuses leaves its hook
    // to the tracepoints (or, with --socket-store storage, stops the start).
    let program_btf = match matches!(options.mode, ProbeMode::Auto | ProbeMode::Btf).then(aya::Btf::from_sys_fs) {
        Some(Ok(btf)) => Some(btf),
        Some(Err(e)) => {
            if storage {
                return Err(LoadError::SocketStorage(format!(
                    "the BTF tracepoint programs need the kernel's BTF: {e}"
                )));
            }
            for probe in ProbeId::ALL.into_iter().filter(|p| p.backend() == Backend::Btf) {
                unavailable.entry(probe).or_insert_with(|| format!("reading the kernel's BTF to load it: {e}"));
            }
            None
        }
        None => None,
    };
    if options.mode == ProbeMode::Auto {
        for probe in btf_socket_programs() {
            if unavailable.contains_key(&probe) {
                continue;
            }
            if let Err(e) = load_program(&mut ebpf, probe, program_btf.as_ref()) {
                log::info!("BTF tracepoint program {} does not load here: {e}", probe.name());
                if storage {
                    return Err(LoadError::SocketStorage(format!("{}: {}", probe.name(), e.summary())));
                }
                unavailable.insert(probe, format!("the kernel does not load it: {}", e.summary()));
            }
        }
    }
    let choices = select::choose(options.mode, &unavailable);
    if let Some(backend) = choices.iter().map(|c| c.backend).find(|b| matches!(b, Backend::Kprobe | Backend::Btf)) {
        degraded.extend(kprobe_missing.into_iter().map(|m| format!("{m} (used by the {} back end)", backend.name())));
    }

    let mut statuses = Vec::new();
    for choice in &choices {
        let labels: Vec<String> = choice.programs.iter().map(|p| select::attach_label(*p)).collect();
        log::info!("hook {}: {} ({}; {})", choice.hook.name(), choice.backend.name(), labels.join(", "), choice.why);
        for &probe in &choice.programs {
            let attach = select::attach_label(probe);
            let status = |state, error, program_id| ProbeStatus {
                probe: probe.name(),
                hook: choice.hook.name(),
                backend: choice.backend.name(),
                attach: attach.clone(),
                state,
                error,
                program_id,
            };
            if let Some(why) = unavailable.get(&probe) {
                log::warn!("probe {} not attached: {why}", probe.name());
                statuses.push(status(ProbeState::Unavailable, Some(why.clone()), None));
                continue;
            }
            match attach_program(&mut ebpf, probe, program_btf.as_ref()) {
                Ok(()) => {
                    log::info!("probe {} attached to {attach}", probe.name());
                    // The kernel's id of the loaded program: its run counters are read by it.
                    let id = ebpf.program(probe.name()).and_then(|p| p.info().ok()).map(|info| info.id());
                    statuses.push(status(ProbeState::Attached, None, id));
                }
                Err(e) => {
                    log::warn!("probe {} failed to attach to {attach}: {e}", probe.name());
                    statuses.push(status(ProbeState::Failed, Some(e.to_string()), None));
                }
            }
        }
    }
    if statuses.iter().all(|s| s.state != ProbeState::Attached) {
        return Err(LoadError::NothingAttached(nothing_attached(&statuses)));
    }
    if options.http {
        // Asked for by name: a kernel that cannot do it is an error, not a warning.
        let program_btf = match program_btf {
            Some(btf) => btf,
            None => {
                aya::Btf::from_sys_fs().map_err(|e| LoadError::HttpCapture(format!("reading the kernel's BTF: {e}")))?
            }
        };
        for probe in HTTP_CAPTURE {
            if let Some(why) = unavailable.get(&probe) {
                return Err(LoadError::HttpCapture(why.clone()));
            }
            let attach = select::attach_label(probe);
            attach_program(&mut ebpf, probe, Some(&program_btf))
                .map_err(|e| LoadError::HttpCapture(format!("{attach}: {e}")))?;
            log::info!("probe {} attached to {attach} (--http)", probe.name());
            let id = ebpf.program(probe.name()).and_then(|p| p.info().ok()).map(|info| info.id());
            statuses.push(ProbeStatus {
                probe: probe.name(),
                hook: Hook::HttpCapture.name(),
                backend: Backend::Btf.name(),
                attach,
                state: ProbeState::Attached,
                error: None,
                program_id: id,
            });
        }
    }
    for d in &degraded {
        log::warn!("{d}");
    }

    let ring_buffer = ebpf.take_map("EVENTS").ok_or(LoadError::MissingMap("EVENTS"))?;
    let ring_buffer = RingBuf::try_from(ring_buffer).map_err(|source| LoadError::Map { name: "EVENTS", source })?;
    let counters = ebpf.take_map("COUNTERS").ok_or(LoadError::MissingMap("COUNTERS"))?;
    let counters = PerCpuArray::try_from(counters).map_err(|source| LoadError::Map { name: "COUNTERS", source })?;
    let sockets = match config.socket_store {
        SOCKET_STORE_LOCAL => {
            let map = ebpf.take_map("SOCKET_STORAGE").ok_or(LoadError::MissingMap("SOCKET_STORAGE"))?;
            let aya::maps::Map::SkStorage(map) = map else { return Err(LoadError::MissingMap("SOCKET_STORAGE")) };
            SocketSource::Storage { map, netns: options.netns }
        }
        _ => {
            let sockets = ebpf.take_map("SOCKETS").ok_or(LoadError::MissingMap("SOCKETS"))?;
            SocketSource::Hash(
                BpfHashMap::try_from(sockets).map_err(|source| LoadError::Map { name: "SOCKETS", source })?,
            )
        }
    };
    let seeds = ebpf.take_map("SEEDS").ok_or(LoadError::MissingMap("SEEDS"))?;
    let seeds = BpfHashMap::try_from(seeds).map_err(|source| LoadError::Map { name: "SEEDS", source })?;
    Ok(LoadedProbes {
        statuses,
        reasons,
        degraded,
        ring_buffer,
        counters: KernelCounters { map: counters },
        sockets,
        seeds,
        logger,
        ebpf,
    })
}

/// Loads the object, with the logger that forwards its programs' messages (initialised before
/// the programs load: it owns the log map they reference). The `SOCKETS` hash shrinks to one
/// entry when socket-local storage holds the state instead.
fn load_with_logger(config: &ProbeConfig, options: &ProbeOptions) -> Result<(Ebpf, Option<KernelLogger>), LoadError> {
    let max_sockets = if config.socket_store == SOCKET_STORE_LOCAL { 1 } else { options.max_sockets };
    let mut ebpf = load_object(config, options.ring_buffer_bytes, max_sockets)?;
    let logger = aya_log::EbpfLogger::init(&mut ebpf)
        .inspect_err(|e| log::warn!("kernel-side log messages unavailable: {e}"))
        .ok();
    Ok((ebpf, logger))
}

/// Why nothing could be attached: each distinct error once, with the probes it stopped.
fn nothing_attached(statuses: &[ProbeStatus]) -> String {
    let mut errors: Vec<(&str, Vec<&str>)> = Vec::new();
    for s in statuses {
        let error = s.error.as_deref().unwrap_or("not attached");
        match errors.iter_mut().find(|(e, _)| *e == error) {
            Some((_, probes)) => probes.push(s.probe),
            None => errors.push((error, vec![s.probe])),
        }
    }
    errors.iter().map(|(error, probes)| format!("{}: {error}", probes.join(", "))).collect::<Vec<_>>().join("; ")
}

fn fill_config(config: &mut ProbeConfig, probe: ProbeId, format: &EventFormat) -> Result<(), TracefsError> {
    match probe {
        ProbeId::InetSockSetState => config.set_state = format.set_state_fields()?,
        ProbeId::TcpReceiveReset => config.receive_reset = format.sk_tuple_fields()?,
        ProbeId::TcpSendReset => config.send_reset = format.send_reset_fields()?,
        ProbeId::TcpDestroySock => config.destroy_sock = format.sk_tuple_fields()?,
        ProbeId::SysExitAccept4 => config.accept4_ret = format.required("ret")?,
        ProbeId::SysExitAccept => config.accept_ret = format.required("ret")?,
        // Kprobes read no tracepoint record.
        ProbeId::TcpSetState
        | ProbeId::TcpReset
        | ProbeId::TcpSendActiveReset
        | ProbeId::TcpV4SendReset
        | ProbeId::TcpV6SendReset
        | ProbeId::TcpV4DestroySock
        | ProbeId::InetCskAccept => {}
        // BTF tracepoints neither: they get the tracepoint's arguments.
        ProbeId::BtfInetSockSetState
        | ProbeId::BtfTcpReceiveReset
        | ProbeId::BtfTcpSendReset
        | ProbeId::BtfTcpDestroySock
        | ProbeId::BtfSockSendLength
        | ProbeId::BtfSockRecvLength => {}
    }
    Ok(())
}

/// Runs `probe`'s program through the verifier (loads it into the kernel) without attaching;
/// nothing to do when it is loaded already. A BTF tracepoint program needs the kernel's BTF
/// (`aya::Btf::from_sys_fs()`) to name its tracepoint.
pub fn load_program(ebpf: &mut Ebpf, probe: ProbeId, btf: Option<&aya::Btf>) -> Result<(), ProgramError> {
    let program = ebpf.program_mut(probe.name()).ok_or(ProgramError::Missing)?;
    let loaded = match probe.attach_point() {
        AttachPoint::Tracepoint(..) => <&mut TracePoint>::try_from(program)?.load(),
        AttachPoint::BtfTracepoint(name) => {
            <&mut BtfTracePoint>::try_from(program)?.load(name, btf.ok_or(ProgramError::NoBtf)?)
        }
        AttachPoint::Kprobe(_) | AttachPoint::Kretprobe(_) => <&mut KProbe>::try_from(program)?.load(),
    };
    match loaded {
        Ok(()) | Err(aya::programs::ProgramError::AlreadyLoaded) => Ok(()),
        Err(e) => Err(ProgramError::Verifier(verifier_error(&e))),
    }
}

impl ProgramError {
    /// The error without the verifier's log: its first line and the log's last (where the
    /// verifier says what it rejected), for a status line.
    pub fn summary(&self) -> String {
        let text = self.to_string();
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        match (lines.next(), lines.next_back()) {
            (Some(first), Some(last)) => format!("{first} ... {last}"),
            (Some(first), None) => first.to_string(),
            _ => text,
        }
    }
}

/// The error with the verifier's log when there is one.
fn verifier_error(e: &aya::programs::ProgramError) -> String {
    match e {
        aya::programs::ProgramError::LoadError { io_error, verifier_log } => format!("{io_error}\n{verifier_log}"),
        other => other.to_string(),
    }
}

fn attach_program(ebpf: &mut Ebpf, probe: ProbeId, btf: Option<&aya::Btf>) -> Result<(), ProgramError> {
    load_program(ebpf, probe, btf)?;
    let program = ebpf.program_mut(probe.name()).ok_or(ProgramError::Missing)?;
    match probe.attach_point() {
        AttachPoint::Tracepoint(category, name) => {
            <&mut TracePoint>::try_from(program)?.attach(category, name)?;
        }
        AttachPoint::BtfTracepoint(_) => {
            <&mut BtfTracePoint>::try_from(program)?.attach()?;
        }
        AttachPoint::Kprobe(function) | AttachPoint::Kretprobe(function) => {
            <&mut KProbe>::try_from(program)?.attach(function, 0)?;
        }
    }
    Ok(())
}

/// CAP_SYS_ADMIN, or CAP_BPF together with CAP_PERFMON, in the effective set.
pub fn has_bpf_capabilities() -> bool {
    missing_bpf_capabilities().is_none()
}

/// Which of CAP_BPF and CAP_PERFMON the process lacks (`None`: it has both, or CAP_SYS_ADMIN,
/// or its capabilities cannot be read, in which case the kernel decides).
pub fn missing_bpf_capabilities() -> Option<String> {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let eff =
        status.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|v| u64::from_str_radix(v.trim(), 16).ok())?;
    let has = |cap: u32| eff & (1u64 << cap) != 0;
    if has(CAP_SYS_ADMIN) {
        return None;
    }
    let missing: Vec<&str> = [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
        .into_iter()
        .filter(|(c, _)| !has(*c))
        .map(|(_, n)| n)
        .collect();
    (!missing.is_empty()).then(|| missing.join(" and "))
}

fn is_permission_error(e: &aya::EbpfError) -> bool {
    let text = format!("{e:?}");
    text.contains("PermissionDenied") || text.contains("Operation not permitted")
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; newer ones ignore it.
pub fn raise_memlock_limit() {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: plain syscall with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        log::debug!("could not raise RLIMIT_MEMLOCK ({}); kernels >= 5.11 do not need it", io::Error::last_os_error());
    }
}

/// `uname -r` of the running kernel.
pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_else(|_| "unknown".into())
}
