//! A fuzz run of the HTTP API from its own description: schemathesis (PyPI, pinned with its
//! dependencies in `requirements.txt`, installed once into a venv under `target/` as the deploy
//! suite installs its validators; later runs are offline) reads `/api/v1/openapi.json` from a
//! real daemon and sends what it generates from it, positive and negative, to every operation.
//! A server error, an undocumented status or content type, or an answer that does not match
//! its schema is a finding; any finding fails the test with schemathesis's report.
//!
//! Host only (it needs Python), like `deploy` and `runtime`: the QEMU kernel matrix packs only
//! `e2e`. The daemon watches a private, empty network namespace (`--netns`), so the run is the
//! same whatever else this machine does. Needs root, like the e2e suite. `OBSERVER_FUZZ_SEED`
//! picks another seed, `OBSERVER_FUZZ_EXAMPLES` more cases per operation.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use libtest_mimic::{Arguments, Failed, Trial};
use observer_testkit::{Daemon, daemon::Options};

const OBSERVER: &str = env!("CARGO_BIN_EXE_observer");
const REQUIREMENTS: &str = "observer/tests/api/requirements.txt";
const CONFIG: &str = "observer/tests/api/schemathesis.toml";

fn main() {
    let args = Arguments::from_args();
    let trials = vec![Trial::test("schemathesis_finds_nothing_against_the_openapi_description_of_a_real_daemon", fuzz)];
    libtest_mimic::run(&args, trials).exit();
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map_or_else(|| PathBuf::from(".."), Path::to_path_buf)
}

/// An empty network namespace, held by a process of its own until dropped.
struct PrivateNetns(Child);

impl PrivateNetns {
    fn new() -> Result<Self, Failed> {
        let child = Command::new("unshare")
            .args(["--net", "sleep", "infinity"])
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("`unshare --net sleep infinity` (util-linux): {e}"))?;
        // unshare execs sleep once the namespace is made.
        let ns = Self(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::read_link(ns.path()).ok() == std::fs::read_link("/proc/self/ns/net").ok() {
            if std::time::Instant::now() > deadline {
                return Err("unshare --net did not make a namespace (root needed)".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(ns)
    }

    fn path(&self) -> String {
        format!("/proc/{}/ns/net", self.0.id())
    }
}

impl Drop for PrivateNetns {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn fuzz() -> Result<(), Failed> {
    let schemathesis = venv()?;
    let ns = PrivateNetns::new()?;
    let daemon = Daemon::start(
        Path::new(OBSERVER),
        &["--netns", &ns.path()],
        &Options { ready_within: Duration::from_secs(120), ..Options::default() },
    )?;
    let seed = std::env::var("OBSERVER_FUZZ_SEED").unwrap_or_else(|_| "20261202".into());
    let examples = std::env::var("OBSERVER_FUZZ_EXAMPLES").unwrap_or_else(|_| "200".into());
    let report = Path::new(env!("CARGO_TARGET_TMPDIR")).join("api-fuzz-report");
    let mut run = Command::new(schemathesis);
    run.arg("--config-file")
        .arg(root().join(CONFIG))
        .arg("run")
        .arg(format!("{}/api/v1/openapi.json", daemon.endpoint()))
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            "--phases",
            "examples,coverage,fuzzing",
            "--mode",
            "all",
            "--seed",
            &seed,
            "--max-examples",
            &examples,
            "--request-timeout",
            "20",
            "--workers",
            "4",
            "--report",
            "junit",
            "--report-dir",
        ])
        .arg(&report)
        // It keeps a cache (.schemathesis/) in its working directory: under target/.
        .current_dir(Path::new(env!("CARGO_TARGET_TMPDIR")))
        .env("NO_COLOR", "1")
        .env("SCHEMATHESIS_HOOKS", "")
        .stdin(Stdio::null());
    let out = run.output().map_err(|e| format!("running schemathesis: {e}"))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let still_serving = daemon.get("/healthz").map(|(code, _)| code).unwrap_or(0);
    daemon.stop()?;
    if !out.status.success() {
        return Err(format!("schemathesis (seed {seed}) found problems ({}):\n{text}", out.status).into());
    }
    if still_serving != 200 {
        return Err(format!("the daemon stopped serving during the fuzz run:\n{text}").into());
    }
    println!("{}", text.trim_end());
    Ok(())
}

/// The venv's `schemathesis` with the pinned versions, made on first use; reused (offline)
/// while requirements.txt is unchanged.
fn venv() -> Result<PathBuf, Failed> {
    let requirements =
        std::fs::read_to_string(root().join(REQUIREMENTS)).map_err(|e| format!("reading {REQUIREMENTS}: {e}"))?;
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("api-venv");
    let tool = dir.join("bin").join("schemathesis");
    let stamp = dir.join("installed-requirements.txt");
    if tool.is_file() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == requirements) {
        return Ok(tool);
    }
    let _ = std::fs::remove_dir_all(&dir);
    run(Command::new("python3").args(["-m", "venv"]).arg(&dir)).map_err(|e| {
        format!("{e}\ncreating the fuzzer's venv needs python3 with its venv module: `apt-get install python3-venv`")
    })?;
    run(Command::new(dir.join("bin").join("python"))
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-input", "-r"])
        .arg(root().join(REQUIREMENTS)))
    .map_err(|e| {
        format!(
            "{e}\ninstalling the pinned fuzzer ({REQUIREMENTS}) into {} needs PyPI once; later runs reuse the venv offline",
            dir.display()
        )
    })?;
    std::fs::write(&stamp, requirements).map_err(|e| format!("writing {}: {e}", stamp.display()))?;
    Ok(tool)
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| format!("running {shown}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{shown} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}
