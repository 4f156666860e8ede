//! Guardrails in user space: whether this host can run them (BPF LSM), each kernel's modes
//! (the node's, changed by the kernel's own `internal_data.guardrails`), their names, and where
//! a task's cgroup is for the ptrace rule (from the kernel's BTF).

use agent_common::policy::{KernelGuards, guard, guard_mode};

use crate::{
    config::{GuardMode, GuardrailsSection},
    monitor::btf::{BtfError, KernelBtf},
};

/// Where the kernel lists its active security modules.
const ACTIVE_LSMS: &str = "/sys/kernel/security/lsm";

/// Why the guardrails cannot run here, or `None` when they can.
pub fn unavailable_reason() -> Option<String> {
    match std::fs::read_to_string(ACTIVE_LSMS) {
        Ok(list) if list.trim().split(',').any(|lsm| lsm == "bpf") => None,
        Ok(list) => Some(format!(
            "the BPF LSM is not active ({ACTIVE_LSMS}: `{}`); add `bpf` to the kernel's `lsm=` boot parameter",
            list.trim()
        )),
        Err(err) => Some(format!("{ACTIVE_LSMS}: {err} (securityfs not mounted?)")),
    }
}

pub fn mode_byte(mode: GuardMode) -> u8 {
    match mode {
        GuardMode::Off => guard_mode::OFF,
        GuardMode::Monitor => guard_mode::MONITOR,
        GuardMode::Enforce => guard_mode::ENFORCE,
    }
}

/// A kernel's own modes, by guardrail index (from `internal_data.guardrails`).
pub type Exceptions = Vec<(usize, GuardMode)>;

/// Reads `{"raw-socket": "off", …}`; an unknown guardrail or mode is named.
pub fn kernel_exceptions(json: Option<&serde_json::Value>) -> Result<Exceptions, String> {
    let Some(value) = json.filter(|v| !v.is_null()) else { return Ok(Vec::new()) };
    let object = value.as_object().ok_or_else(|| format!("must be a map of guardrail to mode, got {value}"))?;
    let mut exceptions = Vec::new();
    for (name, mode) in object {
        let index = guard::NAMES
            .iter()
            .position(|known| known == name)
            .ok_or_else(|| format!("unknown guardrail `{name}` (known: {})", guard::NAMES.join(", ")))?;
        let mode: GuardMode = serde_json::from_value(mode.clone())
            .map_err(|_| format!("`{name}`: {mode} is not one of \"off\", \"monitor\", \"enforce\""))?;
        exceptions.push((index, mode));
    }
    Ok(exceptions)
}

/// The modes a kernel runs under: the node's, with its own exceptions.
pub fn kernel_modes(node: &GuardrailsSection, exceptions: &Exceptions) -> KernelGuards {
    let mut modes = [0u8; 8];
    for (index, mode) in node.modes().into_iter().enumerate() {
        modes[index] = mode_byte(mode);
    }
    for (index, mode) in exceptions {
        modes[*index] = mode_byte(*mode);
    }
    KernelGuards { modes }
}

/// Where the ptrace rule finds a task's cgroup: `task->cgroups->dfl_cgrp`, that cgroup's
/// `level` and `ancestors[]`, and a cgroup's id (`cgrp->kn->id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupOffsets {
    pub task_cgroups: u32,
    pub css_set_dfl_cgrp: u32,
    pub cgroup_level: u32,
    pub cgroup_ancestors: u32,
    pub cgroup_kn: u32,
    pub kernfs_node_id: u32,
}

impl CgroupOffsets {
    pub fn read(btf: &KernelBtf) -> Result<Self, BtfError> {
        let offset = |strukt: &str, member: &str| {
            btf.member_offset(strukt, &[member])
                .and_then(|bytes| u32::try_from(bytes).map_err(|_| BtfError::Malformed("offset beyond 4 GiB")))
        };
        Ok(Self {
            task_cgroups: offset("task_struct", "cgroups")?,
            css_set_dfl_cgrp: offset("css_set", "dfl_cgrp")?,
            cgroup_level: offset("cgroup", "level")?,
            cgroup_ancestors: offset("cgroup", "ancestors")?,
            cgroup_kn: offset("cgroup", "kn")?,
            kernfs_node_id: offset("kernfs_node", "id")?,
        })
    }
}

/// The guardrail a verdict's rule id names, if any.
pub fn name_of(rule: u32) -> Option<&'static str> {
    let index = rule.checked_sub(agent_common::policy::rule_id::GUARD_BASE)? as usize;
    guard::NAMES.get(index).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernels_exceptions_change_only_its_named_rules() {
        let exceptions =
            kernel_exceptions(Some(&serde_json::json!({"raw-socket": "off", "perf-event": "enforce"}))).expect("valid");
        let modes = kernel_modes(&GuardrailsSection::default(), &exceptions).modes;
        assert_eq!(modes[guard::RAW_SOCKET], guard_mode::OFF);
        assert_eq!(modes[guard::PERF_EVENT], guard_mode::ENFORCE);
        assert_eq!(modes[guard::PACKET_SOCKET], guard_mode::ENFORCE);
        let err = kernel_exceptions(Some(&serde_json::json!({"raw-sockets": "off"}))).unwrap_err();
        assert!(err.contains("raw-sockets"), "{err}");
        let err = kernel_exceptions(Some(&serde_json::json!({"bpf": "sometimes"}))).unwrap_err();
        assert!(err.contains("sometimes"), "{err}");
        assert_eq!(name_of(agent_common::policy::rule_id::GUARD_BASE + 6), Some("ptrace-outside"));
    }

    #[test]
    fn the_running_kernels_cgroup_fields_are_found() {
        let btf = KernelBtf::from_sys_fs().expect("this host has kernel BTF");
        let offsets = CgroupOffsets::read(&btf).expect("offsets");
        assert!(offsets.task_cgroups > 0 && offsets.cgroup_ancestors > offsets.cgroup_level);
    }
}
