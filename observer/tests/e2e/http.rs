//! `--http`: HTTP/1.x verdicts on both ends of real loopback exchanges, made by the `traffic`
//! workers speaking HTTP/1.1 byte for byte (so each count is known exactly). The Go and nginx
//! peers of the incident are the `incident` test's.
//!
//! On a kernel without the BTF tracepoints the capture hooks (`sock_send_length`,
//! `sock_recv_length`: Linux 6.3+), the test asserts instead that `observer run --http` refuses
//! to start, naming what the kernel lacks.

use std::process::Command;

use libtest_mimic::Failed;
use serde_json::Value;

use crate::{
    support::{OBSERVER, Settle as _, check, scenario, start_daemon},
    traffic::{Mode, STATUS_LINE, TRUNCATED_BODY},
};

const PREMATURE: &str = "observer_tcp_premature_closes_total";
const CLOSES: &str = "observer_tcp_closes_total";
/// Connections per shape.
const N: u32 = 3;

/// Whether this kernel has the hooks the capture needs.
fn kernel_has_capture_hooks() -> Result<bool, Failed> {
    let btf = observer::probes::btf::KernelBtf::load().map_err(|e| format!("reading the kernel's BTF: {e}"))?;
    Ok(btf.btf_tracepoint_args("sock_send_length").is_some() && btf.btf_tracepoint_args("sock_recv_length").is_some())
}

/// Every HTTP shape on one daemon with `--http`: the three truncations (a sized body cut by FIN,
/// a status line cut by RST, a chunked body cut by FIN) are `truncated_response` on both ends,
/// with the stage and byte counts each end saw; clean keep-alive exchanges (sized, chunked in
/// two writes, pipelined) are never premature; the keep-alive race is `idle_keepalive` on the
/// client, with the request it lost.
pub fn http_verdicts() -> Result<(), Failed> {
    if !kernel_has_capture_hooks()? {
        return refused_without_hooks();
    }
    let s = scenario(Mode::HttpTruncated, 70, "t70-http-srv", "t70-http-cli");
    let mut ns = s.prepare()?;
    let daemon = start_daemon(&["--netns", &ns.path, "--http"])?;
    let status: Value = serde_json::from_str(&daemon.get("/api/v1/status")?.1).map_err(|e| e.to_string())?;
    let capture: Vec<&Value> =
        status["probes"].as_array().into_iter().flatten().filter(|p| p["hook"] == "http_capture").collect();
    if capture.len() != 2 || capture.iter().any(|p| p["state"] != "attached") {
        return Err(format!("the capture probes are not both attached: {capture:?}").into());
    }
    for mode in [Mode::HttpTruncated, Mode::HttpStatusLineReset, Mode::HttpChunkedCut, Mode::HttpKeepalive] {
        ns.round_of(mode, N)?;
    }
    ns.round_of(Mode::HttpKeepaliveRace, N)?;
    ns.release()?;

    let n = u64::from(N);
    let (client, server) = (s.client_labels(), s.server_labels());
    // Five rounds of N connections, each closed on both ends.
    let m =
        daemon.settled_metrics(&s.peers(), |m| m.sum(CLOSES, &client) == 5 * n && m.sum(CLOSES, &server) == 5 * n)?;
    check("client closes", m.sum(CLOSES, &client), 5 * n)?;
    check("server closes", m.sum(CLOSES, &server), 5 * n)?;
    let events = events(&daemon)?;
    // What the daemon logged, for a count that is off.
    let logged: Vec<String> =
        events.iter().map(|e| format!("{} {} {}/{}", e["comm"], e["role"], e["kind"], e["http"]["stage"])).collect();
    let check = |what: &str, got: u64, want: u64| check(&format!("{what} (logged: {logged:?})"), got, want);
    let truncated = |labels: &[(&'static str, &'static str)]| {
        let mut l = labels.to_vec();
        l.push(("kind", "truncated_response"));
        m.sum(PREMATURE, &l)
    };
    check("client truncated_response", truncated(&client), 3 * n)?;
    check("server truncated_response", truncated(&server), 3 * n)?;

    let of = |comm: &str, stage: &str| -> Vec<&Value> {
        events.iter().filter(|e| e["comm"] == comm && e["http"]["stage"] == stage).collect()
    };
    for (comm, side, verb) in [(s.client_comm, "client", "received"), (s.server_comm, "server", "sent")] {
        // Content-Length 100, 8 body bytes.
        let sized: Vec<_> =
            of(comm, "in_response_body").into_iter().filter(|e| e["http"]["declared_body_bytes"] == 100).collect();
        check(&format!("{side}: in_response_body, 100 declared"), sized.len() as u64, n)?;
        for e in &sized {
            let h = &e["http"];
            let want = format!("{verb} {} of 100 body bytes", TRUNCATED_BODY.len());
            if e["kind"] != "truncated_response"
                || h["side"] != side
                || h["transferred_body_bytes"] != TRUNCATED_BODY.len()
                || h["status"] != 200
                || h["method"] != "GET"
                || h["path"] != "/order"
                || !h["summary"].as_str().is_some_and(|t| t.contains(&want))
            {
                return Err(format!("{side}: a truncated sized body should say `{want}`: {e}").into());
            }
        }
        // One 5-byte chunk of a chunked body (10 bytes with its framing), no last chunk.
        let chunked: Vec<_> = of(comm, "in_response_body")
            .into_iter()
            .filter(|e| e["http"]["declared_body_bytes"].is_null() && e["http"]["transferred_body_bytes"] == 10)
            .collect();
        check(&format!("{side}: in_response_body, chunked"), chunked.len() as u64, n)?;
        // The bodiless status line, then the reset.
        let headers = of(comm, "in_response_headers");
        check(&format!("{side}: in_response_headers"), headers.len() as u64, n)?;
        if let Some(e) =
            headers.iter().find(|e| e["kind"] != "truncated_response" || e["facts"]["close_initiator"] != "reset")
        {
            return Err(format!("{side}: the status line cut by a reset: {e}").into());
        }
    }
    // The status line's bytes are all that crossed.
    for e in of(s.client_comm, "in_response_headers") {
        if e["facts"]["bytes_received"] != STATUS_LINE.len() {
            return Err(format!("client received more than the status line: {e}").into());
        }
    }

    // The keep-alive race: the client's second request went into a connection the server had
    // closed while idle; it is the client's premature close, with the request it lost.
    let race = of(s.client_comm, "idle_keepalive");
    check("client: idle_keepalive (the keep-alive race)", race.len() as u64, n)?;
    for e in &race {
        let h = &e["http"];
        if h["method"] != "POST" || h["requests"] != 2 || !h["idle_seconds"].is_null() || e["kind"].is_null() {
            return Err(format!("the keep-alive race should be the client's lost POST, request 2: {e}").into());
        }
    }
    // Nothing else was premature on the client: the clean keep-alive exchanges stayed clean.
    check("client premature closes in all", m.sum(PREMATURE, &[("comm", s.client_comm)]), 3 * n + n)?;
    let stages: Vec<String> = events
        .iter()
        .filter(|e| e["comm"] == s.client_comm && e["event"] == "closed")
        .map(|e| format!("{}/{}", e["kind"], e["http"]["stage"]))
        .collect();
    check(&format!("client closes logged ({stages:?})"), stages.len() as u64, 4 * n)?;
    Ok(())
}

/// Without the hooks, `observer run --http` fails at once, naming what the kernel lacks.
fn refused_without_hooks() -> Result<(), Failed> {
    let out = Command::new(OBSERVER)
        .args(["run", "--listen", "127.0.0.1:0", "--http"])
        .output()
        .map_err(|e| format!("running observer run --http: {e}"))?;
    let err = String::from_utf8_lossy(&out.stderr);
    let want = "--http cannot follow HTTP exchanges on this kernel: this kernel has no BTF tracepoint sock_send_length";
    if out.status.success() || !err.contains(want) {
        return Err(format!(
            "on a kernel without sock_send_length, observer run --http should fail with `{want}`; it {} with:\n{err}",
            out.status
        )
        .into());
    }
    Ok(())
}

fn events(daemon: &observer_testkit::Daemon) -> Result<Vec<Value>, Failed> {
    let (code, body) = daemon.get("/api/v1/events?limit=4096")?;
    check("/api/v1/events status", u64::from(code), 200)?;
    let page: Value = serde_json::from_str(&body).map_err(|e| format!("events JSON: {e}: {body}"))?;
    Ok(page["events"].as_array().cloned().unwrap_or_default())
}
