//! Pod identity for real: observer names the pods of containers that containerd runs through its
//! CRI socket (as the kubelet runs them) and Docker's containers by id, counting each exactly.
//!
//! Each trial makes its own network namespace and its own daemon restricted to it (`--netns`),
//! so trials side by side never see each other's traffic; the workers in the containers enter
//! that namespace (it is mounted into them) and talk over its loopback. Ground truth for the
//! resets is the namespace's own `Tcp: OutRsts` (`/proc/net/snmp`).

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use observer_testkit::{
    Daemon, Metrics,
    net::NamedNetns,
    process,
    runtime::{
        containerd::Containerd,
        cri::{Capabilities, CgroupLayout, ContainerSpec, Cri, Mount, Pod, PodSpec},
        docker::{Dockerd, RunSpec},
        image::{OciImage, WrittenImage},
        scratch_dir,
    },
};

use observer_testkit::worker::{self, WORKER_ENV};

pub const OBSERVER: &str = env!("CARGO_BIN_EXE_observer");

/// How long anything that must happen may take before it counts as a hang (never a latency
/// assertion).
const PATIENCE: Duration = Duration::from_secs(60);

/// An image of this test binary and its libraries: the workers' image.
pub fn worker_image(dir: &Path) -> Result<WrittenImage> {
    let exe = std::env::current_exe().context("finding the test binary")?;
    OciImage::builder("localhost/observer-test/worker:test")
        .host_file("/worker", &exe, 0o755)
        .with_shared_libraries(&exe)?
        .entrypoint(["/worker"])
        .write(&dir.join("worker.tar"))
}

/// The arguments of a worker: `NETNS PORT N COMM [HOLD]`.
fn worker_args(netns: &NamedNetns, port: u16, n: u32, comm: &str, hold: Option<&str>) -> Vec<String> {
    worker::args(&netns.path(), port, n, comm, hold)
}

/// A worker container: it may enter the namespace (CAP_SYS_ADMIN for setns) and nothing more.
fn worker(name: &str, image: &str, role: &str, args: Vec<String>) -> ContainerSpec {
    ContainerSpec {
        args,
        env: vec![(WORKER_ENV.into(), role.into())],
        mounts: vec![Mount { host: "/run/netns".into(), container: "/run/netns".into(), readonly: true }],
        capabilities: Some(Capabilities::exactly(&["SYS_ADMIN"])),
        readonly_rootfs: true,
        ..ContainerSpec::new(name, image)
    }
}

/// Waits until container `name` of `pod` has logged `line`.
fn wait_logged(cri: &Cri, pod: &Pod, name: &str, line: &str) -> Result<()> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let log = cri.logs(pod, name).unwrap_or_default();
        if log.lines().any(|l| l == line) {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "container {name} did not log {line:?} within {PATIENCE:?}; its log: {log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts observer restricted to `netns`, with `extra` flags.
pub fn start_observer(netns: &NamedNetns, extra: &[&str]) -> Result<Daemon> {
    Daemon::start_in_netns(Path::new(OBSERVER), &netns.path(), extra, PATIENCE)
}

/// Scrapes until `done` holds, then once more a moment later (counts must not grow past it).
pub fn settled(daemon: &Daemon, what: &str, done: impl Fn(&Metrics) -> bool) -> Result<Metrics> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let m = daemon.metrics()?;
        if done(&m) {
            std::thread::sleep(Duration::from_millis(500));
            return daemon.metrics();
        }
        if Instant::now() > deadline {
            let (_, text) = daemon.get("/metrics")?;
            let series: Vec<&str> = text
                .lines()
                .filter(|l| {
                    (l.starts_with("observer_tcp_") && !l.contains("duration_seconds"))
                        || l.starts_with("observer_events")
                })
                .collect();
            bail!(
                "{what} not seen within {PATIENCE:?}; its series:\n{}\nthe daemon's log:\n{}",
                series.join("\n"),
                daemon.log().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Checks one count.
pub fn check(what: &str, got: u64, want: u64) -> Result<()> {
    ensure!(got == want, "{what}: got {got}, want {want}");
    Ok(())
}

/// The pod labels of a series: `namespace`, `pod`, `container` (its name), `container_id`.
fn pod_labels<'a>(pod: &'a Pod, container: &'a str, id: &'a str) -> [(&'static str, &'a str); 4] {
    [("namespace", &pod.spec.namespace), ("pod", &pod.spec.name), ("container", container), ("container_id", &id[..12])]
}

fn with<'a>(labels: &[(&'static str, &'a str)], more: &[(&'static str, &'a str)]) -> Vec<(&'static str, &'a str)> {
    labels.iter().chain(more).copied().collect()
}

const N: u32 = 5;
const LEAKED: u32 = 3;

/// Two pods through the CRI socket, one with the kubelet's cgroupfs layout and one with its
/// systemd layout: the server pod's resets sent and local resets, its CLOSE-WAIT leak, and the
/// client pod's resets received and peer resets, each exactly, by namespace, pod and container;
/// events name both pods; and the series of the pod that is deleted expire.
pub fn cri_pods_are_counted_by_namespace_pod_and_container() -> Result<()> {
    crate::require_root()?;
    let netns = NamedNetns::new("rt", "pods")?;
    let containerd = Containerd::start(&scratch_dir("pods"))?;
    let image = worker_image(&containerd.dir)?;
    containerd.import(&image.path)?;
    let socket = containerd.socket.display().to_string();
    let daemon = start_observer(&netns, &["--cri-socket", &socket, "--expire-gone-after", "3s"])?;
    let rsts_before = netns.out_rsts()?;
    let cri = containerd.cri()?;

    let shop = cri.run_pod(&PodSpec::new("orders-0", "shop", "5b3c1d2e-6f7a-4b8c-9d0e-1f2a3b4c5d6e"))?;
    let mut gateway_spec = PodSpec::new("gateway-0", "pay", "8e9f0a1b-2c3d-4e5f-8a6b-7c8d9e0f1a2b");
    gateway_spec.cgroup_parent = CgroupLayout::Systemd;
    let gateway = cri.run_pod(&gateway_spec)?;

    let orders = cri.create_container(
        &shop,
        &worker("orders", &image.name, "server-linger0", worker_args(&netns, 8081, N, "rt-orders", Some("forever"))),
    )?;
    let leaky = cri.create_container(
        &shop,
        &worker("leaky", &image.name, "server-leak", worker_args(&netns, 8082, LEAKED, "rt-leaky", None)),
    )?;
    wait_logged(&cri, &shop, "orders", "ready")?;
    wait_logged(&cri, &shop, "leaky", "ready")?;
    let client = cri.create_container(
        &gateway,
        &worker("client", &image.name, "client", worker_args(&netns, 8081, N, "rt-gateway", Some("forever"))),
    )?;
    // The clients stay (as the servers do) until the pod is deleted below: a container that is
    // gone has its series expire (here after 3 s), which is checked at the end.
    wait_logged(&cri, &gateway, "client", "done")?;
    let closer = cri.create_container(
        &gateway,
        &worker("closer", &image.name, "client-close", worker_args(&netns, 8082, LEAKED, "rt-closer", Some("forever"))),
    )?;
    wait_logged(&cri, &gateway, "closer", "done")?;
    wait_logged(&cri, &shop, "leaky", "done")?;

    let (orders_pod, client_pod, leaky_pod) = (
        pod_labels(&shop, "orders", &orders),
        pod_labels(&gateway, "client", &client),
        pod_labels(&shop, "leaky", &leaky),
    );
    let (n, leaked) = (u64::from(N), u64::from(LEAKED));
    let m = settled(&daemon, "the pods' resets, closes and CLOSE-WAIT sockets", |m| {
        m.sum("observer_tcp_premature_closes_total", &with(&client_pod, &[("kind", "peer_reset")])) >= n
            && m.sum("observer_tcp_premature_closes_total", &with(&orders_pod, &[("kind", "local_reset")])) >= n
            && m.sum("observer_tcp_connections", &with(&leaky_pod, &[("state", "close_wait")])) >= leaked
    })?;
    let sent = netns.out_rsts()? - rsts_before;
    check("RSTs the namespace's kernel sent (Tcp: OutRsts)", sent, n)?;
    check(
        "resets sent by the orders container of shop/orders-0",
        m.sum("observer_tcp_resets_sent_total", &with(&orders_pod, &[("comm", "rt-orders"), ("role", "server")])),
        sent,
    )?;
    check("resets sent in all", m.sum("observer_tcp_resets_sent_total", &[]), sent)?;
    check(
        "local resets of shop/orders-0 orders",
        m.sum("observer_tcp_premature_closes_total", &with(&orders_pod, &[("kind", "local_reset")])),
        n,
    )?;
    check(
        "resets received by the client container of pay/gateway-0",
        m.sum("observer_tcp_resets_received_total", &with(&client_pod, &[("comm", "rt-gateway"), ("role", "client")])),
        n,
    )?;
    check("resets received in all", m.sum("observer_tcp_resets_received_total", &[]), n)?;
    check(
        "peer resets of pay/gateway-0 client",
        m.sum("observer_tcp_premature_closes_total", &with(&client_pod, &[("kind", "peer_reset")])),
        n,
    )?;
    check(
        "CLOSE-WAIT sockets of shop/orders-0 leaky",
        m.sum("observer_tcp_connections", &with(&leaky_pod, &[("comm", "rt-leaky"), ("state", "close_wait")])),
        leaked,
    )?;
    ensure!(
        m.matching("observer_tcp_close_wait_oldest_seconds", &with(&leaky_pod, &[])).any(|(_, v)| v > 0.0),
        "no observer_tcp_close_wait_oldest_seconds for shop/orders-0 leaky"
    );
    let unnamed: Vec<String> =
        m.matching("observer_tcp_closes_total", &[("pod", "")]).map(|(labels, v)| format!("{labels:?} {v}")).collect();
    ensure!(unnamed.is_empty(), "closes without a pod name: {unnamed:?}");
    check("runtime errors", m.sum("observer_container_runtime_errors_total", &[]), 0)?;
    ensure!(
        m.matching("observer_container_runtime_info", &[("runtime", "containerd"), ("socket", &socket)]).count() == 1,
        "observer_container_runtime_info does not name containerd on {socket}"
    );

    // The event log names both pods, and the client's reset names the server's pod as its cause.
    let (code, body) = daemon.get("/api/v1/events?since=0&limit=4096")?;
    ensure!(code == 200, "/api/v1/events answered {code}");
    let page: serde_json::Value = serde_json::from_str(&body)?;
    let events = page["events"].as_array().cloned().unwrap_or_default();
    let of = |comm: &str| events.iter().filter(|e| e["comm"] == comm).cloned().collect::<Vec<_>>();
    check("event-log records of the client (reset received, peer_reset)", of("rt-gateway").len() as u64, 2 * n)?;
    for e in of("rt-gateway") {
        ensure!(
            e["namespace"] == "pay"
                && e["pod"] == "gateway-0"
                && e["container"] == "client"
                && e["container_id"] == client[..12],
            "a client record without its pod: {e}"
        );
        let cause = &e["cause"];
        ensure!(
            cause["pod"] == "orders-0"
                && cause["namespace"] == "shop"
                && cause["container"] == "orders"
                && cause["summary"].as_str().is_some_and(|s| s.contains("(pod shop/orders-0)")),
            "a client record whose cause is not the orders pod: {e}"
        );
    }
    let status: serde_json::Value = serde_json::from_str(&daemon.get("/api/v1/status")?.1)?;
    let runtime = &status["container_runtime"];
    ensure!(
        runtime["state"] == "connected"
            && runtime["runtime"] == "containerd"
            && runtime["pods_named"].as_u64() >= Some(3),
        "status of the container runtime: {runtime}"
    );

    // The gateway pod is deleted: its series go after the expiry; the shop pod's stay.
    for id in [&client, &closer] {
        cri.stop_container(id, Duration::from_secs(5))?;
        cri.remove_container(id)?;
    }
    cri.stop_pod(&gateway.id)?;
    cri.remove_pod(&gateway.id)?;
    let m = settled(&daemon, "the deleted pod's series expiring", |m| {
        m.matching("observer_tcp_resets_received_total", &[("pod", "gateway-0")]).count() == 0
    })?;
    ensure!(m.sum("observer_series_expired_total", &[]) >= 2, "observer_series_expired_total did not count them");
    check(
        "resets sent by shop/orders-0 after the other pod expired",
        m.sum("observer_tcp_resets_sent_total", &with(&orders_pod, &[])),
        n,
    )?;
    drop(daemon);
    containerd.shutdown()
}

/// A Docker container (no pod): its resets are counted under its `container_id`, and its
/// records carry the container's cgroup, `/docker/<id>`.
pub fn docker_containers_are_counted_by_container_id() -> Result<()> {
    crate::require_root()?;
    let netns = NamedNetns::new("rt", "docker")?;
    let dockerd = Dockerd::start(&scratch_dir("docker-pods"))?;
    let dir: PathBuf = scratch_dir("docker-pods-image");
    std::fs::create_dir_all(&dir)?;
    let image = worker_image(&dir)?;
    dockerd.load(&image.path)?;
    // Docker's containers are not CRI containers: no runtime names them.
    let daemon = start_observer(&netns, &["--cri-socket", "none"])?;
    let rsts_before = netns.out_rsts()?;
    let mut args = vec![
        "--cap-drop=ALL".to_string(),
        "--cap-add=SYS_ADMIN".to_string(),
        "-v".to_string(),
        "/run/netns:/run/netns:ro".to_string(),
        "-e".to_string(),
        format!("{WORKER_ENV}=server-linger0"),
    ];
    args.push("--read-only".into());
    let server = dockerd.run(&RunSpec {
        image: image.name.clone(),
        cmd: worker_args(&netns, 8083, N, "rt-dock-srv", Some("forever")),
        extra: args,
        ..RunSpec::default()
    })?;
    let deadline = Instant::now() + PATIENCE;
    while !dockerd.logs(&server.id)?.lines().any(|l| l == "ready") {
        ensure!(Instant::now() < deadline, "the docker server never logged ready: {}", dockerd.logs(&server.id)?);
        std::thread::sleep(Duration::from_millis(50));
    }
    // The client on the host, in the same namespace.
    let exe = std::env::current_exe()?;
    let mut client = std::process::Command::new(&exe);
    client.env(WORKER_ENV, "client").args(worker_args(&netns, 8083, N, "rt-dock-cli", None));
    process::run(&mut client)?;

    let id = &server.id[..12];
    let n = u64::from(N);
    let m = settled(&daemon, "the docker container's resets", |m| {
        m.sum("observer_tcp_premature_closes_total", &[("comm", "rt-dock-srv"), ("kind", "local_reset")]) >= n
    })?;
    check("RSTs the namespace's kernel sent (Tcp: OutRsts)", netns.out_rsts()? - rsts_before, n)?;
    let container = [("container_id", id), ("namespace", ""), ("pod", ""), ("container", "")];
    check(
        "resets sent by the docker container",
        m.sum("observer_tcp_resets_sent_total", &with(&container, &[("comm", "rt-dock-srv")])),
        n,
    )?;
    check(
        "resets received by the client on the host",
        m.sum("observer_tcp_resets_received_total", &[("comm", "rt-dock-cli"), ("container_id", "")]),
        n,
    )?;
    let (_, body) = daemon.get("/api/v1/events?since=0&limit=4096")?;
    let page: serde_json::Value = serde_json::from_str(&body)?;
    let records: Vec<&serde_json::Value> =
        page["events"].as_array().into_iter().flatten().filter(|e| e["comm"] == "rt-dock-srv").collect();
    check("event-log records of the docker server", records.len() as u64, 2 * n)?;
    for e in records {
        ensure!(
            e["container_id"] == id && e["cgroup"] == format!("/docker/{}", server.id) && e["pod"].is_null(),
            "a docker record without its container: {e}"
        );
    }
    drop(daemon);
    dockerd.rm_f(&server.id)?;
    let _ = std::fs::remove_dir_all(&dir);
    dockerd.shutdown()
}
