//! CPU: bandwidth-control throttling from `cpu.stat`, and CPU time (`cpuacct.usage` on v1,
//! `cpu.stat usage_usec` on v2) where the `sched_switch` program does not count it.

use std::io;

use agent_common::CgroupCounters;

use super::{CpuThrottling, StatFile, for_each_keyed};
use crate::monitor::cgroup::{CgroupMode, ContainerCgroups};

#[derive(Debug)]
pub struct CpuReader {
    mode: CgroupMode,
    stat: StatFile,
    /// v1 `cpuacct.usage`, when CPU time comes from files (v2 has it in `cpu.stat`).
    usage_v1: Option<StatFile>,
    with_usage: bool,
}

impl CpuReader {
    pub fn open(cgroups: &ContainerCgroups, with_usage: bool) -> io::Result<Self> {
        let dir = cgroups.dir("cpu").ok_or_else(|| io::Error::other("the host has no cpu controller"))?;
        let usage_v1 = match (cgroups.mode, with_usage) {
            (CgroupMode::Hybrid, true) => {
                let dir =
                    cgroups.dir("cpuacct").ok_or_else(|| io::Error::other("the host has no cpuacct controller"))?;
                Some(StatFile::open(dir.join("cpuacct.usage"))?)
            }
            _ => None,
        };
        Ok(CpuReader { mode: cgroups.mode, stat: StatFile::open(dir.join("cpu.stat"))?, usage_v1, with_usage })
    }

    /// Whether [`CpuReader::read_usage`] reads `cpu.stat` too (v2, CPU time from files), so
    /// the throttling counters need no read of their own.
    pub fn usage_brings_throttling(&self) -> bool {
        self.with_usage && self.usage_v1.is_none()
    }

    /// CPU time, when it comes from files (v1 `cpuacct.usage`; on v2 from `cpu.stat`, which
    /// brings the throttling counters along).
    pub fn read_usage(
        &self,
        buf: &mut Vec<u8>,
        throttling: &mut CpuThrottling,
        counters: &mut CgroupCounters,
    ) -> io::Result<()> {
        if !self.with_usage {
            return Ok(());
        }
        match &self.usage_v1 {
            Some(file) => counters.cpu_ns = file.read_u64(buf)?.unwrap_or(0),
            None => self.read(buf, throttling, counters)?,
        }
        Ok(())
    }

    /// The throttling counters (and on v2 the CPU time, when it comes from files).
    pub fn read(
        &self,
        buf: &mut Vec<u8>,
        throttling: &mut CpuThrottling,
        counters: &mut CgroupCounters,
    ) -> io::Result<()> {
        let v1 = self.mode == CgroupMode::Hybrid;
        let mut usage_usec = None;
        for_each_keyed(self.stat.read(buf)?, |key, value| match (v1, key) {
            (_, b"nr_periods") => throttling.periods = value,
            (_, b"nr_throttled") => throttling.throttled_periods = value,
            (true, b"throttled_time") => throttling.throttled_ns = value,
            (false, b"throttled_usec") => throttling.throttled_ns = value.saturating_mul(1000),
            (false, b"usage_usec") => usage_usec = Some(value),
            _ => {}
        });
        if self.with_usage && self.usage_v1.is_none() {
            counters.cpu_ns = usage_usec.unwrap_or(0).saturating_mul(1000);
        }
        Ok(())
    }
}
