//! `/api/v1/top` and `observer top`: rates the daemon computes, over a paced load whose count in
//! any window follows from its pace.

use std::{
    io::{Read as _, Write as _},
    net::TcpListener,
    process::Command,
    time::{Duration, Instant},
};

use libtest_mimic::Failed;
use observer::api::{TopReport, TopRow, TopSort};

use crate::{
    shared_daemon,
    support::{OBSERVER, PATIENCE, scenario},
    traffic::{Mode, PACE, Scenario},
};

/// Connections of the paced load: 30 s at one per [`PACE`], longer than the queries need even
/// under emulation (the kernel matrix: 10 s was not always enough there).
const PACED: u32 = 300;

/// The daemon's snapshot period (`observer::top::TICK`): a window ends up to one tick back.
const TICK: Duration = Duration::from_secs(1);

pub fn rates_of_a_paced_load() -> Result<(), Failed> {
    let daemon = shared_daemon()?;
    let s = Scenario { connections: PACED, ..scenario(Mode::PacedLinger0, 60, "t60-top-srv", "t60-top-cli") };
    let load = {
        let s = s.clone();
        std::thread::spawn(move || s.run())
    };
    // The first reset has been counted...
    let deadline = Instant::now() + PATIENCE;
    while daemon.metrics()?.sum("observer_tcp_closes_total", &[("comm", s.client_comm)]) == 0 {
        if load.is_finished() || Instant::now() > deadline {
            let outcome = if load.is_finished() { format!("{:?}", load.join()) } else { "still running".into() };
            return Err(format!("the paced load's first connection was never counted (load: {outcome})").into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // ... and now every 2 s window (whole ticks, the newest up to a tick old) starts after it.
    std::thread::sleep(Duration::from_secs(2) + TICK + Duration::from_millis(500));
    let endpoint = daemon.endpoint();
    let cli = Command::new(OBSERVER)
        .args(["top", "--once", "--json", "--interval", "2s", "--sort", "resets_in", "--limit", "10000"])
        .args(["--endpoint", &endpoint])
        .output()
        .map_err(|e| e.to_string())?;
    let (code, api_body) = daemon.get("/api/v1/top?interval=2s&sort=resets_out&limit=10000")?;
    let table = Command::new(OBSERVER)
        .args(["top", "--once", "--interval", "2s", "--sort", "premature", "--endpoint", &endpoint])
        .output()
        .map_err(|e| e.to_string())?;
    if load.is_finished() {
        return Err(format!(
            "the paced load ({} s) ended before the queries did: the windows must lie within it ({:?})",
            PACE.as_secs_f64() * f64::from(PACED),
            load.join()
        )
        .into());
    }

    // `observer top --once --json`: the client's row (it receives the resets).
    if !cli.status.success() {
        return Err(format!("observer top --once --json failed: {}", String::from_utf8_lossy(&cli.stderr)).into());
    }
    let stdout = String::from_utf8_lossy(&cli.stdout);
    let report: TopReport =
        serde_json::from_str(stdout.trim()).map_err(|e| format!("observer top --json: {e}: {stdout}"))?;
    check_sorted(&report, TopSort::ResetsIn)?;
    let client = row(&report, &s, "client")?;
    for (what, rate) in [
        ("resets_in_per_s", client.resets_in_per_s),
        ("premature_by_kind.peer_reset", client.premature_by_kind.get("peer_reset").copied().unwrap_or(0.0)),
        ("premature_per_s", client.premature_per_s),
        ("closes_per_s", client.closes_per_s),
        ("opened_per_s", client.opened_per_s),
    ] {
        paced(&format!("client {what}"), rate, report.window_seconds)?;
    }
    if client.resets_out_per_s != 0.0 {
        return Err(format!("the client sent no reset: {client:?}").into());
    }

    // `/api/v1/top`: the server's row (it sends them).
    if code != 200 {
        return Err(format!("/api/v1/top answered {code}: {api_body}").into());
    }
    let report: TopReport = serde_json::from_str(&api_body).map_err(|e| format!("/api/v1/top: {e}: {api_body}"))?;
    check_sorted(&report, TopSort::ResetsOut)?;
    let server = row(&report, &s, "server")?;
    for (what, rate) in [
        ("resets_out_per_s", server.resets_out_per_s),
        ("premature_by_kind.local_reset", server.premature_by_kind.get("local_reset").copied().unwrap_or(0.0)),
        ("closes_per_s", server.closes_per_s),
        ("opened_per_s", server.opened_per_s),
    ] {
        paced(&format!("server {what}"), rate, report.window_seconds)?;
    }

    // The table, on a pipe: plain text.
    let text = String::from_utf8_lossy(&table.stdout);
    if !table.status.success() || text.contains('\x1b') || !text.contains("RST_IN/s") || !text.contains(s.client_comm) {
        return Err(format!(
            "observer top --once on a pipe: a plain table with {} ({}):\n{text:?}\n{}",
            s.client_comm,
            table.status,
            String::from_utf8_lossy(&table.stderr)
        )
        .into());
    }

    // Bad parameters: 400, naming the parameter and what it allows.
    for (query, words) in [
        ("sort=bytes", ["sort", "resets_in, resets_out, premature, closes, opened"]),
        ("interval=soon", ["interval", "1s to 60s"]),
        ("interval=5m", ["interval", "1s to 60s"]),
        ("limit=0", ["limit", "1 to 10000"]),
    ] {
        let (code, body) = daemon.get(&format!("/api/v1/top?{query}"))?;
        if code != 400 || !words.iter().all(|w| body.contains(w)) {
            return Err(format!("/api/v1/top?{query}: want 400 naming {words:?}, got {code}: {body}").into());
        }
    }
    load.join().map_err(|_| "the paced load panicked")??;
    Ok(())
}

/// The row of the scenario's `role` side.
fn row<'a>(report: &'a TopReport, s: &Scenario, role: &str) -> Result<&'a TopRow, Failed> {
    let [server_ip, client_ip] = s.peers();
    let (comm, peer) = if role == "client" { (s.client_comm, server_ip) } else { (s.server_comm, client_ip) };
    let port = s.port.to_string();
    report
        .rows
        .iter()
        .find(|r| r.comm == comm && r.role == role && r.peer == peer && r.port == port)
        .ok_or_else(|| format!("no row of {comm} ({role}, peer {peer}, port {port}): {report:?}").into())
}

/// A rate of the paced load over a window of `seconds`: the pace puts ⌊seconds/PACE⌋ or
/// ⌈seconds/PACE⌉ events in it, and one more or less may cross its edges on the way from the
/// kernel to the count.
fn paced(what: &str, rate: f64, seconds: f64) -> Result<(), Failed> {
    if seconds <= 0.0 {
        return Err(format!("{what}: no window ({seconds} s)").into());
    }
    let count = rate * seconds;
    let paced = seconds / PACE.as_secs_f64();
    let (low, high) = (paced.floor() - 1.0, paced.ceil() + 1.0);
    // The count is a whole number of events (up to the float division's rounding).
    if (count - count.round()).abs() > 1e-6 || count.round() < low || count.round() > high {
        return Err(format!("{what}: {rate}/s over {seconds} s is {count} events, want {low} to {high}").into());
    }
    Ok(())
}

fn check_sorted(report: &TopReport, sort: TopSort) -> Result<(), Failed> {
    if report.sort != sort.as_str() {
        return Err(format!("sorted by {}, asked for {}", report.sort, sort.as_str()).into());
    }
    if report.rows.windows(2).any(|w| sort.rate(&w[0]) < sort.rate(&w[1])) {
        return Err(format!("rows not sorted by {}: {report:?}", sort.as_str()).into());
    }
    Ok(())
}

/// `observer top` fails with one line, exit ≠ 0, when the daemon cannot be reached, is slower
/// than `--timeout`, or answers something that is not its report.
pub fn top_command_fails_clearly() -> Result<(), Failed> {
    let fails = |endpoint: &str, want: &str| -> Result<(), Failed> {
        let out = Command::new(OBSERVER)
            .args(["top", "--once", "--timeout", "1s", "--endpoint", endpoint])
            .output()
            .map_err(|e| e.to_string())?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || stderr.trim().lines().count() != 1 || !stderr.contains(want) {
            return Err(format!(
                "observer top at {endpoint}: want one line with {want:?}, got {}: {stderr}",
                out.status
            )
            .into());
        }
        Ok(())
    };
    // Nothing listens.
    let closed = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = closed.local_addr().map_err(|e| e.to_string())?;
    drop(closed);
    fails(&format!("http://{addr}"), "cannot reach")?;
    // Accepts, never answers.
    let silent = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let silent_addr = silent.local_addr().map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        if let Ok((conn, _)) = silent.accept() {
            std::thread::sleep(Duration::from_secs(10));
            drop(conn);
        }
    });
    fails(&format!("http://{silent_addr}"), "did not answer within 1s (--timeout)")?;
    // Answers, but not with a report.
    let liar = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let liar_addr = liar.local_addr().map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        if let Ok((mut conn, _)) = liar.accept() {
            let mut request = [0u8; 1024];
            let _ = conn.read(&mut request);
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot json!");
        }
    });
    fails(&format!("http://{liar_addr}"), "did not answer with observer's top JSON")?;
    Ok(())
}
