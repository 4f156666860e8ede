//! Types shared by the eBPF programs and the agent: map names, keys, values and limits.
//!
//! Everything here is `#[repr(C)]` plain data so the same bytes mean the same thing
//! on both sides of the map. The `user` feature adds `aya::Pod` impls for user space.
#![no_std]

pub mod policy;

/// Array of [`CounterLine`]s, [`SLOTS`] × the number of possible CPUs (set at load time), that
/// user space memory-maps (`BPF_F_MMAPABLE`): a tracked cgroup's counters on CPU `c` live at
/// `slot_index(id) * cpus + c`, unless another tracked cgroup already holds that slot.
pub const SLOTS_MAP: &str = "COUNTER_LINES";
/// Hash map of [`CgroupCounters`] by cgroup id that only user space reads and writes: what a
/// cgroup had counted before its counters were registered (read from its cgroup files), kept
/// beside the pinned counters so that a restarted agent has it too.
pub const BASELINES_MAP: &str = "BASELINES";
/// `map_flags` of an array user space may `mmap`.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// Array of `u32`, one per slot: non-zero when tracked cgroups whose index is that slot
/// live in [`COUNTERS_MAP`] because the slot was taken.
pub const SLOT_OVERFLOW_MAP: &str = "SLOT_OVERFLOW";
/// Per-CPU hash map of [`CgroupCounters`] by cgroup id, for cgroups whose slot was taken.
pub const COUNTERS_MAP: &str = "CGROUP_COUNTERS";
/// Ring buffer of [`OomEvent`]s, one per OOM kill.
pub const OOM_EVENTS_MAP: &str = "OOM_EVENTS";
/// Per-CPU array of one `u64`: events the programs could not hand to user space
/// (ring buffer full). The counters themselves are never lost.
pub const LOST_EVENTS_MAP: &str = "LOST_EVENTS";
/// Bytes of [`OOM_EVENTS_MAP`] (a power of two, a multiple of the page size).
pub const OOM_EVENTS_BYTES: u32 = 64 * 1024;

/// Globals the loader sets from kernel BTF: byte offsets of the kernel struct fields
/// the programs read (aya's Rust programs carry no CO-RE relocations).
pub mod offsets {
    /// `bio.bi_opf` (operation and flags).
    pub const BIO_OPF: &str = "BIO_OPF_OFFSET";
    /// `bio.bi_iter.bi_size` (bytes).
    pub const BIO_SIZE: &str = "BIO_SIZE_OFFSET";
    /// `task_struct.tgid`, `task_struct.comm`, `task_struct.cgroups`.
    pub const TASK_TGID: &str = "TASK_TGID_OFFSET";
    pub const TASK_COMM: &str = "TASK_COMM_OFFSET";
    pub const TASK_CGROUPS: &str = "TASK_CGROUPS_OFFSET";
    /// `css_set.dfl_cgrp` (the task's cgroup in the unified hierarchy).
    pub const CSS_SET_DFL_CGRP: &str = "CSS_SET_DFL_CGRP_OFFSET";
    /// `cgroup.kn` and `kernfs_node.id` (a cgroup's id is its kernfs node's).
    pub const CGROUP_KN: &str = "CGROUP_KN_OFFSET";
    pub const KERNFS_NODE_ID: &str = "KERNFS_NODE_ID_OFFSET";
    /// `cgroup.level` (0 for the root) and `cgroup.self.parent` (the parent's own css).
    pub const CGROUP_LEVEL: &str = "CGROUP_LEVEL_OFFSET";
    pub const CGROUP_PARENT_CSS: &str = "CGROUP_PARENT_CSS_OFFSET";
    /// `cgroup_subsys_state.cgroup` (the cgroup a css belongs to).
    pub const CSS_CGROUP: &str = "CSS_CGROUP_OFFSET";
}

/// Global the loader sets: the number of possible CPUs, the stride of [`SLOTS_MAP`].
pub const NR_CPUS_GLOBAL: &str = "NR_CPUS";

/// How many cgroup levels below a tracked cgroup the CPU program looks through: a task in a
/// cgroup nested that deep inside a kernel's cgroup is charged to the kernel.
pub const MAX_NESTING: u32 = 4;

/// Bumped whenever a map's key or value changes meaning (not only size), so that pinned maps
/// of an older layout are not reused.
pub const LAYOUT_VERSION: u32 = 2;

/// Slots in [`SLOTS_MAP`] (a power of two): direct, hash-free lookups for the hot paths.
pub const SLOTS: u32 = 1024;
/// Most cgroups whose slot was taken, counted in [`COUNTERS_MAP`] instead.
pub const MAX_OVERFLOW_CGROUPS: u32 = 1024;

/// Where a cgroup's counters live in [`SLOTS_MAP`].
#[inline(always)]
pub const fn slot_index(id: CgroupId) -> u32 {
    (id as u32) & (SLOTS - 1)
}

/// One CPU's copy of a direct slot: whose counters these are (0: free) and the counters,
/// padded to two cache lines so that CPUs never write the same line.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterLine {
    pub cgroup_id: CgroupId,
    pub counters: CgroupCounters,
    pub _pad: [u64; 5],
}

/// Index of one CPU's [`CounterLine`] of a slot in [`SLOTS_MAP`].
#[inline(always)]
pub const fn line_index(slot: u32, cpus: u32, cpu: u32) -> u32 {
    slot * cpus + cpu
}

/// Program names as the eBPF object exports them.
pub mod programs {
    /// `sched_stat_runtime`: every nanosecond the scheduler charges a task (and its cgroups).
    pub const SCHED_STAT_RUNTIME: &str = "sched_stat_runtime";
    pub const SKB_INGRESS: &str = "cgroup_skb_ingress";
    pub const SKB_EGRESS: &str = "cgroup_skb_egress";
    pub const BLOCK_BIO_QUEUE: &str = "block_bio_queue";
    pub const MARK_VICTIM: &str = "mark_victim";
    /// Empty programs on the same hooks, for the benchmark's baseline.
    pub const BASELINE_SCHED_STAT_RUNTIME: &str = "baseline_sched_stat_runtime";
    pub const BASELINE_SKB: &str = "baseline_cgroup_skb";
    pub const BASELINE_BLOCK_BIO_QUEUE: &str = "baseline_block_bio_queue";
}

/// The operation bits of `bio.bi_opf` (`REQ_OP_MASK`) and the operations the block
/// counters tell apart, as the kernel's own cgroup I/O statistics do (`blkg_rwstat_add`):
/// discards apart, odd operations are writes, the rest reads.
pub mod bio_op {
    pub const MASK: u32 = 0xff;
    pub const DISCARD: u32 = 3;
    #[inline(always)]
    pub const fn is_write(opf: u32) -> bool {
        opf & 1 == 1
    }
}

/// Length of `task_struct.comm`.
pub const TASK_COMM_LEN: usize = 16;

/// One OOM kill as the `mark_victim` program reports it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OomEvent {
    /// The victim's cgroup in the unified hierarchy.
    pub cgroup_id: CgroupId,
    /// The victim's process id (thread group id) in the host's pid namespace.
    pub pid: u32,
    pub _pad: u32,
    /// The victim's command name, NUL-padded.
    pub comm: [u8; TASK_COMM_LEN],
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
    /// Nanoseconds the cgroup's tasks ran: every charge the scheduler makes to them
    /// (`sched_stat_runtime`, the same deltas `cpuacct.usage` and `cpu.stat` add up).
    pub cpu_ns: u64,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    /// Block I/O the cgroup's tasks submitted (`block_bio_queue`), in the units of the
    /// kernel's cgroup I/O statistics: bytes and operations per bio, discards not counted.
    pub io_read_bytes: u64,
    pub io_read_ops: u64,
    pub io_write_bytes: u64,
    pub io_write_ops: u64,
    /// Processes of the cgroup the OOM killer chose (`mark_victim`).
    pub oom_kills: u64,
}

impl CgroupCounters {
    /// Adds another CPU's copy (or another cgroup incarnation) into this one.
    pub fn accumulate(&mut self, other: &CgroupCounters) {
        self.cpu_ns = self.cpu_ns.wrapping_add(other.cpu_ns);
        self.rx_bytes = self.rx_bytes.wrapping_add(other.rx_bytes);
        self.rx_packets = self.rx_packets.wrapping_add(other.rx_packets);
        self.tx_bytes = self.tx_bytes.wrapping_add(other.tx_bytes);
        self.tx_packets = self.tx_packets.wrapping_add(other.tx_packets);
        self.io_read_bytes = self.io_read_bytes.wrapping_add(other.io_read_bytes);
        self.io_read_ops = self.io_read_ops.wrapping_add(other.io_read_ops);
        self.io_write_bytes = self.io_write_bytes.wrapping_add(other.io_write_bytes);
        self.io_write_ops = self.io_write_ops.wrapping_add(other.io_write_ops);
        self.oom_kills = self.oom_kills.wrapping_add(other.oom_kills);
    }
}

#[cfg(feature = "user")]
// SAFETY: plain `#[repr(C)]` integers, no padding, every bit pattern valid.
unsafe impl aya::Pod for CgroupCounters {}
#[cfg(feature = "user")]
// SAFETY: as above (the padding is an explicit field and the alignment adds none).
unsafe impl aya::Pod for CounterLine {}
#[cfg(feature = "user")]
// SAFETY: as above (the padding is an explicit field).
unsafe impl aya::Pod for OomEvent {}

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
    fn a_counter_line_fills_two_cache_lines() {
        assert_eq!(core::mem::size_of::<CounterLine>(), 128);
        assert_eq!(core::mem::align_of::<CounterLine>(), 64);
        assert_eq!(line_index(3, 2, 1), 7);
    }

    #[test]
    fn accumulate_adds_every_field() {
        let ones = |n: u64| CgroupCounters {
            cpu_ns: n,
            rx_bytes: n,
            rx_packets: n,
            tx_bytes: n,
            tx_packets: n,
            io_read_bytes: n,
            io_read_ops: n,
            io_write_bytes: n,
            io_write_ops: n,
            oom_kills: n,
        };
        let mut total = ones(1);
        total.accumulate(&ones(10));
        assert_eq!(total, ones(11));
    }
}
