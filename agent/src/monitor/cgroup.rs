//! Where a process's cgroup lives: the unified (v2) hierarchy on hybrid and pure v2
//! hosts, the cgroup v2 id that eBPF programs key on, and the directories of each
//! controller whose files the readers sample (v1 controllers on hybrid hosts).

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use agent_common::CgroupId;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no cgroup2 filesystem is mounted (looked in /proc/self/mountinfo); eBPF accounting needs the unified hierarchy"
    )]
    NoUnifiedHierarchy,
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("process {pid} has no cgroup v2 entry (\"0::…\") in /proc/{pid}/cgroup")]
    NoUnifiedEntry { pid: u32 },
}

/// How the host mounts cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupMode {
    /// v1 controllers plus a v2 hierarchy without controllers (e.g. `/sys/fs/cgroup/unified`).
    Hybrid,
    /// Only cgroup v2, at `/sys/fs/cgroup`.
    Unified,
}

/// The host's cgroup layout, detected once.
#[derive(Debug, Clone)]
pub struct CgroupLayout {
    pub mode: CgroupMode,
    /// Mount point of the cgroup2 filesystem.
    pub unified_root: PathBuf,
    /// Mount point of each v1 controller (`memory` → `/sys/fs/cgroup/memory`); empty on pure v2.
    pub v1_mounts: HashMap<String, PathBuf>,
}

/// The v1 controllers whose files the readers use.
pub const V1_CONTROLLERS: [&str; 5] = ["memory", "cpu", "cpuacct", "blkio", "pids"];

/// A container's cgroup directories, one per controller the readers use. On pure v2
/// hosts every controller's files are in the one unified directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerCgroups {
    pub mode: CgroupMode,
    pub unified: UnifiedCgroup,
    /// v1 controller → the container's directory in that hierarchy (hybrid hosts only).
    pub v1: HashMap<&'static str, PathBuf>,
}

impl ContainerCgroups {
    /// The directory holding `controller`'s files, if the host has that controller.
    pub fn dir(&self, controller: &str) -> Option<&Path> {
        match self.mode {
            CgroupMode::Unified => Some(&self.unified.path),
            CgroupMode::Hybrid => self.v1.get(controller).map(PathBuf::as_path),
        }
    }
}

/// A container's cgroup in the unified hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnifiedCgroup {
    pub id: CgroupId,
    pub path: PathBuf,
}

impl CgroupLayout {
    pub fn detect() -> Result<Self, CgroupError> {
        let path = Path::new("/proc/self/mountinfo");
        let mountinfo =
            std::fs::read_to_string(path).map_err(|source| CgroupError::Read { path: path.into(), source })?;
        Self::from_mountinfo(&mountinfo).ok_or(CgroupError::NoUnifiedHierarchy)
    }

    /// Picks the cgroup2 mount; a host with any v1 controller mounted too is hybrid.
    pub fn from_mountinfo(mountinfo: &str) -> Option<Self> {
        let mut unified_root = None;
        let mut v1_mounts = HashMap::new();
        for line in mountinfo.lines() {
            // Fields: id parent major:minor root mountpoint options [optional...] - fstype source superopts
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let Some(mount_point) = left.split_whitespace().nth(4) else {
                continue;
            };
            let mut fields = right.split_whitespace();
            match fields.next() {
                Some("cgroup2") if unified_root.is_none() => unified_root = Some(unescape_mount_path(mount_point)),
                Some("cgroup") => {
                    // Super options name the controllers: "rw,cpu,cpuacct".
                    let options = fields.nth(1).unwrap_or_default();
                    for controller in options.split(',').filter(|o| V1_CONTROLLERS.contains(o)) {
                        v1_mounts.entry(controller.to_owned()).or_insert_with(|| unescape_mount_path(mount_point));
                    }
                    v1_mounts.entry(String::new()).or_insert_with(PathBuf::new);
                }
                _ => {}
            }
        }
        let unified_root = unified_root?;
        // The empty key only marks that some v1 hierarchy is mounted.
        let mode = if v1_mounts.remove("").is_some() { CgroupMode::Hybrid } else { CgroupMode::Unified };
        Some(Self { mode, unified_root, v1_mounts })
    }

    /// The unified-hierarchy cgroup of a running process, e.g. a container's init.
    pub fn cgroup_of_pid(&self, pid: u32) -> Result<UnifiedCgroup, CgroupError> {
        let proc_path = PathBuf::from(format!("/proc/{pid}/cgroup"));
        let text = std::fs::read_to_string(&proc_path)
            .map_err(|source| CgroupError::Read { path: proc_path.clone(), source })?;
        let relative = unified_entry(&text).ok_or(CgroupError::NoUnifiedEntry { pid })?;
        self.cgroup_at(relative)
    }

    /// Every cgroup directory of a running process that the readers use.
    pub fn container_cgroups(&self, pid: u32) -> Result<ContainerCgroups, CgroupError> {
        let proc_path = PathBuf::from(format!("/proc/{pid}/cgroup"));
        let text = std::fs::read_to_string(&proc_path)
            .map_err(|source| CgroupError::Read { path: proc_path.clone(), source })?;
        let relative = unified_entry(&text).ok_or(CgroupError::NoUnifiedEntry { pid })?;
        let unified = self.cgroup_at(relative)?;
        let mut v1 = HashMap::new();
        if self.mode == CgroupMode::Hybrid {
            for controller in V1_CONTROLLERS {
                if let (Some(mount), Some(path)) = (self.v1_mounts.get(controller), v1_entry(&text, controller)) {
                    v1.insert(controller, mount.join(path.trim_start_matches('/')));
                }
            }
        }
        Ok(ContainerCgroups { mode: self.mode, unified, v1 })
    }

    /// The cgroup at a path relative to the unified root (`/docker/<id>`).
    pub fn cgroup_at(&self, relative: &str) -> Result<UnifiedCgroup, CgroupError> {
        let path = self.unified_root.join(relative.trim_start_matches('/'));
        let metadata = std::fs::metadata(&path).map_err(|source| CgroupError::Read { path: path.clone(), source })?;
        Ok(UnifiedCgroup { id: metadata.ino(), path })
    }
}

/// Mount points of every cgroup hierarchy (v1 and v2) in a mountinfo text: where a runtime
/// makes a container's cgroup directories.
pub fn hierarchy_mounts(mountinfo: &str) -> Vec<PathBuf> {
    let mut mounts: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            matches!(right.split_whitespace().next(), Some("cgroup" | "cgroup2"))
                .then(|| unescape_mount_path(mount_point))
        })
        .collect();
    mounts.sort();
    mounts.dedup();
    mounts
}

/// The path of the `0::` line of a `/proc/<pid>/cgroup` file.
pub fn unified_entry(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup.lines().find_map(|line| line.strip_prefix("0::"))
}

/// The path of a v1 controller's line (`4:cpu,cpuacct:/docker/…`) of a `/proc/<pid>/cgroup` file.
pub fn v1_entry<'a>(proc_cgroup: &'a str, controller: &str) -> Option<&'a str> {
    proc_cgroup.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        controllers.split(',').any(|c| c == controller).then_some(path)
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
pub fn unescape_mount_path(raw: &str) -> PathBuf {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let digits: String = chars.clone().take(3).collect();
            if digits.len() == 3
                && let Ok(code) = u8::from_str_radix(&digits, 8)
            {
                out.push(char::from(code));
                for _ in 0..3 {
                    chars.next();
                }
                continue;
            }
        }
        out.push(c);
    }
    PathBuf::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
24 30 0:22 / /sys rw,nosuid shared:7 - sysfs sysfs rw
31 24 0:26 / /sys/fs/cgroup ro shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:27 / /sys/fs/cgroup/unified rw shared:10 - cgroup2 cgroup2 rw,nsdelegate
35 31 0:30 / /sys/fs/cgroup/cpu,cpuacct rw shared:14 - cgroup cgroup rw,cpu,cpuacct
";
    const PURE_V2: &str = "\
24 30 0:22 / /sys rw,nosuid shared:7 - sysfs sysfs rw
31 24 0:26 / /sys/fs/cgroup rw shared:9 - cgroup2 cgroup2 rw,nsdelegate
";

    #[test]
    fn detects_hybrid_hosts() {
        let layout = CgroupLayout::from_mountinfo(HYBRID).expect("cgroup2 present");
        assert_eq!(layout.mode, CgroupMode::Hybrid);
        assert_eq!(layout.unified_root, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(layout.v1_mounts.get("cpuacct"), Some(&PathBuf::from("/sys/fs/cgroup/cpu,cpuacct")));
        assert_eq!(layout.v1_mounts.get("cpu"), Some(&PathBuf::from("/sys/fs/cgroup/cpu,cpuacct")));
        assert_eq!(layout.v1_mounts.get("memory"), None);
    }

    #[test]
    fn detects_pure_v2_hosts() {
        let layout = CgroupLayout::from_mountinfo(PURE_V2).expect("cgroup2 present");
        assert_eq!(layout.mode, CgroupMode::Unified);
        assert_eq!(layout.unified_root, PathBuf::from("/sys/fs/cgroup"));
        assert!(layout.v1_mounts.is_empty());
    }

    #[test]
    fn no_cgroup2_is_none() {
        assert!(CgroupLayout::from_mountinfo("24 30 0:22 / /sys rw - sysfs sysfs rw\n").is_none());
    }

    #[test]
    fn reads_entries_of_proc_cgroup() {
        let text = "12:pids:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n0::/docker/abc\n";
        assert_eq!(unified_entry(text), Some("/docker/abc"));
        assert_eq!(v1_entry(text, "cpuacct"), Some("/docker/abc"));
        assert_eq!(v1_entry(text, "memory"), None);
    }

    #[test]
    fn unescapes_mount_points() {
        assert_eq!(unescape_mount_path("/mnt/with\\040space"), PathBuf::from("/mnt/with space"));
    }

    #[test]
    fn own_cgroup_resolves_on_this_host() {
        // The agent supports only hosts with cgroup2 mounted (hybrid or pure v2).
        let layout = CgroupLayout::detect().expect("this host mounts cgroup2");
        let cgroup = layout.cgroup_of_pid(std::process::id()).expect("own cgroup resolves");
        assert!(cgroup.id > 0);
        assert!(cgroup.path.starts_with(&layout.unified_root));
        let all = layout.container_cgroups(std::process::id()).expect("own cgroups resolve");
        assert_eq!(all.unified, cgroup);
        for controller in V1_CONTROLLERS {
            let dir = all.dir(controller).unwrap_or_else(|| panic!("this host has the {controller} controller"));
            assert!(dir.is_dir(), "{}", dir.display());
        }
    }
}
