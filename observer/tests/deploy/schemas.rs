//! Strict schema validation of every rendered kustomization: Kubernetes' own schemas
//! (kubernetes-validate) and the Prometheus Operator's CRDs (cloudcoil's generated models), both
//! from PyPI, pinned in requirements.txt and installed once into a venv under `target/`; later
//! runs are offline.
use std::{path::PathBuf, process::Command};

use libtest_mimic::Failed;

use crate::{
    kustomize::{API_WATCH, LEAST_PRIVILEGE, PODMONITOR, PRIVILEGED, RULES, SERVICEMONITOR},
    support,
};

/// The Kubernetes versions the manifests are validated for: the oldest this deployment claims,
/// the kubectl of the project's machines, and the newest kubernetes-validate 1.37.0 knows.
const KUBERNETES: &str = "1.28,1.32,1.37";
const REQUIREMENTS: &str = "observer/tests/deploy/requirements.txt";
const VALIDATOR: &str = "observer/tests/deploy/validate.py";

pub fn validate() -> Result<(), Failed> {
    let dir = support::scratch("deploy-rendered")?;
    let mut files = Vec::new();
    for kustomization in [LEAST_PRIVILEGE, PRIVILEGED, API_WATCH, SERVICEMONITOR, PODMONITOR, RULES] {
        let text = support::kustomize_text(&support::root().join(kustomization))?;
        let file = dir.join(kustomization.replace('/', "_") + ".yaml");
        std::fs::write(&file, text).map_err(|e| format!("writing {}: {e}", file.display()))?;
        files.push(format!("{kustomization}={}", file.display()));
    }
    let python = venv()?;
    let mut check = Command::new(python);
    check.arg(support::root().join(VALIDATOR)).args(["--kubernetes", KUBERNETES]).args(&files);
    let out = check.output().map_err(|e| format!("running {VALIDATOR}: {e}"))?;
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        return Err(format!("strict schema validation failed ({VALIDATOR}):\n{report}").into());
    }
    println!("{}", report.trim_end());
    Ok(())
}

/// The venv's python with the pinned validators, made on first use; reused (offline) while
/// requirements.txt is unchanged.
fn venv() -> Result<PathBuf, Failed> {
    let requirements = support::read(REQUIREMENTS)?;
    let dir = support::scratch("deploy-venv")?;
    let python = dir.join("bin").join("python");
    let stamp = dir.join("installed-requirements.txt");
    if python.is_file() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == requirements) {
        return Ok(python);
    }
    let python3 =
        support::tool("python3", "`apt-get install python3 python3-venv` (cargo xtask test installs python3-venv)")?;
    let _ = std::fs::remove_dir_all(&dir);
    support::run(Command::new(python3).args(["-m", "venv"]).arg(&dir)).map_err(|e| {
        format!(
            "{}\ncreating the validators' venv needs Python's venv module: `apt-get install python3-venv`",
            e.message().unwrap_or_default()
        )
    })?;
    support::run(
        Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-input", "-r"])
            .arg(support::root().join(REQUIREMENTS)),
    )
    .map_err(|e| {
        format!(
            "{}\ninstalling the pinned schema validators ({REQUIREMENTS}) into {} needs PyPI once; later runs reuse the venv offline",
            e.message().unwrap_or_default(),
            dir.display()
        )
    })?;
    std::fs::write(&stamp, requirements).map_err(|e| format!("writing {}: {e}", stamp.display()))?;
    Ok(python)
}
