//! Finding (or mounting) the cgroup v2 hierarchy, where sock_ops programs attach.

use std::path::{Path, PathBuf};

/// Where this module mounts cgroup v2 when the host has none mounted.
pub const FALLBACK_MOUNT: &str = "/run/sockbus/cgroup2";

/// The cgroup v2 mount point and whether this call mounted it.
#[derive(Debug, Clone)]
pub struct Cgroup2 {
    pub root: PathBuf,
    pub mounted_here: bool,
}

/// The first cgroup2 mount in /proc/self/mountinfo.
pub fn find() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_mountinfo(&text)
}

fn parse_mountinfo(text: &str) -> Option<PathBuf> {
    for line in text.lines() {
        // "36 35 0:30 / /sys/fs/cgroup/unified rw,... shared:9 - cgroup2 cgroup2 rw"
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let mut f = left.split_whitespace();
        let (root, mount) = (f.nth(3)?, f.next()?);
        // Only a mount of the hierarchy's root lets us reach every cgroup.
        if root == "/" {
            return Some(PathBuf::from(unescape(mount)));
        }
    }
    None
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Finds the cgroup v2 hierarchy, or mounts it at [`FALLBACK_MOUNT`].
pub fn find_or_mount() -> std::io::Result<Cgroup2> {
    if let Some(root) = find() {
        return Ok(Cgroup2 {
            root,
            mounted_here: false,
        });
    }
    let dir = Path::new(FALLBACK_MOUNT);
    std::fs::create_dir_all(dir)?;
    mount_cgroup2(dir)?;
    Ok(Cgroup2 {
        root: dir.to_path_buf(),
        mounted_here: true,
    })
}

fn mount_cgroup2(dir: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let target = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("mount point contains a NUL byte"))?;
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            c"none".as_ptr(),
            target.as_ptr(),
            c"cgroup2".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Resolves `--accel-cgroup`: absolute paths are taken as they are, relative
/// ones below the cgroup v2 root; none means the root itself.
pub fn resolve(root: &Path, wanted: Option<&Path>) -> PathBuf {
    match wanted {
        None => root.to_path_buf(),
        Some(p) if p.is_absolute() => p.to_path_buf(),
        Some(p) => root.join(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_root_mount_in_mountinfo() {
        let text = "\
25 30 0:23 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid shared:5 - cgroup2 cgroup2 rw
27 25 0:25 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu";
        assert_eq!(
            parse_mountinfo(text),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            parse_mountinfo("27 25 0:25 / /x rw - cgroup cgroup rw,cpu"),
            None
        );
        let nested = "26 25 0:24 /kubepods /sys/fs/cgroup rw - cgroup2 cgroup2 rw";
        assert_eq!(
            parse_mountinfo(nested),
            None,
            "a sub-tree mount is not the root"
        );
        assert_eq!(
            parse_mountinfo("1 2 0:3 / /a\\040b rw - cgroup2 none rw"),
            Some(PathBuf::from("/a b"))
        );
    }

    #[test]
    fn relative_cgroups_live_below_the_root() {
        let root = Path::new("/sys/fs/cgroup");
        assert_eq!(resolve(root, None), root);
        assert_eq!(resolve(root, Some(Path::new("pods"))), root.join("pods"));
        assert_eq!(resolve(root, Some(Path::new("/x/y"))), Path::new("/x/y"));
    }
}
