//! The real-runtime harness (`observer_testkit::runtime`) proved on this host: pods run through
//! containerd's CRI socket as the kubelet runs them, a Docker container, and the security
//! settings observer's DaemonSet uses, each checked where it takes effect (the container's
//! `/proc/PID/cgroup` and `/proc/PID/status`, what it can see and write), and every instance
//! checked to leave nothing behind.
//!
//! Host only: it needs root and Debian's `containerd runc docker.io busybox-static` (`cargo xtask
//! test` installs them), and it is never packed into the QEMU kernel matrix, which runs only the
//! `e2e` binary. Without a runtime the trials fail, naming what to install; they never skip.

use std::{collections::BTreeMap, fs, path::Path, time::Duration};

use anyhow::{Context as _, Result, bail, ensure};
use libtest_mimic::{Arguments, Failed, Trial};
use observer_testkit::{
    process,
    runtime::{
        cgroup_v2_path,
        containerd::{BUSYBOX_IMAGE, Containerd},
        cri::{
            CONTAINER_NAME_LABEL, Capabilities, CgroupLayout, ContainerSpec, Cri, Mount, POD_NAME_LABEL,
            POD_NAMESPACE_LABEL, POD_UID_LABEL, Pod, PodSpec,
        },
        docker::{Dockerd, RunSpec},
        host::{self, Footprint},
        image::OciImage,
        scratch_dir,
    },
};

mod daemonset;
mod pods;
// The deploy suite's YAML reader (the rendered overlays); it uses all of it, this suite part.
#[path = "../deploy/yaml.rs"]
#[allow(dead_code)]
mod yaml;

fn main() {
    observer_testkit::worker::run_if_worker();
    let args = Arguments::from_args();
    let trials = vec![
        trial(
            "cri_pods_in_two_containerds_land_in_the_kubelets_cgroupfs_and_systemd_cgroups_with_its_labels",
            cri_cgroup_layouts,
        ),
        trial("docker_containers_land_in_docker_and_cgroup_parent_cgroups_and_leave_nothing", docker_cgroups),
        trial(
            "cri_security_settings_take_effect_caps_privileged_readonly_rootfs_host_pid_mounts_user",
            cri_security_settings,
        ),
        trial("an_image_of_a_dynamically_linked_host_binary_and_its_libraries_runs_under_cri", host_binary_image),
        trial(
            "cri_pods_are_counted_exactly_by_namespace_pod_and_container_and_deleted_pods_expire",
            pods::cri_pods_are_counted_by_namespace_pod_and_container,
        ),
        trial(
            "docker_containers_are_counted_exactly_by_container_id",
            pods::docker_containers_are_counted_by_container_id,
        ),
        trial(
            "the_image_run_as_the_privileged_daemonset_counts_exactly",
            daemonset::privileged_daemonset_counts_exactly,
        ),
        trial(
            "the_image_run_as_the_least_privilege_daemonset_counts_exactly_and_needs_each_capability",
            daemonset::least_privilege_daemonset_counts_exactly_and_needs_each_capability,
        ),
    ];
    libtest_mimic::run(&args, trials).exit();
}

fn trial(name: &'static str, f: fn() -> Result<()>) -> Trial {
    Trial::test(name, move || f().map_err(|e| Failed::from(format!("{e:#}"))))
}

fn require_root() -> Result<()> {
    ensure!(process::is_root(), "the runtime tests run containers: run them as root");
    Ok(())
}

/// Polls `f` for up to 10 s until it gives `Some`.
fn eventually<T>(what: &str, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if std::time::Instant::now() > deadline {
            bail!("{what} did not happen within 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn is_container_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// After an instance was dropped: nothing of it runs or is mounted, its directory is gone, and
/// the given container processes and cgroups (cgroup2 paths) are gone too.
fn check_nothing_left(footprint: &Footprint, pids: &[u32], cgroups: &[&str]) -> Result<()> {
    let mut left = footprint.leftovers();
    ensure!(
        footprint.processes.iter().any(|p| p.cmdline.contains("containerd-shim")),
        "the footprint saw no shim, so it proves nothing: {:?}",
        footprint.processes
    );
    for p in host::still_there(&footprint.processes) {
        left.push(format!("process {} ({}) is still in /proc (a zombie nobody reaped)", p.pid, p.cmdline));
    }
    for pid in pids {
        if let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat"))
            && !stat.contains(") Z ")
        {
            left.push(format!("container process {pid} still runs"));
        }
    }
    for cgroup in cgroups {
        let dir = Path::new("/sys/fs/cgroup/unified").join(cgroup.trim_start_matches('/'));
        if dir.exists() {
            left.push(format!("cgroup {} still exists", dir.display()));
        }
    }
    ensure!(left.is_empty(), "left behind after teardown:\n  {}", left.join("\n  "));
    Ok(())
}

struct Layout {
    layout: CgroupLayout,
    dir: &'static str,
    uid: &'static str,
}

/// (a) Two containerd instances at once, one pod each: the cgroupfs layout in one, the systemd
/// layout in the other.
fn cri_cgroup_layouts() -> Result<()> {
    require_root()?;
    let layouts = [
        Layout { layout: CgroupLayout::Cgroupfs, dir: "cri-cgroupfs", uid: "6f1c2d3e-4a5b-4c6d-8e7f-0a1b2c3d4e5f" },
        Layout { layout: CgroupLayout::Systemd, dir: "cri-systemd", uid: "7a2b3c4d-5e6f-4a7b-9c8d-1e2f3a4b5c6d" },
    ];
    let instances: Vec<Containerd> =
        layouts.iter().map(|l| Containerd::start(&scratch_dir(l.dir))).collect::<Result<_>>()?;
    let mut seen = Vec::new();
    for (l, containerd) in layouts.iter().zip(&instances) {
        let cri = containerd.cri()?;
        let mut spec = PodSpec::new(&format!("web-{}", l.dir), "shop", l.uid);
        spec.cgroup_parent = l.layout;
        let pod = cri.run_pod(&spec)?;
        let id = cri.create_container(
            &pod,
            &ContainerSpec::new("app", BUSYBOX_IMAGE).command(["sh", "-c", "echo ready; exec sleep 600"]),
        )?;
        ensure!(is_container_id(&id), "container id {id:?} is not 64 hex digits");
        let status = cri.container_status(&id)?;
        ensure!(status.state == "CONTAINER_RUNNING" && status.pid > 0, "container {id} is not running: {status:?}");
        let underscored = l.uid.replace('-', "_");
        let want = match l.layout {
            CgroupLayout::Cgroupfs => format!("/kubepods/burstable/pod{}/{id}", l.uid),
            CgroupLayout::Systemd => format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{underscored}.slice/cri-containerd-{id}.scope"
            ),
        };
        let got = cgroup_v2_path(status.pid)?;
        ensure!(got == want, "{:?}: container {id} is in cgroup {got}, want {want}", l.layout);
        ensure!(
            spec.container_cgroup(&id) == want,
            "PodSpec::container_cgroup disagrees: {}",
            spec.container_cgroup(&id)
        );
        let want_labels = BTreeMap::from([
            (POD_NAME_LABEL, spec.name.as_str()),
            (POD_NAMESPACE_LABEL, "shop"),
            (POD_UID_LABEL, l.uid),
            (CONTAINER_NAME_LABEL, "app"),
        ]);
        for (k, v) in &want_labels {
            ensure!(
                status.labels.get(*k).map(String::as_str) == Some(*v),
                "label {k}: got {:?}, want {v}",
                status.labels.get(*k)
            );
        }
        let listed = cri.list_containers()?;
        ensure!(listed.iter().any(|c| c.id == id && c.pod_id == pod.id), "ListContainers lacks {id}: {listed:?}");
        let log = eventually("the container's `ready` line in its log", || {
            Ok(cri.logs(&pod, "app").ok().filter(|l| l.contains("ready")))
        })?;
        ensure!(log == "ready\n", "the container log is {log:?}, want \"ready\\n\"");
        eprintln!("{:?}: {got}", l.layout);
        seen.push((status.pid, spec.cgroup(), want));
    }
    for (containerd, (pid, pod_cgroup, container_cgroup)) in instances.into_iter().zip(&seen) {
        let footprint = containerd.footprint();
        containerd.shutdown()?;
        check_nothing_left(&footprint, &[*pid], &[container_cgroup, pod_cgroup])?;
    }
    Ok(())
}

/// (b) Docker: the default `/docker/<id>` cgroup and a `--cgroup-parent` one.
fn docker_cgroups() -> Result<()> {
    require_root()?;
    let docker = Dockerd::start(&scratch_dir("docker"))?;
    let plain = docker.run(&RunSpec {
        image: docker.busybox.clone(),
        name: "plain".into(),
        labels: vec![("observer.test".into(), "plain".into())],
        cmd: vec!["sleep".into(), "600".into()],
        ..RunSpec::default()
    })?;
    ensure!(is_container_id(&plain.id), "docker id {:?} is not 64 hex digits", plain.id);
    let got = cgroup_v2_path(plain.pid)?;
    ensure!(got == format!("/docker/{}", plain.id), "docker container {} is in cgroup {got}", plain.id);
    eprintln!("docker: {got}");
    let inspect = docker.inspect(&plain.id)?;
    ensure!(inspect["Config"]["Labels"]["observer.test"] == "plain", "labels: {}", inspect["Config"]["Labels"]);
    ensure!(inspect["HostConfig"]["NetworkMode"] == "host", "network: {}", inspect["HostConfig"]["NetworkMode"]);

    let parent = "/kubepods/besteffort/pod8b3c4d5e-6f7a-4b8c-9d0e-2f3a4b5c6d7e";
    let nested = docker.run(&RunSpec {
        image: docker.busybox.clone(),
        name: "nested".into(),
        cmd: vec!["sleep".into(), "600".into()],
        cgroup_parent: Some(parent.into()),
        ..RunSpec::default()
    })?;
    let got = cgroup_v2_path(nested.pid)?;
    ensure!(got == format!("{parent}/{}", nested.id), "docker container with --cgroup-parent is in cgroup {got}");
    eprintln!("docker --cgroup-parent: {got}");
    docker.rm_f(&nested.id)?;
    ensure!(!docker.containers()?.contains(&nested.id), "`docker rm -f` left {}", nested.id);

    let footprint = docker.footprint();
    docker.shutdown()?;
    let docker_cgroup = format!("/docker/{}", plain.id);
    check_nothing_left(&footprint, &[plain.pid, nested.pid], &[&docker_cgroup, parent])?;
    Ok(())
}

/// The capability bits named (`BPF` → bit 39), as `/proc/PID/status` prints them.
fn cap_mask(names: &[&str]) -> Result<u64> {
    const ORDER: &[&str] = &[
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ];
    names.iter().try_fold(0u64, |mask, name| {
        let bit = ORDER.iter().position(|c| c == name).with_context(|| format!("unknown capability {name}"))?;
        Ok(mask | 1 << bit)
    })
}

/// A capability line (`CapEff`, `CapBnd`, ...) of `/proc/PID/status`.
fn cap_line(pid: u32, which: &str) -> Result<u64> {
    let status =
        fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("reading /proc/{pid}/status"))?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{which}:")))
        .with_context(|| format!("/proc/{pid}/status has no {which}"))?;
    u64::from_str_radix(hex.trim(), 16).with_context(|| format!("{which} of {pid}: {hex:?}"))
}

fn sleeper(name: &str) -> ContainerSpec {
    ContainerSpec::new(name, BUSYBOX_IMAGE).command(["sleep", "600"])
}

/// Runs `cmd` in container `id`; its stdout, or an error with both streams when it fails.
fn exec_ok(cri: &Cri, id: &str, cmd: &[&str]) -> Result<String> {
    let out = cri.exec(id, cmd)?;
    ensure!(out.exit_code == 0, "`{}` exited {}: {}{}", cmd.join(" "), out.exit_code, out.stdout, out.stderr);
    Ok(out.stdout)
}

/// (c) The settings observer's DaemonSet uses, each checked where it takes effect.
fn cri_security_settings() -> Result<()> {
    require_root()?;
    let containerd = Containerd::start(&scratch_dir("cri-security"))?;
    let cri = containerd.cri()?;
    let host_dir = containerd.dir.join("host-data");
    fs::create_dir_all(&host_dir)?;
    fs::write(host_dir.join("marker"), "from the host\n")?;

    // The unprivileged DaemonSet: an exact capability set, host PID, a read-only root filesystem,
    // a host path mounted read-only.
    let mut spec = PodSpec::new("observer-unprivileged", "observer", "9c4d5e6f-7a8b-4c9d-8e0f-3a4b5c6d7e8f");
    spec.host_pid = true;
    let pod = cri.run_pod(&spec)?;
    let caps = ["BPF", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH", "NET_ADMIN"];
    let mut locked = sleeper("locked");
    locked.capabilities = Some(Capabilities::exactly(&caps));
    locked.readonly_rootfs = true;
    locked.mounts = vec![Mount { host: host_dir.clone(), container: "/host/data".into(), readonly: true }];
    let locked_id = cri.create_container(&pod, &locked)?;
    let locked_pid = cri.container_status(&locked_id)?.pid;
    let want = cap_mask(&caps)?;
    for which in ["CapEff", "CapPrm", "CapBnd"] {
        let got = cap_line(locked_pid, which)?;
        ensure!(got == want, "{which} of the exact-caps container is {got:016x}, want {want:016x} ({caps:?})");
    }
    let write = cri.exec(&locked_id, &["touch", "/probe"])?;
    ensure!(
        write.exit_code != 0 && write.stderr.contains("Read-only file system"),
        "a write to the read-only root filesystem did not fail as read-only: {write:?}"
    );
    ensure!(
        exec_ok(&cri, &locked_id, &["cat", "/host/data/marker"])? == "from the host\n",
        "the host path is not mounted"
    );
    let write = cri.exec(&locked_id, &["touch", "/host/data/new"])?;
    ensure!(
        write.exit_code != 0 && write.stderr.contains("Read-only file system"),
        "the read-only mount took a write: {write:?}"
    );
    let host_init = fs::read_to_string("/proc/1/comm")?;
    let seen_init = exec_ok(&cri, &locked_id, &["cat", "/proc/1/comm"])?;
    ensure!(
        seen_init == host_init,
        "with host PID the container's pid 1 is {seen_init:?}, the host's is {host_init:?}"
    );
    let me = std::process::id().to_string();
    // The host's processes come and go while `ls` lists them: one that exits between readdir and
    // stat makes ls say "No such file or directory" and exit 1, which is no fault of the setting.
    let listed = cri.exec(&locked_id, &["ls", "/proc"])?;
    ensure!(
        listed.exit_code == 0
            || (!listed.stderr.trim().is_empty()
                && listed.stderr.lines().all(|l| l.contains("No such file or directory"))),
        "`ls /proc` exited {}: {}",
        listed.exit_code,
        listed.stderr
    );
    ensure!(
        listed.stdout.split_whitespace().any(|p| p == me),
        "with host PID `ls /proc` does not show this test's pid {me}"
    );

    // The privileged DaemonSet: every capability this host can grant (root's bounding set here).
    let mut privileged_pod = PodSpec::new("observer-privileged", "observer", "1e6f7a8b-9c0d-4e1f-8a2b-5c6d7e8f9a0b");
    privileged_pod.host_pid = true;
    privileged_pod.privileged = true;
    let privileged_pod = cri.run_pod(&privileged_pod)?;
    let mut privileged = sleeper("privileged");
    privileged.privileged = true;
    let privileged_id = cri.create_container(&privileged_pod, &privileged)?;
    let privileged_pid = cri.container_status(&privileged_id)?.pid;
    let host_bounding = cap_line(std::process::id(), "CapBnd")?;
    let got = cap_line(privileged_pid, "CapEff")?;
    ensure!(
        got == host_bounding,
        "CapEff of the privileged container is {got:016x}, want the host's {host_bounding:016x}"
    );

    // The defaults, for contrast: a private PID namespace, a writable root filesystem, the
    // runtime's default capability set, and `run_as_user`.
    let plain_pod = cri.run_pod(&PodSpec::new("plain", "observer", "0d5e6f7a-8b9c-4d0e-9f1a-4b5c6d7e8f9a"))?;
    let mut plain = sleeper("plain");
    plain.run_as_user = Some(65534);
    let plain_id = cri.create_container(&plain_pod, &plain)?;
    ensure!(
        exec_ok(&cri, &plain_id, &["cat", "/proc/1/comm"])? == "sleep\n",
        "without host PID pid 1 is not the container's"
    );
    ensure!(exec_ok(&cri, &plain_id, &["id", "-u"])? == "65534\n", "run_as_user 65534 did not take");
    exec_ok(&cri, &plain_id, &["touch", "/tmp/probe"]).context("a writable root filesystem refused a write")?;
    let plain_caps = cap_line(cri.container_status(&plain_id)?.pid, "CapBnd")?;
    ensure!(
        plain_caps & cap_mask(&["BPF", "SYS_ADMIN"])? == 0,
        "the default capability set has BPF or SYS_ADMIN: {plain_caps:016x}"
    );

    let pods: Vec<&Pod> = vec![&pod, &privileged_pod, &plain_pod];
    let cgroups: Vec<String> = pods.iter().map(|p| p.spec.cgroup()).collect();
    let footprint = containerd.footprint();
    containerd.shutdown()?;
    let cgroups: Vec<&str> = cgroups.iter().map(String::as_str).collect();
    check_nothing_left(&footprint, &[locked_pid, privileged_pid], &cgroups)?;
    Ok(())
}

/// The generic image builder: a dynamically linked host binary (`/bin/ls`) with the libraries
/// `ldd` names, imported and run as its entrypoint (how observer's own image is made).
fn host_binary_image() -> Result<()> {
    require_root()?;
    let containerd = Containerd::start(&scratch_dir("cri-image"))?;
    let name = "localhost/observer-testkit/ls:test";
    let archive = containerd.dir.join("ls.tar");
    let written = OciImage::builder(name)
        .host_file("/bin/ls", "/bin/ls", 0o755)
        .with_shared_libraries("/bin/ls")?
        .entrypoint(["/bin/ls"])
        .cmd(["-1", "/"])
        .write(&archive)?;
    containerd.import(&archive)?;
    let listed = containerd.ctr(&["image", "ls"])?;
    ensure!(
        listed.lines().any(|l| l.starts_with(name) && l.contains(&written.manifest_digest)),
        "`ctr image ls` lacks {name} at {}: {listed}",
        written.manifest_digest
    );
    let cri = containerd.cri()?;
    let pod = cri.run_pod(&PodSpec::new("lister", "default", "2f7a8b9c-0d1e-4f2a-9b3c-6d7e8f9a0b1c"))?;
    let id = cri.create_container(&pod, &ContainerSpec::new("ls", name))?;
    ensure!(cri.wait_exit(&id, Duration::from_secs(10))? == 0, "ls exited non-zero: {}", cri.logs(&pod, "ls")?);
    let log = cri.logs(&pod, "ls")?;
    for entry in ["bin", "etc", "proc", "tmp"] {
        ensure!(log.lines().any(|l| l == entry), "`ls -1 /` in the image did not list {entry}: {log:?}");
    }
    let status = cri.container_status(&id)?;
    ensure!(status.image == name, "the container runs image {:?}, want {name}", status.image);
    containerd.shutdown()
}
