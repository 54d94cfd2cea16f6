//! The daemon as an operator meets it: its status API and command, its flags and their errors,
//! and how it leaves the kernel when it stops (no program, no link).

use std::{path::Path, process::Command, time::Duration};

use libtest_mimic::Failed;
use observer_testkit::{Metrics, kernel_version, process::Signal};

use crate::{
    shared_daemon,
    support::{
        BTF_PROBES, KPROBE_PROBES, N, OBSERVER, PATIENCE, Settle as _, TRACEPOINT_PROBES, both_closed, check,
        expected_probes, scenario, start_daemon,
    },
    traffic::Mode,
};

pub fn status_lists_every_probe() -> Result<(), Failed> {
    let daemon = shared_daemon()?;
    let (code, _) = daemon.get("/healthz")?;
    check("/healthz status", code as u64, 200)?;
    let (code, body) = daemon.get("/api/v1/status")?;
    check("/api/v1/status status", code as u64, 200)?;
    let status: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("status JSON: {e}: {body}"))?;
    for key in ["version", "kernel", "uptime_seconds", "probes", "events"] {
        if status.get(key).is_none() {
            return Err(format!("status lacks `{key}`: {body}").into());
        }
    }
    for field in ["seen", "lost", "unattributed"] {
        if !status["events"][field].is_u64() {
            return Err(format!("status events.{field} is not a count: {body}").into());
        }
    }
    let probes = status["probes"].as_array().ok_or("probes is not a list")?;
    let expected = expected_probes().probes;
    for &(name, attach, backend) in &expected {
        let p = probes
            .iter()
            .find(|p| p["probe"] == name)
            .ok_or_else(|| format!("probe {name} missing from status: {body}"))?;
        if p["attach"] != attach || p["state"] != "attached" || p["backend"] != backend || !p["hook"].is_string() {
            return Err(format!("probe {name}: {p}").into());
        }
    }
    if probes.len() != expected.len() {
        return Err(format!("status lists probes of a back end not chosen: {body}").into());
    }
    let m = daemon.metrics()?;
    for &(name, attach, backend) in &expected {
        check(
            &format!("observer_probe_info {name}"),
            m.sum("observer_probe_info", &[("probe", name), ("attach", attach), ("backend", backend)]),
            1,
        )?;
    }
    check("observer_build_info", m.sum("observer_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1)?;
    for name in ["observer_events_lost_total", "observer_events_unattributed_total"] {
        if m.matching(name, &[]).count() != 1 {
            return Err(format!("{name} not exported").into());
        }
    }
    Ok(())
}

pub fn status_command() -> Result<(), Failed> {
    let daemon = shared_daemon()?;
    let out = Command::new(OBSERVER)
        .args(["status", "--endpoint", &daemon.endpoint()])
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!("observer status failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    for (name, attach, _) in expected_probes().probes {
        if !text.lines().any(|l| l.starts_with(name) && l.contains("attached") && l.contains(attach)) {
            return Err(format!("observer status does not show {name} attached:\n{text}").into());
        }
    }
    let json = Command::new(OBSERVER)
        .args(["status", "--json", "--endpoint", &daemon.endpoint()])
        .output()
        .map_err(|e| e.to_string())?;
    serde_json::from_slice::<serde_json::Value>(&json.stdout).map_err(|e| format!("status --json is not JSON: {e}"))?;

    // Pointed at nothing: a clear error, non-zero exit.
    let nothing = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let dead = format!("http://{}", nothing.local_addr().map_err(|e| e.to_string())?);
    drop(nothing);
    let out = Command::new(OBSERVER).args(["status", "--endpoint", &dead]).output().map_err(|e| e.to_string())?;
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || !err.contains("cannot reach an observer daemon at") || !err.contains("--endpoint") {
        return Err(format!("status against nothing: {} / {err}", out.status).into());
    }
    Ok(())
}

/// `--probes kprobe` on a kernel without kprobes (this project's machines) is a clear error
/// naming what is missing; where the kernel has them, every hook runs on kprobes.
/// `--probes tracepoint` runs every hook on tracepoints, `--probes btf` every hook but accept on
/// BTF tracepoints.
pub fn forced_back_end() -> Result<(), Failed> {
    // The kprobe and tracepoint programs keep per-socket state in the hash, whatever the suite's
    // OBSERVER_SOCKET_STORE says.
    if Path::new("/sys/bus/event_source/devices/kprobe").exists() {
        let daemon = start_daemon(&["--probes", "kprobe", "--socket-store", "hash"])?;
        let (_, body) = daemon.get("/api/v1/status")?;
        let status: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("status JSON: {e}: {body}"))?;
        let probes = status["probes"].as_array().ok_or("probes is not a list")?;
        for &(name, attach) in &KPROBE_PROBES {
            if !probes.iter().any(|p| {
                p["probe"] == name && p["attach"] == attach && p["backend"] == "kprobe" && p["state"] == "attached"
            }) {
                return Err(format!("--probes kprobe: {name} not attached to {attach}: {body}").into());
            }
        }
    } else {
        let out = Command::new(OBSERVER)
            .args(["run", "--listen", "127.0.0.1:0", "--probes", "kprobe", "--socket-store", "hash"])
            .output()
            .map_err(|e| e.to_string())?;
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success()
            || !err.contains("none of observer's probes could be attached")
            || !err.contains("no kprobes")
            || !err.contains("tcp_set_state")
        {
            return Err(format!("--probes kprobe without kprobes: {} / {err}", out.status).into());
        }
    }
    let daemon = start_daemon(&["--probes", "tracepoint", "--socket-store", "hash"])?;
    let (_, body) = daemon.get("/api/v1/status")?;
    let status: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("status JSON: {e}: {body}"))?;
    let probes = status["probes"].as_array().ok_or("probes is not a list")?;
    if probes.len() != TRACEPOINT_PROBES.len()
        || probes.iter().any(|p| p["backend"] != "tracepoint" || p["state"] != "attached")
    {
        return Err(format!("--probes tracepoint: {body}").into());
    }
    drop(daemon);
    // BTF tracepoints for every hook that has one; accept keeps the syscall tracepoints.
    let daemon = start_daemon(&["--probes", "btf"])?;
    let (_, body) = daemon.get("/api/v1/status")?;
    let status: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("status JSON: {e}: {body}"))?;
    let probes = status["probes"].as_array().ok_or("probes is not a list")?;
    let attached = |&(name, attach, backend): &(&str, &str, &str)| {
        probes
            .iter()
            .any(|p| p["probe"] == name && p["attach"] == attach && p["backend"] == backend && p["state"] == "attached")
    };
    if probes.len() != BTF_PROBES.len() || !BTF_PROBES.iter().all(attached) {
        return Err(format!("--probes btf: {body}").into());
    }
    Ok(())
}

pub fn bad_listen_address() -> Result<(), Failed> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = taken.local_addr().map_err(|e| e.to_string())?.to_string();
    let out = Command::new(OBSERVER).args(["run", "--listen", &addr]).output().map_err(|e| e.to_string())?;
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || !err.contains(&format!("cannot listen on {addr}")) || !err.contains("--listen") {
        return Err(format!("port in use: {} / {err}", out.status).into());
    }
    let out = Command::new(OBSERVER).args(["run", "--listen", "not-an-address"]).output().map_err(|e| e.to_string())?;
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || !err.contains("--listen") || !err.contains("not-an-address") {
        return Err(format!("invalid address: {} / {err}", out.status).into());
    }
    Ok(())
}

/// IDs of the BPF programs process `pid` holds open, from its fds' `prog_id:` in /proc.
fn programs_of(pid: u32) -> Result<Vec<u64>, Failed> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))? {
        let path = entry.map_err(|e| e.to_string())?.path();
        let Ok(info) = std::fs::read_to_string(&path) else { continue };
        if let Some(id) = info.lines().find_map(|l| l.strip_prefix("prog_id:")).and_then(|v| v.trim().parse().ok()) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// `bpftool OBJECT show --json`, as a list.
fn bpftool_list(object: &str) -> Result<Vec<serde_json::Value>, Failed> {
    let out = Command::new("bpftool")
        .args([object, "show", "--json"])
        .output()
        .map_err(|e| format!("running bpftool (installed by `cargo xtask setup`): {e}"))?;
    if !out.status.success() {
        return Err(format!("bpftool {object} show: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("bpftool JSON: {e}"))?;
    Ok(list.as_array().cloned().unwrap_or_default())
}

/// IDs of the BPF links attached to any of `programs` (`bpftool link show`).
fn links_to(programs: &[u64]) -> Result<Vec<u64>, Failed> {
    Ok(bpftool_list("link")?
        .iter()
        .filter(|l| l["prog_id"].as_u64().is_some_and(|p| programs.contains(&p)))
        .filter_map(|l| l["id"].as_u64())
        .collect())
}

/// What a daemon holds before it is stopped: its programs, and the links attaching them.
pub struct Held {
    programs: Vec<u64>,
    links: Vec<u64>,
}

pub fn held_by(pid: u32) -> Result<Held, Failed> {
    let programs = programs_of(pid)?;
    let links = links_to(&programs)?;
    if programs.is_empty() {
        return Err(format!("daemon {pid} holds no BPF program").into());
    }
    // Since 5.15 tracepoints and kprobes are attached through BPF links, which bpftool lists.
    if kernel_version() >= (5, 15) && links.is_empty() {
        return Err(format!("daemon {pid} holds programs {programs:?} but bpftool shows no link to them").into());
    }
    Ok(Held { programs, links })
}

/// After the daemon is gone, none of its programs is loaded and none of its links exists. The
/// kernel frees a program after an RCU grace period once its last reference is gone (tracing
/// programs, the BTF tracepoints, wait for the tracepoint's callers), so give it a few seconds.
pub fn nothing_left(held: &Held) -> Result<(), Failed> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let loaded: Vec<u64> = bpftool_list("prog")?.iter().filter_map(|p| p["id"].as_u64()).collect();
        let programs: Vec<u64> = held.programs.iter().copied().filter(|id| loaded.contains(id)).collect();
        let links: Vec<u64> = bpftool_list("link")?
            .iter()
            .filter_map(|l| l["id"].as_u64())
            .filter(|id| held.links.contains(id))
            .collect();
        if programs.is_empty() && links.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("left 10 s after exit: programs {programs:?}, links {links:?}").into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn sigterm_detaches() -> Result<(), Failed> {
    let mut daemon = start_daemon(&[])?;
    let pid = daemon.pid;
    let held = held_by(pid)?;
    check("programs held by the daemon", held.programs.len() as u64, expected_probes().probes.len() as u64)?;
    daemon.signal(Signal::TERM)?;
    let status = daemon.wait_exit(PATIENCE)?;
    if !status.success() {
        return Err(format!("exit status after SIGTERM: {status}\n{}", daemon.log().join("\n")).into());
    }
    nothing_left(&held)
}

/// `--probe-stats`: the kernel counts every attached program's runs and run time, exported per
/// probe and shown per run in the status. The programs run for every socket on the host (the
/// namespace filter is inside them), so the scenario's own events are a lower bound.
pub fn probe_stats_count_each_programs_runs_and_time() -> Result<(), Failed> {
    let s = scenario(Mode::Linger0, 41, "t41-pst-srv", "t41-pst-cli");
    let mut ns = s.prepare()?;
    let daemon = start_daemon(&["--probe-stats", "--netns", &ns.path])?;
    let before = daemon.metrics()?;
    ns.round()?;
    ns.release()?;
    let m = daemon.settled_metrics(&s.peers(), |m| both_closed(m, &s))?;
    let (set_state, receive_reset) = match expected_probes().backend {
        "kprobe" => ("tcp_set_state", "tcp_reset"),
        "btf" => ("btf_inet_sock_set_state", "btf_tcp_receive_reset"),
        _ => ("inet_sock_set_state", "tcp_receive_reset"),
    };
    let runs = |m: &Metrics, probe: &str| m.sum("observer_probe_runs_total", &[("probe", probe)]);
    let n = N as u64;
    check(
        "resets the scenario's clients received",
        m.sum("observer_tcp_resets_received_total", &[("comm", s.client_comm)]),
        n,
    )?;
    let received_runs = runs(&m, receive_reset) - runs(&before, receive_reset);
    if received_runs < n {
        return Err(format!("{receive_reset} ran {received_runs} times for {n} resets received").into());
    }
    // Each connection changes state at least twice on each end (SYN, then CLOSE).
    let state_runs = runs(&m, set_state) - runs(&before, set_state);
    if state_runs < 4 * n {
        return Err(format!("{set_state} ran {state_runs} times for {n} connections").into());
    }
    let seconds: f64 = m.matching("observer_probe_run_seconds_total", &[("probe", set_state)]).map(|(_, v)| v).sum();
    if seconds <= 0.0 {
        return Err(format!("observer_probe_run_seconds_total{{probe=\"{set_state}\"}} is {seconds}").into());
    }
    let (code, body) = daemon.get("/api/v1/status")?;
    check("/api/v1/status status", code as u64, 200)?;
    let status: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("status JSON: {e}: {body}"))?;
    let probe = status["probes"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["probe"] == set_state))
        .ok_or_else(|| format!("{set_state} missing from status: {body}"))?;
    let (status_runs, ns_per_run) = (probe["runs"].as_u64(), probe["ns_per_run"].as_f64());
    if status_runs.is_none_or(|r| r < runs(&m, set_state)) || ns_per_run.is_none_or(|ns| ns <= 0.0) {
        return Err(format!("status of {set_state} lacks its cost: {probe}").into());
    }
    let out = Command::new(OBSERVER)
        .args(["status", "--endpoint", &daemon.endpoint()])
        .output()
        .map_err(|e| format!("running observer status: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !text.contains("NS/RUN") || !text.lines().any(|l| l.starts_with(set_state) && l.contains("attached")) {
        return Err(format!("observer status shows no cost per run:\n{text}").into());
    }
    // A daemon without the flag exports no run counters while the sysctl is off (another
    // daemon's --probe-stats does not count: it only holds the kernel's statistics on).
    let sysctl = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_default();
    let unflagged = shared_daemon()?.metrics()?;
    let exported = unflagged.matching("observer_probe_runs_total", &[]).count();
    match (sysctl.trim(), exported) {
        ("0", 0) => Ok(()),
        ("1", n) if n > 0 => Ok(()),
        (sysctl, n) => Err(format!(
            "kernel.bpf_stats_enabled={sysctl}, yet a daemon without --probe-stats exports {n} run counters"
        )
        .into()),
    }
}

/// `--log-events`: every event-log record of the scenario is one JSON line on stdout, the same
/// record `/api/v1/events` serves, and nothing else is on stdout.
pub fn log_events_writes_each_record_as_one_json_line() -> Result<(), Failed> {
    let s = scenario(Mode::Linger0, 42, "t42-log-srv", "t42-log-cli");
    let mut ns = s.prepare()?;
    let daemon = start_daemon(&["--log-events", "--netns", &ns.path])?;
    ns.round()?;
    ns.release()?;
    daemon.settled_metrics(&s.peers(), |m| both_closed(m, &s))?;
    let (code, body) = daemon.get("/api/v1/events?since=0&limit=4096")?;
    check("/api/v1/events status", code as u64, 200)?;
    let page: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("events JSON: {e}: {body}"))?;
    let served = page["events"].as_array().cloned().unwrap_or_default();
    // Linger0: the server sends a reset and closes (local_reset), the client receives it and
    // closes (peer_reset): four records per connection.
    check("records served for the scenario", served.len() as u64, 4 * N as u64)?;
    // The writer looks every 100 ms; a record waits at most 1 s for its pod's name and 2 s for
    // its cause's pair. The deadline is generous because emulated kernels run far slower.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let lines = loop {
        let lines = daemon.stdout();
        if lines.len() >= served.len() || std::time::Instant::now() > deadline {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Asked again now that every line is out: a record fetched before its cause was paired
    // (the pairing window is still open right after the counts settle) gains that cause later,
    // and stdout carries only completed records.
    let (code, body) = daemon.get("/api/v1/events?since=0&limit=4096")?;
    check("/api/v1/events status", code as u64, 200)?;
    let page: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("events JSON: {e}: {body}"))?;
    let served = page["events"].as_array().cloned().unwrap_or_default();
    let written: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).map_err(|e| format!("stdout line is not JSON ({e}): {l}")))
        .collect::<Result<_, _>>()?;
    if written != served {
        // The first record that differs, and which of its fields: a whole dump of 2 × 20
        // records hides the difference (and a CI log keeps only its tail).
        let at = written.iter().zip(&served).position(|(w, s)| w != s).unwrap_or(written.len().min(served.len()));
        let (w, s) = (written.get(at).cloned().unwrap_or_default(), served.get(at).cloned().unwrap_or_default());
        let keys: std::collections::BTreeSet<&String> =
            w.as_object().into_iter().chain(s.as_object()).flat_map(|o| o.keys()).collect();
        let fields: Vec<String> = keys
            .into_iter()
            .filter(|key| w.get(key.as_str()) != s.get(key.as_str()))
            .map(|key| format!("{key}: stdout {:?}, served {:?}", w.get(key.as_str()), s.get(key.as_str())))
            .collect();
        return Err(format!(
            "stdout has {} records, /api/v1/events {}; record {at} is the first to differ, in {}\nstdout: {w}\nserved: {s}",
            written.len(),
            served.len(),
            if fields.is_empty() { "its presence".to_string() } else { fields.join("; ") },
        )
        .into());
    }
    Ok(())
}
