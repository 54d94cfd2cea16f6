//! Aggregation with bounded cardinality, the fourth step of an event's path (after
//! [`crate::attribution`]): each classified, attributed event adds to the per-connection
//! families ([`Aggregator::count`]), and [`crate::exposition`] writes them out at scrape time.
//!
//! Per-connection counters are per-connection counters keyed without strings, with the
//! number of series capped because peers are attacker-controlled.
//!
//! Two caps, and nothing is ever dropped, only folded, so sums stay exact:
//! * per (family, comm, port) at most `max_peers` peers keep their own series; when a new peer
//!   arrives the least recently active one is evicted and its counts move to `peer="other"`;
//! * at most `max_series` series in all; past that, new series are counted in one overflow series
//!   per family and detail (`comm="other", peer="other", port="other"`).
//!
//! Every count that lands in an `other` series is added to [`Aggregator::folded`].

use observer_common::ConnectionFacts;

use crate::{
    HashMap,
    classify::Outcome,
    series::{COMM_OTHER, ContainerKey, Peer, Port, SeriesKey},
};

/// Cardinality caps (README "Bounded cardinality"): `--max-peers`, `--max-series`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_peers: usize,
    pub max_series: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_peers: 50, max_series: 20_000 }
    }
}

/// A family of per-connection counters (one Prometheus metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    ResetsReceived = 0,
    ResetsSent = 1,
    Closes = 2,
    PrematureCloses = 3,
    /// Segments retransmitted, added per connection at close.
    Retransmits = 4,
    /// Connections opened: every connect() and every accepted connection.
    Opened = 5,
}

impl Family {
    pub const ALL: [Family; 6] =
        [Self::ResetsReceived, Self::ResetsSent, Self::Closes, Self::PrematureCloses, Self::Retransmits, Self::Opened];
}

#[derive(Debug, Default)]
struct PeerSlot {
    last_active: u64,
    /// Series of this family that carry this peer in this group.
    keys: Vec<SeriesKey>,
}

#[derive(Debug, Default)]
struct FamilySeries {
    values: HashMap<SeriesKey, u64>,
    /// (comm, port) → peers that have their own series.
    groups: HashMap<([u8; 16], Port), HashMap<[u8; 16], PeerSlot>>,
    /// Per series, the counts that moved into it when a peer was evicted (they were counted
    /// before, under the evicted peer): [`Aggregator::counted_here`] leaves them out, so rates
    /// ([`crate::top`]) do not see a fold as a burst. Its keys are series of `values`.
    moved_in: HashMap<SeriesKey, u64>,
}

#[derive(Debug)]
pub struct Aggregator {
    families: [FamilySeries; Family::ALL.len()],
    max_peers: usize,
    max_series: usize,
    series: usize,
    tick: u64,
    folded: u64,
    /// Series removed because their container was gone for longer than the expiry.
    expired: u64,
}

impl Aggregator {
    pub fn new(max_peers: usize, max_series: usize) -> Self {
        Self {
            families: Default::default(),
            max_peers: max_peers.max(1),
            max_series,
            series: 0,
            tick: 0,
            folded: 0,
            expired: 0,
        }
    }

    pub fn with_limits(limits: Limits) -> Self {
        Self::new(limits.max_peers, limits.max_series)
    }

    /// Counts one event under `key` (its attributed series, detail 0): an opened connection, a
    /// reset in its family, a
    /// close in `closes` and, when premature, in `premature_closes` by kind, with the
    /// connection's retransmissions.
    pub fn count(&mut self, outcome: Outcome, key: SeriesKey, facts: &ConnectionFacts) {
        let detail = |detail| SeriesKey { detail, ..key };
        match outcome {
            Outcome::Opened => self.add(Family::Opened, key, 1),
            Outcome::ResetReceived => self.add(Family::ResetsReceived, key, 1),
            Outcome::ResetSent { reason } => self.add(Family::ResetsSent, detail(reason), 1),
            Outcome::Closed { premature } => {
                self.add(Family::Closes, key, 1);
                if let Some(kind) = premature {
                    self.add(Family::PrematureCloses, detail(kind as u32), 1);
                }
                if facts.retransmits > 0 {
                    self.add(Family::Retransmits, key, u64::from(facts.retransmits));
                }
            }
        }
    }

    /// Adds `n` to the series `key` of `family`, folding as the caps require.
    pub fn add(&mut self, family: Family, key: SeriesKey, n: u64) {
        self.tick += 1;
        let tick = self.tick;
        let FamilySeries { values, groups, moved_in } = &mut self.families[family as usize];
        let mut key = key;
        if let Peer::Addr(addr) = key.peer {
            let group = groups.entry((key.comm, key.port)).or_default();
            // A peer already in its group (nearly every event) costs one lookup; a new one
            // may first evict the least recently active peer of a full group.
            let slot = match group.get_mut(&addr) {
                Some(slot) => slot,
                None => {
                    if group.len() >= self.max_peers {
                        evict_least_recent(
                            group,
                            values,
                            moved_in,
                            &mut self.series,
                            self.max_series,
                            &mut self.folded,
                        );
                    }
                    group.entry(addr).or_default()
                }
            };
            slot.last_active = tick;
            if !slot.keys.contains(&key) {
                if !values.contains_key(&key) && self.series >= self.max_series {
                    // No room for a series of its own.
                    key = key.overflow();
                    self.folded += n;
                } else {
                    slot.keys.push(key);
                }
            }
        }
        add_value(values, &mut self.series, self.max_series, &mut self.folded, key, n);
    }

    /// Removes every series of a container that is gone (its pod deleted): Prometheus keeps
    /// what it scraped, and the daemon does not keep the series of dead pods forever. Returns
    /// how many series went.
    pub fn expire_container(&mut self, container: ContainerKey) -> usize {
        let mut removed = 0;
        for f in &mut self.families {
            let before = f.values.len();
            f.values.retain(|k, _| k.container != container);
            f.moved_in.retain(|k, _| k.container != container);
            removed += before - f.values.len();
            for group in f.groups.values_mut() {
                group.retain(|_, slot| {
                    slot.keys.retain(|k| k.container != container);
                    !slot.keys.is_empty()
                });
            }
            f.groups.retain(|_, group| !group.is_empty());
        }
        self.series -= removed;
        self.expired += removed as u64;
        removed
    }

    /// Series removed by [`Self::expire_container`] so far.
    pub fn expired(&self) -> u64 {
        self.expired
    }

    /// Counts that were put in an `other` series instead of their own.
    pub fn folded(&self) -> u64 {
        self.folded
    }

    /// Number of series across all families.
    pub fn series(&self) -> usize {
        self.series
    }

    /// The series of one family and their values, in no particular order.
    pub fn iter(&self, family: Family) -> impl Iterator<Item = (&SeriesKey, u64)> {
        self.families[family as usize].values.iter().map(|(k, v)| (k, *v))
    }

    /// The series of one family and the counts of the events counted under them, that is their
    /// values less what moved in from evicted peers: what rates are computed from.
    pub fn counted_here(&self, family: Family) -> impl Iterator<Item = (&SeriesKey, u64)> {
        let f = &self.families[family as usize];
        f.values.iter().map(|(k, v)| (k, v.saturating_sub(f.moved_in.get(k).copied().unwrap_or(0))))
    }

    /// Sum over a family (for tests and status).
    pub fn total(&self, family: Family) -> u64 {
        self.iter(family).map(|(_, v)| v).sum()
    }
}

/// Evicts the least recently active peer of a full `group`: its series move to peer="other"
/// (counted in `folded`, and in `moved_in` of the series they land in).
fn evict_least_recent(
    group: &mut HashMap<[u8; 16], PeerSlot>,
    values: &mut HashMap<SeriesKey, u64>,
    moved_in: &mut HashMap<SeriesKey, u64>,
    series: &mut usize,
    max_series: usize,
    folded: &mut u64,
) {
    let Some((&oldest, _)) = group.iter().min_by_key(|(_, slot)| slot.last_active) else { return };
    let Some(slot) = group.remove(&oldest) else { return };
    for old in slot.keys {
        if let Some(v) = values.remove(&old) {
            *series -= 1;
            *folded += v;
            // Already counted as folded, wherever it lands.
            let mut counted = 0;
            let landed = add_value(values, series, max_series, &mut counted, old.with_peer(Peer::Other), v);
            *moved_in.entry(landed).or_default() += v;
        }
    }
}

/// Adds to `key`, creating it if there is room, else to the family's overflow series; returns
/// the series it landed in.
fn add_value(
    values: &mut HashMap<SeriesKey, u64>,
    series: &mut usize,
    max_series: usize,
    folded: &mut u64,
    key: SeriesKey,
    n: u64,
) -> SeriesKey {
    if let Some(v) = values.get_mut(&key) {
        *v += n;
        return key;
    }
    let is_overflow = key.comm == COMM_OTHER && key.port == Port::Other;
    if *series >= max_series && !is_overflow {
        *folded += n;
        *values.entry(key.overflow()).or_insert_with(|| {
            *series += 1;
            0
        }) += n;
        return key.overflow();
    }
    *series += 1;
    values.insert(key, n);
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::series::NO_CONTAINER;

    fn key(peer: u8, port: u16) -> SeriesKey {
        let mut comm = [0u8; 16];
        comm[..5].copy_from_slice(b"nginx");
        let mut addr = [0u8; 16];
        addr[15] = peer;
        SeriesKey { comm, role: 2, peer: Peer::Addr(addr), port: Port::Num(port), container: NO_CONTAINER, detail: 0 }
    }

    #[test]
    fn at_most_max_peers_per_comm_and_port_and_sums_stay_exact() {
        let mut a = Aggregator::new(3, 10_000);
        for peer in 0..100u8 {
            a.add(Family::Closes, key(peer, 443), 2);
        }
        // 3 peers of their own + "other".
        assert_eq!(a.iter(Family::Closes).count(), 4);
        assert_eq!(a.total(Family::Closes), 200);
        let other: u64 = a.iter(Family::Closes).filter(|(k, _)| k.peer == Peer::Other).map(|(_, v)| v).sum();
        assert_eq!(other, 194);
        assert_eq!(a.folded(), 194);
        // The survivors are the most recently active.
        let mut kept: Vec<u8> = a
            .iter(Family::Closes)
            .filter_map(|(k, _)| match k.peer {
                Peer::Addr(p) => Some(p[15]),
                Peer::Other => None,
            })
            .collect();
        kept.sort();
        assert_eq!(kept, vec![97, 98, 99]);
        // What moved into "other" was counted before, under its own peer.
        let here: u64 = a.counted_here(Family::Closes).map(|(_, v)| v).sum();
        assert_eq!(here, 200 - 194);
    }

    #[test]
    fn recently_active_peers_are_kept() {
        let mut a = Aggregator::new(2, 10_000);
        a.add(Family::Closes, key(1, 80), 1);
        a.add(Family::Closes, key(2, 80), 1);
        a.add(Family::Closes, key(1, 80), 1); // 1 is now more recent than 2
        a.add(Family::Closes, key(3, 80), 1); // evicts 2
        let peers: Vec<Peer> = a.iter(Family::Closes).map(|(k, _)| k.peer).collect();
        assert!(peers.contains(&key(1, 80).peer) && peers.contains(&key(3, 80).peer) && peers.contains(&Peer::Other));
        assert_eq!(a.total(Family::Closes), 4);
    }

    #[test]
    fn ports_are_separate_groups_and_total_series_are_capped() {
        let mut a = Aggregator::new(50, 100);
        for port in 0..1000u16 {
            a.add(Family::ResetsSent, key(7, port), 1);
        }
        // 100 series of their own, then one overflow series.
        assert_eq!(a.iter(Family::ResetsSent).count(), 101);
        assert!(a.series() <= 101);
        assert_eq!(a.total(Family::ResetsSent), 1000);
        assert_eq!(a.folded(), 900);
    }

    #[test]
    fn a_gone_containers_series_expire_and_the_others_stay() {
        let mut a = Aggregator::new(2, 10_000);
        let gone = crate::series::container_key("3f2a9c1b7d4e");
        a.add(Family::Closes, SeriesKey { container: gone, ..key(1, 80) }, 2);
        a.add(Family::PrematureCloses, SeriesKey { container: gone, detail: 1, ..key(1, 80) }, 1);
        a.add(Family::Closes, key(2, 80), 5);
        assert_eq!(a.expire_container(gone), 2);
        assert_eq!((a.series(), a.expired(), a.total(Family::Closes)), (1, 2, 5));
        // Its peer slot went with it: two new peers fit without folding.
        a.add(Family::Closes, key(3, 80), 1);
        assert_eq!(a.folded(), 0);
    }

    #[test]
    fn details_fold_separately() {
        let mut a = Aggregator::new(1, 10_000);
        a.add(Family::PrematureCloses, SeriesKey { detail: 1, ..key(1, 80) }, 1);
        a.add(Family::PrematureCloses, SeriesKey { detail: 2, ..key(1, 80) }, 1);
        a.add(Family::PrematureCloses, SeriesKey { detail: 1, ..key(2, 80) }, 1);
        let other: Vec<u32> =
            a.iter(Family::PrematureCloses).filter(|(k, _)| k.peer == Peer::Other).map(|(k, _)| k.detail).collect();
        assert_eq!(other.len(), 2, "both kinds of the evicted peer keep their kind");
        assert_eq!(a.total(Family::PrematureCloses), 3);
    }
}
