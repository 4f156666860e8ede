//! Enforcement per kernel: every kernel's cgroup directory made before its container starts,
//! the node's and each kernel's network rules written into the policy programs' maps, verdict
//! counters and denial reports read back, and the metadata service kernels are redirected to.
//!
//! ```text
//! {cgroup root}/{policy.cgroup-parent}/{agent_id}/              policy programs attached here
//!                                      └── {kernel_id}/         KERNEL_POLICIES key (its id)
//!                                          └── {container id}/  made by the runtime
//! ```

pub mod devices;
pub mod guards;
pub mod metadata;
pub mod pacing;
pub mod programs;
mod rules;

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddrV4,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Mutex,
};

use crate::{
    config::{DeviceMapping, MetadataMode, PolicySection, RuleLists},
    monitor::ebpf::ProgramStats,
};
use agent_common::{
    CgroupId,
    policy::{EgressCap, KERNEL_RULE, KernelPolicy, NodePolicy, flags, metadata_mode, rule_id, v4_mapped, verdict},
};
pub use devices::{DeviceRule, DevicesError};
pub use pacing::PacingError;
pub use programs::ProgramsError;
use programs::{PolicyMaps, PolicyPrograms};
pub use rules::{Entry, RulesError, encode};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error(transparent)]
    Programs(#[from] ProgramsError),
    #[error("{path}: {source}")]
    Cgroup { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Rules(#[from] RulesError),
    #[error("writing the policy map `{map}`: {reason}")]
    Map { map: &'static str, reason: String },
    #[error(transparent)]
    KernelId(#[from] crate::scratch::ScratchError),
    #[error(transparent)]
    Devices(#[from] DevicesError),
    #[error("pacing the kernel's egress: {0}")]
    Pacing(#[from] PacingError),
    #[error("unknown kernel `{0}`")]
    UnknownKernel(String),
    #[error("the guardrails cannot run: {0} ([policy.guardrails] required = true)")]
    Guardrails(String),
}

/// What one kernel is held to besides the node's policy.
#[derive(Debug, Clone, Copy)]
pub struct KernelInput<'a> {
    /// Its own network rules (they narrow the node's).
    pub rules: &'a RuleLists,
    /// The device nodes its container is given.
    pub devices: &'a [DeviceMapping],
    /// Its own egress cap in bits per second (0: the node's default alone).
    pub egress_bps: u64,
    /// Its own guardrail modes (`internal_data.guardrails`).
    pub guards: &'a guards::Exceptions,
}

/// One kernel's entries in the maps.
struct KernelEntry {
    cgroup: CgroupId,
    list: u32,
    names: HashMap<u32, String>,
    /// Its own egress cap (bits per second; 0: none).
    egress_bps: u64,
    /// Its interfaces have our shaper.
    paced: bool,
    guard_exceptions: guards::Exceptions,
}

struct State {
    maps: PolicyMaps,
    programs: PolicyPrograms,
    /// Rule id → name, of the node's list.
    node_names: HashMap<u32, String>,
    kernels: HashMap<String, KernelEntry>,
    /// `[policy] devices`: kernels open only the device nodes given to them.
    devices_enforced: bool,
    /// The node's settings as last written (the pacing flag is added when writing).
    node: NodePolicy,
    /// `[policy] egress-bps`.
    egress_default_bps: u64,
    /// How caps are held.
    shaper: pacing::Shaper,
    /// `[policy.guardrails]`.
    guard_node: crate::config::GuardrailsSection,
}

impl State {
    /// Writes the node's settings, flagged for pacing while any kernel has a cap.
    fn write_node(&mut self) -> Result<(), PolicyError> {
        let mut node = self.node;
        if self.maps.egress_caps.keys().next().is_some() {
            node.flags |= flags::PACING;
        }
        // From the map, not from this agent's records: kernels an earlier agent left keep
        // their rules until recovery rewrites them.
        if self.maps.kernels.iter().flatten().any(|(_, own)| own.flags & flags::HAS_RULES != 0) {
            node.flags |= flags::KERNEL_RULES;
        }
        self.maps.node.set(0, node, 0).map_err(|err| PolicyError::Map { map: "NODE_POLICY", reason: err.to_string() })
    }

    /// Writes a kernel's guardrail modes (the node's with its own exceptions).
    fn write_guards(&mut self, cgroup: CgroupId, exceptions: &guards::Exceptions) -> Result<(), PolicyError> {
        let modes = guards::kernel_modes(&self.guard_node, exceptions);
        self.maps
            .guards
            .insert(cgroup, modes, 0)
            .map_err(|err| PolicyError::Map { map: "POLICY_KERNEL_GUARDS", reason: err.to_string() })
    }

    /// Removes a kernel's guardrail entries (modes and armed state).
    fn forget_guards(&mut self, cgroup: CgroupId) {
        if self.maps.guards.get(&cgroup, 0).is_ok() {
            let _ = self.maps.guards.remove(&cgroup);
        }
        if self.maps.armed.get(&cgroup, 0).is_ok() {
            let _ = self.maps.armed.remove(&cgroup);
        }
    }

    /// The cap a kernel is held to (bits per second; 0: none).
    fn effective_cap(&self, entry: &KernelEntry) -> u64 {
        pacing::effective_cap(self.egress_default_bps, entry.egress_bps)
    }

    /// Writes (or removes) a kernel's cap for the egress program, keeping its pacing state
    /// (under the token bucket, the program has nothing to do); the caller writes the node's
    /// flags after its caps.
    fn write_cap(&mut self, cgroup: CgroupId, bits_per_sec: u64) -> Result<(), PolicyError> {
        let map_error =
            |err: aya::maps::MapError| PolicyError::Map { map: "POLICY_EGRESS_CAPS", reason: err.to_string() };
        let bytes_per_sec = if self.shaper == pacing::Shaper::Edt { pacing::bytes_per_sec(bits_per_sec) } else { 0 };
        if bytes_per_sec == 0 {
            if self.maps.egress_caps.get(&cgroup, 0).is_ok() {
                self.maps.egress_caps.remove(&cgroup).map_err(map_error)?;
            }
        } else {
            let next_departure_ns = self.maps.egress_caps.get(&cgroup, 0).map(|cap| cap.next_departure_ns).unwrap_or(0);
            self.maps
                .egress_caps
                .insert(cgroup, EgressCap { bytes_per_sec, next_departure_ns }, 0)
                .map_err(map_error)?;
        }
        Ok(())
    }

    /// A rule's name in metrics and logs: a built-in verdict's, the node's rule's, or the
    /// kernel's own rule's (`kernel` is the kernel the verdict is about, if known).
    fn rule_label(&self, kernel: Option<&KernelEntry>, id: u32) -> String {
        match id {
            rule_id::METADATA => "metadata".into(),
            rule_id::NOT_ALLOWED => "not-allowed".into(),
            rule_id::DEVICE_NOT_GIVEN => "device-not-given".into(),
            id if guards::name_of(id).is_some() => guards::name_of(id).unwrap_or_default().into(),
            id if id & KERNEL_RULE != 0 => kernel
                .and_then(|entry| entry.names.get(&id).cloned())
                .unwrap_or_else(|| format!("kernel-rule-{}", id & !KERNEL_RULE)),
            id => self.node_names.get(&id).cloned().unwrap_or_else(|| format!("rule-{id}")),
        }
    }
}

/// A kernel's list in the rule trie: the low bits of its directory's cgroup id, which are
/// unique among live cgroups (never 0, the node's list).
fn kernel_list(cgroup: CgroupId) -> u32 {
    (cgroup as u32).max(1)
}

/// One verdict counter, summed over CPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerdictCount {
    /// Empty for a process outside any kernel's directory.
    pub kernel_id: String,
    pub rule: String,
    pub verdict: &'static str,
    pub hook: &'static str,
    pub count: u64,
}

/// One guardrail on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardStatus {
    pub name: &'static str,
    /// It decides (counts, and denies in `enforce` mode).
    pub active: bool,
    /// It cannot decide here, but its calls are counted and reported with their outcome.
    pub observed: bool,
}

/// The enforcement programs and the kernels they cover.
pub struct Enforcer {
    state: Mutex<State>,
    /// `{unified root}/{cgroup-parent}/{agent_id}`.
    kernels_dir: PathBuf,
    /// `{cgroup-parent}/{agent_id}`, as the runtime names cgroup parents.
    relative: String,
    /// Every cgroup hierarchy's mount point (the runtime makes the kernel's directory in each).
    hierarchies: Vec<PathBuf>,
}

impl Enforcer {
    /// Makes the kernels' parent cgroup, loads and attaches the programs there (adopting the
    /// pinned ones of an earlier agent: the running kernels' policies never lapse) and writes
    /// the node's policy, with `redirect` as the metadata service's address.
    pub fn start(
        section: &PolicySection,
        agent_id: &str,
        unified_root: &Path,
        hierarchies: Vec<PathBuf>,
        pins_root: Option<&Path>,
        redirect: SocketAddrV4,
    ) -> Result<Self, PolicyError> {
        let relative = format!("{}/{agent_id}", section.cgroup_parent.trim_end_matches('/'));
        let kernels_dir = unified_root.join(relative.trim_start_matches('/'));
        std::fs::create_dir_all(&kernels_dir)
            .map_err(|source| PolicyError::Cgroup { path: kernels_dir.clone(), source })?;
        let pins = pins_root.map(programs::pin_dir);
        let wants_guards = section.guardrails.modes().iter().any(|mode| *mode != crate::config::GuardMode::Off);
        let offsets = if wants_guards { read_offsets() } else { None };
        let (mut programs, mut maps) =
            PolicyPrograms::load(section.kernel_cgroup_level(), &kernels_dir, pins.as_deref(), offsets)?;
        devices::replace_list(&mut maps.devices, 0, &devices::STANDARD)?;
        if wants_guards {
            start_guards(&mut programs, &kernels_dir, pins.as_deref(), section)?;
        }
        let enforcer = Self {
            state: Mutex::new(State {
                maps,
                programs,
                node_names: HashMap::new(),
                kernels: HashMap::new(),
                devices_enforced: section.devices,
                node: NodePolicy::default(),
                egress_default_bps: section.egress_bps,
                shaper: match section.egress_shaper {
                    crate::config::EgressShaper::Edt => pacing::Shaper::Edt,
                    crate::config::EgressShaper::Tbf => pacing::Shaper::Tbf,
                    crate::config::EgressShaper::Auto => pacing::Shaper::detect(),
                },
                guard_node: section.guardrails.clone(),
            }),
            kernels_dir,
            relative,
            hierarchies,
        };
        enforcer.set_node_policy(section, redirect)?;
        tracing::info!(
            parent = %enforcer.kernels_dir.display(),
            metadata = ?section.metadata,
            metadata_service = %redirect,
            deny = section.deny.len(),
            allow = section.allow.len(),
            devices = section.devices,
            egress_shaper = enforcer.state().shaper.name(),
            "network policy (and device access) enforced on every kernel"
        );
        Ok(enforcer)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `{unified root}/{cgroup-parent}/{agent_id}`: where the kernels' directories are.
    pub fn kernels_dir(&self) -> &Path {
        &self.kernels_dir
    }

    /// Writes the node's settings and replaces its rule list (new entries first, then the
    /// ones no longer there go: a destination both lists cover never sees a gap).
    pub fn set_node_policy(&self, section: &PolicySection, redirect: SocketAddrV4) -> Result<(), PolicyError> {
        let lists = RuleLists { deny: section.deny.clone(), allow: section.allow.clone() };
        let entries = rules::encode(0, &lists, 0)?;
        let metadata_addr = match section.metadata_address.ip() {
            std::net::IpAddr::V4(v4) => v4_mapped(v4.octets()),
            std::net::IpAddr::V6(v6) => v6.octets(),
        };
        let node = NodePolicy {
            metadata_addr,
            redirect_addr: v4_mapped(redirect.ip().octets()),
            metadata_port: section.metadata_address.port(),
            redirect_port: redirect.port(),
            metadata_mode: match section.metadata {
                MetadataMode::Allow => metadata_mode::ALLOW,
                MetadataMode::Deny => metadata_mode::DENY,
                MetadataMode::Redirect => metadata_mode::REDIRECT,
            },
            flags: rules::list_flags(&lists),
            _pad: 0,
        };
        let mut state = self.state();
        rules::replace_list(state.maps.tries(), 0, &entries)?;
        state.node = node;
        state.write_node()?;
        state.node_names = entries.iter().map(|entry| (entry.rule.id, entry.name.clone())).collect();
        state.egress_default_bps = section.egress_bps;
        state.guard_node = section.guardrails.clone();
        let rewrites: Vec<(CgroupId, guards::Exceptions)> =
            state.kernels.values().map(|entry| (entry.cgroup, entry.guard_exceptions.clone())).collect();
        for (cgroup, exceptions) in rewrites {
            state.write_guards(cgroup, &exceptions)?;
        }
        let kernels: Vec<(String, CgroupId, u64)> =
            state.kernels.iter().map(|(id, entry)| (id.clone(), entry.cgroup, state.effective_cap(entry))).collect();
        drop(state);
        for (_, cgroup, cap) in &kernels {
            self.state().write_cap(*cgroup, *cap)?;
        }
        self.state().write_node()?;
        for (kernel_id, _, cap) in kernels {
            if let Err(err) = self.pace_kernel(&kernel_id) {
                tracing::warn!(kernel_id, egress_bps = cap, error = %err, "the kernel's egress shaper cannot be set");
            }
        }
        Ok(())
    }

    /// Sets a kernel's own egress cap (bits per second; 0: the node's default alone); the next
    /// packet meets it. Returns the cap it is held to now.
    pub fn set_egress_cap(&self, kernel_id: &str, bits_per_sec: u64) -> Result<u64, PolicyError> {
        let cap = {
            let mut state = self.state();
            let entry = state.kernels.get_mut(kernel_id).ok_or_else(|| PolicyError::UnknownKernel(kernel_id.into()))?;
            entry.egress_bps = bits_per_sec;
            let cgroup = entry.cgroup;
            let cap = pacing::effective_cap(state.egress_default_bps, bits_per_sec);
            state.write_cap(cgroup, cap)?;
            state.write_node()?;
            cap
        };
        self.pace_kernel(kernel_id)?;
        tracing::info!(kernel_id, egress_bps = cap, "egress cap set");
        Ok(cap)
    }

    /// Puts a capped kernel's shaper on the interfaces of its network namespace (after its
    /// container started: the namespace is the container's): `fq` for EDT, or the token bucket
    /// at its cap. An uncapped kernel's token bucket is removed; one that never had a cap is
    /// left as it is.
    pub fn pace_kernel(&self, kernel_id: &str) -> Result<(), PolicyError> {
        let (cap, shaper, paced) = {
            let state = self.state();
            let entry = state.kernels.get(kernel_id).ok_or_else(|| PolicyError::UnknownKernel(kernel_id.into()))?;
            (state.effective_cap(entry), state.shaper, entry.paced)
        };
        let qdisc = match (cap, shaper) {
            (0, _) if !paced => return Ok(()),
            (0, pacing::Shaper::Edt) => return Ok(()),
            (0, pacing::Shaper::Tbf) => pacing::Qdisc::Default,
            (_, pacing::Shaper::Edt) => pacing::Qdisc::Fq,
            (cap, pacing::Shaper::Tbf) => pacing::Qdisc::Tbf { bytes_per_sec: pacing::bytes_per_sec(cap) },
        };
        let mut pid = None;
        metadata::walk_cgroup_pids(&self.kernels_dir.join(kernel_id), |found| {
            pid = Some(found);
            true
        });
        let pid = pid.ok_or(PacingError::NoProcess)?;
        let interfaces = pacing::install(Path::new("/proc"), pid, qdisc)?;
        if let Some(entry) = self.state().kernels.get_mut(kernel_id) {
            entry.paced = cap > 0;
        }
        tracing::info!(kernel_id, egress_bps = cap, shaper = shaper.name(), ?interfaces, "kernel's egress shaper set");
        Ok(())
    }

    /// The egress cap each kernel is held to (bits per second), for those with one.
    pub fn egress_caps(&self) -> Vec<(String, u64)> {
        let state = self.state();
        let mut caps: Vec<(String, u64)> = state
            .kernels
            .iter()
            .map(|(id, entry)| (id.clone(), state.effective_cap(entry)))
            .filter(|(_, cap)| *cap > 0)
            .collect();
        caps.sort();
        caps
    }

    /// Makes a kernel's cgroup directory and writes its own rules and the device nodes `given`
    /// to it before its container exists; returns the cgroup parent the runtime must put the
    /// container under.
    pub fn prepare_kernel(&self, kernel_id: &str, input: KernelInput<'_>) -> Result<String, PolicyError> {
        crate::scratch::validate_kernel_id(kernel_id)?;
        let lists = input.rules;
        let device_rules = input.devices.iter().map(devices::given).collect::<Result<Vec<_>, _>>()?;
        let dir = self.kernels_dir.join(kernel_id);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(PolicyError::Cgroup { path: dir, source }),
        }
        let cgroup = std::fs::metadata(&dir).map_err(|source| PolicyError::Cgroup { path: dir.clone(), source })?.ino();
        let list = kernel_list(cgroup);
        let entries = rules::encode(list, lists, KERNEL_RULE)?;
        let mut state = self.state();
        rules::replace_list(state.maps.tries(), list, &entries)?;
        devices::replace_list(&mut state.maps.devices, list, &device_rules)?;
        let device_flag = if state.devices_enforced { flags::DEVICES } else { 0 };
        let own = KernelPolicy { list, flags: rules::list_flags(lists) | device_flag };
        state
            .maps
            .kernels
            .insert(cgroup, own, 0)
            .map_err(|err| PolicyError::Map { map: "KERNEL_POLICIES", reason: err.to_string() })?;
        let names = entries.iter().map(|entry| (entry.rule.id, entry.name.clone())).collect();
        let entry = KernelEntry {
            cgroup,
            list,
            names,
            egress_bps: input.egress_bps,
            paced: false,
            guard_exceptions: input.guards.clone(),
        };
        let cap = state.effective_cap(&entry);
        state.write_cap(cgroup, cap)?;
        // The kernel's rules and cap are in place before the node's flags say they exist.
        state.write_node()?;
        state.write_guards(cgroup, input.guards)?;
        state.kernels.insert(kernel_id.to_owned(), entry);
        Ok(format!("{}/{kernel_id}", self.relative))
    }

    /// Removes a kernel's entries, counters and cgroup directories (its container is gone).
    pub fn release_kernel(&self, kernel_id: &str) {
        if crate::scratch::validate_kernel_id(kernel_id).is_err() {
            return;
        }
        let entry = self.state().kernels.remove(kernel_id);
        let cgroup = match entry {
            Some(entry) => Some((entry.cgroup, entry.list)),
            None => std::fs::metadata(self.kernels_dir.join(kernel_id))
                .ok()
                .map(|meta| (meta.ino(), kernel_list(meta.ino()))),
        };
        if let Some((cgroup, list)) = cgroup {
            let mut state = self.state();
            let _ = state.maps.kernels.remove(&cgroup);
            if let Err(err) = rules::replace_list(state.maps.tries(), list, &[]) {
                tracing::warn!(kernel_id, error = %err, "removing the kernel's rules failed");
            }
            if let Err(err) = devices::replace_list(&mut state.maps.devices, list, &[]) {
                tracing::warn!(kernel_id, error = %err, "removing the kernel's devices failed");
            }
            if let Err(err) = state.write_cap(cgroup, 0) {
                tracing::warn!(kernel_id, error = %err, "removing the kernel's egress cap failed");
            }
            if let Err(err) = state.write_node() {
                tracing::warn!(kernel_id, error = %err, "rewriting the node's flags failed");
            }
            state.forget_guards(cgroup);
            let stale: Vec<_> = state.maps.verdicts.keys().flatten().filter(|key| key.kernel == cgroup).collect();
            for key in stale {
                let _ = state.maps.verdicts.remove(&key);
            }
        }
        for hierarchy in &self.hierarchies {
            let dir = hierarchy.join(self.relative.trim_start_matches('/')).join(kernel_id);
            match std::fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => tracing::warn!(dir = %dir.display(), error = %err, "removing a kernel's cgroup failed"),
            }
        }
    }

    /// After recovery: releases the directories and entries of kernels that are not `live` (a
    /// directory that still holds a container stays), and entries whose directory is gone.
    pub fn sweep(&self, live: &HashSet<String>) {
        let dirs: Vec<String> = std::fs::read_dir(&self.kernels_dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect();
        for kernel_id in dirs.iter().filter(|id| !live.contains(*id)) {
            // A container still inside is no gone kernel's (one being created right now).
            if has_subdirectories(&self.kernels_dir.join(kernel_id)) {
                tracing::info!(
                    kernel_id,
                    "a kernel directory this agent has no record of still holds a container; leaving it"
                );
                continue;
            }
            tracing::info!(kernel_id, "releasing the policy of a kernel that no longer exists");
            self.release_kernel(kernel_id);
        }
        let live_cgroups: HashSet<CgroupId> = dirs
            .iter()
            .filter_map(|id| std::fs::metadata(self.kernels_dir.join(id)).ok().map(|meta| meta.ino()))
            .collect();
        let mut state = self.state();
        let orphans: Vec<(CgroupId, u32)> = state
            .maps
            .kernels
            .iter()
            .flatten()
            .filter(|(cgroup, _)| !live_cgroups.contains(cgroup))
            .map(|(cgroup, own)| (cgroup, own.list))
            .collect();
        for (cgroup, list) in orphans {
            let _ = state.maps.kernels.remove(&cgroup);
            let _ = rules::replace_list(state.maps.tries(), list, &[]);
            let _ = devices::replace_list(&mut state.maps.devices, list, &[]);
            let _ = state.write_cap(cgroup, 0);
            state.forget_guards(cgroup);
        }
        if let Err(err) = state.write_node() {
            tracing::warn!(error = %err, "rewriting the node's flags failed");
        }
    }

    /// Every verdict counter, with kernels and rules by name.
    pub fn verdicts(&self) -> Vec<VerdictCount> {
        let state = self.state();
        let kernel_of: HashMap<CgroupId, (&str, &KernelEntry)> =
            state.kernels.iter().map(|(id, entry)| (entry.cgroup, (id.as_str(), entry))).collect();
        let mut counts = Vec::new();
        for (key, values) in state.maps.verdicts.iter().flatten() {
            let count: u64 = values.iter().sum();
            let kernel = kernel_of.get(&key.kernel);
            let rule = state.rule_label(kernel.map(|(_, entry)| *entry), key.rule);
            counts.push(VerdictCount {
                kernel_id: kernel.map(|(id, _)| (*id).to_owned()).unwrap_or_default(),
                rule,
                verdict: match key.verdict {
                    verdict::ALLOWED => "allowed",
                    verdict::DENIED => "denied",
                    verdict::REDIRECTED => "redirected",
                    verdict::MONITORED => "monitored",
                    _ => "unknown",
                },
                hook: rules::hook_name(key.hook),
                count,
            });
        }
        counts.sort_by(|a, b| {
            (&a.kernel_id, &a.rule, a.verdict, a.hook).cmp(&(&b.kernel_id, &b.rule, b.verdict, b.hook))
        });
        counts
    }

    /// Denial reports the ring buffer had no room for.
    pub fn lost_reports(&self) -> u64 {
        let state = self.state();
        state.maps.lost.get(&0, 0).map(|values| values.iter().sum()).unwrap_or(0)
    }

    /// Each guardrail, whether it runs on this host (raw sockets always: a cgroup socket
    /// program; the rest when BPF LSM does), and whether its calls are observed instead.
    pub fn guards_active(&self) -> Vec<GuardStatus> {
        let state = self.state();
        let (decide, observed) = (state.programs.guards_decide(), state.programs.observed_guards());
        agent_common::policy::guard::NAMES
            .iter()
            .enumerate()
            .map(|(index, name)| {
                let active = decide || index == agent_common::policy::guard::RAW_SOCKET;
                GuardStatus { name, active, observed: !active && observed.contains(&index) }
            })
            .collect()
    }

    /// Whether a kernel with these guardrail exceptions starts without `CAP_NET_RAW`
    /// (`[policy.guardrails] drop-net-raw` on a host where the packet-socket guardrail cannot
    /// decide, and both socket guardrails under `enforce` for it).
    pub fn drops_net_raw(&self, exceptions: &guards::Exceptions) -> bool {
        let state = self.state();
        if !state.guard_node.drop_net_raw || state.programs.guards_decide() {
            return false;
        }
        let modes = guards::kernel_modes(&state.guard_node, exceptions).modes;
        let enforce = guards::mode_byte(crate::config::GuardMode::Enforce);
        [agent_common::policy::guard::RAW_SOCKET, agent_common::policy::guard::PACKET_SOCKET]
            .iter()
            .all(|guard| modes[*guard] == enforce)
    }

    /// A kernel's cgroup made anew for a new container: its mount guardrail waits for the
    /// container's first program again.
    pub fn disarm(&self, kernel_id: &str) {
        let mut state = self.state();
        if let Some(cgroup) = state.kernels.get(kernel_id).map(|entry| entry.cgroup)
            && state.maps.armed.get(&cgroup, 0).is_ok()
        {
            let _ = state.maps.armed.remove(&cgroup);
        }
    }

    /// Kernels with a policy entry.
    pub fn kernel_count(&self) -> usize {
        self.state().kernels.len()
    }

    /// The kernel a policy cgroup id belongs to.
    pub fn kernel_of(&self, cgroup: CgroupId) -> Option<String> {
        self.state().kernels.iter().find(|(_, entry)| entry.cgroup == cgroup).map(|(id, _)| id.clone())
    }

    /// A rule's name (for denial reports).
    pub fn rule_name(&self, cgroup: CgroupId, id: u32) -> String {
        let state = self.state();
        state.rule_label(state.kernels.values().find(|entry| entry.cgroup == cgroup), id)
    }

    /// The programs' cost as the kernel measures it.
    pub fn program_stats(&self) -> Vec<ProgramStats> {
        self.state().programs.stats()
    }

    /// The denial ring buffer, for [`run_denial_log`] (once).
    pub fn take_denials(&self) -> Option<aya::maps::RingBuf<aya::maps::MapData>> {
        self.state().maps.denials.take()
    }
}

/// Where a task's cgroup is, from the kernel's BTF; `None` (logged) leaves the ptrace rule
/// out of the way.
fn read_offsets() -> Option<guards::CgroupOffsets> {
    match crate::monitor::btf::KernelBtf::from_sys_fs().and_then(|btf| guards::CgroupOffsets::read(&btf)) {
        Ok(offsets) => Some(offsets),
        Err(err) => {
            tracing::warn!(error = %err, "the ptrace-outside guardrail cannot follow tasks to their cgroups; it allows");
            None
        }
    }
}

/// Attaches the guardrail programs; where this host cannot run them and they are not required
/// (logged), the observers of their calls instead.
fn start_guards(
    programs: &mut PolicyPrograms,
    parent: &Path,
    pins: Option<&Path>,
    section: &PolicySection,
) -> Result<(), PolicyError> {
    let outcome = match guards::unavailable_reason() {
        Some(reason) => Err(reason),
        None => programs
            .attach_guards(parent, pins)
            .map_err(|err| format!("this kernel refuses BPF LSM programs ({err}); only the raw-socket guardrail runs")),
    };
    let Err(reason) = outcome else { return Ok(()) };
    if section.guardrails.required {
        return Err(PolicyError::Guardrails(reason));
    }
    tracing::error!(
        reason,
        "the BPF LSM guardrails cannot run on this host; kernels run without them (see backendai_agent_policy_guardrails_active)"
    );
    if let Err(err) = programs.attach_observers(parent, pins) {
        tracing::warn!(error = %err, "the guardrails' calls cannot be observed either");
    }
    let names: Vec<&str> = programs.observed_guards().iter().map(|g| agent_common::policy::guard::NAMES[*g]).collect();
    if !names.is_empty() {
        tracing::warn!(
            guardrails = ?names,
            "these guardrails' calls are observed by syscall tracepoints instead: counted and reported with \
             their outcome (denied where the container runtime refused them), never stopped by the agent \
             (see backendai_agent_policy_guardrails_observed)"
        );
    }
    Ok(())
}

fn has_subdirectories(dir: &Path) -> bool {
    std::fs::read_dir(dir).into_iter().flatten().flatten().any(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
}

/// Logs each reported denial (the programs report one per kernel and destination per minute).
pub async fn run_denial_log(
    enforcer: std::sync::Arc<Enforcer>,
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    // SAFETY: the ring buffer's descriptor stays open for as long as it lives, and the AsyncFd
    // owns the ring buffer.
    let registered = unsafe { tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
    let mut ring = match registered.map_err(std::io::Error::from) {
        Ok(ring) => ring,
        Err(err) => {
            tracing::warn!(error = %err, "cannot poll the policy's denial reports; denials are counted but not logged");
            return;
        }
    };
    loop {
        let mut guard = tokio::select! {
            _ = shutdown.cancelled() => return,
            ready = ring.readable_mut() => match ready {
                Ok(guard) => guard,
                Err(err) => {
                    tracing::warn!(error = %err, "polling the policy's denial reports failed");
                    return;
                }
            },
        };
        let buffer = guard.get_inner_mut();
        while let Some(item) = buffer.next() {
            if item.len() < std::mem::size_of::<agent_common::policy::Denial>() {
                continue;
            }
            // SAFETY: the program writes whole `Denial`s; read unaligned from the ring's bytes.
            let denial: agent_common::policy::Denial = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            log_denial(&enforcer, &denial);
        }
        guard.clear_ready();
    }
}

/// One denial, in the log: a destination, or a device node.
fn log_denial(enforcer: &Enforcer, denial: &agent_common::policy::Denial) {
    let kernel_id = enforcer.kernel_of(denial.kernel).unwrap_or_default();
    let rule = enforcer.rule_name(denial.kernel, denial.rule);
    if denial.hook == agent_common::policy::hook::DEVICE {
        let word =
            |i: usize| u32::from_ne_bytes([denial.addr[i], denial.addr[i + 1], denial.addr[i + 2], denial.addr[i + 3]]);
        let device = DeviceRule { kind: word(0), major: word(4), minor: word(8), access: u32::from(denial.port) };
        tracing::warn!(
            kernel_id,
            device = %devices::rule_text(&device),
            rule,
            "policy denied a kernel's access to a device node it was not given (logged once per kernel and device per minute)"
        );
        return;
    }
    if denial.hook == agent_common::policy::hook::GUARD {
        let outcome = if denial.protocol == verdict::MONITORED { "monitored" } else { "denied" };
        tracing::warn!(
            kernel_id,
            guardrail = rule,
            outcome,
            detail = denial.port,
            "a guardrail saw a kernel's call (logged once per kernel, guardrail and call per minute)"
        );
        return;
    }
    tracing::warn!(
        kernel_id,
        destination = %rules::destination_text(&denial.addr, denial.port),
        protocol = denial.protocol,
        hook = rules::hook_name(denial.hook),
        rule,
        "policy denied a kernel's connection (logged once per kernel and destination per minute)"
    );
}

/// A kernel's narrowing of the node's rules, from its creation config
/// (`internal_data.network_policy`: `{"deny": [...], "allow": [...]}` in the rule syntax of
/// `[policy]`), as JSON.
pub fn kernel_rules(json: Option<&serde_json::Value>) -> Result<RuleLists, String> {
    match json {
        None | Some(serde_json::Value::Null) => Ok(RuleLists::default()),
        Some(value) => serde_json::from_value(value.clone()).map_err(|err| err.to_string()),
    }
}

/// The bridge whose gateway address `metadata-service-host = "auto"` takes.
const DEFAULT_BRIDGE: &str = "docker0";

/// The metadata service's host: the configured address, or the IPv4 address of Docker's
/// default bridge (every kernel reaches the host there, whichever bridge it is on).
pub fn metadata_host(host: crate::config::MetadataHost) -> Result<std::net::Ipv4Addr, String> {
    match host {
        crate::config::MetadataHost::Addr(addr) => Ok(addr),
        crate::config::MetadataHost::Auto => interface_ipv4(DEFAULT_BRIDGE).ok_or_else(|| {
            format!(
                "policy.metadata-service-host = \"auto\" found no IPv4 address on `{DEFAULT_BRIDGE}`; set the address kernels reach this host at"
            )
        }),
    }
}

/// The first IPv4 address of a network interface.
fn interface_ipv4(name: &str) -> Option<std::net::Ipv4Addr> {
    let mut addrs: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list that freeifaddrs releases below.
    if unsafe { libc::getifaddrs(&mut addrs) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cursor = addrs;
    while !cursor.is_null() {
        // SAFETY: a node of the list getifaddrs returned, alive until freeifaddrs.
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        if entry.ifa_addr.is_null() || entry.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a NUL-terminated name and a sockaddr whose family says its size.
        let (entry_name, family) = unsafe { (std::ffi::CStr::from_ptr(entry.ifa_name), (*entry.ifa_addr).sa_family) };
        if entry_name.to_bytes() != name.as_bytes() || i32::from(family) != libc::AF_INET {
            continue;
        }
        // SAFETY: an AF_INET address is a sockaddr_in.
        let sin = unsafe { &*entry.ifa_addr.cast::<libc::sockaddr_in>() };
        found = Some(std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
        break;
    }
    // SAFETY: the list from getifaddrs, released once.
    unsafe { libc::freeifaddrs(addrs) };
    found
}
