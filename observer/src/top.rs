//! Rates per row (`/api/v1/top`, `observer top`), computed in the daemon from its own counts,
//! never from two scrapes.
//!
//! A row is a series key without its family's detail: who (`comm`, container), in which role,
//! with which peer, on which port. Every [`TICK`] a task beside the event path copies the
//! per-connection families out of the [`Aggregator`] (under its lock, a copy and nothing more)
//! and [`Rates::sample`] keeps, per tick, what each row counted since the previous tick. At most
//! [`HISTORY_TICKS`] ticks are kept, and at most [`MAX_HISTORY_ENTRIES`] row deltas in all (rows
//! are bounded by `--max-series` already; a busier history keeps fewer ticks): the rate over an
//! interval is the sum of the deltas of the newest ticks that cover it, divided by the time
//! between those ticks' ends. Rows are as fresh as the newest tick (at most one tick old).

use std::{
    collections::{BTreeMap, VecDeque},
    time::{Duration, Instant},
};

use crate::{
    HashMap,
    aggregate::{Aggregator, Family},
    api::{PodLabels, TopReport, TopRow, TopSort},
    classify::PrematureClose,
    pods::PodNames,
    series::{Label, SeriesKey, role_text},
};

/// How often the daemon snapshots its counts.
pub const TICK: Duration = Duration::from_secs(1);

/// Ticks of history: the longest interval rates are asked over is this many ticks.
pub const HISTORY_TICKS: usize = 60;

/// Row deltas kept in all (each about 100 bytes): past it, the oldest ticks go first.
pub const MAX_HISTORY_ENTRIES: usize = 100_000;

/// The longest interval `/api/v1/top` accepts.
pub const MAX_INTERVAL: Duration = Duration::from_secs(HISTORY_TICKS as u64);

/// The shortest interval `/api/v1/top` accepts: one tick.
pub const MIN_INTERVAL: Duration = TICK;

/// Rows `/api/v1/top` returns without `limit=`, and the most it returns.
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 10_000;

/// The parameters of `/api/v1/top` (`interval=2s&sort=resets_in&limit=N`, each optional), or
/// the message of a 400 naming the parameter and what it allows.
pub fn parse_query(
    interval: Option<&str>,
    sort: Option<&str>,
    limit: Option<&str>,
) -> Result<(Duration, TopSort, usize), String> {
    let interval = match interval {
        None => Duration::from_secs(2),
        Some(s) => humantime::parse_duration(s)
            .ok()
            .filter(|d| (MIN_INTERVAL..=MAX_INTERVAL).contains(d))
            .ok_or_else(|| format!("interval: `{s}` is not a duration from 1s to 60s (e.g. 2s, 1500ms, 1m)"))?,
    };
    let sort = match sort {
        None => TopSort::default(),
        Some(s) => TopSort::parse(s).ok_or_else(|| format!("sort: `{s}` is not one of {}", TopSort::allowed()))?,
    };
    let limit = match limit {
        None => DEFAULT_LIMIT,
        Some(s) => s
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| format!("limit: `{s}` is not a number of rows from 1 to {MAX_LIMIT}"))?,
    };
    Ok((interval, sort, limit))
}

/// Slots of premature counts: a kind's index is its discriminant (1..=8), 0 an unknown kind.
const KINDS: usize = 9;

/// What a row counted: a total (u64) or one tick's delta.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts<T> {
    pub resets_in: T,
    pub resets_out: T,
    pub closes: T,
    pub opened: T,
    pub premature: [T; KINDS],
}

type Totals = Counts<u64>;
/// One tick's counts of a row fit in 32 bits (4 billion events a second).
type Delta = Counts<u32>;

impl Totals {
    fn slot(&mut self, family: Family, detail: u32) -> Option<&mut u64> {
        match family {
            Family::ResetsReceived => Some(&mut self.resets_in),
            // Every reason summed.
            Family::ResetsSent => Some(&mut self.resets_out),
            Family::Closes => Some(&mut self.closes),
            Family::PrematureCloses => {
                let i = PrematureClose::from_index(detail).map_or(0, |k| k as usize);
                self.premature.get_mut(i)
            }
            Family::Opened => Some(&mut self.opened),
            Family::Retransmits => None,
        }
    }

    /// What was counted since `before` (a row that was removed and came back starts lower: 0).
    fn since(&self, before: &Totals) -> Delta {
        let d = |now: u64, then: u64| u32::try_from(now.saturating_sub(then)).unwrap_or(u32::MAX);
        let mut premature = [0; KINDS];
        for (i, p) in premature.iter_mut().enumerate() {
            *p = d(self.premature[i], before.premature[i]);
        }
        Counts {
            resets_in: d(self.resets_in, before.resets_in),
            resets_out: d(self.resets_out, before.resets_out),
            closes: d(self.closes, before.closes),
            opened: d(self.opened, before.opened),
            premature,
        }
    }
}

impl Delta {
    fn is_zero(&self) -> bool {
        *self == Self::default()
    }
}

impl Totals {
    fn add(&mut self, d: &Delta) {
        self.resets_in += u64::from(d.resets_in);
        self.resets_out += u64::from(d.resets_out);
        self.closes += u64::from(d.closes);
        self.opened += u64::from(d.opened);
        for (p, q) in self.premature.iter_mut().zip(d.premature) {
            *p += u64::from(q);
        }
    }
}

/// The row of a series: its key without the family's detail.
fn row_of(key: &SeriesKey) -> SeriesKey {
    SeriesKey { detail: 0, ..*key }
}

/// One family's series, as copied out of the aggregator.
pub type Copied = Vec<(Family, SeriesKey, u64)>;

/// Copies what rates need out of the aggregator: the caller holds its lock for this only.
pub fn copy(agg: &Aggregator, into: &mut Copied) {
    into.clear();
    for family in [Family::ResetsReceived, Family::ResetsSent, Family::Closes, Family::PrematureCloses, Family::Opened]
    {
        into.extend(agg.counted_here(family).map(|(k, v)| (family, *k, v)));
    }
}

struct Tick {
    at: Instant,
    /// Rows that counted something since the previous tick.
    deltas: Vec<(SeriesKey, Delta)>,
}

/// Per-row counts over the last [`HISTORY_TICKS`] ticks.
#[derive(Default)]
pub struct Rates {
    /// Per row, its totals at the newest tick.
    totals: HashMap<SeriesKey, Totals>,
    ticks: VecDeque<Tick>,
    entries: usize,
}

/// Rates over a window, per row.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    /// Between the ends of the first and the last tick of the window (0: not two ticks yet).
    pub seconds: f64,
    /// Per row, what it counted in the window (rows that counted nothing are left out).
    pub counts: Vec<(SeriesKey, Totals)>,
}

impl Rates {
    /// Takes a tick at `at` of the aggregator's series as [`copy`] copied them.
    pub fn sample(&mut self, at: Instant, series: &Copied) {
        let mut totals: HashMap<SeriesKey, Totals> = HashMap::default();
        totals.reserve(self.totals.len());
        for &(family, key, value) in series {
            if let Some(slot) = totals.entry(row_of(&key)).or_default().slot(family, key.detail) {
                *slot += value;
            }
        }
        // The first tick is where the first window starts: nothing counted before it is a rate.
        let deltas = if self.ticks.is_empty() {
            Vec::new()
        } else {
            let zero = Totals::default();
            totals
                .iter()
                .map(|(row, now)| (*row, now.since(self.totals.get(row).unwrap_or(&zero))))
                .filter(|(_, d)| !d.is_zero())
                .collect()
        };
        self.totals = totals;
        self.entries += deltas.len();
        self.ticks.push_back(Tick { at, deltas });
        // One tick more than the history: the oldest is where the longest window starts.
        while self.ticks.len() > HISTORY_TICKS + 1 || (self.entries > MAX_HISTORY_ENTRIES && self.ticks.len() > 2) {
            if let Some(old) = self.ticks.pop_front() {
                self.entries -= old.deltas.len();
            }
        }
    }

    /// Counts per row over the newest ticks that cover `interval` (whole ticks; fewer while the
    /// history is shorter).
    pub fn window(&self, interval: Duration) -> Window {
        let ticks = interval.as_nanos().div_ceil(TICK.as_nanos().max(1)).max(1);
        let back = usize::try_from(ticks).unwrap_or(usize::MAX).min(self.ticks.len().saturating_sub(1));
        let (Some(last), Some(first)) =
            (self.ticks.back(), self.ticks.len().checked_sub(back + 1).and_then(|i| self.ticks.get(i)))
        else {
            return Window { seconds: 0.0, counts: Vec::new() };
        };
        let mut sums: HashMap<SeriesKey, Totals> = HashMap::default();
        for tick in self.ticks.iter().skip(self.ticks.len() - back) {
            for (row, d) in &tick.deltas {
                sums.entry(*row).or_default().add(d);
            }
        }
        Window { seconds: last.at.duration_since(first.at).as_secs_f64(), counts: sums.into_iter().collect() }
    }

    /// The report of `/api/v1/top`: rows with their rates over `interval`, sorted by `sort`
    /// (highest first), at most `limit`. `pods` names the containers' pods.
    pub fn report(&self, interval: Duration, sort: TopSort, limit: usize, pods: &PodNames) -> TopReport {
        let window = self.window(interval);
        let per_s = |n: u64| if window.seconds > 0.0 { n as f64 / window.seconds } else { 0.0 };
        let mut rows: Vec<TopRow> = window
            .counts
            .iter()
            .map(|(key, c)| {
                let pod = pods.get(&key.container);
                let mut premature_by_kind = BTreeMap::new();
                for (i, n) in c.premature.iter().enumerate().filter(|(_, n)| **n > 0) {
                    let kind = PrematureClose::from_index(i as u32).map_or("unknown", |k| k.label());
                    premature_by_kind.insert(kind.to_string(), per_s(*n));
                }
                TopRow {
                    comm: Label::Comm(&key.comm).to_string(),
                    owner: PodLabels {
                        container_id: Label::Container(&key.container).to_string(),
                        namespace: pod.map(|p| p.namespace.clone()).unwrap_or_default(),
                        pod: pod.map(|p| p.pod.clone()).unwrap_or_default(),
                        container: pod.map(|p| p.container.clone()).unwrap_or_default(),
                    },
                    role: role_text(key.role).to_string(),
                    peer: Label::Peer(&key.peer).to_string(),
                    port: Label::Port(&key.port).to_string(),
                    resets_in_per_s: per_s(c.resets_in),
                    resets_out_per_s: per_s(c.resets_out),
                    premature_per_s: per_s(c.premature.iter().sum()),
                    premature_by_kind,
                    closes_per_s: per_s(c.closes),
                    opened_per_s: per_s(c.opened),
                }
            })
            .collect();
        sort_rows(&mut rows, sort);
        let total_rows = rows.len() as u64;
        rows.truncate(limit);
        TopReport {
            interval_seconds: interval.as_secs_f64(),
            window_seconds: window.seconds,
            sort: sort.as_str().to_string(),
            total_rows,
            rows,
        }
    }
}

/// Highest first by `sort`, then by the other rates, then by the labels (a stable order).
pub fn sort_rows(rows: &mut [TopRow], sort: TopSort) {
    let rates = |r: &TopRow| {
        let all = [r.resets_in_per_s, r.resets_out_per_s, r.premature_per_s, r.closes_per_s, r.opened_per_s];
        let first = sort.rate(r);
        [first, all[0], all[1], all[2], all[3], all[4]]
    };
    rows.sort_by(|a, b| {
        let (ra, rb) = (rates(a), rates(b));
        rb.iter()
            .zip(ra.iter())
            .map(|(x, y)| x.total_cmp(y))
            .find(|o| o.is_ne())
            .unwrap_or(std::cmp::Ordering::Equal)
            .then_with(|| {
                (&a.comm, &a.owner.container_id, &a.role, &a.peer, &a.port).cmp(&(
                    &b.comm,
                    &b.owner.container_id,
                    &b.role,
                    &b.peer,
                    &b.port,
                ))
            })
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::series::{NO_CONTAINER, Peer, Port};

    fn key(comm: &[u8], detail: u32) -> SeriesKey {
        let mut c = [0u8; 16];
        c[..comm.len()].copy_from_slice(comm);
        SeriesKey { comm: c, role: 2, peer: Peer::Other, port: Port::Num(80), container: NO_CONTAINER, detail }
    }

    /// A copy of the aggregator's series with these totals.
    fn series(entries: &[(Family, &[u8], u32, u64)]) -> Copied {
        entries.iter().map(|&(f, comm, detail, v)| (f, key(comm, detail), v)).collect()
    }

    #[test]
    fn rates_are_the_counts_between_ticks_over_the_time_between_them() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut rates = Rates::default();
        assert_eq!(rates.window(Duration::from_secs(2)).seconds, 0.0);
        // Counted before the first tick: not a rate.
        rates.sample(at(0), &series(&[(Family::Closes, b"web", 0, 100)]));
        rates.sample(at(1000), &series(&[(Family::Closes, b"web", 0, 110)]));
        let local = PrematureClose::LocalReset as u32;
        let peer = PrematureClose::PeerReset as u32;
        rates.sample(
            at(2000),
            &series(&[
                (Family::Closes, b"web", 0, 130),
                (Family::ResetsSent, b"web", 1, 4),
                (Family::ResetsSent, b"web", 7, 2),
                (Family::PrematureCloses, b"web", local, 6),
                (Family::ResetsReceived, b"db", 0, 3),
                (Family::PrematureCloses, b"db", peer, 3),
            ]),
        );
        // 4 s later (a late tick): the window's time is measured, not assumed.
        rates.sample(
            at(6000),
            &series(&[
                (Family::Closes, b"web", 0, 150),
                (Family::Opened, b"web", 0, 12),
                (Family::ResetsSent, b"web", 1, 8),
                (Family::ResetsSent, b"web", 7, 2),
                (Family::PrematureCloses, b"web", local, 10),
                (Family::ResetsReceived, b"db", 0, 3),
                (Family::PrematureCloses, b"db", peer, 3),
            ]),
        );
        let pods = PodNames::default();
        // One tick back: 6000 - 2000.
        let r = rates.report(Duration::from_secs(1), TopSort::ResetsOut, 10, &pods);
        assert_eq!(r.window_seconds, 4.0);
        assert_eq!(r.rows.len(), 1, "db counted nothing in the last tick: {r:?}");
        let web = &r.rows[0];
        assert_eq!((web.closes_per_s, web.resets_out_per_s, web.premature_per_s), (5.0, 1.0, 1.0));
        assert_eq!(web.opened_per_s, 3.0, "12 opened since the previous tick, which had none");
        assert_eq!(web.premature_by_kind, BTreeMap::from([("local_reset".to_string(), 1.0)]));
        // Two ticks back: 6000 - 1000; db sorts first by resets in.
        let r = rates.report(Duration::from_millis(1500), TopSort::ResetsIn, 10, &pods);
        assert_eq!(r.window_seconds, 5.0);
        assert_eq!((r.rows[0].comm.as_str(), r.rows[0].resets_in_per_s), ("db", 0.6));
        assert_eq!(r.rows[0].premature_by_kind, BTreeMap::from([("peer_reset".to_string(), 0.6)]));
        assert_eq!((r.rows[1].comm.as_str(), r.rows[1].closes_per_s, r.rows[1].resets_out_per_s), ("web", 8.0, 2.0));
        // Longer than the history: all of it.
        let r = rates.report(MAX_INTERVAL, TopSort::Closes, 1, &pods);
        assert_eq!((r.window_seconds, r.total_rows, r.rows.len()), (6.0, 2, 1));
        assert_eq!((r.rows[0].comm.as_str(), r.rows[0].closes_per_s), ("web", 50.0 / 6.0));
    }

    #[test]
    fn bad_parameters_name_themselves_and_what_they_allow() {
        assert_eq!(parse_query(None, None, None), Ok((Duration::from_secs(2), TopSort::ResetsIn, DEFAULT_LIMIT)));
        assert_eq!(
            parse_query(Some("1500ms"), Some("premature"), Some("3")),
            Ok((Duration::from_millis(1500), TopSort::Premature, 3))
        );
        for (q, words) in [
            ((Some("soon"), None, None), ["interval", "1s to 60s"]),
            ((Some("10m"), None, None), ["interval", "1s to 60s"]),
            ((Some("10ms"), None, None), ["interval", "1s to 60s"]),
            ((None, Some("bytes"), None), ["sort", "resets_in, resets_out, premature, closes"]),
            ((None, None, Some("0")), ["limit", "1 to 10000"]),
            ((None, None, Some("-1")), ["limit", "1 to 10000"]),
        ] {
            let err = parse_query(q.0, q.1, q.2).expect_err("a bad parameter");
            assert!(words.iter().all(|w| err.contains(w)), "{err}");
        }
    }

    #[test]
    fn a_row_that_shrinks_or_goes_counts_nothing_and_history_is_capped() {
        let t0 = Instant::now();
        let mut rates = Rates::default();
        rates.sample(t0, &series(&[(Family::Closes, b"web", 0, 10)]));
        // Expired (or folded away) and back with less: no negative rate.
        rates.sample(t0 + TICK, &series(&[]));
        rates.sample(t0 + 2 * TICK, &series(&[(Family::Closes, b"web", 0, 3)]));
        let w = rates.window(2 * TICK);
        assert_eq!(w.counts.len(), 1);
        assert_eq!(w.counts[0].1.closes, 3);
        for i in 3..200u32 {
            rates.sample(t0 + i * TICK, &series(&[(Family::Closes, b"web", 0, 3 + u64::from(i))]));
        }
        assert_eq!(rates.ticks.len(), HISTORY_TICKS + 1);
        let w = rates.window(Duration::from_secs(3600));
        assert_eq!((w.seconds, w.counts[0].1.closes), (HISTORY_TICKS as f64, HISTORY_TICKS as u64));
    }

    #[test]
    fn history_entries_are_capped_by_dropping_the_oldest_ticks() {
        let t0 = Instant::now();
        let mut rates = Rates::default();
        let rows = MAX_HISTORY_ENTRIES / 10 + 1;
        for tick in 0..20u32 {
            let copied: Copied = (0..rows)
                .map(|i| {
                    let mut k = key(b"web", 0);
                    k.port = Port::Num(i as u16);
                    (Family::Closes, k, u64::from(tick))
                })
                .collect();
            rates.sample(t0 + tick * TICK, &copied);
        }
        assert!(rates.entries <= MAX_HISTORY_ENTRIES, "{}", rates.entries);
        assert!(rates.ticks.len() < 20 && rates.ticks.len() >= 2);
        // The window says how long it really is.
        let w = rates.window(MAX_INTERVAL);
        assert_eq!(w.seconds, (rates.ticks.len() - 1) as f64);
    }
}
