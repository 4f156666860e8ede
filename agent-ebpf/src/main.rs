//! The eBPF programs: per-cgroup CPU time from `sched_switch` and network bytes and
//! packets from `cgroup_skb`, counted into per-CPU maps that user space sums.
//!
//! Only cgroups that user space registered (a key in `CGROUP_COUNTERS`) are counted:
//! the hot paths do one lookup and never insert.
#![no_std]
#![no_main]

use agent_common::{CgroupCounters, MAX_TRACKED_CGROUPS};
use aya_ebpf::{
    helpers::generated::{bpf_get_current_cgroup_id, bpf_ktime_get_ns, bpf_skb_cgroup_id},
    macros::{btf_tracepoint, cgroup_skb, map},
    maps::{PerCpuArray, PerCpuHashMap},
    programs::{BtfTracePointContext, SkBuffContext},
};

#[map]
static CGROUP_COUNTERS: PerCpuHashMap<u64, CgroupCounters> =
    PerCpuHashMap::with_max_entries(MAX_TRACKED_CGROUPS, 0);

#[map]
static LAST_SWITCH_NS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The root of the unified hierarchy always has id 1.
const ROOT_CGROUP_ID: u64 = 1;

/// Charges the slice that just ended to the outgoing task's cgroup.
///
/// In `tp_btf/sched_switch` the current task is still `prev`, so
/// `bpf_get_current_cgroup_id()` names the cgroup that used the CPU until now.
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(_ctx: BtfTracePointContext) -> i32 {
    // SAFETY: helpers without pointer arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(last) = LAST_SWITCH_NS.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: a per-CPU slot, only this CPU writes it and preemption is off here.
    let previous = unsafe { core::ptr::replace(last, now) };
    if previous == 0 || now <= previous {
        return 0;
    }
    // SAFETY: no arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // The idle task and host daemons sit in the root cgroup, never a kernel's: skip
    // the hash lookup for the most common switch of all.
    if cgroup_id == ROOT_CGROUP_ID {
        return 0;
    }
    if let Some(counters) = CGROUP_COUNTERS.get_ptr_mut(cgroup_id) {
        // SAFETY: this CPU's copy of a value that lives as long as the map entry.
        unsafe { (*counters).cpu_ns += now - previous };
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
    let Some(counters) = CGROUP_COUNTERS.get_ptr_mut(cgroup_id) else {
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
