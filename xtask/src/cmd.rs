//! Running child processes: every failure names the command that failed.
use std::{
    ffi::{OsStr, OsString},
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Output},
};

use anyhow::{Context as _, Result, anyhow, bail};

/// The workspace root: the parent of this crate's directory.
pub fn workspace_root() -> Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| {
            anyhow!(
                "xtask's manifest directory {} has no parent",
                env!("CARGO_MANIFEST_DIR")
            )
        })
}

/// The cargo that runs this xtask (`$CARGO`), else `cargo` from PATH.
pub fn cargo() -> OsString {
    std::env::var_os("CARGO")
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| OsString::from("cargo"))
}

/// A cargo command run in the workspace root with `path` as its PATH.
pub fn cargo_command(root: &Path, path: &OsStr) -> Command {
    let mut cmd = Command::new(cargo());
    cmd.current_dir(root).env("PATH", path);
    cmd
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `cmd` as a shell-like line, for messages. Environment overrides other than PATH are shown.
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
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Runs `cmd` with inherited stdio and returns its status (failing only if it cannot start).
pub fn status(cmd: &mut Command) -> Result<ExitStatus> {
    cmd.status()
        .with_context(|| format!("could not start `{}`", display(cmd)))
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
    cmd.output()
        .with_context(|| format!("could not start `{}`", display(cmd)))
}

/// Runs `cmd` capturing stdout; an error (with its stderr) unless it exits with status 0.
pub fn stdout(cmd: &mut Command) -> Result<String> {
    let out = output(cmd)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            display(cmd),
            describe(out.status),
            String::from_utf8_lossy(&out.stderr).trim()
        );
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
