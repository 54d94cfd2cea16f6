//! The container runtime's CRI API: the gRPC service the kubelet itself drives (containerd,
//! CRI-O and cri-dockerd all serve it), asked over its Unix socket which pod each container
//! belongs to. Only two read-only calls are made: `Version` (who answers) and `ListContainers`
//! (every container with the labels the kubelet gave it).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::{ListContainersRequest, VersionRequest, runtime_service_client::RuntimeServiceClient};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use super::PodIdentity;

/// Where runtimes put their CRI socket, in the order they are tried: containerd, CRI-O, k3s's
/// containerd, cri-dockerd. Each also under `/host`, where a DaemonSet may mount the host's
/// `/run`.
pub const DEFAULT_SOCKETS: [&str; 8] = [
    "/run/containerd/containerd.sock",
    "/run/crio/crio.sock",
    "/run/k3s/containerd/containerd.sock",
    "/run/cri-dockerd.sock",
    "/host/run/containerd/containerd.sock",
    "/host/run/crio/crio.sock",
    "/host/run/k3s/containerd/containerd.sock",
    "/host/run/cri-dockerd.sock",
];

/// The kubelet's labels on every container it creates.
const POD_NAME: &str = "io.kubernetes.pod.name";
const POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
const POD_UID: &str = "io.kubernetes.pod.uid";
const CONTAINER_NAME: &str = "io.kubernetes.container.name";

/// A call to the runtime failed; `operation` is the metric label it is counted under.
#[derive(Debug, thiserror::Error)]
#[error("CRI {operation} on {socket}: {message}")]
pub struct CriError {
    pub operation: &'static str,
    pub socket: String,
    pub message: String,
}

/// The first of [`DEFAULT_SOCKETS`] that exists and is a socket.
pub fn find_socket() -> Option<PathBuf> {
    use std::os::unix::fs::FileTypeExt as _;
    DEFAULT_SOCKETS.iter().map(PathBuf::from).find(|p| std::fs::metadata(p).is_ok_and(|m| m.file_type().is_socket()))
}

/// Who answers on the socket (`Version`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeVersion {
    /// `containerd`, `cri-o`, `docker`.
    pub name: String,
    pub version: String,
}

/// A CRI client on one socket. Every call has a deadline: a slow runtime costs the caller (the
/// identity task, never the event path) at most that long.
pub struct CriClient {
    socket: PathBuf,
    client: RuntimeServiceClient<Channel>,
}

impl CriClient {
    /// A client that connects on first use (and again after the runtime restarts).
    pub fn new(socket: &Path, timeout: Duration) -> Result<Self, CriError> {
        let path = socket.to_path_buf();
        // The URI is required by the API and ignored by the connector.
        let endpoint = Endpoint::from_static("http://cri.invalid").connect_timeout(timeout).timeout(timeout);
        let channel = endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }));
        Ok(Self { socket: socket.to_path_buf(), client: RuntimeServiceClient::new(channel) })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn error(&self, operation: &'static str, status: tonic::Status) -> CriError {
        // A transport failure hides its cause (ENOENT, ECONNREFUSED) in the source chain.
        let mut message = format!("{}: {}", status.code(), status.message());
        let mut source = std::error::Error::source(&status);
        while let Some(s) = source {
            message.push_str(&format!(": {s}"));
            source = s.source();
        }
        CriError { operation, socket: self.socket.display().to_string(), message }
    }

    pub async fn version(&mut self) -> Result<RuntimeVersion, CriError> {
        let reply = self
            .client
            .version(VersionRequest { version: "v1".into() })
            .await
            .map_err(|e| self.error("version", e))?
            .into_inner();
        Ok(RuntimeVersion { name: reply.runtime_name, version: reply.runtime_version })
    }

    /// Every container the runtime knows (running or not), with its pod identity: the full
    /// container id and what the kubelet's labels say.
    pub async fn list_containers(&mut self) -> Result<Vec<(String, PodIdentity)>, CriError> {
        let reply = self
            .client
            .list_containers(ListContainersRequest { filter: None })
            .await
            .map_err(|e| self.error("list_containers", e))?
            .into_inner();
        Ok(reply.containers.into_iter().map(|c| (c.id.clone(), identity(&c))).collect())
    }
}

/// The pod identity the kubelet wrote into a container's labels. Containers made through CRI by
/// something other than the kubelet may lack them: the runtime's own annotations and the
/// container's metadata fill in what they can.
fn identity(c: &k8s_cri::v1::Container) -> PodIdentity {
    let label = |key: &str, fallback: &str| {
        c.labels.get(key).or_else(|| c.annotations.get(fallback)).cloned().unwrap_or_default()
    };
    PodIdentity {
        namespace: label(POD_NAMESPACE, "io.kubernetes.cri.sandbox-namespace"),
        pod: label(POD_NAME, "io.kubernetes.cri.sandbox-name"),
        pod_uid: label(POD_UID, "io.kubernetes.cri.sandbox-uid"),
        container: c
            .labels
            .get(CONTAINER_NAME)
            .cloned()
            .or_else(|| c.metadata.as_ref().map(|m| m.name.clone()))
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_comes_from_the_kubelets_labels_then_the_runtimes_annotations() {
        let mut c = k8s_cri::v1::Container {
            id: "c0ffee".into(),
            metadata: Some(k8s_cri::v1::ContainerMetadata { name: "app".into(), attempt: 0 }),
            ..Default::default()
        };
        c.labels.insert(POD_NAME.into(), "orders-7d9f".into());
        c.labels.insert(POD_NAMESPACE.into(), "shop".into());
        c.annotations.insert("io.kubernetes.cri.sandbox-uid".into(), "uid-1".into());
        assert_eq!(
            identity(&c),
            PodIdentity {
                namespace: "shop".into(),
                pod: "orders-7d9f".into(),
                pod_uid: "uid-1".into(),
                container: "app".into()
            }
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_missing_socket_is_an_error_naming_the_socket_and_the_call() {
        let mut client = CriClient::new(Path::new("/nonexistent/cri.sock"), Duration::from_millis(200)).unwrap();
        let e = client.version().await.unwrap_err();
        assert_eq!(e.operation, "version");
        let text = e.to_string();
        assert!(text.contains("/nonexistent/cri.sock") && text.contains("No such file"), "{text}");
    }
}
