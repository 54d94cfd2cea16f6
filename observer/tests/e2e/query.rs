//! The query surface: `observer events` filters (table and `--json`), `--follow`, the API's
//! 400s and `follow=true` streams, and the CLI's errors against a daemon that is not there,
//! never answers, or answers garbage. Exact counts on real traffic.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use libtest_mimic::Failed;
use observer::api::EventRecord;
use observer_testkit::{Daemon, kernel_version};

use crate::{
    shared_daemon,
    support::{
        N, OBSERVER, PATIENCE, Settle as _, both_closed, check, expected_probes, scenario, scenario_v6, start_daemon,
    },
    traffic::Mode,
};

/// `observer events --json ARGS` (`--limit 4096` unless ARGS has one) against `daemon`: the
/// records, each checked to be an `EventRecord` with its wall-clock `time`.
fn cli_json(daemon: &Daemon, args: &[&str]) -> Result<Vec<EventRecord>, Failed> {
    let limit: &[&str] = if args.contains(&"--limit") { &[] } else { &["--limit", "4096"] };
    let out = Command::new(OBSERVER)
        .args(["events", "--json", "--endpoint", &daemon.endpoint()])
        .args(limit)
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("observer events {args:?}: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let r: EventRecord = serde_json::from_str(l).map_err(|e| format!("not an EventRecord ({e}): {l}"))?;
            if humantime::parse_rfc3339(&r.time).is_err() {
                return Err(format!("time is not RFC 3339: {l}"));
            }
            Ok(r)
        })
        .collect::<Result<_, _>>()
        .map_err(Failed::from)
}

fn count(daemon: &Daemon, what: &str, args: &[&str], want: u64) -> Result<Vec<EventRecord>, Failed> {
    let got = cli_json(daemon, args)?;
    check(&format!("{what} ({args:?})"), got.len() as u64, want)
        .map_err(|e| format!("{}: {:#?}", e.message().unwrap_or_default(), got))?;
    Ok(got)
}

/// One namespace, a SO_LINGER 0 round and a refused round; every filter selects exactly its
/// records, alone and combined, in JSON and in the table.
pub fn filters() -> Result<(), Failed> {
    let s = scenario(Mode::Linger0, 50, "t50-q-srv", "t50-q-cli");
    let mut ns = s.prepare()?;
    let daemon = &start_daemon(&["--netns", &ns.path])?;
    ns.round()?;
    ns.round_of(Mode::Refused, N)?;
    ns.release()?;
    let n = N as u64;
    // No-socket resets are traced since 6.10 on tracepoints, and on every kernel by the kprobe
    // back end (tcp_v4_send_reset).
    let k = if kernel_version() >= (6, 10) || expected_probes().backend == "kprobe" { n } else { 0 };
    daemon.settled_metrics(&s.peers(), |m| {
        both_closed(m, &s) && m.sum("observer_tcp_premature_closes_total", &[("comm", s.client_comm)]) >= 2 * n
    })?;
    let all = count(daemon, "every record", &[], 6 * n + k)?;
    count(daemon, "client", &["--comm", s.client_comm], 4 * n)?;
    let server = count(daemon, "server", &["--comm", s.server_comm], 2 * n)?;
    let pid = server.first().map(|r| r.pid.to_string()).ok_or("no server record")?;
    count(daemon, "server pid", &["--pid", &pid], 2 * n)?;
    count(daemon, "peer_reset", &["--kind", "peer_reset"], n)?;
    count(daemon, "reset_sent", &["--kind", "reset_sent"], n + k)?;
    count(daemon, "reset_received", &["--kind", "reset_received"], 2 * n)?;
    count(daemon, "peer_reset,refused", &["--kind", "peer_reset,refused"], 2 * n)?;
    count(daemon, "repeated kinds", &["--kind", "peer_reset", "--kind", "local_reset"], 2 * n)?;
    let (client_ip, server_ip) = (s.client_ip.to_string(), s.server_ip.to_string());
    count(daemon, "peer: the client", &["--peer", &client_ip], 2 * n + k)?;
    count(daemon, "peer: the clients' /16", &["--peer", "127.20.0.0/16"], 2 * n + k)?;
    count(daemon, "peer: the server", &["--peer", &format!("{server_ip}/32")], 4 * n)?;
    count(daemon, "peer: the server's /24", &["--peer", "127.10.50.0/24"], 4 * n)?;
    count(daemon, "peer: elsewhere", &["--peer", "10.0.0.0/8"], 0)?;
    count(daemon, "peer: IPv6 only", &["--peer", "::/0"], 0)?;
    count(daemon, "service port", &["--port", "8050"], 4 * n)?;
    count(daemon, "the refused port", &["--port", "8051"], 2 * n + k)?;
    count(daemon, "combined", &["--comm", s.client_comm, "--port", "8051", "--kind", "refused"], n)?;
    count(
        daemon,
        "combined",
        &["--comm", s.client_comm, "--kind", "reset_received", "--peer", &server_ip, "--since", "10m"],
        2 * n,
    )?;
    let last = count(daemon, "limit", &["--limit", "3"], 3)?;
    let newest: Vec<u64> = all.iter().rev().take(3).rev().map(|r| r.seq).collect();
    if last.iter().map(|r| r.seq).collect::<Vec<_>>() != newest {
        return Err(format!("--limit 3 is not the newest three {newest:?}: {last:?}").into());
    }
    count(daemon, "since 1h", &["--since", "1h"], 6 * n + k)?;
    std::thread::sleep(Duration::from_secs(2));
    count(daemon, "since 1s, 2 s after the last", &["--since", "1s"], 0)?;
    // The table: one line per record, local time first, process, role, peer, kind, cause.
    let out = Command::new(OBSERVER)
        .args(["events", "--endpoint", &daemon.endpoint(), "--comm", s.client_comm, "--kind", "peer_reset"])
        .env("NO_COLOR", "1")
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    check("table lines", text.lines().count() as u64, n)?;
    let want = format!("{}:8050", server_ip);
    for line in text.lines() {
        let date = line.get(..10).unwrap_or_default();
        let dated = date.len() == 10 && date.chars().all(|c| c.is_ascii_digit() || c == '-');
        let fields =
            ["peer_reset", &format!("{}[", s.client_comm), " client ", &want, "dur=", "<- reset by t50-q-srv["];
        if !dated || !fields.iter().all(|f| line.contains(f)) || line.contains('\x1b') {
            return Err(format!("table line lacks a field or has colour: {line:?}\n{text}").into());
        }
    }
    Ok(())
}

/// Over IPv6: CIDR filters select `::1` and nothing IPv4.
pub fn filters_v6() -> Result<(), Failed> {
    let s = scenario_v6(Mode::Linger0, 51, "t51-q6-srv", "t51-q6-cli");
    let mut ns = s.prepare()?;
    let daemon = &start_daemon(&["--netns", &ns.path])?;
    ns.round()?;
    ns.release()?;
    daemon.settled_metrics(&s.peers(), |m| both_closed(m, &s))?;
    let n = N as u64;
    count(daemon, "every record", &[], 4 * n)?;
    count(daemon, "peer ::1", &["--peer", "::1"], 4 * n)?;
    count(daemon, "peer ::/0", &["--peer", "::/0"], 4 * n)?;
    count(daemon, "peer ::/127", &["--peer", "::/127"], 4 * n)?;
    count(daemon, "peer fd00::/8", &["--peer", "fd00::/8"], 0)?;
    count(daemon, "peer 0.0.0.0/0", &["--peer", "0.0.0.0/0"], 0)?;
    count(daemon, "client peer_reset on 8051", &["--peer", "::1", "--port", "8051", "--kind", "peer_reset"], n)?;
    Ok(())
}

/// Lines a reader thread collects from a stream.
fn collect_lines(reader: impl std::io::Read + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines().map_while(Result::ok) {
            sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
    });
    lines
}

fn wait_for(lines: &Arc<Mutex<Vec<String>>>, n: usize) -> Vec<String> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let got = lines.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if got.len() >= n || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `observer events --follow` and `follow=true` both see records made after they started;
/// the stream is freed when its client goes away.
pub fn follow() -> Result<(), Failed> {
    let s = scenario(Mode::Linger0, 52, "t52-qf-srv", "t52-qf-cli");
    let mut ns = s.prepare()?;
    let daemon = &start_daemon(&["--netns", &ns.path])?;
    let n = N as usize;
    let mut cli = Command::new(OBSERVER)
        .args(["events", "--follow", "--json", "--endpoint", &daemon.endpoint(), "--comm", s.client_comm])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let cli_lines = collect_lines(cli.stdout.take().ok_or("no stdout")?);
    let mut http = TcpStream::connect(daemon.addr).map_err(|e| e.to_string())?;
    write!(http, "GET /api/v1/events?follow=true&comm={}&kind=peer_reset HTTP/1.1\r\nHost: x\r\n\r\n", s.client_comm)
        .map_err(|e| e.to_string())?;
    let http_lines = collect_lines(http.try_clone().map_err(|e| e.to_string())?);
    std::thread::sleep(Duration::from_secs(1));
    ns.round()?;
    ns.release()?;
    let got = wait_for(&cli_lines, 2 * n);
    let _ = cli.kill();
    let _ = cli.wait();
    check("events --follow records of the client", got.len() as u64, 2 * n as u64)?;
    for l in &got {
        let r: EventRecord = serde_json::from_str(l).map_err(|e| format!("{e}: {l}"))?;
        if r.comm != s.client_comm {
            return Err(format!("--follow --comm printed another's record: {l}").into());
        }
    }
    // The HTTP stream: headers, then one record per line (chunked: each chunk's size line
    // comes before it).
    let deadline = Instant::now() + PATIENCE;
    let records = loop {
        let lines = http_lines.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let records: Vec<String> = lines.iter().filter(|l| l.starts_with('{')).cloned().collect();
        if records.len() >= n || Instant::now() > deadline {
            if !lines.first().is_some_and(|l| l.starts_with("HTTP/1.1 200"))
                || !lines.iter().any(|l| l.eq_ignore_ascii_case("content-type: application/x-ndjson"))
            {
                return Err(format!("follow=true answer: {lines:?}").into());
            }
            break records;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    check("follow=true records", records.len() as u64, n as u64)?;
    for l in &records {
        let r: EventRecord = serde_json::from_str(l).map_err(|e| format!("{e}: {l}"))?;
        if r.kind.as_deref() != Some("peer_reset") || r.comm != s.client_comm {
            return Err(format!("follow=true sent a record its filter excludes: {l}").into());
        }
    }
    // The client goes away: the daemon frees the stream, and says so.
    let opened = daemon.log().iter().filter(|l| l.contains("events stream") && l.contains("opened")).count();
    check("streams opened", opened as u64, 1)?;
    let _ = http.shutdown(std::net::Shutdown::Both);
    drop(http);
    let deadline = Instant::now() + PATIENCE;
    while !daemon.log().iter().any(|l| l.contains(&format!("events stream 1 closed after {n} records"))) {
        if Instant::now() > deadline {
            return Err(format!("the stream was not freed after its client left:\n{}", daemon.log().join("\n")).into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // A stream with a limit ends by itself.
    let (code, body) = daemon.get("/api/v1/events?follow=true&timeout=300ms")?;
    check("follow=true&timeout=300ms status", code as u64, 200)?;
    check("follow=true&timeout=300ms records (none new)", body.lines().count() as u64, 0)?;
    Ok(())
}

/// Bad parameters are HTTP 400 with a message naming the parameter and what it allows; the
/// old `since=SEQ` cursor still works.
pub fn bad_parameters() -> Result<(), Failed> {
    let daemon = shared_daemon()?;
    for (query, says) in [
        (
            "kind=foo",
            r#"kind: \"foo\" is not one of refused, peer_reset, unread_data, local_reset, eof_before_response, abandoned, timeout, connect_timeout, truncated_response, reset_received, reset_sent"#,
        ),
        ("pid=-1", r#"pid: \"-1\" is not a process id"#),
        ("port=70000", r#"port: \"70000\" is not a port (1-65535)"#),
        ("peer=10.0.0.0/33", r#"peer: \"10.0.0.0/33\" is not an IPv4/IPv6 address or CIDR block"#),
        ("since=5x", r#"since: \"5x\" is not a duration"#),
        ("limit=none", r#"limit: \"none\" is not a count of 1 or more"#),
        ("follow=yes", r#"follow: \"yes\" is not true or false"#),
        ("sort=seq", r#"unknown parameter \"sort\""#),
    ] {
        let (code, body) = daemon.get(&format!("/api/v1/events?{query}"))?;
        if code != 400 || !body.starts_with(&format!("{{\"error\":\"{says}")) {
            return Err(format!("{query}: {code} {body}").into());
        }
    }
    let (code, body) = daemon.get("/api/v1/events?since=0&limit=1")?;
    let page: observer::api::EventsPage = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    check("since=SEQ status", code as u64, 200)?;
    if page.events.len() > 1 {
        return Err(format!("since=0&limit=1 gave {} records", page.events.len()).into());
    }
    let (code, body) = daemon.get("/api/v1/openapi.json")?;
    let doc: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    check("openapi.json status", code as u64, 200)?;
    if doc["openapi"] != "3.0.3" || !doc["paths"]["/api/v1/events"].is_object() {
        return Err(format!("openapi.json: {body}").into());
    }
    Ok(())
}

/// Runs `observer ARGS --endpoint ENDPOINT --timeout 1s`: it must fail with one line saying
/// `says`.
fn fails_saying(args: &[&str], endpoint: &str, says: &[&str]) -> Result<(), Failed> {
    let started = Instant::now();
    let out = Command::new(OBSERVER)
        .args(args)
        .args(["--endpoint", endpoint, "--timeout", "1s"])
        .output()
        .map_err(|e| e.to_string())?;
    let err = String::from_utf8_lossy(&out.stderr);
    let took = started.elapsed();
    if out.status.success() || err.lines().count() != 1 || !says.iter().all(|s| err.contains(s)) {
        return Err(format!(
            "observer {args:?} against {endpoint}: {} after {took:?}: {err:?}, want {says:?}",
            out.status
        )
        .into());
    }
    if took > Duration::from_secs(30) {
        return Err(format!("observer {args:?} took {took:?} with --timeout 1s").into());
    }
    Ok(())
}

/// A listener answering each connection with `answer` (nothing at all: `None`, the connection
/// held open).
fn fake_daemon(answer: Option<&'static [u8]>) -> Result<String, Failed> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for mut conn in listener.incoming().map_while(Result::ok) {
            if let Some(answer) = answer {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf);
                let _ = conn.write_all(answer);
            }
            held.push(conn);
        }
    });
    Ok(format!("http://{addr}"))
}

/// Every command fails with one clear line when the daemon is not there, never answers, or
/// answers garbage.
pub fn cli_errors() -> Result<(), Failed> {
    let nothing = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let dead = format!("http://{}", nothing.local_addr().map_err(|e| e.to_string())?);
    drop(nothing);
    let silent = fake_daemon(None)?;
    let not_json = fake_daemon(Some(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot json!"))?;
    let wrong_schema =
        fake_daemon(Some(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nConnection: close\r\n\r\n{\"a\": true}"))?;
    let not_http = fake_daemon(Some(b"SSH-2.0-OpenSSH_9.6\r\n"))?;
    for command in [&["status"][..], &["events"][..], &["events", "--follow"][..]] {
        fails_saying(
            command,
            &dead,
            &["cannot reach an observer daemon at", "is observer run running?", "--endpoint"],
        )?;
        fails_saying(command, &silent, &["did not answer within 1s (--timeout)"])?;
        fails_saying(command, &not_json, &["answered, but not with observer's", "JSON"])?;
        fails_saying(command, &wrong_schema, &["answered, but not with observer's", "JSON"])?;
        fails_saying(command, &not_http, &["answered, but not with observer's HTTP"])?;
    }
    Ok(())
}
