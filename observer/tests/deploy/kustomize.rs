//! `kubectl kustomize` renders every kustomization of deploy/kubernetes with the objects and
//! privileges intended; the PrometheusRule is the rule file, wrapped.
use std::{collections::BTreeSet, path::Path, process::Command};

use libtest_mimic::Failed;
use serde_json::{Value, json};

use crate::{
    support::{self, ALERTS, DEPLOY_README, Problems, find, kinds, strings},
    yaml,
};

pub const LEAST_PRIVILEGE: &str = "deploy/kubernetes/overlays/least-privilege";
pub const PRIVILEGED: &str = "deploy/kubernetes/overlays/privileged";
pub const API_WATCH: &str = "deploy/kubernetes/api-watch";
pub const SERVICEMONITOR: &str = "deploy/kubernetes/monitoring/servicemonitor";
pub const PODMONITOR: &str = "deploy/kubernetes/monitoring/podmonitor";
pub const RULES: &str = "deploy/kubernetes/monitoring/rules";
const CAPABILITIES_PATCH: &str = "deploy/kubernetes/overlays/least-privilege/capabilities.yaml";
const PROMETHEUS_RULE: &str = "deploy/kubernetes/monitoring/rules/prometheusrule.yaml";

const OBSERVER: &str = env!("CARGO_BIN_EXE_observer");

/// The host paths the DaemonSet mounts: (path, hostPath type, mount path). The runtimes' socket
/// directories are DirectoryOrCreate so that a node without that runtime still starts the pod.
const HOST_PATHS: &[(&str, &str, &str)] = &[
    ("/sys/kernel/tracing", "Directory", "/sys/kernel/tracing"),
    ("/sys/kernel/btf", "Directory", "/sys/kernel/btf"),
    ("/sys/fs/cgroup", "Directory", "/sys/fs/cgroup"),
    ("/run/containerd", "DirectoryOrCreate", "/run/containerd"),
    ("/run/crio", "DirectoryOrCreate", "/run/crio"),
    ("/run/k3s/containerd", "DirectoryOrCreate", "/run/k3s/containerd"),
];

const DS: &str = "/spec/template/spec";
const CONTAINER: &str = "/spec/template/spec/containers/0";

pub fn overlays() -> Result<(), Failed> {
    let caps = patch_capabilities()?;
    let least = support::kustomize(LEAST_PRIVILEGE)?;
    let privileged = support::kustomize(PRIVILEGED)?;
    let help = observer_run_help()?;
    let mut p = Problems::new();
    for (dir, objects) in [(LEAST_PRIVILEGE, &least), (PRIVILEGED, &privileged)] {
        node_agent(&mut p, dir, objects, &help);
    }

    // least-privilege: no privileged, exactly the capabilities of the patch, no escalation.
    if let Some(ds) = find(&least, "DaemonSet", "observer") {
        let sc = ds.pointer(&format!("{CONTAINER}/securityContext")).cloned().unwrap_or(Value::Null);
        let at = format!("{LEAST_PRIVILEGE}: DaemonSet/observer container securityContext");
        p.check(sc["privileged"] == false, || format!("{at}: privileged is {}, want false", sc["privileged"]));
        p.check(sc["allowPrivilegeEscalation"] == false, || {
            format!("{at}: allowPrivilegeEscalation is {}, want false", sc["allowPrivilegeEscalation"])
        });
        p.check(strings(&sc["capabilities"]["drop"]) == ["ALL"], || {
            format!("{at}: capabilities.drop is {}, want [ALL]", sc["capabilities"]["drop"])
        });
        let added = strings(&sc["capabilities"]["add"]);
        p.check(added == caps, || {
            format!("{at}: capabilities.add is {added:?}, want exactly {caps:?} ({CAPABILITIES_PATCH})")
        });
        p.check(sc["seccompProfile"]["type"] == "RuntimeDefault", || {
            format!("{at}: seccompProfile is {}, want RuntimeDefault", sc["seccompProfile"])
        });
    }
    // privileged: privileged, nothing else different.
    if let Some(ds) = find(&privileged, "DaemonSet", "observer") {
        let sc = ds.pointer(&format!("{CONTAINER}/securityContext")).cloned().unwrap_or(Value::Null);
        let at = format!("{PRIVILEGED}: DaemonSet/observer container securityContext");
        p.check(sc["privileged"] == true, || format!("{at}: privileged is {}, want true", sc["privileged"]));
        p.check(sc["allowPrivilegeEscalation"] != false, || {
            format!("{at}: allowPrivilegeEscalation false contradicts privileged")
        });
    }
    // The overlays differ in the container's securityContext only.
    let without_security = |objects: &[Value]| -> Vec<Value> {
        objects
            .iter()
            .cloned()
            .map(|mut o| {
                if let Some(c) = o.pointer_mut(CONTAINER).and_then(Value::as_object_mut) {
                    c.remove("securityContext");
                }
                o
            })
            .collect()
    };
    p.check(without_security(&least) == without_security(&privileged), || {
        format!("{LEAST_PRIVILEGE} and {PRIVILEGED} render different objects beyond the container's securityContext")
    });

    readme_capability_table(&mut p, &caps)?;
    p.finish()
}

/// The capabilities the least-privilege patch adds, in its order.
fn patch_capabilities() -> Result<Vec<String>, Failed> {
    let patch =
        yaml::parse_one(&support::read(CAPABILITIES_PATCH)?).map_err(|e| format!("{CAPABILITIES_PATCH}: {e}"))?;
    let caps =
        strings(&patch.pointer(&format!("{CONTAINER}/securityContext/capabilities/add")).cloned().unwrap_or_default());
    if caps.is_empty() {
        return Err(format!(
            "{CAPABILITIES_PATCH} adds no capability (containers[0].securityContext.capabilities.add)"
        )
        .into());
    }
    Ok(caps)
}

/// `observer run --help`, for the flags the DaemonSet passes.
fn observer_run_help() -> Result<String, Failed> {
    let out = support::run(Command::new(OBSERVER).args(["run", "--help"]))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What both overlays render alike: the five objects, the node agent's scheduling, probes,
/// resources, mounts, Service and NetworkPolicy.
fn node_agent(p: &mut Problems, dir: &str, objects: &[Value], help: &str) {
    let want = [
        "DaemonSet/observer",
        "Namespace/observer",
        "NetworkPolicy/observer-metrics",
        "Service/observer",
        "ServiceAccount/observer",
    ];
    let got = kinds(objects);
    p.check(got == want, || format!("{dir}: renders {got:?}, want {want:?}"));
    for o in objects {
        if o["kind"] != "Namespace" {
            p.check(o["metadata"]["namespace"] == "observer", || {
                format!(
                    "{dir}: {}/{} is in namespace {}, want observer",
                    o["kind"], o["metadata"]["name"], o["metadata"]["namespace"]
                )
            });
        }
    }
    if let Some(ns) = find(objects, "Namespace", "observer") {
        let enforce = &ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"];
        p.check(enforce == "privileged", || format!("{dir}: Namespace/observer has Pod Security enforce {enforce}, want privileged (hostPID, hostPath, capabilities)"));
    }
    if let Some(sa) = find(objects, "ServiceAccount", "observer") {
        p.check(sa["automountServiceAccountToken"] == false, || {
            format!("{dir}: ServiceAccount/observer mounts its token")
        });
    }
    let Some(ds) = find(objects, "DaemonSet", "observer") else { return };
    let at = format!("{dir}: DaemonSet/observer");
    let spec = ds.pointer(DS).cloned().unwrap_or(Value::Null);
    let c = ds.pointer(CONTAINER).cloned().unwrap_or(Value::Null);
    let pod_labels = ds.pointer("/spec/template/metadata/labels").cloned().unwrap_or(Value::Null);

    p.check(spec["hostPID"] == true, || format!("{at}: hostPID is {}, want true", spec["hostPID"]));
    p.check(spec["hostNetwork"] != true, || format!("{at}: hostNetwork is true; the base does not need it"));
    p.check(spec["nodeSelector"] == json!({"kubernetes.io/os": "linux"}), || {
        format!("{at}: nodeSelector is {}, want kubernetes.io/os: linux", spec["nodeSelector"])
    });
    let tolerates_all = spec["tolerations"].as_array().is_some_and(|t| {
        t.iter().any(|t| t["operator"] == "Exists" && t.get("key").is_none() && t.get("effect").is_none())
    });
    p.check(tolerates_all, || format!("{at}: no toleration with operator Exists and no key/effect (every node)"));
    p.check(spec["serviceAccountName"] == "observer", || {
        format!("{at}: serviceAccountName is {}", spec["serviceAccountName"])
    });
    p.check(spec["automountServiceAccountToken"] == false, || format!("{at}: the pod mounts a service account token"));
    p.check(spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", || {
        format!("{at}: pod seccompProfile is {}, want RuntimeDefault", spec["securityContext"]["seccompProfile"])
    });
    let annotations = ds.pointer("/spec/template/metadata/annotations").and_then(Value::as_object);
    p.check(annotations.is_none_or(|a| !a.keys().any(|k| k.starts_with("prometheus.io/"))), || {
        format!("{at}: prometheus.io/* annotations: the classic kubernetes-pods job would clobber observer's namespace/pod labels")
    });

    let containers = spec["containers"].as_array().map_or(0, Vec::len);
    p.check(containers == 1 && c["name"] == "observer", || format!("{at}: want one container named observer"));
    p.check(c["image"] == "observer:0.1.0", || {
        format!("{at}: image is {}, want the placeholder observer:0.1.0", c["image"])
    });
    let args = strings(&c["args"]);
    p.check(args.first().map(String::as_str) == Some("run"), || format!("{at}: args {args:?} do not start with `run`"));
    p.check(args.iter().any(|a| a == "--listen=0.0.0.0:9645"), || {
        format!("{at}: args {args:?} lack --listen=0.0.0.0:9645")
    });
    for a in args.iter().filter(|a| a.starts_with("--")) {
        let flag = a.split('=').next().unwrap_or(a);
        let known = help.lines().any(|l| l.trim_start().split([' ', ',']).any(|w| w == flag));
        p.check(known, || format!("{at}: arg {a}: `observer run --help` has no flag {flag}"));
    }
    let port_names: Vec<String> =
        c["ports"].as_array().into_iter().flatten().filter_map(|p| p["name"].as_str().map(str::to_owned)).collect();
    p.check(c["ports"] == json!([{"name": "metrics", "containerPort": 9645, "protocol": "TCP"}]), || {
        format!("{at}: ports are {}, want metrics 9645/TCP", c["ports"])
    });
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let get = &c[probe]["httpGet"];
        p.check(get["path"] == "/healthz" && get["port"] == "metrics", || {
            format!("{at}: {probe} is {}, want httpGet /healthz on port metrics", c[probe])
        });
    }
    for (kind, resource) in [("requests", "cpu"), ("requests", "memory"), ("limits", "cpu"), ("limits", "memory")] {
        p.check(c["resources"][kind][resource].is_string(), || format!("{at}: no resources.{kind}.{resource}"));
    }
    p.check(c["securityContext"]["readOnlyRootFilesystem"] == true, || {
        format!("{at}: the root filesystem is writable")
    });

    let volumes: Vec<&Value> = spec["volumes"].as_array().into_iter().flatten().collect();
    let mounts: Vec<&Value> = c["volumeMounts"].as_array().into_iter().flatten().collect();
    p.check(volumes.len() == HOST_PATHS.len() && mounts.len() == HOST_PATHS.len(), || {
        format!(
            "{at}: {} volumes and {} mounts, want the {} host paths {HOST_PATHS:?}",
            volumes.len(),
            mounts.len(),
            HOST_PATHS.len()
        )
    });
    for (path, kind, mount_path) in HOST_PATHS {
        let Some(v) = volumes.iter().find(|v| v["hostPath"]["path"] == *path) else {
            p.push(format!("{at}: no hostPath volume for {path}"));
            continue;
        };
        p.check(v["hostPath"]["type"] == *kind, || {
            format!("{at}: hostPath {path} has type {}, want {kind}", v["hostPath"]["type"])
        });
        let Some(m) = mounts.iter().find(|m| m["name"] == v["name"]) else {
            p.push(format!("{at}: volume {} ({path}) is not mounted", v["name"]));
            continue;
        };
        p.check(m["mountPath"] == *mount_path, || {
            format!("{at}: {path} is mounted at {}, want {mount_path}", m["mountPath"])
        });
        p.check(m["readOnly"] == true, || format!("{at}: {path} is mounted read-write"));
    }
    for v in &volumes {
        p.check(v.get("hostPath").is_some(), || format!("{at}: volume {} is not a hostPath", v["name"]));
    }

    let selects_pods = |selector: &Value| {
        selector.as_object().is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| pod_labels[k.as_str()] == *v))
    };
    if let Some(svc) = find(objects, "Service", "observer") {
        p.check(svc["spec"]["clusterIP"] == "None", || format!("{dir}: Service/observer is not headless"));
        p.check(selects_pods(&svc["spec"]["selector"]), || {
            format!("{dir}: Service/observer does not select the DaemonSet's pods")
        });
        p.check(
            svc["spec"]["ports"]
                == json!([{"name": "metrics", "port": 9645, "targetPort": "metrics", "protocol": "TCP"}]),
            || format!("{dir}: Service/observer ports are {}", svc["spec"]["ports"]),
        );
    }
    if let Some(np) = find(objects, "NetworkPolicy", "observer-metrics") {
        let at = format!("{dir}: NetworkPolicy/observer-metrics");
        p.check(selects_pods(&np["spec"]["podSelector"]["matchLabels"]), || {
            format!("{at}: does not select the DaemonSet's pods")
        });
        p.check(strings(&np["spec"]["policyTypes"]) == ["Ingress"], || {
            format!("{at}: policyTypes {}", np["spec"]["policyTypes"])
        });
        let ingress = np["spec"]["ingress"].as_array().cloned().unwrap_or_default();
        p.check(ingress.len() == 1, || format!("{at}: {} ingress rules, want one (the scraper)", ingress.len()));
        if let Some(rule) = ingress.first() {
            let ports = rule["ports"].as_array().cloned().unwrap_or_default();
            let only_metrics = ports.len() == 1
                && ports[0]["protocol"] == "TCP"
                && (ports[0]["port"] == 9645
                    || ports[0]["port"].as_str().is_some_and(|n| port_names.iter().any(|p| p == n)));
            p.check(only_metrics, || format!("{at}: admits ports {}, want only the metrics port", rule["ports"]));
            let from = rule["from"].as_array().cloned().unwrap_or_default();
            p.check(
                !from.is_empty()
                    && from.iter().all(|f| f.get("namespaceSelector").is_some() && f.get("podSelector").is_some()),
                || format!("{at}: every `from` peer must name the scraper's namespace and pods, got {}", rule["from"]),
            );
        }
    }
}

/// deploy/README.md's capability table names exactly the capabilities of the patch.
fn readme_capability_table(p: &mut Problems, caps: &[String]) -> Result<(), Failed> {
    let readme = support::read(DEPLOY_README)?;
    let Some(section) = readme.split("\n### ").find(|s| s.starts_with("Capabilities")) else {
        p.push(format!("{DEPLOY_README} has no \"### Capabilities\" section"));
        return Ok(());
    };
    let in_table: BTreeSet<String> = section
        .lines()
        .filter(|l| l.starts_with('|'))
        .filter_map(|l| l.split('|').nth(1))
        .map(str::trim)
        .filter_map(|cell| cell.strip_prefix("`CAP_").and_then(|c| c.strip_suffix('`')))
        .map(str::to_owned)
        .collect();
    let in_patch: BTreeSet<String> = caps.iter().cloned().collect();
    p.check(in_table == in_patch, || {
        format!(
            "{DEPLOY_README}, \"Capabilities\": the table lists {in_table:?}, {CAPABILITIES_PATCH} adds {in_patch:?}"
        )
    });
    Ok(())
}

pub fn monitoring_and_api_watch() -> Result<(), Failed> {
    let base = support::kustomize(LEAST_PRIVILEGE)?;
    let mut p = Problems::new();
    let service_labels =
        find(&base, "Service", "observer").map(|s| s["metadata"]["labels"].clone()).unwrap_or_default();
    let pod_labels = find(&base, "DaemonSet", "observer")
        .and_then(|d| d.pointer("/spec/template/metadata/labels").cloned())
        .unwrap_or_default();
    let selects = |selector: &Value, labels: &Value| {
        selector.as_object().is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels[k.as_str()] == *v))
    };
    let scrape_endpoint = |p: &mut Problems, at: &str, endpoint: &Value| {
        p.check(endpoint["port"] == "metrics", || format!("{at}: scrapes port {}, want metrics", endpoint["port"]));
        let relabelings = endpoint["relabelings"].as_array().cloned().unwrap_or_default();
        let node = relabelings.iter().any(|r| {
            strings(&r["sourceLabels"]) == ["__meta_kubernetes_pod_node_name"]
                && r["targetLabel"] == "node"
                && (r.get("action").is_none() || r["action"] == "replace")
        });
        p.check(node, || format!("{at}: no relabeling of __meta_kubernetes_pod_node_name into `node`"));
        let drop = relabelings.iter().any(|r| r["action"] == "labeldrop" && r["regex"] == "(namespace|pod|container)");
        p.check(drop, || {
            format!("{at}: no labeldrop of the operator's namespace/pod/container target labels (they clobber observer's own)")
        });
    };

    let sm = support::kustomize(SERVICEMONITOR)?;
    p.check(kinds(&sm) == ["PrometheusRule/observer", "ServiceMonitor/observer"], || {
        format!("{SERVICEMONITOR}: renders {:?}", kinds(&sm))
    });
    if let Some(o) = find(&sm, "ServiceMonitor", "observer") {
        let at = format!("{SERVICEMONITOR}: ServiceMonitor/observer");
        p.check(o["metadata"]["namespace"] == "observer", || format!("{at}: namespace {}", o["metadata"]["namespace"]));
        p.check(selects(&o["spec"]["selector"]["matchLabels"], &service_labels), || {
            format!("{at}: does not select Service/observer")
        });
        p.check(strings(&o["spec"]["namespaceSelector"]["matchNames"]) == ["observer"], || {
            format!("{at}: namespaceSelector")
        });
        let endpoints = o["spec"]["endpoints"].as_array().cloned().unwrap_or_default();
        p.check(endpoints.len() == 1, || format!("{at}: {} endpoints, want 1", endpoints.len()));
        if let Some(e) = endpoints.first() {
            scrape_endpoint(&mut p, &at, e);
        }
    }
    let pm = support::kustomize(PODMONITOR)?;
    p.check(kinds(&pm) == ["PodMonitor/observer", "PrometheusRule/observer"], || {
        format!("{PODMONITOR}: renders {:?}", kinds(&pm))
    });
    if let Some(o) = find(&pm, "PodMonitor", "observer") {
        let at = format!("{PODMONITOR}: PodMonitor/observer");
        p.check(o["metadata"]["namespace"] == "observer", || format!("{at}: namespace {}", o["metadata"]["namespace"]));
        p.check(selects(&o["spec"]["selector"]["matchLabels"], &pod_labels), || {
            format!("{at}: does not select the DaemonSet's pods")
        });
        let job = o["spec"]["jobLabel"].as_str().map(|l| pod_labels[l].clone()).unwrap_or_default();
        p.check(job == "observer", || {
            format!("{at}: the job would not be `observer` (jobLabel {})", o["spec"]["jobLabel"])
        });
        let endpoints = o["spec"]["podMetricsEndpoints"].as_array().cloned().unwrap_or_default();
        p.check(endpoints.len() == 1, || format!("{at}: {} endpoints, want 1", endpoints.len()));
        if let Some(e) = endpoints.first() {
            scrape_endpoint(&mut p, &at, e);
        }
    }
    let rules = support::kustomize(RULES)?;
    p.check(kinds(&rules) == ["PrometheusRule/observer"], || format!("{RULES}: renders {:?}", kinds(&rules)));
    for o in rules.iter().chain(&sm).chain(&pm) {
        p.check(o["metadata"]["namespace"] == "observer", || {
            format!("monitoring: {}/{} outside namespace observer", o["kind"], o["metadata"]["name"])
        });
    }

    let aw = support::kustomize(API_WATCH)?;
    let mut want = kinds(&base);
    want.extend(["ClusterRole/observer-pod-reader".to_string(), "ClusterRoleBinding/observer-pod-reader".to_string()]);
    want.sort();
    p.check(kinds(&aw) == want, || format!("{API_WATCH}: renders {:?}, want {want:?}", kinds(&aw)));
    if let Some(role) = find(&aw, "ClusterRole", "observer-pod-reader") {
        let rules = json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]);
        p.check(role["rules"] == rules, || {
            format!("{API_WATCH}: ClusterRole rules are {}, want exactly {rules}", role["rules"])
        });
    }
    if let Some(b) = find(&aw, "ClusterRoleBinding", "observer-pod-reader") {
        p.check(b["roleRef"]["name"] == "observer-pod-reader" && b["roleRef"]["kind"] == "ClusterRole", || {
            format!("{API_WATCH}: binding roleRef {}", b["roleRef"])
        });
        p.check(
            b["subjects"] == json!([{"kind": "ServiceAccount", "name": "observer", "namespace": "observer"}]),
            || format!("{API_WATCH}: binding subjects {}", b["subjects"]),
        );
    }
    if let Some(sa) = find(&aw, "ServiceAccount", "observer") {
        p.check(sa["automountServiceAccountToken"] == true, || {
            format!("{API_WATCH}: ServiceAccount does not mount its token")
        });
    }
    if let (Some(ds), Some(lp)) = (find(&aw, "DaemonSet", "observer"), find(&base, "DaemonSet", "observer")) {
        p.check(ds.pointer(&format!("{DS}/automountServiceAccountToken")) == Some(&Value::Bool(true)), || {
            format!("{API_WATCH}: the pods do not mount the token")
        });
        let sc = |d: &Value| d.pointer(&format!("{CONTAINER}/securityContext")).cloned();
        p.check(sc(ds) == sc(lp), || {
            format!("{API_WATCH}: the container's privileges differ from {LEAST_PRIVILEGE}'s")
        });
    }
    p.finish()
}

pub fn image_override() -> Result<(), Failed> {
    let dir = support::scratch("deploy-image-override")?;
    let overlay = support::root().join(LEAST_PRIVILEGE);
    let relative = relative_path(&dir, &overlay)?;
    std::fs::write(
        dir.join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nbases:\n  - {relative}\nimages:\n  - name: observer\n    newName: registry.example.com/observer\n    newTag: 9.9.9\n"
        ),
    )
    .map_err(|e| format!("writing {}: {e}", dir.display()))?;
    let objects = yaml::parse_all(&support::kustomize_text(&dir)?)?;
    let image = find(&objects, "DaemonSet", "observer").and_then(|d| d.pointer(&format!("{CONTAINER}/image")).cloned());
    if image != Some(json!("registry.example.com/observer:9.9.9")) {
        return Err(format!(
            "an overlay of {LEAST_PRIVILEGE} with `images: [{{name: observer, newName: registry.example.com/observer, newTag: 9.9.9}}]` renders image {image:?}"
        )
        .into());
    }
    Ok(())
}

/// `to` relative to the directory `from` (both absolute).
fn relative_path(from: &Path, to: &Path) -> Result<String, Failed> {
    let canon = |p: &Path| p.canonicalize().map_err(|e| format!("{}: {e}", p.display()));
    let (from, to) = (canon(from)?, canon(to)?);
    let (a, b): (Vec<_>, Vec<_>) = (from.components().collect(), to.components().collect());
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut parts: Vec<String> = vec!["..".to_string(); a.len() - common];
    parts.extend(b[common..].iter().map(|c| c.as_os_str().to_string_lossy().into_owned()));
    Ok(parts.join("/"))
}

/// The PrometheusRule file for `alerts` (the rule file's text): its `groups:` under `spec:`.
pub fn prometheus_rule_text(alerts: &str) -> String {
    let mut out = String::from(
        "# GENERATED from deploy/prometheus/alerts.yaml: do not edit. After changing the alerts, run\n\
         #   OBSERVER_BLESS=1 cargo test -p observer --test deploy the_prometheus_rule_resource\n\
         # (the deploy test fails while this file and the rule file differ).\n\
         #\n\
         # The alerts for the Prometheus Operator. Its Prometheus must select this resource: add your\n\
         # ruleSelector's label (kube-prometheus-stack: `release: <helm release>`) with a patch.\n\
         apiVersion: monitoring.coreos.com/v1\n\
         kind: PrometheusRule\n\
         metadata:\n  name: observer\n  namespace: observer\n  labels:\n    app.kubernetes.io/name: observer\n\
         spec:\n",
    );
    let body = alerts.find("\ngroups:").map_or(alerts, |i| &alerts[i + 1..]);
    for line in body.lines() {
        if !line.is_empty() {
            out.push_str("  ");
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

pub fn prometheus_rule_is_generated() -> Result<(), Failed> {
    let alerts = support::read(ALERTS)?;
    let want = prometheus_rule_text(&alerts);
    if std::env::var_os("OBSERVER_BLESS").is_some() {
        std::fs::write(support::root().join(PROMETHEUS_RULE), &want)
            .map_err(|e| format!("writing {PROMETHEUS_RULE}: {e}"))?;
    }
    let got = support::read(PROMETHEUS_RULE)?;
    if got != want {
        return Err(format!(
            "{PROMETHEUS_RULE} is not generated from {ALERTS} as it is now: regenerate it with \
             `OBSERVER_BLESS=1 cargo test -p observer --test deploy the_prometheus_rule_resource`"
        )
        .into());
    }
    // The wrapping keeps the rules: the resource's groups are the rule file's, value for value.
    let rule = yaml::parse_one(&got).map_err(|e| format!("{PROMETHEUS_RULE}: {e}"))?;
    let file = yaml::parse_one(&alerts).map_err(|e| format!("{ALERTS}: {e}"))?;
    if rule["spec"]["groups"] != file["groups"] || file["groups"].is_null() {
        return Err(format!("{PROMETHEUS_RULE}: spec.groups differs from the groups of {ALERTS}").into());
    }
    Ok(())
}
