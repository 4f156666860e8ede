//! CPU: bandwidth-control throttling from `cpu.stat`; the kernel's own user/system split of
//! a cgroup's CPU time (`cpuacct.stat` on v1, `cpu.stat` on v2), which the agent applies to its
//! exact total; and the CPU time itself (`cpuacct.usage` on v1, `cpu.stat usage_usec` on v2)
//! where the eBPF program does not count it, and once per cgroup for the baseline of what
//! ran before it did.

use std::io;

use super::{CpuThrottling, StatFile, for_each_keyed};
use crate::monitor::cgroup::{CgroupMode, ContainerCgroups};

/// A cgroup's CPU time as its files account it: the total, and the kernel's split of it into
/// user and system time (tick-sampled, scaled to the total).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTimes {
    pub total_ns: u64,
    pub user_ns: u64,
    pub system_ns: u64,
}

/// Nanoseconds per `USER_HZ` tick, the unit of `cpuacct.stat`.
fn user_hz_ns() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    1_000_000_000 / u64::try_from(hz).ok().filter(|&hz| hz > 0).unwrap_or(100)
}

/// v1 `cpuacct.stat`: user and system time in `USER_HZ` ticks.
fn read_cpuacct_stat(file: &StatFile, buf: &mut Vec<u8>, times: &mut CpuTimes) -> io::Result<()> {
    let tick = user_hz_ns();
    for_each_keyed(file.read(buf)?, |key, value| match key {
        b"user" => times.user_ns = value.saturating_mul(tick),
        b"system" => times.system_ns = value.saturating_mul(tick),
        _ => {}
    });
    Ok(())
}

/// v2 `cpu.stat`'s CPU time fields (microseconds).
fn v2_times(key: &[u8], value: u64, times: &mut CpuTimes) {
    let ns = value.saturating_mul(1000);
    match key {
        b"usage_usec" => times.total_ns = ns,
        b"user_usec" => times.user_ns = ns,
        b"system_usec" => times.system_ns = ns,
        _ => {}
    }
}

/// A cgroup's CPU time as its files account it now: on hybrid hosts v1 `cpuacct.usage` (to the
/// nanosecond), on pure v2 hosts `cpu.stat usage_usec` (to the microsecond).
pub fn read_cpu_total(cgroups: &ContainerCgroups, buf: &mut Vec<u8>) -> io::Result<u64> {
    match cgroups.mode {
        CgroupMode::Hybrid => {
            let dir = cgroups.dir("cpuacct").ok_or_else(|| io::Error::other("the host has no cpuacct controller"))?;
            Ok(StatFile::open(dir.join("cpuacct.usage"))?.read_u64(buf)?.unwrap_or(0))
        }
        CgroupMode::Unified => {
            let mut times = CpuTimes::default();
            let stat = StatFile::open(cgroups.unified.path.join("cpu.stat"))?;
            for_each_keyed(stat.read(buf)?, |key, value| v2_times(key, value, &mut times));
            Ok(times.total_ns)
        }
    }
}

#[derive(Debug)]
pub struct CpuReader {
    mode: CgroupMode,
    stat: StatFile,
    /// v1 `cpu.cfs_quota_us`, v2 `cpu.max`.
    quota: StatFile,
    /// v1 `cpuacct.usage`, when CPU time comes from files (v2 has it in `cpu.stat`).
    usage_v1: Option<StatFile>,
    /// v1 `cpuacct.stat`: the kernel's user/system split (v2 has it in `cpu.stat`).
    split_v1: Option<StatFile>,
    with_usage: bool,
}

impl CpuReader {
    pub fn open(cgroups: &ContainerCgroups, with_usage: bool) -> io::Result<Self> {
        let dir = cgroups.dir("cpu").ok_or_else(|| io::Error::other("the host has no cpu controller"))?;
        let (usage_v1, split_v1) = match cgroups.mode {
            CgroupMode::Hybrid => {
                let cpuacct =
                    cgroups.dir("cpuacct").ok_or_else(|| io::Error::other("the host has no cpuacct controller"))?;
                let usage = with_usage.then(|| StatFile::open(cpuacct.join("cpuacct.usage"))).transpose()?;
                (usage, Some(StatFile::open(cpuacct.join("cpuacct.stat"))?))
            }
            CgroupMode::Unified => (None, None),
        };
        let quota = StatFile::open(dir.join(match cgroups.mode {
            CgroupMode::Hybrid => "cpu.cfs_quota_us",
            CgroupMode::Unified => "cpu.max",
        }))?;
        Ok(CpuReader {
            mode: cgroups.mode,
            stat: StatFile::open(dir.join("cpu.stat"))?,
            quota,
            usage_v1,
            split_v1,
            with_usage,
        })
    }

    /// Whether the cgroup has a CPU quota (CFS bandwidth control), so it can be throttled:
    /// v1 `cpu.cfs_quota_us` other than -1, v2 `cpu.max` other than `max …`.
    pub fn has_quota(&self, buf: &mut Vec<u8>) -> io::Result<bool> {
        let text = self.quota.read(buf)?;
        let first = text.split(|b| b.is_ascii_whitespace()).next().unwrap_or_default();
        Ok(!matches!(first, b"-1" | b"max" | b""))
    }

    /// Whether the user/system split is in `cpu.stat` (v2), which [`CpuReader::read`] reads.
    pub fn split_in_stat(&self) -> bool {
        self.split_v1.is_none()
    }

    /// Whether [`CpuReader::read_usage`] reads `cpu.stat` too (v2, CPU time from files), so
    /// the throttling counters need no read of their own.
    pub fn usage_brings_throttling(&self) -> bool {
        self.with_usage && self.usage_v1.is_none()
    }

    /// CPU time and its split, when they come from files (v1 `cpuacct.usage` and
    /// `cpuacct.stat`; on v2 `cpu.stat`, which brings the throttling counters along).
    pub fn read_usage(
        &self,
        buf: &mut Vec<u8>,
        throttling: &mut CpuThrottling,
        times: &mut CpuTimes,
    ) -> io::Result<()> {
        if !self.with_usage {
            return Ok(());
        }
        match &self.usage_v1 {
            Some(usage) => {
                times.total_ns = usage.read_u64(buf)?.unwrap_or(0);
                self.read_split(buf, throttling, times)?;
            }
            None => self.read(buf, throttling, times)?,
        }
        Ok(())
    }

    /// The kernel's user/system split: v1 `cpuacct.stat`; on v2 `cpu.stat`, which brings the
    /// throttling counters along.
    pub fn read_split(
        &self,
        buf: &mut Vec<u8>,
        throttling: &mut CpuThrottling,
        times: &mut CpuTimes,
    ) -> io::Result<()> {
        match &self.split_v1 {
            Some(file) => read_cpuacct_stat(file, buf, times),
            None => self.read(buf, throttling, times),
        }
    }

    /// The throttling counters; on v2 also the CPU time's split (and the total, when CPU time
    /// comes from files).
    pub fn read(&self, buf: &mut Vec<u8>, throttling: &mut CpuThrottling, times: &mut CpuTimes) -> io::Result<()> {
        let v1 = self.mode == CgroupMode::Hybrid;
        let mut read = CpuTimes::default();
        for_each_keyed(self.stat.read(buf)?, |key, value| match (v1, key) {
            (_, b"nr_periods") => throttling.periods = value,
            (_, b"nr_throttled") => throttling.throttled_periods = value,
            (true, b"throttled_time") => throttling.throttled_ns = value,
            (false, b"throttled_usec") => throttling.throttled_ns = value.saturating_mul(1000),
            (false, _) => v2_times(key, value, &mut read),
            _ => {}
        });
        if !v1 {
            (times.user_ns, times.system_ns) = (read.user_ns, read.system_ns);
            if self.with_usage {
                times.total_ns = read.total_ns;
            }
        }
        Ok(())
    }
}
