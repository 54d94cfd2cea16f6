//! The Prometheus text format (0.0.4) as the daemon serves it, parsed into samples and summed by
//! labels.
//!
//! Written here rather than taken from a crate: `prometheus-parse` 0.2.5 (the one text-format
//! parser on crates.io of any use, last released in 2023) splits label sets at `,` and `=`
//! without honouring escapes, so a `comm` holding a comma, quote or brace would be misread, and
//! it folds histogram samples into its own types. The daemon's `comm` labels are whatever a
//! process calls itself, so escapes matter here.
use std::collections::BTreeMap;

use anyhow::{Result, anyhow};

/// One sample: metric name, labels, value.
pub type Sample = (String, BTreeMap<String, String>, f64);

/// One scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    pub samples: Vec<Sample>,
}

impl Metrics {
    /// Parses a scrape. Comments (`# HELP`, `# TYPE`) and blank lines are skipped; a sample line
    /// without a numeric value is an error.
    pub fn parse(text: &str) -> Result<Self> {
        let mut samples = Vec::new();
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
            let (series, value) =
                line.trim_end().rsplit_once(' ').ok_or_else(|| anyhow!("metrics line without a value: {line}"))?;
            let value: f64 = value.parse().map_err(|e| anyhow!("metrics line with a bad value ({e}): {line}"))?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}').unwrap_or(rest))),
                None => (series, BTreeMap::new()),
            };
            samples.push((name.to_string(), labels, value));
        }
        Ok(Self { samples })
    }

    /// The label sets of `name` that include all of `filter`, with their values.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        filter: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = (&'a BTreeMap<String, String>, f64)> + 'a {
        self.samples
            .iter()
            .filter(move |(n, labels, _)| {
                n == name && filter.iter().all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, labels, v)| (labels, *v))
    }

    /// Sum of `name` over the series whose labels include all of `filter`, as a count.
    pub fn sum(&self, name: &str, filter: &[(&str, &str)]) -> u64 {
        self.matching(name, filter).map(|(_, v)| v).sum::<f64>() as u64
    }

    /// The samples about connections with one of `peers` (their `peer` label).
    pub fn of_peers(&self, peers: &[&str]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|(_, labels, _)| labels.get("peer").is_some_and(|p| peers.contains(&p.as_str())))
            .collect()
    }

    /// `observer_events_total` by probe.
    pub fn events_by_probe(&self) -> BTreeMap<String, u64> {
        self.matching("observer_events_total", &[])
            .filter_map(|(labels, v)| labels.get("probe").map(|p| (p.clone(), v as u64)))
            .collect()
    }

    pub fn events_seen(&self) -> u64 {
        self.sum("observer_events_total", &[])
    }

    pub fn events_lost(&self) -> u64 {
        self.sum("observer_events_lost_total", &[])
    }

    /// Seen + lost: everything the kernel side tried to report.
    pub fn events_accounted(&self) -> u64 {
        self.events_seen() + self.events_lost()
    }

    /// The per-connection counters (`observer_tcp_*_total`), one sample a line, for failure
    /// messages.
    pub fn per_connection_summary(&self) -> String {
        self.samples
            .iter()
            .filter(|(name, _, _)| name.starts_with("observer_tcp_") && name.ends_with("_total"))
            .map(|(name, labels, v)| format!("  {name}{labels:?} {v}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `observer_build_info{revision}`.
    pub fn revision(&self) -> Option<String> {
        self.matching("observer_build_info", &[]).find_map(|(labels, _)| labels.get("revision").cloned())
    }
}

/// `k="v",k2="v2"`, with the text format's escapes in values (`\\`, `\"`, `\n`).
fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut end = after.len();
        let mut chars = after.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(if escaped == 'n' { '\n' } else { escaped });
                    }
                }
                '"' => {
                    end = i;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.insert(key.trim_start_matches(',').trim().to_string(), value);
        rest = after.get(end + 1..).unwrap_or("");
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::Metrics;

    #[test]
    fn sums_by_label() {
        let m = Metrics::parse(
            "# HELP x\nobserver_tcp_closes_total{comm=\"a b\",peer=\"127.0.0.1\",port=\"80\",role=\"client\"} 3\n\
             observer_tcp_closes_total{comm=\"c\\\"q\",peer=\"127.0.0.1\",port=\"80\",role=\"server\"} 4\n\
             observer_events_total{probe=\"tcp_send_reset\"} 5\nobserver_events_lost_total 2\n",
        )
        .unwrap();
        assert_eq!(m.sum("observer_tcp_closes_total", &[]), 7);
        assert_eq!(m.sum("observer_tcp_closes_total", &[("comm", "a b")]), 3);
        assert_eq!(m.sum("observer_tcp_closes_total", &[("comm", "c\"q"), ("role", "server")]), 4);
        assert_eq!(m.events_accounted(), 7);
        assert_eq!(m.events_by_probe().get("tcp_send_reset"), Some(&5));
    }

    #[test]
    fn escapes_commas_and_braces_in_values() {
        let m = Metrics::parse("m{comm=\"x,y=\\\"}\",peer=\"::1\",k=\"a\\\\b\\nc\"} 1\n").unwrap();
        let (labels, v) = m.matching("m", &[]).next().unwrap();
        assert_eq!(v, 1.0);
        assert_eq!(labels["comm"], "x,y=\"}");
        assert_eq!(labels["peer"], "::1");
        assert_eq!(labels["k"], "a\\b\nc");
        assert_eq!(m.of_peers(&["::1"]).len(), 1);
        assert!(m.of_peers(&["127.0.0.1"]).is_empty());
    }

    #[test]
    fn unlabelled_float_and_infinite_values() {
        let m = Metrics::parse(
            "observer_tcp_close_wait_oldest_seconds{comm=\"s\",container_id=\"\"} 4.097333625\n\
             h_bucket{le=\"+Inf\"} 9\nobserver_build_info{revision=\"3686deecce73\",version=\"0.1.0\"} 1\n\
             g +Inf\n",
        )
        .unwrap();
        let age: f64 =
            m.matching("observer_tcp_close_wait_oldest_seconds", &[("container_id", "")]).map(|(_, v)| v).sum();
        assert_eq!(age, 4.097333625);
        assert_eq!(m.sum("h_bucket", &[("le", "+Inf")]), 9);
        assert_eq!(m.revision().as_deref(), Some("3686deecce73"));
        assert!(m.matching("g", &[]).next().unwrap().1.is_infinite());
    }

    #[test]
    fn a_line_without_a_number_is_an_error() {
        assert!(Metrics::parse("observer_series\n").is_err());
        assert!(Metrics::parse("observer_series many\n").is_err());
        assert_eq!(Metrics::parse("# only comments\n\n").unwrap(), Metrics::default());
    }
}
