//! Checks of `deploy/`: the Kubernetes manifests, the Prometheus alerts and their unit tests, the
//! runbooks and the Grafana dashboard, all offline once the schema validators are installed.
//!
//! - `kustomize`: `kubectl kustomize` renders both overlays, the API-watch variant and the
//!   monitoring kustomizations, with exactly the objects, privileges and mounts intended; the
//!   PrometheusRule is generated from the rule file.
//! - `schemas`: the rendered objects pass strict schema validation (Kubernetes and the Prometheus
//!   Operator's CRDs), with validators pinned in `requirements.txt` and installed once into a venv
//!   under `target/`.
//! - `promql`: `promtool check rules` and `promtool test rules`; every alert has a firing and a
//!   silent unit test and a runbook; every PromQL expression (rules, dashboard, runbooks, README)
//!   parses.
//! - `dashboard`: the dashboard's variables and panels.
//! - `metrics`: every `observer_*` name used anywhere in `deploy/` is one a real daemon exports.
//!
//! Tools come from the machine: `kubectl` (or Debian's `kubernetes-client`), `promtool` (Debian's
//! `prometheus`), `python3` with `venv` (Debian's `python3-venv`); `cargo xtask test` installs
//! them. A missing tool fails its trial with the command that installs it: nothing is skipped.
//! The metric-name trial starts the daemon, so it needs root, like the e2e suite.
//!
//! `OBSERVER_BLESS=1` rewrites the generated PrometheusRule instead of comparing it.

mod dashboard;
mod kustomize;
mod metrics;
mod promql;
mod schemas;
mod support;
mod yaml;

use libtest_mimic::{Arguments, Trial};

fn main() {
    let args = Arguments::from_args();
    let trials = vec![
        Trial::test("kustomize_renders_both_overlays_with_the_intended_privileges", kustomize::overlays),
        Trial::test(
            "kustomize_renders_the_monitoring_and_api_watch_kustomizations",
            kustomize::monitoring_and_api_watch,
        ),
        Trial::test("the_image_is_overridable_with_kustomize_images", kustomize::image_override),
        Trial::test(
            "the_prometheus_rule_resource_is_generated_from_the_rule_file",
            kustomize::prometheus_rule_is_generated,
        ),
        Trial::test("rendered_manifests_pass_strict_kubernetes_and_prometheus_operator_schemas", schemas::validate),
        Trial::test("promtool_checks_the_rules_and_passes_their_unit_tests", promql::promtool_rules),
        Trial::test("every_alert_has_a_firing_and_a_silent_unit_test", promql::every_alert_tested),
        Trial::test("every_alert_links_a_runbook_that_says_what_to_do", promql::runbooks),
        Trial::test("every_promql_expression_in_rules_dashboard_and_runbooks_parses", promql::expressions_parse),
        Trial::test("the_dashboard_has_its_variables_and_panels", dashboard::structure),
        Trial::test("every_observer_metric_used_in_deploy_is_exported_by_the_daemon", metrics::names_are_exported),
    ];
    libtest_mimic::run(&args, trials).exit();
}
