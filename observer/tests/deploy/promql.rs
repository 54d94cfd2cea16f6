//! The alerts: promtool's checks and unit tests, a firing and a silent test for every alert, a
//! runbook for every alert; and every PromQL expression of deploy/ parses.
use std::{
    collections::{BTreeMap, BTreeSet},
    process::Command,
};

use libtest_mimic::Failed;

use crate::{
    support::{self, ALERTS, Expr, PROMTOOL_INSTALL, Problems, RUNBOOKS},
    yaml,
};

const TESTS: &str = "deploy/prometheus/tests";

pub fn promtool_rules() -> Result<(), Failed> {
    let promtool = support::tool("promtool", PROMTOOL_INSTALL)?;
    support::run(Command::new(&promtool).args(["check", "rules", ALERTS]).current_dir(support::root()))?;
    let tests = support::files(TESTS, ".yaml")?;
    if tests.is_empty() {
        return Err(format!("{TESTS} has no unit tests").into());
    }
    let out = support::run(Command::new(&promtool).args(["test", "rules"]).args(&tests).current_dir(support::root()))?;
    println!("{}", String::from_utf8_lossy(&out.stdout).trim_end());
    Ok(())
}

pub fn every_alert_tested() -> Result<(), Failed> {
    let mut fires: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut silent: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for file in support::files(TESTS, ".yaml")? {
        let doc = yaml::parse_one(&support::read(&file)?).map_err(|e| format!("{file}: {e}"))?;
        for test in doc["tests"].as_array().into_iter().flatten() {
            let name = test["name"].as_str().unwrap_or("").to_string();
            for case in test["alert_rule_test"].as_array().into_iter().flatten() {
                let alert = case["alertname"].as_str().unwrap_or("").to_string();
                let expected = case["exp_alerts"].as_array().map_or(0, Vec::len);
                let at = format!("{file}: \"{name}\" at {}", case["eval_time"].as_str().unwrap_or("?"));
                if expected > 0 {
                    fires.entry(alert).or_default().push(at);
                } else if name.contains("silent") {
                    silent.entry(alert).or_default().push(at);
                }
            }
        }
    }
    let mut p = Problems::new();
    let names: BTreeSet<String> = support::alerts()?.into_iter().map(|a| a.name).collect();
    for name in &names {
        p.check(fires.contains_key(name), || format!("{name}: no unit test in {TESTS} where it fires"));
        p.check(silent.contains_key(name), || {
            format!("{name}: no unit test in {TESTS} where it stays silent on healthy series (exp_alerts: [] in a test whose name says \"silent\")")
        });
    }
    for tested in fires.keys().chain(silent.keys()) {
        p.check(names.contains(tested), || format!("{TESTS} tests {tested}, which {ALERTS} does not define"));
    }
    p.finish()
}

/// The sections every runbook has, in this order.
const RUNBOOK_SECTIONS: &[&str] = &["## Meaning", "## How to confirm", "## Likely causes", "## What to do"];

pub fn runbooks() -> Result<(), Failed> {
    let alerts = support::alerts()?;
    let rule_file = support::read(ALERTS)?;
    let header = rule_file.split("\ngroups:").next().unwrap_or_default();
    let mut p = Problems::new();
    let mut bases = BTreeSet::new();
    for a in &alerts {
        let Some(url) = a.annotations.get("runbook_url").and_then(|u| u.as_str()) else {
            p.push(format!("{ALERTS}: alert {} has no runbook_url annotation", a.name));
            continue;
        };
        let Some(base) = url.strip_suffix(&format!("{}.md", a.name)) else {
            p.push(format!("{ALERTS}: alert {}: runbook_url {url} does not end with {}.md", a.name, a.name));
            continue;
        };
        bases.insert(base.to_string());
        p.check(base.ends_with("/deploy/runbooks/") || base.ends_with('/'), || {
            format!("{ALERTS}: alert {}: runbook_url base {base} does not end with a /", a.name)
        });
        p.check(header.contains(base), || {
            format!("{ALERTS}: the runbook base {base} is not documented in the file's header")
        });
        let file = format!("{RUNBOOKS}/{}.md", a.name);
        let Ok(text) = support::read(&file) else {
            p.push(format!("alert {}: runbook {file} does not exist", a.name));
            continue;
        };
        p.check(text.starts_with(&format!("# {}\n", a.name)), || format!("{file}: does not start with `# {}`", a.name));
        let mut last = 0;
        for section in RUNBOOK_SECTIONS {
            match text.find(&format!("\n{section}\n")) {
                Some(i) if i >= last => last = i,
                Some(_) => p.push(format!("{file}: section \"{section}\" out of order (want {RUNBOOK_SECTIONS:?})")),
                None => p.push(format!("{file}: no \"{section}\" section")),
            }
        }
        p.check(text.contains("```promql"), || format!("{file}: no ```promql block to confirm with"));
        p.check(text.contains("observer status") || text.contains("observer events"), || {
            format!("{file}: says neither `observer status` nor `observer events`")
        });
    }
    p.check(bases.len() <= 1, || format!("{ALERTS}: runbook_url uses several bases {bases:?}; use one"));
    let names: BTreeSet<String> = alerts.iter().map(|a| format!("{RUNBOOKS}/{}.md", a.name)).collect();
    for file in support::files(RUNBOOKS, ".md")?.into_iter().filter(|f| !f.ends_with("/README.md")) {
        p.check(names.contains(&file), || format!("{file}: no alert in {ALERTS} links it"));
    }
    p.finish()
}

pub fn expressions_parse() -> Result<(), Failed> {
    let promtool = support::tool("promtool", PROMTOOL_INSTALL)?;
    let (exprs, problems) = support::all_exprs()?;
    let mut p = Problems::new();
    for problem in problems {
        p.push(problem);
    }
    let dir = support::scratch("deploy-promql")?;
    let all = dir.join("all.yaml");
    let refs: Vec<&Expr> = exprs.iter().collect();
    std::fs::write(&all, recording_rules(&refs)).map_err(|e| format!("writing {}: {e}", all.display()))?;
    let together = Command::new(&promtool).args(["check", "rules"]).arg(&all).output();
    if !together.as_ref().is_ok_and(|o| o.status.success()) {
        // Find which: one file per expression.
        for (i, e) in exprs.iter().enumerate() {
            let one = dir.join(format!("expr-{i}.yaml"));
            std::fs::write(&one, recording_rules(&[e])).map_err(|e| format!("writing {}: {e}", one.display()))?;
            let out = Command::new(&promtool)
                .args(["check", "rules"])
                .arg(&one)
                .output()
                .map_err(|e| format!("running promtool: {e}"))?;
            if !out.status.success() {
                let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
                let why: Vec<&str> = text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with("Checking") && *l != "FAILED:")
                    .collect();
                p.push(format!("{} ({}): `{}` does not parse: {}", e.file, e.at, e.expr, why.join("; ")));
            }
        }
        if p.is_empty() {
            p.push(format!(
                "promtool check rules {} failed, but no single expression does: {:?}",
                all.display(),
                together.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            ));
        }
    }
    println!("{} PromQL expressions parse", exprs.len());
    p.finish()
}

/// A rule file with one recording rule per expression, for `promtool check rules` to parse.
fn recording_rules(exprs: &[&Expr]) -> String {
    let mut out = String::from("groups:\n");
    for (i, e) in exprs.iter().enumerate() {
        // A JSON string is a valid YAML double-quoted scalar.
        let quoted = serde_json::Value::String(e.expr.clone()).to_string();
        out.push_str(&format!(
            "  - name: expr-{i}\n    rules:\n      - record: deploy_check:expr_{i}\n        expr: {quoted}\n"
        ));
    }
    out
}
