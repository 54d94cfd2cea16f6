//! `cargo xtask run [--release[=BOOL]] [-- ARGS...]`: build, then replace this process with
//! `observer run ARGS...` so signals (Ctrl-C, SIGTERM) reach the daemon itself.
use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::{build, cmd, setup};

#[derive(clap::Args)]
pub struct Args {
    /// Build and run the release profile (`--release=false` for the dev profile).
    #[arg(
        long,
        default_value_t = true,
        num_args = 0..=1,
        default_missing_value = "true",
        require_equals = true,
        action = clap::ArgAction::Set
    )]
    pub release: bool,
    /// Passed to `observer run` (after `--`); none: the daemon's defaults.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "ARGS")]
    pub args: Vec<String>,
}

pub fn run(args: Args) -> Result<()> {
    let ready = setup::setup()?;
    build::cargo_build(&ready, args.release)?;
    let target = target_dir(&ready)?;
    let observer = target.join(if args.release { "release" } else { "debug" }).join("observer");
    if !observer.is_file() {
        bail!("the build succeeded but {} does not exist", observer.display());
    }
    let mut daemon = Command::new(&observer);
    daemon.arg("run").args(&args.args).env("PATH", &ready.path);
    println!("observer: {}", cmd::display(&daemon));
    let err = daemon.exec();
    Err(anyhow!(err).context(format!("could not exec `{}`", cmd::display(&daemon))))
}

/// Cargo's target directory: `cargo metadata`'s `target_directory` (which honours
/// CARGO_TARGET_DIR and `build.target-dir`), else CARGO_TARGET_DIR, else `<workspace>/target`.
pub fn target_dir(ready: &setup::Ready) -> Result<PathBuf> {
    let mut metadata = cmd::cargo_command(&ready.root, &ready.path);
    metadata.args(["metadata", "--format-version", "1", "--no-deps"]);
    match cmd::stdout(&mut metadata).and_then(|json| {
        json_string_field(&json, "target_directory").context("`cargo metadata` printed no target_directory")
    }) {
        Ok(dir) => return Ok(PathBuf::from(dir)),
        Err(e) => eprintln!("observer: warning: {e:#}; guessing the target directory"),
    }
    Ok(match std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => absolute(&ready.root, Path::new(&dir)),
        None => ready.root.join("target"),
    })
}

fn absolute(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() { p.to_path_buf() } else { base.join(p) }
}

/// The value of the first `"key": "..."` string in `json` (enough for `cargo metadata`, whose
/// top-level `target_directory` precedes nothing else with that name).
fn json_string_field(json: &str, key: &str) -> Option<String> {
    let needle = format!("\"{key}\"");
    let rest = &json[json.find(&needle)? + needle.len()..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let mut chars = rest.strip_prefix('"')?.chars();
    let mut out = String::new();
    loop {
        match chars.next()? {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                '"' => out.push('"'),
                '\\' => out.push('\\'),
                '/' => out.push('/'),
                'b' => out.push('\u{8}'),
                'f' => out.push('\u{c}'),
                'n' => out.push('\n'),
                'r' => out.push('\r'),
                't' => out.push('\t'),
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    let unit = u32::from_str_radix(&hex, 16).ok()?;
                    let c = if (0xD800..0xDC00).contains(&unit) {
                        // A surrogate pair: `\uD8xx\uDCxx`.
                        if chars.next()? != '\\' || chars.next()? != 'u' {
                            return None;
                        }
                        let hex: String = chars.by_ref().take(4).collect();
                        let low = u32::from_str_radix(&hex, 16).ok()?;
                        char::from_u32(0x10000 + ((unit - 0xD800) << 10) + low.checked_sub(0xDC00)?)?
                    } else {
                        char::from_u32(unit)?
                    };
                    out.push(c);
                }
                _ => return None,
            },
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::json_string_field;

    #[test]
    fn reads_target_directory() {
        let json = r#"{"packages":[],"target_directory" : "/w/t\"a\\b\u00e9\ud83d\ude00","version":1}"#;
        assert_eq!(json_string_field(json, "target_directory").as_deref(), Some("/w/t\"a\\b\u{e9}\u{1F600}"));
        assert_eq!(json_string_field(json, "nope"), None);
    }
}
