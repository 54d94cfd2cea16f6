//! Which cgroup, and which container, an event came from.
//!
//! The kernel programs can only afford `bpf_get_current_cgroup_id()`: a `u64` that is the kernfs
//! inode number of the task's cgroup v2 directory. Operators think in containers, so this module
//! turns that number back into the cgroup's path and the path into a container id, in three
//! steps, one file each:
//! - [`mountinfo`]: where the cgroup2 file system is mounted (`/proc/self/mountinfo`);
//! - [`cgroup`]: cgroup id → cgroup path ([`CgroupResolver`]: by file handle, else by a
//!   rate-limited walk of the tree, with one cache that the event path and the connection gauges
//!   share through [`SharedResolver`]);
//! - [`id`]: cgroup path → container id, by the naming conventions of the container runtimes.

pub mod cgroup;
pub mod id;
pub mod mountinfo;

use std::sync::{Arc, Mutex};

pub use self::{cgroup::CgroupResolver, id::container_id, mountinfo::cgroup2_mount};

/// Length of the abbreviated id that `docker ps`, `crictl ps` and `podman ps` show.
const SHORT_ID_LEN: usize = 12;

/// A cgroup, as seen by the observer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    /// Path of the cgroup relative to the cgroup2 mount, starting with `/` (`/` is the root).
    pub cgroup_path: String,
    /// The full container id, usually 64 hex digits; `None` for cgroups that hold no container
    /// (host services, user sessions, the root).
    pub id: Option<String>,
}

impl Container {
    pub fn new(cgroup_path: String) -> Self {
        let id = container_id(&cgroup_path);
        Self { cgroup_path, id }
    }

    /// The first 12 characters of the id, as container tools display it; `""` when there is no id.
    pub fn short_id(&self) -> &str {
        match &self.id {
            // `get` rather than slicing: ids are ASCII hex by construction, but a char boundary
            // panic is not a price worth paying for that assumption.
            Some(id) => id.get(..SHORT_ID_LEN).unwrap_or(id),
            None => "",
        }
    }
}

/// The one resolver of a daemon: the event path and the connection-state scan both resolve
/// through it, so a cgroup is looked up (and cached) once.
pub type SharedResolver = Arc<Mutex<CgroupResolver>>;

/// A [`SharedResolver`] against this host's cgroup2 mount.
pub fn shared_resolver() -> SharedResolver {
    Arc::new(Mutex::new(CgroupResolver::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f1c2b7e9a0d4c5b8e6f7a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f";

    #[test]
    fn short_id_is_the_first_twelve_characters() {
        let c = Container::new(format!("/docker/{ID}"));
        assert_eq!(c.short_id(), &ID[..12]);
        assert_eq!(Container::new("/init.scope".to_owned()).short_id(), "");
        let odd = Container { cgroup_path: "/x".to_owned(), id: Some("abc".to_owned()) };
        assert_eq!(odd.short_id(), "abc");
    }
}
