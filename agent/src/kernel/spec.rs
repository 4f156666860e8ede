//! What a manager asks for in one kernel of `create_kernels`: the fields of Backend.AI's
//! kernel creation config the agent uses, checked by name. Fields it does not use are
//! ignored; a known field of the wrong type is an error naming the field.

use std::collections::BTreeMap;

use rmpv::Value;

use crate::{
    docker::images::RegistryAuth,
    resources::{ResourceSlots, SlotRegistry, parse_binary_size},
    rpc::codec::{map_get, type_name},
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config.{field}: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

fn spec_error(field: &str, message: impl Into<String>) -> SpecError {
    SpecError { field: field.to_owned(), message: message.into() }
}

/// `internal_data.{key}` as JSON, checked by `check`.
fn internal_json(
    internal_data: Option<&Value>,
    key: &str,
    check: impl Fn(&serde_json::Value) -> Result<(), String>,
) -> Result<Option<serde_json::Value>, SpecError> {
    let Some(Value::Map(data)) = internal_data else { return Ok(None) };
    let Some(value) = map_get(data, key).filter(|v| !v.is_nil()) else { return Ok(None) };
    let json = crate::msgpack_json::to_json(value);
    check(&json).map_err(|message| spec_error(&format!("internal_data.{key}"), message))?;
    Ok(Some(json))
}

/// `internal_data.network_policy`, checked against the rule syntax.
fn network_policy(internal_data: Option<&Value>) -> Result<Option<serde_json::Value>, SpecError> {
    internal_json(internal_data, "network_policy", |json| crate::policy::kernel_rules(Some(json)).map(drop))
}

/// `internal_data.guardrails`: the kernel's own guardrail modes, checked.
fn guardrails(internal_data: Option<&Value>) -> Result<Option<serde_json::Value>, SpecError> {
    internal_json(internal_data, "guardrails", |json| crate::policy::guards::kernel_exceptions(Some(json)).map(drop))
}

/// A vfolder mount as the manager sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfolderMount {
    pub host_path: String,
    pub kernel_path: String,
    pub read_only: bool,
}

/// The parts of a kernel creation config the agent acts on.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelSpec {
    pub image: String,
    pub auto_pull: bool,
    pub slots: ResourceSlots,
    pub shm_bytes: Option<u64>,
    pub environ: BTreeMap<String, String>,
    pub mounts: Vec<VfolderMount>,
    pub idle_timeout: Option<f64>,
    /// The kernel's main process (it ends when this ends). In a batch session
    /// (`session_type = "batch"`) it is the batch job instead, run by `trigger_batch_execution`.
    pub startup_command: Option<String>,
    pub batch_session: bool,
    pub bootstrap_script: Option<String>,
    pub preopen_ports: Vec<u16>,
    pub owner_user_id: String,
    pub owner_project_id: String,
    /// The kernel's name on its session's network (`main1`, `sub1`, …).
    pub cluster_hostname: Option<String>,
    /// The login for pulling the image, from its registry configuration.
    pub registry_auth: Option<RegistryAuth>,
    /// The kernel's narrowing of the node's network rules (`internal_data.network_policy`,
    /// checked: `{"deny": [...], "allow": [...]}`), as JSON.
    pub network_policy: Option<serde_json::Value>,
    /// Its own egress cap in bits per second (`resource_opts.net_egress_bps`).
    pub egress_bps: Option<u64>,
    /// Its own guardrail modes (`internal_data.guardrails`: `{"raw-socket": "off"}`), as JSON.
    pub guardrails: Option<serde_json::Value>,
}

/// The name Docker knows an image config (`ImageConfig`: `canonical`, `registry.name`,
/// `is_local`) by: its canonical name, except for an image of Backend.AI's `local` registry
/// (found by scanning the engine's own images), which is never pulled and runs by its name
/// without the registry part (`local/e2e/python:3.13` → `e2e/python:3.13`, `ImageRef.short`).
pub fn image_run_name(image: &[(Value, Value)]) -> Option<String> {
    let canonical = map_get(image, "canonical")?.as_str()?;
    if !image_is_local(image) {
        return Some(canonical.to_owned());
    }
    let registry = map_get(image, "registry")
        .and_then(Value::as_map)
        .and_then(|registry| map_get(registry, "name"))
        .and_then(Value::as_str)
        .unwrap_or("local");
    Some(canonical.strip_prefix(&format!("{registry}/")).unwrap_or(canonical).to_owned())
}

/// The login an image config's registry (`{name, url, username, password}`) gives, for pulls
/// and pushes; none when it has no username and password. The server is the URL's host
/// (`http://127.0.0.1:5000` → `127.0.0.1:5000`), or the registry's name without a URL.
pub fn registry_auth(registry: &[(Value, Value)]) -> Option<RegistryAuth> {
    let text = |key: &str| map_get(registry, key).and_then(Value::as_str).filter(|s| !s.is_empty());
    let (username, password) = (text("username")?, text("password")?);
    let server = text("url")
        .map(|url| {
            let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
            rest.split('/').next().unwrap_or(rest).to_owned()
        })
        .filter(|host| !host.is_empty())
        .or_else(|| text("name").map(str::to_owned))?;
    Some(RegistryAuth { username: username.to_owned(), password: password.to_owned(), server })
}

/// The login of an image config's registry ([`registry_auth`]).
pub fn image_registry_auth(image: &[(Value, Value)]) -> Option<RegistryAuth> {
    map_get(image, "registry").and_then(Value::as_map).and_then(|registry| registry_auth(registry))
}

/// Whether an image config names an image of the engine's own (`is_local`, or the registry
/// named `local`): one that is never pulled.
pub fn image_is_local(image: &[(Value, Value)]) -> bool {
    let registry_is_local = map_get(image, "registry")
        .and_then(Value::as_map)
        .and_then(|registry| map_get(registry, "name"))
        .and_then(Value::as_str)
        == Some("local");
    map_get(image, "is_local").and_then(Value::as_bool).unwrap_or(false) || registry_is_local
}

impl KernelSpec {
    /// Reads one config; `image_ref` is the `kernel_image_refs` entry, used when the
    /// config carries no image of its own.
    pub fn parse(config: &Value, image_ref: Option<&str>, registry: &SlotRegistry) -> Result<KernelSpec, SpecError> {
        let Value::Map(entries) = config else {
            return Err(spec_error("", format!("a kernel config must be a map, got {}", type_name(config))));
        };
        let get = |name: &str| map_get(entries, name).filter(|v| !v.is_nil());

        let image = match get("image") {
            Some(Value::String(s)) => s.as_str().map(str::to_owned),
            Some(Value::Map(image)) => match map_get(image, "canonical") {
                Some(Value::String(_)) => image_run_name(image),
                Some(other) => {
                    return Err(spec_error("image.canonical", format!("must be a string, got {}", type_name(other))));
                }
                None => None,
            },
            Some(other) => {
                return Err(spec_error("image", format!("must be a map or a string, got {}", type_name(other))));
            }
            None => None,
        }
        .or_else(|| image_ref.map(str::to_owned))
        .filter(|image| !image.trim().is_empty())
        .ok_or_else(|| spec_error("image", "is missing (and no kernel_image_refs entry names one)"))?;

        let auto_pull = match get("auto_pull").or_else(|| match get("image") {
            Some(Value::Map(image)) => map_get(image, "auto_pull"),
            _ => None,
        }) {
            None => false,
            Some(Value::Boolean(b)) => *b,
            // Backend.AI also sends the pull policy as a string ("digest", "tag", "none").
            Some(Value::String(s)) => s.as_str().is_some_and(|s| s != "none"),
            Some(other) => return Err(spec_error("auto_pull", format!("must be a boolean, got {}", type_name(other)))),
        };

        let slots_value = get("resource_slots").ok_or_else(|| spec_error("resource_slots", "is missing"))?;
        let slots = ResourceSlots::parse_request(slots_value, registry)
            .map_err(|err| spec_error("resource_slots", err.to_string()))?;

        let (shm_bytes, egress_bps) = match get("resource_opts") {
            None => (None, None),
            Some(Value::Map(opts)) => {
                let shm = match map_get(opts, "shmem").filter(|v| !v.is_nil()) {
                    None => None,
                    Some(value) => Some(size(value).ok_or_else(|| {
                        spec_error("resource_opts.shmem", format!("{value} is not a size (bytes, or e.g. \"64m\")"))
                    })?),
                };
                let egress = match map_get(opts, "net_egress_bps").filter(|v| !v.is_nil()) {
                    None => None,
                    Some(value) => Some(bits_per_sec(value).ok_or_else(|| {
                        spec_error("resource_opts.net_egress_bps", format!("{value} is not bits per second"))
                    })?),
                };
                (shm, egress)
            }
            Some(other) => {
                return Err(spec_error("resource_opts", format!("must be a map, got {}", type_name(other))));
            }
        };

        let mut environ = BTreeMap::new();
        match get("environ") {
            None => {}
            Some(Value::Map(pairs)) => {
                for (key, value) in pairs {
                    let (Some(key), Some(value)) = (key.as_str(), value.as_str()) else {
                        return Err(spec_error("environ", "keys and values must be strings"));
                    };
                    environ.insert(key.to_owned(), value.to_owned());
                }
            }
            Some(other) => return Err(spec_error("environ", format!("must be a map, got {}", type_name(other)))),
        }

        kernel_user(&get, &mut environ)?;

        let mut mounts = Vec::new();
        match get("mounts") {
            None => {}
            Some(Value::Array(items)) => {
                for (index, item) in items.iter().enumerate() {
                    mounts.push(parse_mount(item).map_err(|message| spec_error(&format!("mounts[{index}]"), message))?);
                }
            }
            Some(other) => return Err(spec_error("mounts", format!("must be an array, got {}", type_name(other)))),
        }

        let idle_timeout = match get("idle_timeout") {
            None => None,
            Some(Value::Integer(i)) => i.as_f64(),
            Some(Value::F64(f)) => Some(*f),
            Some(Value::F32(f)) => Some(f64::from(*f)),
            Some(other) => {
                return Err(spec_error("idle_timeout", format!("must be a number, got {}", type_name(other))));
            }
        };

        let optional_string = |name: &str| -> Result<Option<String>, SpecError> {
            match get(name) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(s.as_str().map(str::to_owned)),
                Some(other) => Err(spec_error(name, format!("must be a string, got {}", type_name(other)))),
            }
        };

        let mut preopen_ports = Vec::new();
        match get("preopen_ports") {
            None => {}
            Some(Value::Array(items)) => {
                for item in items {
                    let port = item.as_u64().and_then(|p| u16::try_from(p).ok()).filter(|p| *p > 0);
                    preopen_ports
                        .push(port.ok_or_else(|| spec_error("preopen_ports", format!("{item} is not a port")))?);
                }
            }
            Some(other) => {
                return Err(spec_error("preopen_ports", format!("must be an array, got {}", type_name(other))));
            }
        }

        Ok(KernelSpec {
            image,
            auto_pull,
            slots,
            shm_bytes,
            environ,
            mounts,
            idle_timeout,
            startup_command: optional_string("startup_command")?,
            batch_session: optional_string("session_type")?.is_some_and(|t| t.eq_ignore_ascii_case("batch")),
            bootstrap_script: optional_string("bootstrap_script")?,
            preopen_ports,
            owner_user_id: optional_string("owner_user_id")?.unwrap_or_default(),
            owner_project_id: optional_string("owner_project_id")?.unwrap_or_default(),
            cluster_hostname: optional_string("cluster_hostname")?,
            network_policy: network_policy(get("internal_data"))?,
            guardrails: guardrails(get("internal_data"))?,
            egress_bps,
            registry_auth: match get("image") {
                Some(Value::Map(image)) => image_registry_auth(image),
                _ => None,
            },
        })
    }
}

/// The kernel's user as the manager assigns it (`uid`, `main_gid`, `supplementary_gids`:
/// the owner's `container_uid`, `container_main_gid`, `container_gids`), handed to the
/// container as the Python agent does: `LOCAL_USER_ID`, `LOCAL_GROUP_ID` and `ADDITIONAL_GIDS`
/// (merged with any the environ has), which the kernel runner switches to for the user's
/// processes.
fn kernel_user<'v>(
    get: &impl Fn(&str) -> Option<&'v Value>,
    environ: &mut BTreeMap<String, String>,
) -> Result<(), SpecError> {
    let id = |name: &str| -> Result<Option<u32>, SpecError> {
        match get(name) {
            None | Some(Value::Nil) => Ok(None),
            Some(value) => value
                .as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .map(Some)
                .ok_or_else(|| spec_error(name, format!("must be a user or group id, got {value}"))),
        }
    };
    if let Some(uid) = id("uid")? {
        environ.insert("LOCAL_USER_ID".into(), uid.to_string());
    }
    if let Some(gid) = id("main_gid")? {
        environ.insert("LOCAL_GROUP_ID".into(), gid.to_string());
    }
    let mut gids: std::collections::BTreeSet<u32> = environ
        .get("ADDITIONAL_GIDS")
        .map(|listed| listed.split(',').filter_map(|gid| gid.trim().parse().ok()).collect())
        .unwrap_or_default();
    match get("supplementary_gids") {
        None | Some(Value::Nil) => {}
        Some(Value::Array(items)) => {
            for item in items {
                let gid = item.as_u64().and_then(|v| u32::try_from(v).ok());
                gids.insert(gid.ok_or_else(|| spec_error("supplementary_gids", format!("{item} is not a group id")))?);
            }
        }
        Some(other) => {
            return Err(spec_error("supplementary_gids", format!("must be an array, got {}", type_name(other))));
        }
    }
    if !gids.is_empty() {
        let listed: Vec<String> = gids.iter().map(u32::to_string).collect();
        environ.insert("ADDITIONAL_GIDS".into(), listed.join(","));
    }
    Ok(())
}

/// Bits per second from an integer or a decimal string (`"100000000"`, `"100m"`, `"1g"`: SI).
fn bits_per_sec(value: &Value) -> Option<u64> {
    match value {
        Value::Integer(i) => i.as_u64(),
        Value::F64(f) if *f >= 0.0 && f.is_finite() => Some(*f as u64),
        Value::String(s) => {
            let text = s.as_str()?.trim().to_ascii_lowercase();
            let (digits, scale) = match text.char_indices().last()? {
                (at, 'k') => (&text[..at], 1_000),
                (at, 'm') => (&text[..at], 1_000_000),
                (at, 'g') => (&text[..at], 1_000_000_000),
                _ => (text.as_str(), 1),
            };
            digits.trim().parse::<u64>().ok()?.checked_mul(scale)
        }
        _ => None,
    }
}

/// Bytes from an integer or a size string (`"64m"`, `"1g"`, `"1048576"`).
fn size(value: &Value) -> Option<u64> {
    match value {
        Value::Integer(i) => i.as_u64(),
        Value::String(s) => s.as_str().and_then(parse_binary_size),
        _ => None,
    }
}

/// A mount is a map (`host_path`/`source`, `kernel_path`/`target`, `mount_perm` as Backend.AI's
/// `VFolderMount.to_json()` writes it, or `permission`/`mode`) or Backend.AI's legacy tuple
/// `(name, host_path, kernel_path, permission)`. Without a permission a mount is read-only.
fn parse_mount(item: &Value) -> Result<VfolderMount, String> {
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
    let (host_path, kernel_path, permission) = match item {
        Value::Map(m) => (
            text(map_get(m, "host_path")).or_else(|| text(map_get(m, "source"))),
            text(map_get(m, "kernel_path")).or_else(|| text(map_get(m, "target"))),
            text(map_get(m, "mount_perm"))
                .or_else(|| text(map_get(m, "permission")))
                .or_else(|| text(map_get(m, "mode"))),
        ),
        Value::Array(fields) if fields.len() >= 3 => (text(fields.get(1)), text(fields.get(2)), text(fields.get(3))),
        other => return Err(format!("must be a map with host_path and kernel_path, got {}", type_name(other))),
    };
    let host_path = host_path.ok_or("host_path is missing")?;
    let kernel_path = kernel_path.ok_or("kernel_path is missing")?;
    if !kernel_path.starts_with('/') || kernel_path.split('/').any(|part| part == "..") {
        return Err(format!("kernel_path `{kernel_path}` must be an absolute path without `..`"));
    }
    let read_only = match permission.as_deref() {
        None | Some("ro") => true,
        Some("rw") | Some("wd") => false,
        Some(other) => return Err(format!("permission `{other}` is not ro, rw or wd")),
    };
    Ok(VfolderMount { host_path, kernel_path, read_only })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: Vec<(&str, Value)>) -> Value {
        Value::Map(entries.into_iter().map(|(k, v)| (Value::from(k), v)).collect())
    }

    fn base() -> Vec<(&'static str, Value)> {
        vec![
            ("image", map(vec![("canonical", Value::from("bai-test/busybox:latest")), ("digest", Value::from(""))])),
            ("resource_slots", map(vec![("cpu", Value::from("1")), ("mem", Value::from("268435456"))])),
            ("some_future_field", Value::from(42)),
        ]
    }

    #[test]
    fn the_kernels_user_goes_to_the_container_as_the_python_agent_hands_it() {
        let mut config = base();
        config.push(("environ", map(vec![("ADDITIONAL_GIDS", Value::from("7"))])));
        config.push(("uid", Value::from(1234)));
        config.push(("main_gid", Value::from(2345)));
        config.push(("supplementary_gids", Value::Array(vec![Value::from(3456), Value::from(7)])));
        let spec = KernelSpec::parse(&map(config), None, &SlotRegistry::intrinsic()).expect("valid");
        let env = |key: &str| spec.environ.get(key).map(String::as_str);
        assert_eq!((env("LOCAL_USER_ID"), env("LOCAL_GROUP_ID")), (Some("1234"), Some("2345")));
        assert_eq!(env("ADDITIONAL_GIDS"), Some("7,3456"));
        let mut config = base();
        config.push(("uid", Value::from(-1)));
        let err = KernelSpec::parse(&map(config), None, &SlotRegistry::intrinsic()).expect_err("bad uid");
        assert_eq!(err.field, "uid");
    }

    #[test]
    fn reads_what_the_agent_uses_and_ignores_the_rest() {
        let mut config = base();
        config
            .push(("resource_opts", map(vec![("shmem", Value::from("64m")), ("net_egress_bps", Value::from("80m"))])));
        config.push(("environ", map(vec![("A", Value::from("1"))])));
        config.push(("auto_pull", Value::from(true)));
        let spec = KernelSpec::parse(&map(config), None, &SlotRegistry::intrinsic()).expect("valid");
        assert_eq!(spec.image, "bai-test/busybox:latest");
        assert_eq!(spec.shm_bytes, Some(64 << 20));
        assert_eq!(spec.egress_bps, Some(80_000_000));
        assert_eq!(spec.environ.get("A").map(String::as_str), Some("1"));
        assert!(spec.auto_pull);
        let local = vec![
            (Value::from("canonical"), Value::from("local/e2e/python:3.13")),
            (Value::from("registry"), Value::Map(vec![(Value::from("name"), Value::from("local"))])),
            (Value::from("is_local"), Value::from(true)),
        ];
        assert_eq!(image_run_name(&local).as_deref(), Some("e2e/python:3.13"), "local images run by their short name");
        let remote = vec![
            (Value::from("canonical"), Value::from("cr.backend.ai/stable/python:3.9")),
            (Value::from("registry"), Value::Map(vec![(Value::from("name"), Value::from("cr.backend.ai"))])),
            (Value::from("is_local"), Value::from(false)),
        ];
        assert_eq!(image_run_name(&remote).as_deref(), Some("cr.backend.ai/stable/python:3.9"));
    }

    #[test]
    fn a_known_field_of_the_wrong_type_is_named() {
        let mut config = base();
        config.push(("resource_opts", map(vec![("net_egress_bps", Value::from("fast"))])));
        let err = KernelSpec::parse(&map(config), None, &SlotRegistry::intrinsic()).expect_err("bad cap");
        assert_eq!(err.field, "resource_opts.net_egress_bps");
        let mut config = base();
        config.push(("environ", Value::from("A=1")));
        let err = KernelSpec::parse(&map(config), None, &SlotRegistry::intrinsic()).expect_err("bad environ");
        assert_eq!(err.field, "environ");
        let mut config = base();
        config.push(("resource_opts", map(vec![("shmem", Value::from("lots"))])));
        let err = KernelSpec::parse(&map(config), None, &SlotRegistry::intrinsic()).expect_err("bad shmem");
        assert_eq!(err.field, "resource_opts.shmem");
        let config = map(vec![("image", Value::from("x")), ("resource_slots", Value::from(3))]);
        let err = KernelSpec::parse(&config, None, &SlotRegistry::intrinsic()).expect_err("bad slots");
        assert_eq!(err.field, "resource_slots");
    }

    #[test]
    fn the_image_can_come_from_kernel_image_refs() {
        let config = map(vec![("resource_slots", map(vec![("cpu", Value::from(1)), ("mem", Value::from("1g"))]))]);
        let spec = KernelSpec::parse(&config, Some("img:1"), &SlotRegistry::intrinsic()).expect("valid");
        assert_eq!(spec.image, "img:1");
        let err = KernelSpec::parse(&config, None, &SlotRegistry::intrinsic()).expect_err("no image");
        assert_eq!(err.field, "image");
    }

    #[test]
    fn mounts_need_safe_kernel_paths() {
        let mut config = base();
        let mount = map(vec![
            ("host_path", Value::from("/data/v1")),
            ("kernel_path", Value::from("/home/work/../../etc")),
            ("permission", Value::from("rw")),
        ]);
        config.push(("mounts", Value::Array(vec![mount])));
        let err = KernelSpec::parse(&map(config), None, &SlotRegistry::intrinsic()).expect_err("escape");
        assert_eq!(err.field, "mounts[0]");
    }

    #[test]
    fn mount_perm_as_the_26_9_manager_sends_it_is_honoured() {
        let mount = |perm: Option<&str>| {
            let mut fields = vec![
                ("name", Value::from("data")),
                ("vfid", Value::from("quota:0a1b")),
                ("vfsubpath", Value::from(".")),
                ("host_path", Value::from("/vfroot/local/data")),
                ("kernel_path", Value::from("/home/work/data")),
                ("usage_mode", Value::from("general")),
            ];
            if let Some(perm) = perm {
                fields.push(("mount_perm", Value::from(perm)));
            }
            map(fields)
        };
        let read_only = |perm: Option<&str>| {
            let mut config = base();
            config.push(("mounts", Value::Array(vec![mount(perm)])));
            KernelSpec::parse(&map(config), None, &SlotRegistry::intrinsic()).expect("parses").mounts[0].read_only
        };
        assert!(!read_only(Some("rw")), "rw mounts read-write");
        assert!(!read_only(Some("wd")), "wd (write-delete) mounts read-write");
        assert!(read_only(Some("ro")));
        assert!(read_only(None), "no permission: read-only");
    }
}
