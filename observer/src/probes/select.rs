//! Which back end serves each hook: a pure function of what the running kernel offers and of
//! `--probes`.
//!
//! Each logical hook ([`Hook`]) has a tracepoint back end and a kprobe back end, and all but
//! `accept` a BTF tracepoint back end (see `observer-ebpf`). Exactly one is attached per hook, so
//! no event is counted twice. `auto` prefers the BTF tracepoints (the same hook points as the
//! tracepoints, without building a record: the cheapest), then the tracepoints (stable ABI,
//! layouts from tracefs), then kprobes, per hook, by what the kernel offers; `btf`,
//! `tracepoint` and `kprobe` force one back end for every hook (`btf`: for every hook that has
//! one; `accept` keeps the syscall tracepoints).

use std::collections::BTreeMap;

use observer_common::{AttachPoint, Backend, Hook, ProbeId};

/// `--probes`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ProbeMode {
    /// Per hook, the BTF tracepoints if the kernel allows them, else the tracepoints, else
    /// kprobes.
    #[default]
    Auto,
    /// BTF tracepoints (`tp_btf`) for every hook that has one (accept: the syscall tracepoints).
    Btf,
    /// Tracepoints for every hook.
    Tracepoint,
    /// Kprobes for every hook.
    Kprobe,
}

impl ProbeMode {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Btf => "btf",
            Self::Tracepoint => "tracepoint",
            Self::Kprobe => "kprobe",
        }
    }
}

/// `--socket-store`: where the kernel programs keep each socket's state
/// (`ProbeConfig::socket_store`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SocketStore {
    /// The `SOCKETS` hash map, preallocated (`--max-sockets` entries, least recently used ones
    /// evicted): the cheapest per connection, with every back end.
    #[default]
    Hash,
    /// Socket-local storage: on the socket, freed with it, no size limit; allocated per
    /// connection. The BTF tracepoint back end only.
    Storage,
}

impl SocketStore {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Hash => "hash",
            Self::Storage => "storage",
        }
    }
}

/// Why each program cannot be attached on the running kernel (absent: it can be tried).
pub type Unavailable = BTreeMap<ProbeId, String>;

/// The back end chosen for one hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookChoice {
    pub hook: Hook,
    pub backend: Backend,
    /// The back end's programs for this hook, in [`ProbeId::ALL`] order.
    pub programs: Vec<ProbeId>,
    /// Why this back end, for the log (`auto: the kernel has the tracepoints`, ...).
    pub why: String,
}

/// The programs of `backend` that serve `hook`.
pub fn programs(hook: Hook, backend: Backend) -> Vec<ProbeId> {
    ProbeId::ALL.into_iter().filter(|p| p.hook() == hook && p.backend() == backend).collect()
}

/// `tracepoint/sock/inet_sock_set_state`, `tp_btf/inet_sock_set_state`, `kprobe/tcp_set_state`,
/// `kretprobe/inet_csk_accept`.
pub fn attach_label(probe: ProbeId) -> String {
    match probe.attach_point() {
        AttachPoint::Tracepoint(category, name) => format!("tracepoint/{category}/{name}"),
        AttachPoint::BtfTracepoint(name) => format!("tp_btf/{name}"),
        AttachPoint::Kprobe(function) => format!("kprobe/{function}"),
        AttachPoint::Kretprobe(function) => format!("kretprobe/{function}"),
    }
}

/// `sock:inet_sock_set_state`, `tcp_set_state`: how the reasons name a hook point.
fn point(probe: ProbeId) -> String {
    match probe.attach_point() {
        AttachPoint::Tracepoint(category, name) => format!("{category}:{name}"),
        AttachPoint::BtfTracepoint(name) => format!("tp_btf/{name}"),
        AttachPoint::Kprobe(function) | AttachPoint::Kretprobe(function) => function.to_string(),
    }
}

fn points(programs: &[ProbeId]) -> String {
    programs.iter().map(|p| point(*p)).collect::<Vec<_>>().join(", ")
}

/// Picks the back end of every hook: forced by `mode`, or (`auto`) the first of BTF
/// tracepoints, tracepoints and kprobes of which at least one of the hook's programs can be
/// used, else the tracepoints (then reported as unavailable, with why).
pub fn choose(mode: ProbeMode, unavailable: &Unavailable) -> Vec<HookChoice> {
    Hook::ALL
        .into_iter()
        .map(|hook| {
            let usable = |backend| programs(hook, backend).into_iter().any(|p| !unavailable.contains_key(&p));
            // The first reason a back end's programs for this hook cannot be used.
            let why_not = |backend| {
                let programs = programs(hook, backend);
                match programs.iter().find_map(|p| unavailable.get(p)) {
                    Some(why) => why.clone(),
                    None => format!("no {} program for this hook", backend.name()),
                }
            };
            let has_btf = !programs(hook, Backend::Btf).is_empty();
            let (backend, why) = match mode {
                ProbeMode::Btf if has_btf => (Backend::Btf, "forced by --probes btf".to_string()),
                ProbeMode::Btf => (
                    Backend::Tracepoint,
                    "--probes btf: there is no BTF tracepoint for this hook, so its tracepoints".to_string(),
                ),
                ProbeMode::Tracepoint => (Backend::Tracepoint, "forced by --probes tracepoint".to_string()),
                ProbeMode::Kprobe => (Backend::Kprobe, "forced by --probes kprobe".to_string()),
                ProbeMode::Auto if usable(Backend::Btf) => {
                    (Backend::Btf, "auto: the kernel allows the BTF tracepoints".to_string())
                }
                ProbeMode::Auto if usable(Backend::Tracepoint) => {
                    let why = if has_btf {
                        format!("auto: no BTF tracepoint ({}), the kernel has the tracepoints", why_not(Backend::Btf))
                    } else {
                        "auto: the kernel has the tracepoints".to_string()
                    };
                    (Backend::Tracepoint, why)
                }
                ProbeMode::Auto if usable(Backend::Kprobe) => (
                    Backend::Kprobe,
                    format!("auto: the kernel lacks tracepoint {}", points(&programs(hook, Backend::Tracepoint))),
                ),
                ProbeMode::Auto => (
                    Backend::Tracepoint,
                    format!(
                        "auto: the kernel has neither tracepoint {} nor kprobe {}",
                        points(&programs(hook, Backend::Tracepoint)),
                        points(&programs(hook, Backend::Kprobe))
                    ),
                ),
            };
            HookChoice { hook, backend, why, programs: programs(hook, backend) }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_of(backend: Backend, why: &str) -> Unavailable {
        ProbeId::ALL.into_iter().filter(|p| p.backend() == backend).map(|p| (p, why.to_string())).collect()
    }

    /// A kernel without BTF tracepoints (no BTF), plus `more`.
    fn no_btf_and(more: Unavailable) -> Unavailable {
        let mut unavailable = all_of(Backend::Btf, "no BTF");
        unavailable.extend(more);
        unavailable
    }

    fn backends(choices: &[HookChoice]) -> Vec<(Hook, Backend)> {
        choices.iter().map(|c| (c.hook, c.backend)).collect()
    }

    #[test]
    fn every_hook_has_tracepoints_and_kprobes_and_all_but_accept_btf() {
        for hook in Hook::ALL {
            assert!(!programs(hook, Backend::Tracepoint).is_empty(), "{hook:?}");
            assert!(!programs(hook, Backend::Kprobe).is_empty(), "{hook:?}");
            assert_eq!(programs(hook, Backend::Btf).len(), usize::from(hook != Hook::Accept), "{hook:?}");
        }
        // Every program serves exactly one hook, so one back end per hook never counts twice; the
        // HTTP capture (`--http`) is apart, BTF tracepoints only.
        let total: usize =
            Hook::ALL.into_iter().flat_map(|h| Backend::ALL.into_iter().map(move |b| programs(h, b).len())).sum();
        assert_eq!(total + programs(Hook::HttpCapture, Backend::Btf).len(), ProbeId::ALL.len());
        assert_eq!(programs(Hook::HttpCapture, Backend::Btf), crate::probes::HTTP_CAPTURE);
        assert!(programs(Hook::HttpCapture, Backend::Tracepoint).is_empty());
    }

    #[test]
    fn auto_prefers_btf_then_the_syscall_tracepoints_for_accept() {
        // This project's machines: BTF tracepoints and tracepoints, no kprobe PMU.
        let choices = choose(ProbeMode::Auto, &all_of(Backend::Kprobe, "no kprobes"));
        assert_eq!(
            backends(&choices),
            [
                (Hook::SetState, Backend::Btf),
                (Hook::ReceiveReset, Backend::Btf),
                (Hook::SendReset, Backend::Btf),
                (Hook::Destroy, Backend::Btf),
                (Hook::Accept, Backend::Tracepoint),
            ]
        );
        assert_eq!(choices[0].programs, [ProbeId::BtfInetSockSetState]);
        assert_eq!(choices[2].programs, [ProbeId::BtfTcpSendReset]);
        assert_eq!(choices[4].programs, [ProbeId::SysExitAccept4, ProbeId::SysExitAccept]);
        assert_eq!(choices[0].why, "auto: the kernel allows the BTF tracepoints");
        assert_eq!(choices[4].why, "auto: the kernel has the tracepoints");
    }

    #[test]
    fn auto_falls_back_from_btf_to_tracepoints_per_hook_saying_why() {
        // A kernel whose BTF set_state program does not load (e.g. sk_protocol a bitfield).
        let unavailable =
            Unavailable::from([(ProbeId::BtfInetSockSetState, "kernel BTF lacks sock.sk_protocol".to_string())]);
        let choices = choose(ProbeMode::Auto, &unavailable);
        assert_eq!(choices[0].backend, Backend::Tracepoint);
        assert_eq!(choices[0].programs, [ProbeId::InetSockSetState]);
        assert!(choices[0].why.contains("kernel BTF lacks sock.sk_protocol"), "{}", choices[0].why);
        assert!(choices[1..4].iter().all(|c| c.backend == Backend::Btf), "{choices:?}");
    }

    #[test]
    fn auto_prefers_tracepoints_on_a_kernel_without_btf_or_kprobes() {
        let choices = choose(ProbeMode::Auto, &no_btf_and(all_of(Backend::Kprobe, "no kprobes")));
        assert!(choices.iter().all(|c| c.backend == Backend::Tracepoint), "{choices:?}");
        assert_eq!(choices[0].programs, [ProbeId::InetSockSetState]);
        assert_eq!(choices[4].programs, [ProbeId::SysExitAccept4, ProbeId::SysExitAccept]);
        assert!(choices[0].why.contains("no BTF tracepoint (no BTF)"), "{}", choices[0].why);
    }

    #[test]
    fn auto_prefers_tracepoints_to_kprobes_when_both_exist() {
        let choices = choose(ProbeMode::Auto, &no_btf_and(Unavailable::new()));
        assert!(choices.iter().all(|c| c.backend == Backend::Tracepoint), "{choices:?}");
        assert!(choices[0].why.contains("auto"), "{}", choices[0].why);
    }

    #[test]
    fn auto_falls_back_to_kprobes_per_hook() {
        // A kernel without BTF, without syscall tracepoints (CONFIG_FTRACE_SYSCALLS=n) and
        // without tcp:tcp_receive_reset, but with kprobes.
        let mut unavailable = no_btf_and(Unavailable::new());
        for p in [ProbeId::SysExitAccept4, ProbeId::SysExitAccept, ProbeId::TcpReceiveReset] {
            unavailable.insert(p, "no such tracepoint".into());
        }
        let choices = choose(ProbeMode::Auto, &unavailable);
        assert_eq!(
            backends(&choices),
            [
                (Hook::SetState, Backend::Tracepoint),
                (Hook::ReceiveReset, Backend::Kprobe),
                (Hook::SendReset, Backend::Tracepoint),
                (Hook::Destroy, Backend::Tracepoint),
                (Hook::Accept, Backend::Kprobe),
            ]
        );
        assert_eq!(choices[1].programs, [ProbeId::TcpReset]);
        assert_eq!(choices[4].programs, [ProbeId::InetCskAccept]);
        assert!(choices[1].why.contains("lacks tracepoint tcp:tcp_receive_reset"), "{}", choices[1].why);
    }

    #[test]
    fn one_usable_tracepoint_keeps_the_hook_on_tracepoints() {
        // accept4 alone is enough: the accept hook stays on tracepoints, accept is reported.
        let unavailable = Unavailable::from([(ProbeId::SysExitAccept, "no such tracepoint".to_string())]);
        let choices = choose(ProbeMode::Auto, &unavailable);
        assert_eq!(choices[4].backend, Backend::Tracepoint);
    }

    #[test]
    fn a_partly_usable_kprobe_back_end_is_still_chosen() {
        // No send-reset tracepoint, IPv6 not built: active and IPv4 passive resets by kprobe.
        let unavailable = no_btf_and(Unavailable::from([
            (ProbeId::TcpSendReset, "no such tracepoint".to_string()),
            (ProbeId::TcpV6SendReset, "no such function".to_string()),
        ]));
        let choices = choose(ProbeMode::Auto, &unavailable);
        assert_eq!(choices[2].backend, Backend::Kprobe);
        assert_eq!(
            choices[2].programs,
            [ProbeId::TcpSendActiveReset, ProbeId::TcpV4SendReset, ProbeId::TcpV6SendReset]
        );
    }

    #[test]
    fn nothing_usable_reports_the_tracepoints() {
        let mut unavailable = no_btf_and(all_of(Backend::Kprobe, "no kprobes"));
        unavailable.insert(ProbeId::TcpDestroySock, "no such tracepoint".into());
        let choices = choose(ProbeMode::Auto, &unavailable);
        assert_eq!(choices[3].backend, Backend::Tracepoint);
        assert!(
            choices[3].why.contains("neither tracepoint tcp:tcp_destroy_sock nor kprobe tcp_v4_destroy_sock"),
            "{}",
            choices[3].why
        );
    }

    #[test]
    fn forced_back_ends_apply_to_every_hook_even_if_unavailable() {
        let no_kprobes = all_of(Backend::Kprobe, "no kprobes");
        let choices = choose(ProbeMode::Kprobe, &no_kprobes);
        assert!(choices.iter().all(|c| c.backend == Backend::Kprobe), "{choices:?}");
        assert!(choices[0].why.contains("forced by --probes kprobe"));
        let no_tracepoints = all_of(Backend::Tracepoint, "no tracefs");
        let choices = choose(ProbeMode::Tracepoint, &no_tracepoints);
        assert!(choices.iter().all(|c| c.backend == Backend::Tracepoint), "{choices:?}");
        let choices = choose(ProbeMode::Kprobe, &Unavailable::new());
        let programs: Vec<ProbeId> = choices.into_iter().flat_map(|c| c.programs).collect();
        assert_eq!(programs.len(), 7);
        assert!(programs.iter().all(|p| p.backend() == Backend::Kprobe));
    }

    #[test]
    fn forced_btf_keeps_the_syscall_tracepoints_for_accept() {
        let choices = choose(ProbeMode::Btf, &all_of(Backend::Btf, "no BTF"));
        assert!(choices[..4].iter().all(|c| c.backend == Backend::Btf), "{choices:?}");
        assert_eq!(choices[4].backend, Backend::Tracepoint);
        assert!(choices[4].why.contains("no BTF tracepoint for this hook"), "{}", choices[4].why);
    }

    #[test]
    fn attach_labels() {
        assert_eq!(attach_label(ProbeId::InetSockSetState), "tracepoint/sock/inet_sock_set_state");
        assert_eq!(attach_label(ProbeId::BtfInetSockSetState), "tp_btf/inet_sock_set_state");
        assert_eq!(attach_label(ProbeId::TcpV4SendReset), "kprobe/tcp_v4_send_reset");
        assert_eq!(attach_label(ProbeId::InetCskAccept), "kretprobe/inet_csk_accept");
    }
}
