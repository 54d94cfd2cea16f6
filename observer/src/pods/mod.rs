//! Which pod a container belongs to: container id → namespace, pod and container name, asked of
//! the container runtime through the kubelet's own API ([`cri`]).
//!
//! [`crate::container`] finds a socket owner's container id in its cgroup path; this module
//! names it the way kube-state-metrics and cAdvisor do (`namespace`, `pod`, `container`), so
//! observer's series join with `kube_pod_info`. Nothing here runs on the event path but
//! [`Pods::note`], a read-locked lookup: the runtime is asked from the daemon's identity task
//! ([`Pods::refresh`]), which never holds a lock across a call. A runtime that is down, slow or
//! absent leaves series with their `container_id` only.
//!
//! Containers that are gone (their cgroup no longer exists) keep their identity, and their
//! series, for [`Pods`]'s expiry, so that Prometheus scrapes their final counts; then both go.

pub mod cri;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use crate::{
    HashMap,
    api::RuntimeReport,
    container::Container,
    series::{ContainerKey, container_key},
};

pub use self::cri::{CriClient, CriError, RuntimeVersion};

/// A container's pod, from the kubelet's labels.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodIdentity {
    pub namespace: String,
    pub pod: String,
    pub pod_uid: String,
    /// The container's name in the pod spec.
    pub container: String,
}

/// The pods of the containers known at one moment ([`Pods::snapshot`]).
pub type PodNames = HashMap<ContainerKey, Arc<PodIdentity>>;

/// What is known of one container id.
#[derive(Debug, Clone)]
enum Lookup {
    /// Not asked yet (or the runtime could not answer).
    Pending,
    /// The runtime named its pod.
    Pod(Arc<PodIdentity>),
    /// The runtime answered and does not know it: a container of another runtime or namespace
    /// (plain Docker, `ctr run`), or no runtime is configured.
    NotAPod,
}

#[derive(Debug)]
struct Entry {
    full_id: String,
    cgroup_path: String,
    lookup: Lookup,
    /// When its cgroup was first seen gone.
    gone_since: Option<Instant>,
}

/// What one [`Pods::refresh`] did, for the daemon to count and act on.
#[derive(Debug, Default)]
pub struct Refreshed {
    /// Gone containers whose expiry passed: their series are to be removed.
    pub expired: Vec<ContainerKey>,
    pub error: Option<CriError>,
    /// The runtime answered (first time, or again after errors).
    pub connected: Option<RuntimeVersion>,
}

/// The daemon's directory of container identities.
pub struct Pods {
    entries: RwLock<HashMap<ContainerKey, Entry>>,
    /// Woken when the event path sees a container it has never seen.
    pub unknown_seen: tokio::sync::Notify,
    /// Woken after each refresh (`--log-events` waits for names of new containers).
    pub refreshed: tokio::sync::Notify,
    expire_after: Duration,
    cgroup_root: Option<PathBuf>,
    runtime: Mutex<RuntimeReport>,
}

/// How long the series of a gone container stay by default: long enough for any scrape
/// interval to collect their final counts.
pub const DEFAULT_EXPIRY: Duration = Duration::from_secs(300);

impl Default for Pods {
    /// No cgroup root (nothing is ever seen gone) and the default expiry: for tests and tools.
    fn default() -> Self {
        Self::new(DEFAULT_EXPIRY, None)
    }
}

impl std::fmt::Debug for Pods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pods").field("expire_after", &self.expire_after).finish_non_exhaustive()
    }
}

impl Pods {
    /// `expire_after`: how long the series of a gone container stay; `cgroup_root`: the
    /// cgroup2 mount, where gone containers are noticed.
    pub fn new(expire_after: Duration, cgroup_root: Option<PathBuf>) -> Self {
        Self {
            entries: RwLock::new(HashMap::default()),
            unknown_seen: tokio::sync::Notify::new(),
            refreshed: tokio::sync::Notify::new(),
            expire_after,
            cgroup_root,
            runtime: Mutex::new(RuntimeReport { state: "none".into(), ..RuntimeReport::default() }),
        }
    }

    /// The event path: notes the owner's container, so that the identity task asks the runtime
    /// about ids it has not seen. One read lock for a known container.
    pub fn note(&self, key: ContainerKey, container: &Container) {
        if self.entries.read().unwrap_or_else(|e| e.into_inner()).contains_key(&key) {
            return;
        }
        let Some(full_id) = container.id.clone() else { return };
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        entries.entry(key).or_insert_with(|| Entry {
            full_id,
            cgroup_path: container.cgroup_path.clone(),
            lookup: Lookup::Pending,
            gone_since: None,
        });
        drop(entries);
        self.unknown_seen.notify_one();
    }

    /// The pod of a container, if the runtime named it.
    pub fn identity(&self, key: &ContainerKey) -> Option<Arc<PodIdentity>> {
        match self.entries.read().unwrap_or_else(|e| e.into_inner()).get(key).map(|e| &e.lookup) {
            Some(Lookup::Pod(identity)) => Some(identity.clone()),
            _ => None,
        }
    }

    /// Every named container, for one scrape (one lock instead of one per series).
    pub fn snapshot(&self) -> PodNames {
        self.entries
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|(k, e)| match &e.lookup {
                Lookup::Pod(identity) => Some((*k, identity.clone())),
                _ => None,
            })
            .collect()
    }

    /// True while any of `keys` waits for the runtime's answer.
    pub fn pending(&self, keys: impl IntoIterator<Item = ContainerKey>) -> bool {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        keys.into_iter().any(|k| matches!(entries.get(&k).map(|e| &e.lookup), Some(Lookup::Pending)))
    }

    pub fn report(&self) -> RuntimeReport {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let mut report = self.runtime.lock().unwrap_or_else(|e| e.into_inner()).clone();
        report.containers = entries.len() as u64;
        report.pods_named = entries.values().filter(|e| matches!(e.lookup, Lookup::Pod(_))).count() as u64;
        report
    }

    /// Says which runtime socket is used (`None`: none was found or given).
    pub fn set_socket(&self, socket: Option<&Path>) {
        let mut runtime = self.runtime.lock().unwrap_or_else(|e| e.into_inner());
        match socket {
            Some(s) => {
                runtime.socket = s.display().to_string();
                runtime.state = "unreachable".into();
            }
            None => runtime.state = "none".into(),
        }
    }

    /// Asks the runtime (if any) for every container's pod, and notes which containers are gone
    /// and which have been gone longer than the expiry. Called by the identity task only.
    pub async fn refresh(&self, client: Option<&mut CriClient>, now: Instant) -> Refreshed {
        let mut refreshed = Refreshed::default();
        let answer = match client {
            None => None,
            Some(client) => {
                let was_connected = self.runtime.lock().unwrap_or_else(|e| e.into_inner()).state == "connected";
                let version = if was_connected { Ok(None) } else { client.version().await.map(Some) };
                match version {
                    Ok(version) => match client.list_containers().await {
                        Ok(list) => {
                            refreshed.connected = version;
                            Some(list)
                        }
                        Err(e) => {
                            refreshed.error = Some(e);
                            None
                        }
                    },
                    Err(e) => {
                        refreshed.error = Some(e);
                        None
                    }
                }
            }
        };
        {
            let mut runtime = self.runtime.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(v) = &refreshed.connected {
                runtime.runtime = v.name.clone();
                runtime.version = v.version.clone();
            }
            if answer.is_some() {
                runtime.state = "connected".into();
                runtime.error = None;
            } else if let Some(e) = &refreshed.error {
                runtime.state = "unreachable".into();
                runtime.error = Some(e.to_string());
            }
        }
        let by_id: HashMap<String, PodIdentity> = answer.unwrap_or_default().into_iter().collect();
        let answered = refreshed.error.is_none();
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        for entry in entries.values_mut() {
            match by_id.get(&entry.full_id) {
                Some(identity) => entry.lookup = Lookup::Pod(Arc::new(identity.clone())),
                // Without an answer a known name stays; without a runtime nothing will name it.
                None if answered && matches!(entry.lookup, Lookup::Pending) => entry.lookup = Lookup::NotAPod,
                None => {}
            }
            if entry.gone_since.is_none() && self.is_gone(entry) {
                entry.gone_since = Some(now);
            }
        }
        entries.retain(|key, entry| match entry.gone_since {
            Some(since) if now.duration_since(since) >= self.expire_after => {
                refreshed.expired.push(*key);
                false
            }
            _ => true,
        });
        drop(entries);
        self.refreshed.notify_waiters();
        refreshed
    }

    /// A container is gone when its cgroup directory is (runtimes remove it with the container).
    fn is_gone(&self, entry: &Entry) -> bool {
        let Some(root) = &self.cgroup_root else { return false };
        let dir = root.join(entry.cgroup_path.trim_start_matches('/'));
        matches!(std::fs::metadata(&dir), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
    }

    /// The key a container's series count under (its short id).
    pub fn key_of(container: &Container) -> ContainerKey {
        container_key(container.short_id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f1c2b7e9a0d4c5b8e6f7a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f";

    fn container(cgroup: &str) -> Container {
        Container::new(cgroup.to_owned())
    }

    #[tokio::test(flavor = "current_thread")]
    async fn without_a_runtime_containers_stay_unnamed_and_gone_ones_expire() {
        let root = std::env::temp_dir().join(format!("observer-pods-{}", std::process::id()));
        let cgroup = format!("/docker/{ID}");
        std::fs::create_dir_all(root.join(cgroup.trim_start_matches('/'))).unwrap();
        let pods = Pods::new(Duration::from_secs(60), Some(root.clone()));
        let c = container(&cgroup);
        let key = Pods::key_of(&c);
        pods.note(key, &c);
        assert!(pods.pending([key]));
        let t0 = Instant::now();
        let r = pods.refresh(None, t0).await;
        assert!(r.expired.is_empty() && r.error.is_none());
        assert!(!pods.pending([key]), "no runtime: nothing will name it");
        assert_eq!(pods.identity(&key), None);

        std::fs::remove_dir_all(&root).unwrap();
        assert!(pods.refresh(None, t0 + Duration::from_secs(1)).await.expired.is_empty(), "gone, not yet expired");
        assert_eq!(pods.refresh(None, t0 + Duration::from_secs(61)).await.expired, vec![key]);
        assert_eq!(pods.report().containers, 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_unreachable_runtime_is_reported_and_names_nothing() {
        let pods = Pods::new(Duration::from_secs(60), None);
        let c = container(&format!("/kubepods/burstable/pod1/{ID}"));
        pods.note(Pods::key_of(&c), &c);
        let socket = Path::new("/nonexistent/containerd.sock");
        pods.set_socket(Some(socket));
        let mut client = CriClient::new(socket, Duration::from_millis(200)).unwrap();
        let r = pods.refresh(Some(&mut client), Instant::now()).await;
        assert_eq!(r.error.as_ref().map(|e| e.operation), Some("version"));
        let report = pods.report();
        assert_eq!((report.state.as_str(), report.containers, report.pods_named), ("unreachable", 1, 0));
        assert!(report.error.unwrap_or_default().contains("/nonexistent/containerd.sock"));
        assert!(pods.pending([Pods::key_of(&c)]), "asked again at the next refresh");
    }
}
