//! The tools a user would otherwise reach for, run side by side with the daemon in the churn
//! benchmark: Debian's `bpftrace` (a counting script on observer's tracepoints) and
//! libbpf-tools' `tcplife` (one line per connection). `cargo xtask bench` installs both.
use std::{
    collections::VecDeque,
    io::{BufRead as _, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use observer_testkit::process as cmd;

/// Attached to the tracepoints observer uses, and only counting: the cheapest thing a bpftrace
/// user could write for the same hooks. `ready` comes out through the same buffer as any
/// output, which bpftrace reads only once every probe is attached.
pub const BPFTRACE_SCRIPT: &str = "\
tracepoint:sock:inet_sock_set_state,
tracepoint:tcp:tcp_receive_reset,
tracepoint:tcp:tcp_send_reset,
tracepoint:tcp:tcp_destroy_sock,
tracepoint:syscalls:sys_exit_accept4,
tracepoint:syscalls:sys_exit_accept
{ @[probe] = count(); }
BEGIN { printf(\"ready\\n\"); }";

/// Where libbpf-tools put `tcplife` (`dpkg -L libbpf-tools`).
pub fn tcplife_path() -> Result<PathBuf> {
    let files = cmd::stdout(Command::new("dpkg").args(["-L", "libbpf-tools"]))?;
    files
        .lines()
        .map(Path::new)
        .find(|p| p.file_name().is_some_and(|n| n == "tcplife") && p.is_file())
        .map(Path::to_path_buf)
        .context("libbpf-tools is installed but `dpkg -L libbpf-tools` lists no tcplife")
}

/// What a tool printed: how many lines, the first and last few.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Output {
    pub lines: u64,
    pub head: Vec<String>,
    pub tail: Vec<String>,
}

#[derive(Default)]
struct Lines {
    count: u64,
    head: Vec<String>,
    tail: VecDeque<String>,
}

const KEEP: usize = 12;

impl Lines {
    fn push(&mut self, line: String) {
        self.count += 1;
        if self.head.len() < KEEP {
            self.head.push(line);
            return;
        }
        if self.tail.len() == KEEP {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }

    fn output(&self) -> Output {
        Output { lines: self.count, head: self.head.clone(), tail: self.tail.iter().cloned().collect() }
    }
}

/// A running tool; its stdout and stderr are drained (and counted) by threads here.
pub struct Tool {
    child: Child,
    pub pid: u32,
    pub command: String,
    stdout: Arc<Mutex<Lines>>,
    stderr: Arc<Mutex<Lines>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ToolReport {
    pub stdout: Output,
    pub stderr: Output,
}

impl Tool {
    /// `bpftrace -e SCRIPT`, ready once it has printed `ready`.
    pub fn bpftrace() -> Result<Self> {
        let mut command = Command::new("bpftrace");
        command.args(["-e", BPFTRACE_SCRIPT]);
        Self::start(command, |tool| {
            tool.stdout.lock().unwrap_or_else(|e| e.into_inner()).head.iter().any(|l| l.trim() == "ready")
        })
    }

    /// `tcplife`, its output (one line per connection) read through a pipe and counted, as a
    /// pipe reader would. Through a pipe its stdout is block-buffered (the cheapest way to run
    /// it), so its header does not show when it is ready: it is ready once it holds a BPF link
    /// (libbpf attaches the tracepoint program with one).
    pub fn tcplife(path: &Path) -> Result<Self> {
        Self::start(Command::new(path), |tool| holds_bpf_link(tool.pid))
    }

    fn start(mut command: Command, ready: impl Fn(&Self) -> bool) -> Result<Self> {
        let display = cmd::display(&command);
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().with_context(|| format!("starting `{display}`"))?;
        let pid = child.id();
        let stdout = drain(child.stdout.take());
        let stderr = drain(child.stderr.take());
        let mut tool = Self { child, pid, command: display, stdout, stderr };
        let started = Instant::now();
        loop {
            if ready(&tool) {
                // Let the first wake-ups pass before anything is measured.
                thread::sleep(Duration::from_millis(300));
                return Ok(tool);
            }
            if let Some(status) = tool.child.try_wait().with_context(|| format!("waiting for `{}`", tool.command))? {
                thread::sleep(Duration::from_millis(100));
                bail!(
                    "`{}` exited ({}) before it was ready: {:?}",
                    tool.command,
                    cmd::describe(status),
                    tool.stderr_now()
                );
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("`{}` not ready after 60 s: {:?}", tool.command, tool.stderr_now());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn stderr_now(&self) -> Vec<String> {
        self.stderr.lock().unwrap_or_else(|e| e.into_inner()).output().head
    }

    /// SIGINT (both tools print their totals on it), then waits for the output to end.
    pub fn stop(mut self) -> Result<ToolReport> {
        cmd::kill(self.pid, cmd::Signal::INT).with_context(|| format!("signalling `{}`", self.command))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("`{}` did not exit within 30 s of SIGINT", self.command);
            }
            thread::sleep(Duration::from_millis(20));
        }
        // The drain threads finish at EOF, just after the exit.
        thread::sleep(Duration::from_millis(200));
        let out = self.stdout.lock().unwrap_or_else(|e| e.into_inner()).output();
        let err = self.stderr.lock().unwrap_or_else(|e| e.into_inner()).output();
        Ok(ToolReport { stdout: out, stderr: err })
    }
}

impl Drop for Tool {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = cmd::kill(self.pid, cmd::Signal::INT);
            let _ = self.child.wait();
        }
    }
}

/// Whether process `pid` has a BPF link open (`/proc/PID/fd/N -> anon_inode:bpf_link`).
fn holds_bpf_link(pid: u32) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(std::result::Result::ok)
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .any(|target| target.as_os_str() == "anon_inode:bpf_link")
}

fn drain(stream: Option<impl Read + Send + 'static>) -> Arc<Mutex<Lines>> {
    let lines = Arc::new(Mutex::new(Lines::default()));
    if let Some(stream) = stream {
        let lines = lines.clone();
        thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(std::result::Result::ok) {
                lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
    }
    lines
}
