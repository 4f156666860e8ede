//! Network rules as the programs read them: each CIDR of a list one trie entry, in the IPv4 trie
//! (64-bit keys) or the IPv6 one (160-bit keys), written and replaced without a gap.
//!
//! The lists mean what one trie over v4-mapped addresses would: an IPv6 rule whose range holds
//! v4-mapped addresses also stands in the IPv4 trie (as `0.0.0.0/0` when it holds all of them),
//! where a longer prefix still wins.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv6Addr},
};

use agent_common::policy::{Rule, RuleKey, RuleKey4, action, flags, hook, v4_mapped};
use aya::maps::{
    MapData,
    lpm_trie::{Key, LpmTrie},
};

use crate::config::{NetworkRule, Protocol, RuleLists};

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("rules `{first}` and `{second}` cover the same CIDR ({cidr}); a list holds one rule per CIDR")]
    SameCidr { first: String, second: String, cidr: String },
    #[error("writing rule `{name}`: {reason}")]
    Write { name: String, reason: String },
}

/// One trie entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub prefix_len: u32,
    pub key: TrieKey,
    pub rule: Rule,
    pub name: String,
}

/// Which trie an entry is in, and its key there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrieKey {
    V4(RuleKey4),
    V6(RuleKey),
}

/// The v4-mapped prefix `::ffff:0:0/96`.
const MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

/// The two tries the rules are written to.
pub struct Tries<'a> {
    pub v4: &'a mut LpmTrie<MapData, RuleKey4, Rule>,
    pub v6: &'a mut LpmTrie<MapData, RuleKey, Rule>,
}

/// The trie entries of `lists` as list `list`: deny rules first, ids from 1 in order, or'ed
/// with `id_bits` (a kernel's rules carry `KERNEL_RULE`).
pub fn encode(list: u32, lists: &RuleLists, id_bits: u32) -> Result<Vec<Entry>, RulesError> {
    let rules = lists.deny.iter().map(|r| (r, action::DENY)).chain(lists.allow.iter().map(|r| (r, action::ALLOW)));
    // Each rule in the v6 space first (one CIDR per list), then placed in its trie(s).
    let mut spans: Vec<([u8; 16], u8, Rule, &NetworkRule)> = Vec::new();
    for (index, (rule, what)) in rules.enumerate() {
        let (addr, prefix) = mapped(rule);
        let addr = masked(addr, prefix);
        if let Some((.., other)) = spans.iter().find(|(a, p, ..)| *a == addr && *p == prefix) {
            return Err(RulesError::SameCidr {
                first: other.name.clone(),
                second: rule.name.clone(),
                cidr: format!("{}/{}", rule.addr, rule.prefix),
            });
        }
        let id = u32::try_from(index + 1).unwrap_or(u32::MAX >> 1) | id_bits;
        let protocol = match rule.protocol {
            Protocol::Any => 0,
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Icmp if rule.addr.is_ipv4() => 1,
            Protocol::Icmp => 58,
        };
        let encoded = Rule { id, port_lo: rule.ports.0, port_hi: rule.ports.1, action: what, protocol, _pad: [0; 2] };
        spans.push((addr, prefix, encoded, rule));
    }
    let list_bytes = list.to_be_bytes();
    let mut entries: Vec<Entry> = Vec::new();
    // The IPv4 trie's `0.0.0.0/0` from IPv6 rules that hold every v4-mapped address: the
    // longest of them, unless an IPv4 rule (always longer) holds that key itself.
    let mut widest: Option<(u8, usize)> = None;
    for (i, (addr, prefix, encoded, rule)) in spans.iter().enumerate() {
        if *prefix >= 96 && addr[..12] == MAPPED_PREFIX {
            let v4 = RuleKey4 { list: list_bytes, addr: [addr[12], addr[13], addr[14], addr[15]] };
            entries.push(entry(TrieKey::V4(v4), 32 + u32::from(*prefix - 96), *encoded, rule));
            continue;
        }
        entries.push(entry(
            TrieKey::V6(RuleKey { list: list_bytes, addr: *addr }),
            32 + u32::from(*prefix),
            *encoded,
            rule,
        ));
        if *prefix < 96 && masked_bytes_equal(addr, &MAPPED_PREFIX, *prefix) && widest.is_none_or(|(p, _)| *prefix > p)
        {
            widest = Some((*prefix, i));
        }
    }
    let everything = TrieKey::V4(RuleKey4 { list: list_bytes, addr: [0; 4] });
    if let Some((_, i)) = widest
        && !entries.iter().any(|e| e.key == everything && e.prefix_len == 32)
    {
        let (_, _, encoded, rule) = &spans[i];
        entries.push(entry(everything, 32, *encoded, rule));
    }
    Ok(entries)
}

fn entry(key: TrieKey, prefix_len: u32, rule: Rule, source: &NetworkRule) -> Entry {
    Entry { prefix_len, key, rule, name: source.name.clone() }
}

/// Whether the first `prefix` bits of `addr` are those of `mapped` (`prefix` ≤ 96).
fn masked_bytes_equal(addr: &[u8; 16], mapped: &[u8; 12], prefix: u8) -> bool {
    let mut full = [0u8; 16];
    full[..12].copy_from_slice(mapped);
    masked(*addr, prefix) == masked(full, prefix)
}

/// The list's flags in `KernelPolicy` / `NodePolicy`.
pub fn list_flags(lists: &RuleLists) -> u32 {
    let allow = if lists.allow.is_empty() { 0 } else { flags::ALLOW_LIST };
    let any = if lists.allow.is_empty() && lists.deny.is_empty() { 0 } else { flags::HAS_RULES };
    allow | any
}

/// A rule's address and prefix in the v6 space the trie uses.
fn mapped(rule: &NetworkRule) -> ([u8; 16], u8) {
    match rule.addr {
        IpAddr::V4(v4) => (v4_mapped(v4.octets()), 96 + rule.prefix),
        IpAddr::V6(v6) => (v6.octets(), rule.prefix),
    }
}

/// The address with the bits past the prefix cleared (one key per CIDR however it is written).
fn masked(mut addr: [u8; 16], prefix: u8) -> [u8; 16] {
    for (i, byte) in addr.iter_mut().enumerate() {
        let kept = (i32::from(prefix) - (i as i32) * 8).clamp(0, 8);
        *byte &= if kept == 8 { 0xff } else { !(0xffu8 >> kept) };
    }
    addr
}

/// Makes list `list` hold exactly `entries` in both tries: each is written (an update replaces
/// an entry in place), then the list's other entries are removed.
pub fn replace_list(tries: Tries<'_>, list: u32, entries: &[Entry]) -> Result<(), RulesError> {
    let write = |err: aya::maps::MapError, entry: &Entry| RulesError::Write {
        name: entry.name.clone(),
        reason: err.to_string(),
    };
    let (mut wanted4, mut wanted6) = (HashSet::new(), HashSet::new());
    for entry in entries {
        match entry.key {
            TrieKey::V4(key) => {
                tries.v4.insert(&Key::new(entry.prefix_len, key), entry.rule, 0).map_err(|err| write(err, entry))?;
                wanted4.insert((entry.prefix_len, key.addr));
            }
            TrieKey::V6(key) => {
                tries.v6.insert(&Key::new(entry.prefix_len, key), entry.rule, 0).map_err(|err| write(err, entry))?;
                wanted6.insert((entry.prefix_len, key.addr));
            }
        }
    }
    let list = list.to_be_bytes();
    let stale4: Vec<Key<RuleKey4>> = tries
        .v4
        .keys()
        .flatten()
        .filter(|key| key.data().list == list && !wanted4.contains(&(key.prefix_len(), key.data().addr)))
        .collect();
    for key in stale4 {
        let _ = tries.v4.remove(&key);
    }
    let stale6: Vec<Key<RuleKey>> = tries
        .v6
        .keys()
        .flatten()
        .filter(|key| key.data().list == list && !wanted6.contains(&(key.prefix_len(), key.data().addr)))
        .collect();
    for key in stale6 {
        let _ = tries.v6.remove(&key);
    }
    Ok(())
}

pub fn hook_name(at: u8) -> &'static str {
    match at {
        hook::CONNECT => "connect",
        hook::SENDMSG => "sendmsg",
        hook::EGRESS => "egress",
        hook::DEVICE => "device",
        hook::GUARD => "lsm",
        _ => "unknown",
    }
}

/// `a.b.c.d:port` for a v4-mapped address, `[v6]:port` otherwise.
pub fn destination_text(addr: &[u8; 16], port: u16) -> String {
    let v6 = Ipv6Addr::from(*addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => format!("{v4}:{port}"),
        None => format!("[{v6}]:{port}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(text: &str) -> NetworkRule {
        NetworkRule::parse(text, None, None, None).expect("rule")
    }

    #[test]
    fn ipv4_rules_go_to_the_ipv4_trie_and_ipv6_ones_to_the_other() {
        let lists = RuleLists { deny: vec![rule("10.1.2.3/8")], allow: vec![rule("2001:db8::/32")] };
        let entries = encode(7, &lists, 0).expect("entries");
        assert_eq!(entries[0].prefix_len, 32 + 8);
        assert_eq!(entries[0].key, TrieKey::V4(RuleKey4 { list: 7u32.to_be_bytes(), addr: [10, 0, 0, 0] }));
        assert_eq!((entries[0].rule.id, entries[0].rule.action), (1, action::DENY));
        assert_eq!(entries[1].prefix_len, 32 + 32);
        assert!(matches!(entries[1].key, TrieKey::V6(_)));
        assert_eq!((entries[1].rule.id, entries[1].rule.action), (2, action::ALLOW));
        assert_eq!(entries.len(), 2, "2001:db8::/32 holds no v4-mapped address");
        assert_eq!(list_flags(&lists), flags::ALLOW_LIST | flags::HAS_RULES);
        assert_eq!(list_flags(&RuleLists::default()), 0);
        let kernel = encode(7, &lists, agent_common::policy::KERNEL_RULE).expect("entries");
        assert_eq!(kernel[0].rule.id, agent_common::policy::KERNEL_RULE | 1);
    }

    #[test]
    fn ipv6_rules_holding_v4_mapped_addresses_stand_in_the_ipv4_trie_too() {
        let v4 = |addr: [u8; 4]| TrieKey::V4(RuleKey4 { list: 0u32.to_be_bytes(), addr });
        // ::/0 holds every v4-mapped address: it is 0.0.0.0/0 there, under the longer 10/8.
        let lists = RuleLists { deny: vec![rule("::/0"), rule("10.0.0.0/8")], allow: vec![] };
        let entries = encode(0, &lists, 0).expect("entries");
        assert!(entries.iter().any(|e| e.key == v4([0; 4]) && e.prefix_len == 32 && e.rule.id == 1));
        assert!(entries.iter().any(|e| e.key == v4([10, 0, 0, 0]) && e.prefix_len == 40 && e.rule.id == 2));
        // A v4-mapped CIDR written as IPv6 is an IPv4 rule.
        let mapped =
            encode(0, &RuleLists { deny: vec![rule("::ffff:192.0.2.0/120")], allow: vec![] }, 0).expect("mapped");
        assert_eq!((mapped[0].key, mapped[0].prefix_len), (v4([192, 0, 2, 0]), 32 + 24));
        // An IPv4 0.0.0.0/0 is longer than ::/0 for IPv4 destinations: it keeps the key.
        let both = encode(0, &RuleLists { deny: vec![rule("::/0")], allow: vec![rule("0.0.0.0/0")] }, 0).expect("both");
        let everything: Vec<_> = both.iter().filter(|e| e.key == v4([0; 4])).collect();
        assert_eq!((everything.len(), everything[0].rule.id), (1, 2));
    }

    #[test]
    fn one_cidr_written_twice_is_refused_by_name() {
        let lists = RuleLists { deny: vec![rule("10.0.0.0/8")], allow: vec![rule("10.9.9.9/8")] };
        let err = encode(0, &lists, 0).expect_err("same CIDR");
        assert!(err.to_string().contains("10.0.0.0/8"), "{err}");
    }

    #[test]
    fn masking_clears_host_bits() {
        assert_eq!(masked(v4_mapped([192, 168, 77, 1]), 96 + 17), v4_mapped([192, 168, 0, 0]));
        assert!(masked_bytes_equal(&[0; 16], &MAPPED_PREFIX, 0));
        assert!(!masked_bytes_equal(&[0; 16], &MAPPED_PREFIX, 96));
        assert_eq!(masked([0xff; 16], 0), [0; 16]);
        assert_eq!(destination_text(&v4_mapped([169, 254, 169, 254]), 80), "169.254.169.254:80");
        assert_eq!(destination_text(&Ipv6Addr::LOCALHOST.octets(), 53), "[::1]:53");
    }
}
