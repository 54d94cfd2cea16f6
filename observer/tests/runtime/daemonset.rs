//! observer's own image, run the way its DaemonSet runs it: the archive `cargo xtask image`
//! wrote, imported into a real containerd and started through the CRI socket with the settings
//! of a rendered overlay (`kubectl kustomize deploy/kubernetes/overlays/...`): host PID
//! namespace, the host paths the DaemonSet mounts (read-only), a read-only root file system, the
//! overlay's security context (privileged, or exactly the least-privilege capabilities with the
//! runtime's default seccomp profile and no privilege escalation), and its arguments. Then real
//! traffic in a network namespace of the test's own must be counted exactly.
//!
//! The one setting changed is `--listen`: the harness runs pods on the host network, so the
//! daemon listens on a free loopback port. The runtime's socket directory (`/run/containerd` in
//! the DaemonSet) is the test's containerd's, so the daemon finds and asks the runtime that runs
//! it.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use observer_testkit::{
    Metrics, http,
    net::{NamedNetns, free_port},
    process,
    runtime::{
        containerd::Containerd,
        cri::{Capabilities, ContainerSpec, Cri, Mount, Pod, PodSpec},
        scratch_dir,
    },
};
use serde_json::Value;

use observer_testkit::worker::{self, WORKER_ENV};

use crate::{pods::check, yaml};

/// Set by `cargo xtask test`: the archive of `cargo xtask image`.
const IMAGE_ARCHIVE_ENV: &str = "OBSERVER_IMAGE_ARCHIVE";
const PATIENCE: Duration = Duration::from_secs(60);
const N: u32 = 4;

/// The workspace root (this file is observer/tests/runtime/daemonset.rs).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// The DaemonSet of an overlay, rendered by `kubectl kustomize`.
pub fn rendered_daemonset(overlay: &str) -> Result<Value> {
    let dir = root().join("deploy/kubernetes/overlays").join(overlay);
    let out = process::output(Command::new("kubectl").arg("kustomize").arg(&dir))
        .context("kubectl is needed to render the overlays (apt-get install kubernetes-client)")?;
    ensure!(out.status.success(), "kubectl kustomize {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    let docs = yaml::parse_all(&String::from_utf8_lossy(&out.stdout)).map_err(anyhow::Error::msg)?;
    docs.into_iter().find(|d| d["kind"] == "DaemonSet").context("the overlay renders no DaemonSet")
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_owned)).collect()
}

/// The overlay's capability list (`add`), for the least-privilege measurements.
pub fn added_capabilities(ds: &Value) -> Vec<String> {
    strings(
        &ds.pointer("/spec/template/spec/containers/0/securityContext/capabilities/add").cloned().unwrap_or_default(),
    )
}

/// What the kubelet would ask the runtime for, from the DaemonSet: the pod and its container.
/// `cri_dir` stands in for the host's `/run/containerd`; `caps` overrides the capability list
/// (the measurements remove one at a time).
fn as_the_kubelet_would(
    ds: &Value,
    image: &str,
    port: u16,
    cri_dir: &Path,
    caps: Option<&[String]>,
) -> Result<(PodSpec, ContainerSpec)> {
    let pod = ds.pointer("/spec/template/spec").context("no pod template")?;
    let c = pod.pointer("/containers/0").context("no container")?;
    let sc = &c["securityContext"];
    let privileged = sc["privileged"] == true;
    let mut pod_spec = PodSpec::new("observer-x7k2p", "observer", "3c4d5e6f-7a8b-4c9d-8e0f-1a2b3c4d5e6f");
    pod_spec.host_pid = pod["hostPID"] == true;
    pod_spec.privileged = privileged;
    let mut args: Vec<String> = strings(&c["args"]);
    let listen = args.iter().position(|a| a.starts_with("--listen")).context("the DaemonSet sets no --listen")?;
    args[listen] = format!("--listen=127.0.0.1:{port}");
    // hostPath volumes by name; the runtime's socket directory is the test's containerd's.
    let mut mounts = Vec::new();
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        let name = m["name"].as_str().unwrap_or_default();
        let volume = pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == name)
            .context("a volumeMount without its volume")?;
        let host =
            volume.pointer("/hostPath/path").and_then(Value::as_str).context("a volume that is not a hostPath")?;
        let container = m["mountPath"].as_str().context("a volumeMount without mountPath")?.to_string();
        let host = if host == "/run/containerd" { cri_dir.to_path_buf() } else { PathBuf::from(host) };
        // DirectoryOrCreate volumes of runtimes this host does not run: the kubelet would create
        // an empty directory on the node; the test does not litter the host with them.
        if !host.exists() && volume.pointer("/hostPath/type") == Some(&Value::from("DirectoryOrCreate")) {
            continue;
        }
        mounts.push(Mount { host, container, readonly: m["readOnly"] == true });
    }
    let seccomp = sc.pointer("/seccompProfile/type").or_else(|| pod.pointer("/securityContext/seccompProfile/type"));
    let capabilities = match caps {
        Some(caps) => Some(Capabilities { add: caps.to_vec(), drop: vec!["ALL".into()] }),
        None if sc["capabilities"].is_object() => {
            Some(Capabilities { add: strings(&sc["capabilities"]["add"]), drop: strings(&sc["capabilities"]["drop"]) })
        }
        None => None,
    };
    let container = ContainerSpec {
        args,
        env: c["env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| Some((e["name"].as_str()?.to_string(), e["value"].as_str()?.to_string())))
            .collect(),
        mounts,
        privileged,
        capabilities,
        readonly_rootfs: sc["readOnlyRootFilesystem"] == true,
        seccomp_runtime_default: seccomp == Some(&Value::from("RuntimeDefault")),
        no_new_privs: sc["allowPrivilegeEscalation"] == false,
        run_as_user: sc["runAsUser"].as_i64(),
        ..ContainerSpec::new(c["name"].as_str().unwrap_or("observer"), image)
    };
    Ok((pod_spec, container))
}

/// The archive `cargo xtask image` wrote, imported; its image name.
fn imported_image(containerd: &Containerd) -> Result<String> {
    let archive = std::env::var_os(IMAGE_ARCHIVE_ENV).map(PathBuf::from).with_context(|| {
        format!("{IMAGE_ARCHIVE_ENV} is not set: run the suite with `cargo xtask test`, which builds the image, or `cargo xtask image` and set {IMAGE_ARCHIVE_ENV}=$(cargo xtask image --print-path)")
    })?;
    ensure!(archive.is_file(), "{IMAGE_ARCHIVE_ENV}={} is not a file: run `cargo xtask image`", archive.display());
    containerd.import(&archive)?;
    let listed = containerd.ctr(&["image", "ls", "-q"])?;
    listed
        .lines()
        .find(|l| l.contains("/observer:"))
        .map(str::to_owned)
        .with_context(|| format!("`ctr image import {}` registered no observer image: {listed}", archive.display()))
}

/// A daemon started from the image in a pod, as the DaemonSet starts it.
pub struct Running {
    pub port: u16,
    pub pod: Pod,
    pub id: String,
}

impl Running {
    fn start(cri: &Cri, pod: &PodSpec, container: &ContainerSpec, port: u16) -> Result<Self> {
        let pod = cri.run_pod(pod)?;
        let id = cri.create_container(&pod, container)?;
        Ok(Self { port, pod, id })
    }

    fn get(&self, path: &str) -> Result<(u16, String)> {
        let r = http::get(std::net::SocketAddr::from(([127, 0, 0, 1], self.port)), path, Duration::from_secs(10))?;
        Ok((r.status, r.body))
    }

    /// Waits for `/healthz` 200; `Err` with the container's log if it exits or never gets ready.
    fn ready(&self, cri: &Cri) -> Result<()> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok((200, _)) = self.get("/healthz") {
                return Ok(());
            }
            let status = cri.container_status(&self.id)?;
            if status.state == "CONTAINER_EXITED" || Instant::now() > deadline {
                bail!(
                    "observer in its pod did not get ready ({}, exit code {}); its log:\n{}",
                    status.state,
                    status.exit_code,
                    cri.logs(&self.pod, "observer").unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn status(&self) -> Result<Value> {
        let (code, body) = self.get("/api/v1/status")?;
        ensure!(code == 200, "/api/v1/status answered {code}");
        Ok(serde_json::from_str(&body)?)
    }

    /// The status report's `container_runtime` once the runtime has answered or failed: ready
    /// means the probes are attached, and the daemon asks the runtime only after that (until
    /// then the report says `unreachable` with no error: not answered yet).
    fn runtime_answered(&self) -> Result<Value> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let runtime = self.status()?["container_runtime"].clone();
            if runtime["state"] == "connected" || !runtime["error"].is_null() || Instant::now() > deadline {
                return Ok(runtime);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn metrics(&self) -> Result<Metrics> {
        let (_, body) = self.get("/metrics")?;
        Metrics::parse(&body)
    }

    fn remove(self, cri: &Cri) -> Result<()> {
        cri.stop_container(&self.id, Duration::from_secs(10))?;
        cri.remove_container(&self.id)?;
        cri.stop_pod(&self.pod.id)?;
        cri.remove_pod(&self.pod.id)
    }
}

/// Resets made in the test's namespace by host processes named `comm_srv`/`comm_cli`: the daemon
/// in the pod must count them exactly (`Tcp: OutRsts` of the namespace is the ground truth).
fn count_exactly(running: &Running, tag: &str) -> Result<()> {
    let netns = NamedNetns::new("rt", tag)?;
    let (srv, cli) = (format!("rt-{tag}-srv"), format!("rt-{tag}-cli"));
    let before = netns.out_rsts()?;
    let exe = std::env::current_exe()?;
    let args = |comm: &str| worker::args(&netns.path(), 8090, N, comm, None);
    let mut server =
        Command::new(&exe).env(WORKER_ENV, "server-linger0").args(args(&srv)).stdout(Stdio::piped()).spawn()?;
    let mut lines = BufReader::new(server.stdout.take().context("no server stdout")?).lines();
    ensure!(matches!(lines.next(), Some(Ok(l)) if l == "ready"), "the server worker did not get ready");
    let client = process::run(Command::new(&exe).env(WORKER_ENV, "client").args(args(&cli)));
    let _ = server.kill();
    let _ = server.wait();
    client?;
    let n = u64::from(N);
    let deadline = Instant::now() + PATIENCE;
    let m = loop {
        let m = running.metrics()?;
        if m.sum("observer_tcp_premature_closes_total", &[("comm", &cli)]) >= n || Instant::now() > deadline {
            std::thread::sleep(Duration::from_millis(500));
            break running.metrics()?;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let sent = netns.out_rsts()? - before;
    check("RSTs the namespace's kernel sent (Tcp: OutRsts)", sent, n)?;
    check(
        "resets sent by the server",
        m.sum("observer_tcp_resets_sent_total", &[("comm", &srv), ("role", "server")]),
        sent,
    )?;
    check(
        "resets received by the client",
        m.sum("observer_tcp_resets_received_total", &[("comm", &cli), ("role", "client")]),
        n,
    )?;
    check(
        "peer resets of the client",
        m.sum("observer_tcp_premature_closes_total", &[("comm", &cli), ("kind", "peer_reset")]),
        n,
    )?;
    check(
        "local resets of the server",
        m.sum("observer_tcp_premature_closes_total", &[("comm", &srv), ("kind", "local_reset")]),
        n,
    )?;
    check("events lost", m.events_lost(), 0)?;
    Ok(())
}

/// Runs `overlay`'s DaemonSet from the image; checks every probe attached, the runtime named,
/// and exact counts. Returns the status report.
fn run_overlay(overlay: &str, tag: &str) -> Result<Value> {
    crate::require_root()?;
    let containerd = Containerd::start(&scratch_dir(tag))?;
    let image = imported_image(&containerd)?;
    let ds = rendered_daemonset(overlay)?;
    let port = free_port()?;
    let (pod, container) = as_the_kubelet_would(&ds, &image, port, &containerd.dir, None)?;
    let cri = containerd.cri()?;
    let running = Running::start(&cri, &pod, &container, port)?;
    running.ready(&cri)?;
    let status = running.status()?;
    let probes = status["probes"].as_array().cloned().unwrap_or_default();
    ensure!(
        !probes.is_empty() && probes.iter().all(|p| p["state"] == "attached"),
        "not every probe attached: {probes:?}"
    );
    let runtime = running.runtime_answered()?;
    ensure!(
        runtime["state"] == "connected" && runtime["socket"] == "/run/containerd/containerd.sock",
        "the daemon in its pod does not name pods through the mounted runtime socket: {runtime}"
    );
    count_exactly(&running, tag)?;
    running.remove(&cri)?;
    containerd.shutdown()?;
    Ok(status)
}

pub fn privileged_daemonset_counts_exactly() -> Result<()> {
    run_overlay("privileged", "ds-priv").map(|_| ())
}

/// The least-privilege overlay, exactly: it attaches and counts. Then each of its capabilities
/// is removed in turn, and what that capability serves must break, as README's capability table
/// says (the table is this test's record).
pub fn least_privilege_daemonset_counts_exactly_and_needs_each_capability() -> Result<()> {
    let status = run_overlay("least-privilege", "ds-least")?;
    let degraded: Vec<String> = strings(&status["degraded"]);
    crate::require_root()?;
    let containerd = Containerd::start(&scratch_dir("ds-caps"))?;
    let image = imported_image(&containerd)?;
    let ds = rendered_daemonset("least-privilege")?;
    let caps = added_capabilities(&ds);
    let cri = containerd.cri()?;
    let mut report = Vec::new();
    for cap in &caps {
        let without: Vec<String> = caps.iter().filter(|c| *c != cap).cloned().collect();
        let port = free_port()?;
        let (pod, container) = as_the_kubelet_would(&ds, &image, port, &containerd.dir, Some(&without))?;
        let running = Running::start(&cri, &pod, &container, port)?;
        let outcome = match running.ready(&cri) {
            Err(e) => format!("does not start: {}", last_error_line(&format!("{e:#}"))),
            Ok(()) => {
                let s = running.status()?;
                // Compared without their details (pids, namespace ids).
                let gist = |d: &str| d.split(". First:").next().unwrap_or(d).to_string();
                let known: BTreeSet<String> = degraded.iter().map(|d| gist(d)).collect();
                let more: BTreeSet<String> =
                    strings(&s["degraded"]).iter().map(|d| gist(d)).filter(|d| !known.contains(d)).collect();
                if more.is_empty() {
                    "nothing observable".to_string()
                } else {
                    format!("degraded: {}", more.into_iter().collect::<Vec<_>>().join(" | "))
                }
            }
        };
        running.remove(&cri)?;
        report.push(format!("without {cap}: {outcome}"));
    }
    // The optional pair (deploy/README.md): connections open before start-up in other network
    // namespaces are listed and owned only with them.
    let seeding: Vec<String> =
        caps.iter().cloned().chain(["SYS_ADMIN".to_string(), "SYS_PTRACE".to_string()]).collect();
    let port = free_port()?;
    let (pod, container) = as_the_kubelet_would(&ds, &image, port, &containerd.dir, Some(&seeding))?;
    let running = Running::start(&cri, &pod, &container, port)?;
    running.ready(&cri)?;
    let with_seeding = strings(&running.status()?["degraded"]);
    running.remove(&cri)?;
    let seeding_degraded = |d: &Vec<String>| d.iter().any(|d| d.starts_with("connections open before start-up"));
    ensure!(
        seeding_degraded(&degraded),
        "without SYS_ADMIN the daemon did not say that it cannot list pre-existing connections: {degraded:?}"
    );
    ensure!(
        !seeding_degraded(&with_seeding),
        "with SYS_ADMIN and SYS_PTRACE pre-existing connections are still not listed: {with_seeding:?}"
    );
    report.push(format!("with SYS_ADMIN and SYS_PTRACE added: degraded {with_seeding:?}"));
    containerd.shutdown()?;
    let useless: Vec<&String> = report.iter().filter(|r| r.ends_with("nothing observable")).collect();
    println!("least-privilege set {caps:?}, degraded with all of them: {degraded:?}\n{}", report.join("\n"));
    ensure!(
        useless.is_empty(),
        "capabilities whose removal changes nothing observable (drop them from the overlay): {useless:?}"
    );
    Ok(())
}

fn last_error_line(text: &str) -> String {
    text.lines().rev().find(|l| l.contains("Error") || l.contains("error")).unwrap_or(text).trim().to_string()
}
