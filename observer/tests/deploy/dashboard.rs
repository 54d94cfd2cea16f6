//! The Grafana dashboard: its variables, that every panel honours them, and the panels the
//! deployment promises.
use libtest_mimic::Failed;

use crate::support::{self, DASHBOARD, Problems};

/// A test on one dashboard expression.
type Shows = fn(&str) -> bool;

/// What the dashboard must show, as (what, a test on one of its expressions).
const PANELS: &[(&str, Shows)] = &[
    ("resets received by workload and peer", |e| {
        e.contains("observer_tcp_resets_received_total") && e.contains("peer") && e.contains("pod")
    }),
    ("resets sent by workload", |e| e.contains("observer_tcp_resets_sent_total") && e.contains("pod")),
    ("premature closes by kind", |e| e.contains("observer_tcp_premature_closes_total") && e.contains("by (kind)")),
    ("top offenders (topk)", |e| e.contains("topk(") && e.contains("observer_tcp_premature_closes_total")),
    ("connection states", |e| e.contains("observer_tcp_connections{") && e.contains("by (state)")),
    ("CLOSE-WAIT count", |e| e.contains("observer_tcp_connections{") && e.contains(r#"state="close_wait""#)),
    ("CLOSE-WAIT age", |e| e.contains("observer_tcp_close_wait_oldest_seconds")),
    ("retransmits", |e| e.contains("observer_tcp_retransmits_total")),
    ("durations (histogram_quantile)", |e| {
        e.contains("histogram_quantile(") && e.contains("observer_tcp_connection_duration_seconds_bucket")
    }),
    ("lost events", |e| e.contains("observer_events_lost_total")),
    ("unattributed events", |e| e.contains("observer_events_unattributed_total")),
    ("probe back ends", |e| e.contains("observer_probe_info") && e.contains("backend")),
    ("container runtime errors", |e| e.contains("observer_container_runtime_errors_total")),
];

pub fn structure() -> Result<(), Failed> {
    let d = support::dashboard()?;
    let mut p = Problems::new();
    let vars = d["templating"]["list"].as_array().cloned().unwrap_or_default();
    let var = |name: &str| vars.iter().find(|v| v["name"] == name);
    match var("datasource") {
        Some(v) => p.check(v["type"] == "datasource" && v["query"] == "prometheus", || {
            format!("{DASHBOARD}: variable datasource is not a Prometheus data source variable: {v}")
        }),
        None => p.push(format!("{DASHBOARD}: no `datasource` variable")),
    }
    for name in ["node", "namespace", "pod"] {
        match var(name) {
            Some(v) => {
                p.check(v["type"] == "query" && v["datasource"]["uid"] == "${datasource}", || {
                    format!("{DASHBOARD}: variable {name} is not a query on ${{datasource}}")
                });
                p.check(v["includeAll"] == true && v["allValue"] == ".*", || {
                    format!(
                        "{DASHBOARD}: variable {name} has no All (.*), which must include host processes (empty {name})"
                    )
                });
            }
            None => p.push(format!("{DASHBOARD}: no `{name}` variable")),
        }
    }

    let mut ids = std::collections::BTreeSet::new();
    for panel in support::panels(&d) {
        let at = format!("{DASHBOARD}: panel {} \"{}\"", panel["id"], panel["title"].as_str().unwrap_or(""));
        p.check(ids.insert(panel["id"].to_string()), || format!("{at}: duplicate id"));
        p.check(panel["gridPos"].is_object(), || format!("{at}: no gridPos"));
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"].as_array().cloned().unwrap_or_default();
        p.check(!targets.is_empty(), || format!("{at}: no query"));
        p.check(panel["datasource"]["uid"] == "${datasource}", || format!("{at}: does not use ${{datasource}}"));
        for t in &targets {
            p.check(t["datasource"]["uid"] == "${datasource}", || {
                format!("{at}, query {}: does not use ${{datasource}}", t["refId"])
            });
            p.check(t["expr"].as_str().is_some_and(|e| !e.is_empty()), || {
                format!("{at}, query {}: no expr", t["refId"])
            });
        }
    }
    let exprs = support::dashboard_exprs(&d);
    for e in exprs.iter().filter(|e| e.at.starts_with("panel")) {
        if e.expr.contains("observer_") {
            p.check(e.expr.contains(r#"node=~"$node""#), || {
                format!("{DASHBOARD} ({}): `{}` ignores the node variable", e.at, e.expr)
            });
        }
        // Every per-connection family but the histogram, which has no workload labels.
        let per_connection = support::metric_names(&e.expr)
            .iter()
            .any(|n| n.starts_with("observer_tcp_") && !n.starts_with("observer_tcp_connection_duration_seconds"));
        if per_connection {
            p.check(e.expr.contains(r#"namespace=~"$namespace""#) && e.expr.contains(r#"pod=~"$pod""#), || {
                format!("{DASHBOARD} ({}): `{}` ignores the namespace or pod variable", e.at, e.expr)
            });
        }
    }
    for (what, test) in PANELS {
        p.check(exprs.iter().any(|e| test(&e.expr)), || format!("{DASHBOARD}: no panel shows {what}"));
    }
    p.check(d["uid"].is_string() && d["title"].is_string(), || format!("{DASHBOARD}: no uid or title"));
    p.finish()
}
