//! OCI image archives written here, without a registry: one uncompressed layer, its config and
//! manifest, laid out as an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/...`)
//! *and* as a `docker save` archive (`manifest.json`, `repositories`) in the same tarball, so
//! `ctr image import` and `docker load` both take it.
//!
//! Everything is deterministic: entries are sorted, owned by 0:0 and dated at the epoch, and JSON
//! keys are sorted, so the same inputs give the same digests (and the same image id) every run.
//!
//! ```no_run
//! use observer_testkit::runtime::image::OciImage;
//!
//! // busybox, the image the CRI tests run (and their pod sandbox image):
//! OciImage::busybox("localhost/observer-testkit/busybox:latest")?.write("busybox.tar".as_ref())?;
//! // any other files:
//! OciImage::builder("localhost/observer:test")
//!     .host_file("/usr/bin/observer", "target/debug/observer", 0o755)
//!     .with_shared_libraries("target/debug/observer")?
//!     .entrypoint(["/usr/bin/observer"])
//!     .write("observer.tar".as_ref())?;
//! # Ok::<(), anyhow::Error>(())
//! ```
use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::json;
use sha2::{Digest as _, Sha256};

use crate::process;

/// Where Debian's `busybox-static` puts its binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// The applets the busybox image links into `/bin` (each checked against `busybox --list`):
/// what test containers use to sleep, serve, connect, read files and look at `/proc`.
pub const BUSYBOX_APPLETS: &[&str] = &[
    "cat", "echo", "env", "grep", "head", "id", "kill", "ls", "mkdir", "nc", "ps", "rm", "sh", "sleep", "tail",
    "touch", "true", "false", "wget", "readlink", "sed", "test", "[", "httpd", "wc", "timeout", "mount",
];

/// What a file in the image holds.
#[derive(Debug, Clone)]
pub enum Content {
    /// Read from this host file when the image is written.
    Host(PathBuf),
    /// These bytes.
    Bytes(Vec<u8>),
}

#[derive(Debug, Clone)]
enum Entry {
    Dir { mode: u32 },
    File { content: Content, mode: u32 },
    Symlink { target: String },
}

/// An image being put together; [`OciImage::write`] makes the archive.
#[derive(Debug, Clone)]
pub struct OciImage {
    name: String,
    entries: BTreeMap<String, Entry>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    env: Vec<String>,
    working_dir: String,
}

/// What [`OciImage::write`] wrote: the names and digests a test checks against the runtime's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenImage {
    /// The full reference (`localhost/observer-testkit/busybox:latest`).
    pub name: String,
    /// `sha256:...` of the image config: Docker's image id and containerd's image `id`.
    pub config_digest: String,
    /// `sha256:...` of the manifest: containerd's image digest.
    pub manifest_digest: String,
    /// The archive.
    pub path: PathBuf,
}

impl OciImage {
    /// An empty image named `name` (a full reference with a tag: `localhost/NAME:TAG`; a
    /// registry-less `localhost/` name keeps containerd and Docker from rewriting it to
    /// `docker.io/library/...`). It has `/etc/passwd` and `/etc/group` (root, nobody) and the
    /// directories runtimes mount over (`/proc`, `/sys`, `/dev`, `/tmp`, ...), so a read-only root
    /// filesystem needs nothing created in it.
    pub fn builder(name: &str) -> Self {
        let mut image = Self {
            name: name.to_string(),
            entries: BTreeMap::new(),
            entrypoint: Vec::new(),
            cmd: Vec::new(),
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()],
            working_dir: "/".to_string(),
        };
        for dir in ["bin", "dev", "etc", "proc", "root", "run", "sys", "usr", "var"] {
            image = image.dir(dir, 0o755);
        }
        image
            .dir("tmp", 0o1777)
            .bytes("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n", 0o644)
            .bytes("etc/group", "root:x:0:\nnogroup:x:65534:\n", 0o644)
    }

    /// Debian's static busybox (`busybox-static`) at `/bin/busybox` with [`BUSYBOX_APPLETS`] linked
    /// to it, running `sleep 2147483647` by default, so it also serves as the CRI pod sandbox
    /// ("pause") image. Fails, saying what to install, when busybox is missing or lacks an applet.
    pub fn busybox(name: &str) -> Result<Self> {
        if !Path::new(BUSYBOX).exists() {
            bail!("busybox not installed ({BUSYBOX} is missing): apt-get install busybox-static");
        }
        let list = process::stdout(Command::new(BUSYBOX).arg("--list"))?;
        let have: Vec<&str> = list.lines().map(str::trim).collect();
        let mut image = Self::builder(name).host_file("bin/busybox", BUSYBOX, 0o755);
        for applet in BUSYBOX_APPLETS {
            if !have.contains(applet) {
                bail!("{BUSYBOX} has no `{applet}` applet (see `busybox --list`): install Debian's busybox-static");
            }
            image = image.symlink(&format!("bin/{applet}"), "busybox");
        }
        Ok(image.cmd(["sleep", "2147483647"]))
    }

    /// A directory (parents are added as 0755 directories when missing).
    pub fn dir(mut self, path: &str, mode: u32) -> Self {
        let path = normalize(path);
        self.add_parents(&path);
        self.entries.insert(path, Entry::Dir { mode });
        self
    }

    /// A regular file with `content`.
    pub fn file(mut self, path: &str, content: Content, mode: u32) -> Self {
        let path = normalize(path);
        self.add_parents(&path);
        self.entries.insert(path, Entry::File { content, mode });
        self
    }

    /// A regular file copied from the host file `host` when the image is written.
    pub fn host_file(self, path: &str, host: impl Into<PathBuf>, mode: u32) -> Self {
        self.file(path, Content::Host(host.into()), mode)
    }

    /// A regular file holding `bytes`.
    pub fn bytes(self, path: &str, bytes: impl Into<Vec<u8>>, mode: u32) -> Self {
        self.file(path, Content::Bytes(bytes.into()), mode)
    }

    /// A symbolic link at `path` pointing to `target` (as given: relative or absolute).
    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let path = normalize(path);
        self.add_parents(&path);
        self.entries.insert(path, Entry::Symlink { target: target.to_string() });
        self
    }

    /// The shared libraries and the dynamic loader that the host executable `host` needs (as
    /// `ldd` lists them), each at its host path, so a dynamically linked binary runs in the image.
    pub fn with_shared_libraries(mut self, host: impl AsRef<Path>) -> Result<Self> {
        let host = host.as_ref();
        let out = process::output(Command::new("ldd").arg(host))?;
        let text = String::from_utf8_lossy(&out.stdout);
        if text.contains("not a dynamic executable") || text.contains("statically linked") {
            return Ok(self);
        }
        if !out.status.success() {
            bail!("`ldd {}` failed: {}", host.display(), String::from_utf8_lossy(&out.stderr).trim());
        }
        for lib in parse_ldd(&text) {
            let real = fs::canonicalize(&lib)
                .with_context(|| format!("{} needs {lib}, which is not there", host.display()))?;
            self = self.host_file(&lib, real, 0o755);
        }
        Ok(self)
    }

    /// The image's `Entrypoint`.
    pub fn entrypoint<S: Into<String>>(mut self, entrypoint: impl IntoIterator<Item = S>) -> Self {
        self.entrypoint = entrypoint.into_iter().map(Into::into).collect();
        self
    }

    /// The image's `Cmd` (the arguments to the entrypoint, or the command when there is none).
    pub fn cmd<S: Into<String>>(mut self, cmd: impl IntoIterator<Item = S>) -> Self {
        self.cmd = cmd.into_iter().map(Into::into).collect();
        self
    }

    /// Adds `KEY=VALUE` to the image's `Env` (after the default `PATH`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push(format!("{key}={value}"));
        self
    }

    /// The image's `WorkingDir` (`/` unless set).
    pub fn working_dir(mut self, dir: &str) -> Self {
        self.working_dir = dir.to_string();
        self
    }

    fn add_parents(&mut self, path: &str) {
        let mut parent = Path::new(path).parent();
        while let Some(dir) = parent.filter(|p| !p.as_os_str().is_empty()) {
            let key = dir.to_string_lossy().into_owned();
            self.entries.entry(key).or_insert(Entry::Dir { mode: 0o755 });
            parent = dir.parent();
        }
    }

    /// The uncompressed layer tar.
    fn layer(&self) -> Result<Vec<u8>> {
        let mut tar = tar::Builder::new(Vec::new());
        for (path, entry) in &self.entries {
            let mut header = tar::Header::new_ustar();
            header.set_mtime(0);
            header.set_uid(0);
            header.set_gid(0);
            match entry {
                Entry::Dir { mode } => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_mode(*mode);
                    header.set_size(0);
                    tar.append_data(&mut header, format!("{path}/"), std::io::empty())
                }
                Entry::File { content, mode } => {
                    let data = match content {
                        Content::Bytes(bytes) => bytes.clone(),
                        Content::Host(host) => fs::read(host).with_context(|| {
                            format!("reading {} for /{path} of image {}", host.display(), self.name)
                        })?,
                    };
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_mode(*mode);
                    header.set_size(data.len() as u64);
                    tar.append_data(&mut header, path, data.as_slice())
                }
                Entry::Symlink { target } => {
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_mode(0o777);
                    header.set_size(0);
                    tar.append_link(&mut header, path, target)
                }
            }
            .with_context(|| format!("adding /{path} to the layer of image {}", self.name))?;
        }
        tar.into_inner().context("finishing the image layer")
    }

    /// Writes the archive to `path` (OCI layout plus `docker save` files) and returns its digests.
    pub fn write(&self, path: &Path) -> Result<WrittenImage> {
        let (repo, tag) = split_reference(&self.name)?;
        let layer = self.layer()?;
        let layer_hex = sha256_hex(&layer);
        let config = serde_json::to_vec(&json!({
            "architecture": oci_arch(),
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": {
                "Entrypoint": non_empty(&self.entrypoint),
                "Cmd": non_empty(&self.cmd),
                "Env": self.env,
                "WorkingDir": self.working_dir,
            },
            "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{layer_hex}")] },
            "history": [{ "created": "1970-01-01T00:00:00Z", "created_by": "observer-testkit runtime::image" }],
        }))?;
        let config_hex = sha256_hex(&config);
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": format!("sha256:{config_hex}"),
                "size": config.len(),
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": format!("sha256:{layer_hex}"),
                "size": layer.len(),
            }],
        }))?;
        let manifest_hex = sha256_hex(&manifest);
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": format!("sha256:{manifest_hex}"),
                "size": manifest.len(),
                "annotations": {
                    "io.containerd.image.name": self.name,
                    "org.opencontainers.image.ref.name": tag,
                },
            }],
        }))?;
        let docker_manifest = serde_json::to_vec(&json!([{
            "Config": format!("blobs/sha256/{config_hex}"),
            "RepoTags": [self.name],
            "Layers": [format!("blobs/sha256/{layer_hex}")],
        }]))?;
        let repositories = serde_json::to_vec(&json!({ repo: { tag: layer_hex } }))?;

        let mut files: BTreeMap<String, &[u8]> = BTreeMap::new();
        files.insert(format!("blobs/sha256/{layer_hex}"), &layer);
        files.insert(format!("blobs/sha256/{config_hex}"), &config);
        files.insert(format!("blobs/sha256/{manifest_hex}"), &manifest);
        files.insert("index.json".into(), &index);
        files.insert("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#);
        files.insert("manifest.json".into(), &docker_manifest);
        files.insert("repositories".into(), &repositories);

        let mut tar = tar::Builder::new(Vec::new());
        for dir in ["blobs/", "blobs/sha256/"] {
            let mut header = fixed_header(tar::EntryType::Directory, 0o755, 0);
            tar.append_data(&mut header, dir, std::io::empty())?;
        }
        for (name, data) in files {
            let mut header = fixed_header(tar::EntryType::Regular, 0o644, data.len() as u64);
            tar.append_data(&mut header, name, data)?;
        }
        let archive = tar.into_inner().context("finishing the image archive")?;
        let mut file = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        file.write_all(&archive).with_context(|| format!("writing {}", path.display()))?;
        Ok(WrittenImage {
            name: self.name.clone(),
            config_digest: format!("sha256:{config_hex}"),
            manifest_digest: format!("sha256:{manifest_hex}"),
            path: path.to_path_buf(),
        })
    }
}

fn fixed_header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header
}

fn normalize(path: &str) -> String {
    path.trim_start_matches('/').trim_end_matches('/').to_string()
}

fn non_empty(v: &[String]) -> serde_json::Value {
    if v.is_empty() { serde_json::Value::Null } else { json!(v) }
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// The GOARCH-style name OCI configs use.
fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    }
}

/// `localhost/a/b:tag` → (`localhost/a/b`, `tag`); a tag is required (Docker and containerd add
/// `latest` otherwise, and the names would no longer match).
fn split_reference(name: &str) -> Result<(&str, &str)> {
    let slash = name.rfind('/').map_or(0, |i| i + 1);
    let colon = name[slash..].rfind(':').map(|i| i + slash);
    match colon {
        Some(i) if i + 1 < name.len() && !name.contains('@') => Ok((&name[..i], &name[i + 1..])),
        _ => Err(anyhow!("image name {name:?} needs a tag: write it as localhost/NAME:TAG")),
    }
}

/// The absolute library paths in `ldd` output (`libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6
/// (0x...)` and the loader's `/lib64/ld-linux-x86-64.so.2 (0x...)`), vDSO lines left out.
fn parse_ldd(text: &str) -> Vec<String> {
    let mut libs = Vec::new();
    for line in text.lines() {
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libs.push(path.to_string());
        }
    }
    libs
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    fn entries(archive: &[u8]) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        for entry in tar::Archive::new(archive).entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            out.insert(name, data);
        }
        out
    }

    #[test]
    fn references_split_at_the_tag() {
        assert_eq!(split_reference("localhost/a/b:1").unwrap(), ("localhost/a/b", "1"));
        assert_eq!(split_reference("localhost:5000/a:t").unwrap(), ("localhost:5000/a", "t"));
        assert!(split_reference("localhost:5000/a").is_err());
        assert!(split_reference("a:").is_err());
    }

    #[test]
    fn ldd_output_gives_absolute_paths() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x7f)\n\t/lib64/ld-linux-x86-64.so.2 (0x7f)\n";
        assert_eq!(parse_ldd(text), ["/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"]);
    }

    #[test]
    fn archive_is_deterministic_and_consistent() {
        let dir = std::env::temp_dir().join(format!("observer-testkit-image-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let image = OciImage::builder("localhost/t/x:v1")
            .bytes("/usr/local/bin/hello", "#!/bin/sh\necho hi\n", 0o755)
            .symlink("bin/hi", "/usr/local/bin/hello")
            .entrypoint(["/bin/hi"])
            .env("A", "b");
        let a = image.write(&dir.join("a.tar")).unwrap();
        let b = image.write(&dir.join("b.tar")).unwrap();
        assert_eq!(a.config_digest, b.config_digest);
        let (bytes_a, bytes_b) = (fs::read(&a.path).unwrap(), fs::read(&b.path).unwrap());
        assert_eq!(bytes_a, bytes_b);
        fs::remove_dir_all(&dir).unwrap();

        let files = entries(&bytes_a);
        for (name, data) in &files {
            if let Some(hex) = name.strip_prefix("blobs/sha256/").filter(|h| !h.is_empty()) {
                assert_eq!(sha256_hex(data), *hex, "{name}");
            }
        }
        let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
        assert_eq!(index["manifests"][0]["annotations"]["io.containerd.image.name"], "localhost/t/x:v1");
        assert_eq!(index["manifests"][0]["digest"], a.manifest_digest);
        let config: serde_json::Value =
            serde_json::from_slice(&files[&format!("blobs/sha256/{}", &a.config_digest[7..])]).unwrap();
        assert_eq!(config["config"]["Entrypoint"], json!(["/bin/hi"]));
        let docker: serde_json::Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
        assert_eq!(docker[0]["RepoTags"][0], "localhost/t/x:v1");
        let layer_name = docker[0]["Layers"][0].as_str().unwrap();
        assert_eq!(config["rootfs"]["diff_ids"][0].as_str().unwrap()[7..], layer_name[13..]);
        let repositories: serde_json::Value = serde_json::from_slice(&files["repositories"]).unwrap();
        assert_eq!(repositories["localhost/t/x"]["v1"], layer_name[13..]);

        let layer = entries(&files[layer_name]);
        let names: Vec<&str> = layer.keys().map(String::as_str).collect();
        assert!(names.contains(&"usr/local/bin/") && names.contains(&"tmp/") && names.contains(&"bin/hi"), "{names:?}");
        assert_eq!(layer["usr/local/bin/hello"], b"#!/bin/sh\necho hi\n");
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
    }
}
