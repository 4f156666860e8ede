//! Field offsets in the running kernel's types, read from its BTF
//! (`/sys/kernel/btf/vmlinux`), for eBPF programs that read kernel structs.
//!
//! aya's Rust programs cannot carry CO-RE relocations, so the agent looks the
//! offsets up itself and hands them to the programs as globals at load time.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read kernel BTF at {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("kernel BTF is malformed: {0}")]
    Malformed(&'static str),
    #[error("kernel BTF has no struct `{0}`")]
    NoStruct(String),
    #[error("struct `{strukt}` has no member `{member}` in kernel BTF")]
    NoMember { strukt: String, member: String },
}

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

/// One struct or union of the type section.
struct Composite {
    name: u32,
    /// (name offset, type id, bit offset) per member.
    members: Vec<(u32, u32, u32)>,
}

/// The parsed type section: enough to walk struct members by name.
pub struct KernelBtf {
    strings: Vec<u8>,
    /// Indexed by type id (id 0 is void); `None` for kinds the walk does not need.
    composites: Vec<Option<Composite>>,
    /// Type each id refers to, for typedef/const/volatile chains (kind, referenced id).
    refs: Vec<(u32, u32)>,
}

impl KernelBtf {
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        Self::from_file(Path::new("/sys/kernel/btf/vmlinux"))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read { path: path.display().to_string(), source })?;
        Self::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let u16_at = |at: usize| data.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        let u32_at = |at: usize| data.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        if u16_at(0) != Some(MAGIC) {
            return Err(BtfError::Malformed("bad magic (not little-endian BTF)"));
        }
        let field = |at| u32_at(at).map(|v| v as usize).ok_or(BtfError::Malformed("short header"));
        let (hdr_len, type_off, type_len, str_off, str_len) =
            (field(4)?, field(8)?, field(12)?, field(16)?, field(20)?);
        let types_start = hdr_len + type_off;
        let strings_start = hdr_len + str_off;
        let strings = data
            .get(strings_start..strings_start + str_len)
            .ok_or(BtfError::Malformed("string section out of bounds"))?
            .to_vec();
        let types_end = types_start + type_len;
        if types_end > data.len() {
            return Err(BtfError::Malformed("type section out of bounds"));
        }

        let mut composites = vec![None];
        let mut refs = vec![(0, 0)];
        let mut at = types_start;
        while at < types_end {
            let word = |i: usize| u32_at(at + 4 * i).ok_or(BtfError::Malformed("truncated type"));
            let (name, info, size_or_type) = (word(0)?, word(1)?, word(2)?);
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let bitfield_offsets = info >> 31 == 1;
            let body = at + 12;
            let extra = match kind {
                1 | 14 | 17 => 4, // int, var, decl_tag
                3 => 12,          // array
                KIND_STRUCT | KIND_UNION => vlen * 12,
                6 | 13 => vlen * 8,   // enum, func_proto
                15 | 19 => vlen * 12, // datasec, enum64
                _ => 0,               // ptr, fwd, typedef, modifiers, func, float, type_tag
            };
            let mut composite = None;
            if kind == KIND_STRUCT || kind == KIND_UNION {
                let mut members = Vec::with_capacity(vlen);
                for m in 0..vlen {
                    let base = body + m * 12;
                    let get = |i: usize| u32_at(base + 4 * i).ok_or(BtfError::Malformed("truncated member"));
                    let offset = get(2)?;
                    let bits = if bitfield_offsets { offset & 0x00ff_ffff } else { offset };
                    members.push((get(0)?, get(1)?, bits));
                }
                composite = Some(Composite { name, members });
            }
            composites.push(composite);
            refs.push((kind, size_or_type));
            at = body + extra;
        }
        Ok(Self { strings, composites, refs })
    }

    fn name(&self, offset: u32) -> &[u8] {
        let rest = self.strings.get(offset as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    }

    /// Follows typedefs and qualifiers to the type they name.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.refs.get(id as usize) {
                // typedef, volatile, const, restrict, type_tag
                Some(&(8 | 9 | 10 | 11 | 18, target)) => id = target,
                _ => break,
            }
        }
        id
    }

    fn struct_id(&self, name: &str) -> Option<u32> {
        self.composites.iter().enumerate().find_map(|(id, c)| {
            let c = c.as_ref()?;
            // Prefer the definition with members over an empty forward-like one.
            (self.name(c.name) == name.as_bytes() && !c.members.is_empty()).then_some(id as u32)
        })
    }

    /// Byte offset of a member path such as `["se", "sum_exec_runtime"]` in `strukt`; a member
    /// inside an anonymous struct or union (as randomized layouts put them) is found too.
    pub fn member_offset(&self, strukt: &str, path: &[&str]) -> Result<u64, BtfError> {
        let mut id = self.struct_id(strukt).ok_or_else(|| BtfError::NoStruct(strukt.to_owned()))?;
        let mut bits = 0u64;
        let mut owner = strukt.to_owned();
        for member in path {
            if self.composites.get(id as usize).and_then(Option::as_ref).is_none() {
                return Err(BtfError::NoStruct(owner));
            }
            let (member_type, offset) = self
                .find_member(id, member, 0)
                .ok_or_else(|| BtfError::NoMember { strukt: owner.clone(), member: (*member).to_owned() })?;
            bits += offset;
            id = self.resolve(member_type);
            owner = (*member).to_owned();
        }
        if !bits.is_multiple_of(8) {
            return Err(BtfError::Malformed("member is a bitfield"));
        }
        Ok(bits / 8)
    }

    /// A member of composite `id` by name, directly or inside its anonymous members: its type
    /// and bit offset.
    fn find_member(&self, id: u32, name: &str, depth: usize) -> Option<(u32, u64)> {
        let composite = self.composites.get(id as usize)?.as_ref()?;
        if let Some(&(_, member_type, offset)) =
            composite.members.iter().find(|(member, _, _)| *member != 0 && self.name(*member) == name.as_bytes())
        {
            return Some((member_type, u64::from(offset)));
        }
        if depth >= 8 {
            return None;
        }
        composite.members.iter().filter(|(member, _, _)| *member == 0).find_map(|&(_, member_type, offset)| {
            let (found, inner) = self.find_member(self.resolve(member_type), name, depth + 1)?;
            Some((found, u64::from(offset) + inner))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_schedulers_runtime_in_the_running_kernel() {
        let btf = KernelBtf::from_sys_fs().expect("this host has kernel BTF");
        let se = btf.member_offset("task_struct", &["se"]).expect("task_struct.se");
        let runtime = btf.member_offset("sched_entity", &["sum_exec_runtime"]).expect("sum_exec_runtime");
        let nested = btf.member_offset("task_struct", &["se", "sum_exec_runtime"]).expect("nested path");
        assert_eq!(nested, se + runtime);
        assert!(nested > 0 && nested < 16384, "implausible offset {nested}");
    }

    #[test]
    fn unknown_names_are_errors() {
        let btf = KernelBtf::from_sys_fs().expect("this host has kernel BTF");
        assert!(matches!(btf.member_offset("no_such_struct", &["x"]), Err(BtfError::NoStruct(_))));
        assert!(matches!(btf.member_offset("task_struct", &["no_such_member"]), Err(BtfError::NoMember { .. })));
    }

    #[test]
    fn garbage_is_refused() {
        assert!(KernelBtf::parse(b"not btf at all, definitely").is_err());
        assert!(KernelBtf::parse(&[]).is_err());
    }
}
