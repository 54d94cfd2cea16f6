//! A CRI v1 client that makes the calls the kubelet makes, over containerd's Unix socket.
//!
//! The API is synchronous (the tests are synchronous libtest-mimic trials): [`Cri`] holds a
//! private current-thread tokio runtime and blocks on each call. The channel is tonic's, connected
//! with a connector that opens a tokio `UnixStream` (the CRI socket is not TCP).
//!
//! What makes these requests the kubelet's and not just any client's:
//! - the sandbox carries the pod's metadata (name, namespace, uid), its `cgroup_parent` in the
//!   layout of the kubelet's cgroup driver ([`CgroupLayout`]), host networking
//!   (`NamespaceOption.network = NODE`, no hostname: there is no private UTS namespace), a log
//!   directory `pods/NAMESPACE_NAME_UID` as `/var/log/pods/...` is, and the labels
//!   `io.kubernetes.pod.{name,namespace,uid}`;
//! - each container carries the labels `io.kubernetes.pod.{name,namespace,uid}` and
//!   `io.kubernetes.container.name`, the annotations the kubelet adds (restart count,
//!   termination message path and policy), its log at `NAME/0.log` in the pod's log directory,
//!   the same namespace options as its pod (host network; host PID when the pod or the container
//!   asks), and, unless privileged, the kubelet's default masked and read-only `/proc` paths
//!   (containerd masks nothing unless asked).
//!
//! Security settings are first-class ([`ContainerSpec`]): privileged, an exact capability set
//! (`drop: ["ALL"]` then `add`), a read-only root filesystem, host PID, read-only host paths,
//! `run_as_user`. Capability names are the kubelet's (`BPF`, `NET_ADMIN`: no `CAP_` prefix).
use std::{
    collections::{BTreeMap, HashMap},
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    self as api, Capability, ContainerConfig, ContainerMetadata, ContainerState, ContainerStatusRequest,
    CreateContainerRequest, ExecSyncRequest, ImageSpec, Int64Value, KeyValue, LinuxContainerConfig,
    LinuxContainerSecurityContext, LinuxPodSandboxConfig, LinuxSandboxSecurityContext, ListContainersRequest,
    ListPodSandboxRequest, NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata,
    RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest, StopContainerRequest,
    StopPodSandboxRequest, VersionRequest, runtime_service_client::RuntimeServiceClient,
};
use tonic::transport::{Channel, Endpoint, Uri};

/// The kubelet's labels on every container (and the first three on every sandbox).
pub const POD_NAME_LABEL: &str = "io.kubernetes.pod.name";
pub const POD_NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
pub const POD_UID_LABEL: &str = "io.kubernetes.pod.uid";
pub const CONTAINER_NAME_LABEL: &str = "io.kubernetes.container.name";

/// What the kubelet masks in an unprivileged container (`securitycontext.defaultMaskedPaths`).
pub const KUBELET_MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// What the kubelet makes read-only in an unprivileged container (`defaultReadonlyPaths`).
pub const KUBELET_READONLY_PATHS: &[&str] = &["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"];

/// How long one CRI call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The kubelet's cgroup driver, as it shows in the pod's `cgroup_parent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupLayout {
    /// `cgroupDriver: cgroupfs`: `/kubepods/burstable/pod<uid>`; containerd puts each container at
    /// `<parent>/<64-hex id>`.
    Cgroupfs,
    /// `cgroupDriver: systemd`:
    /// `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice`,
    /// passed as the kubelet passes it, with containerd's runc in cgroupfs mode (this host runs no
    /// systemd, so runc's systemd driver cannot). containerd turns a `.slice` parent into the runc
    /// cgroups path `<last slice>:cri-containerd:<id>` (what `ContainerInfo::cgroups_path` shows),
    /// which only the systemd driver understands: the instance's runc wrapper
    /// ([`super::containerd::RUNC_WRAPPER`]) expands it as that driver would, so the container
    /// lands at `<parent>/cri-containerd-<id>.scope`, where it lands on a systemd node.
    Systemd,
}

/// A pod's QoS class, which picks its level in the kubepods hierarchy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl CgroupLayout {
    /// The pod's cgroup parent, as the kubelet computes it.
    pub fn pod_cgroup(self, qos: Qos, uid: &str) -> String {
        match (self, qos) {
            (Self::Cgroupfs, Qos::Guaranteed) => format!("/kubepods/pod{uid}"),
            (Self::Cgroupfs, Qos::Burstable) => format!("/kubepods/burstable/pod{uid}"),
            (Self::Cgroupfs, Qos::BestEffort) => format!("/kubepods/besteffort/pod{uid}"),
            (Self::Systemd, Qos::Guaranteed) => format!("/kubepods.slice/kubepods-pod{}.slice", uid.replace('-', "_")),
            (Self::Systemd, qos) => {
                let class = if qos == Qos::Burstable { "burstable" } else { "besteffort" };
                format!("/kubepods.slice/kubepods-{class}.slice/kubepods-{class}-pod{}.slice", uid.replace('-', "_"))
            }
        }
    }

    /// The cgroup (v2 path, as in `/proc/PID/cgroup`'s `0::` line) of container `id` in that pod.
    pub fn container_cgroup(self, qos: Qos, uid: &str, id: &str) -> String {
        match self {
            Self::Cgroupfs => format!("{}/{id}", self.pod_cgroup(qos, uid)),
            Self::Systemd => format!("{}/cri-containerd-{id}.scope", self.pod_cgroup(qos, uid)),
        }
    }
}

/// A pod to run (its sandbox).
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    /// The pod's uid (a UUID in Kubernetes; any DNS-label-safe string works).
    pub uid: String,
    pub cgroup_parent: CgroupLayout,
    pub qos: Qos,
    /// `hostPID: true`: the sandbox, and every container, in the host's PID namespace.
    pub host_pid: bool,
    /// A privileged sandbox, which containerd requires of a pod with a privileged container (the
    /// kubelet sets it when any container of the pod is privileged).
    pub privileged: bool,
    /// Pod labels (added to the kubelet's three).
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

impl PodSpec {
    /// A burstable pod with the cgroupfs layout, host network, no extra labels.
    pub fn new(name: &str, namespace: &str, uid: &str) -> Self {
        Self {
            name: name.into(),
            namespace: namespace.into(),
            uid: uid.into(),
            cgroup_parent: CgroupLayout::Cgroupfs,
            qos: Qos::Burstable,
            host_pid: false,
            privileged: false,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
        }
    }

    /// The pod's cgroup parent.
    pub fn cgroup(&self) -> String {
        self.cgroup_parent.pod_cgroup(self.qos, &self.uid)
    }

    /// Where container `id` of this pod lands in cgroup2 (the `0::` line of `/proc/PID/cgroup`).
    pub fn container_cgroup(&self, id: &str) -> String {
        self.cgroup_parent.container_cgroup(self.qos, &self.uid, id)
    }
}

/// A host path mounted into a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub host: PathBuf,
    pub container: String,
    pub readonly: bool,
}

/// Linux capabilities to add and drop, by the kubelet's names (`BPF`, `ALL`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub add: Vec<String>,
    pub drop: Vec<String>,
}

impl Capabilities {
    /// Exactly `caps`: drop ALL, add these.
    pub fn exactly(caps: &[&str]) -> Self {
        Self { add: caps.iter().map(|c| c.to_string()).collect(), drop: vec!["ALL".into()] }
    }
}

/// A container to create in a pod.
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    /// The entrypoint (the image's when empty).
    pub command: Vec<String>,
    /// Its arguments (the image's `Cmd` when both are empty).
    pub args: Vec<String>,
    pub working_dir: String,
    pub env: Vec<(String, String)>,
    /// Labels added to the kubelet's four.
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub mounts: Vec<Mount>,
    pub privileged: bool,
    /// `None`: the runtime's default set.
    pub capabilities: Option<Capabilities>,
    pub readonly_rootfs: bool,
    /// `seccompProfile: RuntimeDefault`: the runtime's default seccomp profile (unconfined
    /// otherwise, as the kubelet leaves it without the setting).
    pub seccomp_runtime_default: bool,
    /// `allowPrivilegeEscalation: false` (the kubelet's `no_new_privs`).
    pub no_new_privs: bool,
    /// The host's PID namespace (also implied by [`PodSpec::host_pid`]).
    pub host_pid: bool,
    pub run_as_user: Option<i64>,
}

impl ContainerSpec {
    /// A container named `name` running `image` with its default command.
    pub fn new(name: &str, image: &str) -> Self {
        Self { name: name.into(), image: image.into(), ..Self::default() }
    }

    /// The same with `command` (the entrypoint and its arguments).
    pub fn command<S: Into<String>>(mut self, command: impl IntoIterator<Item = S>) -> Self {
        self.command = command.into_iter().map(Into::into).collect();
        self
    }
}

/// A running pod sandbox.
#[derive(Debug, Clone)]
pub struct Pod {
    /// The sandbox id (64 hex digits).
    pub id: String,
    pub spec: PodSpec,
    /// `pods/NAMESPACE_NAME_UID` under the client's log root: the containers' logs.
    pub log_dir: PathBuf,
    config: PodSandboxConfig,
}

/// `ContainerStatus` (verbose), the parts tests look at.
#[derive(Debug, Clone)]
pub struct ContainerInfo {
    pub id: String,
    pub name: String,
    /// `CONTAINER_RUNNING`, `CONTAINER_EXITED`, ...
    pub state: String,
    /// The container's init process on the host (0 once it exited).
    pub pid: u32,
    /// `runtimeSpec.linux.cgroupsPath` from the verbose info, as containerd handed it to runc.
    pub cgroups_path: String,
    pub exit_code: i32,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub image: String,
    pub log_path: PathBuf,
    /// The whole verbose `info` JSON.
    pub info: serde_json::Value,
}

/// One entry of `ListContainers`.
#[derive(Debug, Clone)]
pub struct ContainerListed {
    pub id: String,
    pub pod_id: String,
    pub name: String,
    pub state: String,
    pub labels: BTreeMap<String, String>,
}

/// What `ExecSync` returned.
#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
}

/// A CRI v1 runtime-service client on one socket.
pub struct Cri {
    runtime: tokio::runtime::Runtime,
    client: RuntimeServiceClient<Channel>,
    socket: PathBuf,
    log_root: PathBuf,
}

impl Cri {
    /// Connects to the CRI socket `socket` and checks it answers `Version`; pod logs go under
    /// `log_root`.
    pub fn connect(socket: &Path, log_root: &Path) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .context("starting the CRI client's tokio runtime")?;
        let channel = runtime
            .block_on(unix_channel(socket.to_path_buf()))
            .with_context(|| format!("connecting to the CRI socket {}", socket.display()))?;
        let this = Self {
            runtime,
            client: RuntimeServiceClient::new(channel),
            socket: socket.to_path_buf(),
            log_root: log_root.to_path_buf(),
        };
        let version =
            this.call("Version", |mut c| async move { c.version(VersionRequest { version: "v1".into() }).await })?;
        if version.runtime_api_version != "v1" {
            bail!(
                "{} speaks CRI {:?}, not v1 ({} {}): use containerd >= 1.6",
                socket.display(),
                version.runtime_api_version,
                version.runtime_name,
                version.runtime_version
            );
        }
        Ok(this)
    }

    fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T>
    where
        F: FnOnce(RuntimeServiceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = self.client.clone();
        self.runtime.block_on(f(client)).map(tonic::Response::into_inner).map_err(|status| {
            anyhow!("CRI {what} on {} failed: {} ({:?})", self.socket.display(), status.message(), status.code())
        })
    }

    /// `RunPodSandbox` as the kubelet sends it for `spec` (see the module doc).
    pub fn run_pod(&self, spec: &PodSpec) -> Result<Pod> {
        let log_dir = self.log_root.join(format!("{}_{}_{}", spec.namespace, spec.name, spec.uid));
        fs::create_dir_all(&log_dir)
            .with_context(|| format!("creating the pod log directory {}", log_dir.display()))?;
        let mut labels = to_map(&spec.labels);
        labels.insert(POD_NAME_LABEL.into(), spec.name.clone());
        labels.insert(POD_NAMESPACE_LABEL.into(), spec.namespace.clone());
        labels.insert(POD_UID_LABEL.into(), spec.uid.clone());
        let mut annotations = to_map(&spec.annotations);
        annotations.insert("kubernetes.io/config.source".into(), "api".into());
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: spec.name.clone(),
                uid: spec.uid.clone(),
                namespace: spec.namespace.clone(),
                attempt: 0,
            }),
            // Host network: the kubelet sends no hostname (the pod has the node's UTS namespace).
            hostname: String::new(),
            log_directory: log_dir.to_string_lossy().into_owned(),
            labels,
            annotations,
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: spec.cgroup(),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(namespaces(spec.host_pid)),
                    privileged: spec.privileged,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let request = RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: String::new() };
        let id = self
            .call("RunPodSandbox", |mut c| async move { c.run_pod_sandbox(request).await })
            .with_context(|| format!("running pod {}/{}", spec.namespace, spec.name))?
            .pod_sandbox_id;
        Ok(Pod { id, spec: spec.clone(), log_dir, config })
    }

    /// `CreateContainer` then `StartContainer`; returns the container id.
    pub fn create_container(&self, pod: &Pod, spec: &ContainerSpec) -> Result<String> {
        let config = container_config(pod, spec);
        let request = CreateContainerRequest {
            pod_sandbox_id: pod.id.clone(),
            config: Some(config),
            sandbox_config: Some(pod.config.clone()),
        };
        let what = format!("container {} of pod {}/{}", spec.name, pod.spec.namespace, pod.spec.name);
        let id = self
            .call("CreateContainer", |mut c| async move { c.create_container(request).await })
            .with_context(|| format!("creating {what}"))?
            .container_id;
        let request = StartContainerRequest { container_id: id.clone() };
        self.call("StartContainer", |mut c| async move { c.start_container(request).await }).with_context(
            || match self.logs(pod, &spec.name).ok().filter(|log| !log.trim().is_empty()) {
                Some(log) => format!("starting {what}; its log ends with:\n{log}"),
                None => format!("starting {what}"),
            },
        )?;
        Ok(id)
    }

    /// `ContainerStatus` with `verbose`: state, pid and cgroups path from the info JSON.
    pub fn container_status(&self, id: &str) -> Result<ContainerInfo> {
        let request = ContainerStatusRequest { container_id: id.into(), verbose: true };
        let response = self.call("ContainerStatus", |mut c| async move { c.container_status(request).await })?;
        let status = response.status.ok_or_else(|| anyhow!("ContainerStatus of {id} returned no status"))?;
        let info: serde_json::Value = match response.info.get("info") {
            Some(text) => serde_json::from_str(text).with_context(|| format!("parsing the verbose info of {id}"))?,
            None => serde_json::Value::Null,
        };
        let pid = info["pid"].as_u64().unwrap_or(0);
        Ok(ContainerInfo {
            id: status.id,
            name: status.metadata.map(|m| m.name).unwrap_or_default(),
            state: state_name(status.state),
            pid: u32::try_from(pid).unwrap_or(0),
            cgroups_path: info["runtimeSpec"]["linux"]["cgroupsPath"].as_str().unwrap_or_default().to_string(),
            exit_code: status.exit_code,
            labels: status.labels.into_iter().collect(),
            annotations: status.annotations.into_iter().collect(),
            image: status.image.map(|i| i.image).unwrap_or_default(),
            log_path: PathBuf::from(status.log_path),
            info,
        })
    }

    /// Waits up to `within` for container `id` to exit; returns its exit code.
    pub fn wait_exit(&self, id: &str, within: Duration) -> Result<i32> {
        let deadline = Instant::now() + within;
        loop {
            let status = self.container_status(id)?;
            if status.state == state_name(ContainerState::ContainerExited as i32) {
                return Ok(status.exit_code);
            }
            if Instant::now() > deadline {
                bail!("container {} ({id}) still {} after {} s", status.name, status.state, within.as_secs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `ExecSync`: runs `cmd` in the running container `id`.
    pub fn exec(&self, id: &str, cmd: &[&str]) -> Result<ExecOutput> {
        let request =
            ExecSyncRequest { container_id: id.into(), cmd: cmd.iter().map(|s| s.to_string()).collect(), timeout: 30 };
        let out = self.call("ExecSync", |mut c| async move { c.exec_sync(request).await })?;
        Ok(ExecOutput {
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            exit_code: out.exit_code,
        })
    }

    /// `StopContainer` (SIGTERM, SIGKILL after `timeout`; 0: SIGKILL at once).
    pub fn stop_container(&self, id: &str, timeout: Duration) -> Result<()> {
        let request = StopContainerRequest { container_id: id.into(), timeout: timeout.as_secs() as i64 };
        self.call("StopContainer", |mut c| async move { c.stop_container(request).await }).map(drop)
    }

    /// `RemoveContainer`.
    pub fn remove_container(&self, id: &str) -> Result<()> {
        let request = RemoveContainerRequest { container_id: id.into() };
        self.call("RemoveContainer", |mut c| async move { c.remove_container(request).await }).map(drop)
    }

    /// `StopPodSandbox` (kills what still runs in it).
    pub fn stop_pod(&self, id: &str) -> Result<()> {
        let request = StopPodSandboxRequest { pod_sandbox_id: id.into() };
        self.call("StopPodSandbox", |mut c| async move { c.stop_pod_sandbox(request).await }).map(drop)
    }

    /// `RemovePodSandbox` (removes its containers too).
    pub fn remove_pod(&self, id: &str) -> Result<()> {
        let request = RemovePodSandboxRequest { pod_sandbox_id: id.into() };
        self.call("RemovePodSandbox", |mut c| async move { c.remove_pod_sandbox(request).await }).map(drop)
    }

    /// `ListContainers`, all of them.
    pub fn list_containers(&self) -> Result<Vec<ContainerListed>> {
        let request = ListContainersRequest { filter: None };
        let list = self.call("ListContainers", |mut c| async move { c.list_containers(request).await })?;
        Ok(list
            .containers
            .into_iter()
            .map(|c| ContainerListed {
                id: c.id,
                pod_id: c.pod_sandbox_id,
                name: c.metadata.map(|m| m.name).unwrap_or_default(),
                state: state_name(c.state),
                labels: c.labels.into_iter().collect(),
            })
            .collect())
    }

    /// The ids of all pod sandboxes (`ListPodSandbox`).
    pub fn list_pods(&self) -> Result<Vec<String>> {
        let request = ListPodSandboxRequest { filter: None };
        let list = self.call("ListPodSandbox", |mut c| async move { c.list_pod_sandbox(request).await })?;
        Ok(list.items.into_iter().map(|p| p.id).collect())
    }

    /// `PodSandboxStatus` with `verbose`: the info JSON (containerd's view of the sandbox).
    pub fn pod_status_info(&self, id: &str) -> Result<serde_json::Value> {
        let request = api::PodSandboxStatusRequest { pod_sandbox_id: id.into(), verbose: true };
        let response = self.call("PodSandboxStatus", |mut c| async move { c.pod_sandbox_status(request).await })?;
        match response.info.get("info") {
            Some(text) => serde_json::from_str(text).with_context(|| format!("parsing the verbose info of pod {id}")),
            None => Ok(serde_json::Value::Null),
        }
    }

    /// Stops and removes every container and pod (a test's teardown, and the instance's), then
    /// the pods' cgroups as far as they are empty (runc removes a container's own cgroup, but the
    /// pod level, the kubelet's to make and remove, would stay).
    pub fn remove_everything(&self) -> Result<()> {
        let mut errors = Vec::new();
        for c in self.list_containers()? {
            if let Err(e) = self.stop_container(&c.id, Duration::ZERO).and_then(|()| self.remove_container(&c.id)) {
                errors.push(format!("container {} ({}): {e:#}", c.name, c.id));
            }
        }
        let mut cgroups = Vec::new();
        for pod in self.list_pods()? {
            if let Ok(info) = self.pod_status_info(&pod)
                && let Some(parent) = info["config"]["linux"]["cgroup_parent"].as_str().filter(|p| !p.is_empty())
            {
                cgroups.push(parent.to_string());
            }
            if let Err(e) = self.stop_pod(&pod).and_then(|()| self.remove_pod(&pod)) {
                errors.push(format!("pod {pod}: {e:#}"));
            }
        }
        for cgroup in cgroups {
            super::host::remove_cgroup(&cgroup);
        }
        if errors.is_empty() { Ok(()) } else { bail!("{}", errors.join("; ")) }
    }

    /// What container `name` of `pod` wrote to stdout and stderr (its CRI log file, with the
    /// timestamp/stream/tag prefix of each line removed and partial lines joined).
    pub fn logs(&self, pod: &Pod, name: &str) -> Result<String> {
        let path = pod.log_dir.join(container_log_path(name));
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading the container log {}", path.display()))?;
        Ok(parse_cri_log(&text))
    }
}

/// A tonic channel over the Unix socket `path`. The URI is never dialled: the connector opens
/// the socket instead (a fresh connection whenever tonic reconnects).
async fn unix_channel(path: PathBuf) -> Result<Channel, tonic::transport::Error> {
    let connect = move |_: Uri| {
        let path = path.clone();
        async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
    };
    Endpoint::from_static("http://[::1]:50051")
        .connect_timeout(Duration::from_secs(10))
        .timeout(CALL_TIMEOUT)
        .connect_with_connector(tower::service_fn(connect))
        .await
}

/// The kubelet's container log path, relative to the pod's log directory.
fn container_log_path(name: &str) -> String {
    format!("{name}/0.log")
}

/// The namespaces the kubelet asks for a pod on the host network: the node's network, the pod's
/// IPC, and a PID namespace per container unless `hostPID` (then the node's).
fn namespaces(host_pid: bool) -> NamespaceOption {
    NamespaceOption {
        network: NamespaceMode::Node as i32,
        pid: if host_pid { NamespaceMode::Node } else { NamespaceMode::Container } as i32,
        ipc: NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

fn container_config(pod: &Pod, spec: &ContainerSpec) -> ContainerConfig {
    let mut labels = to_map(&spec.labels);
    labels.insert(POD_NAME_LABEL.into(), pod.spec.name.clone());
    labels.insert(POD_NAMESPACE_LABEL.into(), pod.spec.namespace.clone());
    labels.insert(POD_UID_LABEL.into(), pod.spec.uid.clone());
    labels.insert(CONTAINER_NAME_LABEL.into(), spec.name.clone());
    let mut annotations = to_map(&spec.annotations);
    for (k, v) in [
        ("io.kubernetes.container.restartCount", "0"),
        ("io.kubernetes.container.terminationMessagePath", "/dev/termination-log"),
        ("io.kubernetes.container.terminationMessagePolicy", "File"),
        ("io.kubernetes.pod.terminationGracePeriod", "30"),
    ] {
        annotations.entry(k.into()).or_insert_with(|| v.into());
    }
    let (masked, readonly) = if spec.privileged {
        (Vec::new(), Vec::new())
    } else {
        (to_strings(KUBELET_MASKED_PATHS), to_strings(KUBELET_READONLY_PATHS))
    };
    ContainerConfig {
        metadata: Some(ContainerMetadata { name: spec.name.clone(), attempt: 0 }),
        image: Some(ImageSpec { image: spec.image.clone(), ..Default::default() }),
        command: spec.command.clone(),
        args: spec.args.clone(),
        working_dir: spec.working_dir.clone(),
        envs: spec.env.iter().map(|(key, value)| KeyValue { key: key.clone(), value: value.clone() }).collect(),
        mounts: spec
            .mounts
            .iter()
            .map(|m| api::Mount {
                container_path: m.container.clone(),
                host_path: m.host.to_string_lossy().into_owned(),
                readonly: m.readonly,
                ..Default::default()
            })
            .collect(),
        labels,
        annotations,
        log_path: container_log_path(&spec.name),
        // `seccomp_profile_path` is deprecated, and still what runtimes before the `seccomp`
        // field read.
        #[allow(deprecated)]
        linux: Some(LinuxContainerConfig {
            resources: None,
            security_context: Some(LinuxContainerSecurityContext {
                capabilities: spec.capabilities.as_ref().map(|c| Capability {
                    add_capabilities: c.add.clone(),
                    drop_capabilities: c.drop.clone(),
                    ..Default::default()
                }),
                privileged: spec.privileged,
                namespace_options: Some(namespaces(spec.host_pid || pod.spec.host_pid)),
                run_as_user: spec.run_as_user.map(|value| Int64Value { value }),
                readonly_rootfs: spec.readonly_rootfs,
                no_new_privs: spec.no_new_privs,
                // Both fields, as the kubelet sends them: runtimes before CRI's `seccomp` field
                // read the deprecated path.
                seccomp: spec.seccomp_runtime_default.then(|| k8s_cri::v1::SecurityProfile {
                    profile_type: k8s_cri::v1::security_profile::ProfileType::RuntimeDefault as i32,
                    localhost_ref: String::new(),
                }),
                seccomp_profile_path: if spec.seccomp_runtime_default {
                    "runtime/default".into()
                } else {
                    String::new()
                },
                masked_paths: masked,
                readonly_paths: readonly,
                ..Default::default()
            }),
        }),
        ..Default::default()
    }
}

fn to_map(m: &BTreeMap<String, String>) -> HashMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn to_strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn state_name(state: i32) -> String {
    ContainerState::try_from(state).map_or_else(|_| format!("state {state}"), |s| s.as_str_name().to_string())
}

/// The CRI log format: `TIMESTAMP STREAM TAG MESSAGE` per line, `TAG` `F` (full) or `P` (partial:
/// the line continues in the next record).
fn parse_cri_log(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let mut parts = line.splitn(4, ' ');
        let (_time, _stream, tag) = (parts.next(), parts.next(), parts.next());
        let message = parts.next().unwrap_or("");
        out.push_str(message);
        if tag != Some("P") {
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_parents_follow_the_kubelets_drivers() {
        let uid = "1f2e-3d";
        assert_eq!(CgroupLayout::Cgroupfs.pod_cgroup(Qos::Burstable, uid), "/kubepods/burstable/pod1f2e-3d");
        assert_eq!(CgroupLayout::Cgroupfs.pod_cgroup(Qos::Guaranteed, uid), "/kubepods/pod1f2e-3d");
        assert_eq!(
            CgroupLayout::Systemd.pod_cgroup(Qos::Burstable, uid),
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1f2e_3d.slice"
        );
        assert_eq!(CgroupLayout::Systemd.pod_cgroup(Qos::Guaranteed, uid), "/kubepods.slice/kubepods-pod1f2e_3d.slice");
        assert_eq!(
            CgroupLayout::Systemd.container_cgroup(Qos::BestEffort, uid, "ab"),
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1f2e_3d.slice/cri-containerd-ab.scope"
        );
        assert_eq!(
            CgroupLayout::Cgroupfs.container_cgroup(Qos::BestEffort, uid, "ab"),
            "/kubepods/besteffort/pod1f2e-3d/ab"
        );
    }

    #[test]
    fn cri_log_lines_lose_their_prefix_and_partials_join() {
        let log = "2024-01-01T00:00:00.1Z stdout P hel\n2024-01-01T00:00:00.2Z stdout F lo\n2024-01-01T00:00:00.3Z stderr F a b\n";
        assert_eq!(parse_cri_log(log), "hello\na b\n");
    }

    #[test]
    fn containers_carry_the_kubelets_labels_and_namespaces() {
        let mut spec = PodSpec::new("web", "shop", "u-1");
        spec.host_pid = true;
        let pod = Pod { id: "p".into(), spec, log_dir: PathBuf::new(), config: PodSandboxConfig::default() };
        let config = container_config(&pod, &ContainerSpec::new("app", "img"));
        assert_eq!(config.labels[POD_NAME_LABEL], "web");
        assert_eq!(config.labels[POD_NAMESPACE_LABEL], "shop");
        assert_eq!(config.labels[POD_UID_LABEL], "u-1");
        assert_eq!(config.labels[CONTAINER_NAME_LABEL], "app");
        assert_eq!(config.log_path, "app/0.log");
        let sc = config.linux.unwrap().security_context.unwrap();
        let ns = sc.namespace_options.unwrap();
        assert_eq!((ns.network, ns.pid), (NamespaceMode::Node as i32, NamespaceMode::Node as i32));
        assert!(sc.masked_paths.contains(&"/proc/kcore".to_string()));
    }
}
