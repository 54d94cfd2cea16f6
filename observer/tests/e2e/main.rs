//! End-to-end tests: the real daemon, real kernel probes, real sockets in private network
//! namespaces, asserted through the daemon's real `/metrics` and status API.
//!
//! They need root (BPF, network namespaces). Without it they fail, naming what is missing; they
//! never skip. Scenarios share one daemon and tell their traffic apart by their processes'
//! command names and addresses, so they can run side by side.
//!
//! This file is the list of tests. The tests live in modules by subject (`basics`: the four
//! ways a connection ends on loopback; `intelligence`: the kinds beyond resets, containers,
//! cause pairing, state gauges; `lifecycle`: status, flags, signals; `query`: the event log's
//! filters, streams and the CLI's errors; `top`: the daemon's rates; `config`: flags, environment,
//! files, log formats; `kernel`: the verifier, the back end `auto` picks, cgroups by id;
//! `reliability`: overload and hostile peers); `support` holds what they share, `traffic` the scenario worker this binary
//! re-executes itself as. The daemon, HTTP, metrics and socket helpers come from
//! `observer-testkit`. `config`: flags, environment and file, the JSON log (completions and the man page are unit tests of `cli/docs.rs`: they need bash, which the QEMU guest lacks).

mod basics;
mod config;
mod http;
mod intelligence;
mod kernel;
mod lifecycle;
mod query;
mod reliability;
mod support;
mod top;
mod traffic;

use std::sync::OnceLock;

use libtest_mimic::{Arguments, Failed, Trial};
use observer_testkit::{Daemon, process::Signal};

static SHARED: OnceLock<Result<Daemon, String>> = OnceLock::new();

/// The daemon the scenarios that need no daemon of their own share, started on first use.
fn shared_daemon() -> Result<&'static Daemon, Failed> {
    SHARED
        .get_or_init(|| support::start_daemon(&[]).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| Failed::from(e.as_str()))
}

fn main() {
    if let Ok(role) = std::env::var(traffic::WORKER_ENV) {
        traffic::worker_main(&role);
    }
    let args = Arguments::from_args();
    let trials = vec![
        Trial::test("linger0_close_is_local_reset_for_server_and_peer_reset_for_client", basics::linger0_close),
        Trial::test(
            "close_with_unread_request_is_unread_data_with_abort_on_close_reason",
            basics::close_with_unread_data,
        ),
        Trial::test("connect_to_closed_port_is_refused_and_no_socket_reset_has_no_owner", basics::connect_refused),
        Trial::test("graceful_connections_are_closed_once_each_and_never_premature", basics::graceful),
        Trial::test("ipv6_linger0_close_is_local_reset_for_server_and_peer_reset_for_client", basics::linger0_close_v6),
        Trial::test("ipv6_close_with_unread_request_is_unread_data", basics::close_with_unread_data_v6),
        Trial::test("ipv6_connect_to_closed_port_is_refused", basics::connect_refused_v6),
        Trial::test("ipv6_graceful_connections_are_never_premature", basics::graceful_v6),
        Trial::test("eof_before_response_when_the_server_closes_without_answering", intelligence::eof_before_response),
        Trial::test("ipv6_eof_before_response", intelligence::eof_before_response_v6),
        Trial::test("abandoned_when_the_client_gives_up_before_the_answer", intelligence::abandoned),
        Trial::test(
            "http_truncations_keepalive_race_and_clean_exchanges_get_their_verdict_on_both_ends",
            http::http_verdicts,
        ),
        Trial::test("timeout_when_the_link_goes_down_under_tcp_user_timeout_is_the_clients", intelligence::timeout),
        Trial::test("connect_timeout_when_syn_retries_run_out", intelligence::connect_timeout),
        Trial::test("a_process_in_a_container_cgroup_gets_its_container_label", intelligence::container_label),
        Trial::test(
            "log_events_writes_each_record_as_one_json_line",
            lifecycle::log_events_writes_each_record_as_one_json_line,
        ),
        Trial::test("a_received_reset_names_the_sending_process_and_its_reason", intelligence::cause_pairing),
        Trial::test("close_wait_leak_shows_in_connection_gauges_and_oldest_age", intelligence::close_wait_leak),
        Trial::test(
            "socket_storage_keeps_owners_and_gauges_exact",
            intelligence::socket_storage_keeps_owners_and_gauges_exact,
        ),
        Trial::test(
            "connections_open_before_start_are_seeded_from_the_socket_table",
            intelligence::connections_open_before_start,
        ),
        Trial::test("events_filters_each_select_exactly_their_records_in_json_and_table", query::filters),
        Trial::test("events_peer_filter_takes_ipv6_addresses_and_cidrs", query::filters_v6),
        Trial::test("events_follow_and_follow_true_see_new_records_and_free_the_stream", query::follow),
        Trial::test("events_api_answers_400_naming_the_bad_parameter", query::bad_parameters),
        Trial::test("every_command_fails_in_one_line_when_the_daemon_is_absent_silent_or_garbage", query::cli_errors),
        Trial::test("status_api_healthz_and_info_metrics_list_every_probe", lifecycle::status_lists_every_probe),
        Trial::test("status_command_prints_probes_and_fails_clearly_without_a_daemon", lifecycle::status_command),
        Trial::test("probes_flag_forces_a_back_end_for_every_hook", lifecycle::forced_back_end),
        Trial::test("listen_address_in_use_or_invalid_is_a_clear_error", lifecycle::bad_listen_address),
        Trial::test("sigterm_detaches_every_program_and_link_and_exits_zero", lifecycle::sigterm_detaches),
        Trial::test(
            "probe_stats_count_each_programs_runs_and_time",
            lifecycle::probe_stats_count_each_programs_runs_and_time,
        ),
        Trial::test("config_file_env_and_flags_apply_in_that_order", config::file_env_and_flags_in_that_order),
        Trial::test(
            "bad_configuration_fails_with_one_line_naming_field_and_value",
            config::bad_configuration_fails_with_one_line_naming_field_and_value,
        ),
        Trial::test("log_format_json_every_stderr_line_parses", config::log_format_json_lines_parse),
        Trial::test(
            "every_program_of_every_back_end_passes_the_verifier",
            kernel::every_program_of_every_back_end_passes_the_verifier,
        ),
        Trial::test(
            "auto_picks_the_btf_tracepoints_where_the_kernel_has_them",
            kernel::auto_picks_the_btf_tracepoints_where_the_kernel_has_them,
        ),
        Trial::test(
            "a_real_cgroup_resolves_by_its_id_without_walking",
            kernel::a_real_cgroup_resolves_by_its_id_without_walking,
        ),
        Trial::test(
            "full_ring_buffer_is_counted_seen_plus_lost_is_exact_and_daemon_recovers",
            reliability::overflow_accounting,
        ),
        Trial::test(
            "cardinality_attack_10000_peers_and_port_scan_stays_within_caps_with_exact_totals",
            reliability::cardinality_attack,
        ),
        Trial::test(
            "sigterm_during_a_reset_storm_exits_zero_and_leaves_no_program_or_link",
            reliability::sigterm_during_storm,
        ),
        Trial::test(
            "sigkill_leaves_no_program_or_link_and_the_next_start_counts_exactly",
            reliability::sigkill_then_restart,
        ),
        Trial::test("two_daemons_at_once_both_count_exactly", reliability::two_daemons_count_independently),
        Trial::test(
            "a_daemon_stopped_while_its_connections_close_still_names_their_owner",
            reliability::a_daemon_stopped_while_its_connections_close_still_names_their_owner,
        ),
        Trial::test(
            "slow_oversized_concurrent_and_malformed_http_requests_do_not_stop_serving_or_counting",
            reliability::hostile_http_peers,
        ),
        Trial::test("top_shows_the_rates_of_a_paced_load_sorted_as_asked", top::rates_of_a_paced_load),
        Trial::test("top_command_fails_clearly_when_the_daemon_is_gone_slow_or_wrong", top::top_command_fails_clearly),
    ];
    let conclusion = libtest_mimic::run(&args, trials);
    // Stop the shared daemon before exiting: statics are never dropped.
    if let Some(Ok(daemon)) = SHARED.get() {
        if let Ok(m) = daemon.metrics() {
            eprintln!(
                "shared daemon: {} events seen, {} lost, {} series",
                m.sum("observer_events_total", &[]),
                m.sum("observer_events_lost_total", &[]),
                m.sum("observer_series", &[])
            );
        }
        let _ = daemon.signal(Signal::TERM);
    }
    conclusion.exit();
}
