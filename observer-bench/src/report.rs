//! BENCHMARKS.md, written from `results.json` alone (so `--report-only` can rewrite it).
use std::fmt::Write as _;

use super::{Check, Results, churn::ArmRun, diagnose::Diagnostics, storm::Run};

/// The hand-written analysis of the published run (why targets were missed, what the
/// bottlenecks are), kept next to the code that measures it.
const ANALYSIS: &str = include_str!("analysis.md");

const MB: f64 = 1_000_000.0;

fn mb(kib: u64) -> f64 {
    kib as f64 * 1024.0 / MB
}

struct Verdict {
    name: &'static str,
    target: &'static str,
    measured: String,
    met: bool,
}

fn targets(r: &Results) -> Vec<Verdict> {
    let arm = |name: &str| r.churn.summary.iter().find(|s| s.arm == name);
    let ratio = |name: &str| arm(name).map_or(0.0, |s| s.median_ratio);
    let ten_k = r.scrape.levels.iter().find(|l| l.series == 10_000);
    let storm_runs: Vec<&Run> = r.storm.sweep.iter().chain([&r.storm.max]).collect();
    let best_lossless = storm_runs
        .iter()
        .copied()
        .filter(|r| r.events_lost == 0)
        .max_by(|a, b| a.events_per_second.total_cmp(&b.events_per_second));
    let cost = storm_runs
        .iter()
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), r| (lo.min(r.core_percent_per_10k), hi.max(r.core_percent_per_10k)));
    let rss_max = [r.footprint.rss_after_start_kib, r.footprint.rss_after_storm_kib, r.footprint.rss_after_soak_kib]
        .into_iter()
        .max()
        .unwrap_or(0);
    vec![
        Verdict {
            name: "Churn",
            target: "observer ≥ 0.98 × no observer (median bracketed ratio)",
            measured: format!("{:.3} ×", ratio("observer")),
            met: ratio("observer") >= 0.98,
        },
        Verdict {
            name: "Churn",
            target: "default back end ≥ 0.97 × no observer (kernel-side cost)",
            measured: format!("{:.3} ×", ratio("observer")),
            met: ratio("observer") >= 0.97,
        },
        Verdict {
            name: "Churn",
            target: "observer ahead of bpftrace and tcplife",
            measured: format!(
                "observer {:.3} ×, bpftrace {:.3} ×, tcplife {:.3} ×",
                ratio("observer"),
                ratio("bpftrace"),
                ratio("tcplife")
            ),
            met: ratio("observer") > ratio("bpftrace") && ratio("observer") > ratio("tcplife"),
        },
        Verdict {
            name: "Reset storm",
            target: "zero lost at ≥ 200,000 events/s",
            measured: format!(
                "highest rate with zero lost: {}; all-out: {} lost at {:.0} events/s",
                best_lossless.map_or_else(|| "none".into(), |r| format!("{:.0} events/s", r.events_per_second)),
                r.storm.max.events_lost,
                r.storm.max.events_per_second
            ),
            met: best_lossless.is_some_and(|r| r.events_per_second >= 200_000.0),
        },
        Verdict {
            name: "Reset storm",
            target: "< 1 % of a core per 10,000 events/s",
            measured: format!("{:.2} – {:.2} % over the storm runs", cost.0, cost.1),
            met: cost.1 < 1.0,
        },
        Verdict {
            name: "Scrape",
            target: "p99 < 20 ms at 10,000 series",
            measured: ten_k.map_or_else(|| "not measured".into(), |l| format!("p99 {:.2} ms", l.p99_ms)),
            met: ten_k.is_some_and(|l| l.p99_ms < 20.0),
        },
        Verdict {
            name: "Footprint",
            target: "< 40 MB RSS (after start, storm, soak)",
            measured: format!(
                "at most {:.1} MB; transient peak (VmHWM) {:.1} MB",
                mb(rss_max),
                mb(r.footprint.peak_kib)
            ),
            met: mb(rss_max) < 40.0,
        },
        Verdict {
            name: "Footprint",
            target: "< 1 s start-up",
            measured: format!("median {:.0} ms, max {:.0} ms", r.startup.median_ms, r.startup.max_ms),
            met: r.startup.max_ms < 1000.0,
        },
        Verdict {
            name: "Soak",
            target: "RSS growth < 5 %",
            measured: format!("{:+.1} %", r.soak.rss_growth_percent),
            met: r.soak.rss_growth_percent < 5.0,
        },
        Verdict {
            name: "Soak",
            target: "event counts still exact",
            measured: format!(
                "{} of {} checks exact",
                r.soak.checks.iter().filter(|c| c.ok()).count(),
                r.soak.checks.len()
            ),
            met: r.soak.checks.iter().all(Check::ok),
        },
    ]
}

/// One line per target, for the terminal.
pub fn verdicts(r: &Results) -> Vec<String> {
    targets(r)
        .into_iter()
        .map(|v| format!("{} {}: {} — {}", if v.met { "met   " } else { "MISSED" }, v.name, v.target, v.measured))
        .collect()
}

pub fn markdown(r: &Results) -> String {
    let mut o = String::new();
    let m = &r.machine;
    let _ = writeln!(o, "# Benchmarks\n");
    if r.quick {
        let _ = writeln!(
            o,
            "**Quick run (`--quick`): short durations, for trying the benchmark out; not the published numbers.**\n"
        );
    }
    let _ = writeln!(
        o,
        "Written by `{}` from its raw results (`target/bench/results{}.json`). The numbers are published as \
         measured, from one run, with every comparison made side by side in that run.\n",
        r.command,
        if r.quick { "-quick" } else { "" }
    );
    let _ = writeln!(o, "| | |\n|---|---|");
    let _ = writeln!(o, "| date | {} |", m.date_utc);
    let _ = writeln!(o, "| machine | {}, {} cores, {} MiB RAM |", m.cpu_model, m.cores, m.ram_mib);
    let _ = writeln!(o, "| kernel | {} ({}) |", m.kernel, m.os);
    let _ = writeln!(
        o,
        "| observer | revision {} (daemon's `observer_build_info`); working tree {} |",
        r.observer_revision, m.git_revision
    );
    let _ = writeln!(o, "| build | `{}` |", r.build_command);
    let _ = writeln!(o);
    other_load(&mut o, r);

    let _ = writeln!(o, "## Summary\n");
    let _ = writeln!(o, "| benchmark | target | measured | |\n|---|---|---|---|");
    for v in targets(r) {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} |",
            v.name,
            v.target,
            v.measured,
            if v.met { "met" } else { "**missed**" }
        );
    }
    let _ = writeln!(o, "\nWhere a target is missed, [Analysis](#analysis) says why and what would close it.\n");

    churn(&mut o, r);
    storm(&mut o, r);
    scrape(&mut o, r);
    footprint(&mut o, r);
    soak(&mut o, r);
    micro(&mut o, r);
    diagnostics(&mut o, r);
    let _ = writeln!(o, "## Analysis\n");
    let _ = writeln!(o, "{}", ANALYSIS.trim());
    let _ = writeln!(o);
    commands(&mut o, r);
    o
}

fn other_load(o: &mut String, r: &Results) {
    let others: Vec<f64> = r.churn.runs.iter().map(|run| run.cpu.other).collect();
    let max_other = others.iter().copied().fold(0.0, f64::max);
    let mean_other = if others.is_empty() { 0.0 } else { others.iter().sum::<f64>() / others.len() as f64 };
    let one_minute: Vec<f64> =
        r.churn.runs.iter().filter_map(|run| run.loadavg_before.split_whitespace().next()?.parse().ok()).collect();
    let _ = writeln!(
        o,
        "Other load: this machine is shared. During the churn runs, other user-space processes (sampled from /proc \
         at both ends of each run) used {mean_other:.2} cores on average and {max_other:.2} at most, of {} (the \
         `other` column below). The 1-minute load average before the runs went from {:.2} to {:.2}; it counts the \
         benchmark's own threads. {}\n",
        r.machine.cores,
        one_minute.iter().copied().fold(f64::INFINITY, f64::min),
        one_minute.iter().copied().fold(0.0, f64::max),
        if max_other > 0.1 {
            "Other load was present; every tool run is compared with the baselines run just before and after it, \
             and the spread of those two shows how much it moved."
        } else {
            "No significant other load was seen."
        }
    );
    let max_steal = r.churn.runs.iter().map(|run| run.cpu.steal).fold(0.0, f64::max);
    if max_steal > 0.02 {
        let _ = writeln!(o, "The hypervisor stole up to {max_steal:.2} cores during a churn run.\n");
    }
    let held: Vec<String> = r
        .churn
        .runs
        .iter()
        .filter(|run| !run.other_bpf.is_empty())
        .map(|run| format!("churn round {} {}: {}", run.round + 1, run.arm, run.other_bpf.join(", ")))
        .chain(r.other_bpf.iter().cloned())
        .collect();
    if !held.is_empty() {
        let _ = writeln!(
            o,
            "**Other processes held BPF programs** (`pid comm`; on the same hooks, their programs slow whatever runs \
             then, the baseline included): {}.\n",
            held.join("; ")
        );
    }
}

fn churn(o: &mut String, r: &Results) {
    let c = &r.churn;
    let _ = writeln!(o, "## 1. Connection churn\n");
    let _ = writeln!(
        o,
        "A load generator (`bench-churn`, Rust, in observer-bench) opens loopback connections as fast as {} client threads \
         can, each sending a small request, reading the response and closing after the server ({} accepting threads, \
         SO_REUSEPORT listeners, server closes first); {:.0} s measured after {:.0} s of warm-up, in a fresh network \
         namespace per run. Arms: **none**; **observer** (`observer run --netns` on that namespace, default back end: BTF tracepoints where \
         the kernel allows them); **observer-http** (the same with `--http`: the HTTP/1.x capture, which sees every \
         request and response of this load); **observer-tracepoint** (the same with `--probes tracepoint`); \
         **observer-storage** (the same with `--socket-store storage`: per-socket state in socket-local storage); **bpftrace** \
         counting on the same six tracepoints; **tcplife** from libbpf-tools (one line per connection, read through \
         a pipe). Every tool run is bracketed by two runs with nothing attached (none, tool, none, tool, ..., \
         none; the tools' order rotates over {} rounds) and compared with the mean of those two, so other load \
         that comes and goes on this shared machine falls on both sides of each comparison. The targets are \
         judged on the median of these bracketed ratios.\n",
        c.clients, c.servers, c.seconds_per_run, c.warmup_seconds, c.rounds
    );
    let _ = writeln!(
        o,
        "| arm | runs | connections/s (pooled) | min | max | pooled ratio to none | **median bracketed ratio** | bracketed ratios, in run order | tool's own CPU (cores) |\n|---|---:|---:|---:|---:|---:|---:|---|---:|"
    );
    for s in &c.summary {
        let _ = writeln!(
            o,
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.3} | **{:.3}** | {} | {:.3} |",
            s.arm,
            s.runs,
            s.per_second,
            s.min,
            s.max,
            s.ratio,
            s.median_ratio,
            if s.arm == "none" {
                "—".to_string()
            } else {
                s.run_ratios.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>().join(", ")
            },
            s.tool_cores
        );
    }
    let _ = writeln!(
        o,
        "\nRaw runs (CPU in cores over the measured window, from each task's own account: machine is every task, \
         kernel threads included; other is other user-space processes; softirq, loopback packet processing, is \
         tick-sampled from /proc/stat, only indicative, and mostly also in the generator's account):\n"
    );
    let _ = writeln!(
        o,
        "| # | round | arm | load avg before | seconds | connections | connections/s | bracketing baselines' mean (spread) | ratio | machine CPU | softirq | generator | tool | other |\n|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for (i, run) in c.runs.iter().enumerate() {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {:.2} | {} | {:.0} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            i + 1,
            run.round + 1,
            run.arm,
            run.loadavg_before,
            run.seconds,
            run.connections,
            run.per_second,
            run.baseline
                .map_or_else(String::new, |b| format!("{b:.0} ({:.0} %)", run.baseline_spread.unwrap_or(0.0) * 100.0)),
            run.ratio.map_or_else(String::new, |x| format!("{x:.3}")),
            run.cpu.machine,
            run.cpu.softirq,
            run.cpu.load,
            run.cpu.tool,
            run.cpu.other
        );
    }
    let observer_runs: Vec<&ArmRun> = c.runs.iter().filter(|r| r.arm == "observer").collect();
    let _ = writeln!(o);
    for run in &observer_runs {
        for check in &run.checks {
            let _ = writeln!(
                o,
                "- observer, round {}: {} — expected {}, got {} ({}); events lost {}.",
                run.round + 1,
                check.what,
                check.expected,
                check.got,
                if check.ok() { "exact" } else { "**not exact**" },
                run.events_lost.unwrap_or(0)
            );
        }
    }
    for run in c.runs.iter().filter(|r| r.tool_output.is_some()) {
        let Some(out) = &run.tool_output else {
            continue;
        };
        let lost: Vec<&String> =
            out.stderr.head.iter().chain(&out.stderr.tail).filter(|l| l.contains("lost")).collect();
        if run.arm == "tcplife" {
            let _ = writeln!(
                o,
                "- tcplife, round {}: printed {} lines for {} connections in the window (plus warm-up and wind-down){}.",
                run.round + 1,
                out.stdout.lines,
                run.connections,
                if lost.is_empty() { String::new() } else { format!("; it reported lost events, e.g. `{}`", lost[0]) }
            );
        } else {
            let counts: Vec<&String> =
                out.stdout.head.iter().chain(&out.stdout.tail).filter(|l| l.starts_with('@')).collect();
            let _ = writeln!(
                o,
                "- bpftrace, round {}: {}.",
                run.round + 1,
                if counts.is_empty() {
                    "printed no counts".to_string()
                } else {
                    counts.iter().map(|l| format!("`{l}`")).collect::<Vec<_>>().join(", ")
                }
            );
        }
    }
    let _ = writeln!(o);
}

fn storm(o: &mut String, r: &Results) {
    let s = &r.storm.max;
    let _ = writeln!(o, "## 2. Reset storm\n");
    let _ = writeln!(
        o,
        "`bench-load` makes RSTs: {} threads connect to a closed port (the kernel answers each SYN with an RST: \
         RST sent with no socket, RST received, one close: 3 events), {} thread(s) connect to a server that accepts \
         and closes with SO_LINGER 0 (RST sent, RST received, two closes: 4 events). The daemon (default flags, \
         `--netns`) runs throughout; its CPU time is counted until its counters stop moving, so draining a \
         backlog is included. First paced, {:.0} s per rate, stepping up until events are lost or the machine \
         cannot make the rate; then all-out for {:.0} s.\n",
        s.refused_threads, s.linger_threads, r.plan.storm_sweep_seconds, s.seconds
    );
    let _ = writeln!(
        o,
        "| run | events/s made | resets/s | events made | seen | lost | daemon CPU in window | daemon % of a core per 10,000 events/s | daemon context switches per event | machine CPU (generator, softirq, other) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for run in r.storm.sweep.iter().chain([s]) {
        let _ = writeln!(
            o,
            "| {} | {:.0} | {:.0} | {} | {} | {} | {:.0} % | {:.2} | {:.3} | {:.2} ({:.2}, {:.2}, {:.2}) |",
            run.target_events_per_second.map_or_else(|| "all-out".into(), |t| format!("paced at {t:.0}/s")),
            run.events_per_second,
            run.resets_per_second,
            run.events_expected,
            run.events_seen,
            run.events_lost,
            run.cpu.tool * 100.0,
            run.core_percent_per_10k,
            run.daemon_switches_per_event,
            run.cpu.machine,
            run.cpu.load,
            run.cpu.softirq,
            run.cpu.other
        );
    }
    let _ = writeln!(o, "\nThe all-out run in detail:\n");
    let _ = writeln!(o, "| | |\n|---|---:|");
    let _ = writeln!(o, "| refused connects in the window | {} |", s.window.refused);
    let _ = writeln!(o, "| SO_LINGER 0 connections in the window | {} |", s.window.linger0);
    let _ = writeln!(o, "| resets made (whole run, warm-up included) | {} |", s.resets_made);
    let _ = writeln!(o, "| events made (whole run) | {} |", s.events_expected);
    let _ = writeln!(o, "| events seen | {} |", s.events_seen);
    let _ = writeln!(o, "| events lost | {} |", s.events_lost);
    let _ = writeln!(
        o,
        "| events seen, by probe | {} |",
        s.events_by_probe
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(p, n)| format!("{p} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(o, "| daemon CPU during the window | {:.1} % of a core |", s.cpu.tool * 100.0);
    let _ = writeln!(
        o,
        "| daemon CPU, whole run incl. draining | {:.2} s ({:.2} s draining after the traffic) |",
        s.daemon_cpu_seconds, s.drain_seconds
    );
    let _ = writeln!(
        o,
        "| generator errors | {}{} |",
        s.generator_errors,
        s.first_generator_error.as_ref().map_or(String::new(), |e| format!(" (first: {e})"))
    );
    let _ = writeln!(o);
    checks(o, "Counts against what was made (all-out run, whole run)", &s.checks);
    if s.events_lost > 0 {
        let _ = writeln!(
            o,
            "Events were lost, so the per-connection counts fall short of what was made by design: a lost event is \
             counted in `observer_events_lost_total`, never guessed. The first check (seen + lost = made) is the one \
             that must hold.\n"
        );
    }
}

fn scrape(o: &mut String, r: &Results) {
    let s = &r.scrape;
    let _ = writeln!(o, "## 3. Scrape latency\n");
    let _ = writeln!(
        o,
        "`GET /metrics` on a new connection, timed from connect to the last byte, every {} ms while `bench-scrape` \
         keeps making graceful connections at {} per second over the same (port, client address) pairs, so events \
         flow and normally add no series. The series are made on purpose: one connection from each of 99 client \
         addresses to each of P server ports gives 99 P server-side and P client-side series in each of the two \
         families a graceful connection counts in (closes and connections opened), 200 P in all (the daemon's \
         `observer_series` gauge is checked, and shown). Daemon: `{}`.\n",
        s.interval_ms, s.background_rate, s.daemon_command
    );
    let _ = writeln!(
        o,
        "| series | exported (`observer_series`) | scrapes | body bytes | p50 ms | p99 ms | max ms | mean ms | events/s flowing | events lost | daemon CPU per scrape, no traffic (ms) |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for l in &s.levels {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {} | {:.2} |",
            l.series,
            l.series_exported,
            l.scrapes,
            l.body_bytes,
            l.p50_ms,
            l.p99_ms,
            l.max_ms,
            l.mean_ms,
            l.events_per_second,
            l.events_lost,
            l.cpu_ms_per_scrape
        );
    }
    for l in s.levels.iter().filter(|l| !l.extra_series.is_empty()) {
        let _ = writeln!(
            o,
            "\nAt {} series the background traffic added series: {} (connections that did not end \
             gracefully on the busy loopback, counted where they belong).",
            l.series,
            l.extra_series.join(", ")
        );
    }
    if let [small, big] = s.levels.as_slice() {
        let _ = writeln!(
            o,
            "\n10,000 over 1,000 series: p50 {:.1} ×, p99 {:.1} ×.",
            big.p50_ms / small.p50_ms,
            big.p99_ms / small.p99_ms
        );
    }
    let _ = writeln!(o);
}

fn footprint(o: &mut String, r: &Results) {
    let f = &r.footprint;
    let st = &r.startup;
    let _ = writeln!(o, "## 4. Footprint\n");
    let _ = writeln!(
        o,
        "Start-up: `{}` started {} times, timed from spawn to the first `200` from `/healthz` (all probes attached), \
         polled every 2 ms.\n",
        st.command,
        st.ms.len()
    );
    let _ = writeln!(
        o,
        "| start | to /healthz 200 (ms) | to the \"ready\" log line (ms) | RSS 1 s later (MB) |\n|---:|---:|---:|---:|"
    );
    for (i, ms) in st.ms.iter().enumerate() {
        let logged = st.ready_logged_ms.get(i).copied().flatten().map_or_else(|| "—".into(), |v| format!("{v:.0}"));
        let rss = st.rss_kib.get(i).map_or_else(|| "—".into(), |k| format!("{:.1}", mb(*k)));
        let _ = writeln!(o, "| {} | {ms:.0} | {logged} | {rss} |", i + 1);
    }
    let _ =
        writeln!(o, "\nMedian {:.0} ms, max {:.0} ms. The daemon's log of the first start:\n", st.median_ms, st.max_ms);
    let _ = writeln!(o, "```");
    for line in &st.log {
        let _ = writeln!(o, "{line}");
    }
    let _ = writeln!(o, "```\n");
    let _ = writeln!(o, "Memory of one daemon (`{}`) through the storm and the soak (VmRSS):\n", f.daemon_command);
    let _ = writeln!(o, "| when | RSS (MB) | KiB |\n|---|---:|---:|");
    let _ = writeln!(o, "| after start | {:.1} | {} |", mb(f.rss_after_start_kib), f.rss_after_start_kib);
    let _ = writeln!(o, "| after the storm | {:.1} | {} |", mb(f.rss_after_storm_kib), f.rss_after_storm_kib);
    let _ = writeln!(
        o,
        "| after the soak ({:.0} s of steady load) | {:.1} | {} |",
        r.soak.seconds,
        mb(f.rss_after_soak_kib),
        f.rss_after_soak_kib
    );
    let _ = writeln!(o, "| peak (VmHWM) | {:.1} | {} |", mb(f.peak_kib), f.peak_kib);
    let _ = writeln!(o, "\n(MB = 10⁶ bytes.) Where it is (KiB):\n");
    let _ = writeln!(
        o,
        "| when | VmRSS | anonymous (heap) | file-backed and mapped | of which BPF maps (ring buffer mapped twice) |\n|---|---:|---:|---:|---:|"
    );
    for (when, b) in &f.breakdown {
        let _ = writeln!(o, "| {when} | {} | {} | {} | {} |", b.rss, b.anon, b.file, b.bpf_maps);
    }
    let _ = writeln!(o);
}

fn soak(o: &mut String, r: &Results) {
    let s = &r.soak;
    let _ = writeln!(o, "## Soak\n");
    let _ = writeln!(
        o,
        "Right after the storm, the same daemon watches {:.0} s of mixed traffic from `bench-load`: graceful, \
         SO_LINGER 0, unread-data and refused connections, {} per second of each ({:.0} connections/s made, {:.0} \
         events/s). RSS is read every {:.0} s.\n",
        s.seconds, s.rate_per_kind, s.connections_per_second, s.events_per_second, r.plan.soak_sample_seconds
    );
    let _ = writeln!(
        o,
        "RSS at the start {} KiB, at the end {} KiB ({:+.2} %), highest {} KiB. Daemon CPU {:.1} % of a core; \
         machine {:.2} cores. Generator errors: {}{}.\n",
        s.rss_start_kib,
        s.rss_end_kib,
        s.rss_growth_percent,
        s.rss_max_kib,
        s.cpu.tool * 100.0,
        s.cpu.machine,
        s.generator_errors,
        s.first_generator_error.as_ref().map_or(String::new(), |e| format!(" (first: {e})"))
    );
    let per_minute: Vec<String> = s
        .rss_kib
        .iter()
        .filter(|(t, _)| {
            (*t / 60.0).fract() < r.plan.soak_sample_seconds / 60.0 - 1e-9
                || *t == s.rss_kib.last().map_or(0.0, |l| l.0)
        })
        .map(|(t, k)| format!("{t:.0} s: {k}"))
        .collect();
    let _ = writeln!(o, "RSS (KiB) over time: {}.\n", per_minute.join(", "));
    checks(o, &format!("Counts against what was made ({} connections)", s.total.connections()), &s.checks);
}

/// The in-process benchmarks of the userspace hot path (criterion), when they ran.
fn micro(o: &mut String, r: &Results) {
    let m = &r.micro;
    if m.benches.is_empty() {
        return;
    }
    let _ = writeln!(o, "## The userspace hot path, in process\n");
    let _ = writeln!(
        o,
        "`{}` (criterion) on the same machine, just before the benchmarks above: records built with the \
         kernel's layout, no kernel and no I/O. The event benchmarks feed 10,000 records of a proxy-like mix (70 % \
         graceful closes, 10 % each resets received, resets sent and peer-reset closes; 40 peers on 8 ports); the \
         render benchmarks write `/metrics` with 50 peers per port. Medians with their 95 % confidence interval.\n",
        m.command
    );
    let _ = writeln!(o, "| benchmark | what | median | 95 % CI |\n|---|---|---|---|");
    for b in &m.benches {
        let (value, low, high, unit) = if b.unit == "event" {
            let n = b.elements.max(1) as f64;
            (b.ns_per_unit(), b.median_low_ns / n, b.median_high_ns / n, "ns per event")
        } else {
            (b.median_ns / 1e6, b.median_low_ns / 1e6, b.median_high_ns / 1e6, "ms per render")
        };
        let _ = writeln!(o, "| `{}` | {} | {value:.2} {unit} | {low:.2} – {high:.2} |", b.id, b.what);
    }
    let _ = writeln!(o);
}

fn diagnostics(o: &mut String, r: &Results) {
    let d = &r.diagnostics;
    if d.churn_programs.is_empty() {
        return;
    }
    let _ = writeln!(o, "## Where the cost goes\n");
    // The no-observer arm's CPU per connection, for scale.
    let none: Vec<&ArmRun> = r.churn.runs.iter().filter(|run| run.arm == "none").collect();
    let per_connection_us =
        none.iter().map(|run| run.cpu.machine / run.per_second * 1e6).sum::<f64>() / none.len().max(1) as f64;
    let _ = writeln!(
        o,
        "After the benchmarks, one more churn run per tool ({:.0} s, same load) with the kernel's BPF statistics on \
         (`kernel.bpf_stats_enabled`, which adds a clock read to each program run; off everywhere else), read from \
         each tool's own program descriptors. For scale: with nothing attached, a churn connection cost the machine \
         {per_connection_us:.1} µs of CPU in all (busy cores over connections per second in the `none` runs).\n",
        r.plan.diagnose_seconds
    );
    o.push_str(&program_costs(d));
    let _ = writeln!(o);
}

/// The per-program cost table of a diagnostics run (also what `--cost` prints).
pub fn program_costs(d: &Diagnostics) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "| tool | program | runs per connection | mean ns per run | ns per connection | verified insns | xlated / jited bytes |\n|---|---|---:|---:|---:|---:|---:|"
    );
    for t in &d.churn_programs {
        for p in &t.programs {
            let _ = writeln!(
                o,
                "| {} | `{}` | {:.2} | {:.0} | {:.0} | {} | {} / {} |",
                t.tool,
                p.name,
                p.runs_per_connection,
                p.mean_ns,
                p.ns_per_connection,
                p.verified_insns,
                p.bytes_xlated,
                p.bytes_jited
            );
        }
        let _ = writeln!(o, "| {} | **all** | | | **{:.0}** | | |", t.tool, t.ns_per_connection);
    }
    o
}

fn checks(o: &mut String, title: &str, checks: &[Check]) {
    let _ = writeln!(o, "{title}:\n");
    let _ = writeln!(o, "| count | expected | daemon | |\n|---|---:|---:|---|");
    for c in checks {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} |",
            c.what.replace('|', "\\|"),
            c.expected,
            c.got,
            if c.ok() { "exact" } else { "**differs**" }
        );
    }
    let _ = writeln!(o);
}

fn commands(o: &mut String, r: &Results) {
    let _ = writeln!(o, "## Commands\n");
    let _ = writeln!(o, "- benchmark: `{}` (as root)", r.command);
    let _ = writeln!(o, "- build: `{}`", r.build_command);
    let _ = writeln!(o, "- load generators: {}", r.worker_command);
    let _ = writeln!(o, "- start-up: `{}`", r.startup.command);
    let _ = writeln!(
        o,
        "- churn, observer arm: `observer run --listen 127.0.0.1:PORT --netns /proc/PID/ns/net` (PID: the run's load generator)"
    );
    let _ =
        writeln!(o, "- churn, bpftrace arm: `bpftrace -e SCRIPT` with SCRIPT:\n\n```\n{}\n```\n", r.bpftrace_script);
    let _ = writeln!(o, "- churn, tcplife arm: `tcplife` (libbpf-tools), stdout read through a pipe and counted");
    let _ = writeln!(o, "- scrape: `{}`", r.scrape.daemon_command);
    let _ = writeln!(o, "- storm, soak, footprint: `{}`", r.footprint.daemon_command);
    let _ = writeln!(o, "- plan: `{}`", serde_json::to_string(&r.plan).unwrap_or_default());
    let _ = writeln!(
        o,
        "\nRaw numbers, including every scrape's latency and every RSS sample: `target/bench/results{}.json`.",
        if r.quick { "-quick" } else { "" }
    );
    if !r.daemon_log.is_empty() {
        let warnings: Vec<&String> =
            r.daemon_log.iter().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
        if !warnings.is_empty() {
            let _ = writeln!(o, "\nWarnings in the storm/soak daemon's log:\n\n```");
            for w in warnings {
                let _ = writeln!(o, "{w}");
            }
            let _ = writeln!(o, "```");
        }
    }
}
