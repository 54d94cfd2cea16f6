//! Cgroup path → container id, by the naming conventions of the container runtimes.

/// Length of a container id as every runtime we recognise prints it: 256 bits in hex.
const ID_LEN: usize = 64;

/// Prefixes of systemd scope units (and podman's cgroupfs directories) that hold one container's
/// processes. `crio-conmon-<id>.scope` and `libpod-conmon-<id>.scope` also start with a prefix
/// from this list but hold the runtime's monitor process, not the container; they are rejected
/// because what follows the prefix (`conmon-<id>`) is not a bare id.
const SCOPE_PREFIXES: [&str; 4] = ["docker-", "cri-containerd-", "crio-", "libpod-"];

/// The runtime names that appear in the middle of systemd-driver cgroup paths written as
/// `<slice>:<runtime>:<id>` (the form containerd's systemd cgroup driver uses, and which shows
/// up verbatim in the cgroup tree of nested setups such as kind nodes).
const COLON_RUNTIMES: [&str; 4] = ["cri-containerd", "docker", "crio", "libpod"];

/// The container id in a cgroup path (relative to the cgroup2 mount), from the naming
/// conventions of docker, containerd, CRI-O, podman and kubernetes: the last path component
/// that names a container wins, so a container's own sub-cgroups (systemd inside a container,
/// podman's `.../container`) resolve to that container. `None` for host cgroups.
pub fn container_id(cgroup_path: &str) -> Option<String> {
    cgroup_path.rsplit('/').find_map(component_id).map(str::to_owned)
}

/// The container id one path component names, if it names one.
fn component_id(component: &str) -> Option<&str> {
    // `/docker/<id>` (docker, cgroupfs driver), `/kubepods/<qos>/pod<uid>/<id>` (kubernetes,
    // cgroupfs driver).
    if is_id(component) {
        return Some(component);
    }
    // `kubepods-besteffort-pod<uid>.slice:cri-containerd:<id>`: containerd's systemd-driver
    // cgroupsPath, which nested setups (kind nodes) show as a directory name.
    let mut parts = component.rsplitn(3, ':');
    if let (Some(id), Some(runtime), Some(_slice)) = (parts.next(), parts.next(), parts.next()) {
        return (COLON_RUNTIMES.contains(&runtime) && is_id(id)).then_some(id);
    }
    // `docker-<id>.scope`, `cri-containerd-<id>.scope`, `crio-<id>.scope`, `libpod-<id>.scope`
    // (systemd driver); `libpod-<id>` (podman, cgroupfs driver).
    let unit = component.strip_suffix(".scope").unwrap_or(component);
    SCOPE_PREFIXES.iter().find_map(|prefix| unit.strip_prefix(prefix)).filter(|id| is_id(id))
}

/// Exactly 64 lowercase hex digits: what the runtimes generate. Anything looser would take
/// host unit names with hex-looking suffixes for containers.
fn is_id(s: &str) -> bool {
    s.len() == ID_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f1c2b7e9a0d4c5b8e6f7a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f";
    const POD: &str = "2b6c9a1e_7f3d_4c8a_9b2e_1d5f6a7b8c9d";

    #[test]
    fn container_ids_from_real_world_paths() {
        let cases: Vec<(String, Option<&str>)> = vec![
            // docker, systemd cgroup driver.
            (format!("/system.slice/docker-{ID}.scope"), Some(ID)),
            // docker, cgroupfs driver.
            (format!("/docker/{ID}"), Some(ID)),
            // rootless docker.
            (format!("/user.slice/user-1000.slice/user@1000.service/user.slice/docker-{ID}.scope"), Some(ID)),
            // containerd under kubernetes, systemd driver.
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD}.slice/cri-containerd-{ID}.scope"
                ),
                Some(ID),
            ),
            // containerd under kubernetes, guaranteed QoS (no QoS slice).
            (format!("/kubepods.slice/kubepods-pod{POD}.slice/cri-containerd-{ID}.scope"), Some(ID)),
            // CRI-O.
            (
                format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD}.slice/crio-{ID}.scope"),
                Some(ID),
            ),
            // CRI-O's monitor process: not a container.
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD}.slice/crio-conmon-{ID}.scope"
                ),
                None,
            ),
            // kubernetes, cgroupfs driver.
            (format!("/kubepods/burstable/pod{}/{ID}", POD.replace('_', "-")), Some(ID)),
            (format!("/kubepods/pod{}/{ID}", POD.replace('_', "-")), Some(ID)),
            // podman, systemd driver; its monitor; its cgroupfs driver; its split layout.
            (format!("/machine.slice/libpod-{ID}.scope"), Some(ID)),
            (format!("/machine.slice/libpod-conmon-{ID}.scope"), None),
            (format!("/libpod_parent/libpod-{ID}"), Some(ID)),
            (format!("/machine.slice/libpod-{ID}.scope/container"), Some(ID)),
            // containerd with the systemd driver inside a kind node.
            (
                format!("/system.slice/containerd.service/kubepods-besteffort-pod{POD}.slice:cri-containerd:{ID}"),
                Some(ID),
            ),
            // kind node (itself a docker container) running a pod: the innermost container wins.
            (
                format!(
                    "/system.slice/docker-{}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{POD}.slice/cri-containerd-{ID}.scope",
                    "a".repeat(64)
                ),
                Some(ID),
            ),
            // systemd inside a docker container: the container's sub-cgroups.
            (format!("/system.slice/docker-{ID}.scope/system.slice/nginx.service"), Some(ID)),
            // Host cgroups.
            ("/".to_owned(), None),
            (String::new(), None),
            ("/system.slice/sshd.service".to_owned(), None),
            ("/system.slice/docker.service".to_owned(), None),
            ("/system.slice/containerd.service".to_owned(), None),
            ("/user.slice/user-1000.slice/session-3.scope".to_owned(), None),
            ("/user.slice/user-1000.slice/user@1000.service/app.slice/app-gnome-firefox-4711.scope".to_owned(), None),
            ("/init.scope".to_owned(), None),
            (format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD}.slice"), None),
            // Not quite an id: wrong length, uppercase, non-hex, unknown runtime.
            (format!("/docker/{}", &ID[..63]), None),
            (format!("/docker/{ID}0"), None),
            (format!("/docker/{}", ID.to_uppercase()), None),
            (format!("/system.slice/docker-{}.scope", ID.replace('f', "g")), None),
            (format!("/system.slice/runc-{ID}.scope"), None),
            (format!("/system.slice/foo.slice:unknown:{ID}"), None),
            // A 32-hex id (some sandboxes use these): not a container id by our rule.
            ("/process_api/365b04b0dedd69f1dd612b8c603513fd".to_owned(), None),
        ];
        for (path, want) in &cases {
            assert_eq!(container_id(path).as_deref(), *want, "path {path:?}");
        }
    }
}
