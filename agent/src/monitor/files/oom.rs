//! OOM kills where the `mark_victim` program does not count them: `oom_kill` of
//! `memory.oom_control` (v1) or `memory.events` (v2).

use std::io;

use super::{StatFile, for_each_keyed};
use crate::monitor::cgroup::{CgroupMode, ContainerCgroups};

#[derive(Debug)]
pub struct OomReader {
    file: StatFile,
}

impl OomReader {
    pub fn open(cgroups: &ContainerCgroups) -> io::Result<Self> {
        let dir = cgroups.dir("memory").ok_or_else(|| io::Error::other("the host has no memory controller"))?;
        let name = match cgroups.mode {
            CgroupMode::Hybrid => "memory.oom_control",
            CgroupMode::Unified => "memory.events",
        };
        Ok(OomReader { file: StatFile::open(dir.join(name))? })
    }

    pub fn read(&self, buf: &mut Vec<u8>) -> io::Result<u64> {
        let mut kills = 0;
        for_each_keyed(self.file.read(buf)?, |key, value| {
            if key == b"oom_kill" {
                kills = value;
            }
        });
        Ok(kills)
    }
}
