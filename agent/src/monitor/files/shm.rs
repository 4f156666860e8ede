//! Shared memory: bytes used in the container's own `/dev/shm` tmpfs, through a handle on
//! it opened once (`/proc/<pid>/root/dev/shm`, so no path is walked per sample).

use std::{ffi::CString, io, os::fd::AsRawFd};

/// `statfs.f_type` of tmpfs.
const TMPFS_MAGIC: i64 = 0x0102_1994;

#[derive(Debug)]
pub struct ShmReader {
    dir: std::fs::File,
}

impl ShmReader {
    pub fn open(pid: u32) -> io::Result<Self> {
        let path = format!("/proc/{pid}/root/dev/shm");
        let c_path = CString::new(path.clone()).map_err(io::Error::other)?;
        // SAFETY: a valid C string; O_PATH opens a handle without reading the directory.
        let fd = unsafe { libc::open(c_path.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
        if fd < 0 {
            let err = io::Error::last_os_error();
            return Err(io::Error::new(err.kind(), format!("{path}: {err}")));
        }
        // SAFETY: fd is a fresh descriptor this function owns.
        let dir = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let reader = ShmReader { dir };
        let stat = reader.statfs()?;
        #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
        if stat.f_type as i64 != TMPFS_MAGIC {
            return Err(io::Error::other(format!(
                "{path} is not a tmpfs of its own (the container shares the host's IPC?)"
            )));
        }
        Ok(reader)
    }

    fn statfs(&self) -> io::Result<libc::statfs> {
        // SAFETY: statfs is plain data; fstatfs fills it for a valid descriptor.
        let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above; the descriptor lives as long as self.
        if unsafe { libc::fstatfs(self.dir.as_raw_fd(), &mut stat) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stat)
    }

    /// Bytes in use.
    pub fn read(&self) -> io::Result<u64> {
        let stat = self.statfs()?;
        let used_blocks = stat.f_blocks.saturating_sub(stat.f_bfree);
        #[allow(clippy::unnecessary_cast)] // f_frsize's type differs between targets
        Ok(used_blocks.saturating_mul(stat.f_frsize as u64))
    }
}
