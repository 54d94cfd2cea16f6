//! A dockerd of the test's own, in one directory: `--data-root`, `--exec-root`, `--pidfile`, its
//! socket, `--config-file` (so `/etc/docker/daemon.json` is not read), its trust key, the CLI's
//! config, and the containerd behind it.
//!
//! dockerd is pointed at a [`Containerd`] started for it (without the CRI plugin) rather than
//! left to manage its own: dockerd 20.10 uses `/run/containerd/containerd.sock` whenever that
//! socket exists, so a system containerd (or another test's in the default place) would be
//! silently shared; with `--containerd` it never is, and the shims and mounts it leaves are found
//! and removed by [`Containerd`]'s own teardown. Networking is off (`--bridge=none`,
//! `--iptables=false`, `--ip6tables=false`): containers get the host network (`--network
//! host`), and no bridge or firewall rule is made.
//!
//! It is driven with the docker CLI (`docker -H unix://DIR/docker.sock`) rather than a client
//! crate such as bollard: no HTTP client stack to compile, failures come as the CLI's own text,
//! and every call is a command a person can rerun by hand. The CLI used is Debian's
//! `/usr/bin/docker` (docker.io, the same version as dockerd) when present: another `docker` on
//! PATH may be much newer than the daemon.
use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::Mutex,
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};

use super::{
    containerd::{self, Containerd},
    host::{self, Footprint},
};
use crate::process;

/// The namespace dockerd keeps its containers in, in its containerd.
pub const DOCKER_NAMESPACE: &str = "moby";

/// The CLI of Debian's docker.io.
const DEBIAN_DOCKER_CLI: &str = "/usr/bin/docker";

/// A container to run (`docker run -d --network host ...`).
#[derive(Debug, Clone, Default)]
pub struct RunSpec {
    pub image: String,
    /// `--name` (Docker picks one when empty).
    pub name: String,
    pub labels: Vec<(String, String)>,
    /// The command after the image (the image's `Cmd` when empty).
    pub cmd: Vec<String>,
    /// `--cgroup-parent` (Docker's default is `/docker`).
    pub cgroup_parent: Option<String>,
    /// More `docker run` options, before the image (`--privileged`, `--cap-add=BPF`, ...).
    pub extra: Vec<String>,
}

/// A running container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningContainer {
    /// The full id (64 hex digits).
    pub id: String,
    /// Its init process on the host.
    pub pid: u32,
}

/// A running dockerd of the test's own.
pub struct Dockerd {
    child: Option<Child>,
    containerd: Option<Containerd>,
    /// Its directory.
    pub dir: PathBuf,
    /// Its API socket.
    pub socket: PathBuf,
    /// Its log.
    pub log: PathBuf,
    cli: PathBuf,
    /// The cgroup parents containers were put under (`/docker` and each `--cgroup-parent`),
    /// removed at teardown as far as they are empty.
    cgroup_parents: Mutex<BTreeSet<String>>,
    /// The busybox image, loaded (`localhost/observer-testkit/busybox:latest`).
    pub busybox: String,
}

impl Dockerd {
    /// Starts containerd and dockerd in `dir` (created empty), waits for the API, and loads the
    /// busybox image.
    pub fn start(dir: &Path) -> Result<Self> {
        host::require("dockerd", "docker.io")?;
        let cli = if Path::new(DEBIAN_DOCKER_CLI).is_file() {
            PathBuf::from(DEBIAN_DOCKER_CLI)
        } else {
            host::which("docker")
                .ok_or_else(|| anyhow!("the docker CLI is not installed: apt-get install docker.io"))?
        };
        let dir = std::path::absolute(dir).with_context(|| format!("resolving {}", dir.display()))?;
        host::fresh_dir(&dir)?;
        let socket = dir.join("docker.sock");
        host::check_socket_path(&socket)?;
        let containerd = Containerd::start_with(
            &dir.join("containerd"),
            &containerd::Options { cri: false, namespace: DOCKER_NAMESPACE.into(), ..Default::default() },
        )?;
        let config = dir.join("daemon.json");
        // dockerd 20.10 still makes a libtrust key, at /etc/docker/key.json unless told (there is
        // no flag for it, only this key).
        let settings = serde_json::json!({ "deprecated-key-path": dir.join("key.json") });
        fs::write(&config, settings.to_string()).with_context(|| format!("writing {}", config.display()))?;
        let log = dir.join("dockerd.log");
        let mut cmd = Command::new("dockerd");
        cmd.arg("--config-file")
            .arg(&config)
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .arg("--containerd")
            .arg(&containerd.socket)
            .args(["--containerd-namespace", DOCKER_NAMESPACE, "--containerd-plugins-namespace", "plugins.moby"])
            .args(["--bridge=none", "--iptables=false", "--ip6tables=false", "--userland-proxy=false"])
            .args(["--storage-driver", "overlay2", "--exec-opt", "native.cgroupdriver=cgroupfs"])
            .args(["--log-level", "info", "--shutdown-timeout", "5"]);
        let child = host::spawn_logged(&mut cmd, &log)?;
        let busybox = containerd.busybox.clone();
        let mut this = Self {
            child: Some(child),
            containerd: Some(containerd),
            dir,
            socket,
            log,
            cli,
            cgroup_parents: Mutex::new(BTreeSet::from(["/docker".to_string()])),
            busybox: busybox.name.clone(),
        };
        if let Some(child) = this.child.as_mut() {
            host::wait_for_socket(child, "dockerd", &this.socket, &this.log, Duration::from_secs(30))?;
        }
        // The socket accepts before the API serves: ask until the daemon answers.
        let mut last = None;
        for _ in 0..100 {
            match this.docker(&["version", "--format", "{{.Server.Version}}"]) {
                Ok(_) => {
                    last = None;
                    break;
                }
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Some(e) = last {
            bail!(
                "dockerd opened its socket but does not answer: {e:#}; its log ends with:\n{}",
                host::tail(&this.log, 30)
            );
        }
        this.load(&busybox.path)?;
        Ok(this)
    }

    /// dockerd's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The containerd behind this dockerd.
    pub fn containerd(&self) -> Option<&Containerd> {
        self.containerd.as_ref()
    }

    /// Runs `docker -H unix://SOCKET ARGS...` and returns its stdout.
    pub fn docker(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(&self.cli);
        cmd.env("DOCKER_CONFIG", self.dir.join("cli"))
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args);
        process::stdout(&mut cmd)
    }

    /// `docker load -i ARCHIVE`; returns the image names it loaded.
    pub fn load(&self, archive: &Path) -> Result<Vec<String>> {
        let out = self.docker(&["load", "-i", &archive.to_string_lossy()])?;
        let names: Vec<String> =
            out.lines().filter_map(|l| l.strip_prefix("Loaded image: ")).map(|n| n.trim().to_string()).collect();
        if names.is_empty() {
            bail!("`docker load -i {}` loaded no named image: {out}", archive.display());
        }
        Ok(names)
    }

    /// `docker run -d --network host [--name] [--label]... [--cgroup-parent] EXTRA... IMAGE CMD...`;
    /// returns the id and the host pid of its init process.
    pub fn run(&self, spec: &RunSpec) -> Result<RunningContainer> {
        let mut args: Vec<String> = vec!["run".into(), "-d".into(), "--network".into(), "host".into()];
        if !spec.name.is_empty() {
            args.extend(["--name".into(), spec.name.clone()]);
        }
        for (k, v) in &spec.labels {
            args.extend(["--label".into(), format!("{k}={v}")]);
        }
        if let Some(parent) = &spec.cgroup_parent {
            args.extend(["--cgroup-parent".into(), parent.clone()]);
            self.cgroup_parents.lock().unwrap_or_else(|e| e.into_inner()).insert(parent.clone());
        }
        args.extend(spec.extra.iter().cloned());
        args.push(spec.image.clone());
        args.extend(spec.cmd.iter().cloned());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let id = self.docker(&argv)?.trim().to_string();
        let pid = self.docker(&["inspect", "--format", "{{.State.Pid}}", &id])?;
        let pid = pid.trim().parse().with_context(|| format!("`docker inspect` gave the pid {pid:?} for {id}"))?;
        if pid == 0 {
            bail!("container {id} is not running; `docker logs`: {}", self.docker(&["logs", &id]).unwrap_or_default());
        }
        Ok(RunningContainer { id, pid })
    }

    /// `docker inspect ID`, parsed.
    pub fn inspect(&self, id: &str) -> Result<serde_json::Value> {
        let out = self.docker(&["inspect", id])?;
        let mut all: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("parsing `docker inspect {id}`"))?;
        Ok(all[0].take())
    }

    /// `docker logs ID` (stdout; stderr goes to the CLI's stderr and is dropped).
    pub fn logs(&self, id: &str) -> Result<String> {
        self.docker(&["logs", id])
    }

    /// `docker rm -f ID`.
    pub fn rm_f(&self, id: &str) -> Result<()> {
        self.docker(&["rm", "-f", id]).map(drop)
    }

    /// The ids of all containers (`docker ps -aq --no-trunc`).
    pub fn containers(&self) -> Result<Vec<String>> {
        Ok(self.docker(&["ps", "-aq", "--no-trunc"])?.lines().map(str::to_string).collect())
    }

    /// What this instance has on the host now (dockerd, its containerd, shims, containers).
    pub fn footprint(&self) -> Footprint {
        let containerd = self.containerd.as_ref().map_or(0, Containerd::pid);
        Footprint::take(&self.dir, &[self.pid(), containerd])
    }

    /// The last `lines` lines of dockerd's log.
    pub fn log_tail(&self, lines: usize) -> String {
        host::tail(&self.log, lines)
    }

    /// Stops everything (containers, dockerd, its containerd) and removes the directory; an
    /// error says what could not be removed (dropping does the same and prints that error).
    pub fn shutdown(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        let mut problems = Vec::new();
        // The shims and containers, seen while they run (see `Containerd`'s teardown).
        let containerd = self.containerd.as_ref().map_or(0, Containerd::pid);
        let procs: Vec<_> = host::processes_of(&self.dir.to_string_lossy(), &[])
            .into_iter()
            .filter(|p| p.pid != child.id() && p.pid != containerd)
            .collect();
        if child.try_wait().ok().flatten().is_none() {
            match self.containers() {
                Ok(ids) => {
                    for id in ids {
                        if let Err(e) = self.rm_f(&id) {
                            problems.push(format!("docker rm -f {id}: {e:#}"));
                        }
                    }
                }
                Err(e) => problems.push(format!("listing the containers: {e:#}")),
            }
        }
        host::stop_child(&mut child, Duration::from_secs(20));
        for parent in self.cgroup_parents.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            host::remove_cgroup(parent);
        }
        if let Some(containerd) = self.containerd.take()
            && let Err(e) = containerd.shutdown()
        {
            problems.push(format!("{e:#}"));
        }
        host::finish_teardown("dockerd", &procs, &self.dir, problems)
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("{e:#}");
        }
    }
}
