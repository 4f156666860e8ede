//! The enforcement programs' maps (the second eBPF object, `agent-policy`): per-kernel policy,
//! the CIDR rule trie, verdict counters and denial reports.
//!
//! Every address is handled as IPv6: an IPv4 address is its v4-mapped form (`::ffff:a.b.c.d`),
//! so one trie and one lookup serve both families, and a v4-mapped destination of an IPv6
//! socket meets the same rules as the IPv4 one.

use crate::CgroupId;

/// `Array<NodePolicy>` of one entry: the node's settings (metadata address and mode, node
/// lists), written by user space.
pub const NODE_POLICY_MAP: &str = "NODE_POLICY";
/// `HashMap<CgroupId, KernelPolicy>` by the id of a kernel's own cgroup directory
/// (`{cgroup-parent}/{kernel_id}`); a kernel without an entry gets the node's policy alone.
pub const KERNEL_POLICIES_MAP: &str = "KERNEL_POLICIES";
/// `LpmTrie<RuleKey, Rule>`: the CIDR rules of every list (list 0: the node's) for IPv6
/// destinations that are not v4-mapped.
pub const RULES_MAP: &str = "POLICY_RULES";
/// `LpmTrie<RuleKey4, Rule>`: the same lists for IPv4 destinations (and v4-mapped IPv6 ones):
/// a key of 64 bits, not 160, is what a `connect` to an IPv4 address walks.
pub const RULES4_MAP: &str = "POLICY_RULES4";
/// `PerCpuHashMap<VerdictKey, u64>`: verdicts per kernel, rule, verdict and hook.
pub const VERDICTS_MAP: &str = "POLICY_VERDICTS";
/// `RingBuf` of [`Denial`]s, at most one per kernel and destination per [`DENIAL_REPORT_NS`].
pub const DENIALS_MAP: &str = "POLICY_DENIALS";
/// `LruHashMap<DenialKey, u64>`: when each destination's denial was last reported.
pub const DENIALS_SEEN_MAP: &str = "POLICY_DENIALS_SEEN";
/// `PerCpuArray<u64>` of one: denial reports dropped because the ring buffer was full.
pub const DENIALS_LOST_MAP: &str = "POLICY_DENIALS_LOST";
/// `HashMap<DeviceKey, u32>`: the device nodes each list gives ([`device_access`] bits); list
/// 0 is the standard container set every kernel gets, a kernel's own list its given devices.
pub const DEVICES_MAP: &str = "POLICY_DEVICES";
/// `HashMap<CgroupId, EgressCap>`: the kernels whose egress is paced, by their own cgroup.
pub const EGRESS_CAPS_MAP: &str = "POLICY_EGRESS_CAPS";

/// `HashMap<CgroupId, KernelGuards>`: each kernel's guardrail modes (a kernel without an
/// entry has none).
pub const KERNEL_GUARDS_MAP: &str = "POLICY_KERNEL_GUARDS";
/// `HashMap<CgroupId, u32>`: kernels whose first program has been executed (the runtime's
/// own setup, mounts included, is done); written by the exec tracepoint, removed by user space
/// when a kernel's container is (re)made.
pub const GUARDS_ARMED_MAP: &str = "POLICY_GUARDS_ARMED";

/// Globals the loader sets from the running kernel's BTF: where a task's cgroup is.
pub mod offsets {
    pub const TASK_CGROUPS: &str = "OFFSET_TASK_CGROUPS";
    pub const CSS_SET_DFL_CGRP: &str = "OFFSET_CSS_SET_DFL_CGRP";
    pub const CGROUP_LEVEL: &str = "OFFSET_CGROUP_LEVEL";
    pub const CGROUP_ANCESTORS: &str = "OFFSET_CGROUP_ANCESTORS";
    pub const CGROUP_KN: &str = "OFFSET_CGROUP_KN";
    pub const KERNFS_NODE_ID: &str = "OFFSET_KERNFS_NODE_ID";
    /// 1 when the offsets above were read; 0 makes the ptrace rule stay out of the way.
    pub const KNOWN: &str = "OFFSETS_KNOWN";
}

/// Global the loader sets: the cgroup level of the kernels' own directories
/// (`{cgroup-parent}/{kernel_id}`; the root is level 0).
pub const KERNEL_LEVEL_GLOBAL: &str = "KERNEL_CGROUP_LEVEL";

pub const VERDICTS_MAX: u32 = 65_536;
pub const KERNEL_POLICIES_MAX: u32 = 16_384;
pub const RULES_MAX: u32 = 65_536;
pub const DENIALS_BYTES: u32 = 64 * 1024;
pub const DENIALS_SEEN_MAX: u32 = 16_384;
pub const DEVICES_MAX: u32 = 16_384;
pub const EGRESS_CAPS_MAX: u32 = 16_384;
pub const KERNEL_GUARDS_MAX: u32 = 16_384;
/// A packet that would leave later than this from now is dropped (with congestion notice)
/// instead of queued: the queue a capped kernel can build stays bounded.
pub const EGRESS_HORIZON_NS: u64 = 2_000_000_000;
/// A denied destination is reported at most once per kernel per minute.
pub const DENIAL_REPORT_NS: u64 = 60_000_000_000;

/// Bumped whenever a policy map's key or value changes meaning.
pub const POLICY_LAYOUT_VERSION: u32 = 1;

/// Program names in the `agent-policy` object.
pub mod programs {
    pub const CONNECT4: &str = "policy_connect4";
    pub const CONNECT6: &str = "policy_connect6";
    pub const SENDMSG4: &str = "policy_sendmsg4";
    pub const SENDMSG6: &str = "policy_sendmsg6";
    pub const GETPEERNAME4: &str = "policy_getpeername4";
    pub const GETPEERNAME6: &str = "policy_getpeername6";
    pub const SKB_EGRESS: &str = "policy_skb_egress";
    pub const DEVICE: &str = "policy_device";
    pub const GUARD_SOCK_CREATE: &str = "guard_sock_create";
    pub const GUARD_SOCKET_CREATE: &str = "guard_socket_create";
    pub const GUARD_BPF: &str = "guard_bpf";
    pub const GUARD_PERF_EVENT_OPEN: &str = "guard_perf_event_open";
    pub const GUARD_SB_MOUNT: &str = "guard_sb_mount";
    pub const GUARD_MOVE_MOUNT: &str = "guard_move_mount";
    pub const GUARD_SB_UMOUNT: &str = "guard_sb_umount";
    pub const GUARD_MODULE_REQUEST: &str = "guard_kernel_module_request";
    pub const GUARD_READ_FILE: &str = "guard_kernel_read_file";
    pub const GUARD_PTRACE: &str = "guard_ptrace_access_check";
    /// The exec tracepoint that arms a kernel's mount guardrail.
    pub const GUARD_ARM: &str = "guard_arm_on_exec";
    /// Where BPF LSM cannot run: syscall tracepoints that observe (count and report) the
    /// guarded calls and their outcome, as (program, tracepoint in `syscalls`, guardrail).
    pub const GUARD_OBSERVERS: [(&str, &str, usize); 7] = [
        ("guard_seen_socket_enter", "sys_enter_socket", super::guard::PACKET_SOCKET),
        ("guard_seen_socket", "sys_exit_socket", super::guard::PACKET_SOCKET),
        ("guard_seen_bpf", "sys_exit_bpf", super::guard::BPF),
        ("guard_seen_perf_event_open", "sys_exit_perf_event_open", super::guard::PERF_EVENT),
        ("guard_seen_mount", "sys_exit_mount", super::guard::MOUNT),
        ("guard_seen_move_mount", "sys_exit_move_mount", super::guard::MOUNT),
        ("guard_seen_umount", "sys_exit_umount", super::guard::MOUNT),
    ];
    /// An empty `connect4` program, for the benchmark's baseline.
    pub const BASELINE_CONNECT4: &str = "baseline_connect4";
}

/// What the node does with connections to the metadata address.
pub mod metadata_mode {
    /// No special handling: the node's rules decide.
    pub const ALLOW: u32 = 0;
    /// Refused with `EPERM`.
    pub const DENY: u32 = 1;
    /// Rewritten to the agent's metadata service (TCP `connect` only; anything else is denied).
    pub const REDIRECT: u32 = 2;
}

/// [`NodePolicy::flags`] and [`KernelPolicy::flags`].
pub mod flags {
    /// The list has allow rules: a destination must match one of them.
    pub const ALLOW_LIST: u32 = 1;
    /// The list has rules at all (a list without any is never looked up).
    pub const HAS_RULES: u32 = 2;
    /// [`KernelPolicy::flags`]: the kernel opens only the device nodes given to it.
    pub const DEVICES: u32 = 4;
    /// [`NodePolicy::flags`]: some kernel has an egress cap (packets meet [`EGRESS_CAPS_MAP`]).
    ///
    /// [`EGRESS_CAPS_MAP`]: super::EGRESS_CAPS_MAP
    pub const PACING: u32 = 8;
    /// [`NodePolicy::flags`]: some kernel has network rules of its own (without it, a
    /// `connect` never looks its kernel up).
    pub const KERNEL_RULES: u32 = 16;
}

/// The node's settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodePolicy {
    /// The metadata address, v4-mapped when IPv4.
    pub metadata_addr: [u8; 16],
    /// The redirect target, v4-mapped (it is always an IPv4 address of the host).
    pub redirect_addr: [u8; 16],
    /// Host byte order; 0: every port of the metadata address.
    pub metadata_port: u16,
    pub redirect_port: u16,
    /// [`metadata_mode`].
    pub metadata_mode: u32,
    /// [`flags`] of list 0.
    pub flags: u32,
    pub _pad: u32,
}

/// A kernel's narrowing of the node's policy: its own rule list.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelPolicy {
    /// The kernel's list in [`RULES_MAP`] (never 0).
    pub list: u32,
    /// [`flags`] of that list.
    pub flags: u32,
}

/// Key data of [`RULES_MAP`]: the list (big-endian, so that it is the prefix's first bits),
/// then the address. The trie key's prefix length is 32 + the CIDR's (v4-mapped) length.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleKey {
    pub list: [u8; 4],
    pub addr: [u8; 16],
}

/// Key data of [`RULES4_MAP`]: the list (big-endian), then the IPv4 address; the prefix
/// length is 32 + the CIDR's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleKey4 {
    pub list: [u8; 4],
    pub addr: [u8; 4],
}

/// Whether an address is v4-mapped (`::ffff:a.b.c.d`): it meets the IPv4 rules.
#[inline(always)]
pub const fn is_v4_mapped(addr: &[u8; 16]) -> bool {
    let mut i = 0;
    while i < 10 {
        if addr[i] != 0 {
            return false;
        }
        i += 1;
    }
    addr[10] == 0xff && addr[11] == 0xff
}

/// [`Rule::action`].
pub mod action {
    pub const DENY: u8 = 1;
    pub const ALLOW: u8 = 2;
}

/// One CIDR's rule: it matches when the port (and protocol, when set) are its.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    /// Names the rule in counters: its index in the node list, or [`KERNEL_RULE`] | index.
    pub id: u32,
    /// Inclusive port range (host order); 0..=65535 for every port.
    pub port_lo: u16,
    pub port_hi: u16,
    /// [`action`].
    pub action: u8,
    /// 0: any; 6: TCP; 17: UDP; 1 / 58: ICMP.
    pub protocol: u8,
    pub _pad: [u8; 2],
}

/// Bit of [`Rule::id`] that marks a kernel's own rule.
pub const KERNEL_RULE: u32 = 1 << 31;
/// Rule ids of the built-in verdicts.
pub mod rule_id {
    /// The metadata address (denied or redirected).
    pub const METADATA: u32 = 0xffff_ff00;
    /// A destination no allow rule matched.
    pub const NOT_ALLOWED: u32 = 0xffff_ff01;
    /// A device node the kernel was not given.
    pub const DEVICE_NOT_GIVEN: u32 = 0xffff_ff02;
    /// Guardrail `n` ([`super::guard`]) is `GUARD_BASE + n`.
    pub const GUARD_BASE: u32 = 0xffff_fe00;
}

/// The guardrails, by their index in [`KernelGuards::modes`].
pub mod guard {
    /// `socket(AF_INET/AF_INET6, SOCK_RAW, …)`.
    pub const RAW_SOCKET: usize = 0;
    /// `socket(AF_PACKET, …)`.
    pub const PACKET_SOCKET: usize = 1;
    /// The `bpf()` system call.
    pub const BPF: usize = 2;
    /// `perf_event_open()`.
    pub const PERF_EVENT: usize = 3;
    /// `mount`, `move_mount`, `umount` (once the kernel's own program runs).
    pub const MOUNT: usize = 4;
    /// Loading a kernel module, explicitly or by request (`request_module`).
    pub const MODULE: usize = 5;
    /// `ptrace` of a process outside the kernel.
    pub const PTRACE_OUTSIDE: usize = 6;
    pub const COUNT: usize = 7;
    /// Names, as in `[policy.guardrails]` and metrics.
    pub const NAMES: [&str; COUNT] =
        ["raw-socket", "packet-socket", "bpf", "perf-event", "mount", "module", "ptrace-outside"];
}

/// [`KernelGuards::modes`] values.
pub mod guard_mode {
    pub const OFF: u8 = 0;
    /// Counted and logged; the call goes on.
    pub const MONITOR: u8 = 1;
    /// Denied with `EPERM`, counted and logged.
    pub const ENFORCE: u8 = 2;
}

/// A kernel's guardrails.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelGuards {
    /// [`guard_mode`] per [`guard`] index (the last byte is unused).
    pub modes: [u8; 8],
}

/// [`VerdictKey::verdict`].
pub mod verdict {
    pub const ALLOWED: u8 = 1;
    pub const DENIED: u8 = 2;
    pub const REDIRECTED: u8 = 3;
    /// A guardrail in monitor mode saw the call (and let it go on).
    pub const MONITORED: u8 = 4;
}

/// [`VerdictKey::hook`].
pub mod hook {
    pub const CONNECT: u8 = 1;
    pub const SENDMSG: u8 = 2;
    /// The `cgroup_skb` backstop (raw sockets, ICMP).
    pub const EGRESS: u8 = 3;
    /// The `cgroup_device` program (a [`Denial`] then holds a [`DeviceKey`]'s type, major and
    /// minor in `addr` and the access bits in `port`).
    pub const DEVICE: u8 = 4;
    /// A guardrail (a [`Denial`] then holds what was asked in `port`: the socket family and
    /// type as `family << 8 | type`, or the `bpf()` command, or the `ptrace` mode).
    pub const GUARD: u8 = 5;
}

/// [`DeviceKey::kind`], as the kernel's `BPF_DEVCG_DEV_*`.
pub mod device_kind {
    pub const BLOCK: u32 = 1;
    pub const CHAR: u32 = 2;
}

/// Access bits, as the kernel's `BPF_DEVCG_ACC_*` (`m`, `r`, `w`).
pub mod device_access {
    pub const MKNOD: u32 = 1;
    pub const READ: u32 = 2;
    pub const WRITE: u32 = 4;
}

/// A kernel's egress cap and its pacing state (Earliest Departure Time).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressCap {
    /// The cap, in bytes of IP packets per second (never 0 in the map).
    pub bytes_per_sec: u64,
    /// When the kernel's last paced packet leaves (monotonic ns); the next leaves after it.
    pub next_departure_ns: u64,
}

/// Stands for every major or every minor in a [`DeviceKey`].
pub const DEVICE_ANY: u32 = u32::MAX;

/// A device node (or a family of them) of one list.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DeviceKey {
    pub list: u32,
    /// [`device_kind`].
    pub kind: u32,
    pub major: u32,
    /// [`DEVICE_ANY`] for every minor of the major.
    pub minor: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VerdictKey {
    /// The kernel's own cgroup directory (0: a process outside any kernel's directory).
    pub kernel: CgroupId,
    pub rule: u32,
    pub verdict: u8,
    pub hook: u8,
    pub _pad: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DenialKey {
    pub kernel: CgroupId,
    pub addr: [u8; 16],
    pub port: u16,
    pub protocol: u8,
    pub _pad: [u8; 5],
}

/// One reported denial.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Denial {
    pub kernel: CgroupId,
    pub addr: [u8; 16],
    pub rule: u32,
    pub port: u16,
    pub protocol: u8,
    pub hook: u8,
}

/// `addr` as its v4-mapped IPv6 bytes.
#[inline(always)]
pub const fn v4_mapped(addr: [u8; 4]) -> [u8; 16] {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, addr[0], addr[1], addr[2], addr[3]]
}

/// Whether the destination is the kernel's own loopback (127.0.0.0/8, ::1, v4-mapped 127/8),
/// which no rule ever covers.
#[inline(always)]
pub const fn is_loopback(addr: &[u8; 16]) -> bool {
    let mut i = 0;
    let mut zero_prefix = true;
    while i < 10 {
        if addr[i] != 0 {
            zero_prefix = false;
        }
        i += 1;
    }
    if !zero_prefix {
        return false;
    }
    if addr[10] == 0xff && addr[11] == 0xff {
        return addr[12] == 127;
    }
    addr[10] == 0 && addr[11] == 0 && addr[12] == 0 && addr[13] == 0 && addr[14] == 0 && addr[15] == 1
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY (all): plain `#[repr(C)]` integers and byte arrays, padding spelled out as fields,
    // every bit pattern valid.
    unsafe impl aya::Pod for NodePolicy {}
    unsafe impl aya::Pod for KernelPolicy {}
    unsafe impl aya::Pod for RuleKey {}
    unsafe impl aya::Pod for RuleKey4 {}
    unsafe impl aya::Pod for Rule {}
    unsafe impl aya::Pod for VerdictKey {}
    unsafe impl aya::Pod for DenialKey {}
    unsafe impl aya::Pod for Denial {}
    unsafe impl aya::Pod for DeviceKey {}
    unsafe impl aya::Pod for EgressCap {}
    unsafe impl aya::Pod for KernelGuards {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_in_both_families() {
        assert!(is_loopback(&v4_mapped([127, 0, 0, 1])));
        assert!(is_loopback(&v4_mapped([127, 9, 9, 9])));
        let mut one = [0u8; 16];
        one[15] = 1;
        assert!(is_loopback(&one));
        assert!(!is_loopback(&v4_mapped([169, 254, 169, 254])));
        assert!(!is_loopback(&[0u8; 16]));
    }

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(core::mem::size_of::<NodePolicy>(), 48);
        assert_eq!(core::mem::size_of::<Rule>(), 12);
        assert_eq!(core::mem::size_of::<RuleKey>(), 20);
        assert_eq!(core::mem::size_of::<VerdictKey>(), 16);
        assert_eq!(core::mem::size_of::<DenialKey>(), 32);
        assert_eq!(core::mem::size_of::<Denial>(), 32);
    }
}
