//! Which back end serves each hook: a pure function of what the running kernel offers and of
//! `--probes`.
//!
//! Each logical hook ([`Hook`]) has a tracepoint back end and a kprobe back end (see
//! `observer-ebpf`). Exactly one is attached per hook, so no event is counted twice. `auto`
//! prefers the tracepoints (stable ABI, layouts from tracefs) and falls back to kprobes where
//! the kernel lacks them; `tracepoint` and `kprobe` force one back end for every hook.

use std::collections::BTreeMap;

use observer_common::{AttachPoint, Backend, Hook, ProbeId};

/// `--probes`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ProbeMode {
    /// Per hook, the tracepoints if the kernel has them, else kprobes.
    #[default]
    Auto,
    /// Tracepoints for every hook.
    Tracepoint,
    /// Kprobes for every hook.
    Kprobe,
}

impl ProbeMode {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Tracepoint => "tracepoint",
            Self::Kprobe => "kprobe",
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

/// `tracepoint/sock/inet_sock_set_state`, `kprobe/tcp_set_state`, `kretprobe/inet_csk_accept`.
pub fn attach_label(probe: ProbeId) -> String {
    match probe.attach_point() {
        AttachPoint::Tracepoint(category, name) => format!("tracepoint/{category}/{name}"),
        AttachPoint::Kprobe(function) => format!("kprobe/{function}"),
        AttachPoint::Kretprobe(function) => format!("kretprobe/{function}"),
    }
}

/// `sock:inet_sock_set_state`, `tcp_set_state`: how the reasons name a hook point.
fn point(probe: ProbeId) -> String {
    match probe.attach_point() {
        AttachPoint::Tracepoint(category, name) => format!("{category}:{name}"),
        AttachPoint::Kprobe(function) | AttachPoint::Kretprobe(function) => function.to_string(),
    }
}

fn points(programs: &[ProbeId]) -> String {
    programs.iter().map(|p| point(*p)).collect::<Vec<_>>().join(", ")
}

/// Picks the back end of every hook: forced by `mode`, or (`auto`) the tracepoints when at least
/// one of the hook's tracepoints can be used, else the kprobes when at least one of its kprobes
/// can, else the tracepoints (then reported as unavailable, with why).
pub fn choose(mode: ProbeMode, unavailable: &Unavailable) -> Vec<HookChoice> {
    Hook::ALL
        .into_iter()
        .map(|hook| {
            let usable = |backend| programs(hook, backend).into_iter().any(|p| !unavailable.contains_key(&p));
            let tracepoints = programs(hook, Backend::Tracepoint);
            let kprobes = programs(hook, Backend::Kprobe);
            let (backend, why) = match mode {
                ProbeMode::Tracepoint => (Backend::Tracepoint, "forced by --probes tracepoint".to_string()),
                ProbeMode::Kprobe => (Backend::Kprobe, "forced by --probes kprobe".to_string()),
                ProbeMode::Auto if usable(Backend::Tracepoint) => {
                    (Backend::Tracepoint, "auto: the kernel has the tracepoints".to_string())
                }
                ProbeMode::Auto if usable(Backend::Kprobe) => {
                    (Backend::Kprobe, format!("auto: the kernel lacks tracepoint {}", points(&tracepoints)))
                }
                ProbeMode::Auto => (
                    Backend::Tracepoint,
                    format!(
                        "auto: the kernel has neither tracepoint {} nor kprobe {}",
                        points(&tracepoints),
                        points(&kprobes)
                    ),
                ),
            };
            let programs = if backend == Backend::Tracepoint { tracepoints } else { kprobes };
            HookChoice { hook, backend, why, programs }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_of(backend: Backend, why: &str) -> Unavailable {
        ProbeId::ALL.into_iter().filter(|p| p.backend() == backend).map(|p| (p, why.to_string())).collect()
    }

    fn backends(choices: &[HookChoice]) -> Vec<(Hook, Backend)> {
        choices.iter().map(|c| (c.hook, c.backend)).collect()
    }

    #[test]
    fn every_hook_has_both_back_ends() {
        for hook in Hook::ALL {
            assert!(!programs(hook, Backend::Tracepoint).is_empty(), "{hook:?}");
            assert!(!programs(hook, Backend::Kprobe).is_empty(), "{hook:?}");
        }
        // Every program serves exactly one hook, so one back end per hook never counts twice.
        let total: usize = Hook::ALL
            .into_iter()
            .map(|h| programs(h, Backend::Tracepoint).len() + programs(h, Backend::Kprobe).len())
            .sum();
        assert_eq!(total, ProbeId::ALL.len());
    }

    #[test]
    fn auto_prefers_tracepoints_on_a_kernel_without_kprobes() {
        // This project's machines: tracepoints, no kprobe PMU.
        let choices = choose(ProbeMode::Auto, &all_of(Backend::Kprobe, "no kprobes"));
        assert!(choices.iter().all(|c| c.backend == Backend::Tracepoint), "{choices:?}");
        assert_eq!(choices[0].programs, [ProbeId::InetSockSetState]);
        assert_eq!(choices[4].programs, [ProbeId::SysExitAccept4, ProbeId::SysExitAccept]);
    }

    #[test]
    fn auto_prefers_tracepoints_when_both_exist() {
        let choices = choose(ProbeMode::Auto, &Unavailable::new());
        assert!(choices.iter().all(|c| c.backend == Backend::Tracepoint), "{choices:?}");
        assert!(choices[0].why.contains("auto"), "{}", choices[0].why);
    }

    #[test]
    fn auto_falls_back_to_kprobes_per_hook() {
        // A kernel without syscall tracepoints (CONFIG_FTRACE_SYSCALLS=n) and without
        // tcp:tcp_receive_reset, but with kprobes.
        let mut unavailable = Unavailable::new();
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
        let unavailable = Unavailable::from([
            (ProbeId::TcpSendReset, "no such tracepoint".to_string()),
            (ProbeId::TcpV6SendReset, "no such function".to_string()),
        ]);
        let choices = choose(ProbeMode::Auto, &unavailable);
        assert_eq!(choices[2].backend, Backend::Kprobe);
        assert_eq!(
            choices[2].programs,
            [ProbeId::TcpSendActiveReset, ProbeId::TcpV4SendReset, ProbeId::TcpV6SendReset]
        );
    }

    #[test]
    fn nothing_usable_reports_the_tracepoints() {
        let mut unavailable = all_of(Backend::Kprobe, "no kprobes");
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
    fn attach_labels() {
        assert_eq!(attach_label(ProbeId::InetSockSetState), "tracepoint/sock/inet_sock_set_state");
        assert_eq!(attach_label(ProbeId::TcpV4SendReset), "kprobe/tcp_v4_send_reset");
        assert_eq!(attach_label(ProbeId::InetCskAccept), "kretprobe/inet_csk_accept");
    }
}
