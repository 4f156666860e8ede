//! The enforcement programs: per-kernel network policy on the socket-address hooks
//! (`connect`, `sendmsg`, `getpeername`), the metadata address denied or redirected to the
//! agent's metadata service, CIDR deny and allow lists, and a `cgroup_skb` egress backstop for
//! what those hooks never see (raw sockets, ICMP). Attached once, with `BPF_F_ALLOW_MULTI`, to
//! the parent of every kernel's cgroup, so that a kernel is covered from its first
//! instruction; a kernel is found by its own cgroup directory (`{cgroup-parent}/{kernel_id}`),
//! an ancestor of every process in it.
#![no_std]
#![no_main]

use agent_common::{
    CgroupId,
    policy::{
        DENIAL_REPORT_NS, DENIALS_BYTES, DENIALS_SEEN_MAX, DEVICE_ANY, DEVICES_MAX, Denial, DenialKey, DeviceKey,
        EGRESS_CAPS_MAX, EGRESS_HORIZON_NS, EgressCap, KERNEL_POLICIES_MAX, KernelPolicy, NodePolicy, RULES_MAX, Rule,
        RuleKey, RuleKey4, VERDICTS_MAX, VerdictKey, action, flags, hook, is_loopback, is_v4_mapped, metadata_mode,
        rule_id, v4_mapped, verdict,
    },
};
use aya_ebpf::{
    bindings::{BPF_NOEXIST, bpf_sock},
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_ktime_get_ns, bpf_sk_fullsock, bpf_skb_ancestor_cgroup_id,
    },
    macros::{cgroup_device, cgroup_skb, cgroup_sock_addr, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf, lpm_trie::Key},
    programs::{DeviceContext, SkBuffContext, SockAddrContext},
};

#[map]
static NODE_POLICY: Array<NodePolicy> = Array::with_max_entries(1, 0);

#[map]
static KERNEL_POLICIES: HashMap<CgroupId, KernelPolicy> = HashMap::with_max_entries(KERNEL_POLICIES_MAX, 0);

#[map]
static POLICY_RULES: LpmTrie<RuleKey, Rule> = LpmTrie::with_max_entries(RULES_MAX, 0);

#[map]
static POLICY_RULES4: LpmTrie<RuleKey4, Rule> = LpmTrie::with_max_entries(RULES_MAX, 0);

#[map]
static POLICY_VERDICTS: PerCpuHashMap<VerdictKey, u64> = PerCpuHashMap::with_max_entries(VERDICTS_MAX, 0);

#[map]
static POLICY_DENIALS: RingBuf = RingBuf::with_byte_size(DENIALS_BYTES, 0);

#[map]
static POLICY_DENIALS_SEEN: LruHashMap<DenialKey, u64> = LruHashMap::with_max_entries(DENIALS_SEEN_MAX, 0);

#[map]
static POLICY_DENIALS_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[map]
static POLICY_EGRESS_CAPS: HashMap<CgroupId, EgressCap> = HashMap::with_max_entries(EGRESS_CAPS_MAX, 0);

#[map]
static POLICY_DEVICES: HashMap<DeviceKey, u32> = HashMap::with_max_entries(DEVICES_MAX, 0);

/// The cgroup level of the kernels' own directories (agent_common::policy::KERNEL_LEVEL_GLOBAL).
#[unsafe(no_mangle)]
static KERNEL_CGROUP_LEVEL: u32 = 2;

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;
const SOCK_RAW: u32 = 3;

/// Where a socket wants to send.
struct Destination {
    addr: [u8; 16],
    port: u16,
    protocol: u8,
}

enum Decision {
    Allow,
    Deny,
    /// To the metadata service at the node's redirect target.
    Redirect(&'static NodePolicy),
}

#[inline(always)]
fn kernel_level() -> i32 {
    // SAFETY: a plain read of a global the loader froze.
    unsafe { core::ptr::read_volatile(&KERNEL_CGROUP_LEVEL) as i32 }
}

/// The current task's kernel: its own cgroup directory's id, or 0 outside any.
#[inline(always)]
fn current_kernel() -> CgroupId {
    // SAFETY: no pointers.
    unsafe { bpf_get_current_ancestor_cgroup_id(kernel_level()) }
}

#[inline(always)]
fn count(kernel: CgroupId, rule: u32, outcome: u8, at: u8) {
    let key = VerdictKey { kernel, rule, verdict: outcome, hook: at, _pad: [0; 2] };
    match POLICY_VERDICTS.get_ptr_mut(&key) {
        // SAFETY: this CPU's copy of the counter.
        Some(counter) => unsafe { *counter += 1 },
        None => {
            // A full map loses the count, never the verdict.
            let _ = POLICY_VERDICTS.insert(&key, &1, u64::from(BPF_NOEXIST));
        }
    }
}

/// Reports a denial, at most once per kernel and destination per minute.
#[inline(always)]
fn report(kernel: CgroupId, dest: &Destination, rule: u32, at: u8) {
    let key = DenialKey { kernel, addr: dest.addr, port: dest.port, protocol: dest.protocol, _pad: [0; 5] };
    // SAFETY: no pointers.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: the value is a plain u64 the map owns.
    if let Some(last) = unsafe { POLICY_DENIALS_SEEN.get(&key) }
        && now.wrapping_sub(*last) < DENIAL_REPORT_NS
    {
        return;
    }
    let _ = POLICY_DENIALS_SEEN.insert(&key, &now, 0);
    let denial = Denial { kernel, addr: dest.addr, rule, port: dest.port, protocol: dest.protocol, hook: at };
    if POLICY_DENIALS.output::<Denial>(&denial, 0).is_err()
        && let Some(lost) = POLICY_DENIALS_LOST.get_ptr_mut(0)
    {
        // SAFETY: this CPU's copy of the counter.
        unsafe { *lost += 1 };
    }
}

#[inline(always)]
fn deny(kernel: CgroupId, dest: &Destination, rule: u32, at: u8) -> Decision {
    count(kernel, rule, verdict::DENIED, at);
    report(kernel, dest, rule, at);
    Decision::Deny
}

/// The rule of `list` whose CIDR is the longest that holds the destination, if its ports and
/// protocol are the destination's too.
#[inline(always)]
fn matching_rule(list: u32, dest: &Destination) -> Option<&'static Rule> {
    let rule = if is_v4_mapped(&dest.addr) {
        let addr = [dest.addr[12], dest.addr[13], dest.addr[14], dest.addr[15]];
        POLICY_RULES4.get(&Key::new(32 + 32, RuleKey4 { list: list.to_be_bytes(), addr }))?
    } else {
        POLICY_RULES.get(&Key::new(32 + 128, RuleKey { list: list.to_be_bytes(), addr: dest.addr }))?
    };
    let port_matches = rule.port_lo <= dest.port && dest.port <= rule.port_hi;
    let protocol_matches = rule.protocol == 0 || rule.protocol == dest.protocol;
    if port_matches && protocol_matches { Some(rule) } else { None }
}

#[inline(always)]
fn same_addr(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let mut i = 0;
    while i < 16 {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// The verdict on one destination of one kernel: the metadata address is denied or redirected;
/// loopback passes any rule; a deny rule of the node's list or the kernel's denies; an allow
/// list (the node's, the kernel's, or both) must hold the destination.
#[inline(always)]
fn decide(kernel: CgroupId, dest: &Destination, at: u8) -> Decision {
    let Some(node) = NODE_POLICY.get(0) else {
        return Decision::Allow;
    };
    if node.metadata_mode != metadata_mode::ALLOW
        && same_addr(&dest.addr, &node.metadata_addr)
        && (node.metadata_port == 0 || node.metadata_port == dest.port)
    {
        if node.metadata_mode == metadata_mode::REDIRECT && at == hook::CONNECT && dest.protocol == IPPROTO_TCP {
            count(kernel, rule_id::METADATA, verdict::REDIRECTED, at);
            return Decision::Redirect(node);
        }
        return deny(kernel, dest, rule_id::METADATA, at);
    }
    if is_loopback(&dest.addr) {
        return Decision::Allow;
    }
    let node_rule = if node.flags & flags::HAS_RULES != 0 { matching_rule(0, dest) } else { None };
    // Most nodes give no kernel rules of its own: then no kernel is looked up.
    let own = if node.flags & flags::KERNEL_RULES != 0 {
        // SAFETY: the value is plain data the map owns.
        unsafe { KERNEL_POLICIES.get(&kernel) }
    } else {
        None
    };
    let kernel_rule = match own {
        Some(own) if own.flags & flags::HAS_RULES != 0 => matching_rule(own.list, dest),
        _ => None,
    };
    if let Some(rule) = node_rule
        && rule.action == action::DENY
    {
        return deny(kernel, dest, rule.id, at);
    }
    if let Some(rule) = kernel_rule
        && rule.action == action::DENY
    {
        return deny(kernel, dest, rule.id, at);
    }
    let allowed_by = |rule: Option<&Rule>| matches!(rule, Some(rule) if rule.action == action::ALLOW);
    if node.flags & flags::ALLOW_LIST != 0 && !allowed_by(node_rule) {
        return deny(kernel, dest, rule_id::NOT_ALLOWED, at);
    }
    if let Some(own) = own
        && own.flags & flags::ALLOW_LIST != 0
        && !allowed_by(kernel_rule)
    {
        return deny(kernel, dest, rule_id::NOT_ALLOWED, at);
    }
    if let Some(rule) = node_rule {
        count(kernel, rule.id, verdict::ALLOWED, at);
    }
    if let Some(rule) = kernel_rule {
        count(kernel, rule.id, verdict::ALLOWED, at);
    }
    Decision::Allow
}

/// A socket address's destination: `user_ip4` and `user_port` hold network-order bytes.
#[inline(always)]
fn destination4(ctx: &SockAddrContext) -> Destination {
    // SAFETY: fields of the program's own context, read with the widths the verifier allows.
    let (ip, port, protocol) = unsafe {
        let sa = &*ctx.sock_addr;
        (sa.user_ip4, sa.user_port, sa.protocol)
    };
    Destination { addr: v4_mapped(ip.to_ne_bytes()), port: u16::from_be(port as u16), protocol: protocol as u8 }
}

#[inline(always)]
fn destination6(ctx: &SockAddrContext) -> Destination {
    // SAFETY: as in destination4; user_ip6 is read one 32-bit word at a time.
    let (words, port, protocol) = unsafe {
        let sa = &*ctx.sock_addr;
        (
            [
                core::ptr::read_volatile(&sa.user_ip6[0]),
                core::ptr::read_volatile(&sa.user_ip6[1]),
                core::ptr::read_volatile(&sa.user_ip6[2]),
                core::ptr::read_volatile(&sa.user_ip6[3]),
            ],
            sa.user_port,
            sa.protocol,
        )
    };
    let mut addr = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let bytes = words[i].to_ne_bytes();
        addr[i * 4] = bytes[0];
        addr[i * 4 + 1] = bytes[1];
        addr[i * 4 + 2] = bytes[2];
        addr[i * 4 + 3] = bytes[3];
        i += 1;
    }
    Destination { addr, port: u16::from_be(port as u16), protocol: protocol as u8 }
}

/// The 32-bit words of an address as `user_ip6` holds them.
#[inline(always)]
fn words(addr: &[u8; 16], i: usize) -> u32 {
    u32::from_ne_bytes([addr[i * 4], addr[i * 4 + 1], addr[i * 4 + 2], addr[i * 4 + 3]])
}

#[inline(always)]
fn port_field(port: u16) -> u32 {
    u32::from(port.to_be())
}

/// Rewrites a socket address (the `connect` destination, or the peer `getpeername` shows):
/// `addr` is v4-mapped when the socket is IPv4.
#[inline(always)]
fn rewrite_address(ctx: &SockAddrContext, addr: &[u8; 16], port: u16, v6: bool) {
    // SAFETY: writes of the fields the verifier lets connect and getpeername programs rewrite.
    unsafe {
        let sa = &mut *ctx.sock_addr;
        if v6 {
            sa.user_ip6[0] = words(addr, 0);
            sa.user_ip6[1] = words(addr, 1);
            sa.user_ip6[2] = words(addr, 2);
            sa.user_ip6[3] = words(addr, 3);
        } else {
            sa.user_ip4 = words(addr, 3);
        }
        sa.user_port = port_field(port);
    }
}

/// Runs the policy on a socket-address hook: 1 lets the call go on, 0 fails it with `EPERM`.
#[inline(always)]
fn sock_addr_verdict(ctx: &SockAddrContext, dest: &Destination, at: u8, v6: bool) -> i32 {
    match decide(current_kernel(), dest, at) {
        Decision::Allow => 1,
        Decision::Deny => 0,
        Decision::Redirect(node) => {
            rewrite_address(ctx, &node.redirect_addr, node.redirect_port, v6);
            1
        }
    }
}

#[cgroup_sock_addr(connect4)]
pub fn policy_connect4(ctx: SockAddrContext) -> i32 {
    let dest = destination4(&ctx);
    sock_addr_verdict(&ctx, &dest, hook::CONNECT, false)
}

#[cgroup_sock_addr(connect6)]
pub fn policy_connect6(ctx: SockAddrContext) -> i32 {
    let dest = destination6(&ctx);
    sock_addr_verdict(&ctx, &dest, hook::CONNECT, true)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn policy_sendmsg4(ctx: SockAddrContext) -> i32 {
    let dest = destination4(&ctx);
    sock_addr_verdict(&ctx, &dest, hook::SENDMSG, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn policy_sendmsg6(ctx: SockAddrContext) -> i32 {
    let dest = destination6(&ctx);
    sock_addr_verdict(&ctx, &dest, hook::SENDMSG, true)
}

/// A redirected connection's peer reads as the metadata address, not the agent's.
#[inline(always)]
fn hide_redirect(ctx: &SockAddrContext, peer: &Destination, v6: bool) -> i32 {
    let Some(node) = NODE_POLICY.get(0) else {
        return 1;
    };
    if node.metadata_mode != metadata_mode::REDIRECT
        || peer.port != node.redirect_port
        || !same_addr(&peer.addr, &node.redirect_addr)
    {
        return 1;
    }
    rewrite_address(ctx, &node.metadata_addr, node.metadata_port, v6);
    1
}

#[cgroup_sock_addr(getpeername4)]
pub fn policy_getpeername4(ctx: SockAddrContext) -> i32 {
    let peer = destination4(&ctx);
    hide_redirect(&ctx, &peer, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn policy_getpeername6(ctx: SockAddrContext) -> i32 {
    let peer = destination6(&ctx);
    hide_redirect(&ctx, &peer, true)
}

/// The backstop: packets of raw sockets and ICMP (ping sockets included), which no
/// socket-address hook sees, meet the same rules on their way out; a denied one is dropped
/// (its sender gets `EPERM`). TCP and UDP from ordinary sockets were decided at `connect` /
/// `sendmsg` and pass untouched, so replies to inbound connections never meet an allow list.
#[cgroup_skb(egress)]
pub fn policy_skb_egress(ctx: SkBuffContext) -> i32 {
    let kernel = || {
        // SAFETY: the context's skb pointer is what the kernel handed the program.
        unsafe { bpf_skb_ancestor_cgroup_id(ctx.skb.skb.cast(), kernel_level()) }
    };
    if let Some(dest) = skb_destination(&ctx)
        && !matches!(decide(kernel(), &dest, hook::EGRESS), Decision::Allow)
    {
        return 0;
    }
    match NODE_POLICY.get(0) {
        Some(node) if node.flags & flags::PACING != 0 => pace(&ctx, kernel()),
        _ => 1,
    }
}

/// The interface index of loopback in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
/// `cgroup_skb` egress verdicts: let the packet go, or drop it and tell TCP it met congestion.
const PASS: i32 = 1;
const DROP_CONGESTED: i32 = 2;

/// Egress caps by Earliest Departure Time: each packet of a capped kernel gets the time it may
/// leave (the kernel's last departure plus its own length at the cap), which the `fq` qdisc on
/// the kernel's interfaces holds it to. A packet that would wait past the horizon is dropped.
/// Loopback is never paced.
#[inline(always)]
fn pace(ctx: &SkBuffContext, kernel: CgroupId) -> i32 {
    let Some(cap) = POLICY_EGRESS_CAPS.get_ptr_mut(&kernel) else {
        return PASS;
    };
    // SAFETY: fields of the program's own context; `cap` is the map's value for this kernel.
    unsafe {
        let skb = &mut *ctx.skb.skb;
        let rate = (*cap).bytes_per_sec;
        if skb.ifindex == LOOPBACK_IFINDEX || rate == 0 {
            return PASS;
        }
        let now = bpf_ktime_get_ns();
        let earliest = if skb.tstamp > now { skb.tstamp } else { now };
        let delay = u64::from(skb.len).wrapping_mul(1_000_000_000) / rate;
        let next = core::ptr::read_volatile(&(*cap).next_departure_ns) + delay;
        if next <= earliest {
            core::ptr::write_volatile(&mut (*cap).next_departure_ns, earliest);
            return PASS;
        }
        if next - now >= EGRESS_HORIZON_NS {
            return DROP_CONGESTED;
        }
        core::ptr::write_volatile(&mut (*cap).next_departure_ns, next);
        skb.tstamp = next;
    }
    PASS
}

/// The destination of a packet the backstop covers, or `None` for any other.
#[inline(always)]
fn skb_destination(ctx: &SkBuffContext) -> Option<Destination> {
    let first: u8 = ctx.load(0).ok()?;
    let v4 = match first >> 4 {
        4 => true,
        6 => false,
        _ => return None,
    };
    let protocol: u8 = ctx.load(if v4 { 9 } else { 6 }).ok()?;
    // Most packets leave here, before any address is read.
    if protocol != IPPROTO_ICMP && protocol != IPPROTO_ICMPV6 && !from_raw_socket(ctx) {
        return None;
    }
    let (addr, l4) = if v4 {
        (v4_mapped(ctx.load::<[u8; 4]>(16).ok()?), usize::from(first & 0x0f) * 4)
    } else {
        (ctx.load::<[u8; 16]>(24).ok()?, 40)
    };
    let port = if protocol == IPPROTO_TCP || protocol == IPPROTO_UDP {
        // The destination port follows the source port.
        u16::from_be(ctx.load::<u16>(l4 + 2).unwrap_or(0))
    } else {
        0
    };
    Some(Destination { addr, port, protocol })
}

/// Whether the packet's socket is a raw one.
#[inline(always)]
fn from_raw_socket(ctx: &SkBuffContext) -> bool {
    // SAFETY: the context's socket pointer, checked for null, then made a full socket by
    // the helper (null when it is not one).
    unsafe {
        let sk: *mut bpf_sock = (*ctx.skb.skb).__bindgen_anon_2.sk;
        if sk.is_null() {
            return false;
        }
        let full = bpf_sk_fullsock(sk);
        !full.is_null() && (*full).type_ == SOCK_RAW
    }
}

/// Device access: a kernel under device enforcement opens, reads, writes and makes only the
/// device nodes of the standard container set (list 0) and those given to it (its own list);
/// anything else fails with `EPERM`. Attached at the kernels' parent, beside any program the
/// runtime puts on a container's own cgroup (every attached program must allow), so that a
/// `docker update`, which replaces the runtime's, never touches it.
#[cgroup_device]
pub fn policy_device(ctx: DeviceContext) -> i32 {
    let kernel = current_kernel();
    // SAFETY: the value is plain data the map owns.
    let Some(own) = (unsafe { KERNEL_POLICIES.get(&kernel) }) else {
        return 1;
    };
    if own.flags & flags::DEVICES == 0 {
        return 1;
    }
    // SAFETY: fields of the program's own context.
    let (access_type, major, minor) = unsafe {
        let dev = &*ctx.device;
        (dev.access_type, dev.major, dev.minor)
    };
    let kind = access_type & 0xffff;
    let wanted = access_type >> 16;
    if wanted & !(granted(0, kind, major, minor) | granted(own.list, kind, major, minor)) == 0 {
        return 1;
    }
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&kind.to_ne_bytes());
    addr[4..8].copy_from_slice(&major.to_ne_bytes());
    addr[8..12].copy_from_slice(&minor.to_ne_bytes());
    let dest = Destination { addr, port: wanted as u16, protocol: 0 };
    deny(kernel, &dest, rule_id::DEVICE_NOT_GIVEN, hook::DEVICE);
    0
}

/// The access a list gives to a device: its own entry's, its major's, its kind's.
#[inline(always)]
fn granted(list: u32, kind: u32, major: u32, minor: u32) -> u32 {
    let lookup = |major: u32, minor: u32| {
        let key = DeviceKey { list, kind, major, minor };
        // SAFETY: the value is a plain u32 the map owns.
        unsafe { POLICY_DEVICES.get(&key) }.copied().unwrap_or(0)
    };
    lookup(major, minor) | lookup(major, DEVICE_ANY) | lookup(DEVICE_ANY, DEVICE_ANY)
}

/// An empty program on the same hook, loaded only by the benchmark: what any `connect4`
/// program costs, so the policy's own cost can be told apart.
#[cgroup_sock_addr(connect4)]
pub fn baseline_connect4(_ctx: SockAddrContext) -> i32 {
    1
}

mod guard;
mod runtime;
