//! `observer run`: loads the probes, serves the HTTP endpoint, and drains the ring buffer into
//! the [`Pipeline`] until SIGINT or SIGTERM.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::watch,
};

use crate::{
    aggregate::Limits,
    api::ConfigSetting,
    attribution::{AcceptedOwners, Attribution},
    connections::{self, SocketTable},
    container::{self, SharedResolver},
    http,
    pipeline::Pipeline,
    pods::{self, CriClient, Pods},
    probes::{self, ProbeOptions, ProbeState},
    seed,
    series::container_key,
    state::DaemonState,
};

/// Records handled per turn of the event loop during a storm before others get a turn.
const DRAIN_BATCH: usize = 4096;

/// How long the event loop lets events gather after draining the ring.
const COALESCE: Duration = Duration::from_millis(5);

pub struct DaemonOptions {
    pub listen: SocketAddr,
    pub probes: ProbeOptions,
    pub limits: Limits,
    /// `--probe-stats`: have the kernel count the programs' runs and run time while the daemon
    /// runs, for `observer_probe_run*` and `observer status`.
    pub probe_stats: bool,
    pub pods: PodOptions,
    /// `--log-events`: every event-log record as a JSON line on stdout.
    pub log_events: bool,
    /// The effective `observer run` configuration and where each value came from, for the
    /// status.
    pub config: BTreeMap<String, ConfigSetting>,
}

/// Where pod names come from.
#[derive(Debug, Clone)]
pub enum CriSocket {
    /// The first of [`pods::cri::DEFAULT_SOCKETS`] that exists.
    Discover,
    Path(PathBuf),
    /// `--cri-socket none`.
    Off,
}

#[derive(Debug, Clone)]
pub struct PodOptions {
    pub socket: CriSocket,
    /// Deadline of each CRI call.
    pub timeout: Duration,
    /// How long the series of a gone container stay.
    pub expire_after: Duration,
}

impl Default for PodOptions {
    fn default() -> Self {
        Self { socket: CriSocket::Discover, timeout: Duration::from_secs(2), expire_after: pods::DEFAULT_EXPIRY }
    }
}

/// Runs until SIGINT or SIGTERM, then detaches every probe and returns.
pub async fn run(options: DaemonOptions) -> anyhow::Result<()> {
    probes::check_permissions()?;
    // Bind before loading: a taken port should fail before anything is loaded into the kernel.
    let listener = bind(options.listen).map_err(|e| listen_error(options.listen, e))?;
    let local = listener.local_addr().context("reading the listen address")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    // One cgroup resolver (and cache) for the event path and the connection-state scans.
    let resolver: SharedResolver = container::shared_resolver();
    let cgroup_root = resolver.lock().unwrap_or_else(|e| e.into_inner()).root().map(|p| p.to_path_buf());
    let pods = Arc::new(Pods::new(options.pods.expire_after, cgroup_root));
    let state = Arc::new(DaemonState::new(probes::kernel_release(), options.limits, pods));
    state.set_config(options.config);
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let server = tokio::spawn(http::serve(listener, state.clone(), async move {
        let _ = stop_rx.wait_for(|stop| *stop).await;
    }));
    tracing::info!(listen = %local, "serving /metrics, /healthz and /api/v1/status on http://{local}");

    let netns = options.probes.netns;
    let loaded =
        tokio::task::spawn_blocking(move || probes::load(options.probes)).await.context("probe loader panicked")??;
    let probes::LoadedProbes { statuses, reasons, degraded, ring_buffer, counters, sockets, mut seeds, logger, ebpf } =
        loaded;
    // Connections opened before now: their owners, for the programs to adopt and the gauges to
    // count from the first scrape.
    let (seeded, seeds) = tokio::task::spawn_blocking(move || (seed::seed(&mut seeds, netns), seeds))
        .await
        .context("seeding from the socket table panicked")?;
    log::info!(
        "{} connections already open in {} network namespaces, {} with their owning process",
        seeded.connections,
        seeded.namespaces,
        seeded.owned
    );
    let mut degraded = degraded;
    if let Some(first) = seeded.failures.first() {
        // Entering another network namespace (setns) needs CAP_SYS_ADMIN; a missing sock_diag
        // module fails otherwise.
        let hint = if first.contains("Operation not permitted") {
            "setns() into them needs CAP_SYS_ADMIN, and finding their owners in /proc CAP_SYS_PTRACE (deploy/README.md, \"Capabilities\")"
        } else {
            "sock_diag; is the tcp_diag module available?"
        };
        let why = format!(
            "connections open before start-up could not be listed in {} network namespaces ({hint}): they belong to no process \
             (comm=\"\") and reach observer_tcp_connections only at their next state change. First: {first}",
            seeded.failures.len()
        );
        log::warn!("{why}");
        degraded.push(why);
    }
    if let Err(why) = resolver.lock().unwrap_or_else(|e| e.into_inner()).check_handles() {
        log::warn!("{why}");
        degraded.push(why);
    }
    // Held until the daemon exits: the kernel counts while this descriptor is open.
    let probe_stats = match options.probe_stats.then(probes::stats::enable) {
        Some(Ok(fd)) => {
            log::info!("--probe-stats: the kernel counts the programs' runs and run time");
            Some(fd)
        }
        Some(Err(why)) => {
            log::warn!("{why}");
            degraded.push(why);
            None
        }
        None => None,
    };
    // Parsing the kernel's BTF (megabytes of type information) and walking /proc left freed
    // memory in the allocator's per-thread arenas; give it back to the system: an agent on every
    // node should not keep tens of megabytes it used once.
    // SAFETY: malloc_trim only releases free memory.
    unsafe { libc::malloc_trim(0) };
    // The first scan before going ready, so the first scrape already has the gauges.
    let scan_resolver = resolver.clone();
    let scan_pods = state.pods.clone();
    let joins_owners = sockets.owners_joined_by_daemon();
    let accepted = Arc::new(AcceptedOwners::default());
    let scan_accepted = accepted.clone();
    let table = tokio::task::spawn_blocking(move || {
        let mut table = SocketTable::new(sockets, scan_accepted, seeds, scan_resolver, scan_pods);
        // Nothing is drained yet: no owner is known either.
        let (by_state, oldest) = table.scan(0);
        (table, by_state, oldest)
    })
    .await
    .context("scanning the socket map panicked")
    .map(|(table, by_state, oldest)| {
        state.metrics.set_connections(&by_state, &oldest, &state.pods.snapshot());
        table
    })?;
    let attached = statuses.iter().filter(|s| s.state == ProbeState::Attached).count();
    state.set_probes(statuses, degraded, counters, reasons.clone(), probe_stats.is_some());
    tracing::info!(
        version = crate::VERSION,
        probes_attached = attached,
        "observer {} ready: {attached} probes attached",
        crate::VERSION
    );

    let kernel_log = logger.map(forward_kernel_log).transpose()?;
    let scanner = spawn_socket_scanner(table, state.clone());
    let rates = spawn_rates(state.clone());
    let pod_names = spawn_pod_names(&options.pods, state.clone())?;
    let event_writer = options.log_events.then(|| spawn_event_writer(state.clone()));
    let mut pipeline = Pipeline::new(reasons, Attribution::for_host(resolver, state.pods.clone()), state.clone());
    if joins_owners {
        pipeline = pipeline.with_accepted_owners(accepted);
    }
    // SAFETY: the RingBuf owns its map fd and keeps it open, unchanged, until it is dropped,
    // which only happens through this AsyncFd.
    let mut ring = unsafe { AsyncFd::register(ring_buffer) }
        .map_err(|e| anyhow::anyhow!("registering the ring buffer with tokio: {e}"))?;
    let mut drain_tick = tokio::time::interval(EVENT_WRITE_INTERVAL);
    drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let outcome = loop {
        tokio::select! {
            _ = sigterm.recv() => break Ok("SIGTERM"),
            _ = sigint.recv() => break Ok("SIGINT"),
            // With --log-events, a quiet ring is drained now and then too, so the time up to
            // which everything has been handled keeps up with the clock and records waiting
            // for a cause that never comes are written after the pairing window.
            _ = drain_tick.tick(), if event_writer.is_some() => {
                drain(ring.get_mut(), &mut pipeline, &state);
            }
            ready = ring.readable_mut() => {
                let mut guard = match ready {
                    Ok(guard) => guard,
                    Err(e) => break Err(anyhow::Error::new(e).context("waiting on the ring buffer")),
                };
                if drain(guard.get_inner_mut(), &mut pipeline, &state) {
                    guard.clear_ready();
                    drop(guard);
                    // Coalesce wake-ups: the kernel wakes us for nearly every event when we keep
                    // up, and a wake-up costs more than handling an event. Waiting a moment lets a
                    // batch gather (at 200,000 events/s, 1,000 events: 4 % of the default ring).
                    tokio::time::sleep(COALESCE).await;
                } else {
                    // More may be waiting: let the HTTP server and the signals have a turn
                    // first; the fd stays ready, so the loop comes straight back.
                    drop(guard);
                    tokio::task::yield_now().await;
                }
            }
        }
    };

    // Detach everything before saying goodbye: maps and programs go with their fds.
    state.clear_kernel_counters();
    scanner.abort();
    let _ = scanner.await;
    rates.abort();
    let _ = rates.await;
    pod_names.abort();
    let _ = pod_names.await;
    if let Some((writer, stop)) = event_writer {
        // The writer writes the records of the last moments, then ends.
        let _ = stop.send(true);
        if tokio::time::timeout(Duration::from_secs(2), writer).await.is_err() {
            log::warn!("--log-events: stdout did not take the last records within 2 s");
        }
    }
    drop(ring);
    if let Some(task) = kernel_log {
        task.abort();
        let _ = task.await;
    }
    drop(ebpf);
    let _ = stop_tx.send(true);
    match tokio::time::timeout(Duration::from_secs(1), server).await {
        Ok(Ok(Err(e))) => log::warn!("HTTP server: {e}"),
        Err(_) => log::warn!("HTTP server did not stop within 1 s; exiting anyway"),
        _ => {}
    }
    let signal = outcome?;
    tracing::info!(signal, "{signal}: probes detached, exiting");
    Ok(())
}

/// Handles the events waiting in `ring`, at most [`DRAIN_BATCH`]; true if that emptied it.
/// Then every event the kernel stamped before the drain began has been handled: the daemon's
/// `drained_through` moves up to then.
fn drain(ring: &mut RingBuf<MapData>, pipeline: &mut Pipeline, state: &DaemonState) -> bool {
    let began = crate::query::monotonic_ns();
    let mut handled = 0;
    while let Some(record) = ring.next() {
        pipeline.handle(&record);
        handled += 1;
        if handled == DRAIN_BATCH {
            return false;
        }
    }
    state.set_drained_through(began);
    true
}

/// Refreshes the connection-state gauges from the kernel's socket map until aborted.
fn spawn_socket_scanner(table: SocketTable, state: Arc<DaemonState>) -> tokio::task::JoinHandle<()> {
    let table = Arc::new(std::sync::Mutex::new(table));
    tokio::spawn(async move {
        let mut every = tokio::time::interval_at(
            tokio::time::Instant::now() + connections::SCAN_INTERVAL,
            connections::SCAN_INTERVAL,
        );
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let (table, state) = (table.clone(), state.clone());
            // A map of tens of thousands of sockets takes a syscall per entry: off the runtime.
            let scanned = tokio::task::spawn_blocking(move || {
                let drained_through = state.drained_through();
                let (by_state, oldest) = table.lock().unwrap_or_else(|e| e.into_inner()).scan(drained_through);
                state.metrics.set_connections(&by_state, &oldest, &state.pods.snapshot());
            })
            .await;
            if let Err(e) = scanned {
                log::warn!("scanning the socket map failed: {e}");
            }
        }
    })
}

/// Takes a tick of the per-row rates of `/api/v1/top` every [`crate::top::TICK`] until aborted,
/// the first one now.
fn spawn_rates(state: Arc<DaemonState>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(crate::top::TICK);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let state = state.clone();
            // Summing thousands of series per row: off the runtime the event loop runs on.
            if let Err(e) = tokio::task::spawn_blocking(move || state.sample_rates()).await {
                log::warn!("taking the rates' snapshot failed: {e}");
            }
        }
    })
}

/// How often the container runtime is asked again without being woken by a new container, and
/// how often gone containers are looked for: never less often than a quarter of the expiry.
fn pod_refresh_interval(expire_after: Duration) -> Duration {
    (expire_after / 4).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

/// At most one refresh per this long, however many new containers appear (a burst of pod
/// starts is one `ListContainers`).
const POD_REFRESH_MIN_GAP: Duration = Duration::from_millis(500);

/// Names containers' pods through the runtime's CRI socket until aborted, and removes the series
/// of containers gone longer than the expiry. A runtime that is down or slow only delays names:
/// its errors are counted and logged once until it answers again.
fn spawn_pod_names(options: &PodOptions, state: Arc<DaemonState>) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let socket = match &options.socket {
        CriSocket::Off => {
            log::info!("--cri-socket none: series carry container ids only, no pod names");
            None
        }
        CriSocket::Path(p) => Some(p.clone()),
        CriSocket::Discover => {
            let found = pods::cri::find_socket();
            if found.is_none() {
                log::info!(
                    "no container runtime socket found (tried {}): series carry container ids only; give --cri-socket PATH to name pods",
                    pods::cri::DEFAULT_SOCKETS.join(", ")
                );
            }
            found
        }
    };
    state.pods.set_socket(socket.as_deref());
    state.metrics.set_runtime(&state.pods.report());
    let mut client = socket.as_deref().map(|s| CriClient::new(s, options.timeout)).transpose()?;
    let interval = pod_refresh_interval(options.expire_after);
    Ok(tokio::spawn(async move {
        let mut failing = false;
        loop {
            let started = Instant::now();
            let refreshed = state.pods.refresh(client.as_mut(), started).await;
            if let Some(v) = &refreshed.connected {
                let socket = client.as_ref().map(|c| c.socket().display().to_string()).unwrap_or_default();
                log::info!("container runtime {} {} on {socket}: naming pods", v.name, v.version);
                state.metrics.set_runtime(&state.pods.report());
                failing = false;
            }
            if let Some(e) = &refreshed.error {
                state.metrics.record_runtime_error(e.operation);
                if !failing {
                    log::warn!("{e}; series carry container ids only until the runtime answers (retrying)");
                    state.metrics.set_runtime(&state.pods.report());
                    failing = true;
                }
            }
            if !refreshed.expired.is_empty() {
                let mut agg = state.metrics.aggregator();
                let removed: usize = refreshed.expired.iter().map(|key| agg.expire_container(*key)).sum();
                drop(agg);
                log::debug!("{} gone containers expired with {removed} series", refreshed.expired.len());
            }
            tokio::time::sleep_until((started + POD_REFRESH_MIN_GAP).into()).await;
            let _ = tokio::time::timeout(interval, state.pods.unknown_seen.notified()).await;
        }
    }))
}

/// How often `--log-events` looks for new records.
const EVENT_WRITE_INTERVAL: Duration = Duration::from_millis(100);
/// How long a record of a container the runtime has not named yet waits for its pod name.
const NAME_WAIT: Duration = Duration::from_secs(1);

/// `--log-events`: follows the event log and writes each record as one JSON line on stdout,
/// until told to stop (then it writes what is left).
fn spawn_event_writer(state: Arc<DaemonState>) -> (tokio::task::JoinHandle<()>, watch::Sender<bool>) {
    let (stop_tx, mut stop) = watch::channel(false);
    let task = tokio::spawn(async move {
        let mut next = 0;
        loop {
            let stopping = tokio::select! {
                _ = tokio::time::sleep(EVENT_WRITE_INTERVAL) => false,
                _ = stop.changed() => true,
            };
            write_events(&state, &mut next, stopping).await;
            if stopping {
                break;
            }
        }
    });
    (task, stop_tx)
}

/// Writes the records after `next` as JSON lines, waiting up to [`NAME_WAIT`] for pod names of
/// new containers unless `last` (shutting down).
async fn write_events(state: &DaemonState, next: &mut u64, last: bool) {
    use tokio::io::AsyncWriteExt as _;
    let mut page = complete_records(state, *next, last);
    if page.events.is_empty() {
        return;
    }
    let pending = || {
        state.pods.pending(
            page.events
                .iter()
                .filter(|r| !r.owner.container_id.is_empty())
                .map(|r| container_key(&r.owner.container_id)),
        )
    };
    if !last && pending() {
        let _ = tokio::time::timeout(NAME_WAIT, state.pods.refreshed.notified()).await;
        page = complete_records(state, *next, last);
    }
    if let Some(first) = page.events.first()
        && first.seq > *next + 1
        && *next > 0
    {
        log::warn!(
            "--log-events: {} event-log records were overwritten before they were written",
            first.seq - *next - 1
        );
    }
    let mut out = Vec::with_capacity(page.events.len() * 512);
    for record in &page.events {
        if serde_json::to_writer(&mut out, record).is_ok() {
            out.push(b'\n');
        }
    }
    let mut stdout = tokio::io::stdout();
    if let Err(e) = async {
        stdout.write_all(&out).await?;
        stdout.flush().await
    }
    .await
    {
        log::warn!("--log-events: writing to stdout: {e}");
    }
    *next = page.next;
}

/// The event log's records after `next` that can no longer change, rendered: a line is the
/// whole record. Records whose cause may still be paired wait for it (at most the pairing
/// window), unless `last` (the daemon is stopping). The window is measured against the kernel
/// time the event loop has handled everything up to, not the clock: when the loop lags, the
/// cause may be among the events still in the ring. Records and their completeness are read
/// under one lock: the event loop pairs causes meanwhile, and a record rendered before its
/// cause came must not be judged by a completeness measured after (the 6.1 VM wrote a received
/// reset without the cause the API then served).
fn complete_records(state: &DaemonState, next: u64, last: bool) -> crate::api::EventsPage {
    let log = state.event_log();
    let mut page = log.page(next, crate::event_log::LOG_CAPACITY);
    if !last {
        // Read after taking the lock: every event handled before that time is in this log.
        let complete = log.complete_through(state.drained_through());
        page.events.retain(|r| r.seq <= complete);
        page.next = page.events.last().map_or(next, |r| r.seq);
    }
    page
}

/// Forwards the kernel programs' aya-log records to the daemon's log until aborted.
fn forward_kernel_log(
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    // SAFETY: the logger owns its ring buffer fd until dropped, which happens through the AsyncFd.
    let mut logger = unsafe { AsyncFd::register(logger) }
        .map_err(|e| anyhow::anyhow!("registering the kernel log buffer with tokio: {e}"))?;
    Ok(tokio::spawn(async move {
        while let Ok(mut guard) = logger.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}

/// Listens with a deep accept queue: a burst of scrapes (hundreds of Prometheus replicas, a
/// dashboard reload) must wait in the queue, not overflow it (the default is 128).
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    // A restarted daemon must not wait for its old connections' TIME_WAIT; a second listener on
    // the same port still fails (no SO_REUSEPORT).
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

fn listen_error(addr: SocketAddr, e: std::io::Error) -> anyhow::Error {
    let hint = match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            "another process is listening there (a second observer?); pick another address with --listen"
        }
        std::io::ErrorKind::AddrNotAvailable => {
            "that address is not configured on this host; use --listen 0.0.0.0:PORT or a local address"
        }
        std::io::ErrorKind::PermissionDenied => {
            "ports below 1024 need CAP_NET_BIND_SERVICE; pick a higher port with --listen"
        }
        _ => "check --listen",
    };
    anyhow::anyhow!("cannot listen on {addr}: {e}; {hint}")
}
