//! Processes: naming this one, signalling others, and running commands whose failures name the
//! command (shared with `cargo xtask`).
use std::{
    ffi::{CString, OsStr},
    io,
    os::unix::process::ExitStatusExt as _,
    process::{Command, ExitStatus, Output},
};

use anyhow::{Context as _, Result, bail};
pub use rustix::process::Signal;

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Sends `signal` to process `pid`.
pub fn kill(pid: u32, signal: Signal) -> io::Result<()> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| io::Error::other(format!("no such pid {pid}")))?;
    Ok(rustix::process::kill_process(pid, signal)?)
}

/// Sets this thread's command name (`prctl(PR_SET_NAME)`; the kernel keeps 15 bytes). For a
/// single-threaded process that is the process's `comm`, which the daemon's labels show.
pub fn set_comm(name: &str) -> io::Result<()> {
    let name = CString::new(name).map_err(|_| io::Error::other(format!("process name {name:?} contains NUL")))?;
    Ok(rustix::thread::set_name(&name)?)
}

/// Asks the kernel to SIGKILL this process when its parent dies (`PR_SET_PDEATHSIG`).
pub fn die_with_parent() -> io::Result<()> {
    Ok(rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?)
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn note_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// From now on SIGINT and SIGTERM do not end this process but are noted, for
/// [`interrupted`]: a long-running task (`cargo xtask incident`) can then stop what it started
/// (a network namespace outlives a killed process). Children get the default dispositions back
/// when they exec.
pub fn catch_interrupts() -> io::Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe; the
        // sigaction struct is zeroed (an empty mask, no flags) before the handler is set.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = note_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether SIGINT or SIGTERM came since [`catch_interrupts`].
pub fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
}

/// `cmd` as a shell-like line, for messages and reports. Environment overrides other than PATH
/// are shown.
pub fn display(cmd: &Command) -> String {
    let mut words = Vec::new();
    for (k, v) in cmd.get_envs() {
        if k == "PATH" {
            continue;
        }
        if let Some(v) = v {
            words.push(format!("{}={}", k.to_string_lossy(), quote(v)));
        }
    }
    words.push(quote(cmd.get_program()));
    words.extend(cmd.get_args().map(quote));
    words.join(" ")
}

fn quote(word: &OsStr) -> String {
    let s = word.to_string_lossy();
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c)) {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Runs `cmd` with inherited stdio and returns its status (failing only if it cannot start).
pub fn status(cmd: &mut Command) -> Result<ExitStatus> {
    cmd.status().with_context(|| format!("could not start `{}`", display(cmd)))
}

/// Runs `cmd` with inherited stdio; an error unless it exits with status 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = status(cmd)?;
    if !status.success() {
        bail!("`{}` failed ({})", display(cmd), describe(status));
    }
    Ok(())
}

/// Runs `cmd` capturing its output; fails only if it cannot start.
pub fn output(cmd: &mut Command) -> Result<Output> {
    cmd.output().with_context(|| format!("could not start `{}`", display(cmd)))
}

/// Runs `cmd` capturing stdout; an error (with its stderr) unless it exits with status 0.
pub fn stdout(cmd: &mut Command) -> Result<String> {
    let out = output(cmd)?;
    if !out.status.success() {
        bail!("`{}` failed ({}): {}", display(cmd), describe(out.status), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => status.to_string(),
    }
}

/// The exit code a shell would report for `status`.
pub fn exit_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        (None, None) => 1,
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    #[test]
    fn display_quotes_what_a_shell_would_split() {
        let mut cmd = Command::new("bpftrace");
        cmd.args(["-e", "BEGIN { printf(\"it's\\n\"); }"]).env("RUST_LOG", "info");
        assert_eq!(super::display(&cmd), r#"RUST_LOG=info bpftrace -e 'BEGIN { printf("it'\''s\n"); }'"#);
    }

    #[test]
    fn statuses_are_described() {
        let status = Command::new("sh").args(["-c", "exit 3"]).status().unwrap();
        assert_eq!(super::describe(status), "exit status 3");
        assert_eq!(super::exit_code(status), 3);
    }

    #[test]
    fn stdout_names_the_failing_command() {
        let err = super::stdout(Command::new("sh").args(["-c", "echo oops >&2; exit 1"])).unwrap_err();
        assert_eq!(err.to_string(), "`sh -c 'echo oops >&2; exit 1'` failed (exit status 1): oops");
    }
}
