//! `cargo xtask image`: observer's container image as an OCI image archive, written without a
//! registry or a container engine.
//!
//! The image holds the release binary at [`ENTRYPOINT`] and exactly what it links: the ELF
//! interpreter and the libraries named by `DT_NEEDED`, transitively, found the way the dynamic
//! loader finds them (`DT_RPATH`, `DT_RUNPATH`, the directories of `/etc/ld.so.conf` that
//! `ld.so.cache` is built from, then the loader's system search path), each at the path the loader
//! opens, with every symbolic link on the way (`/lib64 -> usr/lib64`, ...) as it is on this host.
//! Nothing else: the daemon reads `/proc` and `/sys`, which the runtime mounts, writes no file, and
//! runs with a read-only root file system; it needs no `/etc/passwd` (it runs as uid 0 and never
//! looks a user up), no CA certificates (it speaks plain HTTP), no `/tmp`. `/etc/hosts` and
//! `/etc/resolv.conf`, which `observer status --endpoint http://NAME:PORT` would use to resolve a
//! name (IP addresses need neither), are mounted by the kubelet and by `docker run`.
//!
//! The archive is an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/...`) that is
//! also a `docker save` archive (`manifest.json`, `repositories`), so `ctr image import` and
//! `docker load` both take it. The one layer is an uncompressed tar: its digest is its `diff_id`,
//! no compressor's version can change the bytes, and the archive only travels to a local
//! importer (a registry push through `skopeo`/`crane` compresses it on the way if asked).
//!
//! Reproducible: every time stamp is `SOURCE_DATE_EPOCH` if set, else the commit time of HEAD;
//! entries are sorted; owners are 0:0 without names; modes are normalised (0755 for the binary
//! and the libraries and directories, 0644 for other files); the JSON documents are written from
//! structs and sorted maps. The same binary and host libraries give a byte-identical archive.
//!
//! For other tasks and tests: the archive is at [`default_output`] unless `--output` says
//! otherwise; `cargo xtask image --print-name` prints the image name (`docker.io/library/observer:
//! <version>`, the name the importers register) and `--print-path` the archive path, both without
//! building anything.
use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    fs,
    io::Write as _,
    path::{Component, Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::{build, cmd, run, setup};

/// Where the binary is in the image; the image's `Entrypoint`.
pub const ENTRYPOINT: &str = "/usr/bin/observer";
/// The image's `Cmd`.
pub const CMD: &str = "run";
/// The repository of the default name, `observer:<version>`.
pub const DEFAULT_REPOSITORY: &str = "observer";
/// The folder of the target directory the archive goes to by default.
pub const OUTPUT_DIR: &str = "image";

const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const METRICS_PORT: &str = "9645/tcp";
const TITLE: &str = "observer";
const DESCRIPTION: &str =
    "eBPF TCP connection observer: who resets and prematurely closes connections, with whom, and how";
const LICENSES: &str = "MIT OR Apache-2.0";

const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

#[derive(clap::Args)]
pub struct Args {
    /// Where to write the archive [default: <target dir>/image/observer-<version>.oci.tar].
    #[arg(long, value_name = "PATH")]
    pub output: Option<PathBuf>,
    /// Image name [default: observer:<version>, i.e. docker.io/library/observer:<version>].
    #[arg(long, value_name = "NAME:TAG")]
    pub tag: Option<String>,
    /// The `org.opencontainers.image.source` label [default: the URL of the git remote `origin`].
    #[arg(long, value_name = "URL")]
    pub source: Option<String>,
    /// Print the full image name (what `ctr image import` / `docker load` register) and exit,
    /// building nothing.
    #[arg(long, conflicts_with = "print_path")]
    pub print_name: bool,
    /// Print the path of the archive and exit, building nothing.
    #[arg(long)]
    pub print_path: bool,
}

/// `<target dir>/image/observer-<version>.oci.tar`.
pub fn default_output(target_dir: &Path, version: &str) -> PathBuf {
    target_dir.join(OUTPUT_DIR).join(format!("observer-{version}.oci.tar"))
}

pub fn image(args: Args) -> Result<()> {
    let version = env!("CARGO_PKG_VERSION");
    let name = ImageName::parse(&args.tag.clone().unwrap_or_else(|| format!("{DEFAULT_REPOSITORY}:{version}")))?;
    if args.print_name {
        println!("{}", name.full());
        return Ok(());
    }
    if args.print_path {
        let ready = setup::Ready { root: cmd::workspace_root()?, path: std::env::var_os("PATH").unwrap_or_default() };
        println!("{}", output_path(&args, &ready, version)?.display());
        return Ok(());
    }

    let ready = setup::setup()?;
    build::cargo_build(&ready, true)?;
    let binary = run::target_dir(&ready)?.join("release").join("observer");
    let output = output_path(&args, &ready, version)?;
    let said = cmd::stdout(Command::new(&binary).arg("--version"))
        .with_context(|| format!("the freshly built {} does not run on this machine", binary.display()))?;
    if said.trim() != format!("observer {version}") {
        bail!(
            "{} says {:?}, but this xtask was built for version {version}: rebuild both (`cargo xtask image` again after `cargo build -p xtask`)",
            binary.display(),
            said.trim()
        );
    }

    let epoch = source_date_epoch(&ready.root)?;
    let rootfs = Rootfs::collect(Path::new("/"), &binary, ENTRYPOINT, None)?;
    let mut labels = BTreeMap::from([
        ("org.opencontainers.image.title".to_string(), TITLE.to_string()),
        ("org.opencontainers.image.description".to_string(), DESCRIPTION.to_string()),
        ("org.opencontainers.image.licenses".to_string(), LICENSES.to_string()),
        ("org.opencontainers.image.version".to_string(), version.to_string()),
        ("org.opencontainers.image.created".to_string(), rfc3339(epoch)),
    ]);
    match git(&ready.root, &["rev-parse", "HEAD"]) {
        Some(revision) => {
            if git(&ready.root, &["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty()) {
                eprintln!(
                    "observer image: warning: the work tree has uncommitted changes; the revision label names HEAD ({revision})"
                );
            }
            labels.insert("org.opencontainers.image.revision".to_string(), revision);
        }
        None => eprintln!(
            "observer image: warning: not a git checkout (or no git): no org.opencontainers.image.revision label"
        ),
    }
    match args.source.clone().or_else(|| git(&ready.root, &["remote", "get-url", "origin"]).map(|u| strip_userinfo(&u)))
    {
        Some(source) => {
            labels.insert("org.opencontainers.image.source".to_string(), source);
        }
        None => eprintln!(
            "observer image: warning: no git remote `origin`: no org.opencontainers.image.source label (pass --source URL)"
        ),
    }
    let mut env = vec![PATH_ENV.to_string()];
    if !rootfs.extra_library_dirs.is_empty() {
        // Found through ld.so.cache on this host; the image has no cache.
        let dirs: Vec<&str> = rootfs.extra_library_dirs.iter().map(String::as_str).collect();
        env.push(format!("LD_LIBRARY_PATH={}", dirs.join(":")));
    }
    let (architecture, variant) = oci_architecture(rootfs.machine)?;
    let spec = Spec { name: name.clone(), epoch, architecture, variant, labels, env };

    let layer = rootfs.layer_tar(epoch)?;
    let built = write_archive(&spec, &layer)?;
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).with_context(|| format!("creating {} for the image archive", dir.display()))?;
    }
    let partial = output.with_extension(format!("tar.partial-{}", std::process::id()));
    fs::File::create(&partial)
        .and_then(|mut f| f.write_all(&built.archive).and_then(|()| f.sync_all()))
        .and_then(|()| fs::rename(&partial, &output))
        .with_context(|| format!("writing the image archive {} (is the directory writable?)", output.display()))
        .inspect_err(|_| {
            let _ = fs::remove_file(&partial);
        })?;

    println!("observer image: {} contents:", name.full());
    for line in rootfs.listing() {
        println!("  {line}");
    }
    println!("observer image: wrote {}", output.display());
    println!("  name      {}", name.full());
    println!(
        "  size      {} bytes ({:.1} MiB; layer {} bytes, uncompressed)",
        built.archive.len(),
        mib(built.archive.len()),
        layer.len()
    );
    println!("  manifest  {}", built.manifest_digest);
    println!("  config    {}", built.config_digest);
    println!("  layer     {} (= its diff_id)", built.layer_digest);
    println!("  created   {}", rfc3339(epoch));
    println!("  import    ctr -n k8s.io image import {0}   |   docker load -i {0}", output.display());
    Ok(())
}

fn output_path(args: &Args, ready: &setup::Ready, version: &str) -> Result<PathBuf> {
    Ok(match &args.output {
        Some(p) => p.clone(),
        None => default_output(&run::target_dir(ready)?, version),
    })
}

fn mib(n: usize) -> f64 {
    n as f64 / (1024.0 * 1024.0)
}

/// `SOURCE_DATE_EPOCH` if set, else the commit time of HEAD.
fn source_date_epoch(root: &Path) -> Result<u64> {
    if let Some(v) = std::env::var_os("SOURCE_DATE_EPOCH").filter(|v| !v.is_empty()) {
        let v = v.to_string_lossy();
        return v.trim().parse().map_err(|_| {
            anyhow!(
                "SOURCE_DATE_EPOCH={v:?} is not a number of seconds since 1970 (unset it to use HEAD's commit time)"
            )
        });
    }
    let time = git(root, &["log", "-1", "--format=%ct", "HEAD"]).ok_or_else(|| {
        anyhow!("cannot read the commit time of HEAD in {} (no git?): set SOURCE_DATE_EPOCH", root.display())
    })?;
    time.parse()
        .map_err(|_| anyhow!("`git log -1 --format=%ct HEAD` printed {time:?}, not a time: set SOURCE_DATE_EPOCH"))
}

/// `git ARGS` in `root`: its trimmed output, or None when it fails.
fn git(root: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git").arg("-C").arg(root).args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `https://user:secret@host/x` -> `https://host/x`: a label must not carry credentials.
fn strip_userinfo(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if let Some((_, host)) = authority.rsplit_once('@') {
            return format!("{scheme}://{host}{path}");
        }
    }
    url.to_string()
}

/// The OCI `architecture` (and `variant`) of an ELF machine.
fn oci_architecture(machine: u16) -> Result<(String, Option<String>)> {
    use object::elf;
    Ok(match machine {
        elf::EM_X86_64 => ("amd64".to_string(), None),
        elf::EM_AARCH64 => ("arm64".to_string(), Some("v8".to_string())),
        elf::EM_RISCV => ("riscv64".to_string(), None),
        elf::EM_PPC64 => ("ppc64le".to_string(), None),
        elf::EM_S390 => ("s390x".to_string(), None),
        other => bail!("the binary is for ELF machine {other}, which this task has no OCI architecture name for"),
    })
}

/// Seconds since 1970 as RFC 3339 UTC (`2026-12-02T00:53:34Z`).
fn rfc3339(epoch: u64) -> String {
    let days = (epoch / 86_400) as i64;
    let secs = epoch % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs / 60 % 60, secs % 60)
}

// ---------------------------------------------------------------------------------------------
// Image names

/// A normalised image reference: `docker.io/library/observer:0.1.0` for `observer:0.1.0`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageName {
    pub domain: String,
    pub path: String,
    pub tag: String,
}

impl ImageName {
    /// Parses `[DOMAIN/]PATH[:TAG]` as Docker and containerd do: a first component with a `.` or
    /// `:`, or `localhost`, is a registry; otherwise the registry is `docker.io`, where a
    /// one-component path is in `library/`. No tag means `latest`; digests are refused.
    pub fn parse(s: &str) -> Result<ImageName> {
        let bad = |why: &str| {
            anyhow!(
                "image name {s:?}: {why} (expected NAME[:TAG], e.g. observer:0.1.0 or registry.example.com/observer:0.1.0)"
            )
        };
        if s.contains('@') {
            return Err(bad("a digest (@sha256:...) names content, not a tag to create"));
        }
        let (name, tag) = match s.rfind(':') {
            Some(i) if !s[i..].contains('/') => (&s[..i], &s[i + 1..]),
            _ => (s, "latest"),
        };
        let tag_ok = tag.len() <= 128
            && tag.chars().next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
            && tag.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !tag_ok {
            return Err(bad("the tag must be 1-128 of [A-Za-z0-9_.-], not starting with . or -"));
        }
        let (domain, path) = match name.split_once('/') {
            Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => (first, rest.to_string()),
            _ => ("docker.io", name.to_string()),
        };
        let domain = if domain == "index.docker.io" { "docker.io" } else { domain };
        let (host, port) = domain.split_once(':').unwrap_or((domain, "1"));
        let host_ok = !host.is_empty() && host.chars().all(|c| c.is_ascii_alphanumeric() || ".-".contains(c));
        if !host_ok || port.is_empty() || !port.chars().all(|c| c.is_ascii_digit()) {
            return Err(bad("the registry must be HOST or HOST:PORT"));
        }
        let component_ok = |c: &str| {
            !c.is_empty()
                && c.starts_with(|ch: char| ch.is_ascii_lowercase() || ch.is_ascii_digit())
                && c.ends_with(|ch: char| ch.is_ascii_lowercase() || ch.is_ascii_digit())
                && c.chars().all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || "._-".contains(ch))
        };
        if !path.split('/').all(component_ok) {
            return Err(bad("each path component must be lower-case letters, digits and . _ -"));
        }
        let path = if domain == "docker.io" && !path.contains('/') { format!("library/{path}") } else { path };
        Ok(ImageName { domain: domain.to_string(), path, tag: tag.to_string() })
    }

    /// `docker.io/library/observer:0.1.0`: containerd's name, the `io.containerd.image.name`.
    pub fn full(&self) -> String {
        format!("{}/{}:{}", self.domain, self.path, self.tag)
    }

    /// Docker's short repository name (`observer`, `registry.example.com/observer`).
    pub fn familiar_repository(&self) -> String {
        match (self.domain.as_str(), self.path.strip_prefix("library/")) {
            ("docker.io", Some(short)) if !short.contains('/') => short.to_string(),
            ("docker.io", _) => self.path.clone(),
            _ => format!("{}/{}", self.domain, self.path),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The root file system: the binary and what it links

/// One entry of the layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Dir,
    File { data: Vec<u8>, mode: u32 },
    Symlink(PathBuf),
}

/// The layer's entries by path (relative, no leading `/`), and facts about the binary.
#[derive(Debug, Default)]
pub struct Rootfs {
    pub nodes: BTreeMap<String, Node>,
    /// `e_machine` of the binary.
    pub machine: u16,
    /// Directories that supplied libraries but are not on the loader's own search path (found
    /// through `ld.so.cache`): they go into `LD_LIBRARY_PATH`.
    pub extra_library_dirs: BTreeSet<String>,
}

struct ElfInfo {
    is_64: bool,
    machine: u16,
    interpreter: Option<String>,
    soname: Option<String>,
    needed: Vec<String>,
    rpath: Vec<String>,
    runpath: Vec<String>,
}

fn parse_elf(data: &[u8]) -> Result<ElfInfo> {
    use object::{FileKind, elf::FileHeader32, elf::FileHeader64};
    match FileKind::parse(data).map_err(|e| anyhow!("{e}"))? {
        FileKind::Elf32 => parse_elf_as::<FileHeader32<object::Endianness>>(data),
        FileKind::Elf64 => parse_elf_as::<FileHeader64<object::Endianness>>(data),
        kind => bail!("not an ELF file ({kind:?})"),
    }
}

fn parse_elf_as<Elf>(data: &[u8]) -> Result<ElfInfo>
where
    Elf: object::read::elf::FileHeader<Endian = object::Endianness>,
{
    use object::{elf, read::elf::ProgramHeader as _};
    let e = |e: object::read::Error| anyhow!("{e}");
    let header = Elf::parse(data).map_err(e)?;
    let endian = header.endian().map_err(e)?;
    let mut interpreter = None;
    for ph in header.program_headers(endian, data).map_err(e)? {
        if let Some(interp) = ph.interpreter(endian, data).map_err(e)? {
            interpreter = Some(String::from_utf8_lossy(interp).into_owned());
        }
    }
    let sections = header.sections(endian, data).map_err(e)?;
    let dynamic = sections.dynamic_table(endian, data).map_err(e)?;
    let mut info = ElfInfo {
        is_64: header.is_type_64(),
        machine: header.e_machine(endian),
        interpreter,
        soname: None,
        needed: Vec::new(),
        rpath: Vec::new(),
        runpath: Vec::new(),
    };
    for d in dynamic.iter() {
        if !matches!(d.tag, elf::DT_NEEDED | elf::DT_SONAME | elf::DT_RPATH | elf::DT_RUNPATH) {
            continue;
        }
        let s = String::from_utf8_lossy(dynamic.string(d).map_err(e)?).into_owned();
        match d.tag {
            elf::DT_NEEDED => info.needed.push(s),
            elf::DT_SONAME => info.soname = Some(s),
            elf::DT_RPATH => info.rpath.extend(s.split(':').filter(|p| !p.is_empty()).map(String::from)),
            _ => info.runpath.extend(s.split(':').filter(|p| !p.is_empty()).map(String::from)),
        }
    }
    if info.interpreter.is_some() && dynamic.is_empty() {
        // The libraries are read from the SHT_DYNAMIC section.
        bail!("it has an ELF interpreter but no dynamic section (were its section headers stripped?)");
    }
    Ok(info)
}

/// A library still to find: its name, who needs it, and the directories that object's loader
/// chain says to search first.
struct Pending {
    name: String,
    needed_by: PathBuf,
    rpath: Vec<PathBuf>,
    runpath: Vec<PathBuf>,
}

impl Rootfs {
    /// The binary at `dest` (absolute, in the image), plus its interpreter and libraries, looked up
    /// in the file system rooted at `host` (`/` for real; a fixture in the tests). `system_dirs`:
    /// the loader's search path, or None to ask the interpreter (`ld.so --help`) and fall back to
    /// glibc's usual list.
    pub fn collect(host: &Path, binary: &Path, dest: &str, system_dirs: Option<Vec<PathBuf>>) -> Result<Rootfs> {
        let data = fs::read(binary).with_context(|| format!("reading {} (build it first)", binary.display()))?;
        let info = parse_elf(&data).with_context(|| format!("reading the ELF headers of {}", binary.display()))?;
        let mut fs = Rootfs { machine: info.machine, ..Rootfs::default() };
        let dest = dest.trim_start_matches('/');
        if dest.is_empty() {
            bail!("the binary's destination in the image is empty");
        }
        fs.add_parents(dest)?;
        fs.insert(dest, Node::File { data, mode: 0o755 })?;
        if [&info.rpath, &info.runpath].into_iter().flatten().any(|d| d.contains("$ORIGIN") || d.contains("${ORIGIN}"))
        {
            bail!(
                "{} has an $ORIGIN RPATH/RUNPATH ({:?}), which would point elsewhere once it is at /{dest} in the image: link it without one",
                binary.display(),
                [info.rpath.clone(), info.runpath.clone()].concat()
            );
        }

        let Some(interp) = info.interpreter.clone() else {
            if !info.needed.is_empty() {
                bail!("{} needs shared libraries but names no ELF interpreter (PT_INTERP)", binary.display());
            }
            return Ok(fs); // static
        };
        let interp_real = fs.add_host_path(host, Path::new(&interp)).with_context(|| {
            format!("{} names the interpreter {interp}, which is not usable on this machine", binary.display())
        })?;
        let interp_info =
            parse_elf(&fs::read(&interp_real)?).with_context(|| format!("reading {}", interp_real.display()))?;
        let system_dirs = match system_dirs {
            Some(dirs) => dirs,
            None => loader_search_path(&interp_real, info.machine),
        };
        let conf_dirs = ld_so_conf_dirs(host);

        let mut loaded: BTreeSet<String> = interp_info.soname.iter().cloned().collect();
        loaded.insert(file_name(&interp));
        let mut queue: VecDeque<Pending> = info
            .needed
            .iter()
            .map(|name| Pending {
                name: name.clone(),
                needed_by: binary.to_path_buf(),
                rpath: if info.runpath.is_empty() { info.rpath.iter().map(PathBuf::from).collect() } else { vec![] },
                runpath: info.runpath.iter().map(PathBuf::from).collect(),
            })
            .collect();
        while let Some(p) = queue.pop_front() {
            if loaded.contains(&p.name) {
                continue;
            }
            let (found, how) = resolve_library(host, &p, &conf_dirs, &system_dirs, &info)?;
            if how == Found::Cache
                && let Some(dir) = found.parent()
            {
                fs.extra_library_dirs.insert(dir.display().to_string());
            }
            let real = fs.add_host_path(host, &found)?;
            let lib = parse_elf(&fs::read(&real)?).with_context(|| format!("reading {}", real.display()))?;
            loaded.insert(p.name.clone());
            if let Some(soname) = &lib.soname {
                loaded.insert(soname.clone());
            }
            let origin = found.parent().map(Path::to_path_buf).unwrap_or_default();
            let expand = |d: &String| {
                PathBuf::from(d.replace("${ORIGIN}", "$ORIGIN").replace("$ORIGIN", &origin.to_string_lossy()))
            };
            // DT_RPATH applies to the object's own needs and those of what it loads (unless
            // they have a DT_RUNPATH); DT_RUNPATH only to its own.
            let mut rpath: Vec<PathBuf> =
                if lib.runpath.is_empty() { lib.rpath.iter().map(expand).collect() } else { vec![] };
            rpath.extend(p.rpath.iter().cloned());
            let runpath: Vec<PathBuf> = lib.runpath.iter().map(expand).collect();
            for name in &lib.needed {
                queue.push_back(Pending {
                    name: name.clone(),
                    needed_by: found.clone(),
                    rpath: if runpath.is_empty() { rpath.clone() } else { Vec::new() },
                    runpath: runpath.clone(),
                });
            }
        }
        Ok(fs)
    }

    fn insert(&mut self, path: &str, node: Node) -> Result<()> {
        match self.nodes.get(path) {
            Some(old) if *old == node => Ok(()),
            Some(old) => bail!("{path} would be both {} and {} in the image", kind(old), kind(&node)),
            None => {
                self.nodes.insert(path.to_string(), node);
                Ok(())
            }
        }
    }

    fn add_parents(&mut self, path: &str) -> Result<()> {
        let mut prefix = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            self.insert(&prefix, Node::Dir)?;
        }
        Ok(())
    }

    /// Adds the absolute `path` as it is under `host`: its directories, each symbolic link met on
    /// the way (followed like the kernel does), and the file it ends at. Returns that file's path
    /// on this machine.
    fn add_host_path(&mut self, host: &Path, path: &Path) -> Result<PathBuf> {
        // Names still to walk; ".." for a parent.
        let mut pending: VecDeque<String> = components(path)?;
        let mut at: Vec<String> = Vec::new(); // the resolved directory, as components
        let mut links = 0;
        while let Some(part) = pending.pop_front() {
            if part == ".." {
                at.pop();
                continue;
            }
            let part = part.as_str();
            let rel = if at.is_empty() { part.to_string() } else { format!("{}/{part}", at.join("/")) };
            let on_host = host.join(&rel);
            let meta = fs::symlink_metadata(&on_host)
                .with_context(|| format!("{} (resolving {})", on_host.display(), path.display()))?;
            if meta.file_type().is_symlink() {
                links += 1;
                if links > 40 {
                    bail!("too many levels of symbolic links resolving {}", path.display());
                }
                let target =
                    fs::read_link(&on_host).with_context(|| format!("reading the link {}", on_host.display()))?;
                self.add_parents(&rel)?;
                self.insert(&rel, Node::Symlink(target.clone()))?;
                if target.is_absolute() {
                    at.clear();
                }
                for c in components(&target)?.into_iter().rev() {
                    pending.push_front(c);
                }
            } else if meta.is_dir() {
                if pending.is_empty() {
                    bail!("{} is a directory, not a file", path.display());
                }
                self.add_parents(&rel)?;
                self.insert(&rel, Node::Dir)?;
                at.push(part.to_string());
            } else if meta.is_file() {
                if !pending.is_empty() {
                    bail!("{} is not a directory (resolving {})", on_host.display(), path.display());
                }
                let data = fs::read(&on_host).with_context(|| format!("reading {}", on_host.display()))?;
                let mode = if data.starts_with(b"\x7fELF") || meta_executable(&meta) { 0o755 } else { 0o644 };
                self.add_parents(&rel)?;
                self.insert(&rel, Node::File { data, mode })?;
                return Ok(on_host);
            } else {
                bail!("{} is neither a file, a directory nor a symbolic link", on_host.display());
            }
        }
        bail!("{} names no file", path.display())
    }

    /// The layer: an uncompressed tar of the entries in path order, every time stamp `mtime`,
    /// owned 0:0 without names.
    pub fn layer_tar(&self, mtime: u64) -> Result<Vec<u8>> {
        let mut tar = tar::Builder::new(Vec::new());
        for (path, node) in &self.nodes {
            let mut h = tar::Header::new_ustar();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(mtime);
            let result = match node {
                Node::Dir => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                    tar.append_data(&mut h, format!("{path}/"), std::io::empty())
                }
                Node::File { data, mode } => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    h.set_size(data.len() as u64);
                    tar.append_data(&mut h, path, data.as_slice())
                }
                Node::Symlink(target) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_size(0);
                    tar.append_link(&mut h, path, target)
                }
            };
            result.with_context(|| format!("adding {path} to the layer"))?;
        }
        tar.into_inner().context("finishing the layer tar")
    }

    /// `mode size path[ -> target]` for each entry.
    pub fn listing(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|(path, node)| match node {
                Node::Dir => format!("drwxr-xr-x {:>9} /{path}/", ""),
                Node::File { data, mode } => format!("-{} {:>9} /{path}", mode_string(*mode), data.len()),
                Node::Symlink(t) => format!("lrwxrwxrwx {:>9} /{path} -> {}", "", t.display()),
            })
            .collect()
    }
}

/// The names of `path` (`..` kept, `.` and `/` dropped).
fn components(path: &Path) -> Result<VecDeque<String>> {
    let mut out = VecDeque::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => {
                out.push_back(p.to_str().ok_or_else(|| anyhow!("{} is not UTF-8", path.display()))?.to_string())
            }
            Component::ParentDir => out.push_back("..".to_string()),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Ok(out)
}

fn kind(n: &Node) -> &'static str {
    match n {
        Node::Dir => "a directory",
        Node::File { .. } => "a file",
        Node::Symlink(_) => "a symbolic link",
    }
}

fn mode_string(mode: u32) -> String {
    (0..9).map(|i| if mode & (0o400 >> i) != 0 { b"rwxrwxrwx"[i] as char } else { '-' }).collect()
}

fn meta_executable(meta: &fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    meta.permissions().mode() & 0o111 != 0
}

fn file_name(p: &str) -> String {
    Path::new(p).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

#[derive(PartialEq, Eq)]
enum Found {
    /// Through DT_RPATH / DT_RUNPATH (the image's loader reads them too) or a path in DT_NEEDED.
    Path,
    /// Through a directory of ld.so.conf that is not on the loader's own search path.
    Cache,
    /// On the loader's own search path.
    System,
}

/// Finds `p.name` as ld.so does: a name with a `/` is a path; otherwise DT_RPATH (when the
/// object has no DT_RUNPATH), DT_RUNPATH, the ld.so.conf directories (what ld.so.cache holds),
/// the system search path. Files of another ELF class or machine are skipped, as ld.so does.
/// `LD_LIBRARY_PATH` is ignored: the image does not have this shell's environment.
fn resolve_library(
    host: &Path,
    p: &Pending,
    conf_dirs: &[PathBuf],
    system_dirs: &[PathBuf],
    exe: &ElfInfo,
) -> Result<(PathBuf, Found)> {
    let fits = |path: &Path| {
        let on_host = host.join(path.strip_prefix("/").unwrap_or(path));
        fs::read(&on_host)
            .ok()
            .and_then(|d| parse_elf(&d).ok())
            .is_some_and(|i| i.is_64 == exe.is_64 && i.machine == exe.machine)
    };
    if p.name.contains('/') {
        let path = PathBuf::from(&p.name);
        if fits(&path) {
            return Ok((path, Found::Path));
        }
        bail!("{} needs {}, which does not exist or is not a library for this machine", p.needed_by.display(), p.name);
    }
    let mut searched = Vec::new();
    let candidates = (p.rpath.iter().chain(&p.runpath).map(|d| (d, Found::Path)))
        .chain(conf_dirs.iter().filter(|d| !system_dirs.contains(d)).map(|d| (d, Found::Cache)))
        .chain(system_dirs.iter().map(|d| (d, Found::System)));
    for (dir, how) in candidates {
        let path = dir.join(&p.name);
        if fits(&path) {
            return Ok((path, how));
        }
        searched.push(dir.display().to_string());
    }
    bail!(
        "{} needs {}, which is in none of {}: install the package that provides it (e.g. `apt-file search {}`)",
        p.needed_by.display(),
        p.name,
        searched.join(", "),
        p.name
    )
}

/// The loader's system search path, as glibc's `ld.so --help` prints it (lines ending
/// `(system search path)`); glibc's usual directories when it cannot say.
fn loader_search_path(interp: &Path, machine: u16) -> Vec<PathBuf> {
    let said = Command::new(interp).arg("--help").output().ok().filter(|o| o.status.success());
    let dirs: Vec<PathBuf> = said
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.trim().strip_suffix("(system search path)"))
                .map(|d| PathBuf::from(d.trim()))
                .collect()
        })
        .unwrap_or_default();
    if !dirs.is_empty() {
        return dirs;
    }
    let triple = match machine {
        object::elf::EM_X86_64 => "x86_64-linux-gnu",
        object::elf::EM_AARCH64 => "aarch64-linux-gnu",
        _ => "",
    };
    let mut dirs = Vec::new();
    if !triple.is_empty() {
        dirs.push(PathBuf::from(format!("/lib/{triple}")));
        dirs.push(PathBuf::from(format!("/usr/lib/{triple}")));
    }
    dirs.extend(["/lib64", "/usr/lib64", "/lib", "/usr/lib"].map(PathBuf::from));
    dirs
}

/// The directories of `/etc/ld.so.conf` (and the files it `include`s), in order.
fn ld_so_conf_dirs(host: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    read_ld_so_conf(host, Path::new("/etc/ld.so.conf"), &mut dirs, 0);
    dirs
}

fn read_ld_so_conf(host: &Path, file: &Path, dirs: &mut Vec<PathBuf>, depth: u32) {
    let Ok(text) = fs::read_to_string(host.join(file.strip_prefix("/").unwrap_or(file))) else { return };
    if depth > 8 {
        return;
    }
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if let Some(pattern) = line.strip_prefix("include").filter(|r| r.starts_with([' ', '\t'])) {
            for pattern in pattern.split_whitespace() {
                let pattern = if pattern.starts_with('/') {
                    PathBuf::from(pattern)
                } else {
                    file.parent().unwrap_or(Path::new("/")).join(pattern)
                };
                for f in glob_last_component(host, &pattern) {
                    read_ld_so_conf(host, &f, dirs, depth + 1);
                }
            }
        } else if line.starts_with('/') && !line.starts_with("hwcap") {
            let dir = PathBuf::from(line.trim_end_matches('/'));
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
    }
}

/// Files matching `pattern` (a `*` glob in its last component only), sorted.
fn glob_last_component(host: &Path, pattern: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(glob)) = (pattern.parent(), pattern.file_name().and_then(|n| n.to_str())) else {
        return vec![];
    };
    if !glob.contains('*') {
        return vec![pattern.to_path_buf()];
    }
    let Ok(entries) = fs::read_dir(host.join(dir.strip_prefix("/").unwrap_or(dir))) else { return vec![] };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(String::from))
        .filter(|n| glob_match(glob, n))
        .map(|n| dir.join(n))
        .collect();
    found.sort();
    found
}

fn glob_match(glob: &str, name: &str) -> bool {
    match glob.split_once('*') {
        None => glob == name,
        Some((head, rest)) => {
            let Some(tail) = name.strip_prefix(head) else { return false };
            (0..=tail.len()).filter(|&i| tail.is_char_boundary(i)).any(|i| glob_match(rest, &tail[i..]))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The archive

/// What the image config says, besides its layer.
#[derive(Clone, Debug)]
pub struct Spec {
    pub name: ImageName,
    /// Every time stamp: the config's `created`, the tar entries' mtimes.
    pub epoch: u64,
    pub architecture: String,
    pub variant: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub env: Vec<String>,
}

/// A written archive and the digests in it (`sha256:<hex>`).
pub struct Built {
    pub archive: Vec<u8>,
    pub manifest_digest: String,
    pub config_digest: String,
    pub layer_digest: String,
}

#[derive(Serialize)]
struct Descriptor {
    #[serde(rename = "mediaType")]
    media_type: &'static str,
    digest: String,
    size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    platform: Option<Platform>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<&'static str, String>,
}

#[derive(Serialize)]
struct Platform {
    architecture: String,
    os: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<String>,
}

#[derive(Serialize)]
struct Index {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'static str,
    manifests: Vec<Descriptor>,
}

#[derive(Serialize)]
struct Manifest {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'static str,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Serialize)]
struct Empty {}

#[derive(Serialize)]
struct ImageConfig {
    created: String,
    architecture: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<String>,
    os: &'static str,
    config: RunConfig,
    rootfs: RootfsConfig,
    history: Vec<History>,
}

#[derive(Serialize)]
struct RunConfig {
    #[serde(rename = "Env")]
    env: Vec<String>,
    #[serde(rename = "Entrypoint")]
    entrypoint: Vec<&'static str>,
    #[serde(rename = "Cmd")]
    cmd: Vec<&'static str>,
    #[serde(rename = "ExposedPorts")]
    exposed_ports: BTreeMap<&'static str, Empty>,
    #[serde(rename = "Labels")]
    labels: BTreeMap<String, String>,
    #[serde(rename = "StopSignal")]
    stop_signal: &'static str,
}

#[derive(Serialize)]
struct RootfsConfig {
    #[serde(rename = "type")]
    kind: &'static str,
    diff_ids: Vec<String>,
}

#[derive(Serialize)]
struct History {
    created: String,
    created_by: &'static str,
    comment: &'static str,
}

#[derive(Serialize)]
struct DockerManifest {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags")]
    repo_tags: Vec<String>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

fn sha256(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    let mut hex = String::with_capacity(64);
    for b in digest {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).context("serialising image JSON")
}

/// The whole archive, in memory: OCI layout plus docker-save files, entries sorted.
pub fn write_archive(spec: &Spec, layer: &[u8]) -> Result<Built> {
    let created = rfc3339(spec.epoch);
    let layer_hex = sha256(layer);
    let config = json(&ImageConfig {
        created: created.clone(),
        architecture: spec.architecture.clone(),
        variant: spec.variant.clone(),
        os: "linux",
        config: RunConfig {
            env: spec.env.clone(),
            entrypoint: vec![ENTRYPOINT],
            cmd: vec![CMD],
            exposed_ports: BTreeMap::from([(METRICS_PORT, Empty {})]),
            labels: spec.labels.clone(),
            stop_signal: "SIGTERM",
        },
        rootfs: RootfsConfig { kind: "layers", diff_ids: vec![format!("sha256:{layer_hex}")] },
        history: vec![History {
            created,
            created_by: "cargo xtask image",
            comment: "the observer binary and the files it links, from the build machine",
        }],
    })?;
    let config_hex = sha256(&config);
    let manifest = json(&Manifest {
        schema_version: 2,
        media_type: MEDIA_MANIFEST,
        config: Descriptor {
            media_type: MEDIA_CONFIG,
            digest: format!("sha256:{config_hex}"),
            size: config.len() as u64,
            platform: None,
            annotations: BTreeMap::new(),
        },
        layers: vec![Descriptor {
            media_type: MEDIA_LAYER,
            digest: format!("sha256:{layer_hex}"),
            size: layer.len() as u64,
            platform: None,
            annotations: BTreeMap::new(),
        }],
    })?;
    let manifest_hex = sha256(&manifest);
    let index = json(&Index {
        schema_version: 2,
        media_type: MEDIA_INDEX,
        manifests: vec![Descriptor {
            media_type: MEDIA_MANIFEST,
            digest: format!("sha256:{manifest_hex}"),
            size: manifest.len() as u64,
            platform: Some(Platform {
                architecture: spec.architecture.clone(),
                os: "linux",
                variant: spec.variant.clone(),
            }),
            annotations: BTreeMap::from([
                ("io.containerd.image.name", spec.name.full()),
                ("org.opencontainers.image.ref.name", spec.name.tag.clone()),
            ]),
        }],
    })?;
    let docker_manifest = json(&[DockerManifest {
        config: format!("blobs/sha256/{config_hex}"),
        repo_tags: vec![format!("{}:{}", spec.name.familiar_repository(), spec.name.tag)],
        layers: vec![format!("blobs/sha256/{layer_hex}")],
    }])?;
    let repositories = json(&BTreeMap::from([(
        spec.name.familiar_repository(),
        BTreeMap::from([(spec.name.tag.clone(), layer_hex.clone())]),
    )]))?;

    let mut files: BTreeMap<String, &[u8]> = BTreeMap::new();
    files.insert(format!("blobs/sha256/{layer_hex}"), layer);
    files.insert(format!("blobs/sha256/{config_hex}"), &config);
    files.insert(format!("blobs/sha256/{manifest_hex}"), &manifest);
    files.insert("index.json".into(), &index);
    files.insert("manifest.json".into(), &docker_manifest);
    files.insert("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#);
    files.insert("repositories".into(), &repositories);

    let mut tar = tar::Builder::new(Vec::new());
    for dir in ["blobs/", "blobs/sha256/"] {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(spec.epoch);
        h.set_size(0);
        tar.append_data(&mut h, dir, std::io::empty()).with_context(|| format!("adding {dir} to the archive"))?;
    }
    for (path, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(spec.epoch);
        h.set_size(data.len() as u64);
        tar.append_data(&mut h, &path, data).with_context(|| format!("adding {path} to the archive"))?;
    }
    let archive = tar.into_inner().context("finishing the archive")?;
    Ok(Built {
        archive,
        manifest_digest: format!("sha256:{manifest_hex}"),
        config_digest: format!("sha256:{config_hex}"),
        layer_digest: format!("sha256:{layer_hex}"),
    })
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    /// A fresh directory under the system's temporary directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            use std::sync::atomic::{AtomicU32, Ordering};
            static SEQ: AtomicU32 = AtomicU32::new(0);
            let n = SEQ.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("xtask-image-{tag}-{}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn spec() -> Spec {
        Spec {
            name: ImageName::parse("observer:0.1.0").unwrap(),
            epoch: 1_796_172_814,
            architecture: "amd64".into(),
            variant: None,
            labels: BTreeMap::from([("org.opencontainers.image.version".to_string(), "0.1.0".to_string())]),
            env: vec![PATH_ENV.to_string()],
        }
    }

    fn sample_rootfs() -> Rootfs {
        let mut fs = Rootfs::default();
        fs.add_parents("usr/bin/observer").unwrap();
        fs.insert("usr/bin/observer", Node::File { data: b"\x7fELF binary".to_vec(), mode: 0o755 }).unwrap();
        fs.insert("lib64", Node::Symlink("usr/lib64".into())).unwrap();
        fs.add_parents("usr/lib64/x").unwrap();
        fs.insert("usr/lib64/ld.so", Node::File { data: vec![7; 3000], mode: 0o755 }).unwrap();
        fs.insert("note", Node::File { data: b"plain".to_vec(), mode: 0o644 }).unwrap();
        fs
    }

    /// (path, header, data) of every entry.
    fn entries(archive: &[u8]) -> Vec<(String, tar::Header, Vec<u8>)> {
        let mut a = tar::Archive::new(archive);
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let path = String::from_utf8(e.path_bytes().into_owned()).unwrap();
                let header = e.header().clone();
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (path, header, data)
            })
            .collect()
    }

    fn file<'a>(entries: &'a [(String, tar::Header, Vec<u8>)], path: &str) -> &'a [u8] {
        &entries.iter().find(|(p, ..)| p == path).unwrap_or_else(|| panic!("no {path} in the archive")).2
    }

    #[test]
    fn digests_in_the_documents_match_the_blobs() {
        let layer = sample_rootfs().layer_tar(spec().epoch).unwrap();
        let built = write_archive(&spec(), &layer).unwrap();
        let e = entries(&built.archive);
        let blob = |digest: &str| file(&e, &format!("blobs/sha256/{}", digest.strip_prefix("sha256:").unwrap()));

        let index: serde_json::Value = serde_json::from_slice(file(&e, "index.json")).unwrap();
        assert_eq!(index["schemaVersion"], 2);
        let desc = &index["manifests"][0];
        assert_eq!(desc["annotations"]["io.containerd.image.name"], "docker.io/library/observer:0.1.0");
        assert_eq!(desc["annotations"]["org.opencontainers.image.ref.name"], "0.1.0");
        assert_eq!(desc["platform"]["architecture"], "amd64");
        assert_eq!(desc["platform"]["os"], "linux");
        let manifest_digest = desc["digest"].as_str().unwrap();
        assert_eq!(manifest_digest, built.manifest_digest);
        let manifest_bytes = blob(manifest_digest);
        assert_eq!(format!("sha256:{}", sha256(manifest_bytes)), manifest_digest);
        assert_eq!(desc["size"], manifest_bytes.len());

        let manifest: serde_json::Value = serde_json::from_slice(manifest_bytes).unwrap();
        assert_eq!(manifest["mediaType"], MEDIA_MANIFEST);
        let config_bytes = blob(manifest["config"]["digest"].as_str().unwrap());
        assert_eq!(format!("sha256:{}", sha256(config_bytes)), manifest["config"]["digest"]);
        assert_eq!(manifest["config"]["size"], config_bytes.len());
        let layers = manifest["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 1);
        let layer_bytes = blob(layers[0]["digest"].as_str().unwrap());
        assert_eq!(layer_bytes, layer.as_slice());
        assert_eq!(format!("sha256:{}", sha256(layer_bytes)), layers[0]["digest"]);
        assert_eq!(layers[0]["size"], layer.len());
        assert_eq!(layers[0]["mediaType"], MEDIA_LAYER);

        let config: serde_json::Value = serde_json::from_slice(config_bytes).unwrap();
        assert_eq!(config["rootfs"]["diff_ids"], serde_json::json!([format!("sha256:{}", sha256(&layer))]));
        assert_eq!(config["created"], "2026-12-02T00:53:34Z");
        assert_eq!(config["config"]["Entrypoint"], serde_json::json!(["/usr/bin/observer"]));
        assert_eq!(config["config"]["Cmd"], serde_json::json!(["run"]));
        assert_eq!(config["config"]["Labels"]["org.opencontainers.image.version"], "0.1.0");
        assert_eq!(config["architecture"], "amd64");
        assert_eq!(config["os"], "linux");

        // docker load's view of the same archive.
        let docker: serde_json::Value = serde_json::from_slice(file(&e, "manifest.json")).unwrap();
        assert_eq!(docker[0]["RepoTags"], serde_json::json!(["observer:0.1.0"]));
        assert_eq!(file(&e, docker[0]["Config"].as_str().unwrap()), config_bytes);
        assert_eq!(file(&e, docker[0]["Layers"][0].as_str().unwrap()), layer.as_slice());
        let repos: serde_json::Value = serde_json::from_slice(file(&e, "repositories")).unwrap();
        assert_eq!(repos["observer"]["0.1.0"], sha256(&layer));
        assert_eq!(file(&e, "oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#);
    }

    #[test]
    fn two_writes_are_byte_identical_and_sorted() {
        let a = write_archive(&spec(), &sample_rootfs().layer_tar(spec().epoch).unwrap()).unwrap();
        let b = write_archive(&spec(), &sample_rootfs().layer_tar(spec().epoch).unwrap()).unwrap();
        assert!(a.archive == b.archive, "two archives of the same inputs differ");
        assert_eq!(a.manifest_digest, b.manifest_digest);
        let paths: Vec<String> = entries(&a.archive).into_iter().map(|(p, ..)| p).collect();
        let mut sorted = paths.clone();
        sorted.sort();
        assert_eq!(paths, sorted);
        // Another time stamp is another archive.
        let later = Spec { epoch: spec().epoch + 1, ..spec() };
        let c = write_archive(&later, &sample_rootfs().layer_tar(later.epoch).unwrap()).unwrap();
        assert_ne!(a.manifest_digest, c.manifest_digest);
    }

    #[test]
    fn owners_modes_and_times_are_normalised() {
        let layer = sample_rootfs().layer_tar(spec().epoch).unwrap();
        let built = write_archive(&spec(), &layer).unwrap();
        for (archive, name) in [(&built.archive, "archive"), (&layer, "layer")] {
            for (path, h, _) in entries(archive) {
                assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (0, 0), "{name} {path}");
                assert_eq!(h.username_bytes().unwrap_or_default(), b"", "{name} {path}");
                assert_eq!(h.groupname_bytes().unwrap_or_default(), b"", "{name} {path}");
                assert_eq!(h.mtime().unwrap(), spec().epoch, "{name} {path}");
                let mode = h.mode().unwrap();
                match h.entry_type() {
                    tar::EntryType::Directory => assert_eq!(mode, 0o755, "{name} {path}"),
                    tar::EntryType::Symlink => assert_eq!(mode, 0o777, "{name} {path}"),
                    _ => assert!(mode == 0o755 || mode == 0o644, "{name} {path}: {mode:o}"),
                }
            }
        }
        let layer_entries = entries(&layer);
        let mode_of = |p: &str| layer_entries.iter().find(|(q, ..)| q == p).unwrap().1.mode().unwrap();
        assert_eq!(mode_of("usr/bin/observer"), 0o755);
        assert_eq!(mode_of("note"), 0o644);
        assert_eq!(mode_of("usr/"), 0o755);
        let paths: Vec<&str> = layer_entries.iter().map(|(p, ..)| p.as_str()).collect();
        assert_eq!(paths, ["lib64", "note", "usr/", "usr/bin/", "usr/bin/observer", "usr/lib64/", "usr/lib64/ld.so"]);
        let link = layer_entries.iter().find(|(p, ..)| p == "lib64").unwrap();
        assert_eq!(link.1.link_name().unwrap().unwrap(), Path::new("usr/lib64"));
    }

    #[test]
    fn symlink_chains_are_kept_as_on_the_host() {
        // /lib64 -> usr/lib64, /usr/lib64/ld.so -> /lib/x/ld.so, /lib -> usr/lib: the layout of
        // a merged-/usr Debian.
        let host = TempDir::new("chain");
        let h = &host.0;
        fs::create_dir_all(h.join("usr/lib/x")).unwrap();
        fs::create_dir_all(h.join("usr/lib64")).unwrap();
        fs::write(h.join("usr/lib/x/ld.so"), b"\x7fELF loader").unwrap();
        fs::write(h.join("usr/lib/x/data"), b"text").unwrap();
        std::os::unix::fs::symlink("usr/lib64", h.join("lib64")).unwrap();
        std::os::unix::fs::symlink("usr/lib", h.join("lib")).unwrap();
        std::os::unix::fs::symlink("/lib/x/ld.so", h.join("usr/lib64/ld.so")).unwrap();
        std::os::unix::fs::symlink("../lib/x/data", h.join("usr/lib64/data")).unwrap();

        let mut fs = Rootfs::default();
        let real = fs.add_host_path(h, Path::new("/lib64/ld.so")).unwrap();
        assert_eq!(real, h.join("usr/lib/x/ld.so"));
        let real = fs.add_host_path(h, Path::new("/lib64/data")).unwrap();
        assert_eq!(real, h.join("usr/lib/x/data"));
        let got: Vec<String> =
            fs.listing().into_iter().map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" ")).collect();
        assert_eq!(
            got,
            [
                "/lib -> usr/lib",
                "/lib64 -> usr/lib64",
                "/usr/",
                "/usr/lib/",
                "/usr/lib/x/",
                "4 /usr/lib/x/data",
                "11 /usr/lib/x/ld.so",
                "/usr/lib64/",
                "/usr/lib64/data -> ../lib/x/data",
                "/usr/lib64/ld.so -> /lib/x/ld.so",
            ]
        );
        assert_eq!(fs.nodes["usr/lib/x/data"], Node::File { data: b"text".to_vec(), mode: 0o644 });
        assert!(matches!(fs.nodes["usr/lib/x/ld.so"], Node::File { mode: 0o755, .. }));
        assert!(fs.add_host_path(h, Path::new("/lib64/missing")).is_err());
    }

    /// The libraries found for this test binary (a dynamically linked executable) are the ones
    /// the real loader maps, as `ldd` reports them.
    #[test]
    fn libraries_match_ldd() {
        let exe = std::env::current_exe().unwrap();
        let Some(out) = Command::new("ldd").arg(&exe).output().ok().filter(|o| o.status.success()) else {
            eprintln!("no ldd here (or it cannot read this binary): skipped");
            return;
        };
        let ldd = String::from_utf8_lossy(&out.stdout);
        let from_ldd: BTreeSet<PathBuf> = ldd
            .lines()
            .filter_map(|l| l.split("=>").nth(1).or_else(|| l.split_whitespace().next().filter(|p| p.starts_with('/'))))
            .filter_map(|l| l.split_whitespace().next())
            .filter(|p| p.starts_with('/'))
            .map(|p| fs::canonicalize(p).unwrap())
            .collect();
        let fs = Rootfs::collect(Path::new("/"), &exe, ENTRYPOINT, None).unwrap();
        let ours: BTreeSet<PathBuf> = fs
            .nodes
            .iter()
            .filter(|(p, n)| matches!(n, Node::File { .. }) && p.as_str() != "usr/bin/observer")
            .map(|(p, _)| fs::canonicalize(Path::new("/").join(p)).unwrap())
            .collect();
        assert_eq!(ours, from_ldd, "ldd said:\n{ldd}");
        // Every symbolic link in the layer leads to a file or directory of the layer.
        for (p, n) in &fs.nodes {
            if matches!(n, Node::Symlink(_)) {
                assert!(resolve_in(&fs, p, 0).is_some(), "{p} dangles in the layer");
            }
        }
    }

    /// The node `path` leads to inside the layer, following its symbolic links.
    fn resolve_in<'a>(fs: &'a Rootfs, path: &str, depth: u32) -> Option<&'a Node> {
        assert!(depth < 40, "symbolic link loop at {path}");
        let mut at: Vec<String> = Vec::new();
        let mut parts: VecDeque<String> = path.split('/').filter(|s| !s.is_empty()).map(String::from).collect();
        while let Some(part) = parts.pop_front() {
            match part.as_str() {
                "." => continue,
                ".." => {
                    at.pop();
                    continue;
                }
                _ => at.push(part),
            }
            match fs.nodes.get(&at.join("/"))? {
                Node::Symlink(t) => {
                    at.pop();
                    let t = t.to_string_lossy();
                    let rest: Vec<String> = parts.drain(..).collect();
                    let joined = if t.starts_with('/') { t.to_string() } else { format!("{}/{t}", at.join("/")) };
                    return resolve_in(fs, &[joined].into_iter().chain(rest).collect::<Vec<_>>().join("/"), depth + 1);
                }
                node if parts.is_empty() => return Some(node),
                Node::Dir => {}
                Node::File { .. } => return None,
            }
        }
        None
    }

    #[test]
    fn image_names_are_normalised() {
        let full = |s: &str| ImageName::parse(s).map(|n| (n.full(), n.familiar_repository()));
        assert_eq!(full("observer:0.1.0").unwrap(), ("docker.io/library/observer:0.1.0".into(), "observer".into()));
        assert_eq!(full("observer").unwrap().0, "docker.io/library/observer:latest");
        assert_eq!(full("me/observer:x").unwrap(), ("docker.io/me/observer:x".into(), "me/observer".into()));
        assert_eq!(
            full("registry.example.com:5000/team/observer:0.1.0").unwrap(),
            ("registry.example.com:5000/team/observer:0.1.0".into(), "registry.example.com:5000/team/observer".into())
        );
        assert_eq!(full("localhost/observer:dev").unwrap().0, "localhost/observer:dev");
        assert_eq!(full("docker.io/library/observer:1").unwrap().1, "observer");
        for bad in
            ["Observer:1", "observer:", "observer:-x", "observer@sha256:00", "/observer:1", "a//b:1", "observer:a/b"]
        {
            assert!(ImageName::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_796_172_814), "2026-12-02T00:53:34Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(4_107_542_399), "2100-02-28T23:59:59Z");
    }

    #[test]
    fn ld_so_conf_includes_are_followed() {
        let host = TempDir::new("conf");
        let h = &host.0;
        fs::create_dir_all(h.join("etc/ld.so.conf.d")).unwrap();
        fs::write(h.join("etc/ld.so.conf"), "/opt/first\ninclude /etc/ld.so.conf.d/*.conf\n# comment\n").unwrap();
        fs::write(h.join("etc/ld.so.conf.d/b.conf"), "/opt/b # why\n").unwrap();
        fs::write(h.join("etc/ld.so.conf.d/a.conf"), "/opt/a/\n").unwrap();
        fs::write(h.join("etc/ld.so.conf.d/ignored.txt"), "/opt/no\n").unwrap();
        assert_eq!(ld_so_conf_dirs(h), ["/opt/first", "/opt/a", "/opt/b"].map(PathBuf::from));
        assert!(glob_match("*.conf", "x.conf") && !glob_match("*.conf", "x.txt") && glob_match("a*b*c", "aXbYc"));
    }

    #[test]
    fn credentials_stay_out_of_the_source_label() {
        assert_eq!(
            strip_userinfo("https://u:tok@git.example.com/o/observer.git"),
            "https://git.example.com/o/observer.git"
        );
        assert_eq!(strip_userinfo("git@github.com:o/observer.git"), "git@github.com:o/observer.git");
        assert_eq!(strip_userinfo("https://github.com/o/observer"), "https://github.com/o/observer");
    }
}
