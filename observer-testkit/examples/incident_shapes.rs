//! The HTTP shapes of the incident's peers, run for real and counted from nginx's logs and the
//! client's account (`observer_testkit::incident`), without observer:
//!
//! 1. the backend's failures ([`Failure`]), each user's order failing all its attempts: per
//!    failure, nginx's error lines, the status it logged and the client's `unexpected EOF`s;
//! 2. the keep-alive race ([`KeepAlive::RACE`]), `--runs N` times (default 3): nginx's 502s, those
//!    on a reused upstream connection (its debug log), its error lines, and the requests on a
//!    reused connection by the debug log against the namespace's `Tcp: ActiveOpens`.
//!
//! Root only (a network namespace); needs nginx-light and golang-go.
//! `cargo run -p observer-testkit --example incident_shapes [-- --runs N]`; exits non-zero if a
//! shape did not happen as designed.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use observer_testkit::{
    Problems,
    incident::{
        self, ATTEMPTS_PER_FAILED_ORDER, ClientRound, Failure, GO_UNEXPECTED_EOF, Incident, KeepAlive, NginxLogs,
        Options, Ports,
    },
    net::NamedNetns,
    process,
};

/// One order of each failure, and two known users.
const USERS: &[&str] = &["alice", "x-panic", "y-truncated", "z-chunked", "bob", "m-cut", "p-silent", "s-abort"];

/// The race must make at least this many 502s in each run.
const AT_LEAST: u64 = 3;

fn main() -> Result<()> {
    ensure!(process::is_root(), "this example makes a network namespace: run it as root");
    let runs = match std::env::args().skip(1).collect::<Vec<_>>().as_slice() {
        [] => 3,
        [flag, n] if flag == "--runs" => n.parse().context("--runs N")?,
        other => bail!("usage: incident_shapes [--runs N], not {other:?}"),
    };
    let exe = std::env::current_exe()?;
    // target/debug/examples/incident_shapes → target/debug/incident-shapes
    let base = exe.ancestors().nth(2).context("the example's target directory")?.join("incident-shapes");
    let programs = incident::build_programs(&base.join("go"))?;
    let mut p = Problems::default();

    let netns = NamedNetns::new("shapes", "failures")?;
    let dir = fresh(&base.join("failures"))?;
    let run = Incident::start(&programs, &netns, &dir, Ports::default())?;
    let round = run.place_orders(USERS)?;
    let logs = wait_for_lines(&run, round.attempts)?;
    drop(run);
    drop(netns);
    failures(&mut p, &round, &logs);

    for i in 1..=runs {
        let netns = NamedNetns::new("shapes", &format!("race{i}"))?;
        let dir = fresh(&base.join(format!("race{i}")))?;
        let opens_before = netns.tcp_counter("ActiveOpens")?;
        let run = Incident::start_with(
            &programs,
            &netns,
            &dir,
            Ports::default(),
            Options { keep_alive: Some(KeepAlive::RACE) },
        )?;
        let started = Instant::now();
        let round = run.place_orders(&incident::known_users(KeepAlive::RACE_ORDERS))?;
        let took = started.elapsed();
        let logs = wait_for_lines(&run, round.attempts)?;
        drop(run);
        let opens = netns.tcp_counter("ActiveOpens")? - opens_before;
        race(&mut p, i, took, &round, &logs, opens)?;
    }
    p.finish()
}

/// Per failure: nginx's error lines and statuses, and the client's `unexpected EOF`s.
fn failures(p: &mut Problems, round: &ClientRound, logs: &NginxLogs) {
    println!("failures: the client {round:?}");
    let mut eofs_wanted = 0;
    for user in USERS {
        let records: Vec<_> = logs.access.iter().filter(|r| r.request_uri == format!("/order?user={user}")).collect();
        let statuses: Vec<u16> = records.iter().map(|r| r.status).collect();
        let errors: BTreeMap<&str, u64> =
            records.iter().flat_map(|r| logs.errors_of(r)).fold(BTreeMap::new(), |mut m, e| {
                *m.entry(e.as_str()).or_default() += 1;
                m
            });
        let bytes: Vec<&str> = records.iter().map(|r| r.upstream_bytes_received.as_str()).collect();
        println!(
            "  {user:12} {:10} nginx: status {statuses:?}, upstream bytes {bytes:?}, error lines {errors:?}",
            format!("{:?}", Failure::of(user)),
        );
        match Failure::of(user) {
            None => p.eq(&format!("{user}: statuses"), statuses, vec![200]),
            Some(f) => {
                p.eq(
                    &format!("{user}: statuses"),
                    statuses,
                    vec![f.nginx_status(); ATTEMPTS_PER_FAILED_ORDER as usize],
                );
                let want: BTreeMap<&str, u64> = [(f.nginx_error(), ATTEMPTS_PER_FAILED_ORDER)].into();
                p.eq(&format!("{user}: nginx's error lines"), errors, want);
                if f.client_unexpected_eof() {
                    eofs_wanted += ATTEMPTS_PER_FAILED_ORDER;
                }
            }
        }
    }
    p.eq("the client's unexpected EOFs", round.unexpected_eof, eofs_wanted);
    p.eq("the client's other errors", round.other_errors, 0);
    p.eq("the client's errors", round.errors.clone(), [(GO_UNEXPECTED_EOF.to_string(), eofs_wanted)].into());
}

/// The keep-alive race: its 502s, all on reused connections; the debug log against the kernel.
fn race(p: &mut Problems, i: u32, took: Duration, round: &ClientRound, logs: &NginxLogs, opens: u64) -> Result<()> {
    let requests = logs.access.len() as u64;
    let reused = logs.reused_upstream_requests()?;
    // Each client attempt opens one connection to nginx; the rest are nginx's to the backend.
    let new_upstream = opens - round.attempts;
    let status_502 = logs.status(502);
    let race_502 = logs.reused_upstream_502s()?;
    let mut errors: BTreeMap<&str, u64> = BTreeMap::new();
    for e in &logs.errors {
        *errors.entry(e).or_default() += 1;
    }
    let connect_times: BTreeMap<(bool, &str), u64> = logs.access.iter().fold(BTreeMap::new(), |mut m, r| {
        *m.entry((logs.on_reused_upstream(r).unwrap_or(false), r.upstream_connect_time.as_str())).or_default() += 1;
        m
    });
    println!(
        "race {i}: {} orders in {took:.1?}: nginx logged {requests} requests, {status_502} answered 502, {race_502} of them \
         on a reused upstream connection; error lines {errors:?}; requests on a reused upstream connection: {reused} \
         (debug log), {} (attempts {} - new upstream connections {new_upstream} by Tcp: ActiveOpens {opens} - attempts); \
         $upstream_connect_time by (reused, value): {connect_times:?}; the client: {} attempts, {} retries, \
         by status {:?}, errors {:?}",
        round.orders,
        round.attempts.saturating_sub(new_upstream),
        round.attempts,
        round.attempts,
        round.retries,
        round.by_status,
        round.errors,
    );
    p.eq(&format!("race {i}: 502s on a reused upstream connection = 502s"), race_502, status_502);
    p.eq(&format!("race {i}: error lines = 502s"), logs.errors.len() as u64, status_502);
    p.eq(
        &format!("race {i}: the client's 502s = nginx's"),
        round.by_status.get("502").copied().unwrap_or(0),
        status_502,
    );
    p.eq(&format!("race {i}: requests on a reused connection, debug log = kernel"), reused, requests - new_upstream);
    p.eq(&format!("race {i}: every order placed"), round.failed, 0);
    if race_502 < AT_LEAST {
        p.push(format!("race {i}: only {race_502} 502s on a reused upstream connection, fewer than {AT_LEAST}"));
    }
    Ok(())
}

/// nginx writes a request's access line once it has answered it.
fn wait_for_lines(run: &Incident, attempts: u64) -> Result<NginxLogs> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let logs = run.nginx_logs()?;
        if logs.access.len() as u64 >= attempts {
            return Ok(logs);
        }
        ensure!(Instant::now() < deadline, "nginx logged {} of {attempts} requests", logs.access.len());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn fresh(dir: &Path) -> Result<PathBuf> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir.to_path_buf())
}
