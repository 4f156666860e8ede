//! Guardrails with BPF LSM: per-kernel rules on calls that reach past a container's walls
//! (raw and packet sockets, `bpf()`, `perf_event_open`, mounts, kernel modules, `ptrace` of a
//! process outside the kernel), each off, monitored (counted and reported) or enforced
//! (`EPERM`). The `lsm_cgroup` programs are attached at the kernels' parent, so they run only
//! for tasks in a kernel; each call reads the kernel's modes, so a mode flip applies to the
//! next call.

use agent_common::{
    CgroupId,
    policy::{KERNEL_GUARDS_MAX, KernelGuards, guard, guard_mode, hook, rule_id, verdict},
};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_probe_read_kernel,
    helpers::bpf_get_current_pid_tgid,
    macros::{btf_tracepoint, cgroup_sock, lsm_cgroup, map, tracepoint},
    maps::{HashMap, LruHashMap},
    programs::{BtfTracePointContext, LsmContext, SockContext, TracePointContext},
};

use crate::{Destination, count, current_kernel, kernel_level, report};

#[map]
static POLICY_KERNEL_GUARDS: HashMap<CgroupId, KernelGuards> = HashMap::with_max_entries(KERNEL_GUARDS_MAX, 0);

#[map]
static POLICY_GUARDS_ARMED: HashMap<CgroupId, u32> = HashMap::with_max_entries(KERNEL_GUARDS_MAX, 0);

/// A packet socket being made by a task of a guarded kernel (thread id → the `socket()`
/// detail), from the syscall's entry to its exit, for the observers.
#[map]
static GUARD_SOCKETS_PENDING: LruHashMap<u64, u16> = LruHashMap::with_max_entries(4096, 0);

/// Where a task's cgroup is, from the running kernel's BTF (agent_common::policy::offsets);
/// `OFFSETS_KNOWN` is 0 when the loader could not read them (the ptrace rule then allows).
#[unsafe(no_mangle)]
static OFFSET_TASK_CGROUPS: u32 = 0;
#[unsafe(no_mangle)]
static OFFSET_CSS_SET_DFL_CGRP: u32 = 0;
#[unsafe(no_mangle)]
static OFFSET_CGROUP_LEVEL: u32 = 0;
#[unsafe(no_mangle)]
static OFFSET_CGROUP_ANCESTORS: u32 = 0;
#[unsafe(no_mangle)]
static OFFSET_CGROUP_KN: u32 = 0;
#[unsafe(no_mangle)]
static OFFSET_KERNFS_NODE_ID: u32 = 0;
#[unsafe(no_mangle)]
static OFFSETS_KNOWN: u32 = 0;

/// `lsm_cgroup` verdicts.
const ALLOW: i32 = 1;
const DENY: i32 = 0;

const AF_INET: i32 = 2;
const AF_INET6: i32 = 10;
const AF_PACKET: i32 = 17;
const SOCK_RAW: i32 = 3;
const SOCK_TYPE_MASK: i32 = 0xf;
/// `enum kernel_read_file_id`: a module's file (`finit_module`).
const READING_MODULE: i32 = 2;

/// The rule `rule`'s verdict for the current task: its kernel's mode decides; `detail` says
/// what was asked (in the report).
#[inline(always)]
fn check(rule: usize, detail: u16) -> i32 {
    let kernel = current_kernel();
    // SAFETY: the value is plain data the map owns.
    let Some(guards) = (unsafe { POLICY_KERNEL_GUARDS.get(&kernel) }) else {
        return ALLOW;
    };
    match guards.modes[rule & 7] {
        guard_mode::OFF => ALLOW,
        guard_mode::MONITOR => {
            record(kernel, rule, detail, verdict::MONITORED);
            ALLOW
        }
        _ => {
            record(kernel, rule, detail, verdict::DENIED);
            DENY
        }
    }
}

#[inline(always)]
fn record(kernel: CgroupId, rule: usize, detail: u16, outcome: u8) {
    let id = rule_id::GUARD_BASE + rule as u32;
    count(kernel, id, outcome, hook::GUARD);
    let mut addr = [0u8; 16];
    addr[0] = rule as u8;
    report(kernel, &Destination { addr, port: detail, protocol: outcome }, id, hook::GUARD);
}

/// `socket(family, type, …)` as a guardrail's detail.
#[inline(always)]
fn socket_detail(family: i32, kind: i32) -> u16 {
    ((family as u16 & 0xff) << 8) | (kind as u16 & 0xff)
}

/// Raw IPv4 and IPv6 sockets, at their creation (a cgroup socket program: every kernel since
/// 4.10 has it, BPF LSM or not). Sockets the kernel makes for itself never come here.
#[cgroup_sock(sock_create)]
pub fn guard_sock_create(ctx: SockContext) -> i32 {
    // SAFETY: fields of the program's own context.
    let (family, kind) = unsafe {
        let sock = &*ctx.sock;
        (sock.family as i32, sock.type_ as i32)
    };
    if (family == AF_INET || family == AF_INET6) && kind & SOCK_TYPE_MASK == SOCK_RAW {
        return check(guard::RAW_SOCKET, socket_detail(family, kind));
    }
    ALLOW
}

/// Packet sockets (raw IP sockets are [`guard_sock_create`]'s).
#[lsm_cgroup(hook = "socket_create")]
pub fn guard_socket_create(ctx: LsmContext) -> i32 {
    // socket_create(int family, int type, int protocol, int kern)
    let family: i32 = ctx.arg(0);
    let kind: i32 = ctx.arg(1);
    let kern: i32 = ctx.arg(3);
    if kern != 0 || family != AF_PACKET {
        return ALLOW;
    }
    check(guard::PACKET_SOCKET, socket_detail(family, kind))
}

#[lsm_cgroup(hook = "bpf")]
pub fn guard_bpf(ctx: LsmContext) -> i32 {
    // bpf(int cmd, union bpf_attr *attr, unsigned int size[, bool kernel])
    let cmd: i32 = ctx.arg(0);
    check(guard::BPF, cmd as u16)
}

#[lsm_cgroup(hook = "perf_event_open")]
pub fn guard_perf_event_open(ctx: LsmContext) -> i32 {
    // perf_event_open(struct perf_event_attr *attr, int type)
    let kind: i32 = ctx.arg(1);
    check(guard::PERF_EVENT, kind as u16)
}

/// Mounts count only once the kernel's own program runs: the runtime's setup of the
/// container (its mounts included) happens in the kernel's cgroup before that.
#[inline(always)]
fn check_mount(which: u16) -> i32 {
    if !armed(current_kernel()) {
        return ALLOW;
    }
    check(guard::MOUNT, which)
}

/// Whether `kernel`'s own program has run (its mounts count from then on).
#[inline(always)]
fn armed(kernel: CgroupId) -> bool {
    // SAFETY: the value is plain data the map owns.
    unsafe { POLICY_GUARDS_ARMED.get(&kernel) }.is_some()
}

#[lsm_cgroup(hook = "sb_mount")]
pub fn guard_sb_mount(_ctx: LsmContext) -> i32 {
    check_mount(0)
}

#[lsm_cgroup(hook = "move_mount")]
pub fn guard_move_mount(_ctx: LsmContext) -> i32 {
    check_mount(1)
}

#[lsm_cgroup(hook = "sb_umount")]
pub fn guard_sb_umount(_ctx: LsmContext) -> i32 {
    check_mount(2)
}

#[lsm_cgroup(hook = "kernel_module_request")]
pub fn guard_kernel_module_request(_ctx: LsmContext) -> i32 {
    check(guard::MODULE, 0)
}

#[lsm_cgroup(hook = "kernel_read_file")]
pub fn guard_kernel_read_file(ctx: LsmContext) -> i32 {
    // kernel_read_file(struct file *file, enum kernel_read_file_id id, bool contents)
    let id: i32 = ctx.arg(1);
    if id != READING_MODULE {
        return ALLOW;
    }
    check(guard::MODULE, 1)
}

#[lsm_cgroup(hook = "ptrace_access_check")]
pub fn guard_ptrace_access_check(ctx: LsmContext) -> i32 {
    // ptrace_access_check(struct task_struct *child, unsigned int mode)
    let child: *const u8 = ctx.arg(0);
    let mode: u32 = ctx.arg(1);
    let kernel = current_kernel();
    // SAFETY: the value is plain data the map owns.
    if unsafe { POLICY_KERNEL_GUARDS.get(&kernel) }.is_none() {
        return ALLOW;
    }
    match task_kernel(child) {
        Some(theirs) if theirs == kernel => ALLOW,
        // Offsets unknown: the rule cannot tell, so it stays out of the way.
        None => ALLOW,
        Some(_) => check(guard::PTRACE_OUTSIDE, mode as u16),
    }
}

#[inline(always)]
fn global(value: &u32) -> usize {
    // SAFETY: a plain read of a global the loader froze.
    unsafe { core::ptr::read_volatile(value) as usize }
}

/// The kernel `task` is in: its cgroup's ancestor at the kernels' level (0 when it is not
/// that deep), or `None` when the offsets are unknown or a read fails.
#[inline(always)]
fn task_kernel(task: *const u8) -> Option<CgroupId> {
    if global(&OFFSETS_KNOWN) == 0 || task.is_null() {
        return None;
    }
    let level = kernel_level();
    // SAFETY: reads through bpf_probe_read_kernel, which fails (never faults) on a bad address.
    unsafe {
        let css_set: *const u8 = bpf_probe_read_kernel(task.add(global(&OFFSET_TASK_CGROUPS)).cast()).ok()?;
        let cgroup: *const u8 = bpf_probe_read_kernel(css_set.add(global(&OFFSET_CSS_SET_DFL_CGRP)).cast()).ok()?;
        let depth: i32 = bpf_probe_read_kernel(cgroup.add(global(&OFFSET_CGROUP_LEVEL)).cast()).ok()?;
        if depth < level {
            return Some(0);
        }
        let slot = global(&OFFSET_CGROUP_ANCESTORS) + (level as usize & 0xff) * 8;
        let ancestor: *const u8 = bpf_probe_read_kernel(cgroup.add(slot).cast()).ok()?;
        let node: *const u8 = bpf_probe_read_kernel(ancestor.add(global(&OFFSET_CGROUP_KN)).cast()).ok()?;
        bpf_probe_read_kernel(node.add(global(&OFFSET_KERNFS_NODE_ID)).cast::<u64>()).ok()
    }
}

/// Arms a kernel's mount guardrail at the first program it executes (the runtime's own setup
/// is done by then); nothing of the kernel's has run yet.
#[btf_tracepoint(function = "sched_process_exec")]
pub fn guard_arm_on_exec(_ctx: BtfTracePointContext) -> i32 {
    let kernel = current_kernel();
    if kernel == 0 {
        return 0;
    }
    // SAFETY: the value is plain data the map owns.
    if unsafe { POLICY_KERNEL_GUARDS.get(&kernel) }.is_some() && !armed(kernel) {
        let _ = POLICY_GUARDS_ARMED.insert(&kernel, &1, u64::from(BPF_NOEXIST));
    }
    0
}

// Where the kernel refuses BPF LSM programs, syscall tracepoints observe the guarded calls: a
// call refused (`EPERM`/`EACCES`: the container runtime's seccomp profile or a missing
// capability) counts as denied, one that went through as monitored. They stop nothing.

/// Offsets in the `syscalls` tracepoints' records: after the common header and the syscall
/// number, `sys_enter_*` has the arguments and `sys_exit_*` the return value.
const SYSCALL_ARG0: usize = 16;
const SYSCALL_RET: usize = 16;
const EPERM: i64 = 1;
const EACCES: i64 = 13;

/// Whether `kernel` (0: the task is in no kernel) has `rule` on.
#[inline(always)]
fn guarded(kernel: CgroupId, rule: usize) -> bool {
    // SAFETY: the value is plain data the map owns.
    kernel != 0 && unsafe { POLICY_KERNEL_GUARDS.get(&kernel) }.is_some_and(|g| g.modes[rule & 7] != guard_mode::OFF)
}

/// Reports `kernel`'s call under `rule` when it guards it, with the outcome the syscall's
/// return value shows.
#[inline(always)]
fn observe(ctx: &TracePointContext, kernel: CgroupId, rule: usize, detail: u16) -> u32 {
    if !guarded(kernel, rule) {
        return 0;
    }
    // SAFETY: an offset inside the tracepoint's record.
    let ret: i64 = unsafe { ctx.read_at(SYSCALL_RET) }.unwrap_or(0);
    let outcome = if ret == -EPERM || ret == -EACCES { verdict::DENIED } else { verdict::MONITORED };
    record(kernel, rule, detail, outcome);
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_socket")]
pub fn guard_seen_socket_enter(ctx: TracePointContext) -> u32 {
    // SAFETY: offsets inside the tracepoint's record (family, type).
    let (family, kind) = unsafe {
        (ctx.read_at::<u64>(SYSCALL_ARG0).unwrap_or(0) as i32, ctx.read_at::<u64>(SYSCALL_ARG0 + 8).unwrap_or(0) as i32)
    };
    if family == AF_PACKET && guarded(current_kernel(), guard::PACKET_SOCKET) {
        let _ = GUARD_SOCKETS_PENDING.insert(&bpf_get_current_pid_tgid(), &socket_detail(family, kind), 0);
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_socket")]
pub fn guard_seen_socket(ctx: TracePointContext) -> u32 {
    let thread = bpf_get_current_pid_tgid();
    // SAFETY: the value is plain data the map owns.
    let Some(detail) = (unsafe { GUARD_SOCKETS_PENDING.get(&thread) }).copied() else {
        return 0;
    };
    let _ = GUARD_SOCKETS_PENDING.remove(&thread);
    observe(&ctx, current_kernel(), guard::PACKET_SOCKET, detail)
}

#[tracepoint(category = "syscalls", name = "sys_exit_bpf")]
pub fn guard_seen_bpf(ctx: TracePointContext) -> u32 {
    observe(&ctx, current_kernel(), guard::BPF, 0)
}

#[tracepoint(category = "syscalls", name = "sys_exit_perf_event_open")]
pub fn guard_seen_perf_event_open(ctx: TracePointContext) -> u32 {
    observe(&ctx, current_kernel(), guard::PERF_EVENT, 0)
}

/// Mounts as [`check_mount`] counts them: once the kernel's own program runs.
#[inline(always)]
fn observe_mount(ctx: &TracePointContext, which: u16) -> u32 {
    let kernel = current_kernel();
    if !armed(kernel) {
        return 0;
    }
    observe(ctx, kernel, guard::MOUNT, which)
}

#[tracepoint(category = "syscalls", name = "sys_exit_mount")]
pub fn guard_seen_mount(ctx: TracePointContext) -> u32 {
    observe_mount(&ctx, 0)
}

#[tracepoint(category = "syscalls", name = "sys_exit_move_mount")]
pub fn guard_seen_move_mount(ctx: TracePointContext) -> u32 {
    observe_mount(&ctx, 1)
}

#[tracepoint(category = "syscalls", name = "sys_exit_umount")]
pub fn guard_seen_umount(ctx: TracePointContext) -> u32 {
    observe_mount(&ctx, 2)
}
