//! Configuration from flags, environment and a TOML file (flag > env > file > default), the
//! errors of each, the JSON log, and the generated completions and man page.

use std::{path::PathBuf, process::Command};

use libtest_mimic::Failed;
use observer_testkit::{Daemon, daemon::Options, process::Signal};

use crate::{
    shared_daemon,
    support::{OBSERVER, PATIENCE},
};

/// A file of this test's own, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, text: &str) -> Result<Self, Failed> {
        let path = std::env::temp_dir().join(format!("observer-e2e-{}-{name}", std::process::id()));
        std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
        Ok(Self(path))
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap_or_default()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn status_json(daemon: &Daemon) -> Result<serde_json::Value, Failed> {
    let (_, body) = daemon.get("/api/v1/status")?;
    serde_json::from_str(&body).map_err(|e| format!("status JSON: {e}: {body}").into())
}

/// A file sets several options; the environment overrides the file, a flag the environment;
/// the status says where each value came from, and the values take effect.
pub fn file_env_and_flags_in_that_order() -> Result<(), Failed> {
    let file = TempFile::new(
        "precedence.toml",
        "# observer run options\nmax_peers = 7\nmax_series = 500\ncri_timeout = \"3s\"\n\
         expire_gone_after = \"90s\"\nprobe_stats = true\n",
    )?;
    let daemon = Daemon::start_with_env(
        std::path::Path::new(OBSERVER),
        &["--cri-timeout", "5s"],
        &[("OBSERVER_CONFIG", file.path()), ("OBSERVER_MAX_SERIES", "600"), ("OBSERVER_CRI_TIMEOUT", "4s")],
        &Options { ready_within: PATIENCE, http_timeout: PATIENCE, ..Options::default() },
    )?;
    let status = status_json(&daemon)?;
    let config = &status["config"];
    let want = [
        ("max_peers", "7", "file"),
        ("expire_gone_after", "90s", "file"),
        ("probe_stats", "true", "file"),
        ("max_series", "600", "env"),
        ("cri_timeout", "5s", "flag"),
        ("listen", "127.0.0.1:0", "flag"),
        ("config", file.path(), "env"),
        ("ring_buffer_size", "4194304", "default"),
        ("log_format", "text", "default"),
    ];
    for (key, value, source) in want {
        let got = &config[key];
        if got["value"] != value || got["source"] != source {
            return Err(format!("config.{key}: got {got}, want {value} from {source}: {config}").into());
        }
    }
    if config.get("netns").is_none_or(|n| n.get("value").is_some() || n["source"] != "default") {
        return Err(format!("config.netns should be unset, by default: {config}").into());
    }
    // probe_stats from the file took effect: the kernel counts the programs' runs.
    let probes = status["probes"].as_array().ok_or("probes is not a list")?;
    if !probes.iter().any(|p| p["runs"].is_u64()) {
        return Err(format!("probe_stats = true in the file, yet no probe counts its runs: {status}").into());
    }
    let out = Command::new(OBSERVER)
        .args(["status", "--endpoint", &daemon.endpoint()])
        .output()
        .map_err(|e| format!("running observer status: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = |source: &str| text.lines().find(|l| l.trim_start().starts_with(source)).unwrap_or_default();
    if !text.contains(&format!("CONFIG (file {}, from env)", file.path()))
        || !line("file").contains("max_peers=7")
        || !line("env").contains("max_series=600")
        || !line("flag").contains("cri_timeout=5s")
    {
        return Err(format!("observer status does not show the configuration's sources:\n{text}").into());
    }
    Ok(())
}

/// `observer run ARGS` with `env`, which must fail before starting: (exit code, stderr).
fn refused(args: &[&str], env: &[(&str, &str)]) -> Result<(i32, String), Failed> {
    let out = Command::new(OBSERVER)
        .arg("run")
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .envs(env.iter().copied())
        .output()
        .map_err(|e| format!("running observer run: {e}"))?;
    Ok((out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned()))
}

/// Each bad file (unknown key, wrong type, out of range, not TOML, unreadable) and each bad
/// environment variable fails with one line naming the field, the value and what is allowed; a
/// bad flag is clap's error naming the flag.
pub fn bad_configuration_fails_with_one_line_naming_field_and_value() -> Result<(), Failed> {
    let files = [
        ("unknown.toml", "max_peers = 5\nmax_peer = 5\n", vec!["unknown key `max_peer`", "valid keys: ", "max_peers"]),
        ("type.toml", "max_series = \"lots\"\n", vec!["max_series = \"lots\"", "must be a whole number at least 100"]),
        ("range.toml", "max_peers = 0\n", vec!["max_peers = 0: must be at least 1"]),
        ("enum.toml", "probes = \"ebpf\"\n", vec!["probes = \"ebpf\"", "must be one of auto, btf, tracepoint, kprobe"]),
        ("list.toml", "listen = [\"a\"]\n", vec!["listen = [\"a\"]", "must be one value"]),
        ("syntax.toml", "max_peers 5\n", vec!["line 1: "]),
    ];
    for (name, text, wants) in files {
        let file = TempFile::new(name, text)?;
        let (code, err) = refused(&["--config", file.path()], &[])?;
        let prefix = format!("observer: error: --config {}: ", file.path());
        if code != 1 || err.lines().count() != 1 || !err.starts_with(&prefix) || wants.iter().any(|w| !err.contains(w))
        {
            return Err(format!("{name} ({text:?}): exit {code}, stderr: {err}").into());
        }
    }
    let missing = std::env::temp_dir().join("observer-e2e-no-such-dir/observer.toml");
    let missing = missing.to_str().unwrap_or_default();
    let (code, err) = refused(&["--config", missing], &[])?;
    if code != 1 || err.lines().count() != 1 || !err.contains(missing) || !err.contains("cannot read it") {
        return Err(format!("unreadable file: exit {code}, stderr: {err}").into());
    }
    let (code, err) = refused(&[], &[("OBSERVER_MAX_PEERS", "0")])?;
    if code != 1 || err.trim() != "observer: error: OBSERVER_MAX_PEERS=0: must be at least 1" {
        return Err(format!("bad environment variable: exit {code}, stderr: {err}").into());
    }
    let (code, err) = refused(&[], &[("OBSERVER_CRI_TIMEOUT", "soon")])?;
    if code != 1 || !err.contains("OBSERVER_CRI_TIMEOUT=soon: must be a duration") {
        return Err(format!("bad environment duration: exit {code}, stderr: {err}").into());
    }
    // The flag wins over a bad environment variable: it is never read (the file is still bad).
    let file = TempFile::new("flag-wins.toml", "max_peers = 0\n")?;
    let (code, err) = refused(&["--max-peers", "5", "--config", file.path()], &[("OBSERVER_MAX_PEERS", "0")])?;
    if code != 1 || err.contains("OBSERVER_MAX_PEERS") || !err.contains("max_peers = 0: must be at least 1") {
        return Err(format!("flag over a bad env, bad file: exit {code}, stderr: {err}").into());
    }
    let (code, err) = refused(&["--max-peers", "0"], &[])?;
    if code != 2 || !err.contains("'0'") || !err.contains("--max-peers") || !err.contains("must be at least 1") {
        return Err(format!("bad flag: exit {code}, stderr: {err}").into());
    }
    Ok(())
}

/// `--log-format json`: every line the daemon writes on stderr, from the first to its goodbye,
/// is a JSON object with level, target and fields (the message and the event's own fields);
/// the test kit still finds the address and the ready line. The text format stays text.
pub fn log_format_json_lines_parse() -> Result<(), Failed> {
    let mut daemon = Daemon::start_with_env(
        std::path::Path::new(OBSERVER),
        &["--log-format", "json"],
        &[],
        &Options { ready_within: PATIENCE, http_timeout: PATIENCE, ..Options::default() },
    )?;
    if daemon.ready_logged.is_none() {
        return Err(format!("the ready line was not found in the JSON log:\n{}", daemon.log().join("\n")).into());
    }
    daemon.signal(Signal::TERM)?;
    let exit = daemon.wait_exit(PATIENCE)?;
    std::thread::sleep(std::time::Duration::from_millis(100));
    let log = daemon.log();
    if !exit.success() || log.is_empty() {
        return Err(format!("exit {exit}; log:\n{}", log.join("\n")).into());
    }
    let mut serving = false;
    for line in &log {
        let json: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("stderr line is not JSON ({e}): {line}"))?;
        if !json["level"].is_string() || !json["target"].is_string() || !json["fields"]["message"].is_string() {
            return Err(format!("JSON log line lacks level, target or fields.message: {line}").into());
        }
        serving |= json["fields"]["listen"] == daemon.addr.to_string() && json["target"] == "observer::daemon";
    }
    if !serving || !log.iter().any(|l| l.contains("probes detached, exiting")) {
        return Err(format!(
            "the JSON log lacks the serving line (with its listen field) or the goodbye:\n{}",
            log.join("\n")
        )
        .into());
    }
    let text = shared_daemon()?;
    let log = text.log();
    if text.ready_logged.is_none()
        || log.iter().any(|l| l.starts_with('{'))
        || !log.iter().any(|l| l.contains(" INFO observer::daemon: serving "))
    {
        return Err(format!("the text log is not the text format:\n{}", log.join("\n")).into());
    }
    Ok(())
}
