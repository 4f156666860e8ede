//! Types shared by the eBPF programs and the agent: map names, keys, values and limits.
//!
//! Everything here is `#[repr(C)]` plain data so the same bytes mean the same thing
//! on both sides of the map. The `user` feature adds `aya::Pod` impls for user space.
#![no_std]

/// Name of the per-CPU hash map of [`CgroupCounters`] keyed by cgroup v2 id.
pub const COUNTERS_MAP: &str = "CGROUP_COUNTERS";
/// Name of the per-CPU array holding the timestamp of each CPU's last context switch.
pub const LAST_SWITCH_MAP: &str = "LAST_SWITCH_NS";

/// Most cgroups counted at once; a node runs far fewer kernels than this.
pub const MAX_TRACKED_CGROUPS: u32 = 1024;

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
    /// Nanoseconds the cgroup's tasks were on a CPU.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulate_adds_every_field() {
        let mut total = CgroupCounters { cpu_ns: 1, rx_bytes: 2, rx_packets: 3, tx_bytes: 4, tx_packets: 5 };
        total.accumulate(&CgroupCounters { cpu_ns: 10, rx_bytes: 20, rx_packets: 30, tx_bytes: 40, tx_packets: 50 });
        assert_eq!(total, CgroupCounters { cpu_ns: 11, rx_bytes: 22, rx_packets: 33, tx_bytes: 44, tx_packets: 55 });
    }
}
