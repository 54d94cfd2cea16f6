//! Where the cgroup2 file system is mounted, from a `mountinfo` text.

use std::path::{Path, PathBuf};

/// The mount point of the cgroup2 file system in a `/proc/<pid>/mountinfo` text. When there are
/// several, the conventional places win (`/sys/fs/cgroup`, then the hybrid layout's
/// `/sys/fs/cgroup/unified`), then the first listed.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    let mounts: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| {
            // `<id> <parent> <maj:min> <root> <mount point> <options> [optional...] - <fstype> ...`:
            // the optional fields vary in number, so the file-system type is found after `-`.
            let mut fields = line.split(' ');
            let mount_point = fields.nth(4)?;
            let mut rest = fields.skip_while(|f| *f != "-");
            rest.next()?;
            (rest.next()? == "cgroup2").then(|| PathBuf::from(unescape_mountinfo(mount_point)))
        })
        .collect();
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .iter()
        .find_map(|want| mounts.iter().find(|m| m.as_path() == Path::new(want)))
        .or_else(|| mounts.first())
        .cloned()
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011` tab, `\012` newline, `\134`
/// backslash), which the kernel applies to paths so that fields stay space-separated.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        // Byte-wise, not `str` slicing: the path is whatever someone mounted, and slicing a
        // non-ASCII name at a fixed offset could split a character.
        // Three octal digits can exceed a byte (`\777`); such text is kept as it is.
        if let Some(&[b'\\', a, b, c]) = bytes.get(i..i + 4)
            && [a, b, c].iter().all(|d| (b'0'..=b'7').contains(d))
            && let Ok(byte) = u8::try_from(u32::from(a - b'0') * 64 + u32::from(b - b'0') * 8 + u32::from(c - b'0'))
        {
            out.push(byte);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_in_mountinfo() {
        let unified = "\
25 1 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 25 0:27 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:28 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
33 31 0:29 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
";
        assert_eq!(cgroup2_mount(unified), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let pure = "\
35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";
        assert_eq!(cgroup2_mount(pure), Some(PathBuf::from("/sys/fs/cgroup")));
        // No optional fields, an escaped space, and the conventional place listed second.
        let odd = "\
40 1 0:40 / /mnt/my\\040cgroups rw - cgroup2 none rw
41 1 0:41 / /sys/fs/cgroup rw - cgroup2 none rw
";
        assert_eq!(cgroup2_mount(odd), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(
            cgroup2_mount("40 1 0:40 / /mnt/my\\040cgroups rw - cgroup2 none rw\n"),
            Some(PathBuf::from("/mnt/my cgroups"))
        );
        // Non-ASCII names and escapes next to them; `\777` is no byte and stays as written.
        assert_eq!(
            cgroup2_mount("40 1 0:40 / /mnt/ü\\134x\\777 rw - cgroup2 none rw\n"),
            Some(PathBuf::from("/mnt/ü\\x\\777"))
        );
        // v1 only, and garbage.
        assert_eq!(cgroup2_mount("33 31 0:29 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"), None);
        assert_eq!(cgroup2_mount("not mountinfo\n\n- cgroup2\n"), None);
    }
}
