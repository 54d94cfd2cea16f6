//! `observer run`: loads the probes, serves the HTTP endpoint, and drains the ring buffer into
//! the [`Pipeline`] until SIGINT or SIGTERM.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{
    io::unix::AsyncFd,
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::watch,
};

use crate::{
    aggregate::Limits,
    attribution::Attribution,
    connections::{self, SocketTable},
    container::{self, SharedResolver},
    http,
    pipeline::Pipeline,
    probes::{self, ProbeOptions, ProbeState},
    seed,
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
}

/// Runs until SIGINT or SIGTERM, then detaches every probe and returns.
pub async fn run(options: DaemonOptions) -> anyhow::Result<()> {
    probes::check_permissions()?;
    // Bind before loading: a taken port should fail before anything is loaded into the kernel.
    let listener = bind(options.listen).map_err(|e| listen_error(options.listen, e))?;
    let local = listener.local_addr().context("reading the listen address")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let state = Arc::new(DaemonState::new(probes::kernel_release(), options.limits));
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let server = tokio::spawn(http::serve(listener, state.clone(), async move {
        let _ = stop_rx.wait_for(|stop| *stop).await;
    }));
    log::info!("serving /metrics, /healthz and /api/v1/status on http://{local}");

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
        let why = format!(
            "connections open before start-up could not be listed in {} network namespaces (sock_diag; is the tcp_diag module \
             available?): they belong to no process (comm=\"\") and reach observer_tcp_connections only at their next state change. First: {first}",
            seeded.failures.len()
        );
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
    // One cgroup resolver (and cache) for the event path and the connection-state scans.
    let resolver: SharedResolver = container::shared_resolver();
    // The first scan before going ready, so the first scrape already has the gauges.
    let scan_resolver = resolver.clone();
    let table = tokio::task::spawn_blocking(move || {
        let mut table = SocketTable::new(sockets, seeds, scan_resolver);
        let (by_state, oldest) = table.scan();
        (table, by_state, oldest)
    })
    .await
    .context("scanning the socket map panicked")
    .map(|(table, by_state, oldest)| {
        state.metrics.set_connections(&by_state, &oldest);
        table
    })?;
    let attached = statuses.iter().filter(|s| s.state == ProbeState::Attached).count();
    state.set_probes(statuses, degraded, counters, reasons.clone(), probe_stats.is_some());
    log::info!("observer {} ready: {attached} probes attached", crate::VERSION);

    let kernel_log = logger.map(forward_kernel_log).transpose()?;
    let scanner = spawn_socket_scanner(table, state.clone());
    let pipeline = Pipeline::new(reasons, Attribution::for_host(resolver), state.clone());
    // SAFETY: the RingBuf owns its map fd and keeps it open, unchanged, until it is dropped,
    // which only happens through this AsyncFd.
    let mut ring = unsafe { AsyncFd::register(ring_buffer) }
        .map_err(|e| anyhow::anyhow!("registering the ring buffer with tokio: {e}"))?;
    let outcome = loop {
        tokio::select! {
            _ = sigterm.recv() => break Ok("SIGTERM"),
            _ = sigint.recv() => break Ok("SIGINT"),
            ready = ring.readable_mut() => {
                let mut guard = match ready {
                    Ok(guard) => guard,
                    Err(e) => break Err(anyhow::Error::new(e).context("waiting on the ring buffer")),
                };
                let ring = guard.get_inner_mut();
                let mut handled = 0;
                while let Some(record) = ring.next() {
                    pipeline.handle(&record);
                    handled += 1;
                    if handled == DRAIN_BATCH {
                        break;
                    }
                }
                if handled < DRAIN_BATCH {
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
    log::info!("{signal}: probes detached, exiting");
    Ok(())
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
                let (by_state, oldest) = table.lock().unwrap_or_else(|e| e.into_inner()).scan();
                state.metrics.set_connections(&by_state, &oldest);
            })
            .await;
            if let Err(e) = scanned {
                log::warn!("scanning the socket map failed: {e}");
            }
        }
    })
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
