//! Device access: the standard container set every kernel gets, the device nodes given to one
//! kernel (found by their host paths' device numbers), and their entries in the device map.

use std::os::unix::fs::{FileTypeExt, MetadataExt};

use agent_common::policy::{DEVICE_ANY, DeviceKey, device_access, device_kind};
use aya::maps::{HashMap as BpfHashMap, MapData};

use crate::config::DeviceMapping;

/// Access to one device node, or to every minor of a major, or to every device of a kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct DeviceRule {
    /// [`device_kind`].
    pub kind: u32,
    /// [`DEVICE_ANY`]: every major.
    pub major: u32,
    /// [`DEVICE_ANY`]: every minor.
    pub minor: u32,
    /// [`device_access`] bits.
    pub access: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    #[error("device `{path}`: {reason}")]
    Given { path: String, reason: String },
    #[error("writing the device map: {0}")]
    Map(String),
}

const fn rule(kind: u32, major: u32, minor: u32, access: u32) -> DeviceRule {
    DeviceRule { kind, major, minor, access }
}

const RWM: u32 = device_access::READ | device_access::WRITE | device_access::MKNOD;

/// What runc gives every container (its default allow list; Docker's `devices.list` shows the
/// same): `mknod` of any node, and `null`, `zero`, `full`, `random`, `urandom`, `tty`,
/// `console`, `ptmx`, `net/tun` and the pseudo-terminals.
pub const STANDARD: [DeviceRule; 12] = [
    rule(device_kind::BLOCK, DEVICE_ANY, DEVICE_ANY, device_access::MKNOD),
    rule(device_kind::CHAR, DEVICE_ANY, DEVICE_ANY, device_access::MKNOD),
    rule(device_kind::CHAR, 1, 3, RWM),
    rule(device_kind::CHAR, 1, 5, RWM),
    rule(device_kind::CHAR, 1, 7, RWM),
    rule(device_kind::CHAR, 1, 8, RWM),
    rule(device_kind::CHAR, 1, 9, RWM),
    rule(device_kind::CHAR, 5, 0, RWM),
    rule(device_kind::CHAR, 5, 1, RWM),
    rule(device_kind::CHAR, 5, 2, RWM),
    rule(device_kind::CHAR, 10, 200, RWM),
    rule(device_kind::CHAR, 136, DEVICE_ANY, RWM),
];

/// `r`, `w`, `m` as access bits.
pub fn access_bits(permissions: &str) -> u32 {
    permissions.chars().fold(0, |bits, c| {
        bits | match c {
            'r' => device_access::READ,
            'w' => device_access::WRITE,
            'm' => device_access::MKNOD,
            _ => 0,
        }
    })
}

/// The rule that gives a kernel the device node at `mapping`'s host path.
pub fn given(mapping: &DeviceMapping) -> Result<DeviceRule, DevicesError> {
    let failed = |reason: String| DevicesError::Given { path: mapping.host_path.clone(), reason };
    let meta = std::fs::metadata(&mapping.host_path).map_err(|err| failed(err.to_string()))?;
    let kind = if meta.file_type().is_char_device() {
        device_kind::CHAR
    } else if meta.file_type().is_block_device() {
        device_kind::BLOCK
    } else {
        return Err(failed("is not a device node".into()));
    };
    let rdev = meta.rdev();
    Ok(rule(kind, libc::major(rdev), libc::minor(rdev), access_bits(&mapping.permissions)))
}

/// A rule in `devices.list` syntax (`c 1:3 rwm`, `*` for any).
pub fn rule_text(rule: &DeviceRule) -> String {
    let number = |n: u32| if n == DEVICE_ANY { "*".to_owned() } else { n.to_string() };
    let kind = if rule.kind == device_kind::BLOCK { 'b' } else { 'c' };
    let access: String = [(device_access::READ, 'r'), (device_access::WRITE, 'w'), (device_access::MKNOD, 'm')]
        .iter()
        .filter(|(bit, _)| rule.access & bit != 0)
        .map(|(_, c)| *c)
        .collect();
    format!("{kind} {}:{} {access}", number(rule.major), number(rule.minor))
}

/// Makes `list`'s entries exactly `rules` (rules for the same node are merged).
pub fn replace_list(
    map: &mut BpfHashMap<MapData, DeviceKey, u32>,
    list: u32,
    rules: &[DeviceRule],
) -> Result<(), DevicesError> {
    let mut wanted: std::collections::HashMap<DeviceKey, u32> = std::collections::HashMap::new();
    for rule in rules {
        let key = DeviceKey { list, kind: rule.kind, major: rule.major, minor: rule.minor };
        *wanted.entry(key).or_default() |= rule.access;
    }
    for (key, access) in &wanted {
        map.insert(key, access, 0).map_err(|err| DevicesError::Map(err.to_string()))?;
    }
    let stale: Vec<DeviceKey> =
        map.keys().flatten().filter(|key| key.list == list && !wanted.contains_key(key)).collect();
    for key in stale {
        let _ = map.remove(&key);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_standard_set_reads_as_runc_writes_it() {
        let lines: Vec<String> = STANDARD.iter().map(rule_text).collect();
        assert_eq!(lines[0], "b *:* m");
        assert_eq!(lines[2], "c 1:3 rwm");
        assert_eq!(lines[11], "c 136:* rwm");
    }

    #[test]
    fn a_given_device_is_found_by_its_numbers() {
        let null = DeviceMapping::parse("/dev/null:/dev/null:rw").unwrap();
        assert_eq!(given(&null).unwrap(), rule(device_kind::CHAR, 1, 3, device_access::READ | device_access::WRITE));
        let missing = DeviceMapping::parse("/dev/no-such-device").unwrap();
        let err = given(&missing).unwrap_err().to_string();
        assert!(err.contains("/dev/no-such-device"), "{err}");
    }
}
