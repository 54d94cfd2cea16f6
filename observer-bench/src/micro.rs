//! The in-process benchmarks of the daemon's userspace hot path (`observer/benches/pipeline.rs`,
//! criterion), read back from criterion's own results for the report: per event through the
//! event path, and per `/metrics` render at 1,000 and 10,000 series. `cargo xtask bench` runs
//! them (`cargo bench -p observer --bench pipeline`) before the system benchmarks.

use std::path::Path;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

/// The benchmarks the report shows, by criterion id (`group/function[/parameter]`), with what
/// one element is.
pub const BENCHES: [(&str, &str, &str); 5] = [
    ("event/pipeline", "event", "decode → classify → attribution → metrics (aggregate, histograms) → event log"),
    (
        "event/churn_pipeline",
        "event",
        "the same, for the churn load: per connection two opens and two graceful closes, the first a FIN closer",
    ),
    ("event/decode_classify_aggregate", "event", "decode → classify → attribution → aggregate"),
    ("render_metrics/1000", "render", "/metrics with 1,000 per-connection series"),
    ("render_metrics/10000", "render", "/metrics with 10,000 per-connection series"),
];

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bench {
    pub id: String,
    pub what: String,
    /// `event` (per event) or `render` (per `/metrics` answer).
    pub unit: String,
    /// Median time of one criterion iteration, with its 95 % confidence interval.
    pub median_ns: f64,
    pub median_low_ns: f64,
    pub median_high_ns: f64,
    /// Elements (events, series) one iteration handles.
    pub elements: u64,
}

impl Bench {
    /// Median nanoseconds per event (for `event`) or per render (for `render`).
    pub fn ns_per_unit(&self) -> f64 {
        if self.unit == "event" { self.median_ns / self.elements.max(1) as f64 } else { self.median_ns }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Micro {
    /// The command that ran them.
    pub command: String,
    pub benches: Vec<Bench>,
}

#[derive(Deserialize)]
struct Estimate {
    point_estimate: f64,
    confidence_interval: Interval,
}

#[derive(Deserialize)]
struct Interval {
    lower_bound: f64,
    upper_bound: f64,
}

#[derive(Deserialize)]
struct Estimates {
    median: Estimate,
}

/// Reads every bench of [`BENCHES`] from criterion's output directory (`target/criterion`).
pub fn read(criterion: &Path, command: String) -> Result<Micro> {
    let mut benches = Vec::new();
    for (id, unit, what) in BENCHES {
        let dir = criterion.join(id).join("new");
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).with_context(|| {
                format!("reading {} (did `cargo bench -p observer --bench pipeline` run?)", path.display())
            })
        };
        let estimates: Estimates =
            serde_json::from_str(&read("estimates.json")?).context("criterion estimates.json")?;
        let benchmark: serde_json::Value =
            serde_json::from_str(&read("benchmark.json")?).context("criterion benchmark.json")?;
        // `Throughput::Elements(n)`, as the benchmarks declare it.
        let elements = benchmark["throughput"]["Elements"].as_u64().unwrap_or(1);
        benches.push(Bench {
            id: id.into(),
            what: what.into(),
            unit: unit.into(),
            median_ns: estimates.median.point_estimate,
            median_low_ns: estimates.median.confidence_interval.lower_bound,
            median_high_ns: estimates.median.confidence_interval.upper_bound,
            elements,
        });
    }
    Ok(Micro { command, benches })
}
