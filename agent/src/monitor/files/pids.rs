//! Processes: the number of tasks in the container's cgroup (`pids.current`).

use std::io;

use super::StatFile;
use crate::monitor::cgroup::ContainerCgroups;

#[derive(Debug)]
pub struct PidsReader {
    current: StatFile,
}

impl PidsReader {
    pub fn open(cgroups: &ContainerCgroups) -> io::Result<Self> {
        let dir = cgroups.dir("pids").ok_or_else(|| io::Error::other("the host has no pids controller"))?;
        Ok(PidsReader { current: StatFile::open(dir.join("pids.current"))? })
    }

    pub fn read(&self, buf: &mut Vec<u8>) -> io::Result<Option<u64>> {
        self.current.read_u64(buf)
    }
}
