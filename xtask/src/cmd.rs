//! Running child processes: every failure names the command that failed (the helpers are the
//! test kit's, shared with the benchmarks).
use std::{
    ffi::{OsStr, OsString},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Result, anyhow};

/// The workspace root: the parent of this crate's directory.
pub fn workspace_root() -> Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| anyhow!("xtask's manifest directory {} has no parent", env!("CARGO_MANIFEST_DIR")))
}

/// The cargo that runs this xtask (`$CARGO`), else `cargo` from PATH.
pub fn cargo() -> OsString {
    std::env::var_os("CARGO").filter(|c| !c.is_empty()).unwrap_or_else(|| OsString::from("cargo"))
}

/// A cargo command run in the workspace root with `path` as its PATH.
pub fn cargo_command(root: &Path, path: &OsStr) -> Command {
    let mut cmd = Command::new(cargo());
    cmd.current_dir(root).env("PATH", path);
    cmd
}

pub use observer_testkit::process::{describe, display, exit_code, is_root, output, run, status, stdout};
