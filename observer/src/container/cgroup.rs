//! Cgroup id → cgroup path, cached.
//!
//! The exact and cheap way is `open_by_handle_at` on the cgroup2 mount: a cgroup2 directory's
//! file handle is its id (needs CAP_DAC_READ_SEARCH). Without it, a miss walks the cgroup2 tree.
//! A walk costs one `read_dir` per cgroup and one `stat` per directory, so it is amortised: every
//! directory a walk sees is cached, and walks are rate-limited so that a flood of ids that do not
//! resolve (cgroups outside our cgroup namespace, cgroups already removed) cannot keep the daemon
//! walking. A walk is synchronous file-system work; callers on an async runtime should expect a
//! resolve that misses to block for as long as one walk takes (milliseconds for thousands of
//! cgroups).

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use super::{Container, container_id, mountinfo::cgroup2_mount};
use crate::HashMap;

/// Where the kernel describes this process's mounts; the cgroup2 mount point is found there
/// rather than assumed, because hybrid (v1 + v2) hosts mount it at `/sys/fs/cgroup/unified`.
const MOUNTINFO: &str = "/proc/self/mountinfo";

/// At most one walk per interval, however many unknown ids arrive.
const WALK_INTERVAL: Duration = Duration::from_secs(1);

/// How long an id that a walk did not find stays "unknown" without another walk. Longer than the
/// walk interval so that one id that never resolves costs one walk per TTL, not one per second;
/// short enough that a cgroup created during a walk (and so missed by it) resolves soon after.
const NEGATIVE_TTL: Duration = Duration::from_secs(5);

/// Bound on cached cgroups (and, separately, on remembered unknown ids). Far above the cgroup
/// count of any real host, so in practice the cache only ever grows to the host's cgroup count;
/// the bound exists so that memory stays bounded if that assumption is wrong.
const MAX_ENTRIES: usize = 65_536;

/// `FILEID_KERNFS`: the file handle type of cgroup2 (kernfs) directories, whose handle is the
/// 8-byte cgroup id itself.
const FILEID_KERNFS: i32 = 0xfe;

/// The path (relative to the cgroup2 mount `root`, starting with '/') of the cgroup with id
/// `cgroup_id`, by opening it as a file handle: what `name_to_handle_at` gives for a cgroup2
/// directory is its id, so the id opens the directory directly. Needs CAP_DAC_READ_SEARCH.
fn path_by_handle(root: &Path, cgroup_id: u64) -> Option<String> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    #[repr(C)]
    struct KernfsHandle {
        handle_bytes: u32,
        handle_type: i32,
        id: u64,
    }
    let mount = fs::File::open(root).ok()?;
    let mut handle = KernfsHandle { handle_bytes: 8, handle_type: FILEID_KERNFS, id: cgroup_id };
    // SAFETY: open_by_handle_at(2) with an open directory fd and a `struct file_handle` whose
    // 8 handle bytes follow its two header fields.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount.as_raw_fd(),
            &mut handle as *mut KernfsHandle,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: the kernel just gave us this fd; File closes it.
    let dir = unsafe { fs::File::from_raw_fd(fd as i32) };
    let target = fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd())).ok()?;
    let relative = target.strip_prefix(root).ok()?;
    Some(format!("/{}", relative.to_str()?))
}

/// Resolves cgroup ids to [`Container`]s, with a cache and a bounded walk rate.
#[derive(Debug)]
pub struct CgroupResolver {
    /// The cgroup2 mount; `None` when there is none, which makes every lookup `None`.
    root: Option<PathBuf>,
    /// Every cgroup the walks have seen, by inode.
    cache: HashMap<u64, Arc<Container>>,
    /// Ids a walk did not find, with the time of that walk.
    negative: HashMap<u64, Instant>,
    /// When the last walk started; `None` before the first.
    last_walk: Option<Instant>,
    /// [`MAX_ENTRIES`], smaller in tests.
    max_entries: usize,
    /// Whether an unreadable root has been reported, so that it is reported once, not per walk.
    warned_unreadable: bool,
    /// Number of walks so far: lets the tests check that the cache and the rate limit work.
    walks: u64,
}

impl Default for CgroupResolver {
    fn default() -> Self {
        Self::new()
    }
}

impl CgroupResolver {
    /// Resolves against the cgroup2 mount named in `/proc/self/mountinfo`. Without one (a
    /// cgroup v1-only host, or no `/proc`) every lookup returns `None`, after one warning here.
    pub fn new() -> Self {
        let root = match fs::read_to_string(MOUNTINFO) {
            Ok(text) => cgroup2_mount(&text),
            Err(e) => {
                log::warn!("cannot read {MOUNTINFO} ({e}); events will carry no container");
                return Self::from_root(None);
            }
        };
        if root.is_none() {
            log::warn!("no cgroup2 mount in {MOUNTINFO}; events will carry no container");
        }
        Self::from_root(root)
    }

    /// Resolves nothing: for hosts (and tests) without a cgroup2 mount.
    pub fn without_mount() -> Self {
        Self::from_root(None)
    }

    /// Resolves against the directory tree under `root` as if it were the cgroup2 mount.
    pub fn with_root(root: PathBuf) -> Self {
        Self::from_root(Some(root))
    }

    fn from_root(root: Option<PathBuf>) -> Self {
        Self {
            root,
            cache: HashMap::default(),
            negative: HashMap::default(),
            last_walk: None,
            max_entries: MAX_ENTRIES,
            warned_unreadable: false,
            walks: 0,
        }
    }

    /// Walks of the cgroup tree so far: 0 while every id opened by its file handle.
    pub fn walks(&self) -> u64 {
        self.walks
    }

    /// The cgroup2 mount this instance resolves against.
    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    /// Whether cgroup ids open as file handles here; if not, why (then every new cgroup is found
    /// by a rate-limited walk of the tree, and a container that lives less than a walk interval
    /// can lose its id). Tried on the cgroup2 root, whose id is its inode number.
    pub fn check_handles(&self) -> Result<(), String> {
        use std::os::unix::fs::MetadataExt as _;
        let Some(root) = self.root.as_deref() else { return Ok(()) };
        let id = fs::metadata(root).map_err(|e| format!("reading {}: {e}", root.display()))?.ino();
        if path_by_handle(root, id).is_some() {
            return Ok(());
        }
        let why = std::io::Error::last_os_error();
        Err(format!(
            "cgroup ids are resolved by walking {} (rate-limited), not by open_by_handle_at ({why}; it needs CAP_DAC_READ_SEARCH): \
             a container whose cgroup lives less than a walk may be counted without its container id",
            root.display()
        ))
    }

    /// The cgroup (and container) with this id. `None` for 0 (what the kernel reports when it
    /// has no cgroup to give), without a cgroup2 mount, for ids no walk has found, and for
    /// unknown ids while walks are rate-limited.
    pub fn resolve(&mut self, cgroup_id: u64) -> Option<Arc<Container>> {
        // Nearly every event's cgroup is cached: answer those without reading the clock, which
        // only the rate limits of a miss need (and which costs as much as the lookup).
        if cgroup_id != 0
            && let Some(hit) = self.cache.get(&cgroup_id)
        {
            return Some(Arc::clone(hit));
        }
        self.resolve_at(cgroup_id, Instant::now())
    }

    /// [`Self::resolve`] at a given time, so that tests can step over the rate limits.
    fn resolve_at(&mut self, cgroup_id: u64, now: Instant) -> Option<Arc<Container>> {
        if cgroup_id == 0 {
            return None;
        }
        if let Some(hit) = self.cache.get(&cgroup_id) {
            return Some(Arc::clone(hit));
        }
        // Exact and cheap: open the cgroup by its id. Walking is the fallback (no
        // CAP_DAC_READ_SEARCH, a kernel without kernfs file handles).
        if let Some(path) = self.root.as_deref().and_then(|root| path_by_handle(root, cgroup_id)) {
            if self.cache.len() >= self.max_entries {
                self.cache.clear();
            }
            let container = Arc::new(Container { id: container_id(&path), cgroup_path: path });
            self.cache.insert(cgroup_id, Arc::clone(&container));
            return Some(container);
        }
        // An id a recent walk did not find will not be found by walking again so soon.
        if let Some(&missed) = self.negative.get(&cgroup_id) {
            if now.saturating_duration_since(missed) < NEGATIVE_TTL {
                return None;
            }
            self.negative.remove(&cgroup_id);
        }
        if self.last_walk.is_some_and(|t| now.saturating_duration_since(t) < WALK_INTERVAL) {
            // Not recorded as negative: no walk has looked for this id yet.
            return None;
        }
        let root = self.root.clone()?;
        let found = self.walk(&root, cgroup_id, now);
        if found.is_none() {
            self.remember_negative(cgroup_id, now);
        }
        found
    }

    /// Walks the whole tree under `root`, caching every directory, and returns the one whose
    /// inode is `target`. Does not stop at the target: the rest of the tree is what lets later
    /// lookups hit the cache.
    fn walk(&mut self, root: &Path, target: u64, now: Instant) -> Option<Arc<Container>> {
        self.last_walk = Some(now);
        self.walks += 1;
        // A full cache is rebuilt rather than trimmed: the walk refills it with what exists now,
        // which also drops the cgroups removed since.
        if self.cache.len() >= self.max_entries {
            self.cache.clear();
        }
        let mut found = None;
        // An explicit stack, not recursion: cgroup depth is small in practice, but it is set by
        // whoever creates cgroups, not by us.
        let mut stack = vec![(root.to_path_buf(), String::from("/"))];
        while let Some((dir, rel)) = stack.pop() {
            // Cgroups vanish while we walk; a directory that cannot be stat'ed or read is skipped.
            let ino = match fs::metadata(&dir) {
                Ok(meta) => meta.ino(),
                Err(e) => {
                    self.note_unreadable(&dir, root, &e);
                    continue;
                }
            };
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) => {
                    self.note_unreadable(&dir, root, &e);
                    continue;
                }
            };
            let container = self.remember(ino, rel.clone());
            if ino == target {
                found = Some(container);
            }
            for entry in entries.flatten() {
                // `file_type` does not follow symlinks: a cgroup tree has none, and a test tree
                // (or a mistaken root) with a symlink loop must not make the walk endless.
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let name = entry.file_name();
                let name = name.to_string_lossy();
                let child_rel = if rel == "/" { format!("/{name}") } else { format!("{rel}/{name}") };
                stack.push((entry.path(), child_rel));
            }
        }
        found
    }

    /// Caches one directory seen by a walk (space permitting) and returns its entry, reusing the
    /// cached `Arc` when the same cgroup is already known so that repeated walks do not allocate.
    fn remember(&mut self, ino: u64, cgroup_path: String) -> Arc<Container> {
        self.negative.remove(&ino);
        if let Some(known) = self.cache.get(&ino)
            && known.cgroup_path == cgroup_path
        {
            return Arc::clone(known);
        }
        let container = Arc::new(Container::new(cgroup_path));
        // A replaced entry (same inode, new path: a cgroup renamed, or an inode reused) does not
        // grow the cache, so it is always allowed.
        if self.cache.len() < self.max_entries || self.cache.contains_key(&ino) {
            self.cache.insert(ino, Arc::clone(&container));
        }
        container
    }

    fn remember_negative(&mut self, cgroup_id: u64, now: Instant) {
        if self.negative.len() >= self.max_entries {
            self.negative.retain(|_, &mut t| now.saturating_duration_since(t) < NEGATIVE_TTL);
            // Still full: a flood of distinct ids. Forgetting them costs at most one walk per
            // interval, which the walk rate limit already allows.
            if self.negative.len() >= self.max_entries {
                self.negative.clear();
            }
        }
        self.negative.insert(cgroup_id, now);
    }

    /// An unreadable subdirectory is routine (a cgroup removed mid-walk); an unreadable root
    /// means no lookup will ever succeed, which deserves one warning.
    fn note_unreadable(&mut self, dir: &Path, root: &Path, e: &std::io::Error) {
        if dir == root && !self.warned_unreadable {
            self.warned_unreadable = true;
            log::warn!("cannot read cgroup2 mount {} ({e}); events will carry no container", root.display());
        } else {
            log::debug!("skipping cgroup {} ({e})", dir.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    const ID: &str = "3f1c2b7e9a0d4c5b8e6f7a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f";

    /// A directory tree under the temp dir, removed when dropped (even when an assertion fails).
    struct TempTree(PathBuf);

    impl TempTree {
        fn new(tag: &str) -> Self {
            static SEQ: AtomicU32 = AtomicU32::new(0);
            let n = SEQ.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("observer-container-{tag}-{}-{n}", std::process::id()));
            fs::create_dir_all(&dir).expect("create temp tree");
            Self(dir)
        }

        fn mkdir(&self, rel: &str) -> (PathBuf, u64) {
            let path = self.0.join(rel.trim_start_matches('/'));
            fs::create_dir_all(&path).expect("create dir in temp tree");
            let ino = fs::metadata(&path).expect("stat dir in temp tree").ino();
            (path, ino)
        }
    }

    impl Drop for TempTree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// An id that is not the inode of any directory in `tree`.
    fn unknown_id(tree: &TempTree) -> u64 {
        let (_, root_ino) = tree.mkdir("");
        u64::MAX - root_ino
    }

    #[test]
    fn resolves_a_temp_tree() {
        let tree = TempTree::new("resolve");
        let container_rel = format!("/system.slice/docker-{ID}.scope");
        let (_, container_ino) = tree.mkdir(&container_rel);
        let (_, sshd_ino) = tree.mkdir("/system.slice/sshd.service");
        let (_, nested_ino) = tree.mkdir(&format!("{container_rel}/system.slice/nginx.service"));
        let (_, root_ino) = tree.mkdir("");
        let mut containers = CgroupResolver::with_root(tree.0.clone());

        let c = containers.resolve(container_ino).expect("the container's cgroup resolves");
        assert_eq!(c.cgroup_path, container_rel);
        assert_eq!(c.id.as_deref(), Some(ID));
        assert_eq!(c.short_id(), &ID[..12]);
        assert_eq!(containers.walks, 1);

        // Everything else was cached by that one walk.
        let sshd = containers.resolve(sshd_ino).expect("a host cgroup resolves");
        assert_eq!(sshd.cgroup_path, "/system.slice/sshd.service");
        assert_eq!(sshd.id, None);
        let nested = containers.resolve(nested_ino).expect("a nested cgroup resolves");
        assert_eq!(nested.cgroup_path, format!("{container_rel}/system.slice/nginx.service"));
        assert_eq!(nested.id.as_deref(), Some(ID));
        let root = containers.resolve(root_ino).expect("the root resolves");
        assert_eq!(root.cgroup_path, "/");
        assert_eq!(root.id, None);
        // A hit returns the cached entry itself.
        assert!(Arc::ptr_eq(&c, &containers.resolve(container_ino).expect("cached")));
        assert_eq!(containers.walks, 1);

        assert_eq!(containers.resolve(0), None);
        assert_eq!(containers.walks, 1, "0 never walks");
    }

    #[test]
    fn unknown_ids_are_none_and_walks_are_rate_limited() {
        let tree = TempTree::new("ratelimit");
        tree.mkdir("/a/b");
        let unknown = unknown_id(&tree);
        let mut containers = CgroupResolver::with_root(tree.0.clone());
        let t0 = Instant::now();

        assert_eq!(containers.resolve_at(unknown, t0), None);
        assert_eq!(containers.walks, 1);
        // The same unknown id again: remembered, no walk, even after the walk interval.
        assert_eq!(containers.resolve_at(unknown, t0 + WALK_INTERVAL * 2), None);
        assert_eq!(containers.walks, 1);

        // A cgroup created after the walk, looked up within the interval: no walk yet.
        let (_, late_ino) = tree.mkdir("/a/late");
        assert_eq!(containers.resolve_at(late_ino, t0 + WALK_INTERVAL / 2), None);
        // A flood of distinct unknown ids within the interval: still no walk.
        for id in 1..1000 {
            assert_eq!(containers.resolve_at(unknown - id, t0 + WALK_INTERVAL / 2), None);
        }
        assert_eq!(containers.walks, 1);
        // After the interval the new cgroup resolves with one more walk.
        let late = containers.resolve_at(late_ino, t0 + WALK_INTERVAL).expect("resolves after the interval");
        assert_eq!(late.cgroup_path, "/a/late");
        assert_eq!(containers.walks, 2);

        // The negative expires: the unknown id is walked for again, once.
        let later = t0 + WALK_INTERVAL + NEGATIVE_TTL;
        assert_eq!(containers.resolve_at(unknown, later), None);
        assert_eq!(containers.walks, 3);
        assert_eq!(containers.resolve_at(unknown, later), None);
        assert_eq!(containers.walks, 3);
    }

    #[test]
    fn a_full_cache_is_rebuilt_by_the_next_walk() {
        let tree = TempTree::new("bound");
        let mut inos = Vec::new();
        for i in 0..8 {
            inos.push(tree.mkdir(&format!("/c{i}")).1);
        }
        let mut containers = CgroupResolver::with_root(tree.0.clone());
        containers.max_entries = 4;
        let t0 = Instant::now();

        // Whichever directory is asked for resolves, even when the cache has no room for it.
        for (i, &ino) in inos.iter().enumerate() {
            let now = t0 + WALK_INTERVAL * (i as u32 + 1);
            let c = containers.resolve_at(ino, now).expect("resolves despite the bound");
            assert_eq!(c.cgroup_path, format!("/c{i}"));
            assert!(containers.cache.len() <= 4, "cache holds {}", containers.cache.len());
        }
        // The negative cache is bounded too.
        let unknown = unknown_id(&tree);
        for id in 0..20u32 {
            let now = t0 + WALK_INTERVAL * (100 + id);
            assert_eq!(containers.resolve_at(unknown - u64::from(id), now), None);
            assert!(containers.negative.len() <= 4, "negative holds {}", containers.negative.len());
        }
    }

    #[test]
    fn no_root_resolves_nothing() {
        let mut containers = CgroupResolver::from_root(None);
        assert_eq!(containers.resolve(1), None);
        assert_eq!(containers.resolve(12345), None);
        let mut missing = CgroupResolver::with_root(std::env::temp_dir().join("observer-container-does-not-exist"));
        assert_eq!(missing.resolve(1), None);
    }
}
