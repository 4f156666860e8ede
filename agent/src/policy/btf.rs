//! Field offsets of kernel structures, read from the running kernel's BTF
//! (`/sys/kernel/btf/vmlinux`), for the guardrail that follows a task to its cgroup (the eBPF
//! programs are built without relocations, so they take the offsets as globals).

use std::collections::HashMap;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("the kernel's BTF is malformed: {0}")]
    Malformed(&'static str),
    #[error("the kernel's BTF has no `struct {0}`")]
    NoStruct(String),
    #[error("the kernel's BTF has no field `{field}` in `struct {structure}`")]
    NoField { structure: String, field: String },
}

const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

struct Member {
    name: u32,
    type_id: u32,
    bit_offset: u32,
}

struct Type {
    name: u32,
    kind: u32,
    members: Vec<Member>,
}

/// The struct and union types of a BTF blob, with their members.
pub struct KernelBtf {
    types: Vec<Type>,
    strings: Vec<u8>,
    structs: HashMap<String, usize>,
}

impl KernelBtf {
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        let path = "/sys/kernel/btf/vmlinux";
        let data = std::fs::read(path).map_err(|source| BtfError::Read { path: path.into(), source })?;
        Self::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let u16_at = |at: usize| data.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        let u32_at = |at: usize| data.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        if u16_at(0) != Some(0xeb9f) {
            return Err(BtfError::Malformed("bad magic (only little-endian BTF is read)"));
        }
        let header = |at| u32_at(at).map(|v| v as usize).ok_or(BtfError::Malformed("short header"));
        let (hdr_len, type_off, type_len, str_off, str_len) =
            (header(4)?, header(8)?, header(12)?, header(16)?, header(20)?);
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Malformed("string section out of bounds"))?
            .to_vec();
        let end = hdr_len + type_off + type_len;
        let mut at = hdr_len + type_off;
        // Type ids start at 1.
        let mut types = vec![Type { name: 0, kind: 0, members: Vec::new() }];
        while at < end {
            let word = |offset: usize| u32_at(at + offset).ok_or(BtfError::Malformed("type out of bounds"));
            let (name, info) = (word(0)?, word(4)?);
            let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
            let bitfields = info >> 31 == 1;
            at += 12;
            let mut members = Vec::new();
            let extra = match kind {
                1 | 14 | 17 => 4, // INT, VAR, DECL_TAG
                3 => 12,          // ARRAY
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let member = |offset: usize| {
                            u32_at(at + i * 12 + offset).ok_or(BtfError::Malformed("member out of bounds"))
                        };
                        let offset = member(8)?;
                        let bit_offset = if bitfields { offset & 0x00ff_ffff } else { offset };
                        members.push(Member { name: member(0)?, type_id: member(4)?, bit_offset });
                    }
                    vlen * 12
                }
                6 | 13 => vlen * 8,   // ENUM, FUNC_PROTO
                15 | 19 => vlen * 12, // DATASEC, ENUM64
                2 | 7..=12 | 16 | 18 => 0,
                _ => return Err(BtfError::Malformed("unknown type kind")),
            };
            at += extra;
            types.push(Type { name, kind, members });
        }
        let mut btf = Self { types, strings, structs: HashMap::new() };
        for (id, ty) in btf.types.iter().enumerate() {
            if ty.kind == KIND_STRUCT && ty.name != 0 {
                btf.structs.entry(btf.name(ty.name).to_owned()).or_insert(id);
            }
        }
        Ok(btf)
    }

    fn name(&self, offset: u32) -> &str {
        let rest = self.strings.get(offset as usize..).unwrap_or_default();
        let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or_default()
    }

    /// The byte offset of `field` in `struct structure`, looking into anonymous members.
    pub fn offset(&self, structure: &str, field: &str) -> Result<u32, BtfError> {
        let id = *self.structs.get(structure).ok_or_else(|| BtfError::NoStruct(structure.into()))?;
        self.find(id, field, 0)
            .map(|bits| bits / 8)
            .ok_or_else(|| BtfError::NoField { structure: structure.into(), field: field.into() })
    }

    fn find(&self, id: usize, field: &str, depth: usize) -> Option<u32> {
        let ty = self.types.get(id)?;
        if depth > 8 {
            return None;
        }
        for member in &ty.members {
            if member.name != 0 && self.name(member.name) == field {
                return Some(member.bit_offset);
            }
        }
        for member in ty.members.iter().filter(|m| m.name == 0) {
            let inner = self.resolve(member.type_id as usize)?;
            if let Some(bits) = self.find(inner, field, depth + 1) {
                return Some(member.bit_offset + bits);
            }
        }
        None
    }

    /// The struct or union a member's type is (anonymous members are never behind typedefs).
    fn resolve(&self, id: usize) -> Option<usize> {
        let ty = self.types.get(id)?;
        matches!(ty.kind, KIND_STRUCT | KIND_UNION).then_some(id)
    }
}

/// Where the guardrail finds a task's cgroup: `task->cgroups->dfl_cgrp`, that cgroup's
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
        Ok(Self {
            task_cgroups: btf.offset("task_struct", "cgroups")?,
            css_set_dfl_cgrp: btf.offset("css_set", "dfl_cgrp")?,
            cgroup_level: btf.offset("cgroup", "level")?,
            cgroup_ancestors: btf.offset("cgroup", "ancestors")?,
            cgroup_kn: btf.offset("cgroup", "kn")?,
            kernfs_node_id: btf.offset("kernfs_node", "id")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_kernels_cgroup_fields_are_found() {
        let Ok(btf) = KernelBtf::from_sys_fs() else {
            panic!("this test needs /sys/kernel/btf/vmlinux (CONFIG_DEBUG_INFO_BTF)");
        };
        let offsets = CgroupOffsets::read(&btf).expect("offsets");
        assert!(offsets.task_cgroups > 0 && offsets.cgroup_ancestors > offsets.cgroup_level);
        assert!(btf.offset("task_struct", "no_such_field").is_err());
        assert!(KernelBtf::parse(b"nonsense").is_err());
    }
}
