//! What the deploy checks share: paths, tools, commands, the collected problems of a trial, and
//! the PromQL found in the rule file, the dashboard and the Markdown documents.
use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use libtest_mimic::Failed;
use serde_json::Value;

use crate::yaml;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map_or_else(|| PathBuf::from(".."), Path::to_path_buf)
}

/// A directory under `target/` this test may use.
pub fn scratch(name: &str) -> Result<PathBuf, Failed> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    Ok(dir)
}

/// A file of the repository, by its path from the root.
pub fn read(rel: &str) -> Result<String, Failed> {
    let path = root().join(rel);
    std::fs::read_to_string(&path).map_err(|e| format!("reading {rel}: {e}").into())
}

/// The files of a repository directory whose names end with `suffix`, sorted, as paths from the
/// root.
pub fn files(dir_rel: &str, suffix: &str) -> Result<Vec<String>, Failed> {
    let dir = root().join(dir_rel);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|e| format!("listing {dir_rel}: {e}"))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(suffix))
        .map(|n| format!("{dir_rel}/{n}"))
        .collect();
    names.sort();
    Ok(names)
}

/// A tool on PATH, or a failure that says how to install it.
pub fn tool(name: &str, install: &str) -> Result<PathBuf, Failed> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("`{name}` is not installed (not on PATH): {install}").into())
}

pub const KUBECTL_INSTALL: &str = "install kubectl 1.21 or newer, or Debian's kubectl 1.20: \
    `apt-get install kubernetes-client` (cargo xtask test installs it when kubectl is missing)";
pub const PROMTOOL_INSTALL: &str =
    "`apt-get install prometheus` (Debian's package ships promtool; cargo xtask test installs it)";

/// Runs `cmd`; a failure to start it or a non-zero exit is a failure naming the command, with
/// its output.
pub fn run(cmd: &mut Command) -> Result<Output, Failed> {
    let shown = display(cmd);
    let out = cmd.output().map_err(|e| format!("running `{shown}`: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{shown}` failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(out)
}

pub fn display(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `kubectl kustomize DIR` (DIR from the root): the rendered objects.
pub fn kustomize(dir_rel: &str) -> Result<Vec<Value>, Failed> {
    let text = kustomize_text(&root().join(dir_rel))?;
    yaml::parse_all(&text).map_err(|e| format!("`kubectl kustomize {dir_rel}` printed {e}").into())
}

/// `kubectl kustomize DIR`: its output as text.
pub fn kustomize_text(dir: &Path) -> Result<String, Failed> {
    let kubectl = tool("kubectl", KUBECTL_INSTALL)?;
    let out = run(Command::new(kubectl).arg("kustomize").arg(dir))?;
    String::from_utf8(out.stdout).map_err(|_| format!("`kubectl kustomize {}` printed non-UTF-8", dir.display()).into())
}

/// The problems one trial found: it goes on checking after the first, and fails with all of them.
#[derive(Default)]
pub struct Problems(Vec<String>);

impl Problems {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, problem: impl Into<String>) {
        self.0.push(problem.into());
    }

    /// Records `problem` unless `ok`.
    pub fn check(&mut self, ok: bool, problem: impl FnOnce() -> String) {
        if !ok {
            self.0.push(problem());
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn finish(self) -> Result<(), Failed> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(format!("{} problem(s):\n- {}", self.0.len(), self.0.join("\n- ")).into())
        }
    }
}

/// The object of `kind` named `name` among `objects`.
pub fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    objects.iter().find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
}

/// `kind/name` of every object, sorted.
pub fn kinds(objects: &[Value]) -> Vec<String> {
    let mut v: Vec<String> = objects
        .iter()
        .map(|o| format!("{}/{}", o["kind"].as_str().unwrap_or("?"), o["metadata"]["name"].as_str().unwrap_or("?")))
        .collect();
    v.sort();
    v
}

pub fn strings(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

pub const ALERTS: &str = "deploy/prometheus/alerts.yaml";
pub const DASHBOARD: &str = "deploy/grafana/observer-dashboard.json";
pub const RUNBOOKS: &str = "deploy/runbooks";
pub const DEPLOY_README: &str = "deploy/README.md";

/// One alerting rule of the rule file.
pub struct Alert {
    pub name: String,
    pub expr: String,
    pub annotations: serde_json::Map<String, Value>,
}

/// The alerting rules of `deploy/prometheus/alerts.yaml`.
pub fn alerts() -> Result<Vec<Alert>, Failed> {
    let doc = yaml::parse_one(&read(ALERTS)?).map_err(|e| format!("{ALERTS}: {e}"))?;
    let mut alerts = Vec::new();
    for group in doc["groups"].as_array().into_iter().flatten() {
        for rule in group["rules"].as_array().into_iter().flatten() {
            if let Some(name) = rule["alert"].as_str() {
                alerts.push(Alert {
                    name: name.to_string(),
                    expr: rule["expr"].as_str().unwrap_or_default().to_string(),
                    annotations: rule["annotations"].as_object().cloned().unwrap_or_default(),
                });
            }
        }
    }
    if alerts.is_empty() {
        return Err(format!("{ALERTS} has no alerting rules").into());
    }
    Ok(alerts)
}

/// A PromQL expression and where it was found.
pub struct Expr {
    /// The file, from the repository root.
    pub file: String,
    /// Where in the file: the alert, the panel and query, the code block.
    pub at: String,
    pub expr: String,
}

/// The dashboard's template variables and the concrete values its expressions are checked with.
pub const DASHBOARD_VARIABLES: &[(&str, &str)] = &[
    ("__rate_interval", "1m"),
    ("__interval", "1m"),
    ("__range", "1h"),
    ("node", "node-a"),
    ("namespace", "shop"),
    ("pod", "nginx-6d4cf56db6-x2k4q"),
];

/// Replaces `$name` and `${name}` by the values of [`DASHBOARD_VARIABLES`]; fails on any other
/// `$variable` (a `$1` of label_replace is no variable).
pub fn substitute(expr: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, len) = if let Some(inner) = after.strip_prefix('{') {
            let end = inner.find('}').ok_or_else(|| format!("unclosed ${{ in `{expr}`"))?;
            (&inner[..end], end + 2)
        } else {
            let end = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
            (&after[..end], end)
        };
        if name.is_empty() || name.chars().all(|c| c.is_ascii_digit()) {
            out.push('$');
            rest = after;
            continue;
        }
        let value = DASHBOARD_VARIABLES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
            .ok_or_else(|| format!("unknown template variable ${name}"))?;
        out.push_str(value);
        rest = &after[len..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Every panel of the dashboard, those inside collapsed rows included.
pub fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut all = Vec::new();
    for p in dashboard["panels"].as_array().into_iter().flatten() {
        all.push(p);
        all.extend(p["panels"].as_array().into_iter().flatten());
    }
    all
}

/// The dashboard, parsed.
pub fn dashboard() -> Result<Value, Failed> {
    serde_json::from_str(&read(DASHBOARD)?).map_err(|e| format!("{DASHBOARD} is not valid JSON: {e}").into())
}

/// The dashboard's expressions, as written (with `$variables`): every panel query, and the
/// series selector of every `label_values(SELECTOR, label)` variable query.
pub fn dashboard_exprs(dashboard: &Value) -> Vec<Expr> {
    let mut exprs = Vec::new();
    for p in panels(dashboard) {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                exprs.push(Expr {
                    file: DASHBOARD.to_string(),
                    at: format!(
                        "panel {} \"{}\", query {}",
                        p["id"],
                        p["title"].as_str().unwrap_or(""),
                        t["refId"].as_str().unwrap_or("?")
                    ),
                    expr: e.to_string(),
                });
            }
        }
    }
    for v in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        let q = v["query"]["query"].as_str().or_else(|| v["query"].as_str()).unwrap_or_default();
        if let Some(inner) = q.strip_prefix("label_values(").and_then(|s| s.strip_suffix(')')) {
            let selector = inner.rsplit_once(',').map_or(inner, |(sel, _label)| sel).trim();
            exprs.push(Expr {
                file: DASHBOARD.to_string(),
                at: format!("variable {} (label_values selector)", v["name"]),
                expr: selector.to_string(),
            });
        }
    }
    exprs
}

/// The ```promql code blocks of a Markdown file, one expression each.
pub fn markdown_promql(file: &str) -> Result<Vec<Expr>, Failed> {
    let text = read(file)?;
    let mut exprs = Vec::new();
    let mut block: Option<(usize, String)> = None;
    for (n, line) in text.lines().enumerate() {
        match &mut block {
            None if line.trim_start().starts_with("```promql") => block = Some((n + 1, String::new())),
            None => {}
            Some((start, body)) => {
                if line.trim_start().starts_with("```") {
                    exprs.push(Expr {
                        file: file.to_string(),
                        at: format!("code block at line {start}"),
                        expr: body.trim().to_string(),
                    });
                    block = None;
                } else {
                    body.push_str(line);
                    body.push('\n');
                }
            }
        }
    }
    Ok(exprs)
}

/// Every PromQL expression of `deploy/`: the alerts, the dashboard (with its variables
/// substituted), and the promql blocks of the runbooks and deploy/README.md.
pub fn all_exprs() -> Result<(Vec<Expr>, Vec<String>), Failed> {
    let mut problems = Vec::new();
    let mut exprs: Vec<Expr> = alerts()?
        .into_iter()
        .map(|a| Expr { file: ALERTS.to_string(), at: format!("alert {}", a.name), expr: a.expr })
        .collect();
    for mut e in dashboard_exprs(&dashboard()?) {
        match substitute(&e.expr) {
            Ok(s) => {
                e.expr = s;
                exprs.push(e);
            }
            Err(why) => problems.push(format!("{} ({}): `{}`: {why}", e.file, e.at, e.expr)),
        }
    }
    for file in files(RUNBOOKS, ".md")?.iter().chain(std::iter::once(&DEPLOY_README.to_string())) {
        exprs.extend(markdown_promql(file)?);
    }
    Ok((exprs, problems))
}

/// The `observer_*` metric names an expression uses.
pub fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let is_name = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let mut i = 0;
    while let Some(off) = expr[i..].find("observer_") {
        let start = i + off;
        let mut end = start;
        while end < bytes.len() && is_name(bytes[end]) {
            end += 1;
        }
        if start == 0 || !is_name(bytes[start - 1]) {
            names.push(expr[start..end].to_string());
        }
        i = end.max(start + 1);
    }
    names
}
