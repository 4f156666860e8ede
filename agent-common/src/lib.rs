//! Types shared by the eBPF programs and the agent: map names, keys, values and limits.
//!
//! Everything here is `#[repr(C)]` plain data so the same bytes mean the same thing
//! on both sides of the map. The `user` feature adds `aya::Pod` impls for user space.
#![no_std]

/// Per-CPU array of [`CgroupSlot`]s: a tracked cgroup lives at [`slot_index`] of its id
/// unless another tracked cgroup already holds that slot.
pub const SLOTS_MAP: &str = "CGROUP_SLOTS";
/// Array of `u32`, one per slot: non-zero when tracked cgroups whose index is that slot
/// live in [`COUNTERS_MAP`] because the slot was taken.
pub const SLOT_OVERFLOW_MAP: &str = "SLOT_OVERFLOW";
/// Per-CPU hash map of [`CgroupCounters`] by cgroup id, for cgroups whose slot was taken.
pub const COUNTERS_MAP: &str = "CGROUP_COUNTERS";
/// Globals the loader sets: byte offsets of `task_struct.se.sum_exec_runtime` and
/// `task_struct.se.prev_sum_exec_runtime` (its value when the task was last picked).
pub const SUM_EXEC_RUNTIME_OFFSET: &str = "SUM_EXEC_RUNTIME_OFFSET";
pub const PREV_SUM_EXEC_RUNTIME_OFFSET: &str = "PREV_SUM_EXEC_RUNTIME_OFFSET";

/// Slots in [`SLOTS_MAP`] (a power of two): direct, hash-free lookups for the hot paths.
pub const SLOTS: u32 = 1024;
/// Most cgroups whose slot was taken, counted in [`COUNTERS_MAP`] instead.
pub const MAX_OVERFLOW_CGROUPS: u32 = 1024;

/// Where a cgroup's counters live in [`SLOTS_MAP`].
#[inline(always)]
pub const fn slot_index(id: CgroupId) -> u32 {
    (id as u32) & (SLOTS - 1)
}

/// A direct slot: whose counters these are (0: free) and the counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupSlot {
    pub cgroup_id: CgroupId,
    pub counters: CgroupCounters,
}

/// Program names as the eBPF object exports them.
pub mod programs {
    pub const SCHED_SWITCH: &str = "sched_switch";
    pub const SKB_INGRESS: &str = "cgroup_skb_ingress";
    pub const SKB_EGRESS: &str = "cgroup_skb_egress";
    /// Empty programs on the same hooks, for the benchmark's baseline.
    pub const BASELINE_SCHED_SWITCH: &str = "baseline_sched_switch";
    pub const BASELINE_SKB: &str = "baseline_cgroup_skb";
}

/// A cgroup v2 id: the inode number of the cgroup's directory in the unified hierarchy.
pub type CgroupId = u64;

/// What one CPU has counted for one cgroup. User space sums the per-CPU copies.
///
/// Network counters are in the units of the devices' own counters (`/proc/net/dev`):
/// one packet per skb, and bytes from the IP header up plus the 14-byte Ethernet header
/// on every device but loopback. A GSO super-packet that a device splits after the
/// egress hook counts once here and once per segment there.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupCounters {
    /// Nanoseconds the cgroup's tasks ran, as the scheduler accounts them
    /// (`sum_exec_runtime`, the same clock as `cpuacct.usage` and `cpu.stat`).
    pub cpu_ns: u64,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
}

impl CgroupCounters {
    /// Adds another CPU's copy (or another cgroup incarnation) into this one.
    pub fn accumulate(&mut self, other: &CgroupCounters) {
        self.cpu_ns = self.cpu_ns.wrapping_add(other.cpu_ns);
        self.rx_bytes = self.rx_bytes.wrapping_add(other.rx_bytes);
        self.rx_packets = self.rx_packets.wrapping_add(other.rx_packets);
        self.tx_bytes = self.tx_bytes.wrapping_add(other.tx_bytes);
        self.tx_packets = self.tx_packets.wrapping_add(other.tx_packets);
    }
}

#[cfg(feature = "user")]
// SAFETY: plain `#[repr(C)]` integers, no padding, every bit pattern valid.
unsafe impl aya::Pod for CgroupCounters {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for CgroupSlot {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_index_stays_in_range() {
        for id in [0, 1, 1023, 1024, 1025, u64::MAX] {
            assert!(slot_index(id) < SLOTS);
        }
        assert_eq!(slot_index(1025), 1);
    }

    #[test]
    fn accumulate_adds_every_field() {
        let mut total = CgroupCounters { cpu_ns: 1, rx_bytes: 2, rx_packets: 3, tx_bytes: 4, tx_packets: 5 };
        total.accumulate(&CgroupCounters { cpu_ns: 10, rx_bytes: 20, rx_packets: 30, tx_bytes: 40, tx_packets: 50 });
        assert_eq!(total, CgroupCounters { cpu_ns: 11, rx_bytes: 22, rx_packets: 33, tx_bytes: 44, tx_packets: 55 });
    }
}
