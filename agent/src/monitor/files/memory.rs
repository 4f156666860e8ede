//! Memory: usage, working set, page cache, RSS, swap, shared memory, limit and peak, from
//! `memory.usage_in_bytes`/`memory.stat` (v1) or `memory.current`/`memory.stat` (v2).

use std::io;

use super::{MemoryStats, StatFile, for_each_keyed};
use crate::monitor::cgroup::{CgroupMode, ContainerCgroups};

/// v1 reports "unlimited" as the largest page-aligned `i64`; anything this large is no limit.
const UNLIMITED_FROM: u64 = 1 << 62;

#[derive(Debug)]
pub struct MemoryReader {
    mode: CgroupMode,
    usage: StatFile,
    stat: StatFile,
    limit: StatFile,
    /// v1 `memory.max_usage_in_bytes`, v2 `memory.peak` (5.19+).
    peak: Option<StatFile>,
    /// v2 `memory.swap.current` (v1 has swap in `memory.stat`).
    swap: Option<StatFile>,
}

impl MemoryReader {
    pub fn open(cgroups: &ContainerCgroups) -> io::Result<Self> {
        let dir = cgroups.dir("memory").ok_or_else(|| io::Error::other("the host has no memory controller"))?;
        let open = |name: &str| StatFile::open(dir.join(name));
        Ok(match cgroups.mode {
            CgroupMode::Hybrid => MemoryReader {
                mode: cgroups.mode,
                usage: open("memory.usage_in_bytes")?,
                stat: open("memory.stat")?,
                limit: open("memory.limit_in_bytes")?,
                peak: StatFile::open_in(Some(dir), "memory.max_usage_in_bytes"),
                swap: None,
            },
            CgroupMode::Unified => MemoryReader {
                mode: cgroups.mode,
                usage: open("memory.current")?,
                stat: open("memory.stat")?,
                limit: open("memory.max")?,
                peak: StatFile::open_in(Some(dir), "memory.peak"),
                swap: StatFile::open_in(Some(dir), "memory.swap.current"),
            },
        })
    }

    /// Everything charged to the cgroup (one small file).
    pub fn read_usage(&self, buf: &mut Vec<u8>) -> io::Result<u64> {
        Ok(self.usage.read_u64(buf)?.unwrap_or(0))
    }

    /// The breakdown of `usage` (`memory.stat`, the expensive file): working set, cache,
    /// RSS, shared memory, mapped files, and swap.
    pub fn read_breakdown(&self, buf: &mut Vec<u8>, usage: u64, stats: &mut MemoryStats) -> io::Result<()> {
        let mut breakdown =
            MemoryStats { usage, limit: stats.limit, max_usage: stats.max_usage, ..MemoryStats::default() };
        let mut inactive_file = 0;
        let v1 = self.mode == CgroupMode::Hybrid;
        for_each_keyed(self.stat.read(buf)?, |key, value| {
            // v1's total_* include descendant cgroups, as v2's counters always do.
            let field = match (v1, key) {
                (true, b"total_cache") | (false, b"file") => &mut breakdown.cache,
                (true, b"total_rss") | (false, b"anon") => &mut breakdown.rss,
                (true, b"total_shmem") | (false, b"shmem") => &mut breakdown.shmem,
                (true, b"total_mapped_file") | (false, b"file_mapped") => &mut breakdown.mapped_file,
                (true, b"total_swap") => &mut breakdown.swap,
                (true, b"total_inactive_file") | (false, b"inactive_file") => &mut inactive_file,
                _ => return,
            };
            *field = value;
        });
        breakdown.working_set = usage.saturating_sub(inactive_file);
        if let Some(swap) = &self.swap {
            breakdown.swap = swap.read_u64(buf)?.unwrap_or(0);
        }
        *stats = breakdown;
        Ok(())
    }

    /// The limit, which changes only when someone updates the container.
    pub fn read_limit(&self, buf: &mut Vec<u8>, stats: &mut MemoryStats) -> io::Result<()> {
        stats.limit = self.limit.read_u64(buf)?.filter(|&limit| limit < UNLIMITED_FROM);
        Ok(())
    }

    /// The highest usage recorded, where the kernel records it.
    pub fn read_peak(&self, buf: &mut Vec<u8>, stats: &mut MemoryStats) -> io::Result<()> {
        if let Some(peak) = &self.peak {
            stats.max_usage = peak.read_u64(buf)?;
        }
        Ok(())
    }
}
