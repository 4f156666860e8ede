//! The eBPF programs: per-cgroup CPU time from the scheduler's own charges
//! (`sched_stat_runtime`), network bytes and packets from `cgroup_skb`, block I/O from `block_bio_queue` and OOM kills from
//! `mark_victim`, counted per CPU into maps that user space sums (OOM kills are also reported
//! one by one).
//!
//! Only cgroups that user space registered are counted, and the hot paths never insert:
//! a tracked cgroup's counters sit in a direct slot (an inlined array access into a
//! memory-mapped array, one cache-line pair per CPU), or, when another tracked cgroup took
//! that slot, in a hash map consulted only for that slot.
#![no_std]
#![no_main]

use agent_common::{
    BPF_F_MMAPABLE, CgroupCounters, CgroupId, CounterLine, MAX_NESTING, MAX_OVERFLOW_CGROUPS, OOM_EVENTS_BYTES,
    OomEvent, SLOTS, TASK_COMM_LEN, bio_op, line_index, slot_index,
};
use aya_ebpf::{
    helpers::{
        bpf_probe_read_kernel,
        generated::{bpf_get_current_cgroup_id, bpf_get_smp_processor_id, bpf_skb_cgroup_id},
    },
    macros::{btf_tracepoint, cgroup_skb, map},
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{BtfTracePointContext, SkBuffContext},
};

/// `SLOTS` lines per CPU; the loader sets the real size (`SLOTS` × possible CPUs).
#[map]
static COUNTER_LINES: Array<CounterLine> = Array::with_max_entries(SLOTS, BPF_F_MMAPABLE);

/// Written and read by user space only (see `agent_common::BASELINES_MAP`).
#[map]
static BASELINES: HashMap<CgroupId, CgroupCounters> = HashMap::with_max_entries(SLOTS + MAX_OVERFLOW_CGROUPS, 0);

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
static CGROUP_LEVEL_OFFSET: u64 = 0;
#[unsafe(no_mangle)]
static CGROUP_PARENT_CSS_OFFSET: u64 = 0;
#[unsafe(no_mangle)]
static CSS_CGROUP_OFFSET: u64 = 0;

/// Possible CPUs: the stride of `COUNTER_LINES` (agent_common::NR_CPUS_GLOBAL).
#[unsafe(no_mangle)]
static NR_CPUS: u64 = 1;
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
    // SAFETY: no arguments; programs run with migration disabled, so the CPU stays this one.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let line = COUNTER_LINES.get_ptr_mut(line_index(index, offset(&NR_CPUS) as u32, cpu))?;
    // SAFETY: this CPU's line of a slot; the map lives as long as the program.
    unsafe {
        if (*line).cgroup_id == cgroup_id {
            return Some(core::ptr::addr_of_mut!((*line).counters));
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

/// A field of a BTF-typed kernel object, at an offset the loader found in kernel BTF.
///
/// `object` is a BTF-typed pointer (a program argument such as `struct cgroup *`, or a pointer
/// loaded from one) and the offset a known constant (a frozen read-only global), so the
/// verifier checks this load against the kernel's type and the JIT makes it a plain,
/// fault-guarded load; loading a pointer member yields another BTF-typed pointer.
#[inline(always)]
fn field<T: Copy>(object: *const u8, offset: u64) -> T {
    // SAFETY: see above; the verifier refuses the program if the member's type differs.
    unsafe { core::ptr::read_volatile(object.add(offset as usize).cast::<T>()) }
}

/// This CPU's counters of the tracked cgroup that `cgroup` is, or is nested in (up to
/// [`MAX_NESTING`] levels below it): a runtime or a user may make cgroups inside a kernel's,
/// and the kernel's own accounting of a cgroup includes its descendants.
#[inline(always)]
fn cgroup_counters(cgroup: *const u8) -> Option<*mut CgroupCounters> {
    let mut cgroup = cgroup;
    for _ in 0..=MAX_NESTING {
        if cgroup.is_null() {
            return None;
        }
        // The root (level 0), where host daemons run, is never a kernel's cgroup.
        let level: i32 = field(cgroup, offset(&CGROUP_LEVEL_OFFSET));
        if level <= 0 {
            return None;
        }
        let kernfs_node: *const u8 = field(cgroup, offset(&CGROUP_KN_OFFSET));
        if kernfs_node.is_null() {
            return None;
        }
        if let Some(counters) = counters_of(field(kernfs_node, offset(&KERNFS_NODE_ID_OFFSET))) {
            return Some(counters);
        }
        // Level 1 is the root's children: no kernel's cgroup is above them.
        if level == 1 {
            return None;
        }
        let parent_css: *const u8 = field(cgroup, offset(&CGROUP_PARENT_CSS_OFFSET));
        if parent_css.is_null() {
            return None;
        }
        cgroup = field(parent_css, offset(&CSS_CGROUP_OFFSET));
    }
    None
}

/// Every charge of CPU time to a task, as the scheduler makes it: `update_curr()` (every
/// tick, switch, wakeup, migration and exit) adds `runtime` to the task's `sum_exec_runtime`,
/// fires this tracepoint, and charges the same `runtime` to the task's cgroups
/// (`cgroup_account_cputime()`: `cpuacct.usage` on v1, `cpu.stat usage_usec` on v2). Counting
/// here is exact: nothing the scheduler charges is missed or counted twice, whatever the
/// task's life (forks, short threads, exits) and whichever CPU does the charging. No clock
/// read. (A program that charges the slice between two `sched_switch`es instead trusts that
/// nothing else moves `prev_sum_exec_runtime`; exiting tasks do, and it misses their last
/// slice.)
#[btf_tracepoint(function = "sched_stat_runtime")]
pub fn sched_stat_runtime(ctx: BtfTracePointContext) -> i32 {
    // sched_stat_runtime(struct task_struct *curr, u64 runtime[, u64 vruntime before 6.8])
    let task: *const u8 = ctx.arg(0);
    let css_set: *const u8 = field(task, offset(&TASK_CGROUPS_OFFSET));
    if css_set.is_null() {
        return 0;
    }
    if let Some(counters) = cgroup_counters(field(css_set, offset(&CSS_SET_DFL_CGRP_OFFSET))) {
        let runtime: u64 = ctx.arg(1);
        // SAFETY: this CPU's copy of a value that lives as long as the map entry.
        unsafe { (*counters).cpu_ns += runtime };
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
    let opf: u32 = field(bio, offset(&BIO_OPF_OFFSET));
    let bytes = u64::from(field::<u32>(bio, offset(&BIO_SIZE_OFFSET)));
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
#[btf_tracepoint(function = "sched_stat_runtime")]
pub fn baseline_sched_stat_runtime(_ctx: BtfTracePointContext) -> i32 {
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

mod runtime;
