//! The eBPF programs: per-cgroup CPU time from `sched_switch`, network bytes and packets
//! from `cgroup_skb`, block I/O from `block_bio_queue` and OOM kills from `mark_victim`,
//! counted into per-CPU maps that user space sums (OOM kills are also reported one by one).
//!
//! Only cgroups that user space registered are counted, and the hot paths never insert:
//! a tracked cgroup's counters sit in a direct slot (an inlined array access), or, when
//! another tracked cgroup took that slot, in a hash map consulted only for that slot.
#![no_std]
#![no_main]

use agent_common::{
    CgroupCounters, CgroupId, CgroupSlot, MAX_OVERFLOW_CGROUPS, OOM_EVENTS_BYTES, OomEvent, SLOTS, TASK_COMM_LEN,
    bio_op, slot_index,
};
use aya_ebpf::{
    helpers::{
        bpf_probe_read_kernel,
        generated::{bpf_get_current_cgroup_id, bpf_skb_cgroup_id},
    },
    macros::{btf_tracepoint, cgroup_skb, map},
    maps::{Array, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{BtfTracePointContext, SkBuffContext},
};

#[map]
static CGROUP_SLOTS: PerCpuArray<CgroupSlot> = PerCpuArray::with_max_entries(SLOTS, 0);

#[map]
static SLOT_OVERFLOW: Array<u32> = Array::with_max_entries(SLOTS, 0);

#[map]
static CGROUP_COUNTERS: PerCpuHashMap<CgroupId, CgroupCounters> =
    PerCpuHashMap::with_max_entries(MAX_OVERFLOW_CGROUPS, 0);

#[map]
static OOM_EVENTS: RingBuf = RingBuf::with_byte_size(OOM_EVENTS_BYTES, 0);

#[map]
static LOST_EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

// Byte offsets of the kernel struct fields the programs read (agent_common::offsets);
// the loader sets them from kernel BTF.
#[unsafe(no_mangle)]
static SUM_EXEC_RUNTIME_OFFSET: u64 = 0;
#[unsafe(no_mangle)]
static PREV_SUM_EXEC_RUNTIME_OFFSET: u64 = 0;
#[unsafe(no_mangle)]
static BIO_OPF_OFFSET: u64 = 0;
#[unsafe(no_mangle)]
static BIO_SIZE_OFFSET: u64 = 0;
#[unsafe(no_mangle)]
static TASK_TGID_OFFSET: u64 = 0;
#[unsafe(no_mangle)]
static TASK_COMM_OFFSET: u64 = 0;
#[unsafe(no_mangle)]
static TASK_CGROUPS_OFFSET: u64 = 0;
#[unsafe(no_mangle)]
static CSS_SET_DFL_CGRP_OFFSET: u64 = 0;
#[unsafe(no_mangle)]
static CGROUP_KN_OFFSET: u64 = 0;
#[unsafe(no_mangle)]
static KERNFS_NODE_ID_OFFSET: u64 = 0;

/// A global the loader wrote before loading (a frozen read-only value).
#[inline(always)]
fn offset(global: &'static u64) -> u64 {
    // SAFETY: a plain read of a static.
    unsafe { core::ptr::read_volatile(global) }
}

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

/// This CPU's counters of the current task's cgroup, when it is a tracked one.
#[inline(always)]
fn current_counters() -> Option<*mut CgroupCounters> {
    // SAFETY: no arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // The idle task and host daemons sit in the root cgroup, never a kernel's.
    if cgroup_id == ROOT_CGROUP_ID {
        return None;
    }
    counters_of(cgroup_id)
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

/// A `u32` field of a BTF-typed kernel object, as [`field_u64`].
#[inline(always)]
fn field_u32(object: *const u8, offset: u64) -> u32 {
    // SAFETY: see field_u64.
    unsafe { core::ptr::read_volatile(object.add(offset as usize).cast::<u32>()) }
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
    let Some(counters) = current_counters() else {
        return 0;
    };
    // sched_switch's arguments are (preempt, prev, next, prev_state).
    let prev: *const u8 = ctx.arg(1);
    let (runtime_at, picked_at) = (offset(&SUM_EXEC_RUNTIME_OFFSET), offset(&PREV_SUM_EXEC_RUNTIME_OFFSET));
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

/// Counts a bio its submitter's cgroup queues, where the kernel's own cgroup I/O statistics
/// count it (`submit_bio_noacct`): its bytes once, whatever splits follow, and one operation.
///
/// The submitter is the current task: for reads and direct I/O the container's task itself;
/// buffered writes that the kernel's flusher threads write back later run in the root
/// cgroup, as cgroup v1's blkio charges them too.
#[btf_tracepoint(function = "block_bio_queue")]
pub fn block_bio_queue(ctx: BtfTracePointContext) -> i32 {
    let Some(counters) = current_counters() else {
        return 0;
    };
    // block_bio_queue's one argument is the bio.
    let bio: *const u8 = ctx.arg(0);
    let opf = field_u32(bio, offset(&BIO_OPF_OFFSET));
    let bytes = u64::from(field_u32(bio, offset(&BIO_SIZE_OFFSET)));
    let op = opf & bio_op::MASK;
    // SAFETY: this CPU's copy of a value that lives as long as the map entry.
    unsafe {
        if op == bio_op::DISCARD {
            return 0;
        } else if bio_op::is_write(op) {
            (*counters).io_write_bytes += bytes;
            (*counters).io_write_ops += 1;
        } else {
            (*counters).io_read_bytes += bytes;
            (*counters).io_read_ops += 1;
        }
    }
    0
}

/// Reads a kernel value through a pointer the verifier does not type (a chain of
/// pointers found by offset); `None` if the read faults.
#[inline(always)]
fn read_kernel<T>(at: *const u8, offset: u64) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel checks the address and fails instead of faulting.
    unsafe { bpf_probe_read_kernel(at.add(offset as usize).cast::<T>()).ok() }
}

/// The cgroup v2 id of a task: `task->cgroups->dfl_cgrp->kn->id`.
#[inline(always)]
fn task_cgroup_id(task: *const u8) -> Option<CgroupId> {
    let css_set: *const u8 = read_kernel(task, offset(&TASK_CGROUPS_OFFSET))?;
    let cgroup: *const u8 = read_kernel(css_set, offset(&CSS_SET_DFL_CGRP_OFFSET))?;
    let kernfs_node: *const u8 = read_kernel(cgroup, offset(&CGROUP_KN_OFFSET))?;
    read_kernel(kernfs_node, offset(&KERNFS_NODE_ID_OFFSET))
}

/// Counts an OOM kill against the victim's cgroup (not the current task's: a global OOM
/// runs in whichever task failed to allocate) and reports the victim to user space.
#[btf_tracepoint(function = "mark_victim")]
pub fn mark_victim(ctx: BtfTracePointContext) -> i32 {
    // mark_victim's arguments are (task, uid).
    let task: *const u8 = ctx.arg(0);
    let Some(cgroup_id) = task_cgroup_id(task) else {
        return 0;
    };
    if let Some(counters) = counters_of(cgroup_id) {
        // SAFETY: this CPU's copy of a value that lives as long as the map entry.
        unsafe { (*counters).oom_kills += 1 };
    }
    let event = OomEvent {
        cgroup_id,
        pid: read_kernel(task, offset(&TASK_TGID_OFFSET)).unwrap_or(0),
        _pad: 0,
        comm: read_kernel::<[u8; TASK_COMM_LEN]>(task, offset(&TASK_COMM_OFFSET)).unwrap_or([0; TASK_COMM_LEN]),
    };
    if OOM_EVENTS.output::<OomEvent>(&event, 0).is_err()
        && let Some(lost) = LOST_EVENTS.get_ptr_mut(0)
    {
        // SAFETY: this CPU's copy of the counter.
        unsafe { *lost += 1 };
    }
    0
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

#[btf_tracepoint(function = "block_bio_queue")]
pub fn baseline_block_bio_queue(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
