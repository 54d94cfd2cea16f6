//! What a runtime leaves on the host, found and removed by what identifies *this* instance (its
//! directory in command lines, its pids, mount points under its directory), never by a broad
//! name: other runtimes, the system's or another test's, may run beside it.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{Read as _, Seek as _, SeekFrom},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::process::{self, Signal};

/// A process as `/proc` shows it; `start` (clock ticks after boot) tells a pid's reuse apart.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Proc {
    pub pid: u32,
    pub ppid: u32,
    pub start: u64,
    pub cmdline: String,
}

impl Proc {
    /// `/proc/PID` as it is now, `None` when the pid is gone (or is a zombie: it runs nothing).
    pub fn read(pid: u32) -> Option<Self> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // `pid (comm) state ppid ...`: comm may hold spaces and parentheses, so split after the last `)`.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.first() == Some(&"Z") {
            return None;
        }
        let ppid = fields.get(1)?.parse().ok()?;
        let start = fields.get(19)?.parse().ok()?;
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ").trim_end().to_string();
        Some(Self { pid, ppid, start, cmdline })
    }

    /// Whether this very process (same pid, same start time) still runs.
    pub fn alive(&self) -> bool {
        Self::read(self.pid).is_some_and(|now| now.start == self.start)
    }
}

/// Every process on the host.
pub fn processes() -> Vec<Proc> {
    let Ok(dir) = fs::read_dir("/proc") else { return Vec::new() };
    let mut all: Vec<Proc> =
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).filter_map(Proc::read).collect();
    all.sort();
    all
}

/// The processes whose command line mentions `needle` (a directory of one instance), with all
/// their descendants (a shim's containers mention nothing of it).
pub fn processes_of(needle: &str, also: &[u32]) -> Vec<Proc> {
    let all = processes();
    let mut roots: BTreeSet<u32> = all.iter().filter(|p| p.cmdline.contains(needle)).map(|p| p.pid).collect();
    roots.extend(also.iter().copied().filter(|pid| *pid != 0));
    let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for p in &all {
        children.entry(p.ppid).or_default().push(p.pid);
    }
    let mut seen = BTreeSet::new();
    let mut todo: Vec<u32> = roots.into_iter().collect();
    while let Some(pid) = todo.pop() {
        if seen.insert(pid) {
            todo.extend(children.get(&pid).into_iter().flatten().copied());
        }
    }
    all.into_iter().filter(|p| seen.contains(&p.pid)).collect()
}

/// The end of an instance's teardown, common to containerd and dockerd: kills what is left of
/// `procs`, waits for them to be gone, removes `dir`, and reports every problem met, those of the
/// earlier steps (`problems`) included.
pub fn finish_teardown(what: &str, procs: &[Proc], dir: &Path, mut problems: Vec<String>) -> Result<()> {
    kill_all(procs);
    wait_gone(procs, Duration::from_secs(10));
    if let Err(e) = remove_dir(dir) {
        problems.push(format!("{e:#}"));
    }
    if problems.is_empty() { Ok(()) } else { bail!("stopping {what} in {}: {}", dir.display(), problems.join("; ")) }
}

/// SIGKILLs `procs` (those still alive), children first.
pub fn kill_all(procs: &[Proc]) {
    for p in procs.iter().rev() {
        if p.alive() {
            let _ = process::kill(p.pid, Signal::KILL);
        }
    }
}

/// Waits up to `within` until none of `procs` is in `/proc` any more, not even as a zombie. A
/// shim outlives containerd by design and is reparented to PID 1, which reaps it when it
/// exits; on hosts whose PID 1 reaps lazily, `pgrep` would still list it for a moment. Returns
/// whether they all went.
pub fn wait_gone(procs: &[Proc], within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        let gone = still_there(procs).is_empty();
        if gone || Instant::now() > deadline {
            return gone;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Those of `procs` still in `/proc`, running or as zombies (a new process with the same pid is
/// not one of them).
pub fn still_there(procs: &[Proc]) -> Vec<Proc> {
    let start = |pid: u32| -> Option<u64> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit(')').next()?.split_whitespace().nth(19)?.parse().ok()
    };
    procs.iter().filter(|p| start(p.pid) == Some(p.start)).cloned().collect()
}

/// Mount points at or under `dir`, deepest first (`/proc/self/mountinfo`: runtimes mount in this
/// mount namespace, since neither containerd nor dockerd unshares one).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else { return Vec::new() };
    let dir = dir.to_string_lossy();
    let dir = dir.trim_end_matches('/');
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|m| m == dir || m.starts_with(&format!("{dir}/")))
        .map(PathBuf::from)
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    found.dedup();
    found
}

/// mountinfo writes space, tab, newline and backslash as `\040`-style octal escapes.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let n = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(n);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where the cgroup hierarchies are mounted (cgroup v1 controllers and cgroup2).
pub fn cgroup_mounts() -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else { return Vec::new() };
    info.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split(' ').next()?;
            let mount_point = left.split(' ').nth(4)?;
            (fstype == "cgroup" || fstype == "cgroup2").then(|| PathBuf::from(unescape_mountinfo(mount_point)))
        })
        .collect()
}

/// Removes the cgroup `path` (`/kubepods/burstable/podX`) and then its parents, in every
/// hierarchy, as far as they are empty: `rmdir` refuses a cgroup that has processes or children,
/// so what another instance still uses stays.
pub fn remove_cgroup(path: &str) {
    for mount in cgroup_mounts() {
        let mut dir = Some(Path::new(path.trim_start_matches('/')));
        while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty()) {
            if fs::remove_dir(mount.join(d)).is_err() {
                break;
            }
            dir = d.parent();
        }
    }
}

/// Unmounts everything at or under `dir` (lazily: a mount still busy goes when its last user
/// does); an error naming the mounts still there after that.
pub fn unmount_under(dir: &Path) -> Result<()> {
    for _ in 0..3 {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            return Ok(());
        }
        for m in mounts {
            let _ = rustix::mount::unmount(&m, rustix::mount::UnmountFlags::DETACH);
        }
    }
    let left = mounts_under(dir);
    if left.is_empty() { Ok(()) } else { bail!("could not unmount {left:?}; unmount them by hand (umount -l PATH)") }
}

/// Removes `dir` after unmounting what is under it. A read-only or busy leftover is named.
pub fn remove_dir(dir: &Path) -> Result<()> {
    unmount_under(dir)?;
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}

/// Creates `dir` empty: removes what an earlier run left there (unmounting it first).
pub fn fresh_dir(dir: &Path) -> Result<()> {
    remove_dir(dir)?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

/// The last `lines` lines of the file at `path` (at most its last 64 KiB), for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = fs::File::open(path) else { return format!("({} cannot be read)", path.display()) };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut text = String::new();
    let mut bytes = Vec::new();
    if file.read_to_end(&mut bytes).is_ok() {
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    let all: Vec<&str> = text.lines().collect();
    let tail = all[all.len().saturating_sub(lines)..].join("\n");
    if tail.is_empty() { "(nothing)".to_string() } else { tail }
}

/// Where `program` is on PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths).map(|dir| dir.join(program)).find(|p| p.is_file())
}

/// Fails, naming the Debian package to install, when `program` is not on PATH.
pub fn require(program: &str, package: &str) -> Result<()> {
    match which(program) {
        Some(_) => Ok(()),
        None => bail!("{program} not installed (not on PATH): apt-get install {package}"),
    }
}

/// Fails when a Unix socket path would exceed what `sun_path` holds (108 bytes with its NUL).
pub fn check_socket_path(path: &Path) -> Result<()> {
    let len = path.as_os_str().len();
    if len >= 100 {
        bail!(
            "socket path {} is {len} bytes, too long for a Unix socket: use a shorter test directory",
            path.display()
        );
    }
    Ok(())
}

/// Starts `cmd` with stdin closed and stdout and stderr appended to `log`.
pub fn spawn_logged(cmd: &mut Command, log: &Path) -> Result<Child> {
    let file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = file.try_clone().with_context(|| format!("opening {}", log.display()))?;
    cmd.stdin(Stdio::null()).stdout(file).stderr(err);
    cmd.spawn().with_context(|| format!("could not start `{}`", process::display(cmd)))
}

/// Waits up to `within` until `socket` accepts connections; fails early if `child` exits. `what`
/// names the daemon and the end of `log` is quoted in the error.
pub fn wait_for_socket(child: &mut Child, what: &str, socket: &Path, log: &Path, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait().with_context(|| format!("waiting for {what}"))? {
            bail!(
                "{what} exited ({}) before it was ready; its log ({}) ends with:\n{}",
                process::describe(status),
                log.display(),
                tail(log, 30)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{what} was not ready within {} s; its log ({}) ends with:\n{}",
                within.as_secs(),
                log.display(),
                tail(log, 30)
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM, up to `grace` to exit, then SIGKILL; reaps the child.
pub fn stop_child(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let _ = process::kill(child.id(), Signal::TERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// What an instance leaves behind, checked after it stopped: [`Footprint::leftovers`] is empty
/// when nothing of it runs, nothing is mounted under its directory and the directory is gone.
#[derive(Debug, Clone)]
pub struct Footprint {
    /// The instance's directory.
    pub dir: PathBuf,
    /// Its processes when the footprint was taken (daemon, shims, containers).
    pub processes: Vec<Proc>,
}

impl Footprint {
    /// The processes mentioning `dir` and their descendants, plus `also` (pids with theirs).
    pub fn take(dir: &Path, also: &[u32]) -> Self {
        Self { dir: dir.to_path_buf(), processes: processes_of(&dir.to_string_lossy(), also) }
    }

    /// What is still there, one line each: processes of the instance that are alive (those seen
    /// before and any new one naming its directory), mounts under the directory, the directory.
    pub fn leftovers(&self) -> Vec<String> {
        let mut left: BTreeSet<String> = BTreeSet::new();
        for p in self.processes.iter().filter(|p| p.alive()) {
            left.insert(format!("process {} still runs: {}", p.pid, p.cmdline));
        }
        for p in processes_of(&self.dir.to_string_lossy(), &[]) {
            left.insert(format!("process {} still runs: {}", p.pid, p.cmdline));
        }
        for m in mounts_under(&self.dir) {
            left.insert(format!("{} is still mounted", m.display()));
        }
        if self.dir.exists() {
            left.insert(format!("{} still exists", self.dir.display()));
        }
        left.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(super::unescape_mountinfo(r"/a\040b\134c"), r"/a b\c");
        assert_eq!(super::unescape_mountinfo(r"/plain\04"), r"/plain\04");
    }

    #[test]
    fn this_process_is_found_and_alive() {
        let me = super::Proc::read(std::process::id()).unwrap();
        assert!(me.alive());
        assert_eq!(me.ppid, std::os::unix::process::parent_id());
    }
}
