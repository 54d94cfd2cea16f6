//! `cargo xtask incident`: the README's walk-through. Reproduces the incident observer was born
//! from on this machine, with the code of the `incident` test (`observer_testkit::incident`):
//! in a network namespace of its own, nginx proxies to `orderbackend`, which cuts, closes and
//! aborts the connections of unknown users, and `ordercli` places orders every second, retrying
//! every error three times. A daemon observing only that namespace serves on `--listen` (where
//! `observer top` and `observer events` look by default), and a Prometheus scrapes it every
//! second on `--prometheus`. Until Ctrl-C (or `--duration`); then everything is stopped and
//! the namespace removed.
use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use observer_testkit::{
    Daemon,
    daemon::Options,
    incident::{self, Incident, Ports, WALKTHROUGH_USERS},
    net::NamedNetns,
    process,
    prometheus::Prometheus,
};

use crate::{build, run, setup};

#[derive(clap::Args)]
pub struct Args {
    /// Where the daemon serves (`observer top` and `observer events` ask 127.0.0.1:9645 unless
    /// told otherwise with --endpoint).
    #[arg(long, default_value = "127.0.0.1:9645")]
    pub listen: SocketAddr,
    /// Where Prometheus serves its UI and API.
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub prometheus: SocketAddr,
    /// How often the client places its orders.
    #[arg(long, default_value = "1s", value_parser = humantime_like)]
    pub every: Duration,
    /// Stop after this long (default: at Ctrl-C).
    #[arg(long, value_parser = humantime_like)]
    pub duration: Option<Duration>,
}

/// `500ms`, `2s`, `5m`.
fn humantime_like(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.find(|c: char| !c.is_ascii_digit()).map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = n.parse().map_err(|_| format!("`{s}` is not a duration such as 500ms, 2s or 5m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(60 * n)),
        _ => Err(format!("`{s}` is not a duration such as 500ms, 2s or 5m")),
    }
}

pub fn incident(args: Args) -> Result<()> {
    if !process::is_root() {
        bail!("the incident runs in a network namespace of its own and loads eBPF programs: run it as root");
    }
    let ready = setup::setup()?;
    setup::install_missing(
        &["nginx-light", "golang-go", "prometheus"],
        "cargo xtask incident",
        "the incident runs nginx, two Go programs and Prometheus",
    )?;
    build::cargo_build(&ready, false)?;
    let target = run::target_dir(&ready)?;
    let observer = target.join("debug/observer");
    let programs = incident::build_programs(&target.join("incident/go"))?;
    let dir = target.join("incident/run");
    let _ = std::fs::remove_dir_all(&dir);
    // Ctrl-C must reach the end of this function: the namespace outlives a killed process.
    process::catch_interrupts().context("catching SIGINT")?;

    let netns = NamedNetns::new("incident", "demo")?;
    let daemon = Daemon::start(
        &observer,
        &["--netns", &netns.path(), "--cri-socket", "none"],
        &Options { listen: Some(args.listen), ..Options::default() },
    )?;
    let prometheus = Prometheus::start_on(Path::new("/usr/bin/prometheus"), daemon.addr, args.prometheus)?;
    let ports = Ports::default();
    let mut incident = Incident::start(&programs, &netns, &dir, ports)?;
    incident.start_client_loop(WALKTHROUGH_USERS, args.every)?;
    println!(
        "observer incident: in network namespace {} nginx[{}] listens on 127.0.0.1:{} and proxies to orderbackend[{}] \
         on 127.0.0.1:{}; ordercli orders for {} every {:?}, retrying every error three times.\n\
         observer (observing that namespace only) serves on http://{}, Prometheus on http://{}.\n\
         nginx's logs: {}/logs; the client's rounds: {}/ordercli.out.\n\
         In another terminal: observer top; observer events --kind eof_before_response; \
         promtool query instant http://{} 'topk(5, sum by (comm, peer, port, kind) \
         (rate(observer_tcp_premature_closes_total{{role=\"client\"}}[1m])))'.\n\
         Ctrl-C stops everything.",
        netns.name,
        incident.nginx_pid(),
        ports.nginx,
        incident.backend_pid(),
        ports.backend,
        WALKTHROUGH_USERS.join(","),
        args.every,
        daemon.addr,
        prometheus.addr,
        dir.display(),
        dir.display(),
        prometheus.addr,
    );
    let started = Instant::now();
    while !process::interrupted() && args.duration.is_none_or(|d| started.elapsed() < d) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let logs = incident.nginx_logs()?;
    println!(
        "observer incident: stopping. nginx logged {} requests ({} answered 502); {} × `{}`, {} × `{}`",
        logs.access.len(),
        logs.status(502),
        logs.errors_saying(incident::NGINX_UPSTREAM_RESET),
        incident::NGINX_UPSTREAM_RESET,
        logs.errors_saying(incident::NGINX_UPSTREAM_CLOSED),
        incident::NGINX_UPSTREAM_CLOSED,
    );
    drop(incident);
    drop(prometheus);
    // After Ctrl-C the terminal's SIGINT reached the daemon too: it is stopping already.
    drop(daemon);
    drop(netns);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
