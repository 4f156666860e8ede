//! `[policy]`: the enforcement settings (network rules, the metadata address and service) and
//! the syntax of a network rule, shared by the TOML file and a kernel's creation config.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde::{Deserialize, Deserializer};

use crate::resources::DeviceMapping;

/// Per-kernel enforcement, applied to every kernel before its first instruction.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct PolicySection {
    /// Off: kernels run under Docker's default cgroup parent with no policy programs.
    pub enabled: bool,
    /// Kernels' cgroups live at `{cgroup-parent}/{agent-id}/{kernel-id}/{container}` in every
    /// hierarchy; the policy programs are attached at `{cgroup-parent}/{agent-id}`.
    pub cgroup_parent: String,
    /// What a kernel's connection to the metadata address meets: `redirect` (to the agent's
    /// metadata service), `deny` (`EPERM`) or `allow` (only the rules below decide).
    pub metadata: MetadataMode,
    /// The cloud metadata address (port 0: every port; `redirect` needs a port).
    pub metadata_address: SocketAddr,
    /// Where the metadata service listens and kernels are redirected to: an IPv4 address of
    /// this host that kernels reach, or `auto` (the gateway of Docker's default bridge).
    pub metadata_service_host: MetadataHost,
    /// The metadata service's port (0: any free port, for tests).
    pub metadata_service_port: u16,
    /// What `/latest/meta-data/sandbox` answers.
    pub sandbox_type: String,
    /// Destinations no kernel may reach.
    pub deny: Vec<NetworkRule>,
    /// When not empty, the only destinations kernels may reach (loopback always).
    pub allow: Vec<NetworkRule>,
    /// Device access enforced: a kernel opens only the standard container set and the device
    /// nodes given to it (`kernel-devices`, its accelerators).
    pub devices: bool,
    /// Device nodes every kernel gets, in Docker's `--device` syntax
    /// (`host[:container[:permissions]]`, e.g. `"/dev/fuse"`).
    pub kernel_devices: Vec<DeviceMapping>,
    /// Every kernel's egress cap in bits per second (0: none); a kernel's own
    /// (`resource_opts.net_egress_bps`) can only narrow it.
    pub egress_bps: u64,
    /// How caps are held: `edt` (departure times and `fq`), `tbf` (a token bucket), or `auto`
    /// (`edt` where the kernel has `fq`).
    pub egress_shaper: EgressShaper,
    /// `[policy.guardrails]`: calls that reach past a container's walls.
    pub guardrails: GuardrailsSection,
}

/// What a guardrail does with a call it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuardMode {
    Off,
    /// Counted and logged; the call goes on.
    Monitor,
    /// Denied with `EPERM`, counted and logged.
    Enforce,
}

/// Each guardrail's mode for every kernel (a kernel's own `internal_data.guardrails` can
/// change it for that kernel), and whether a host without BPF LSM may run kernels.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct GuardrailsSection {
    /// Refuse to start when the guardrails cannot run (no BPF LSM: `bpf` missing from
    /// `/sys/kernel/security/lsm`, or a kernel without `lsm_cgroup`); otherwise that is
    /// logged and `backendai_agent_policy_guardrails_active` reads 0.
    pub required: bool,
    /// Where BPF LSM cannot run: kernels under `enforce` for both raw and packet sockets get
    /// no `CAP_NET_RAW` (decided at a kernel's start), so that packet sockets, which no other
    /// hook sees, are refused too.
    pub drop_net_raw: bool,
    pub raw_socket: GuardMode,
    pub packet_socket: GuardMode,
    pub bpf: GuardMode,
    pub perf_event: GuardMode,
    pub mount: GuardMode,
    pub module: GuardMode,
    pub ptrace_outside: GuardMode,
}

impl Default for GuardrailsSection {
    fn default() -> Self {
        Self {
            required: false,
            drop_net_raw: false,
            raw_socket: GuardMode::Enforce,
            packet_socket: GuardMode::Enforce,
            bpf: GuardMode::Enforce,
            perf_event: GuardMode::Monitor,
            mount: GuardMode::Enforce,
            module: GuardMode::Enforce,
            ptrace_outside: GuardMode::Enforce,
        }
    }
}

impl GuardrailsSection {
    /// The modes in the order of `agent_common::policy::guard::NAMES`.
    pub fn modes(&self) -> [GuardMode; 7] {
        [self.raw_socket, self.packet_socket, self.bpf, self.perf_event, self.mount, self.module, self.ptrace_outside]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EgressShaper {
    Auto,
    Edt,
    Tbf,
}

impl Default for PolicySection {
    fn default() -> Self {
        Self {
            enabled: true,
            cgroup_parent: "/bai-kernels".into(),
            metadata: MetadataMode::Redirect,
            metadata_address: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)), 80),
            metadata_service_host: MetadataHost::Auto,
            metadata_service_port: 40128,
            sandbox_type: "docker".into(),
            deny: Vec::new(),
            allow: Vec::new(),
            devices: true,
            kernel_devices: Vec::new(),
            egress_bps: 0,
            egress_shaper: EgressShaper::Auto,
            guardrails: GuardrailsSection::default(),
        }
    }
}

impl PolicySection {
    /// The first problem with these settings, as (key, message).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let parent = self.cgroup_parent.trim_matches('/');
        let components_ok = !parent.is_empty()
            && parent.split('/').all(|c| !c.is_empty() && c != "." && c != ".." && !c.starts_with("cgroup."));
        if !self.cgroup_parent.starts_with('/') || !components_ok {
            return Err(("policy.cgroup-parent", "must be an absolute cgroup path like \"/bai-kernels\"".into()));
        }
        if self.metadata == MetadataMode::Redirect && self.metadata_address.port() == 0 {
            return Err(("policy.metadata-address", "needs a port when policy.metadata = \"redirect\"".into()));
        }
        if self.sandbox_type.trim().is_empty() {
            return Err(("policy.sandbox-type", "must not be empty".into()));
        }
        Ok(())
    }

    /// How deep the kernels' own directories are (the root is level 0).
    pub fn kernel_cgroup_level(&self) -> u32 {
        self.cgroup_parent.split('/').filter(|c| !c.is_empty()).count() as u32 + 2
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MetadataMode {
    Redirect,
    Deny,
    Allow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetadataHost {
    Auto,
    Addr(Ipv4Addr),
}

impl<'de> Deserialize<'de> for MetadataHost {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text == "auto" {
            return Ok(MetadataHost::Auto);
        }
        text.parse()
            .map(MetadataHost::Addr)
            .map_err(|_| serde::de::Error::custom("expected \"auto\" or an IPv4 address"))
    }
}

/// Deny and allow lists: the node's (`[policy]`) or a kernel's own, which can only narrow the
/// node's (a destination must pass both).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuleLists {
    pub deny: Vec<NetworkRule>,
    pub allow: Vec<NetworkRule>,
}

/// Which transport a rule covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Any,
    Tcp,
    Udp,
    Icmp,
}

/// A destination rule: a CIDR (IPv4 or IPv6), an inclusive port range and a protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkRule {
    /// Shown in metrics and logs; the CIDR (and ports) when not given.
    pub name: String,
    pub addr: IpAddr,
    /// Prefix length in `addr`'s own family.
    pub prefix: u8,
    pub ports: (u16, u16),
    pub protocol: Protocol,
}

impl NetworkRule {
    /// Parses `"CIDR"` (an address alone is a host route) with optional ports and protocol.
    pub fn parse(
        cidr: &str,
        ports: Option<&str>,
        protocol: Option<Protocol>,
        name: Option<&str>,
    ) -> Result<Self, String> {
        let (addr_text, prefix_text) = match cidr.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (cidr, None),
        };
        let addr: IpAddr = addr_text.trim().parse().map_err(|_| format!("`{cidr}` is not an address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix_text {
            Some(text) => text
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{cidr}`: the prefix length must be 0..={max}"))?,
            None => max,
        };
        let ports = match ports {
            None => (0, u16::MAX),
            Some(text) => parse_ports(text)?,
        };
        let protocol = protocol.unwrap_or(Protocol::Any);
        if protocol == Protocol::Icmp && ports != (0, u16::MAX) {
            return Err(format!("`{cidr}`: ICMP has no ports"));
        }
        let name = match name {
            Some(name) => name.to_owned(),
            None if ports == (0, u16::MAX) => format!("{addr}/{prefix}"),
            None => format!("{addr}/{prefix}:{}-{}", ports.0, ports.1),
        };
        Ok(Self { name, addr, prefix, ports, protocol })
    }
}

fn parse_ports(text: &str) -> Result<(u16, u16), String> {
    let bad = || format!("`{text}` is not a port or a range like \"8000-8100\"");
    let (lo, hi) = match text.split_once('-') {
        Some((lo, hi)) => (lo.trim().parse::<u16>().map_err(|_| bad())?, hi.trim().parse::<u16>().map_err(|_| bad())?),
        None => {
            let port = text.trim().parse::<u16>().map_err(|_| bad())?;
            (port, port)
        }
    };
    if lo > hi { Err(bad()) } else { Ok((lo, hi)) }
}

/// The TOML (and JSON) forms: `"10.0.0.0/8"` or `{ cidr = "10.0.0.0/8", ports = "443",
/// protocol = "tcp", name = "intranet" }`.
impl<'de> Deserialize<'de> for NetworkRule {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Cidr(String),
            Table(Table),
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            cidr: String,
            #[serde(default)]
            ports: Option<PortsForm>,
            #[serde(default)]
            protocol: Option<Protocol>,
            #[serde(default)]
            name: Option<String>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum PortsForm {
            Number(u16),
            Text(String),
        }
        let parsed = match Form::deserialize(deserializer)? {
            Form::Cidr(cidr) => NetworkRule::parse(&cidr, None, None, None),
            Form::Table(table) => {
                let ports = table.ports.map(|ports| match ports {
                    PortsForm::Number(port) => port.to_string(),
                    PortsForm::Text(text) => text,
                });
                NetworkRule::parse(&table.cidr, ports.as_deref(), table.protocol, table.name.as_deref())
            }
        };
        parsed.map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_in_both_forms() {
        let rule = NetworkRule::parse("10.0.0.0/8", None, None, None).unwrap();
        assert_eq!((rule.prefix, rule.ports, rule.name.as_str()), (8, (0, 65535), "10.0.0.0/8"));
        let host = NetworkRule::parse("2001:db8::1", Some("443"), Some(Protocol::Tcp), None).unwrap();
        assert_eq!((host.prefix, host.ports, host.name.as_str()), (128, (443, 443), "2001:db8::1/128:443-443"));
        let range = NetworkRule::parse("192.168.0.0/16", Some("8000-8100"), None, Some("lab")).unwrap();
        assert_eq!((range.ports, range.name.as_str()), ((8000, 8100), "lab"));
        for bad in ["10.0.0.0/33", "nonsense", "::1/129"] {
            assert!(NetworkRule::parse(bad, None, None, None).is_err(), "{bad}");
        }
        assert!(NetworkRule::parse("10.0.0.0/8", Some("90-80"), None, None).is_err());
        assert!(NetworkRule::parse("10.0.0.0/8", Some("80"), Some(Protocol::Icmp), None).is_err());

        #[derive(Deserialize)]
        struct Lists {
            deny: Vec<NetworkRule>,
        }
        let lists: Lists =
            toml::from_str("deny = [\"10.0.0.0/8\", { cidr = \"fd00::/8\", ports = 53, protocol = \"udp\" }]").unwrap();
        assert_eq!(lists.deny.len(), 2);
        assert_eq!((lists.deny[1].ports, lists.deny[1].protocol), ((53, 53), Protocol::Udp));
        assert!(toml::from_str::<Lists>("deny = [{ cidr = \"10.0.0.0/8\", port = 1 }]").is_err());
    }

    #[test]
    fn the_parent_must_be_an_absolute_cgroup_path() {
        let mut section = PolicySection::default();
        assert!(section.check().is_ok());
        assert_eq!(section.kernel_cgroup_level(), 3);
        for bad in ["relative", "/", "/a/../b", "/cgroup.procs"] {
            section.cgroup_parent = bad.into();
            assert!(section.check().is_err(), "{bad}");
        }
        section.cgroup_parent = "/a/b".into();
        assert_eq!(section.kernel_cgroup_level(), 4);
    }
}
