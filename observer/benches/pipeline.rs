//! In-process benchmarks of the daemon's userspace hot path (`cargo xtask bench` runs them and
//! BENCHMARKS.md records them): what one ring buffer record costs from bytes to counted
//! (`decode` → `classify` → `attribution` → `aggregate`, with and without the metrics and the
//! event log around it), and what rendering `/metrics` costs at 1,000 and 10,000 series.
//!
//! No kernel, no privileges: the records are built here with the layout the kernel programs
//! write (`observer_common::SocketEvent`).

use std::{
    hint::black_box,
    sync::{Arc, Mutex},
};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use observer::{
    aggregate::{Aggregator, Limits},
    attribution::Attribution,
    classify::classify,
    container::CgroupResolver,
    decode::{Record, decode},
    exposition,
    pipeline::Pipeline,
    reasons::ResetReasons,
    state::DaemonState,
};
use observer_common::{ConnectionFacts, Endpoints, EventKind, Owner, ProbeId, Role, SocketEvent, flags, tcp_state};

/// The kernel's reset reasons on 6.18 (the two the records use).
fn reasons() -> ResetReasons {
    ResetReasons::from_pairs([(1, "SK_RST_REASON_NO_SOCKET"), (11, "SK_RST_REASON_TCP_ABORT_ON_CLOSE")])
}

fn attribution() -> Attribution {
    // No cgroup ids in the records: the resolver is never asked.
    Attribution::new(32768..=60999, Arc::new(Mutex::new(CgroupResolver::without_mount())), Default::default())
}

fn v4(a: [u8; 4]) -> [u8; 16] {
    std::net::Ipv4Addr::from(a).to_ipv6_mapped().octets()
}

/// Event `i`, of shape `shape % 10` in a mix like a busy proxy's (mostly graceful closes, some
/// resets sent and received, some premature closes), towards remote address `peer` on service
/// port `8000 + port`.
fn record(i: u32, shape: u32, peer: u32, port: u32) -> Vec<u8> {
    let mut comm = [0u8; 16];
    comm[..5].copy_from_slice(b"nginx");
    let (kind, probe, flags, state) = match shape % 10 {
        0 => (EventKind::ResetReceived, ProbeId::TcpReceiveReset, flags::RESET_RECEIVED, tcp_state::ESTABLISHED),
        1 => (EventKind::ResetSent, ProbeId::TcpSendReset, flags::RESET_SENT, tcp_state::ESTABLISHED),
        2 => (EventKind::ConnectionClosed, ProbeId::InetSockSetState, flags::RESET_RECEIVED, tcp_state::ESTABLISHED),
        _ => (EventKind::ConnectionClosed, ProbeId::TcpDestroySock, 0, tcp_state::LAST_ACK),
    };
    let event = SocketEvent {
        kind: kind as u16,
        probe: probe as u16,
        role: Role::Client as u8,
        state,
        flags: flags | flags::OWNER_FROM_SYSCALL,
        timestamp_ns: u64::from(i) * 1_000,
        sk: 0xffff_8881_0000_0000 + u64::from(i) * 2048,
        endpoints: Endpoints {
            local_addr: v4([10, 0, 0, 1]),
            remote_addr: v4([10, 1, (peer >> 8) as u8, peer as u8]),
            local_port: 40_000 + (i % 20_000) as u16,
            remote_port: 8000 + port as u16,
            family: observer_common::AF_INET,
            _pad: 0,
        },
        owner: Owner { cgroup_id: 0, tgid: 4711, comm, _pad: 0 },
        reason: 11,
        facts: ConnectionFacts {
            duration_ns: 2_000_000,
            bytes_received: 4096,
            bytes_sent: 512,
            srtt_us: 40,
            data_segs_in: 3,
            data_segs_out: 1,
            states_seen: (1 << tcp_state::ESTABLISHED) | (1 << tcp_state::CLOSE_WAIT),
            ..ConnectionFacts::default()
        },
        ..SocketEvent::default()
    };
    bytes_of(&event)
}

/// The bytes of one record as the kernel writes them.
fn bytes_of(event: &SocketEvent) -> Vec<u8> {
    // SAFETY: SocketEvent is repr(C), plain old data without padding (observer-common's layout
    // tests pin this).
    unsafe { std::slice::from_raw_parts((event as *const SocketEvent).cast::<u8>(), size_of::<SocketEvent>()) }.to_vec()
}

fn records(n: u32) -> Vec<Vec<u8>> {
    // 40 peers on 8 ports.
    (0..n).map(|i| record(i, i, i % 40, i % 8)).collect()
}

/// Connections in the churn case: enough that the event log's closers (one per connection,
/// the FIN closer's) fill their table to its bound and every new one evicts the oldest, as at
/// 16,000 connections/s, where two seconds of closers are 32,000.
const CHURN_CONNECTIONS: u32 = 40_000;

/// A cgroup tree with one cgroup, standing in for the cgroup2 mount: its id (the inode) resolves
/// from the cache after the first event, as a live workload's cgroup does.
fn churn_cgroup() -> (Attribution, u64) {
    use std::os::unix::fs::MetadataExt as _;
    let root = std::env::temp_dir().join(format!("observer-bench-cgroup-{}", std::process::id()));
    let cgroup = root.join("churn.scope");
    std::fs::create_dir_all(&cgroup).expect("creating the bench's cgroup tree in the temp dir");
    let id = std::fs::metadata(&cgroup).expect("the bench's cgroup dir exists").ino();
    let resolver = Arc::new(Mutex::new(CgroupResolver::with_root(root)));
    (Attribution::new(32768..=60999, resolver, Default::default()), id)
}

/// Loopback connection churn, as a load generator makes it: connection `c` is opened (the
/// client's connect and the server's accept), one request and response cross, the client closes
/// first with a FIN and then the server: four events, every close graceful, every flow distinct
/// (client addresses 127.0.x.y, ports 32768..60999), one event every 15.6 µs (16,000
/// connections/s).
fn churn_records(connections: u32, cgroup_id: u64) -> Vec<Vec<u8>> {
    const CONNECTION_NS: u64 = 62_500;
    let server = (v4([127, 0, 0, 1]), 8080u16);
    let ports = 60_999 - 32_768 + 1;
    let mut out = Vec::with_capacity(connections as usize * 4);
    for c in 0..connections {
        let client = (v4([127, 0, (c / ports / 256) as u8, 2 + (c / ports % 250) as u8]), (32_768 + c % ports) as u16);
        let opened_ns = u64::from(c) * CONNECTION_NS;
        let sk = 0xffff_8881_0000_0000 + u64::from(c) * 4096;
        let event = |kind: EventKind,
                     probe: ProbeId,
                     role: Role,
                     at: u64,
                     sk: u64,
                     local: ([u8; 16], u16),
                     remote: ([u8; 16], u16),
                     comm: &[u8],
                     states: &[u8],
                     state: u8| {
            let mut comm_bytes = [0u8; 16];
            comm_bytes[..comm.len()].copy_from_slice(comm);
            let closed = kind == EventKind::ConnectionClosed;
            SocketEvent {
                kind: kind as u16,
                probe: probe as u16,
                role: role as u8,
                state,
                flags: flags::OWNER_FROM_SYSCALL,
                timestamp_ns: opened_ns + at,
                sk,
                endpoints: Endpoints {
                    local_addr: local.0,
                    local_port: local.1,
                    remote_addr: remote.0,
                    remote_port: remote.1,
                    family: observer_common::AF_INET,
                    _pad: 0,
                },
                owner: Owner {
                    cgroup_id,
                    tgid: if role == Role::Client { 4711 } else { 4712 },
                    comm: comm_bytes,
                    _pad: 0,
                },
                facts: if closed {
                    ConnectionFacts {
                        duration_ns: 40_000,
                        bytes_received: 128,
                        bytes_sent: 128,
                        srtt_us: 10,
                        data_segs_in: 1,
                        data_segs_out: 1,
                        states_seen: states.iter().fold(0, |seen, s| seen | 1 << s),
                        ..ConnectionFacts::default()
                    }
                } else {
                    ConnectionFacts::default()
                },
                ..SocketEvent::default()
            }
        };
        use tcp_state::{CLOSE_WAIT, ESTABLISHED, FIN_WAIT1, FIN_WAIT2, LAST_ACK, TIME_WAIT};
        let (opened, closed) = (EventKind::ConnectionOpened, EventKind::ConnectionClosed);
        for e in [
            event(opened, ProbeId::InetSockSetState, Role::Client, 0, sk, client, server, b"loadgen", &[], ESTABLISHED),
            event(
                opened,
                ProbeId::InetSockSetState,
                Role::Server,
                1_000,
                sk + 2048,
                server,
                client,
                b"server",
                &[],
                ESTABLISHED,
            ),
            // The client closes first: FIN_WAIT1 and not CLOSE_WAIT, the closer the event log keeps.
            event(
                closed,
                ProbeId::InetSockSetState,
                Role::Client,
                40_000,
                sk,
                client,
                server,
                b"loadgen",
                &[ESTABLISHED, FIN_WAIT1, FIN_WAIT2, TIME_WAIT],
                TIME_WAIT,
            ),
            event(
                closed,
                ProbeId::InetSockSetState,
                Role::Server,
                41_000,
                sk + 2048,
                server,
                client,
                b"server",
                &[ESTABLISHED, CLOSE_WAIT, LAST_ACK],
                LAST_ACK,
            ),
        ] {
            out.push(bytes_of(&e));
        }
    }
    out
}

/// Per event: the whole daemon path (metrics with the prometheus histograms, the event log with
/// its cause pairing), and the core alone (decode → classify → attribution → aggregate).
fn per_event(c: &mut Criterion) {
    let records = records(10_000);
    let mut group = c.benchmark_group("event");
    group.throughput(Throughput::Elements(records.len() as u64));
    group.bench_function("pipeline", |b| {
        let state = Arc::new(DaemonState::new("bench".into(), Limits::default(), Default::default()));
        let mut pipeline = Pipeline::new(reasons(), attribution(), state);
        b.iter(|| {
            for r in &records {
                pipeline.handle(black_box(r));
            }
        });
    });
    let (churn_attribution, cgroup_id) = churn_cgroup();
    let churn = churn_records(CHURN_CONNECTIONS, cgroup_id);
    group.throughput(Throughput::Elements(churn.len() as u64));
    group.bench_function("churn_pipeline", |b| {
        let state = Arc::new(DaemonState::new("bench".into(), Limits::default(), Default::default()));
        let mut pipeline = Pipeline::new(reasons(), churn_attribution.clone(), state.clone());
        b.iter(|| {
            for r in &churn {
                pipeline.handle(black_box(r));
            }
        });
        assert_eq!(state.event_log().page(0, 1).events.len(), 0, "every close in the churn is graceful");
    });
    group.throughput(Throughput::Elements(records.len() as u64));
    group.bench_function("decode_classify_aggregate", |b| {
        let (reasons, attribution) = (reasons(), attribution());
        let mut aggregator = Aggregator::with_limits(Limits::default());
        b.iter(|| {
            for r in &records {
                let Ok(Record::Event(event)) = decode(black_box(r)) else { continue };
                let outcome = classify(&event, &reasons, None);
                let attributed = attribution.attribute(&event);
                aggregator.count(outcome, attributed.key, &event.raw.facts);
            }
        });
    });
    group.finish();
}

/// `/metrics` with `series` per-connection series (and the daemon's own metrics).
fn scrape(c: &mut Criterion) {
    let mut group = c.benchmark_group("render_metrics");
    for series in [1_000u32, 10_000] {
        let state = Arc::new(DaemonState::new("bench".into(), Limits::default(), Default::default()));
        let mut pipeline = Pipeline::new(reasons(), attribution(), state.clone());
        // Graceful closes only, one series each: 50 peers (the default --max-peers) per port.
        for i in 0..series {
            pipeline.handle(&record(i, 3, i % 50, i / 50));
        }
        assert_eq!(state.metrics.series(), (series as usize, 0), "one series per close, none folded");
        group.throughput(Throughput::Elements(u64::from(series)));
        group.bench_with_input(BenchmarkId::from_parameter(series), &state, |b, state| {
            b.iter(|| black_box(exposition::render(&state.metrics, &Default::default(), &[])));
        });
    }
    group.finish();
}

criterion_group!(benches, per_event, scrape);
criterion_main!(benches);
