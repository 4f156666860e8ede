//! Network rules as the programs read them: each CIDR of a list one trie entry (v4-mapped when
//! IPv4), written and replaced without a gap.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv6Addr},
};

use agent_common::policy::{Rule, RuleKey, action, flags, hook, v4_mapped};
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
    pub key: RuleKey,
    pub rule: Rule,
    pub name: String,
}

/// The trie entries of `lists` as list `list`: deny rules first, ids from 1 in order, or'ed
/// with `id_bits` (a kernel's rules carry `KERNEL_RULE`).
pub fn encode(list: u32, lists: &RuleLists, id_bits: u32) -> Result<Vec<Entry>, RulesError> {
    let rules = lists.deny.iter().map(|r| (r, action::DENY)).chain(lists.allow.iter().map(|r| (r, action::ALLOW)));
    let mut entries: Vec<Entry> = Vec::new();
    for (index, (rule, what)) in rules.enumerate() {
        let (addr, prefix) = mapped(rule);
        let key = RuleKey { list: list.to_be_bytes(), addr: masked(addr, prefix) };
        let prefix_len = 32 + u32::from(prefix);
        if let Some(other) = entries.iter().find(|e| e.key == key && e.prefix_len == prefix_len) {
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
        entries.push(Entry {
            prefix_len,
            key,
            rule: Rule { id, port_lo: rule.ports.0, port_hi: rule.ports.1, action: what, protocol, _pad: [0; 2] },
            name: rule.name.clone(),
        });
    }
    Ok(entries)
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

/// Makes list `list` hold exactly `entries`: each is written (an update replaces an entry in
/// place), then the list's other entries are removed.
pub fn replace_list(
    trie: &mut LpmTrie<MapData, RuleKey, Rule>,
    list: u32,
    entries: &[Entry],
) -> Result<(), RulesError> {
    let mut wanted = HashSet::new();
    for entry in entries {
        let key = Key::new(entry.prefix_len, entry.key);
        trie.insert(&key, entry.rule, 0)
            .map_err(|err| RulesError::Write { name: entry.name.clone(), reason: err.to_string() })?;
        wanted.insert((entry.prefix_len, entry.key.addr));
    }
    let stale: Vec<Key<RuleKey>> = trie
        .keys()
        .flatten()
        .filter(|key| {
            let data = key.data();
            data.list == list.to_be_bytes() && !wanted.contains(&(key.prefix_len(), data.addr))
        })
        .collect();
    for key in stale {
        let _ = trie.remove(&key);
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
    fn ipv4_rules_become_v4_mapped_prefixes() {
        let lists = RuleLists { deny: vec![rule("10.1.2.3/8")], allow: vec![rule("2001:db8::/32")] };
        let entries = encode(7, &lists, 0).expect("entries");
        assert_eq!(entries[0].prefix_len, 32 + 96 + 8);
        assert_eq!(entries[0].key.addr, v4_mapped([10, 0, 0, 0]));
        assert_eq!(entries[0].key.list, 7u32.to_be_bytes());
        assert_eq!((entries[0].rule.id, entries[0].rule.action), (1, action::DENY));
        assert_eq!(entries[1].prefix_len, 32 + 32);
        assert_eq!((entries[1].rule.id, entries[1].rule.action), (2, action::ALLOW));
        assert_eq!(list_flags(&lists), flags::ALLOW_LIST | flags::HAS_RULES);
        assert_eq!(list_flags(&RuleLists::default()), 0);
        let kernel = encode(7, &lists, agent_common::policy::KERNEL_RULE).expect("entries");
        assert_eq!(kernel[0].rule.id, agent_common::policy::KERNEL_RULE | 1);
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
        assert_eq!(masked([0xff; 16], 0), [0; 16]);
        assert_eq!(destination_text(&v4_mapped([169, 254, 169, 254]), 80), "169.254.169.254:80");
        assert_eq!(destination_text(&Ipv6Addr::LOCALHOST.octets(), 53), "[::1]:53");
    }
}
