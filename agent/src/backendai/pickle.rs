//! Backend.AI's msgpack extension types, decoded into plain msgpack values without executing
//! anything: UUIDs, temporenc datetimes, paths, and the Python pickles of `Decimal`, enums,
//! `ImageRef`, `ResourceSlot`, `SlotName` and `BinarySize`.
//!
//! What backend.ai-common 26.9.6 (`ai/backend/common/msgpack.py`, `ExtTypes` and `_default`)
//! puts in an ext value, and what [`decode_ext`] makes of it:
//!
//! | ext | Python type | bytes | plain value |
//! |---|---|---|---|
//! | 1 | `uuid.UUID` | the 16 bytes | `"8f1c2e4a-5b6d-4e7f-9a0b-1c2d3e4f5a6b"` |
//! | 2 | `datetime.datetime` | `temporenc.packb` | `.isoformat()` of the decoded value (1) |
//! | 3 | `decimal.Decimal` | pickle | its `str()`: `"1.5"`, `"1E+3"`, `"NaN"` |
//! | 4 | `pathlib.PosixPath` | `os.fsencode` | the path |
//! | 5 | `pathlib.PurePosixPath` | `os.fsencode` | the path |
//! | 6 | an `enum.Enum` member | pickle | its `.value`, string or integer (2) |
//! | 7 | `docker.ImageRef` | pickle | map of its fields, `canonical` and `short` (3) |
//! | 8 | `types.ResourceSlot` | pickle | map of slot name to decimal string |
//! | 9 | `types.SlotName` | pickle | the string |
//! | 16 | `types.BinarySize` | pickle | the integer |
//! | 17 | `typed_validators.AutoDirectoryPath` | `os.fsencode` | the path |
//!
//! (1) Naive for temporenc's zoneless types; UTC with `+00:00` for the zoned ones (temporenc
//! stores UTC; `unpackb(...).datetime()` drops the original offset). (2) Found as `cls(value)`
//! finds it: exactly, or by the class's own `_missing_` (case-insensitive for `CIStrEnum`,
//! aliases for `ClusterMode` and `VFolderMountPolicy`); a value that is no member is refused,
//! as Python refuses it. (3) `name, project, tag, registry, architecture, is_local`, and the
//! `canonical` and `short` properties as Python computes them.
//!
//! The pickles are protocol 5 (`pickle.dumps(obj, protocol=5)`). They are read by a small
//! pickle machine that knows only the opcodes such payloads use and never calls anything: a
//! class reference (`GLOBAL`, `STACK_GLOBAL`) must name one of the classes in [`ALLOWED`],
//! and `REDUCE`, `NEWOBJ` and `BUILD` only record arguments and state, which are turned into
//! a plain value by the class's known shape at the end. Every length is checked against the
//! bytes left before anything is allocated, and the machine's stack, memo, nesting and output
//! are bounded.

use rmpv::Value;
use rustc_hash::FxHashMap;

/// `ExtTypes.UUID`: the 16 bytes of a UUID.
pub const EXT_UUID: i8 = 1;
/// `ExtTypes.DATETIME`: a temporenc value.
pub const EXT_DATETIME: i8 = 2;
/// `ExtTypes.DECIMAL`: a pickled `decimal.Decimal`.
pub const EXT_DECIMAL: i8 = 3;
/// `ExtTypes.POSIX_PATH`: a `PosixPath`, file-system encoded.
pub const EXT_POSIX_PATH: i8 = 4;
/// `ExtTypes.PURE_POSIX_PATH`: a `PurePosixPath`, file-system encoded.
pub const EXT_PURE_POSIX_PATH: i8 = 5;
/// `ExtTypes.ENUM`: a pickled enum member.
pub const EXT_ENUM: i8 = 6;
/// `ExtTypes.IMAGE_REF`: a pickled `ImageRef`.
pub const EXT_IMAGE_REF: i8 = 7;
/// `ExtTypes.RESOURCE_SLOT`: a pickled `ResourceSlot`.
pub const EXT_RESOURCE_SLOT: i8 = 8;
/// `ExtTypes.SLOT_NAME`: a pickled `SlotName`.
pub const EXT_SLOT_NAME: i8 = 9;
/// `ExtTypes.BACKENDAI_BINARY_SIZE`: a pickled `BinarySize`.
pub const EXT_BINARY_SIZE: i8 = 16;
/// `ExtTypes.AUTO_DIRECTORY_PATH`: an `AutoDirectoryPath`, file-system encoded.
pub const EXT_AUTO_DIRECTORY_PATH: i8 = 17;

/// A pickle longer than this is refused unread (the manager's are a few hundred bytes).
pub const MAX_PICKLE_BYTES: usize = 1024 * 1024;
/// The most items the pickle machine's stack may hold, marks included.
pub const MAX_STACK: usize = 1 << 16;
/// The most memo entries a pickle may define.
pub const MAX_MEMO: usize = 1 << 16;
/// How deeply the value a pickle builds may nest.
pub const MAX_PICKLE_DEPTH: usize = 64;
/// The most plain values (scalars and containers) one pickle may expand to; memo references
/// can share an object many times, and each use is counted.
pub const MAX_PICKLE_NODES: usize = 1 << 16;
/// How deeply [`plain`] walks a msgpack value.
pub const MAX_PLAIN_DEPTH: usize = 512;

/// Why an extension value could not be turned into a plain value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtError {
    #[error("ext type {0} is not one of Backend.AI's")]
    UnknownType(i8),
    #[error("ext type 1 (UUID) must hold 16 bytes, not {0}")]
    UuidLength(usize),
    #[error("ext type 2 (datetime) is not a temporenc date and time: {0}")]
    Datetime(&'static str),
    #[error("ext type {0} (path) is not valid UTF-8")]
    PathEncoding(i8),
    #[error("pickle refers to class `{0}`, which is not one of Backend.AI's")]
    ForbiddenClass(String),
    #[error("truncated pickle at byte {0}")]
    Truncated(usize),
    #[error("unsupported pickle opcode 0x{op:02x} at byte {at}")]
    UnsupportedOpcode { op: u8, at: usize },
    #[error("malformed pickle at byte {at}: {reason}")]
    Malformed { at: usize, reason: &'static str },
    #[error("pickle exceeds the limit on {0}")]
    Limit(&'static str),
    #[error("pickle of {0} bytes is larger than the {MAX_PICKLE_BYTES} bytes allowed")]
    TooLarge(usize),
    #[error("`{value}` is not a member of `{class}`")]
    NotAMember { class: &'static str, value: String },
    #[error("pickled `{class}` has no `{field}`")]
    MissingField { class: &'static str, field: &'static str },
    #[error("pickled `{class}` has an unexpected shape: {reason}")]
    Shape { class: &'static str, reason: &'static str },
    #[error("pickle does not hold plain data: {0}")]
    NotPlain(&'static str),
    #[error("value nests deeper than {0} levels")]
    TooDeep(usize),
}

/// Decodes one Backend.AI extension value into a plain msgpack value (see the module table).
pub fn decode_ext(kind: i8, data: &[u8]) -> Result<Value, ExtError> {
    match kind {
        EXT_UUID => uuid_string(data).map(Value::from),
        EXT_DATETIME => temporenc_iso8601(data).map(Value::from),
        EXT_POSIX_PATH | EXT_PURE_POSIX_PATH | EXT_AUTO_DIRECTORY_PATH => match std::str::from_utf8(data) {
            Ok(path) => Ok(Value::from(path)),
            Err(_) => Err(ExtError::PathEncoding(kind)),
        },
        EXT_DECIMAL | EXT_ENUM | EXT_IMAGE_REF | EXT_RESOURCE_SLOT | EXT_SLOT_NAME | EXT_BINARY_SIZE => unpickle(data),
        _ => Err(ExtError::UnknownType(kind)),
    }
}

/// Replaces every extension value in `value` (array items, map keys and map values, at any
/// depth up to [`MAX_PLAIN_DEPTH`]) by its [`decode_ext`] form.
pub fn plain(mut value: Value) -> Result<Value, ExtError> {
    replace_ext(&mut value, 0)?;
    Ok(value)
}

fn replace_ext(value: &mut Value, depth: usize) -> Result<(), ExtError> {
    if depth > MAX_PLAIN_DEPTH {
        return Err(ExtError::TooDeep(MAX_PLAIN_DEPTH));
    }
    match value {
        Value::Ext(kind, data) => {
            let decoded = decode_ext(*kind, data)?;
            *value = decoded;
        }
        Value::Array(items) => {
            for item in items {
                replace_ext(item, depth + 1)?;
            }
        }
        Value::Map(pairs) => {
            for (key, item) in pairs {
                replace_ext(key, depth + 1)?;
                replace_ext(item, depth + 1)?;
            }
        }
        _ => {}
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// UUID and datetime

fn uuid_string(data: &[u8]) -> Result<String, ExtError> {
    uuid::Uuid::from_slice(data).map(|id| id.to_string()).map_err(|_| ExtError::UuidLength(data.len()))
}

/// `temporenc.unpackb(data).datetime()` (strict, not local), written as Python's
/// `datetime.isoformat()`: naive for the types without a zone (`DT`, `DTS`), UTC with
/// `+00:00` for those with one (`DTZ`, `DTSZ`; temporenc stores UTC and the original offset
/// is dropped, as Python drops it). Date-only and time-only values are refused, as Python's
/// strict conversion refuses them.
fn temporenc_iso8601(data: &[u8]) -> Result<String, ExtError> {
    use ExtError::Datetime as E;
    let Some(&first) = data.first() else { return Err(E("no bytes")) };
    // The four types that hold a date and a time; sub-second precision 0 ms, 1 µs, 2 ns, 3 none.
    enum Layout {
        Dt,
        Dts(u8),
        Dtz,
        Dtsz(u8),
    }
    let (layout, length) = match first {
        0x00..=0x3f => (Layout::Dt, 5),
        0x40..=0x7f => {
            let p = (first >> 4) & 0b11;
            (Layout::Dts(p), [7, 8, 9, 6][usize::from(p)])
        }
        0x80..=0xa1 => return Err(E("a date or a time alone, not a date and time")),
        0xa2..=0xbf => return Err(E("the first byte holds no valid type tag")),
        0xc0..=0xdf => (Layout::Dtz, 6),
        0xe0..=0xff => {
            let p = (first >> 3) & 0b11;
            (Layout::Dtsz(p), [8, 9, 10, 7][usize::from(p)])
        }
    };
    if data.len() != length {
        return Err(E("wrong length for its type"));
    }
    let n = data.iter().fold(0u128, |acc, &b| (acc << 8) | u128::from(b));
    // With sub-seconds, the first 6 bytes hold D and T.
    let head = n >> (8 * length.saturating_sub(6));
    let zoned = matches!(layout, Layout::Dtz | Layout::Dtsz(_));
    let (date, time, nanos) = match layout {
        // 00DDDDDD DDDDDDDD DDDDDDDT TTTTTTTT TTTTTTTT
        Layout::Dt => (n >> 17, n, None),
        // 01PPDDDD DDDDDDDD DDDDDDDD DTTTTTTT TTTTTTTT TTSSSSSS (S in the last 4 bytes)
        Layout::Dts(p) => {
            let head = head >> 6;
            let tail = n & 0xffff_ffff;
            let nanos = match p {
                0 => Some(((tail >> 4) & 0x3ff) * 1_000_000),
                1 => Some(((tail >> 2) & 0xf_ffff) * 1_000),
                2 => Some(tail & 0x3fff_ffff),
                _ => None,
            };
            (head >> 17, head, nanos)
        }
        // 110DDDDD DDDDDDDD DDDDDDDD TTTTTTTT TTTTTTTT TZZZZZZZ
        Layout::Dtz => (n >> 24, n >> 7, None),
        // 111PPDDD DDDDDDDD DDDDDDDD DDTTTTTT TTTTTTTT TTTSSSSS (S and Z in the last 5 bytes)
        Layout::Dtsz(p) => {
            let head = head >> 5;
            let tail = n & 0xff_ffff_ffff;
            let nanos = match p {
                0 => Some(((tail >> 11) & 0x3ff) * 1_000_000),
                1 => Some(((tail >> 9) & 0xf_ffff) * 1_000),
                2 => Some((tail >> 7) & 0x3fff_ffff),
                _ => None,
            };
            (head >> 17, head, nanos)
        }
    };
    let (date, time) = (date & 0x1f_ffff, time & 0x1_ffff);
    // Each field is masked to at most 12 bits, so the casts below are lossless.
    let year = ((date >> 9) & 0xfff) as u32;
    let month = ((date >> 5) & 0xf) as u32;
    let day = (date & 0x1f) as u32;
    let hour = ((time >> 12) & 0x1f) as u32;
    let minute = ((time >> 6) & 0x3f) as u32;
    let second = (time & 0x3f) as u32;
    if month != 15 && month > 11 {
        return Err(E("month not within supported range"));
    }
    if hour != 31 && hour > 23 {
        return Err(E("hour not within supported range"));
    }
    if minute != 63 && minute > 59 {
        return Err(E("minute not within supported range"));
    }
    if second != 63 && second > 60 {
        return Err(E("second not within supported range"));
    }
    if nanos.is_some_and(|ns| ns > 999_999_999) {
        return Err(E("sub-second precision not within supported range"));
    }
    if year == 4095 || month == 15 || day == 31 {
        return Err(E("incomplete date information"));
    }
    if hour == 31 || minute == 63 || second == 63 {
        return Err(E("incomplete time information"));
    }
    let (month, day) = (month + 1, day + 1);
    // What `datetime.datetime(...)` itself refuses.
    if year < 1 {
        return Err(E("year 0 is out of range"));
    }
    if second > 59 {
        return Err(E("second must be in 0..59"));
    }
    let leap = year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400));
    let days_in_month = match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if day > days_in_month {
        return Err(E("day is out of range for month"));
    }
    let micros = nanos.map_or(0, |ns| ns / 1_000);
    let mut out = format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}");
    if micros != 0 {
        out.push_str(&format!(".{micros:06}"));
    }
    if zoned {
        out.push_str("+00:00");
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The classes a pickle may name

/// How a class's pickle becomes a plain value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `decimal.Decimal`: `REDUCE` with the string form → that string.
    Decimal,
    /// `pathlib` paths: `REDUCE` with the path string(s) → the path string.
    Path,
    /// An enum: `REDUCE` with a value (`Enum.__reduce_ex__`) → the `.value` of the member that
    /// `cls(value)` finds.
    Enum(EnumDef),
    /// `ImageRef` (a dataclass): `NEWOBJ` and `BUILD` with its `__dict__` → a map of its fields.
    ImageRef,
    /// `PlatformTagSet` (inside `ImageRef._tag_set`): `NEWOBJ` and `BUILD` with `_data`.
    PlatformTagSet,
    /// `ResourceSlot` (a `UserDict`): `NEWOBJ` and `BUILD` with `data` → that map.
    ResourceSlot,
    /// `SlotName` (a `UserString`): `NEWOBJ` (whose arguments `object.__new__` ignores) and
    /// `BUILD` with `data` → that string.
    SlotName,
    /// `BinarySize` (an `int`): `NEWOBJ` with the integer.
    BinarySize,
}

/// A class that a pickle may refer to, by module and qualified name.
#[derive(Debug)]
pub struct AllowedClass {
    pub module: &'static str,
    pub name: &'static str,
    full: &'static str,
    kind: Kind,
}

impl AllowedClass {
    /// `module.qualname`.
    pub fn full_name(&self) -> &'static str {
        self.full
    }
}

macro_rules! allow_list {
    ($($module:literal { $($name:literal => $kind:expr),* $(,)? })*) => {
        &[$($(AllowedClass { module: $module, name: $name, full: concat!($module, ".", $name), kind: $kind },)*)*]
    };
}

/// An enum's members, as `cls(value)` looks them up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EnumDef {
    members: Members,
    /// `CIStrEnum._missing_`: a string equal to a member's value but for case.
    ci: bool,
    /// A custom `_missing_`: lowercased names it maps to a member's value.
    aliases: &'static [(&'static str, &'static str)],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Members {
    Str(&'static [&'static str]),
    Int(&'static [i64]),
}

const fn str_enum(members: &'static [&'static str]) -> Kind {
    Kind::Enum(EnumDef { members: Members::Str(members), ci: false, aliases: &[] })
}

const fn ci_enum(members: &'static [&'static str]) -> Kind {
    Kind::Enum(EnumDef { members: Members::Str(members), ci: true, aliases: &[] })
}

const fn int_enum(members: &'static [i64]) -> Kind {
    Kind::Enum(EnumDef { members: Members::Int(members), ci: false, aliases: &[] })
}

impl EnumDef {
    /// `cls(value).value`, or `None` where Python raises `ValueError` or `TypeError`. A
    /// `SlotName` value has been made a string already, which is how it compares in Python.
    fn lookup(&self, value: &Value) -> Option<Value> {
        match self.members {
            Members::Str(members) => {
                let text = value.as_str()?;
                if let Some(member) = members.iter().find(|member| **member == text) {
                    return Some(Value::from(*member));
                }
                if !self.ci && self.aliases.is_empty() {
                    return None;
                }
                let lower = text.to_lowercase();
                if let Some((_, member)) = self.aliases.iter().find(|(alias, _)| *alias == lower) {
                    return Some(Value::from(*member));
                }
                let found = members.iter().find(|member| self.ci && member.to_lowercase() == lower);
                found.map(|member| Value::from(*member))
            }
            // `1 == True == 1.0` in Python, and they hash alike.
            Members::Int(members) => {
                let found = match value {
                    Value::Integer(number) => members.iter().find(|&&member| number.as_i64() == Some(member)),
                    Value::Boolean(flag) => members.iter().find(|&&member| member == i64::from(*flag)),
                    Value::F64(number) => members.iter().find(|&&member| member as f64 == *number),
                    _ => None,
                };
                found.map(|member| Value::from(*member))
            }
        }
    }
}

/// Every class a pickle may name: the pickled types of `msgpack.py`, the class inside
/// `ImageRef`, the enums of `ai.backend.common.types` that carry data (not the in-process
/// `Sentinel`s), the enums of `ai.backend.common.docker`, and `KernelLifecycleEventReason`
/// (`destroy_kernel`'s reason), with their members, all as backend.ai-common 26.9.6 defines
/// them. Any other class is refused by name, `ai.backend.*` ones included.
pub static ALLOWED: &[AllowedClass] = allow_list! {
    "decimal" { "Decimal" => Kind::Decimal }
    "pathlib" { "PurePosixPath" => Kind::Path, "PosixPath" => Kind::Path }
    "pathlib._local" { "PurePosixPath" => Kind::Path, "PosixPath" => Kind::Path }
    "ai.backend.common.docker" {
        "ImageRef" => Kind::ImageRef,
        "PlatformTagSet" => Kind::PlatformTagSet,
        "DockerConnectorSource" => int_enum(&[1, 2, 3]),
        "KernelFeatures" => str_enum(&["uid-match", "user-input", "batch", "query", "tty", "operation", "private"]),
        "LabelName" => str_enum(&[
            "ai.backend.kernelspec", "ai.backend.features", "ai.backend.base-distro",
            "ai.backend.runtime-type", "ai.backend.runtime-path", "ai.backend.role",
            "ai.backend.envs.corecount", "ai.backend.accelerators", "ai.backend.service-ports",
            "ai.backend.internal.block-service-ports", "ai.backend.agent-id", "ai.backend.kernel-id",
            "ai.backend.session-id", "ai.backend.owner", "ai.backend.endpoint-ports", "ai.backend.model-path",
            "ai.backend.model-format", "ai.backend.customized-image.owner", "ai.backend.customized-image.name",
            "ai.backend.customized-image.id", "ai.backend.customized-image.user.email",
            "ai.backend.owner-user-id", "ai.backend.owner-project-id",
        ]),
    }
    "ai.backend.common.types" {
        "ResourceSlot" => Kind::ResourceSlot,
        "SlotName" => Kind::SlotName,
        "BinarySize" => Kind::BinarySize,
        "AbuseReportValue" => str_enum(&["detected", "cleaning"]),
        "AgentSelectionStrategy" => str_enum(&["dispersed", "concentrated", "roundrobin", "legacy"]),
        "AutoPullBehavior" => str_enum(&["digest", "tag", "none"]),
        "AutoScalingMetricComparator" => ci_enum(&[
            "less_than", "less_than_or_equal", "greater_than", "greater_than_or_equal",
        ]),
        "AutoScalingMetricSource" => ci_enum(&["kernel", "inference_framework", "prometheus"]),
        "ClusterMode" => Kind::Enum(EnumDef {
            members: Members::Str(&["single-node", "multi-node"]),
            ci: false,
            aliases: &[
                ("single-node", "single-node"),
                ("single_node", "single-node"),
                ("multi-node", "multi-node"),
                ("multi_node", "multi-node"),
            ],
        }),
        "CommitStatus" => str_enum(&["ready", "ongoing"]),
        "ContainerStatus" => str_enum(&["created", "running", "restarting", "paused", "exited", "dead", "removing"]),
        "DefaultForUnspecified" => str_enum(&["LIMITED", "UNLIMITED"]),
        "HandlerForUnknownSlotName" => str_enum(&["drop", "error"]),
        "IntrinsicSlotNames" => str_enum(&["cpu", "mem"]),
        "KernelLifecycleStatus" => str_enum(&[
            "preparing", "running", "terminating", "not_registered", "container_not_found",
        ]),
        "LegacyResourceSlotState" => str_enum(&["using", "remaining"]),
        "ModelServiceStatus" => str_enum(&["healthy", "unhealthy"]),
        "MountPermission" => str_enum(&["ro", "rw", "wd"]),
        "MountTypes" => str_enum(&["volume", "bind", "tmpfs", "overlay", "k8s-generic", "k8s-hostpath"]),
        "PreemptionMode" => str_enum(&["terminate", "reschedule"]),
        "PreemptionOrder" => str_enum(&["oldest", "newest", "fewest-sessions", "smallest-resources"]),
        "PreemptionVictimScope" => str_enum(&["user", "project", "domain", "resource-group"]),
        "PromMetricPrimitive" => str_enum(&["counter", "gauge", "histogram", "summary", "untyped"]),
        "QuotaScopeType" => str_enum(&["user", "project"]),
        "ResourceGroupType" => str_enum(&["compute", "storage"]),
        "ResourceSlotState" => str_enum(&["occupied", "available"]),
        "ServiceCatalogStatus" => str_enum(&["healthy", "unhealthy", "deregistered"]),
        "ServiceDiscoveryType" => str_enum(&["etcd", "redis"]),
        "ServicePortProtocols" => str_enum(&["http", "tcp", "preopen", "internal", "vnc", "rdp"]),
        "SessionExecutionStatus" => str_enum(&["started", "finished", "canceled", "timeout"]),
        "SessionResult" => ci_enum(&["undefined", "success", "failure"]),
        "SessionTypes" => ci_enum(&["interactive", "batch", "inference", "system"]),
        "SlotTypes" => str_enum(&["count", "bytes", "unique", "unified"]),
        "VFolderHostPermission" => str_enum(&[
            "create-vfolder", "modify-vfolder", "delete-vfolder", "mount-in-session", "upload-file",
            "download-file", "invite-others", "set-user-specific-permission",
        ]),
        "VFolderMountPolicy" => Kind::Enum(EnumDef {
            members: Members::Str(&["none", "ro", "rw"]),
            ci: true,
            aliases: &[
                ("wd", "rw"),
                ("rw_delete", "rw"),
                ("owner_perm", "rw"),
                ("read_write", "rw"),
                ("read_only", "ro"),
            ],
        }),
        "VFolderUsageMode" => ci_enum(&["general", "model", "data"]),
        "VolumeMountableNodeType" => str_enum(&["agent", "storage_proxy"]),
    }
    "ai.backend.common.events.event_types.kernel.types" {
        "KernelLifecycleEventReason" => str_enum(&[
            "agent-termination", "already-terminated", "anomaly-detected", "exec-timeout", "failed-to-create",
            "failed-to-start", "force-terminated", "bootstrap-timeout", "hang-timeout", "idle-timeout",
            "idle-session-lifetime", "idle-utilization", "killed-by-event", "service-scaled-down",
            "new-container-started", "pending-timeout", "restarting", "restart-timeout",
            "resuming-agent-operation", "self-terminated", "task-failed", "task-timeout", "task-cancelled",
            "task-finished", "terminated-unknown-container", "unknown", "user-requested", "user-purged",
            "not-found-in-manager", "container-not-found", "route-termination", "dry-run-complete",
            "preempted-by-scheduler", "agent-resource-group-changed", "stale-kernel", "exceeded-max-retries",
            "abnormal-termination", "rescheduled", "triggered-by-scheduler", "passed-preconditions",
            "deprioritized-for-rescheduling", "preemption-reservation", "preempted-by-reservation",
            "kernel-handler-failure",
        ]),
    }
};

fn resolve(module: &str, name: &str) -> Result<&'static AllowedClass, ExtError> {
    ALLOWED.iter().find(|class| class.module == module && class.name == name).ok_or_else(|| {
        // The names come from the input: escape them and keep the message short.
        let full: String = format!("{module}.{name}").chars().flat_map(char::escape_debug).take(200).collect();
        ExtError::ForbiddenClass(full)
    })
}

// ---------------------------------------------------------------------------------------------
// The pickle machine

/// The most bytes of strings the value of one pickle may expand to (a memoized string used
/// many times counts each time).
const MAX_PICKLE_OUTPUT_BYTES: usize = 16 * 1024 * 1024;

mod op {
    pub const MARK: u8 = b'(';
    pub const STOP: u8 = b'.';
    pub const POP: u8 = b'0';
    pub const POP_MARK: u8 = b'1';
    pub const DUP: u8 = b'2';
    pub const BINFLOAT: u8 = b'G';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const NONE: u8 = b'N';
    pub const REDUCE: u8 = b'R';
    pub const BINUNICODE: u8 = b'X';
    pub const BINBYTES: u8 = b'B';
    pub const SHORT_BINBYTES: u8 = b'C';
    pub const EMPTY_LIST: u8 = b']';
    pub const APPEND: u8 = b'a';
    pub const BUILD: u8 = b'b';
    pub const GLOBAL: u8 = b'c';
    pub const DICT: u8 = b'd';
    pub const APPENDS: u8 = b'e';
    pub const BINGET: u8 = b'h';
    pub const LONG_BINGET: u8 = b'j';
    pub const LIST: u8 = b'l';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const SETITEM: u8 = b's';
    pub const TUPLE: u8 = b't';
    pub const SETITEMS: u8 = b'u';
    pub const EMPTY_DICT: u8 = b'}';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const PROTO: u8 = 0x80;
    pub const NEWOBJ: u8 = 0x81;
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const LONG1: u8 = 0x8a;
    pub const LONG4: u8 = 0x8b;
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const BINBYTES8: u8 = 0x8e;
    pub const EMPTY_SET: u8 = 0x8f;
    pub const ADDITEMS: u8 = 0x90;
    pub const FROZENSET: u8 = 0x91;
    pub const NEWOBJ_EX: u8 = 0x92;
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const MEMOIZE: u8 = 0x94;
    pub const FRAME: u8 = 0x95;
    pub const BYTEARRAY8: u8 = 0x96;
}

/// An index into the machine's arena. Containers hold ids, so a memoized container that is
/// filled later (as `EMPTY_DICT`, `MEMOIZE`, …, `SETITEMS` does) is seen filled everywhere.
type Id = usize;

#[derive(Debug)]
enum Obj {
    None,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(Box<str>),
    Bytes(Box<[u8]>),
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Set(Vec<Id>),
    Class(&'static AllowedClass),
    /// What `REDUCE` (`newobj: false`) or `NEWOBJ` made of a class and an argument tuple,
    /// with the state a later `BUILD` gave it. Nothing is called: the class's [`Kind`] reads
    /// these when the value is made plain.
    Object {
        class: &'static AllowedClass,
        newobj: bool,
        args: Id,
        state: Option<Id>,
    },
}

/// Reads one pickle into a plain value.
fn unpickle(data: &[u8]) -> Result<Value, ExtError> {
    if data.len() > MAX_PICKLE_BYTES {
        return Err(ExtError::TooLarge(data.len()));
    }
    let mut machine = Machine {
        data,
        pos: 0,
        arena: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: FxHashMap::default(),
        checks: Budget::new(),
    };
    let result = machine.run()?;
    machine.to_value(result, 0, &mut Budget::new())
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    arena: Vec<Obj>,
    stack: Vec<Id>,
    /// Stack lengths at each `MARK`; the last one is the fence that plain pops may not cross.
    marks: Vec<usize>,
    memo: FxHashMap<u32, Id>,
    /// What the checks made at `REDUCE`, `NEWOBJ` and `BUILD` may spend, all together.
    checks: Budget,
}

fn malformed(at: usize, reason: &'static str) -> ExtError {
    ExtError::Malformed { at, reason }
}

impl<'a> Machine<'a> {
    /// Runs to `STOP` and returns the id of the value on top of the stack. Every opcode reads
    /// at least one byte, so this takes at most `data.len()` steps.
    fn run(&mut self) -> Result<Id, ExtError> {
        loop {
            let at = self.pos;
            let code = self.byte()?;
            match code {
                op::PROTO => {
                    if self.byte()? > 5 {
                        return Err(malformed(at, "pickle protocol above 5"));
                    }
                }
                op::FRAME => {
                    let length = u64::from_le_bytes(self.array()?);
                    if usize::try_from(length).map_or(true, |length| length > self.data.len().saturating_sub(self.pos))
                    {
                        return Err(ExtError::Truncated(self.data.len()));
                    }
                }
                op::STOP => return self.pop(at),
                op::MARK => {
                    self.check_room()?;
                    self.marks.push(self.stack.len());
                }
                op::POP => {
                    if self.stack.len() > self.fence() {
                        self.stack.pop();
                    } else if self.marks.pop().is_none() {
                        return Err(malformed(at, "POP on an empty stack"));
                    }
                }
                op::POP_MARK => {
                    self.pop_mark(at)?;
                }
                op::DUP => {
                    let top = self.top(at)?;
                    self.push_id(top)?;
                }
                op::NONE => self.push(Obj::None)?,
                op::NEWTRUE => self.push(Obj::Bool(true))?,
                op::NEWFALSE => self.push(Obj::Bool(false))?,
                op::BININT => {
                    let value = i32::from_le_bytes(self.array()?);
                    self.push(Obj::Int(i128::from(value)))?;
                }
                op::BININT1 => {
                    let value = self.byte()?;
                    self.push(Obj::Int(i128::from(value)))?;
                }
                op::BININT2 => {
                    let value = u16::from_le_bytes(self.array()?);
                    self.push(Obj::Int(i128::from(value)))?;
                }
                op::LONG1 => {
                    let length = usize::from(self.byte()?);
                    let bytes = self.take(length)?;
                    self.push(Obj::Int(long_value(bytes)?))?;
                }
                op::LONG4 => {
                    let length = i32::from_le_bytes(self.array()?);
                    let length = usize::try_from(length).map_err(|_| malformed(at, "LONG4 with a negative length"))?;
                    let bytes = self.take(length)?;
                    self.push(Obj::Int(long_value(bytes)?))?;
                }
                op::BINFLOAT => {
                    let value = f64::from_be_bytes(self.array()?);
                    self.push(Obj::Float(value))?;
                }
                op::SHORT_BINUNICODE => {
                    let length = usize::from(self.byte()?);
                    self.string(at, length)?;
                }
                op::BINUNICODE => {
                    let length = u32::from_le_bytes(self.array()?);
                    self.string(at, usize::try_from(length).unwrap_or(usize::MAX))?;
                }
                op::BINUNICODE8 => {
                    let length = u64::from_le_bytes(self.array()?);
                    self.string(at, usize::try_from(length).unwrap_or(usize::MAX))?;
                }
                op::SHORT_BINBYTES => {
                    let length = usize::from(self.byte()?);
                    self.bytes(length)?;
                }
                op::BINBYTES => {
                    let length = u32::from_le_bytes(self.array()?);
                    self.bytes(usize::try_from(length).unwrap_or(usize::MAX))?;
                }
                op::BINBYTES8 | op::BYTEARRAY8 => {
                    let length = u64::from_le_bytes(self.array()?);
                    self.bytes(usize::try_from(length).unwrap_or(usize::MAX))?;
                }
                op::EMPTY_TUPLE => self.push(Obj::Tuple(Vec::new()))?,
                op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                    let count = usize::from(code - op::TUPLE1 + 1);
                    if self.stack.len() < self.fence() + count {
                        return Err(malformed(at, "stack underflow"));
                    }
                    let items = self.stack.split_off(self.stack.len() - count);
                    self.push(Obj::Tuple(items))?;
                }
                op::TUPLE => {
                    let items = self.pop_mark(at)?;
                    self.push(Obj::Tuple(items))?;
                }
                op::EMPTY_LIST => self.push(Obj::List(Vec::new()))?,
                op::LIST => {
                    let items = self.pop_mark(at)?;
                    self.push(Obj::List(items))?;
                }
                op::APPEND => {
                    let item = self.pop(at)?;
                    let list = self.top(at)?;
                    match self.obj_mut(list)? {
                        Obj::List(items) => items.push(item),
                        _ => return Err(malformed(at, "APPEND to something not a list")),
                    }
                }
                op::APPENDS => {
                    let new = self.pop_mark(at)?;
                    let list = self.top(at)?;
                    match self.obj_mut(list)? {
                        Obj::List(items) => items.extend(new),
                        _ => return Err(malformed(at, "APPENDS to something not a list")),
                    }
                }
                op::EMPTY_DICT => self.push(Obj::Dict(Vec::new()))?,
                op::DICT => {
                    let items = self.pop_mark(at)?;
                    let pairs = self.pairs(at, &items)?;
                    self.push(Obj::Dict(pairs))?;
                }
                op::SETITEM => {
                    let value = self.pop(at)?;
                    let key = self.pop(at)?;
                    let pairs = self.pairs(at, &[key, value])?;
                    self.extend_dict(at, pairs)?;
                }
                op::SETITEMS => {
                    let items = self.pop_mark(at)?;
                    let pairs = self.pairs(at, &items)?;
                    self.extend_dict(at, pairs)?;
                }
                op::EMPTY_SET => self.push(Obj::Set(Vec::new()))?,
                op::FROZENSET => {
                    let items = self.pop_mark(at)?;
                    self.push(Obj::Set(items))?;
                }
                op::ADDITEMS => {
                    let new = self.pop_mark(at)?;
                    let set = self.top(at)?;
                    match self.obj_mut(set)? {
                        Obj::Set(items) => items.extend(new),
                        _ => return Err(malformed(at, "ADDITEMS to something not a set")),
                    }
                }
                op::GLOBAL => {
                    let module = self.line(at)?;
                    let name = self.line(at)?;
                    let class = resolve(module, name)?;
                    self.push(Obj::Class(class))?;
                }
                op::STACK_GLOBAL => {
                    let name = self.pop(at)?;
                    let module = self.pop(at)?;
                    let class = match (self.obj(module)?, self.obj(name)?) {
                        (Obj::Str(module), Obj::Str(name)) => resolve(module, name)?,
                        _ => return Err(malformed(at, "STACK_GLOBAL on something not two strings")),
                    };
                    self.push(Obj::Class(class))?;
                }
                op::REDUCE | op::NEWOBJ | op::NEWOBJ_EX => {
                    if code == op::NEWOBJ_EX {
                        let kwargs = self.pop(at)?;
                        if !matches!(self.obj(kwargs)?, Obj::Dict(pairs) if pairs.is_empty()) {
                            return Err(malformed(at, "NEWOBJ_EX with keyword arguments"));
                        }
                    }
                    let args = self.pop(at)?;
                    let class = self.pop(at)?;
                    if !matches!(self.obj(args)?, Obj::Tuple(_)) {
                        return Err(malformed(at, "class arguments are not a tuple"));
                    }
                    let Obj::Class(class) = self.obj(class)? else {
                        return Err(malformed(at, "a call of something not a class"));
                    };
                    let (class, newobj) = (*class, code != op::REDUCE);
                    // What Python's call would refuse, refused now, as Python refuses it even
                    // where the object is not part of the result.
                    let mut checks = self.checks;
                    let checked = self.check_new(class, newobj, args, &mut checks);
                    self.checks = checks;
                    checked?;
                    self.push(Obj::Object { class, newobj, args, state: None })?;
                }
                op::BUILD => {
                    let new_state = self.pop(at)?;
                    let object = self.top(at)?;
                    if let Obj::Object { class, state: None, .. } = self.obj(object)? {
                        let mut checks = self.checks;
                        let checked = self.check_build(class, new_state, &mut checks);
                        self.checks = checks;
                        checked?;
                    }
                    match self.obj_mut(object)? {
                        Obj::Object { state: state @ None, .. } => *state = Some(new_state),
                        Obj::Object { .. } => return Err(malformed(at, "BUILD on an object built already")),
                        _ => return Err(malformed(at, "BUILD on something not an object")),
                    }
                }
                op::MEMOIZE => {
                    let index = u32::try_from(self.memo.len()).map_err(|_| ExtError::Limit("memo size"))?;
                    self.put(at, index)?;
                }
                op::BINPUT => {
                    let index = self.byte()?;
                    self.put(at, u32::from(index))?;
                }
                op::LONG_BINPUT => {
                    let index = u32::from_le_bytes(self.array()?);
                    self.put(at, index)?;
                }
                op::BINGET => {
                    let index = self.byte()?;
                    self.get(at, u32::from(index))?;
                }
                op::LONG_BINGET => {
                    let index = u32::from_le_bytes(self.array()?);
                    self.get(at, index)?;
                }
                _ => return Err(ExtError::UnsupportedOpcode { op: code, at }),
            }
        }
    }

    // Input.

    fn take(&mut self, length: usize) -> Result<&'a [u8], ExtError> {
        let data: &'a [u8] = self.data;
        let end = self.pos.checked_add(length).filter(|&end| end <= data.len());
        let bytes = end.and_then(|end| data.get(self.pos..end)).ok_or(ExtError::Truncated(data.len()))?;
        self.pos += length;
        Ok(bytes)
    }

    fn byte(&mut self) -> Result<u8, ExtError> {
        let bytes = self.take(1)?;
        bytes.first().copied().ok_or(ExtError::Truncated(self.data.len()))
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ExtError> {
        let bytes = self.take(N)?;
        <[u8; N]>::try_from(bytes).map_err(|_| ExtError::Truncated(self.data.len()))
    }

    /// A `\n`-terminated ASCII/UTF-8 line (the arguments of `GLOBAL`).
    fn line(&mut self, at: usize) -> Result<&'a str, ExtError> {
        let data: &'a [u8] = self.data;
        let rest = data.get(self.pos..).unwrap_or_default();
        let length = rest.iter().position(|&b| b == b'\n').ok_or(ExtError::Truncated(data.len()))?;
        let line = self.take(length)?;
        self.take(1)?;
        std::str::from_utf8(line).map_err(|_| malformed(at, "GLOBAL name is not valid UTF-8"))
    }

    fn string(&mut self, at: usize, length: usize) -> Result<(), ExtError> {
        let bytes = self.take(length)?;
        let text = std::str::from_utf8(bytes).map_err(|_| malformed(at, "string is not valid UTF-8"))?;
        self.push(Obj::Str(text.into()))
    }

    fn bytes(&mut self, length: usize) -> Result<(), ExtError> {
        let bytes = self.take(length)?;
        self.push(Obj::Bytes(bytes.into()))
    }

    // The arena and the stack.

    fn obj(&self, id: Id) -> Result<&Obj, ExtError> {
        self.arena.get(id).ok_or(ExtError::Limit("arena"))
    }

    fn obj_mut(&mut self, id: Id) -> Result<&mut Obj, ExtError> {
        self.arena.get_mut(id).ok_or(ExtError::Limit("arena"))
    }

    fn fence(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn check_room(&self) -> Result<(), ExtError> {
        if self.stack.len() + self.marks.len() >= MAX_STACK {
            return Err(ExtError::Limit("stack depth"));
        }
        Ok(())
    }

    fn push(&mut self, obj: Obj) -> Result<(), ExtError> {
        self.check_room()?;
        let id = self.arena.len();
        self.arena.push(obj);
        self.stack.push(id);
        Ok(())
    }

    fn push_id(&mut self, id: Id) -> Result<(), ExtError> {
        self.check_room()?;
        self.stack.push(id);
        Ok(())
    }

    fn top(&self, at: usize) -> Result<Id, ExtError> {
        if self.stack.len() <= self.fence() {
            return Err(malformed(at, "stack underflow"));
        }
        self.stack.last().copied().ok_or_else(|| malformed(at, "stack underflow"))
    }

    fn pop(&mut self, at: usize) -> Result<Id, ExtError> {
        if self.stack.len() <= self.fence() {
            return Err(malformed(at, "stack underflow"));
        }
        self.stack.pop().ok_or_else(|| malformed(at, "stack underflow"))
    }

    /// Everything above the last `MARK`, which is removed.
    fn pop_mark(&mut self, at: usize) -> Result<Vec<Id>, ExtError> {
        let mark = self.marks.pop().ok_or_else(|| malformed(at, "no MARK to pop"))?;
        if mark > self.stack.len() {
            return Err(malformed(at, "stack underflow"));
        }
        Ok(self.stack.split_off(mark))
    }

    /// `items` as key-value pairs, refusing what Python could not use as a key.
    fn pairs(&self, at: usize, items: &[Id]) -> Result<Vec<(Id, Id)>, ExtError> {
        if !items.len().is_multiple_of(2) {
            return Err(malformed(at, "odd number of items for a dict"));
        }
        let mut pairs = Vec::with_capacity(items.len() / 2);
        for pair in items.chunks_exact(2) {
            if let &[key, value] = pair {
                if matches!(self.obj(key)?, Obj::List(_) | Obj::Dict(_) | Obj::Set(_)) {
                    return Err(malformed(at, "unhashable dict key"));
                }
                pairs.push((key, value));
            }
        }
        Ok(pairs)
    }

    fn extend_dict(&mut self, at: usize, pairs: Vec<(Id, Id)>) -> Result<(), ExtError> {
        let dict = self.top(at)?;
        match self.obj_mut(dict)? {
            Obj::Dict(existing) => existing.extend(pairs),
            _ => return Err(malformed(at, "SETITEM on something not a dict")),
        }
        Ok(())
    }

    fn put(&mut self, at: usize, index: u32) -> Result<(), ExtError> {
        let top = self.top(at)?;
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&index) {
            return Err(ExtError::Limit("memo size"));
        }
        self.memo.insert(index, top);
        Ok(())
    }

    fn get(&mut self, at: usize, index: u32) -> Result<(), ExtError> {
        let id = *self.memo.get(&index).ok_or_else(|| malformed(at, "memo key not found"))?;
        self.push_id(id)
    }

    // Plain values.

    fn to_value(&self, id: Id, depth: usize, budget: &mut Budget) -> Result<Value, ExtError> {
        if depth > MAX_PICKLE_DEPTH {
            return Err(ExtError::TooDeep(MAX_PICKLE_DEPTH));
        }
        budget.node()?;
        Ok(match self.obj(id)? {
            Obj::None => Value::Nil,
            Obj::Bool(value) => Value::Boolean(*value),
            Obj::Int(value) => int_value(*value)?,
            Obj::Float(value) => Value::F64(*value),
            Obj::Str(text) => {
                budget.bytes(text.len())?;
                Value::from(&**text)
            }
            Obj::Bytes(bytes) => {
                budget.bytes(bytes.len())?;
                Value::Binary(bytes.to_vec())
            }
            Obj::Tuple(items) | Obj::List(items) | Obj::Set(items) => Value::Array(
                items.iter().map(|&item| self.to_value(item, depth + 1, budget)).collect::<Result<_, _>>()?,
            ),
            Obj::Dict(pairs) => self.dict_value(pairs, depth, budget)?,
            Obj::Class(_) => return Err(ExtError::NotPlain("a class, not a value")),
            Obj::Object { class, newobj, args, state } => {
                self.object_value(class, *newobj, *args, *state, depth, budget)?
            }
        })
    }

    /// A map; a string key set twice keeps its first place and its last value, as in Python.
    fn dict_value(&self, pairs: &[(Id, Id)], depth: usize, budget: &mut Budget) -> Result<Value, ExtError> {
        let mut out: Vec<(Value, Value)> = Vec::with_capacity(pairs.len().min(budget.nodes));
        let mut seen: FxHashMap<&str, usize> = FxHashMap::default();
        for &(key_id, value_id) in pairs {
            let key = self.to_value(key_id, depth + 1, budget)?;
            let value = self.to_value(value_id, depth + 1, budget)?;
            if let Obj::Str(text) = self.obj(key_id)? {
                if let Some(&index) = seen.get(&**text) {
                    if let Some(slot) = out.get_mut(index) {
                        slot.1 = value;
                    }
                    continue;
                }
                seen.insert(text, out.len());
            }
            out.push((key, value));
        }
        Ok(Value::Map(out))
    }

    fn object_value(
        &self,
        class: &'static AllowedClass,
        newobj: bool,
        args: Id,
        state: Option<Id>,
        depth: usize,
        budget: &mut Budget,
    ) -> Result<Value, ExtError> {
        let shape = |reason| ExtError::Shape { class: class.full, reason };
        self.check_new(class, newobj, args, budget)?;
        if let Some(state) = state {
            self.check_build(class, state, budget)?;
        }
        let Obj::Tuple(args) = self.obj(args)? else { return Err(shape("its arguments are not a tuple")) };
        let text = |id: Id, budget: &mut Budget| -> Result<&str, ExtError> {
            match self.obj(id)? {
                Obj::Str(text) => {
                    budget.bytes(text.len())?;
                    Ok(text)
                }
                _ => Err(shape("a string field is not a string")),
            }
        };
        let field = |name: &'static str, budget: &mut Budget| -> Result<Id, ExtError> {
            self.state_item(class, state, name, budget)?
                .ok_or(ExtError::MissingField { class: class.full, field: name })
        };
        match class.kind {
            Kind::Decimal => {
                let [arg] = args.as_slice() else { return Err(shape("it takes one argument")) };
                let number =
                    decimal_string(text(*arg, budget)?).ok_or(shape("its argument is not a decimal number"))?;
                budget.bytes(number.len())?;
                Ok(Value::from(number))
            }
            Kind::Path => {
                let mut path = String::new();
                for &part in args {
                    let part = text(part, budget)?;
                    budget.bytes(1)?;
                    if part.starts_with('/') {
                        path.clear();
                    } else if !path.is_empty() && !path.ends_with('/') {
                        path.push('/');
                    }
                    path.push_str(part);
                }
                if path.is_empty() {
                    path.push('.');
                }
                Ok(Value::from(path))
            }
            Kind::Enum(members) => {
                // `check_new` found the member already.
                let value = args.first().map(|&arg| self.scalar(arg, budget)).transpose()?.flatten();
                value.and_then(|value| members.lookup(&value)).ok_or(shape("it is not a member"))
            }
            Kind::BinarySize => {
                let [arg] = args.as_slice() else { return Err(shape("it takes one argument")) };
                let Obj::Int(value) = self.obj(*arg)? else { return Err(shape("its argument is not an integer")) };
                int_value(*value)
            }
            // `object.__new__` ignores the `NEWOBJ` arguments (`UserString.__getnewargs__`):
            // the string is the `data` that `BUILD` sets.
            Kind::SlotName => Ok(Value::from(text(field("data", budget)?, budget)?)),
            Kind::ResourceSlot | Kind::PlatformTagSet => {
                if !args.is_empty() {
                    return Err(shape("it takes no arguments"));
                }
                let key = if class.kind == Kind::ResourceSlot { "data" } else { "_data" };
                match self.obj(field(key, budget)?)? {
                    Obj::Dict(pairs) => self.dict_value(pairs, depth + 1, budget),
                    _ => Err(shape("its data is not a dict")),
                }
            }
            Kind::ImageRef => {
                if !args.is_empty() {
                    return Err(shape("it takes no arguments"));
                }
                let name = text(field("name", budget)?, budget)?;
                let project = match self.obj(field("project", budget)?)? {
                    Obj::None => None,
                    Obj::Str(project) => {
                        budget.bytes(project.len())?;
                        Some(&**project)
                    }
                    _ => return Err(shape("`project` is neither a string nor None")),
                };
                let tag = text(field("tag", budget)?, budget)?;
                let registry = text(field("registry", budget)?, budget)?;
                let architecture = text(field("architecture", budget)?, budget)?;
                let Obj::Bool(is_local) = self.obj(field("is_local", budget)?)? else {
                    return Err(shape("`is_local` is not a bool"));
                };
                // The `canonical` and `short` properties, with `join_non_empty(..., sep="/")`.
                let join = |parts: &[Option<&str>]| -> String {
                    parts.iter().flatten().filter(|part| !part.is_empty()).copied().collect::<Vec<_>>().join("/")
                };
                let canonical = format!("{}:{tag}", join(&[Some(registry), project, Some(name)]));
                let short = format!("{}:{tag}", join(&[project, Some(name)]));
                budget.bytes(canonical.len() + short.len())?;
                for _ in 0..16 {
                    budget.node()?;
                }
                Ok(Value::Map(vec![
                    (Value::from("name"), Value::from(name)),
                    (Value::from("project"), project.map_or(Value::Nil, Value::from)),
                    (Value::from("tag"), Value::from(tag)),
                    (Value::from("registry"), Value::from(registry)),
                    (Value::from("architecture"), Value::from(architecture)),
                    (Value::from("is_local"), Value::Boolean(*is_local)),
                    (Value::from("canonical"), Value::from(canonical)),
                    (Value::from("short"), Value::from(short)),
                ]))
            }
        }
    }

    /// What calling `class` (`REDUCE`) or `class.__new__` (`NEWOBJ`) with `args` would refuse,
    /// for the classes whose construction checks anything.
    fn check_new(
        &self,
        class: &'static AllowedClass,
        newobj: bool,
        args: Id,
        budget: &mut Budget,
    ) -> Result<(), ExtError> {
        let shape = |reason| ExtError::Shape { class: class.full, reason };
        let Obj::Tuple(args) = self.obj(args)? else { return Err(shape("its arguments are not a tuple")) };
        let by_reduce = matches!(class.kind, Kind::Decimal | Kind::Path | Kind::Enum(_));
        if by_reduce == newobj {
            return Err(shape(if by_reduce { "made by NEWOBJ, not REDUCE" } else { "made by REDUCE, not NEWOBJ" }));
        }
        match class.kind {
            Kind::Decimal => {
                let [arg] = args.as_slice() else { return Err(shape("it takes one argument")) };
                let Obj::Str(text) = self.obj(*arg)? else { return Err(shape("its argument is not a string")) };
                budget.bytes(text.len())?;
                if decimal_string(text).is_none() {
                    return Err(shape("its argument is not a decimal number"));
                }
            }
            Kind::Enum(members) => {
                let [arg] = args.as_slice() else { return Err(shape("it takes one argument")) };
                let Some(value) = self.scalar(*arg, budget)? else {
                    return Err(shape("its value is neither a string nor a number"));
                };
                budget.bytes(value.as_str().map_or(0, str::len))?;
                if members.lookup(&value).is_none() {
                    // From the input: escaped and cut short.
                    let shown = value.as_str().map_or_else(|| value.to_string(), str::to_owned);
                    let value = shown.chars().flat_map(char::escape_debug).take(100).collect();
                    return Err(ExtError::NotAMember { class: class.full, value });
                }
            }
            Kind::Path => {
                budget.scan(args.len())?;
                for &part in args {
                    if !matches!(self.obj(part)?, Obj::Str(_)) {
                        return Err(shape("a path part is not a string"));
                    }
                }
            }
            Kind::BinarySize => {
                if !matches!(args.as_slice(), &[arg] if matches!(self.obj(arg)?, Obj::Int(_))) {
                    return Err(shape("it takes one integer"));
                }
            }
            Kind::ImageRef | Kind::PlatformTagSet | Kind::ResourceSlot | Kind::SlotName => {}
        }
        Ok(())
    }

    /// What `BUILD` with `state` would refuse: any state on the classes built whole by their
    /// call, and anything but `_data` on `PlatformTagSet` (`__slots__ = ("_data",)`, no
    /// `__dict__`).
    fn check_build(&self, class: &'static AllowedClass, state: Id, budget: &mut Budget) -> Result<(), ExtError> {
        match class.kind {
            Kind::Decimal | Kind::Path | Kind::Enum(_) | Kind::BinarySize => {
                Err(ExtError::Shape { class: class.full, reason: "it has BUILD state" })
            }
            Kind::PlatformTagSet => self.check_slots_only(class, state, &["_data"], budget),
            Kind::ImageRef | Kind::ResourceSlot | Kind::SlotName => Ok(()),
        }
    }

    /// A string, number or `SlotName` (which compares as its string) as a plain value: what an
    /// enum may hold.
    fn scalar(&self, id: Id, budget: &mut Budget) -> Result<Option<Value>, ExtError> {
        Ok(match self.obj(id)? {
            Obj::Str(text) => Some(Value::from(&**text)),
            Obj::Int(number) => int_value(*number).ok(),
            Obj::Bool(flag) => Some(Value::Boolean(*flag)),
            Obj::Float(number) => Some(Value::F64(*number)),
            Obj::Object { class, state, .. } if class.kind == Kind::SlotName => {
                match self.state_item(class, *state, "data", budget)?.map(|data| self.obj(data)).transpose()? {
                    Some(Obj::Str(text)) => Some(Value::from(&**text)),
                    _ => None,
                }
            }
            _ => None,
        })
    }

    /// That `BUILD` would set nothing but `slots` on an object without a `__dict__`, as Python
    /// requires of it.
    fn check_slots_only(
        &self,
        class: &'static AllowedClass,
        state: Id,
        slots: &[&str],
        budget: &mut Budget,
    ) -> Result<(), ExtError> {
        let shape = |reason| ExtError::Shape { class: class.full, reason };
        let (dict, slot_state) = match self.obj(state)? {
            Obj::Tuple(parts) => match parts.as_slice() {
                &[dict, slot_state] => (Some(dict), Some(slot_state)),
                _ => return Err(shape("its state is not a (dict, slots) pair")),
            },
            _ => (Some(state), None),
        };
        let empty = |id: Id| -> Result<bool, ExtError> {
            Ok(match self.obj(id)? {
                Obj::None => true,
                Obj::Dict(pairs) => pairs.is_empty(),
                _ => false,
            })
        };
        if let Some(dict) = dict
            && !empty(dict)?
        {
            return Err(shape("it has no __dict__ to set"));
        }
        if let Some(slot_state) = slot_state {
            match self.obj(slot_state)? {
                Obj::None => {}
                Obj::Dict(pairs) => {
                    budget.scan(pairs.len())?;
                    for &(key, _) in pairs {
                        if !matches!(self.obj(key)?, Obj::Str(name) if slots.contains(&&**name)) {
                            return Err(shape("its state sets an attribute it has no slot for"));
                        }
                    }
                }
                _ => return Err(shape("its slot state is not a dict")),
            }
        }
        Ok(())
    }

    /// `key` in an object's `BUILD` state: a `__dict__` dict, or a `(dict or None, slots dict
    /// or None)` pair where, as Python applies them, the slots win.
    fn state_item(
        &self,
        class: &'static AllowedClass,
        state: Option<Id>,
        key: &str,
        budget: &mut Budget,
    ) -> Result<Option<Id>, ExtError> {
        let Some(state) = state else { return Ok(None) };
        let mut lookup = |id: Id| -> Result<Option<Id>, ExtError> {
            match self.obj(id)? {
                Obj::None => Ok(None),
                Obj::Dict(pairs) => Ok({
                    budget.scan(pairs.len())?;
                    pairs
                        .iter()
                        .rev()
                        .find(|&&(k, _)| matches!(self.obj(k), Ok(Obj::Str(text)) if &**text == key))
                        .map(|&(_, v)| v)
                }),
                _ => Err(ExtError::Shape { class: class.full, reason: "its state is not a dict" }),
            }
        };
        match self.obj(state)? {
            Obj::Tuple(parts) => match parts.as_slice() {
                [dict, slots] => {
                    let from_slots = lookup(*slots)?;
                    Ok(from_slots.or(lookup(*dict)?))
                }
                _ => Err(ExtError::Shape { class: class.full, reason: "its state is not a (dict, slots) pair" }),
            },
            _ => lookup(state),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Budget {
    nodes: usize,
    bytes: usize,
}

impl Budget {
    fn new() -> Self {
        Budget { nodes: MAX_PICKLE_NODES, bytes: MAX_PICKLE_OUTPUT_BYTES }
    }

    /// Looking through `count` entries.
    fn scan(&mut self, count: usize) -> Result<(), ExtError> {
        self.nodes = self.nodes.checked_sub(count).ok_or(ExtError::Limit("output values"))?;
        Ok(())
    }

    fn node(&mut self) -> Result<(), ExtError> {
        self.nodes = self.nodes.checked_sub(1).ok_or(ExtError::Limit("output values"))?;
        Ok(())
    }

    fn bytes(&mut self, count: usize) -> Result<(), ExtError> {
        self.bytes = self.bytes.checked_sub(count).ok_or(ExtError::Limit("output bytes"))?;
        Ok(())
    }
}

/// A `LONG1`/`LONG4` payload: little-endian two's complement.
fn long_value(bytes: &[u8]) -> Result<i128, ExtError> {
    if bytes.len() > 16 {
        return Err(ExtError::NotPlain("an integer beyond 128 bits"));
    }
    let negative = bytes.last().is_some_and(|&last| last >= 0x80);
    let mut buffer = if negative { [0xff; 16] } else { [0; 16] };
    if let Some(low) = buffer.get_mut(..bytes.len()) {
        low.copy_from_slice(bytes);
    }
    Ok(i128::from_le_bytes(buffer))
}

fn int_value(value: i128) -> Result<Value, ExtError> {
    if let Ok(value) = i64::try_from(value) {
        Ok(Value::from(value))
    } else if let Ok(value) = u64::try_from(value) {
        Ok(Value::from(value))
    } else {
        Err(ExtError::NotPlain("an integer beyond the 64-bit range"))
    }
}

/// `str(Decimal(text))`, or `None` where `Decimal(text)` raises. Accepts `[sign] (digits [.
/// [digits]] | . digits) [e [sign] digits]`, `[sign] Inf` / `Infinity` and `[sign] [s]NaN
/// [digits]` (case-insensitive), within libmpdec's exponent limits; the underscores, spaces
/// and non-ASCII digits Python also takes are refused (its own `str()` never writes them).
fn decimal_string(text: &str) -> Option<String> {
    // libmpdec (64-bit): the largest adjusted exponent and the smallest exponent.
    const MAX_ADJUSTED: i128 = 999_999_999_999_999_999;
    const MIN_EXPONENT: i128 = -1_999_999_999_999_999_997;
    let bytes = text.as_bytes();
    let (sign, body) = match bytes.split_first() {
        Some((b'-', rest)) => ("-", rest),
        Some((b'+', rest)) => ("", rest),
        _ => ("", bytes),
    };
    if body.eq_ignore_ascii_case(b"inf") || body.eq_ignore_ascii_case(b"infinity") {
        return Some(format!("{sign}Infinity"));
    }
    for (prefix, name) in [(&b"nan"[..], "NaN"), (&b"snan"[..], "sNaN")] {
        if let Some((head, payload)) = body.split_at_checked(prefix.len())
            && head.eq_ignore_ascii_case(prefix)
        {
            if !payload.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let payload = std::str::from_utf8(payload).ok()?.trim_start_matches('0');
            return Some(format!("{sign}{name}{payload}"));
        }
    }
    let digits = |rest: &[u8]| rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let (integer, rest) = body.split_at_checked(digits(body))?;
    let (fraction, rest) = match rest.split_first() {
        Some((b'.', after)) => after.split_at_checked(digits(after))?,
        _ => (&b""[..], rest),
    };
    if integer.is_empty() && fraction.is_empty() {
        return None;
    }
    let mut exponent: i128 = 0;
    if let Some((b'e' | b'E', after)) = rest.split_first() {
        let (negative, after) = match after.split_first() {
            Some((b'-', after)) => (true, after),
            Some((b'+', after)) => (false, after),
            _ => (false, after),
        };
        if after.is_empty() || digits(after) != after.len() {
            return None;
        }
        for &digit in after {
            // Saturates far beyond the limits below.
            exponent = (exponent * 10 + i128::from(digit - b'0')).min(i128::from(u64::MAX));
        }
        if negative {
            exponent = -exponent;
        }
    } else if !rest.is_empty() {
        return None;
    }
    let mut coefficient: String = integer.iter().chain(fraction).map(|&b| char::from(b)).collect();
    coefficient = coefficient.trim_start_matches('0').to_owned();
    if coefficient.is_empty() {
        coefficient.push('0');
    }
    let exponent = exponent - i128::try_from(fraction.len()).ok()?;
    let length = i128::try_from(coefficient.len()).ok()?;
    if exponent < MIN_EXPONENT || exponent + length - 1 > MAX_ADJUSTED {
        return None;
    }
    // `Decimal.__str__` (`to_sci_string`).
    let left_digits = exponent + length;
    let dot_place = if exponent <= 0 && left_digits > -6 { left_digits } else { 1 };
    let mut out = String::from(sign);
    if dot_place <= 0 {
        // -6 < dot_place <= 0: at most five zeros.
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', usize::try_from(-dot_place).ok()?));
        out.push_str(&coefficient);
    } else {
        // Here dot_place <= length: no padding.
        let split = usize::try_from(dot_place).ok()?.min(coefficient.len());
        let (int_part, frac_part) = coefficient.split_at_checked(split)?;
        out.push_str(int_part);
        if !frac_part.is_empty() {
            out.push('.');
            out.push_str(frac_part);
        }
    }
    if left_digits != dot_place {
        out.push_str(&format!("E{:+}", left_digits - dot_place));
    }
    Some(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Cursor;
    use std::time::{Duration, Instant};

    use super::*;

    // Real fixtures: the msgpack bytes (hex) that backend.ai-common 26.9.6's
    // `ai.backend.common.msgpack.packb` gives, under CPython 3.13.0, for the Python value in
    // each comment. The three `*_BODY` ones are request bodies shaped as 26.9.6's
    // `PeerInvoker.call.<method>` builds them (`{"args", "kwargs", "metadata"}`, with the
    // `agent_id` keyword every `AgentClient` call adds), holding what the sokovan scheduler
    // puts in them: SID/KID are a session and a kernel UUID, IMG the `ImageRef` of
    // `IMAGE_REF`, KERNEL_CONFIG a `KernelCreationConfig` (its `image` an `ImageConfig` with
    // `auto_pull=AutoPullBehavior.DIGEST`, `session_type=SessionTypes.INTERACTIVE`,
    // `cluster_mode=ClusterMode.SINGLE_NODE`, `resource_opts={"shmem": BinarySize(67108864)}`),
    // CLUSTER_INFO a `ClusterInfo` with `mode=ClusterMode.SINGLE_NODE`.
    //
    // `*_PLAIN` is the plain form we must produce, as JSON, computed in Python from what the
    // REAL `msgpack.unpackb` returned for those bytes: UUID → `str()`, datetime →
    // `.isoformat()`, Decimal → `str()`, paths → `str()`, enum → `.value` (made plain),
    // SlotName → `str()`, BinarySize → `int()`, ResourceSlot → `{k: str(v)}`, ImageRef → its six
    // fields plus `canonical` and `short`, tuples → lists, UUID map keys → `str()`.
    /// `uuid.UUID('8f1c2e4a-5b6d-4e7f-9a0b-1c2d3e4f5a6b')`
    const UUID: &str = "d8018f1c2e4a5b6d4e7f9a0b1c2d3e4f5a6b";
    const UUID_PLAIN: &str = r#""8f1c2e4a-5b6d-4e7f-9a0b-1c2d3e4f5a6b""#;
    /// `datetime(2026, 9, 1, 12, 34, 56, 789012)`
    const DATETIME_NAIVE: &str = "d70257ea80322e302850";
    const DATETIME_NAIVE_PLAIN: &str = r#""2026-09-01T12:34:56.789012""#;
    /// `datetime(2026, 9, 1, 21, 34, 56, 789012, tzinfo=timezone(timedelta(hours=9)))`
    const DATETIME_KST: &str = "c70902ebf540191718142990";
    const DATETIME_KST_PLAIN: &str = r#""2026-09-01T12:34:56.789012+00:00""#;
    /// `datetime(2024, 2, 29, 0, 0, 0, tzinfo=timezone.utc)`
    const DATETIME_UTC_WHOLE: &str = "c70902ebf40f000000000100";
    const DATETIME_UTC_WHOLE_PLAIN: &str = r#""2024-02-29T00:00:00+00:00""#;
    /// `datetime(1999, 12, 31, 23, 59, 59)`
    const DATETIME_NAIVE_WHOLE: &str = "d70257cfbf5fbec00000";
    const DATETIME_NAIVE_WHOLE_PLAIN: &str = r#""1999-12-31T23:59:59""#;
    /// `PurePosixPath('/home/work/data')`
    const PURE_POSIX_PATH: &str = "c70f052f686f6d652f776f726b2f64617461";
    const PURE_POSIX_PATH_PLAIN: &str = r#""/home/work/data""#;
    /// `PosixPath('/var/lib/backend.ai/scratches')`
    const POSIX_PATH: &str = "c71d042f7661722f6c69622f6261636b656e642e61692f736372617463686573";
    const POSIX_PATH_PLAIN: &str = r#""/var/lib/backend.ai/scratches""#;
    /// `AutoDirectoryPath('/tmp/bai-fixture-dir')`
    const AUTO_DIRECTORY_PATH: &str = "c714112f746d702f6261692d666978747572652d646972";
    const AUTO_DIRECTORY_PATH_PLAIN: &str = r#""/tmp/bai-fixture-dir""#;
    /// `Decimal('1.5')`
    const DECIMAL_1_5: &str =
        "c72c0380059521000000000000008c07646563696d616c948c07446563696d616c9493948c03312e3594859452942e";
    const DECIMAL_1_5_PLAIN: &str = r#""1.5""#;
    /// `Decimal('1e3')`
    const DECIMAL_1E3: &str =
        "c72d0380059522000000000000008c07646563696d616c948c07446563696d616c9493948c0431452b3394859452942e";
    const DECIMAL_1E3_PLAIN: &str = r#""1E+3""#;
    /// `Decimal('NaN')`
    const DECIMAL_NAN: &str =
        "c72c0380059521000000000000008c07646563696d616c948c07446563696d616c9493948c034e614e94859452942e";
    const DECIMAL_NAN_PLAIN: &str = r#""NaN""#;
    /// `Decimal('-Infinity')`
    const DECIMAL_NEG_INF: &str =
        "c7320380059527000000000000008c07646563696d616c948c07446563696d616c9493948c092d496e66696e69747994859452942e";
    const DECIMAL_NEG_INF_PLAIN: &str = r#""-Infinity""#;
    /// `Decimal('-0.000001')`
    const DECIMAL_SMALL: &str =
        "c7320380059527000000000000008c07646563696d616c948c07446563696d616c9493948c092d302e30303030303194859452942e";
    const DECIMAL_SMALL_PLAIN: &str = r#""-0.000001""#;
    /// `SessionTypes.INTERACTIVE`
    const ENUM_SESSION_TYPE: &str = "c749068005953e000000000000008c1761692e6261636b656e642e636f6d6d6f6e2e7479706573948c0c53657373696f6e54797065739493948c0b696e74657261637469766594859452942e";
    const ENUM_SESSION_TYPE_PLAIN: &str = r#""interactive""#;
    /// `ClusterMode.SINGLE_NODE`
    const ENUM_CLUSTER_MODE: &str = "c748068005953d000000000000008c1761692e6261636b656e642e636f6d6d6f6e2e7479706573948c0b436c75737465724d6f64659493948c0b73696e676c652d6e6f646594859452942e";
    const ENUM_CLUSTER_MODE_PLAIN: &str = r#""single-node""#;
    /// `AutoPullBehavior.DIGEST`
    const ENUM_AUTO_PULL: &str = "c748068005953d000000000000008c1761692e6261636b656e642e636f6d6d6f6e2e7479706573948c104175746f50756c6c4265686176696f729493948c0664696765737494859452942e";
    const ENUM_AUTO_PULL_PLAIN: &str = r#""digest""#;
    /// `KernelLifecycleEventReason.USER_REQUESTED`
    const ENUM_REASON: &str = "c7740680059569000000000000008c3161692e6261636b656e642e636f6d6d6f6e2e6576656e74732e6576656e745f74797065732e6b65726e656c2e7479706573948c1a4b65726e656c4c6966656379636c654576656e74526561736f6e9493948c0e757365722d72657175657374656494859452942e";
    const ENUM_REASON_PLAIN: &str = r#""user-requested""#;
    /// `MountPermission.READ_WRITE`
    const ENUM_MOUNT_PERM: &str = "c7430680059538000000000000008c1761692e6261636b656e642e636f6d6d6f6e2e7479706573948c0f4d6f756e745065726d697373696f6e9493948c02727794859452942e";
    const ENUM_MOUNT_PERM_PLAIN: &str = r#""rw""#;
    /// `ModelServiceStatus.HEALTHY (plain Enum, str value)`
    const ENUM_MODEL_SERVICE_STATUS: &str = "c74b0680059540000000000000008c1761692e6261636b656e642e636f6d6d6f6e2e7479706573948c124d6f64656c536572766963655374617475739493948c076865616c74687994859452942e";
    const ENUM_MODEL_SERVICE_STATUS_PLAIN: &str = r#""healthy""#;
    /// `DockerConnectorSource.KNOWN_LOCATION (plain Enum, int value 3)`
    const ENUM_INT: &str = "c747068005953c000000000000008c1861692e6261636b656e642e636f6d6d6f6e2e646f636b6572948c15446f636b6572436f6e6e6563746f72536f757263659493944b03859452942e";
    const ENUM_INT_PLAIN: &str = r#"3"#;
    /// `KernelFeatures.UID_MATCH (StringSetFlag)`
    const ENUM_KERNEL_FEATURES: &str = "c74a068005953f000000000000008c1861692e6261636b656e642e636f6d6d6f6e2e646f636b6572948c0e4b65726e656c46656174757265739493948c097569642d6d6174636894859452942e";
    const ENUM_KERNEL_FEATURES_PLAIN: &str = r#""uid-match""#;
    /// `IntrinsicSlotNames.MEMORY (value is SlotName('mem'))`
    const ENUM_SLOT_NAME_VALUE: &str = "c7aa068005959f000000000000008c1761692e6261636b656e642e636f6d6d6f6e2e7479706573948c12496e7472696e736963536c6f744e616d657394939468008c08536c6f744e616d659493948c036d656d94859481947d948c0464617461946805737d94288c0c5f6465766963655f6e616d65948c00948c0b5f6d616a6f725f7479706594680c8c0b5f6d696e6f725f7479706594680c8c075f706172736564948975869462859452942e";
    const ENUM_SLOT_NAME_VALUE_PLAIN: &str = r#""mem""#;
    /// `ImageRef.from_image_str('cr.backend.ai/stable/python:3.9-ubuntu20.04', 'stable', 'cr.backend.ai', architecture='aarch64', is_local=False)`
    const IMAGE_REF: &str = "c8010507800595fa000000000000008c1861692e6261636b656e642e636f6d6d6f6e2e646f636b6572948c08496d6167655265669493942981947d94288c046e616d65948c06707974686f6e948c0770726f6a656374948c06737461626c65948c03746167948c0f332e392d7562756e747532302e3034948c087265676973747279948c0d63722e6261636b656e642e6169948c0c617263686974656374757265948c0761617263683634948c0869735f6c6f63616c94898c085f7461675f736574948c03332e399468008c0e506c6174666f726d5461675365749493942981944e7d948c055f64617461947d948c067562756e7475948c0532302e3034947373869462869475622e";
    const IMAGE_REF_PLAIN: &str = r#"{"name":"python","project":"stable","tag":"3.9-ubuntu20.04","registry":"cr.backend.ai","architecture":"aarch64","is_local":false,"canonical":"cr.backend.ai/stable/python:3.9-ubuntu20.04","short":"stable/python:3.9-ubuntu20.04"}"#;
    /// `ImageRef(name='lablup/python', project=None, tag='latest', registry='index.docker.io', architecture='x86_64', is_local=True)`
    const IMAGE_REF_LOCAL: &str = "c7e607800595db000000000000008c1861692e6261636b656e642e636f6d6d6f6e2e646f636b6572948c08496d6167655265669493942981947d94288c046e616d65948c0d6c61626c75702f707974686f6e948c0770726f6a656374944e8c03746167948c066c6174657374948c087265676973747279948c0f696e6465782e646f636b65722e696f948c0c617263686974656374757265948c067838365f3634948c0869735f6c6f63616c94888c085f7461675f73657494680968008c0e506c6174666f726d5461675365749493942981944e7d948c055f64617461947d9473869462869475622e";
    const IMAGE_REF_LOCAL_PLAIN: &str = r#"{"name":"lablup/python","project":null,"tag":"latest","registry":"index.docker.io","architecture":"x86_64","is_local":true,"canonical":"index.docker.io/lablup/python:latest","short":"lablup/python:latest"}"#;
    /// `ResourceSlot({'cpu': Decimal('1'), 'mem': Decimal('268435456')})`
    const RESOURCE_SLOT: &str = "c788088005957d000000000000008c1761692e6261636b656e642e636f6d6d6f6e2e7479706573948c0c5265736f75726365536c6f749493942981944e7d948c0464617461947d94288c03637075948c07646563696d616c948c07446563696d616c9493948c013194859452948c036d656d94680a8c09323638343335343536948594529475738694622e";
    const RESOURCE_SLOT_PLAIN: &str = r#"{"cpu":"1","mem":"268435456"}"#;
    /// `ResourceSlot({'cpu': Decimal('2'), 'mem': Decimal('4294967296'), 'cuda.shares': Decimal('0.5')})`
    const RESOURCE_SLOT_GPU: &str = "c7a30880059598000000000000008c1761692e6261636b656e642e636f6d6d6f6e2e7479706573948c0c5265736f75726365536c6f749493942981944e7d948c0464617461947d94288c03637075948c07646563696d616c948c07446563696d616c9493948c013294859452948c036d656d94680a8c0a3432393439363732393694859452948c0b637564612e73686172657394680a8c03302e35948594529475738694622e";
    const RESOURCE_SLOT_GPU_PLAIN: &str = r#"{"cpu":"2","mem":"4294967296","cuda.shares":"0.5"}"#;
    /// `SlotName('cuda.device')`
    const SLOT_NAME: &str = "c795098005958a000000000000008c1761692e6261636b656e642e636f6d6d6f6e2e7479706573948c08536c6f744e616d659493948c0b637564612e64657669636594859481947d948c0464617461946803737d94288c0c5f6465766963655f6e616d65948c00948c0b5f6d616a6f725f7479706594680a8c0b5f6d696e6f725f7479706594680a8c075f7061727365649489758694622e";
    const SLOT_NAME_PLAIN: &str = r#""cuda.device""#;
    /// `BinarySize(1073741824)`
    const BINARY_SIZE: &str = "c73e1080059533000000000000008c1761692e6261636b656e642e636f6d6d6f6e2e7479706573948c0a42696e61727953697a659493944a00000040859481942e";
    const BINARY_SIZE_PLAIN: &str = r#"1073741824"#;
    /// `BinarySize(2**40) (pickled as LONG1)`
    const BINARY_SIZE_LONG: &str = "c7411080059536000000000000008c1761692e6261636b656e642e636f6d6d6f6e2e7479706573948c0a42696e61727953697a659493948a06000000000001859481942e";
    const BINARY_SIZE_LONG_PLAIN: &str = r#"1099511627776"#;
    /// `BinarySize(0)`
    const BINARY_SIZE_ZERO: &str = "c73b1080059530000000000000008c1761692e6261636b656e642e636f6d6d6f6e2e7479706573948c0a42696e61727953697a659493944b00859481942e";
    const BINARY_SIZE_ZERO_PLAIN: &str = r#"0"#;
    /// `{'args': (str(SID), [str(KID)], [KERNEL_CONFIG], CLUSTER_INFO, {KernelId(KID): IMG}), 'kwargs': {'agent_id': 'i-agent'}, 'metadata': MessageMetadata().model_dump(mode='json')} (as PeerInvoker.call.create_kernels builds it)`
    pub(crate) const CREATE_KERNELS_BODY: &str = "83a46172677395d92438663163326534612d356236642d346537662d396130622d31633264336534663561366291d92430613162326333642d346535662d343630372d383839392d61616262636364646565666691de001ea5696d61676589a963616e6f6e6963616cd92b63722e6261636b656e642e61692f737461626c652f707974686f6e3a332e392d7562756e747532302e3034a770726f6a656374a6737461626c65ac617263686974656374757265a67838365f3634a6646967657374b37368613235363a336431663061356239633765ab7265706f5f646967657374c0a8726567697374727984a46e616d65ad63722e6261636b656e642e6169a375726cb568747470733a2f2f63722e6261636b656e642e6169a8757365726e616d65c0a870617373776f7264c0a66c6162656c7381b861692e6261636b656e642e736572766963652d706f727473b16a7570797465723a687474703a38303830a869735f6c6f63616cc2a96175746f5f70756c6cc748068005953d000000000000008c1761692e6261636b656e642e636f6d6d6f6e2e7479706573948c104175746f50756c6c4265686176696f729493948c0664696765737494859452942ea96b65726e656c5f6964d92430613162326333642d346535662d343630372d383839392d616162626363646465656666aa73657373696f6e5f6964d92438663163326534612d356236642d346537662d396130622d316332643365346635613662ad6f776e65725f757365725f6964d92466333864656132332d353066612d343261302d623561652d333338663566343639336634b06f776e65725f70726f6a6563745f6964c0aa6e6574776f726b5f6964d92438663163326534612d356236642d346537662d396130622d316332643365346635613662ac73657373696f6e5f74797065c749068005953e000000000000008c1761692e6261636b656e642e636f6d6d6f6e2e7479706573948c0c53657373696f6e54797065739493948c0b696e74657261637469766594859452942eac636c75737465725f6d6f6465c748068005953d000000000000008c1761692e6261636b656e642e636f6d6d6f6e2e7479706573948c0b436c75737465724d6f64659493948c0b73696e676c652d6e6f646594859452942eac636c75737465725f726f6c65a46d61696eab636c75737465725f69647801b0636c75737465725f686f73746e616d65a56d61696e31aa6c6f63616c5f72616e6b00a3756964c0a86d61696e5f676964c0b2737570706c656d656e746172795f6769647390ae7265736f757263655f736c6f747382a3637075a131a36d656da9323638343335343536ad7265736f757263655f6f70747381a573686d656dc73e1080059533000000000000008c1761692e6261636b656e642e636f6d6d6f6e2e7479706573948c0a42696e61727953697a659493944a00000004859481942ea7656e7669726f6e81b34241434b454e4441495f4b45524e454c5f4944d92430613162326333642d346535662d343630372d383839392d616162626363646465656666a66d6f756e747390b17061636b6167655f6469726563746f727990ac69646c655f74696d656f7574cd0258b0626f6f7473747261705f736372697074c0af737461727475705f636f6d6d616e64c0ad696e7465726e616c5f64617461c0a96175746f5f70756c6cc748068005953d000000000000008c1761692e6261636b656e642e636f6d6d6f6e2e7479706573948c104175746f50756c6c4265686176696f729493948c0664696765737494859452942ead7072656f70656e5f706f72747390b4616c6c6f63617465645f686f73745f706f72747390aa6167656e745f61646472b37463703a2f2f31302e302e302e353a36303031ad7363616c696e675f67726f7570a764656661756c74ab656e64706f696e745f6964c086a46d6f6465c748068005953d000000000000008c1761692e6261636b656e642e636f6d6d6f6e2e7479706573948c0b436c75737465724d6f64659493948c0b73696e676c652d6e6f646594859452942ea473697a6501a87265706c6963617381a46d61696e01ae6e6574776f726b5f636f6e66696781a46d6f6465a6627269646765ab7373685f6b657970616972c0b8636c75737465725f7373685f706f72745f6d617070696e67c081d8010a1b2c3d4e5f46078899aabbccddeeffc8010507800595fa000000000000008c1861692e6261636b656e642e636f6d6d6f6e2e646f636b6572948c08496d6167655265669493942981947d94288c046e616d65948c06707974686f6e948c0770726f6a656374948c06737461626c65948c03746167948c0f332e392d7562756e747532302e3034948c087265676973747279948c0d63722e6261636b656e642e6169948c0c617263686974656374757265948c0761617263683634948c0869735f6c6f63616c94898c085f7461675f736574948c03332e399468008c0e506c6174666f726d5461675365749493942981944e7d948c055f64617461947d948c067562756e7475948c0532302e3034947373869462869475622ea66b776172677381a86167656e745f6964a7692d6167656e74a86d6574616461746184aa726571756573745f6964c0a475736572c0ae7472696767657265645f75736572c0ab7472616365706172656e74c0";
    const CREATE_KERNELS_BODY_PLAIN: &str = r#"{"args":["8f1c2e4a-5b6d-4e7f-9a0b-1c2d3e4f5a6b",["0a1b2c3d-4e5f-4607-8899-aabbccddeeff"],[{"image":{"canonical":"cr.backend.ai/stable/python:3.9-ubuntu20.04","project":"stable","architecture":"x86_64","digest":"sha256:3d1f0a5b9c7e","repo_digest":null,"registry":{"name":"cr.backend.ai","url":"https://cr.backend.ai","username":null,"password":null},"labels":{"ai.backend.service-ports":"jupyter:http:8080"},"is_local":false,"auto_pull":"digest"},"kernel_id":"0a1b2c3d-4e5f-4607-8899-aabbccddeeff","session_id":"8f1c2e4a-5b6d-4e7f-9a0b-1c2d3e4f5a6b","owner_user_id":"f38dea23-50fa-42a0-b5ae-338f5f4693f4","owner_project_id":null,"network_id":"8f1c2e4a-5b6d-4e7f-9a0b-1c2d3e4f5a6b","session_type":"interactive","cluster_mode":"single-node","cluster_role":"main","cluster_idx":1,"cluster_hostname":"main1","local_rank":0,"uid":null,"main_gid":null,"supplementary_gids":[],"resource_slots":{"cpu":"1","mem":"268435456"},"resource_opts":{"shmem":67108864},"environ":{"BACKENDAI_KERNEL_ID":"0a1b2c3d-4e5f-4607-8899-aabbccddeeff"},"mounts":[],"package_directory":[],"idle_timeout":600,"bootstrap_script":null,"startup_command":null,"internal_data":null,"auto_pull":"digest","preopen_ports":[],"allocated_host_ports":[],"agent_addr":"tcp://10.0.0.5:6001","scaling_group":"default","endpoint_id":null}],{"mode":"single-node","size":1,"replicas":{"main":1},"network_config":{"mode":"bridge"},"ssh_keypair":null,"cluster_ssh_port_mapping":null},{"0a1b2c3d-4e5f-4607-8899-aabbccddeeff":{"name":"python","project":"stable","tag":"3.9-ubuntu20.04","registry":"cr.backend.ai","architecture":"aarch64","is_local":false,"canonical":"cr.backend.ai/stable/python:3.9-ubuntu20.04","short":"stable/python:3.9-ubuntu20.04"}}],"kwargs":{"agent_id":"i-agent"},"metadata":{"request_id":null,"user":null,"triggered_user":null,"traceparent":null}}"#;
    /// `{'args': (str(KID), str(SID), KernelLifecycleEventReason.USER_REQUESTED), 'kwargs': {'suppress_events': False, 'agent_id': 'i-agent'}, 'metadata': ...}`
    pub(crate) const DESTROY_KERNEL_BODY: &str = "83a46172677393d92430613162326333642d346535662d343630372d383839392d616162626363646465656666d92438663163326534612d356236642d346537662d396130622d316332643365346635613662c7740680059569000000000000008c3161692e6261636b656e642e636f6d6d6f6e2e6576656e74732e6576656e745f74797065732e6b65726e656c2e7479706573948c1a4b65726e656c4c6966656379636c654576656e74526561736f6e9493948c0e757365722d72657175657374656494859452942ea66b776172677382af73757070726573735f6576656e7473c2a86167656e745f6964a7692d6167656e74a86d6574616461746184aa726571756573745f6964c0a475736572c0ae7472696767657265645f75736572c0ab7472616365706172656e74c0";
    const DESTROY_KERNEL_BODY_PLAIN: &str = r#"{"args":["0a1b2c3d-4e5f-4607-8899-aabbccddeeff","8f1c2e4a-5b6d-4e7f-9a0b-1c2d3e4f5a6b","user-requested"],"kwargs":{"suppress_events":false,"agent_id":"i-agent"},"metadata":{"request_id":null,"user":null,"triggered_user":null,"traceparent":null}}"#;
    /// `{'args': ({IMAGE_CONFIG['canonical']: IMAGE_CONFIG},), 'kwargs': {'agent_id': 'i-agent'}, 'metadata': ...}`
    pub(crate) const CHECK_AND_PULL_BODY: &str = "83a4617267739181d92b63722e6261636b656e642e61692f737461626c652f707974686f6e3a332e392d7562756e747532302e303489a963616e6f6e6963616cd92b63722e6261636b656e642e61692f737461626c652f707974686f6e3a332e392d7562756e747532302e3034a770726f6a656374a6737461626c65ac617263686974656374757265a67838365f3634a6646967657374b37368613235363a336431663061356239633765ab7265706f5f646967657374c0a8726567697374727984a46e616d65ad63722e6261636b656e642e6169a375726cb568747470733a2f2f63722e6261636b656e642e6169a8757365726e616d65c0a870617373776f7264c0a66c6162656c7381b861692e6261636b656e642e736572766963652d706f727473b16a7570797465723a687474703a38303830a869735f6c6f63616cc2a96175746f5f70756c6cc748068005953d000000000000008c1761692e6261636b656e642e636f6d6d6f6e2e7479706573948c104175746f50756c6c4265686176696f729493948c0664696765737494859452942ea66b776172677381a86167656e745f6964a7692d6167656e74a86d6574616461746184aa726571756573745f6964c0a475736572c0ae7472696767657265645f75736572c0ab7472616365706172656e74c0";
    const CHECK_AND_PULL_BODY_PLAIN: &str = r#"{"args":[{"cr.backend.ai/stable/python:3.9-ubuntu20.04":{"canonical":"cr.backend.ai/stable/python:3.9-ubuntu20.04","project":"stable","architecture":"x86_64","digest":"sha256:3d1f0a5b9c7e","repo_digest":null,"registry":{"name":"cr.backend.ai","url":"https://cr.backend.ai","username":null,"password":null},"labels":{"ai.backend.service-ports":"jupyter:http:8080"},"is_local":false,"auto_pull":"digest"}}],"kwargs":{"agent_id":"i-agent"},"metadata":{"request_id":null,"user":null,"triggered_user":null,"traceparent":null}}"#;
    /// `ExtType(2, temporenc.packb(datetime(2026, 9, 1, 12, 34, 56), type='DT'))`
    const TEMPORENC_DT: &str = "c705021faa00c8b8";
    const TEMPORENC_DT_PLAIN: &str = r#""2026-09-01T12:34:56""#;
    /// `ExtType(2, temporenc.packb(datetime(2026, 9, 1, 12, 34, 56, tzinfo=timezone(timedelta(hours=-5, minutes=-30))), type='DTZ'))`
    const TEMPORENC_DTZ: &str = "c70602cfd500909c2a";
    const TEMPORENC_DTZ_PLAIN: &str = r#""2026-09-01T18:04:56+00:00""#;
    /// `ExtType(2, temporenc.packb(year=2000, month=2, day=29, hour=1, minute=2, second=3, millisecond=456))`
    const TEMPORENC_DTS_MS: &str = "c7070247d01e0420dc80";
    const TEMPORENC_DTS_MS_PLAIN: &str = r#""2000-02-29T01:02:03.456000""#;
    /// `ExtType(2, temporenc.packb(year=2000, month=1, day=1, hour=0, minute=0, second=0, nanosecond=123456789))`
    const TEMPORENC_DTS_NS: &str = "c7090267d0000000075bcd15";
    const TEMPORENC_DTS_NS_PLAIN: &str = r#""2000-01-01T00:00:00.123456""#;
    /// `ExtType(2, temporenc.packb(datetime(2026, 9, 1, 12, 34, 56), type='DTS'))`
    const TEMPORENC_DTS_NONE: &str = "d70257ea80322e000000";
    const TEMPORENC_DTS_NONE_PLAIN: &str = r#""2026-09-01T12:34:56""#;
    /// `ExtType(2, temporenc.packb(year=2026, month=12, day=31, hour=23, minute=59, second=59, millisecond=999, tz_offset=60))`
    const TEMPORENC_DTSZ_MS: &str = "d702e3f55fafdf7f3c40";
    const TEMPORENC_DTSZ_MS_PLAIN: &str = r#""2026-12-31T23:59:59.999000+00:00""#;
    /// `ExtType(2, temporenc.packb(year=2026, month=6, day=15, hour=8, minute=0, second=1, nanosecond=999, tz_offset=-120))`
    const TEMPORENC_DTSZ_NS: &str = "c70a02f3f52b9000200001f3b8";
    const TEMPORENC_DTSZ_NS_PLAIN: &str = r#""2026-06-15T08:00:01+00:00""#;
    /// `{SID: [ResourceSlot(cpu=Decimal('0.5')), SlotName('mem'), BinarySize(512), Decimal('2.50'), datetime(2026,1,2,3,4,5,6, tzinfo=utc), PurePosixPath('/x'), ClusterMode.MULTI_NODE]}`
    const MIXED: &str = "81d8018f1c2e4a5b6d4e7f9a0b1c2d3e4f5a6b97c7710880059566000000000000008c1761692e6261636b656e642e636f6d6d6f6e2e7479706573948c0c5265736f75726365536c6f749493942981944e7d948c0464617461947d948c03637075948c07646563696d616c948c07446563696d616c9493948c03302e35948594529473738694622ec78d0980059582000000000000008c1761692e6261636b656e642e636f6d6d6f6e2e7479706573948c08536c6f744e616d659493948c036d656d94859481947d948c0464617461946803737d94288c0c5f6465766963655f6e616d65948c00948c0b5f6d616a6f725f7479706594680a8c0b5f6d696e6f725f7479706594680a8c075f7061727365649489758694622ec73c1080059531000000000000008c1761692e6261636b656e642e636f6d6d6f6e2e7479706573948c0a42696e61727953697a659493944d0002859481942ec72d0380059522000000000000008c07646563696d616c948c07446563696d616c9493948c04322e353094859452942ec70902ebf5004620a0000d00d5052f78c747068005953c000000000000008c1761692e6261636b656e642e636f6d6d6f6e2e7479706573948c0b436c75737465724d6f64659493948c0a6d756c74692d6e6f646594859452942e";
    const MIXED_PLAIN: &str = r#"{"8f1c2e4a-5b6d-4e7f-9a0b-1c2d3e4f5a6b":[{"cpu":"0.5"},"mem",512,"2.50","2026-01-02T03:04:05.000006+00:00","/x","multi-node"]}"#;
    const FIXTURES: &[(&str, &str, &str)] = &[
        ("UUID", UUID, UUID_PLAIN),
        ("DATETIME_NAIVE", DATETIME_NAIVE, DATETIME_NAIVE_PLAIN),
        ("DATETIME_KST", DATETIME_KST, DATETIME_KST_PLAIN),
        ("DATETIME_UTC_WHOLE", DATETIME_UTC_WHOLE, DATETIME_UTC_WHOLE_PLAIN),
        ("DATETIME_NAIVE_WHOLE", DATETIME_NAIVE_WHOLE, DATETIME_NAIVE_WHOLE_PLAIN),
        ("PURE_POSIX_PATH", PURE_POSIX_PATH, PURE_POSIX_PATH_PLAIN),
        ("POSIX_PATH", POSIX_PATH, POSIX_PATH_PLAIN),
        ("AUTO_DIRECTORY_PATH", AUTO_DIRECTORY_PATH, AUTO_DIRECTORY_PATH_PLAIN),
        ("DECIMAL_1_5", DECIMAL_1_5, DECIMAL_1_5_PLAIN),
        ("DECIMAL_1E3", DECIMAL_1E3, DECIMAL_1E3_PLAIN),
        ("DECIMAL_NAN", DECIMAL_NAN, DECIMAL_NAN_PLAIN),
        ("DECIMAL_NEG_INF", DECIMAL_NEG_INF, DECIMAL_NEG_INF_PLAIN),
        ("DECIMAL_SMALL", DECIMAL_SMALL, DECIMAL_SMALL_PLAIN),
        ("ENUM_SESSION_TYPE", ENUM_SESSION_TYPE, ENUM_SESSION_TYPE_PLAIN),
        ("ENUM_CLUSTER_MODE", ENUM_CLUSTER_MODE, ENUM_CLUSTER_MODE_PLAIN),
        ("ENUM_AUTO_PULL", ENUM_AUTO_PULL, ENUM_AUTO_PULL_PLAIN),
        ("ENUM_REASON", ENUM_REASON, ENUM_REASON_PLAIN),
        ("ENUM_MOUNT_PERM", ENUM_MOUNT_PERM, ENUM_MOUNT_PERM_PLAIN),
        ("ENUM_MODEL_SERVICE_STATUS", ENUM_MODEL_SERVICE_STATUS, ENUM_MODEL_SERVICE_STATUS_PLAIN),
        ("ENUM_INT", ENUM_INT, ENUM_INT_PLAIN),
        ("ENUM_KERNEL_FEATURES", ENUM_KERNEL_FEATURES, ENUM_KERNEL_FEATURES_PLAIN),
        ("ENUM_SLOT_NAME_VALUE", ENUM_SLOT_NAME_VALUE, ENUM_SLOT_NAME_VALUE_PLAIN),
        ("IMAGE_REF", IMAGE_REF, IMAGE_REF_PLAIN),
        ("IMAGE_REF_LOCAL", IMAGE_REF_LOCAL, IMAGE_REF_LOCAL_PLAIN),
        ("RESOURCE_SLOT", RESOURCE_SLOT, RESOURCE_SLOT_PLAIN),
        ("RESOURCE_SLOT_GPU", RESOURCE_SLOT_GPU, RESOURCE_SLOT_GPU_PLAIN),
        ("SLOT_NAME", SLOT_NAME, SLOT_NAME_PLAIN),
        ("BINARY_SIZE", BINARY_SIZE, BINARY_SIZE_PLAIN),
        ("BINARY_SIZE_LONG", BINARY_SIZE_LONG, BINARY_SIZE_LONG_PLAIN),
        ("BINARY_SIZE_ZERO", BINARY_SIZE_ZERO, BINARY_SIZE_ZERO_PLAIN),
        ("CREATE_KERNELS_BODY", CREATE_KERNELS_BODY, CREATE_KERNELS_BODY_PLAIN),
        ("DESTROY_KERNEL_BODY", DESTROY_KERNEL_BODY, DESTROY_KERNEL_BODY_PLAIN),
        ("CHECK_AND_PULL_BODY", CHECK_AND_PULL_BODY, CHECK_AND_PULL_BODY_PLAIN),
        ("TEMPORENC_DT", TEMPORENC_DT, TEMPORENC_DT_PLAIN),
        ("TEMPORENC_DTZ", TEMPORENC_DTZ, TEMPORENC_DTZ_PLAIN),
        ("TEMPORENC_DTS_MS", TEMPORENC_DTS_MS, TEMPORENC_DTS_MS_PLAIN),
        ("TEMPORENC_DTS_NS", TEMPORENC_DTS_NS, TEMPORENC_DTS_NS_PLAIN),
        ("TEMPORENC_DTS_NONE", TEMPORENC_DTS_NONE, TEMPORENC_DTS_NONE_PLAIN),
        ("TEMPORENC_DTSZ_MS", TEMPORENC_DTSZ_MS, TEMPORENC_DTSZ_MS_PLAIN),
        ("TEMPORENC_DTSZ_NS", TEMPORENC_DTSZ_NS, TEMPORENC_DTSZ_NS_PLAIN),
        ("MIXED", MIXED, MIXED_PLAIN),
    ];
    /// `msgpack.packb(ExtType(6, pickle.dumps(<object whose __reduce__ is (os.system, ('echo pwned',))>, protocol=5)))`
    const EVIL_OS_SYSTEM: &str =
        "c7300680059525000000000000008c05706f736978948c0673797374656d9493948c0a6563686f2070776e656494859452942e";

    pub(crate) fn hex(text: &str) -> Vec<u8> {
        assert!(text.len().is_multiple_of(2), "odd hex length");
        (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex")).collect()
    }

    fn read(bytes: &[u8]) -> Result<Value, rmpv::decode::Error> {
        rmpv::decode::read_value_with_max_depth(&mut Cursor::new(bytes), 256)
    }

    fn json(value: &Value) -> serde_json::Value {
        match value {
            Value::Nil => serde_json::Value::Null,
            Value::Boolean(b) => serde_json::Value::Bool(*b),
            Value::Integer(i) => match (i.as_i64(), i.as_u64()) {
                (Some(i), _) => i.into(),
                (None, Some(u)) => u.into(),
                _ => unreachable!(),
            },
            Value::F64(f) => serde_json::Number::from_f64(*f).expect("finite").into(),
            Value::String(s) => s.as_str().expect("utf-8").into(),
            Value::Array(items) => items.iter().map(json).collect(),
            Value::Map(pairs) => pairs
                .iter()
                .map(|(k, v)| (k.as_str().unwrap_or_else(|| panic!("non-string key {k}")).to_owned(), json(v)))
                .collect::<serde_json::Map<_, _>>()
                .into(),
            other => panic!("not plain: {other:?}"),
        }
    }

    /// Every ext value inside `value`.
    fn exts(value: &Value, out: &mut Vec<(i8, Vec<u8>)>) {
        match value {
            Value::Ext(kind, data) => out.push((*kind, data.clone())),
            Value::Array(items) => items.iter().for_each(|item| exts(item, out)),
            Value::Map(pairs) => pairs.iter().for_each(|(k, v)| {
                exts(k, out);
                exts(v, out);
            }),
            _ => {}
        }
    }

    #[test]
    fn real_fixtures_decode_to_their_python_plain_form() {
        for (name, packed, expected) in FIXTURES {
            let value = read(&hex(packed)).unwrap_or_else(|e| panic!("{name}: {e}"));
            let plain = plain(value).unwrap_or_else(|e| panic!("{name}: {e}"));
            let expected: serde_json::Value = serde_json::from_str(expected).expect("expected JSON");
            assert_eq!(json(&plain), expected, "{name}");
        }
    }

    #[test]
    fn every_real_ext_value_decodes_alone_and_is_what_plain_puts_in_its_place() {
        let mut count = 0;
        for (name, packed, _) in FIXTURES {
            let mut found = Vec::new();
            exts(&read(&hex(packed)).expect("msgpack"), &mut found);
            for (kind, data) in found {
                let direct = decode_ext(kind, &data).unwrap_or_else(|e| panic!("{name} ext {kind}: {e}"));
                assert_eq!(plain(Value::Ext(kind, data)), Ok(direct), "{name}");
                count += 1;
            }
        }
        assert!(count >= 45, "only {count} ext values in the fixtures");
    }

    #[test]
    fn plain_values_keep_their_types_and_field_order() {
        let image = plain(read(&hex(IMAGE_REF)).expect("msgpack")).expect("plain");
        let expected = Value::Map(vec![
            (Value::from("name"), Value::from("python")),
            (Value::from("project"), Value::from("stable")),
            (Value::from("tag"), Value::from("3.9-ubuntu20.04")),
            (Value::from("registry"), Value::from("cr.backend.ai")),
            (Value::from("architecture"), Value::from("aarch64")),
            (Value::from("is_local"), Value::Boolean(false)),
            (Value::from("canonical"), Value::from("cr.backend.ai/stable/python:3.9-ubuntu20.04")),
            (Value::from("short"), Value::from("stable/python:3.9-ubuntu20.04")),
        ]);
        assert_eq!(image, expected);
        let slots = plain(read(&hex(RESOURCE_SLOT_GPU)).expect("msgpack")).expect("plain");
        let keys: Vec<_> = slots.as_map().expect("map").iter().filter_map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["cpu", "mem", "cuda.shares"]);
        assert_eq!(plain(read(&hex(BINARY_SIZE_LONG)).expect("msgpack")), Ok(Value::from(1u64 << 40)));
        assert_eq!(plain(read(&hex(ENUM_INT)).expect("msgpack")), Ok(Value::from(3)));
        assert_eq!(plain(read(&hex(DECIMAL_1E3)).expect("msgpack")), Ok(Value::from("1E+3")));
    }

    /// A protocol-5 pickle calling `module.name(arg)` the way `__reduce__` makes it.
    fn stack_global_call(module: &str, name: &str, arg: &str) -> Vec<u8> {
        let mut out = vec![op::PROTO, 5];
        for text in [module, name] {
            out.push(op::SHORT_BINUNICODE);
            out.push(u8::try_from(text.len()).expect("short"));
            out.extend_from_slice(text.as_bytes());
            out.push(op::MEMOIZE);
        }
        out.extend_from_slice(&[
            op::STACK_GLOBAL,
            op::MEMOIZE,
            op::SHORT_BINUNICODE,
            u8::try_from(arg.len()).expect("short"),
        ]);
        out.extend_from_slice(arg.as_bytes());
        out.extend_from_slice(&[op::TUPLE1, op::REDUCE, op::STOP]);
        out
    }

    #[test]
    fn forbidden_classes_are_refused_by_name() {
        let refused = |kind: i8, pickle: &[u8], class: &str| {
            assert_eq!(decode_ext(kind, pickle), Err(ExtError::ForbiddenClass(class.to_owned())), "{class}");
        };
        // Protocol 0: `os.system('echo hi')`.
        refused(EXT_ENUM, b"cos\nsystem\n(S'echo hi'\ntR.", "os.system");
        refused(EXT_DECIMAL, b"\x80\x02cposix\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85q\x02Rq\x03.", "posix.system");
        for (module, name) in [
            ("builtins", "eval"),
            ("builtins", "getattr"),
            ("subprocess", "Popen"),
            ("copyreg", "_reconstructor"),
            ("ai.backend.common.types", "SomethingNotAllowed"),
            ("ai.backend.common.types", "Sentinel"),
            ("ai.backend.common.types", "SessionTypes.__call__"),
            ("ai.backend.common", "types"),
            ("ai.backend.agent.server", "AgentRPCServer"),
            ("decimal", "Decimal.__new__"),
        ] {
            for kind in [EXT_DECIMAL, EXT_ENUM, EXT_IMAGE_REF, EXT_RESOURCE_SLOT, EXT_SLOT_NAME, EXT_BINARY_SIZE] {
                refused(kind, &stack_global_call(module, name, "arg"), &format!("{module}.{name}"));
            }
        }
        // A real Python pickle of an object whose `__reduce__` is `(os.system, ("echo pwned",))`.
        let evil = read(&hex(EVIL_OS_SYSTEM)).expect("msgpack");
        let err = plain(Value::Array(vec![Value::from(1), evil])).expect_err("refused");
        assert_eq!(err, ExtError::ForbiddenClass("posix.system".into()));
        assert_eq!(err.to_string(), "pickle refers to class `posix.system`, which is not one of Backend.AI's");
        // Names from the input are escaped and cut short in the message.
        let long = "x\n".repeat(200);
        let Err(ExtError::ForbiddenClass(name)) = decode_ext(EXT_ENUM, &stack_global_call("m", &long[..120], "arg"))
        else {
            panic!("not refused")
        };
        assert!(name.len() <= 200 && name.starts_with("m.x\\nx\\n"), "{name}");
    }

    #[test]
    fn allowed_classes_in_the_wrong_shape_are_refused() {
        // `decimal.Decimal("1 + 1")`.
        let mut pickle = stack_global_call("decimal", "Decimal", "1 + 1");
        assert!(matches!(decode_ext(EXT_DECIMAL, &pickle), Err(ExtError::Shape { class: "decimal.Decimal", .. })));
        // NEWOBJ on an enum.
        pickle = stack_global_call("ai.backend.common.types", "ClusterMode", "single-node");
        let reduce = pickle.len() - 2;
        pickle[reduce] = op::NEWOBJ;
        assert!(matches!(decode_ext(EXT_ENUM, &pickle), Err(ExtError::Shape { .. })));
        // An ImageRef with no state.
        let image = b"\x80\x05\x8c\x18ai.backend.common.docker\x8c\x08ImageRef\x93)\x81.";
        assert_eq!(
            decode_ext(EXT_IMAGE_REF, image),
            Err(ExtError::MissingField { class: "ai.backend.common.docker.ImageRef", field: "name" })
        );
        // The class itself, uncalled.
        let class = b"\x80\x05\x8c\x07decimal\x8c\x07Decimal\x93.";
        assert_eq!(decode_ext(EXT_DECIMAL, class), Err(ExtError::NotPlain("a class, not a value")));
        // Enum values are looked up as `cls(value)` does: exactly, then by the class's own
        // `_missing_` (CIStrEnum: case-insensitively; ClusterMode and VFolderMountPolicy: aliases).
        let member =
            |name: &str, arg: &str| decode_ext(EXT_ENUM, &stack_global_call("ai.backend.common.types", name, arg));
        assert_eq!(member("SessionTypes", "BATCH"), Ok(Value::from("batch")));
        assert_eq!(member("ClusterMode", "SINGLE_NODE"), Ok(Value::from("single-node")));
        assert_eq!(member("VFolderMountPolicy", "Read_Only"), Ok(Value::from("ro")));
        assert_eq!(member("VFolderMountPolicy", "RW"), Ok(Value::from("rw")));
        assert_eq!(member("AutoPullBehavior", "digest"), Ok(Value::from("digest")));
        assert_eq!(
            member("AutoPullBehavior", "DIGEST"),
            Err(ExtError::NotAMember { class: "ai.backend.common.types.AutoPullBehavior", value: "DIGEST".into() })
        );
        assert_eq!(
            member("ClusterMode", "multi-nodes").unwrap_err().to_string(),
            "`multi-nodes` is not a member of `ai.backend.common.types.ClusterMode`"
        );
        // An int enum takes what equals its values in Python: 3, 3.0 and True for 1.
        let int_member = |arg: &[u8]| {
            let mut pickle = b"\x80\x05\x8c\x18ai.backend.common.docker\x8c\x15DockerConnectorSource\x93".to_vec();
            pickle.extend_from_slice(arg);
            pickle.extend_from_slice(&[op::TUPLE1, op::REDUCE, op::STOP]);
            decode_ext(EXT_ENUM, &pickle)
        };
        assert_eq!(int_member(b"K\x03"), Ok(Value::from(3)));
        assert_eq!(int_member(b"G\x40\x08\0\0\0\0\0\0"), Ok(Value::from(3)));
        assert_eq!(int_member(&[op::NEWTRUE]), Ok(Value::from(1)));
        assert!(matches!(int_member(b"K\x04"), Err(ExtError::NotAMember { .. })));
        assert!(matches!(int_member(b"\x8c\x013"), Err(ExtError::NotAMember { .. })));
    }

    #[test]
    fn decimals_are_written_as_python_writes_them() {
        for (text, python) in [
            ("1.5", Some("1.5")),
            ("1e3", Some("1E+3")),
            ("0e5", Some("0E+5")),
            ("-0.00E001", Some("-0.0")),
            ("00012.3400", Some("12.3400")),
            (".5", Some("0.5")),
            ("5.", Some("5")),
            ("+0.000001", Some("0.000001")),
            ("0.0000001", Some("1E-7")),
            ("123456789e-20", Some("1.23456789E-12")),
            ("-0", Some("-0")),
            ("0.000", Some("0.000")),
            ("NaN0012", Some("NaN12")),
            ("NaN0", Some("NaN")),
            ("-nan", Some("-NaN")),
            ("sNaN5", Some("sNaN5")),
            ("+Inf", Some("Infinity")),
            ("-infinity", Some("-Infinity")),
            ("1e999999999999999999", Some("1E+999999999999999999")),
            ("0.1e1000000000000000000", Some("1E+999999999999999999")),
            ("1e-1999999999999999997", Some("1E-1999999999999999997")),
            ("1e0000000000000000000000000003", Some("1E+3")),
            ("10e999999999999999999", None),
            ("1e-1999999999999999998", None),
            ("0e1000000000000000000", None),
            ("infinite", None),
            ("", None),
            (".", None),
            ("1e", None),
            ("1e+", None),
            ("1.2.3", None),
            ("--1", None),
            ("NaN1x", None),
        ] {
            assert_eq!(decimal_string(text).as_deref(), python, "{text:?}");
        }
    }

    #[test]
    fn broken_input_gives_clear_errors() {
        assert_eq!(decode_ext(42, b""), Err(ExtError::UnknownType(42)));
        assert_eq!(decode_ext(42, b"").unwrap_err().to_string(), "ext type 42 is not one of Backend.AI's");
        assert_eq!(decode_ext(EXT_UUID, &[0; 15]), Err(ExtError::UuidLength(15)));
        assert_eq!(decode_ext(EXT_POSIX_PATH, b"/a\xff"), Err(ExtError::PathEncoding(4)));
        assert!(matches!(decode_ext(EXT_DATETIME, b""), Err(ExtError::Datetime(_))));
        // temporenc D (date only) and T (time only): Python's strict `.datetime()` refuses them.
        assert!(matches!(decode_ext(EXT_DATETIME, &[0x8f, 0xbe, 0x1e]), Err(ExtError::Datetime(_))));
        assert!(matches!(decode_ext(EXT_DATETIME, &[0xa0, 0x00, 0x00]), Err(ExtError::Datetime(_))));
        // DT with an empty year, and 2026-02-30.
        assert!(matches!(decode_ext(EXT_DATETIME, &[0x3f, 0xfe, 0x00, 0x00, 0x00]), Err(ExtError::Datetime(_))));
        let feb_30 = ((2026u64 << 9 | 1 << 5 | 29) << 17).to_be_bytes();
        assert!(matches!(
            decode_ext(EXT_DATETIME, &feb_30[3..]),
            Err(ExtError::Datetime("day is out of range for month"))
        ));
        let truncated = hex(DECIMAL_1_5);
        let pickle = &truncated[3..truncated.len() - 5];
        assert_eq!(decode_ext(EXT_DECIMAL, pickle), Err(ExtError::Truncated(pickle.len())));
        assert_eq!(
            decode_ext(EXT_DECIMAL, pickle).unwrap_err().to_string(),
            format!("truncated pickle at byte {}", pickle.len())
        );
        assert_eq!(decode_ext(EXT_ENUM, b"\x80\x05I1\n."), Err(ExtError::UnsupportedOpcode { op: b'I', at: 2 }));
        assert_eq!(
            decode_ext(EXT_ENUM, b"\x80\x05I1\n.").unwrap_err().to_string(),
            "unsupported pickle opcode 0x49 at byte 2"
        );
        assert_eq!(
            decode_ext(EXT_ENUM, b"\x80\x05h\x07."),
            Err(ExtError::Malformed { at: 2, reason: "memo key not found" })
        );
        assert_eq!(decode_ext(EXT_ENUM, b"\x80\x05."), Err(ExtError::Malformed { at: 2, reason: "stack underflow" }));
        assert_eq!(
            decode_ext(EXT_ENUM, b"\x80\x06N."),
            Err(ExtError::Malformed { at: 0, reason: "pickle protocol above 5" })
        );
        // A length field far past the end is refused before anything is allocated.
        assert_eq!(decode_ext(EXT_ENUM, b"\x80\x05\x8d\xff\xff\xff\xff\xff\xff\xff\x7f"), Err(ExtError::Truncated(11)));
        assert_eq!(
            decode_ext(EXT_ENUM, b"\x80\x05\x95\xff\xff\xff\xff\xff\xff\xff\xffN."),
            Err(ExtError::Truncated(13))
        );
        assert_eq!(decode_ext(EXT_ENUM, &vec![0; MAX_PICKLE_BYTES + 1]), Err(ExtError::TooLarge(MAX_PICKLE_BYTES + 1)));
        // Plain data in a pickle is fine, and bytes after STOP are ignored, as `pickle.loads` does.
        assert_eq!(decode_ext(EXT_ENUM, b"\x80\x05K\x07.junk"), Ok(Value::from(7)));
    }

    #[test]
    fn limits_bound_nesting_sharing_stack_and_memo() {
        // [[[[...]]]] 100 deep.
        let mut deep = vec![op::PROTO, 5];
        deep.extend(std::iter::repeat_n(op::EMPTY_LIST, 100));
        deep.extend(std::iter::repeat_n(op::APPEND, 99));
        deep.push(op::STOP);
        assert_eq!(decode_ext(EXT_ENUM, &deep), Err(ExtError::TooDeep(MAX_PICKLE_DEPTH)));
        // A list holding itself.
        let cycle = [op::PROTO, 5, op::EMPTY_LIST, op::MEMOIZE, op::BINGET, 0, op::APPEND, op::STOP];
        assert_eq!(decode_ext(EXT_ENUM, &cycle), Err(ExtError::TooDeep(MAX_PICKLE_DEPTH)));
        // x = [s, s]; x = [x, x]; ... 40 times: 2^40 leaves from 200 bytes.
        let mut bomb = vec![op::PROTO, 5, op::SHORT_BINUNICODE, 1, b's'];
        for _ in 0..40 {
            bomb.extend_from_slice(&[op::MEMOIZE, op::DUP, op::TUPLE2]);
        }
        bomb.push(op::STOP);
        assert_eq!(decode_ext(EXT_ENUM, &bomb), Err(ExtError::Limit("output values")));
        // One 900 KiB string used 64 times.
        let mut wide = vec![op::PROTO, 5, op::BINUNICODE];
        wide.extend_from_slice(&(900u32 * 1024).to_le_bytes());
        wide.extend(std::iter::repeat_n(b'a', 900 * 1024));
        wide.extend_from_slice(&[op::MEMOIZE, op::MARK]);
        wide.extend(std::iter::repeat_n([op::BINGET, 0], 64).flatten());
        wide.extend_from_slice(&[op::LIST, op::STOP]);
        assert_eq!(decode_ext(EXT_ENUM, &wide), Err(ExtError::Limit("output bytes")));
        // Marks and pushes.
        let mut marks = vec![op::PROTO, 5];
        marks.extend(std::iter::repeat_n(op::MARK, MAX_STACK + 1));
        assert_eq!(decode_ext(EXT_ENUM, &marks), Err(ExtError::Limit("stack depth")));
        let mut memo = vec![op::PROTO, 5, op::NONE];
        for index in 0..=MAX_MEMO as u32 {
            memo.push(op::LONG_BINPUT);
            memo.extend_from_slice(&index.to_le_bytes());
        }
        assert_eq!(decode_ext(EXT_ENUM, &memo), Err(ExtError::Limit("memo size")));
        // msgpack nesting in `plain`.
        let mut nested = Value::Ext(EXT_UUID, vec![0; 16]);
        for _ in 0..=MAX_PLAIN_DEPTH {
            nested = Value::Array(vec![nested]);
        }
        assert_eq!(plain(nested), Err(ExtError::TooDeep(MAX_PLAIN_DEPTH)));
    }

    /// xorshift64: deterministic, no crate.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: usize) -> usize {
            if n == 0 { 0 } else { (self.next() % n as u64) as usize }
        }

        fn byte(&mut self) -> u8 {
            self.next() as u8
        }
    }

    /// One to four edits of `input` into `out`: bit flips, byte sets, insertions, deletions,
    /// truncations, chunk copies, and "interesting" integers (lengths, limits, all-ones) written
    /// over 1, 2, 4 or 8 bytes in either byte order, which is what length fields see.
    fn mutate(rng: &mut Rng, input: &[u8], out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(input);
        for _ in 0..1 + rng.below(4) {
            let len = out.len();
            match rng.below(8) {
                0 if len > 0 => {
                    let at = rng.below(len);
                    out[at] ^= 1 << rng.below(8);
                }
                1 if len > 0 => {
                    let at = rng.below(len);
                    out[at] = rng.byte();
                }
                2 => {
                    let at = rng.below(len + 1);
                    let count = 1 + rng.below(4);
                    for _ in 0..count {
                        out.insert(at, rng.byte());
                    }
                }
                3 if len > 0 => {
                    let at = rng.below(len);
                    let end = (at + 1 + rng.below(8)).min(len);
                    out.drain(at..end);
                }
                4 => out.truncate(rng.below(len + 1)),
                5 if len > 1 => {
                    let from = rng.below(len);
                    let to = rng.below(len);
                    let count = (1 + rng.below(16)).min(len - from);
                    let chunk = out[from..from + count].to_vec();
                    out.splice(to..to, chunk);
                }
                _ if len > 0 => {
                    let interesting: [u64; 12] = [
                        0,
                        1,
                        0x7f,
                        0x80,
                        0xff,
                        0xffff,
                        0x7fff_ffff,
                        0xffff_ffff,
                        u64::MAX,
                        len as u64,
                        len as u64 + 1,
                        (len as u64).saturating_sub(1),
                    ];
                    let value = interesting[rng.below(interesting.len())];
                    let width = [1, 2, 4, 8][rng.below(4)];
                    let bytes = if rng.below(2) == 0 { value.to_le_bytes() } else { value.to_be_bytes() };
                    let bytes = if bytes[0] == 0 && width < 8 { &bytes[8 - width..] } else { &bytes[..width] };
                    let at = rng.below(len);
                    for (i, byte) in bytes.iter().enumerate() {
                        if let Some(slot) = out.get_mut(at + i) {
                            *slot = *byte;
                        }
                    }
                }
                _ => out.push(rng.byte()),
            }
        }
    }

    /// How many mutated inputs [`a_million_mutations_never_panic`] decodes.
    const MUTATIONS: usize = 1_000_000;

    #[test]
    fn a_million_mutations_never_panic() {
        let documents: Vec<Vec<u8>> = FIXTURES.iter().map(|(_, packed, _)| hex(packed)).collect();
        let mut payloads = Vec::new();
        for document in &documents {
            exts(&read(document).expect("msgpack"), &mut payloads);
        }
        let threads = std::thread::available_parallelism().map_or(1, usize::from).clamp(1, 8);
        let started = Instant::now();
        let results: Vec<(usize, usize, Duration)> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|t| {
                    let (documents, payloads) = (&documents, &payloads);
                    scope.spawn(move || {
                        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (t as u64 + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9));
                        let mut buffer = Vec::new();
                        let (mut decoded, mut refused, mut slowest) = (0, 0, Duration::ZERO);
                        let count = MUTATIONS / threads + usize::from(t < MUTATIONS % threads);
                        for i in 0..count {
                            let call = Instant::now();
                            let outcome = if i % 2 == 0 {
                                // The whole msgpack document, through rmpv and `plain`.
                                let document = &documents[rng.below(documents.len())];
                                mutate(&mut rng, document, &mut buffer);
                                read(&buffer).ok().map(|value| plain(value).is_ok())
                            } else {
                                // One ext payload, sometimes under another ext type.
                                let (kind, payload) = &payloads[rng.below(payloads.len())];
                                mutate(&mut rng, payload, &mut buffer);
                                let kind = if rng.below(16) == 0 { rng.byte() as i8 } else { *kind };
                                Some(decode_ext(kind, &buffer).is_ok())
                            };
                            slowest = slowest.max(call.elapsed());
                            match outcome {
                                Some(true) => decoded += 1,
                                _ => refused += 1,
                            }
                        }
                        (decoded, refused, slowest)
                    })
                })
                .collect();
            workers.into_iter().map(|worker| worker.join().expect("no panic")).collect()
        });
        let decoded: usize = results.iter().map(|r| r.0).sum();
        let refused: usize = results.iter().map(|r| r.1).sum();
        let slowest = results.iter().map(|r| r.2).max().unwrap_or_default();
        eprintln!(
            "{MUTATIONS} mutations on {threads} threads in {:?}: {decoded} decoded, {refused} refused, slowest call {slowest:?}",
            started.elapsed()
        );
        assert_eq!(decoded + refused, MUTATIONS);
        assert!(decoded > MUTATIONS / 100 && refused > MUTATIONS / 100, "{decoded} decoded, {refused} refused");
        assert!(slowest < Duration::from_secs(2), "a call took {slowest:?}");
    }

    #[test]
    fn random_bytes_never_panic() {
        const OPCODES: &[u8] = &[
            op::MARK,
            op::STOP,
            op::POP,
            op::POP_MARK,
            op::DUP,
            op::BINFLOAT,
            op::BININT,
            op::BININT1,
            op::BININT2,
            op::NONE,
            op::REDUCE,
            op::BINUNICODE,
            op::BINBYTES,
            op::SHORT_BINBYTES,
            op::EMPTY_LIST,
            op::APPEND,
            op::BUILD,
            op::GLOBAL,
            op::DICT,
            op::APPENDS,
            op::BINGET,
            op::LONG_BINGET,
            op::LIST,
            op::BINPUT,
            op::LONG_BINPUT,
            op::SETITEM,
            op::TUPLE,
            op::SETITEMS,
            op::EMPTY_DICT,
            op::EMPTY_TUPLE,
            op::PROTO,
            op::NEWOBJ,
            op::TUPLE1,
            op::TUPLE2,
            op::TUPLE3,
            op::NEWTRUE,
            op::NEWFALSE,
            op::LONG1,
            op::LONG4,
            op::SHORT_BINUNICODE,
            op::BINUNICODE8,
            op::BINBYTES8,
            op::EMPTY_SET,
            op::ADDITEMS,
            op::FROZENSET,
            op::NEWOBJ_EX,
            op::STACK_GLOBAL,
            op::MEMOIZE,
            op::FRAME,
            op::BYTEARRAY8,
        ];
        let kinds = [-128, -1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 16, 17, 18, 42, 127];
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let mut input = Vec::new();
        let started = Instant::now();
        let mut decoded = 0;
        for kind in kinds {
            for round in 0..20_000 {
                input.clear();
                if round % 2 == 0 {
                    input.extend((0..rng.below(64)).map(|_| rng.byte()));
                } else {
                    // Opcode soup: valid opcodes with a few random argument bytes each.
                    input.extend_from_slice(&[op::PROTO, 5]);
                    for _ in 0..rng.below(40) {
                        input.push(OPCODES[rng.below(OPCODES.len())]);
                        input.extend((0..rng.below(3)).map(|_| rng.below(4) as u8));
                    }
                    input.push(op::STOP);
                }
                decoded += usize::from(decode_ext(kind, &input).is_ok());
                let _ = plain(Value::Array(vec![Value::Ext(kind, input.clone())]));
            }
        }
        eprintln!("{} random inputs in {:?}, {decoded} decoded", kinds.len() * 20_000, started.elapsed());
    }
}
