//! eBPF state that outlives the agent process: the counter maps and the programs' links
//! pinned in bpffs under `{monitor.bpffs-dir}/{agent_id}/`, so that the programs keep
//! counting while the agent is down (a restart, an upgrade, `kill -9`) and a new agent
//! resumes their counts instead of starting from zero.
//!
//! ```text
//! {dir}/maps-{layout}/COUNTER_LINES …  the counters (layout: the maps' shape and the CPU
//!                                      count; a new shape starts afresh: the old maps and
//!                                      every pinned link are removed)
//! {dir}/links/cgroup_cputime …         a global program's link
//! {dir}/links/skb-{cgroup_id}-ingress  a container cgroup's packet counters
//! ```
//!
//! A pinned link is adopted when it runs the same program code (the kernel's program tag) as
//! the agent just loaded; otherwise it is removed (which detaches it) and the new program is
//! attached in its place. Removing `{dir}` stops everything.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

use agent_common::{CounterLine, LAYOUT_VERSION, MAX_OVERFLOW_CGROUPS, SLOTS};
use aya_obj::generated::{bpf_link_info, bpf_prog_info};

/// `statfs.f_type` of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0} is not on a bpf filesystem and none could be mounted at {1}: {2}")]
    NoBpfFs(PathBuf, PathBuf, io::Error),
}

fn io_at(path: &Path) -> impl Fn(io::Error) -> PinError + '_ {
    move |source| PinError::Io { path: path.to_path_buf(), source }
}

/// One agent's pin directory.
#[derive(Debug, Clone)]
pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    /// `{base}/{agent_id}`, on a bpf filesystem (mounted at `base`'s bpffs mount point, by
    /// default `/sys/fs/bpf`, when none is there yet).
    pub fn prepare(base: &Path, agent_id: &str) -> Result<PinDir, PinError> {
        ensure_bpffs(base)?;
        let root = base.join(agent_id);
        std::fs::create_dir_all(root.join("links")).map_err(io_at(&root))?;
        Ok(PinDir { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of the counter maps of this agent's layout; maps of another layout
    /// (another build's shapes) are removed, with a log line.
    pub fn maps(&self, cpus: usize) -> Result<PathBuf, PinError> {
        let name = format!(
            "maps-v{LAYOUT_VERSION}-{SLOTS}-{MAX_OVERFLOW_CGROUPS}-{}-{cpus}",
            std::mem::size_of::<CounterLine>()
        );
        let entries = std::fs::read_dir(&self.root).map_err(io_at(&self.root))?;
        for entry in entries.flatten() {
            let other = entry.file_name().to_string_lossy().into_owned();
            if other.starts_with("maps-") && other != name {
                tracing::warn!(dir = %entry.path().display(), "pinned counters of another map layout; starting afresh");
                let _ = std::fs::remove_dir_all(entry.path());
                // Its programs count into those maps (a program's tag does not cover which
                // maps it uses), so none of its links may be adopted: removing them detaches.
                self.remove_links();
            }
        }
        let dir = self.root.join(name);
        std::fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        Ok(dir)
    }

    /// Removes every pinned link, which detaches them.
    fn remove_links(&self) {
        let links = self.root.join("links");
        for entry in std::fs::read_dir(&links).into_iter().flatten().flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
    }

    /// Removes the pinned links of global programs that are not in `known` (programs of an
    /// older build, e.g. a CPU program since replaced), which detaches them.
    pub fn remove_unknown_global_links(&self, known: &[&str]) {
        let links = self.root.join("links");
        for entry in std::fs::read_dir(&links).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with("skb-") && !known.contains(&name.as_str()) {
                tracing::info!(link = %entry.path().display(), "a pinned program this build no longer has; removing it");
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Where a global program's link is pinned.
    pub fn link(&self, program: &str) -> PathBuf {
        self.root.join("links").join(program)
    }

    /// Where a cgroup's packet-counter link of one direction is pinned.
    pub fn skb_link(&self, cgroup_id: u64, direction: &str) -> PathBuf {
        self.root.join("links").join(format!("skb-{cgroup_id}-{direction}"))
    }

    /// Cgroup ids with packet-counter links pinned.
    pub fn skb_cgroups(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = std::fs::read_dir(self.root.join("links"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                name.strip_prefix("skb-")?.split('-').next()?.parse().ok()
            })
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Removes everything pinned: the programs stop and the counters go.
    pub fn release(&self) -> io::Result<()> {
        std::fs::remove_dir_all(&self.root)
    }
}

/// Mounts bpffs at the mount point `path` lives under (`/sys/fs/bpf`, else `path` itself)
/// unless one is there, and makes `path`.
fn ensure_bpffs(path: &Path) -> Result<(), PinError> {
    let mount_point = if path.starts_with("/sys/fs/bpf") { PathBuf::from("/sys/fs/bpf") } else { path.to_path_buf() };
    if !is_bpffs(&mount_point) {
        std::fs::create_dir_all(&mount_point).map_err(io_at(&mount_point))?;
        let c_target = CString::new(mount_point.as_os_str().as_bytes())
            .map_err(|e| PinError::Io { path: mount_point.clone(), source: io::Error::other(e) })?;
        // SAFETY: valid C strings; mounting bpffs needs CAP_SYS_ADMIN, which the agent has.
        let rc = unsafe {
            libc::mount(c"bpf".as_ptr(), c_target.as_ptr(), c"bpf".as_ptr(), 0, c"mode=0700".as_ptr().cast())
        };
        if rc != 0 {
            return Err(PinError::NoBpfFs(path.to_path_buf(), mount_point, io::Error::last_os_error()));
        }
        tracing::info!(mount_point = %mount_point.display(), "mounted a bpf filesystem for the agent's pinned counters");
    }
    std::fs::create_dir_all(path).map_err(io_at(path))
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else { return false };
    // SAFETY: statfs is plain data, filled by the call.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a valid out-pointer.
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    let on_bpffs = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } == 0 && stat.f_type as i64 == BPF_FS_MAGIC;
    on_bpffs
}

/// `bpf(cmd, attr)` with an attribute struct of the caller's.
fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a valid, initialised struct whose size is passed; the kernel reads and
    // writes at most that many bytes of it.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), std::mem::size_of::<T>()) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

/// A new descriptor of what is pinned at `path` (`BPF_OBJ_GET`).
pub fn open_pinned(path: &Path) -> io::Result<OwnedFd> {
    const BPF_OBJ_GET: libc::c_long = 7;
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = ObjGetAttr { pathname: c_path.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    let fd = sys_bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new descriptor that this function now owns.
    Ok(unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).map_err(io::Error::other)?) })
}

/// A kernel info struct of `BPF_OBJ_GET_INFO_BY_FD`: plain integers, zero its initial state.
pub trait ObjectInfo: Sized {}
impl ObjectInfo for bpf_prog_info {}
impl ObjectInfo for bpf_link_info {}

/// The kernel's description of a bpf object (`BPF_OBJ_GET_INFO_BY_FD`): a program's
/// `bpf_prog_info` or a link's `bpf_link_info`.
pub fn object_info<T: ObjectInfo>(fd: BorrowedFd<'_>) -> io::Result<T> {
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    #[repr(C)]
    struct InfoByFdAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    // SAFETY: ObjectInfo types are plain integers (and unions of them); all-zero is valid.
    let mut info: T = unsafe { std::mem::zeroed() };
    let mut attr = InfoByFdAttr {
        bpf_fd: u32::try_from(fd.as_raw_fd()).map_err(io::Error::other)?,
        info_len: u32::try_from(std::mem::size_of::<T>()).map_err(io::Error::other)?,
        info: std::ptr::from_mut(&mut info) as u64,
    };
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

/// A descriptor of the program with kernel id `id` (`BPF_PROG_GET_FD_BY_ID`).
fn program_by_id(id: u32) -> io::Result<OwnedFd> {
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    #[repr(C)]
    struct GetByIdAttr {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let mut attr = GetByIdAttr { id, next_id: 0, open_flags: 0 };
    let fd = sys_bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)?;
    // SAFETY: the kernel returned a new descriptor that this function now owns.
    Ok(unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).map_err(io::Error::other)?) })
}

/// A program's tag: the kernel's hash of its instructions, equal for equal code.
pub fn program_tag(program: BorrowedFd<'_>) -> io::Result<[u8; 8]> {
    Ok(object_info::<bpf_prog_info>(program)?.tag)
}

/// The program the link pinned at `path` runs.
fn pinned_link_program(path: &Path) -> io::Result<OwnedFd> {
    let link = open_pinned(path)?;
    let info: bpf_link_info = object_info(std::os::fd::AsFd::as_fd(&link))?;
    program_by_id(info.prog_id)
}

/// The program of the link pinned at `path` when it runs the same code as `program`;
/// `None` when nothing is pinned there or it runs other code (the pin is left alone).
pub fn same_code_link(path: &Path, program: BorrowedFd<'_>) -> Option<OwnedFd> {
    let running = pinned_link_program(path).ok()?;
    let same = program_tag(std::os::fd::AsFd::as_fd(&running)).ok()? == program_tag(program).ok()?;
    same.then_some(running)
}

/// Adopts the link pinned at `path` when it runs the same code as `program` (it keeps
/// running, counting into the same pinned maps) and returns the program it runs; a pinned
/// link of other code is removed, which detaches it. `None`: attach anew.
pub fn adopt_link(path: &Path, program: BorrowedFd<'_>) -> Option<OwnedFd> {
    if !path.exists() {
        return None;
    }
    if let Some(running) = same_code_link(path, program) {
        return Some(running);
    }
    tracing::info!(link = %path.display(), "a pinned program of another build (or an unreadable pin); replacing it");
    let _ = std::fs::remove_file(path);
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_the_layout() {
        let pins = PinDir { root: PathBuf::from("/sys/fs/bpf/bai-agent/i-x") };
        assert_eq!(pins.link("cgroup_cputime"), PathBuf::from("/sys/fs/bpf/bai-agent/i-x/links/cgroup_cputime"));
        assert_eq!(pins.skb_link(42, "ingress"), PathBuf::from("/sys/fs/bpf/bai-agent/i-x/links/skb-42-ingress"));
    }

    #[test]
    fn a_directory_off_bpffs_is_no_bpffs() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(!is_bpffs(dir.path()));
    }
}
