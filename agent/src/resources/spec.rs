//! `KernelResourceSpec` and its `resource.txt` file (`/home/config/resource.txt` in the
//! container): what a kernel was given, in Backend.AI's `KEY=VALUE` format, so that a
//! restarted agent can restore the allocation.
//!
//! The file, line by line (Backend.AI's `KernelResourceSpec.write_to_string`, then the
//! container id appended once the container exists):
//!
//! ```text
//! SCRATCH_SIZE=0m
//! MOUNTS=/vfolders/alice/data:/home/work/data:rw,/vfolders/shared:/home/work/shared:ro
//! SLOTS={"cpu":"2","mem":"1073741824"}
//! UNIFIED_DEVICES=[]
//! CPU_SHARES=0:1,1:1
//! MEM_SHARES=root:1g
//! CID=4f5e…
//! ```
//!
//! `<SLOT>_SHARES` lines hold the per-device allocation of each slot (device id `:` amount;
//! byte slots in Backend.AI's scaled form `1g`, which is rounded to 2 decimals, so the exact
//! memory comes from `SLOTS`). Other `KEY=VALUE` lines (compute plugins add some) are kept.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
};

use super::{
    alloc::Allocation,
    slots::{ResourceSlots, SlotAmount, SlotType, format_binary_size, format_binary_size_in, parse_binary_size},
};

/// The file name inside a kernel's config directory.
pub const RESOURCE_TXT: &str = "resource.txt";

/// Why a `resource.txt` could not be read or written. Parse errors name the line.
#[derive(Debug, thiserror::Error)]
pub enum ResourceFileError {
    #[error("resource.txt line {line}: {reason} (line: {content:?})")]
    Line { line: usize, content: String, reason: String },
    #[error("resource.txt: no {key} line")]
    Missing { key: &'static str },
    #[error("resource.txt: cannot write {what}: {reason}")]
    Unwritable { what: String, reason: String },
    #[error("resource.txt: {reason}")]
    NotRestorable { reason: String },
    #[error("cannot {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
}

/// A vfolder or volume mount: `source:target:permission` in `MOUNTS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// An absolute host path, or a Docker volume name (one component).
    pub source: PathBuf,
    /// An absolute path in the container.
    pub target: PathBuf,
    pub permission: MountPermission,
}

/// Backend.AI's `MountPermission`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountPermission {
    ReadOnly,
    ReadWrite,
    /// Read, write and delete (`wd`).
    RwDelete,
}

impl MountPermission {
    pub fn as_str(self) -> &'static str {
        match self {
            MountPermission::ReadOnly => "ro",
            MountPermission::ReadWrite => "rw",
            MountPermission::RwDelete => "wd",
        }
    }

    pub fn parse(text: &str) -> Option<MountPermission> {
        match text {
            "ro" => Some(MountPermission::ReadOnly),
            "rw" => Some(MountPermission::ReadWrite),
            "wd" => Some(MountPermission::RwDelete),
            _ => None,
        }
    }
}

/// What a kernel was given, as recorded in its `resource.txt`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelResourceSpec {
    /// The container id (`CID`), known once the container exists.
    pub container_id: Option<String>,
    /// Scratch disk size in bytes (`SCRATCH_SIZE`; Backend.AI writes 0).
    pub scratch_disk_size: u64,
    pub mounts: Vec<MountSpec>,
    /// The slots the kernel asked for and holds (`SLOTS`).
    pub slots: ResourceSlots,
    /// `(device name, slot name)` pairs of unified devices (`UNIFIED_DEVICES`).
    pub unified_devices: Vec<(String, String)>,
    /// Slot name → per-device amounts (`<SLOT>_SHARES`), device ids in file order.
    pub allocations: BTreeMap<String, Vec<(String, SlotAmount)>>,
    /// Any other `KEY=VALUE` lines, in file order.
    pub extra: Vec<(String, String)>,
}

impl KernelResourceSpec {
    /// The spec for a fresh allocation: its slots, one `cpu` share on each pinned core and
    /// its memory on the `root` device, as Backend.AI's intrinsic plugins record them.
    pub fn for_allocation(allocation: &Allocation) -> KernelResourceSpec {
        let mut allocations = BTreeMap::new();
        if !allocation.cpuset.is_empty() {
            let cores = allocation.cpuset.iter().map(|core| (core.to_string(), SlotAmount::from_u64(1))).collect();
            allocations.insert("cpu".to_string(), cores);
        }
        allocations.insert("mem".to_string(), vec![("root".to_string(), SlotAmount::from_u64(allocation.mem_bytes))]);
        for (slot, per_device) in &allocation.devices {
            allocations.insert(slot.clone(), per_device.clone());
        }
        KernelResourceSpec { slots: allocation.slots.clone(), allocations, ..KernelResourceSpec::default() }
    }

    /// What to hand [`ResourceAllocator::restore`](super::ResourceAllocator::restore): the
    /// cores of `CPU_SHARES`, the memory of `SLOTS` (exact; else the `MEM_SHARES` sum), the
    /// slots, and every other `<SLOT>_SHARES` line as the devices of an accelerator slot.
    pub fn allocation(&self) -> Result<Allocation, ResourceFileError> {
        let mut cpuset = Vec::new();
        for (device, amount) in self.allocations.get("cpu").map(Vec::as_slice).unwrap_or_default() {
            if amount.is_zero() {
                continue;
            }
            let core = device.parse::<u32>().map_err(|_| ResourceFileError::NotRestorable {
                reason: format!("CPU_SHARES names device {device:?}, which is not a core number"),
            })?;
            cpuset.push(core);
        }
        cpuset.sort_unstable();
        cpuset.dedup();
        let mem = match self.slots.get("mem") {
            Some(mem) => mem,
            None => self
                .allocations
                .get("mem")
                .into_iter()
                .flatten()
                .try_fold(SlotAmount::ZERO, |sum, (_, amount)| sum.checked_add(*amount))
                .ok_or_else(|| ResourceFileError::NotRestorable { reason: "MEM_SHARES overflows".into() })?,
        };
        let mem_bytes = mem
            .to_u64()
            .ok_or_else(|| ResourceFileError::NotRestorable { reason: format!("mem = {mem} is not a byte count") })?;
        let devices = self
            .allocations
            .iter()
            .filter(|(slot, per_device)| slot.as_str() != "cpu" && slot.as_str() != "mem" && !per_device.is_empty())
            .map(|(slot, per_device)| {
                (slot.clone(), per_device.iter().filter(|(_, amount)| !amount.is_zero()).cloned().collect())
            })
            .collect();
        Ok(Allocation { cpuset, mem_bytes, slots: self.slots.clone(), devices })
    }

    /// The file's text. Fails when a value cannot be written in this format (a mount path
    /// with `:` or `,`, a line break in a value, a device id with `:`, `,` or `=`).
    pub fn to_resource_txt(&self) -> Result<String, ResourceFileError> {
        let unwritable = |what: String, reason: &str| ResourceFileError::Unwritable { what, reason: reason.into() };
        let mut text = String::new();
        text.push_str(&format!("SCRATCH_SIZE={}\n", format_binary_size_in(self.scratch_disk_size, 'm')));

        let mut mounts = Vec::new();
        for mount in &self.mounts {
            let (source, target) = (mount.source.to_string_lossy(), mount.target.to_string_lossy());
            for path in [&source, &target] {
                if path.is_empty() || path.contains([':', ',', '\n', '\r']) {
                    return Err(unwritable(
                        format!("mount path {path:?}"),
                        "it is empty or holds `:`, `,` or a line break",
                    ));
                }
            }
            if !mount.target.is_absolute() {
                return Err(unwritable(format!("mount target {target:?}"), "it is not absolute"));
            }
            mounts.push(format!("{source}:{target}:{}", mount.permission.as_str()));
        }
        text.push_str(&format!("MOUNTS={}\n", mounts.join(",")));

        let slots = serde_json::to_string(&self.slots.to_string_map())
            .map_err(|err| unwritable("SLOTS".into(), &err.to_string()))?;
        text.push_str(&format!("SLOTS={slots}\n"));
        let unified = serde_json::to_string(&self.unified_devices)
            .map_err(|err| unwritable("UNIFIED_DEVICES".into(), &err.to_string()))?;
        text.push_str(&format!("UNIFIED_DEVICES={unified}\n"));

        for (slot, per_device) in &self.allocations {
            if slot.is_empty() || slot.contains(['=', '\n', '\r']) {
                return Err(unwritable(format!("slot {slot:?}"), "not a slot name"));
            }
            let bytes = SlotType::guess(slot) == SlotType::Bytes;
            let mut pieces = Vec::new();
            for (device, amount) in per_device {
                if device.is_empty() || device.contains([':', ',', '=', '\n', '\r']) {
                    return Err(unwritable(
                        format!("{slot} device id {device:?}"),
                        "it is empty or holds `:`, `,` or `=`",
                    ));
                }
                let amount = match (bytes, amount.to_u64()) {
                    (true, Some(n)) => format_binary_size(n),
                    _ => amount.to_string(),
                };
                pieces.push(format!("{device}:{amount}"));
            }
            text.push_str(&format!("{}_SHARES={}\n", slot.to_ascii_uppercase(), pieces.join(",")));
        }

        for (key, value) in &self.extra {
            if key.is_empty() || key.contains(['=', '\n', '\r']) || key.trim() != key {
                return Err(unwritable(format!("key {key:?}"), "not a KEY"));
            }
            if value.contains(['\n', '\r']) {
                return Err(unwritable(format!("{key} value"), "it holds a line break"));
            }
            text.push_str(&format!("{key}={value}\n"));
        }
        if let Some(cid) = &self.container_id {
            text.push_str(&container_id_line(cid)?);
        }
        Ok(text)
    }

    /// Parses a `resource.txt`. Blank lines are skipped; every other line must be
    /// `KEY=VALUE`; `SCRATCH_SIZE`, `MOUNTS` and `SLOTS` must be there. A repeated `CID`
    /// keeps the last one; any other repeated key is an error.
    pub fn parse(text: &str) -> Result<KernelResourceSpec, ResourceFileError> {
        let mut spec = KernelResourceSpec::default();
        let mut seen: Vec<String> = Vec::new();
        let (mut scratch, mut mounts, mut slots) = (false, false, false);
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() {
                continue;
            }
            let bad = |reason: String| ResourceFileError::Line { line: index + 1, content: raw.to_string(), reason };
            let Some((key, value)) = line.split_once('=') else {
                return Err(bad("not KEY=VALUE".into()));
            };
            if key.is_empty() {
                return Err(bad("empty key".into()));
            }
            if key != "CID" {
                if seen.iter().any(|k| k == key) {
                    return Err(bad(format!("{key} given twice")));
                }
                seen.push(key.to_string());
            }
            match key {
                "CID" => spec.container_id = Some(value.to_string()),
                "SCRATCH_SIZE" => {
                    spec.scratch_disk_size =
                        parse_binary_size(value).ok_or_else(|| bad(format!("{value:?} is not a size")))?;
                    scratch = true;
                }
                "MOUNTS" => {
                    spec.mounts = parse_mounts(value).map_err(bad)?;
                    mounts = true;
                }
                "SLOTS" => {
                    spec.slots = parse_slots(value).map_err(bad)?;
                    slots = true;
                }
                "UNIFIED_DEVICES" => {
                    spec.unified_devices = if value.is_empty() {
                        Vec::new()
                    } else {
                        serde_json::from_str(value)
                            .map_err(|err| bad(format!("not a JSON list of [device, slot] pairs: {err}")))?
                    };
                }
                _ => match key.strip_suffix("_SHARES") {
                    Some(slot) if !slot.is_empty() => {
                        let slot = slot.to_ascii_lowercase();
                        let shares = parse_shares(&slot, value).map_err(bad)?;
                        spec.allocations.insert(slot, shares);
                    }
                    _ => spec.extra.push((key.to_string(), value.to_string())),
                },
            }
        }
        for (present, key) in [(scratch, "SCRATCH_SIZE"), (mounts, "MOUNTS"), (slots, "SLOTS")] {
            if !present {
                return Err(ResourceFileError::Missing { key });
            }
        }
        Ok(spec)
    }

    /// Reads `path` (a kernel's `config/resource.txt`).
    pub fn read_from(path: &Path) -> Result<KernelResourceSpec, ResourceFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ResourceFileError::Io {
            action: "read",
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Writes `path` whole: to a temporary file beside it, then renamed over it.
    pub fn write_to(&self, path: &Path) -> Result<(), ResourceFileError> {
        let text = self.to_resource_txt()?;
        let io = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| ResourceFileError::Io { action, path, source }
        };
        let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
        tmp_name.push(".tmp");
        let tmp = path.with_file_name(tmp_name);
        std::fs::write(&tmp, text).map_err(io("write", &tmp))?;
        std::fs::rename(&tmp, path).map_err(io("rename into place", path))
    }
}

/// `CID=<id>\n`, refusing ids that would break the file.
fn container_id_line(cid: &str) -> Result<String, ResourceFileError> {
    if cid.is_empty() || cid.contains(['\n', '\r']) {
        return Err(ResourceFileError::Unwritable {
            what: format!("container id {cid:?}"),
            reason: "it is empty or holds a line break".into(),
        });
    }
    Ok(format!("CID={cid}\n"))
}

/// Appends `CID=<id>` to an existing `resource.txt`, as Backend.AI does once the container
/// is created.
pub fn append_container_id(path: &Path, container_id: &str) -> Result<(), ResourceFileError> {
    let line = container_id_line(container_id)?;
    let io = |action| {
        let path = path.to_path_buf();
        move |source| ResourceFileError::Io { action, path, source }
    };
    let mut file = std::fs::OpenOptions::new().append(true).open(path).map_err(io("open for appending"))?;
    file.write_all(line.as_bytes()).map_err(io("append to"))
}

fn parse_mounts(value: &str) -> Result<Vec<MountSpec>, String> {
    let mut mounts = Vec::new();
    for entry in value.split(',').filter(|entry| !entry.is_empty()) {
        let parts: Vec<&str> = entry.split(':').collect();
        let [source, target, permission] = parts.as_slice() else {
            return Err(format!("mount {entry:?} is not source:target:permission"));
        };
        let source = PathBuf::from(source);
        if !source.is_absolute() && source.components().count() != 1 {
            return Err(format!("mount source {:?} is neither absolute nor a volume name", source));
        }
        let target = PathBuf::from(target);
        if !target.is_absolute() {
            return Err(format!("mount target {target:?} is not absolute"));
        }
        let permission = MountPermission::parse(permission)
            .ok_or_else(|| format!("mount permission {permission:?} is not ro, rw or wd"))?;
        mounts.push(MountSpec { source, target, permission });
    }
    Ok(mounts)
}

fn parse_slots(value: &str) -> Result<ResourceSlots, String> {
    let map: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(value).map_err(|err| format!("SLOTS is not a JSON object: {err}"))?;
    let mut slots = ResourceSlots::new();
    for (name, amount) in map {
        let field = format!("SLOTS.{name}");
        if let Some(amount) =
            SlotAmount::from_json(&amount, SlotType::guess(&name), &field).map_err(|err| err.to_string())?
        {
            slots.insert(name, amount);
        }
    }
    Ok(slots)
}

fn parse_shares(slot: &str, value: &str) -> Result<Vec<(String, SlotAmount)>, String> {
    let slot_type = SlotType::guess(slot);
    let mut shares = Vec::new();
    for entry in value.split(',').filter(|entry| !entry.is_empty()) {
        let Some((device, amount)) = entry.split_once(':').filter(|(d, a)| !d.is_empty() && !a.is_empty()) else {
            return Err(format!("share {entry:?} is not device:amount"));
        };
        let field = format!("{slot} device {device}");
        let amount = SlotAmount::parse_str(amount, slot_type, &field).map_err(|err| err.to_string())?;
        shares.push((device.to_string(), amount));
    }
    Ok(shares)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn slots(cpu: u64, mem: u64) -> ResourceSlots {
        [("cpu", SlotAmount::from_u64(cpu)), ("mem", SlotAmount::from_u64(mem))].into_iter().collect()
    }

    fn sample() -> KernelResourceSpec {
        let allocation =
            Allocation { cpuset: vec![0, 1], mem_bytes: GIB, slots: slots(2, GIB), devices: BTreeMap::new() };
        let mut spec = KernelResourceSpec::for_allocation(&allocation);
        spec.mounts = vec![
            MountSpec {
                source: "/vfolders/alice/data".into(),
                target: "/home/work/data".into(),
                permission: MountPermission::ReadWrite,
            },
            MountSpec {
                source: "shared-vol".into(),
                target: "/home/work/shared".into(),
                permission: MountPermission::ReadOnly,
            },
        ];
        spec.extra.push(("CUDA_GLOBAL_DEVICE_IDS".into(), "0,1".into()));
        spec.container_id = Some("4f5e6a".into());
        spec
    }

    #[test]
    fn writes_backend_ais_format() {
        let text = sample().to_resource_txt().expect("writable");
        assert_eq!(
            text,
            "SCRATCH_SIZE=0m\n\
             MOUNTS=/vfolders/alice/data:/home/work/data:rw,shared-vol:/home/work/shared:ro\n\
             SLOTS={\"cpu\":\"2\",\"mem\":\"1073741824\"}\n\
             UNIFIED_DEVICES=[]\n\
             CPU_SHARES=0:1,1:1\n\
             MEM_SHARES=root:1g\n\
             CUDA_GLOBAL_DEVICE_IDS=0,1\n\
             CID=4f5e6a\n"
        );
    }

    #[test]
    fn round_trips() {
        let spec = sample();
        let back = KernelResourceSpec::parse(&spec.to_resource_txt().expect("writable")).expect("parses");
        assert_eq!(back, spec);
        let allocation = back.allocation().expect("restorable");
        assert_eq!(
            allocation,
            Allocation { cpuset: vec![0, 1], mem_bytes: GIB, slots: slots(2, GIB), devices: BTreeMap::new() }
        );
    }

    #[test]
    fn reads_a_file_written_by_backend_ai() {
        // Python's reader joins readlines() with "\n", so lines may be blank in between.
        let text = "SCRATCH_SIZE=0m\n\nMOUNTS=\n\nSLOTS={\"cpu\": \"1\", \"mem\": \"1000000000\", \"cuda.shares\": \"0.5\"}\n\
                    UNIFIED_DEVICES=[[\"cuda\", \"cuda.shares\"]]\nCPU_SHARES=3:1\nMEM_SHARES=root:953.67m\n\
                    CUDA.SHARES_SHARES=GPU-abc:0.5\nCID=aa\nCID=bb\n";
        let spec = KernelResourceSpec::parse(text).expect("parses");
        assert_eq!(spec.container_id.as_deref(), Some("bb"), "the last CID wins");
        assert_eq!(spec.unified_devices, vec![("cuda".to_string(), "cuda.shares".to_string())]);
        assert_eq!(spec.allocations["cuda.shares"], vec![("GPU-abc".to_string(), "0.5".parse().expect("amount"))]);
        let allocation = spec.allocation().expect("restorable");
        assert_eq!(allocation.cpuset, vec![3]);
        assert_eq!(allocation.mem_bytes, 1_000_000_000, "exact bytes from SLOTS, not the rounded MEM_SHARES");
        assert_eq!(allocation.slots.amount("cuda.shares").to_string(), "0.5");
        assert_eq!(
            allocation.devices["cuda.shares"],
            vec![("GPU-abc".to_string(), "0.5".parse().expect("amount"))],
            "the devices a restarted agent gives back to the kernel"
        );
        assert!(!allocation.devices.contains_key("cpu") && !allocation.devices.contains_key("mem"));
    }

    #[test]
    fn corrupt_files_name_the_line() {
        let cases = [
            ("SCRATCH_SIZE=0m\nMOUNTS=\ngarbage\n", 3, "not KEY=VALUE"),
            ("SCRATCH_SIZE=0m\nMOUNTS=\nSLOTS={\"cpu\":\n", 3, "SLOTS is not a JSON object"),
            ("SCRATCH_SIZE=0m\nMOUNTS=\nSLOTS={\"mem\":\"lots\"}\n", 3, "SLOTS.mem: \"lots\" is not an amount"),
            ("SCRATCH_SIZE=lots\n", 1, "is not a size"),
            ("SCRATCH_SIZE=0m\nMOUNTS=/a:/b\n", 2, "not source:target:permission"),
            ("SCRATCH_SIZE=0m\nMOUNTS=/a:b:ro\n", 2, "not absolute"),
            ("SCRATCH_SIZE=0m\nMOUNTS=/a:/b:rx\n", 2, "not ro, rw or wd"),
            ("SCRATCH_SIZE=0m\nMOUNTS=\nSLOTS={}\nCPU_SHARES=0\n", 4, "not device:amount"),
            ("SCRATCH_SIZE=0m\nMOUNTS=\nSLOTS={}\nMEM_SHARES=root:x\n", 4, "is not an amount"),
            ("SCRATCH_SIZE=0m\nMOUNTS=\nMOUNTS=\n", 3, "MOUNTS given twice"),
            ("SCRATCH_SIZE=0m\nMOUNTS=\nSLOTS={}\nUNIFIED_DEVICES={\n", 4, "not a JSON list"),
        ];
        for (text, line, reason) in cases {
            let err = KernelResourceSpec::parse(text).expect_err(text);
            let message = err.to_string();
            assert!(message.starts_with(&format!("resource.txt line {line}: ")), "{text:?}: {message}");
            assert!(message.contains(reason), "{text:?}: {message}");
        }
        let err = KernelResourceSpec::parse("SCRATCH_SIZE=0m\nMOUNTS=\n").expect_err("no SLOTS");
        assert_eq!(err.to_string(), "resource.txt: no SLOTS line");
    }

    #[test]
    fn unwritable_values_are_refused() {
        let mut spec = sample();
        spec.mounts[0].source = "/weird:path".into();
        assert!(matches!(spec.to_resource_txt(), Err(ResourceFileError::Unwritable { .. })));
        let mut spec = sample();
        spec.extra.push(("X".into(), "two\nlines".into()));
        assert!(spec.to_resource_txt().is_err());
        let mut spec = sample();
        spec.container_id = Some("a\nSLOTS={}".into());
        assert!(spec.to_resource_txt().is_err());
        let mut spec = sample();
        spec.allocations.insert("cuda.device".into(), vec![("0,1".into(), SlotAmount::from_u64(1))]);
        assert!(spec.to_resource_txt().is_err());
    }

    #[test]
    fn non_core_cpu_devices_are_not_restorable() {
        let mut spec = sample();
        spec.allocations.insert("cpu".into(), vec![("core-a".into(), SlotAmount::from_u64(1))]);
        let err = spec.allocation().expect_err("not a core");
        assert!(err.to_string().contains("core-a"), "{err}");
    }

    #[test]
    fn files_are_written_whole_and_cid_appended() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(RESOURCE_TXT);
        let mut spec = sample();
        spec.container_id = None;
        spec.write_to(&path).expect("writes");
        append_container_id(&path, "cafe").expect("appends");
        let back = KernelResourceSpec::read_from(&path).expect("reads");
        assert_eq!(back.container_id.as_deref(), Some("cafe"));
        assert!(!dir.path().join("resource.txt.tmp").exists());
        let err = KernelResourceSpec::read_from(&dir.path().join("missing.txt")).expect_err("missing");
        assert!(err.to_string().contains("missing.txt"), "{err}");
        assert!(append_container_id(&path, "").is_err());
    }
}
