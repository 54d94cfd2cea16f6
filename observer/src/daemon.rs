//! `observer run`: the event loop from ring buffer to metrics, and the HTTP endpoint.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{
    io::unix::AsyncFd,
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::watch,
};

use crate::{
    attribution::Attribution,
    classify::classify,
    decode::decode,
    http::{self, Shared},
    metrics::Limits,
    probes::{self, ProbeOptions, btf::ResetReasons},
};

pub struct DaemonOptions {
    pub listen: SocketAddr,
    pub probes: ProbeOptions,
    pub limits: Limits,
}

/// Runs until SIGINT or SIGTERM, then detaches every probe and returns.
pub async fn run(options: DaemonOptions) -> anyhow::Result<()> {
    probes::check_permissions()?;
    // Bind before loading: a taken port should fail before anything is loaded into the kernel.
    let listener = TcpListener::bind(options.listen).await.map_err(|e| listen_error(options.listen, e))?;
    let local = listener.local_addr().context("reading the listen address")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let shared = Arc::new(Shared::new(probes::kernel_release(), options.limits));
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let server = tokio::spawn(http::serve(listener, shared.clone(), async move {
        let _ = stop_rx.wait_for(|stop| *stop).await;
    }));
    log::info!("serving /metrics, /healthz and /api/v1/status on http://{local}");

    let loaded = tokio::task::spawn_blocking(move || probes::load(options.probes))
        .await
        .context("probe loader panicked")??;
    let probes::LoadedProbes { statuses, reasons, degraded, events, counters, logger, ebpf } = loaded;
    let attached = statuses.iter().filter(|s| s.state == "attached").count();
    shared.set_probes(statuses, degraded, counters, reasons.clone());
    log::info!("observer {} ready: {attached} probes attached", crate::metrics::VERSION);

    let kernel_log = logger.map(forward_kernel_log).transpose()?;
    let attribution = Attribution::default();
    // SAFETY: the RingBuf owns its map fd and keeps it open, unchanged, until it is dropped,
    // which only happens through this AsyncFd.
    let mut ring = unsafe { AsyncFd::register(events) }
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
                while let Some(record) = ring.next() {
                    handle_record(&shared, &attribution, &reasons, &record);
                }
                guard.clear_ready();
            }
        }
    };

    // Detach everything before saying goodbye: maps and programs go with their fds.
    shared.clear_kernel_counters();
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

fn handle_record(shared: &Shared, attribution: &Attribution, reasons: &ResetReasons, record: &[u8]) {
    let event = match decode(record) {
        Ok(event) => event,
        Err(e) => {
            log::debug!("dropping malformed record: {e}");
            shared.metrics.record_malformed();
            return;
        }
    };
    let outcome = classify(&event, reasons);
    // Resets for segments that matched no socket belong to no process by nature; only sockets
    // whose owner we failed to learn count as unattributed.
    let unattributed = event.raw.owner.tgid == 0 && event.raw.sk != 0;
    shared.metrics.record(&event, outcome, attribution, unattributed);
}

fn listen_error(addr: SocketAddr, e: std::io::Error) -> anyhow::Error {
    let hint = match e.kind() {
        std::io::ErrorKind::AddrInUse => "another process is listening there (a second observer?); pick another address with --listen",
        std::io::ErrorKind::AddrNotAvailable => "that address is not configured on this host; use --listen 0.0.0.0:PORT or a local address",
        std::io::ErrorKind::PermissionDenied => "ports below 1024 need CAP_NET_BIND_SERVICE; pick a higher port with --listen",
        _ => "check --listen",
    };
    anyhow::anyhow!("cannot listen on {addr}: {e}; {hint}")
}
