//! The eBPF programs: per-cgroup CPU time from `sched_switch` and network bytes and
//! packets from `cgroup_skb`, counted into per-CPU maps that user space sums.
//!
//! Only cgroups that user space registered are counted, and the hot paths never insert:
//! a tracked cgroup's counters sit in a direct slot (an inlined array access), or, when
//! another tracked cgroup took that slot, in a hash map consulted only for that slot.
#![no_std]
#![no_main]

use agent_common::{CgroupCounters, CgroupId, CgroupSlot, MAX_OVERFLOW_CGROUPS, SLOTS, slot_index};
use aya_ebpf::{
    helpers::generated::{bpf_get_current_cgroup_id, bpf_skb_cgroup_id},
    macros::{btf_tracepoint, cgroup_skb, map},
    maps::{Array, PerCpuArray, PerCpuHashMap},
    programs::{BtfTracePointContext, SkBuffContext},
};

#[map]
static CGROUP_SLOTS: PerCpuArray<CgroupSlot> = PerCpuArray::with_max_entries(SLOTS, 0);

#[map]
static SLOT_OVERFLOW: Array<u32> = Array::with_max_entries(SLOTS, 0);

#[map]
static CGROUP_COUNTERS: PerCpuHashMap<CgroupId, CgroupCounters> =
    PerCpuHashMap::with_max_entries(MAX_OVERFLOW_CGROUPS, 0);

/// Byte offsets of `task_struct.se.sum_exec_runtime` and `.se.prev_sum_exec_runtime`;
/// the loader sets them from kernel BTF.
#[unsafe(no_mangle)]
static SUM_EXEC_RUNTIME_OFFSET: u64 = 0;
#[unsafe(no_mangle)]
static PREV_SUM_EXEC_RUNTIME_OFFSET: u64 = 0;

/// The root of the unified hierarchy always has id 1.
const ROOT_CGROUP_ID: u64 = 1;

/// This CPU's counters of a tracked cgroup, or `None` for any other cgroup.
#[inline(always)]
fn counters_of(cgroup_id: CgroupId) -> Option<*mut CgroupCounters> {
    if cgroup_id == 0 {
        return None;
    }
    let index = slot_index(cgroup_id);
    let slot = CGROUP_SLOTS.get_ptr_mut(index)?;
    // SAFETY: this CPU's copy of a slot; the map lives as long as the program.
    unsafe {
        if (*slot).cgroup_id == cgroup_id {
            return Some(core::ptr::addr_of_mut!((*slot).counters));
        }
    }
    match SLOT_OVERFLOW.get(index) {
        Some(&taken) if taken != 0 => CGROUP_COUNTERS.get_ptr_mut(cgroup_id),
        _ => None,
    }
}

/// A `u64` field of a task, at an offset the loader found in kernel BTF.
///
/// `task` is a BTF-typed pointer (`struct task_struct *`) and the offset a known
/// constant (a frozen read-only global), so the verifier checks this load against
/// the kernel's type and the JIT makes it a plain, fault-guarded load.
#[inline(always)]
fn field_u64(task: *const u8, offset: u64) -> Option<u64> {
    // SAFETY: see above; the verifier refuses the program if the field is not a u64.
    Some(unsafe { core::ptr::read_volatile(task.add(offset as usize).cast::<u64>()) })
}

/// Charges the slice the outgoing task just ran to its cgroup.
///
/// The scheduler has already updated `prev->se.sum_exec_runtime` when this tracepoint
/// fires, and `prev->se.prev_sum_exec_runtime` holds its value from when the task was
/// picked to run, so their difference is exactly the slice `cpuacct`/`cpu.stat` were
/// charged, with no clock read and no state of our own. In `tp_btf/sched_switch` the
/// current task is still `prev`, so `bpf_get_current_cgroup_id()` names its cgroup.
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> i32 {
    // SAFETY: no arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // The idle task and host daemons sit in the root cgroup, never a kernel's.
    if cgroup_id == ROOT_CGROUP_ID {
        return 0;
    }
    let Some(counters) = counters_of(cgroup_id) else {
        return 0;
    };
    // sched_switch's arguments are (preempt, prev, next, prev_state).
    let prev: *const u8 = ctx.arg(1);
    // SAFETY: globals the loader wrote before loading.
    let (runtime_at, picked_at) =
        unsafe { (core::ptr::read_volatile(&SUM_EXEC_RUNTIME_OFFSET), core::ptr::read_volatile(&PREV_SUM_EXEC_RUNTIME_OFFSET)) };
    let (Some(runtime), Some(picked)) = (field_u64(prev, runtime_at), field_u64(prev, picked_at)) else {
        return 0;
    };
    if runtime > picked {
        // SAFETY: this CPU's copy of a value that lives as long as the map entry.
        unsafe { (*counters).cpu_ns += runtime - picked };
    }
    0
}

/// Counts packets a container's sockets receive. Keyed by the socket's cgroup:
/// the current task at ingress is whoever ran the softirq, not the receiver.
#[cgroup_skb(ingress)]
pub fn cgroup_skb_ingress(ctx: SkBuffContext) -> i32 {
    count_packet(&ctx, Direction::Ingress);
    1
}

/// Counts packets a container's sockets send.
#[cgroup_skb(egress)]
pub fn cgroup_skb_egress(ctx: SkBuffContext) -> i32 {
    count_packet(&ctx, Direction::Egress);
    1
}

enum Direction {
    Ingress,
    Egress,
}

/// The loopback device is ifindex 1 in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
/// Ethernet header bytes, which non-loopback devices (veth, NICs) count per packet.
const ETH_HLEN: u64 = 14;

/// Counts a packet in the units of the devices' own counters (`/proc/net/dev`): one
/// per skb, bytes from the IP header up, plus the Ethernet header on every device but
/// loopback (which strips it before counting).
#[inline(always)]
fn count_packet(ctx: &SkBuffContext, direction: Direction) {
    // SAFETY: the context's skb pointer is what the kernel handed the program.
    let cgroup_id = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    let Some(counters) = counters_of(cgroup_id) else {
        return;
    };
    // SAFETY: reading a field of the program's own context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let mut bytes = u64::from(ctx.len());
    if ifindex != LOOPBACK_IFINDEX {
        bytes += ETH_HLEN;
    }
    // SAFETY: this CPU's copy; softirq and process context on one CPU do not nest
    // inside one cgroup_skb run, and a lost update would only undercount by one packet.
    unsafe {
        match direction {
            Direction::Ingress => {
                (*counters).rx_bytes += bytes;
                (*counters).rx_packets += 1;
            }
            Direction::Egress => {
                (*counters).tx_bytes += bytes;
                (*counters).tx_packets += 1;
            }
        }
    }
}

/// Empty programs on the same hooks, loaded only by the benchmark: what any program
/// costs on this machine, so the counters' own cost can be told apart.
#[btf_tracepoint(function = "sched_switch")]
pub fn baseline_sched_switch(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[cgroup_skb]
pub fn baseline_cgroup_skb(_ctx: SkBuffContext) -> i32 {
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
