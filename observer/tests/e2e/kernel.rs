//! What the running kernel offers and accepts, checked without the daemon: every program of
//! every back end through the verifier, which back end `auto` picks, and a real cgroup resolved
//! by its id. Root-only, so here rather than among the unit tests; in the kernel matrix
//! (`cargo xtask test --kernel`) they run on each kernel booted.

use std::{fs, os::unix::fs::MetadataExt as _, path::PathBuf};

use libtest_mimic::Failed;
use observer::{
    container::CgroupResolver,
    probes::{self, ProbeMode, select, tracefs},
};
use observer_common::{ABSENT, Backend, BtfArgs, KprobeArgs, ProbeConfig, ProbeId};

/// Older kernels' layouts on top of this kernel's: the verifier prunes branches on the
/// (read-only, frozen) `CONFIG` values, so each variant checks other code paths.
fn older_layouts(mut config: ProbeConfig) -> ProbeConfig {
    // < 5.6: u8 protocol; < 5.12: no family; < 6.10: split tcp_send_reset tuple, no reason.
    config.set_state.protocol_size = 1;
    config.set_state.tuple.family = ABSENT;
    config.receive_reset.family = ABSENT;
    config.send_reset.tuple = config.receive_reset;
    config.send_reset.saddr_sockaddr = ABSENT;
    config.send_reset.daddr_sockaddr = ABSENT;
    config.send_reset.reason = ABSENT;
    // < 6.10: the reset senders take no reason; no IPv6; a namespace filter.
    config.kprobe = KprobeArgs::ABSENT;
    config.btf = BtfArgs::ABSENT;
    config.kernel.sock_protocol = ABSENT;
    config.kernel.sock_v6_daddr = ABSENT;
    config.kernel.sock_v6_rcv_saddr = ABSENT;
    config.kernel.sock_done_bit = ABSENT;
    // < 5.11: no bpf_get_current_task_btf, so the task is walked with probe reads.
    config.kernel.current_task_btf = ABSENT;
    config.netns_filter = 4026531840;
    config
}

/// Every program of every back end, BTF tracepoints, tracepoints and kprobes, through the kernel's verifier
/// (loaded, not attached: a kprobe program loads on a kernel without a kprobe PMU), under this
/// kernel's configuration and three others.
pub fn every_program_of_every_back_end_passes_the_verifier() -> Result<(), Failed> {
    if !probes::has_bpf_capabilities() {
        return Err("loading programs through the verifier needs root (CAP_BPF + CAP_PERFMON or CAP_SYS_ADMIN)".into());
    }
    probes::raise_memlock_limit();
    let setup = probes::kernel_setup().map_err(|e| format!("reading tracefs and BTF: {e}"))?;
    // Debian's 6.12: tcp_send_active_reset(sk, reason).
    let mut second_arg_reason = setup.config;
    second_arg_reason.kprobe.active_reset_reason = 1;
    let configs = [
        ("this kernel", setup.config),
        ("older layouts", older_layouts(setup.config)),
        ("reason second", second_arg_reason),
        ("nothing known", ProbeConfig::ABSENT),
    ];
    let btf = aya::Btf::from_sys_fs().map_err(|e| format!("reading the kernel's BTF: {e}"))?;
    // The HTTP capture's hooks are Linux 6.3+: on older kernels its programs have nothing to
    // load against (the `http` test checks that `--http` then refuses to start).
    let programs: Vec<ProbeId> = ProbeId::ALL
        .into_iter()
        .filter(|p| match setup.unavailable.get(p) {
            Some(why) if probes::HTTP_CAPTURE.contains(p) && why.contains("no BTF tracepoint") => {
                println!("verifier: {} not loaded: {why}", p.name());
                false
            }
            _ => true,
        })
        .collect();
    let mut failures = Vec::new();
    let mut loaded = 0;
    for (what, config) in configs {
        let mut ebpf =
            probes::load_object(&config, 4096, 1024).map_err(|e| format!("{what}: loading the object: {e}"))?;
        for &probe in &programs {
            match probes::load_program(&mut ebpf, probe, Some(&btf)) {
                Ok(()) => {
                    loaded += 1;
                    println!("verifier: {what}: {} ({}) loaded", probe.name(), select::attach_label(probe));
                }
                Err(e) => failures.push(format!("{what}: {}: {e}", probe.name())),
            }
        }
    }
    if !failures.is_empty() {
        return Err(format!("rejected by the verifier:\n{}", failures.join("\n")).into());
    }
    crate::support::check("programs loaded", loaded, (configs.len() * programs.len()) as u64)
}

/// The kernels observer runs its tests on (this host's, the kernel matrix's) have BTF and every
/// tracepoint: `auto` picks the BTF tracepoints for every hook that has one, the syscall
/// tracepoints for accept. Where the kernel has no kprobes, the kprobe programs are reported
/// unavailable, saying so.
pub fn auto_picks_the_btf_tracepoints_where_the_kernel_has_them() -> Result<(), Failed> {
    let setup = probes::kernel_setup().map_err(|e| format!("reading tracefs and BTF: {e}"))?;
    let choices = select::choose(ProbeMode::Auto, &setup.unavailable);
    for c in &choices {
        let want = if c.hook == observer_common::Hook::Accept { Backend::Tracepoint } else { Backend::Btf };
        if c.backend != want {
            return Err(format!("auto chose {c:?}, want {want:?}").into());
        }
    }
    // (The HTTP capture's hooks are the `http` test's: Linux 6.3+.)
    for probe in ProbeId::ALL
        .into_iter()
        .filter(|p| matches!(p.backend(), Backend::Tracepoint | Backend::Btf) && !probes::HTTP_CAPTURE.contains(p))
    {
        if let Some(why) = setup.unavailable.get(&probe) {
            return Err(format!("{}: {why}", probe.name()).into());
        }
    }
    let root = tracefs::tracefs_root().map_err(|e| e.to_string())?;
    if probes::kprobe_support(&root).is_err() {
        for probe in ProbeId::ALL.into_iter().filter(|p| p.backend() == Backend::Kprobe) {
            match setup.unavailable.get(&probe) {
                Some(why) if why.contains("no kprobes") => {}
                other => return Err(format!("{}: want \"no kprobes\", got {other:?}", probe.name()).into()),
            }
        }
    }
    let functions = probes::kernel_functions().map_err(|e| format!("/proc/kallsyms: {e}"))?;
    if !(functions.contains("tcp_set_state") && functions.contains("inet_csk_accept")) {
        return Err(format!("kprobed functions missing from /proc/kallsyms: {functions:?}").into());
    }
    Ok(())
}

/// A cgroup under the real cgroup2 mount, removed when dropped (even when a check fails).
struct TempCgroup(PathBuf);

impl Drop for TempCgroup {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir(&self.0) {
            eprintln!("could not remove test cgroup {}: {e}", self.0.display());
        }
    }
}

fn cgroup_id(path: &std::path::Path) -> Result<u64, Failed> {
    Ok(fs::metadata(path).map_err(|e| format!("stat {}: {e}", path.display()))?.ino())
}

/// Cgroups made just now resolve at once by their id (a file handle, no walk of the tree),
/// and a container's cgroup names its container.
pub fn a_real_cgroup_resolves_by_its_id_without_walking() -> Result<(), Failed> {
    let mut resolver = CgroupResolver::new();
    let root = resolver
        .root()
        .ok_or("this test needs a cgroup2 mount in /proc/self/mountinfo (the test hosts have one)")?
        .to_path_buf();
    let name = format!("observer-e2e-{}", std::process::id());
    let path = root.join(&name);
    fs::create_dir(&path)
        .map_err(|e| format!("cannot create test cgroup {} ({e}): run the suite as root", path.display()))?;
    let cgroup = TempCgroup(path);

    let c = resolver.resolve(cgroup_id(&cgroup.0)?).ok_or("the new cgroup does not resolve")?;
    if c.cgroup_path != format!("/{name}") || c.id.is_some() {
        return Err(format!("new cgroup resolved as {c:?}").into());
    }
    let top = resolver.resolve(cgroup_id(&root)?).ok_or("the cgroup2 root does not resolve")?;
    if top.cgroup_path != "/" {
        return Err(format!("root resolved as {top:?}").into());
    }
    // A container's cgroup created just now resolves at once, rate limit or not.
    let id = "9a3e5d2c41b7f08e6d1c2b3a4f5e6d7c8b9a0f1e2d3c4b5a6978877665544332";
    let scope = cgroup.0.join(format!("docker-{id}.scope"));
    fs::create_dir(&scope).map_err(|e| format!("create a container cgroup: {e}"))?;
    let scope = TempCgroup(scope);
    let c = resolver.resolve(cgroup_id(&scope.0)?).ok_or("the container cgroup does not resolve")?;
    if c.id.as_deref() != Some(id) || c.short_id() != &id[..12] {
        return Err(format!("container cgroup resolved as {c:?}").into());
    }
    crate::support::check("walks of the cgroup tree (all opened by their id)", resolver.walks(), 0)
}
