//! `agent_heartbeat(agent_info)`: what the agent tells the manager about itself, every
//! `debug.heartbeat-interval`.
//!
//! `agent_info` is a msgpack map with string keys. Backend.AI's managers read different keys
//! across releases, so the map carries both generations:
//!
//! | key | value |
//! |---|---|
//! | `ip` | the host of `addr` |
//! | `region`, `scaling_group` | `agent.region`, `agent.scaling-group` |
//! | `addr` | `tcp://{host}:{rpc port}`; host: `agent.public-host`, else the RPC listen address, else (when that is 0.0.0.0 or ::) the first non-loopback IPv4 address, else 127.0.0.1 |
//! | `public_key` | nil (no ZeroMQ CURVE key) |
//! | `public_host` | `agent.public-host`, else the host of `addr` |
//! | `resource_slots` | `{slot: [unit, "decimal"]}`, what 24.09–25.x managers read |
//! | `available_resource_slots` | `{slot: "decimal"}`, what 26.x managers read |
//! | `slot_key_and_units` | `{slot: "count" / "bytes"}` |
//! | `version` | the agent's version |
//! | `compute_plugins` | `{device: {"version": …}}` for each slot's device (`cpu`, `mem`, …) |
//! | `images`, `images.opts` | zlib of the msgpack of the installed images list (empty for now), `{"compression": "zlib"}` |
//! | `architecture` | `x86_64` or `aarch64` |
//! | `auto_terminate_abusing_kernel` | false |
//! | `heartbeat_seq` | 1, 2, 3, … per agent run (a bai-agent extension; managers ignore unknown keys) |

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use rmpv::Value;
use tokio_util::sync::CancellationToken;

use super::EventBus;
use crate::config::Config;

/// Supplies the node's slots and their amounts as decimal strings (`{"cpu": "8", "mem": "…"}`).
pub type SlotProvider = Arc<dyn Fn() -> BTreeMap<String, String> + Send + Sync>;

/// `zlib.compress(msgpack.packb([]))`: the installed images list, empty until image tracking
/// reports it.
pub const EMPTY_IMAGES_ZLIB: [u8; 9] = [0x78, 0x9c, 0x9b, 0x00, 0x00, 0x00, 0x91, 0x00, 0x91];

/// The parts of `agent_info` that do not change while the agent runs.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentIdentity {
    pub ip: String,
    pub addr: String,
    pub public_host: String,
    pub region: String,
    pub scaling_group: String,
    pub version: String,
    pub architecture: String,
    /// Each accelerator plugin's `compute_plugins` entry besides `version` (`cuda_support`, …).
    pub plugin_info: BTreeMap<String, BTreeMap<String, String>>,
}

impl AgentIdentity {
    pub fn from_config(config: &Config) -> AgentIdentity {
        let host = advertised_host(config.agent.public_host.as_deref(), config.agent.rpc_listen_addr);
        let addr = if host.contains(':') {
            format!("tcp://[{host}]:{}", config.agent.rpc_listen_addr.port())
        } else {
            format!("tcp://{host}:{}", config.agent.rpc_listen_addr.port())
        };
        AgentIdentity {
            ip: host.clone(),
            addr,
            public_host: config.agent.public_host.clone().unwrap_or(host),
            region: config.agent.region.clone(),
            scaling_group: config.agent.scaling_group.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            architecture: architecture().to_owned(),
            plugin_info: BTreeMap::new(),
        }
    }
}

/// Backend.AI's architecture names (`get_arch_name`): `x86_64`, `aarch64`.
pub fn architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "x86_64",
        "aarch64" => "aarch64",
        other => other,
    }
}

/// The host the manager is told to connect to.
pub fn advertised_host(public_host: Option<&str>, rpc_listen_addr: SocketAddr) -> String {
    if let Some(host) = public_host {
        return host.to_owned();
    }
    if !rpc_listen_addr.ip().is_unspecified() {
        return rpc_listen_addr.ip().to_string();
    }
    first_non_loopback_ipv4().unwrap_or(Ipv4Addr::LOCALHOST).to_string()
}

/// The first IPv4 address of an interface that is up and not loopback.
pub fn first_non_loopback_ipv4() -> Option<Ipv4Addr> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cursor = list;
    while !cursor.is_null() {
        // SAFETY: `cursor` is a node of the list getifaddrs returned, not yet freed.
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        let up = entry.ifa_flags & libc::IFF_UP as libc::c_uint != 0;
        if !up || entry.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr is non-null and points at a sockaddr whose family we check first.
        let family = unsafe { (*entry.ifa_addr).sa_family };
        if i32::from(family) != libc::AF_INET {
            continue;
        }
        // SAFETY: an AF_INET address is a sockaddr_in.
        let sin = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in) };
        let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
        if !ip.is_loopback() && !ip.is_unspecified() {
            found = Some(ip);
            break;
        }
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    found
}

/// Backend.AI's slot unit (`SlotTypes`): `bytes` for memory slots, `count` for the rest.
pub fn slot_unit(slot: &str) -> &'static str {
    if slot == "mem" || slot.ends_with(".mem") { "bytes" } else { "count" }
}

fn s(text: &str) -> Value {
    Value::from(text)
}

/// The `agent_info` map of one heartbeat.
pub fn agent_info(identity: &AgentIdentity, slots: &BTreeMap<String, String>, seq: u64) -> Value {
    let map = |entries: Vec<(Value, Value)>| Value::Map(entries);
    let resource_slots =
        slots.iter().map(|(slot, amount)| (s(slot), Value::Array(vec![s(slot_unit(slot)), s(amount)]))).collect();
    let available = slots.iter().map(|(slot, amount)| (s(slot), s(amount))).collect();
    let units = slots.keys().map(|slot| (s(slot), s(slot_unit(slot)))).collect();
    let mut devices: Vec<&str> = slots.keys().map(|slot| slot.split('.').next().unwrap_or(slot)).collect();
    devices.dedup();
    let plugins = devices
        .into_iter()
        .map(|device| {
            let mut entry = vec![(s("version"), s(&identity.version))];
            for (key, value) in identity.plugin_info.get(device).into_iter().flatten() {
                // Backend.AI's plugins report `{key}_support` as a boolean.
                let value = match value.as_str() {
                    "true" => Value::Boolean(true),
                    "false" => Value::Boolean(false),
                    _ => s(value),
                };
                entry.push((s(key), value));
            }
            (s(device), map(entry))
        })
        .collect();
    map(vec![
        (s("ip"), s(&identity.ip)),
        (s("region"), s(&identity.region)),
        (s("scaling_group"), s(&identity.scaling_group)),
        (s("addr"), s(&identity.addr)),
        (s("public_key"), Value::Nil),
        (s("public_host"), s(&identity.public_host)),
        (s("resource_slots"), map(resource_slots)),
        (s("available_resource_slots"), map(available)),
        (s("slot_key_and_units"), map(units)),
        (s("version"), s(&identity.version)),
        (s("compute_plugins"), map(plugins)),
        (s("images"), Value::Binary(EMPTY_IMAGES_ZLIB.to_vec())),
        (s("images.opts"), map(vec![(s("compression"), s("zlib"))])),
        (s("architecture"), s(&identity.architecture)),
        (s("auto_terminate_abusing_kernel"), Value::Boolean(false)),
        (s("heartbeat_seq"), Value::from(seq)),
    ])
}

/// Emits one `agent_heartbeat` with sequence number `seq`.
pub(super) fn beat(bus: &EventBus, identity: &AgentIdentity, slots: &SlotProvider, seq: u64) {
    bus.emit("agent_heartbeat", vec![agent_info(identity, &slots(), seq)]);
}

/// Emits `agent_heartbeat` every `interval` until `stop`, after the first one
/// ([`EventService::start`](super::EventService::start) sends that one itself).
pub(super) async fn run(
    bus: EventBus,
    identity: AgentIdentity,
    slots: SlotProvider,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut ticks = crate::clock::Clock::new(interval);
    // The clock's first tick is now: the first heartbeat is already out.
    ticks.tick().await;
    let mut seq = 1u64;
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            _ = ticks.tick() => {}
        }
        seq += 1;
        beat(&bus, &identity, &slots, seq);
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::rpc::codec::map_get;

    fn identity() -> AgentIdentity {
        AgentIdentity {
            ip: "10.0.0.5".into(),
            addr: "tcp://10.0.0.5:6001".into(),
            public_host: "node5".into(),
            region: "local".into(),
            scaling_group: "default".into(),
            version: "0.1.0".into(),
            architecture: "x86_64".into(),
            plugin_info: BTreeMap::new(),
        }
    }

    fn field<'a>(value: &'a Value, key: &str) -> &'a Value {
        map_get(value.as_map().expect("map"), key).unwrap_or_else(|| panic!("no {key}"))
    }

    #[test]
    fn agent_info_has_backend_ais_keys_for_both_manager_generations() {
        let slots = BTreeMap::from([("cpu".to_owned(), "8".to_owned()), ("mem".to_owned(), "17179869184".to_owned())]);
        let info = agent_info(&identity(), &slots, 3);
        assert_eq!(field(&info, "ip"), &s("10.0.0.5"));
        assert_eq!(field(&info, "addr"), &s("tcp://10.0.0.5:6001"));
        assert_eq!(field(&info, "public_host"), &s("node5"));
        assert_eq!(field(&info, "public_key"), &Value::Nil);
        assert_eq!(field(&info, "region"), &s("local"));
        assert_eq!(field(&info, "scaling_group"), &s("default"));
        assert_eq!(
            field(&info, "available_resource_slots"),
            &Value::Map(vec![(s("cpu"), s("8")), (s("mem"), s("17179869184"))])
        );
        assert_eq!(
            field(&info, "resource_slots"),
            &Value::Map(vec![
                (s("cpu"), Value::Array(vec![s("count"), s("8")])),
                (s("mem"), Value::Array(vec![s("bytes"), s("17179869184")])),
            ])
        );
        assert_eq!(
            field(&info, "slot_key_and_units"),
            &Value::Map(vec![(s("cpu"), s("count")), (s("mem"), s("bytes"))])
        );
        let plugins = field(&info, "compute_plugins");
        assert_eq!(field(field(plugins, "cpu"), "version"), &s("0.1.0"));
        assert_eq!(field(field(plugins, "mem"), "version"), &s("0.1.0"));
        assert_eq!(field(&info, "images"), &Value::Binary(EMPTY_IMAGES_ZLIB.to_vec()));
        assert_eq!(field(&info, "architecture"), &s("x86_64"));
        assert_eq!(field(&info, "auto_terminate_abusing_kernel"), &Value::Boolean(false));
        assert_eq!(field(&info, "heartbeat_seq"), &Value::from(3));
        // Every key is a str, as Python's strict_map_key wants.
        assert!(info.as_map().expect("map").iter().all(|(k, _)| k.is_str()));
    }

    #[test]
    fn the_advertised_host_prefers_public_host_then_the_listen_address() {
        let any: SocketAddr = "0.0.0.0:6001".parse().expect("addr");
        let local: SocketAddr = "127.0.0.1:16001".parse().expect("addr");
        assert_eq!(advertised_host(Some("node1.example"), local), "node1.example");
        assert_eq!(advertised_host(None, local), "127.0.0.1");
        let host: IpAddr = advertised_host(None, any).parse().expect("an IP address");
        assert!(!host.is_unspecified());
        let mut config = Config::default();
        config.agent.rpc_listen_addr = "[::1]:6001".parse().expect("addr");
        let identity = AgentIdentity::from_config(&config);
        assert_eq!(identity.addr, "tcp://[::1]:6001");
        assert_eq!(identity.ip, "::1");
        assert_eq!(identity.public_host, "::1");
    }

    #[test]
    fn slot_units_are_backend_ais() {
        assert_eq!(slot_unit("cpu"), "count");
        assert_eq!(slot_unit("mem"), "bytes");
        assert_eq!(slot_unit("cuda.mem"), "bytes");
        assert_eq!(slot_unit("cuda.shares"), "count");
    }
}
