//! The kernel registry and lifecycle: one state machine per kernel (preparing → pulling →
//! creating → running → terminating → terminated), the create/destroy/restart flows over
//! resources, scratch, ports and Docker, lifecycle events, persistence and recovery; how a
//! kernel's container is launched (the mounted kernel runner as its entrypoint).

pub mod commit;
pub mod execution;
pub mod runner;
pub mod spec;
pub mod store;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::PathBuf,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use rmpv::Value;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    docker::{
        ContainerEvent, DockerClient, DockerError,
        containers::ContainerSpec,
        images::{PullProgress, RegistryAuth},
        labels,
    },
    events::EventBus,
    metrics::MetricsState,
    msgpack_json::map,
    policy::Enforcer,
    ports::PortPool,
    resources::{Allocation, KernelResourceSpec, ResourceAllocator, ResourceSlots, SlotAmount, SlotRegistry},
    scratch::{self, IntrinsicPorts, ScratchContents, ScratchRoot},
    usage::{KernelMeta, UsageHandle},
};
pub use spec::{KernelSpec, SpecError};
pub use store::{KernelStore, StoreError};

/// Where a kernel is in its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KernelState {
    #[default]
    Preparing,
    Pulling,
    Creating,
    Running,
    Terminating,
    Terminated,
}

impl KernelState {
    pub const ALL: [KernelState; 6] = [
        KernelState::Preparing,
        KernelState::Pulling,
        KernelState::Creating,
        KernelState::Running,
        KernelState::Terminating,
        KernelState::Terminated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            KernelState::Preparing => "preparing",
            KernelState::Pulling => "pulling",
            KernelState::Creating => "creating",
            KernelState::Running => "running",
            KernelState::Terminating => "terminating",
            KernelState::Terminated => "terminated",
        }
    }
}

/// A published container port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePort {
    pub name: String,
    pub protocol: String,
    pub container_port: u16,
    pub host_port: u16,
}

/// What the agent remembers of a kernel, on disk and in memory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KernelRecord {
    pub kernel_id: String,
    pub session_id: String,
    pub state: KernelState,
    pub image: String,
    pub owner_user_id: String,
    pub owner_project_id: String,
    pub container_id: Option<String>,
    pub cpuset: Vec<u32>,
    pub mem_bytes: u64,
    /// Allocated slots as decimal strings (`{"cpu": "1", "mem": "268435456"}`).
    pub slots: BTreeMap<String, String>,
    pub shm_bytes: Option<u64>,
    pub environ: BTreeMap<String, String>,
    /// Host-side bind mounts (`host:container[:ro]`) besides the scratch directories.
    pub binds: Vec<String>,
    pub repl_in_port: u16,
    pub repl_out_port: u16,
    pub service_ports: Vec<ServicePort>,
    /// Every host port the kernel holds.
    pub host_ports: Vec<u16>,
    /// Unix seconds.
    pub created_at: f64,
    /// Run as the container's main process (`/bin/sh -c …`) instead of the image's command.
    #[serde(default)]
    pub startup_command: Option<String>,
    /// The session's bridge network (`create_local_network`), for multi-container sessions.
    #[serde(default)]
    pub network: Option<String>,
    /// The kernel's name there, an alias the session's other kernels resolve.
    #[serde(default)]
    pub cluster_hostname: Option<String>,
    /// Its own network rules (`internal_data.network_policy`), re-applied after a restart.
    #[serde(default)]
    pub network_policy: Option<serde_json::Value>,
    /// Its own egress cap in bits per second (creation's `resource_opts.net_egress_bps`, or as
    /// last set), re-applied after a restart.
    #[serde(default)]
    pub egress_bps: Option<u64>,
    /// Its own guardrail modes (`internal_data.guardrails`), re-applied after a restart.
    #[serde(default)]
    pub guardrails: Option<serde_json::Value>,
    /// Accelerator slot → the devices it holds and how much of each; the copy of
    /// `resource.txt`'s `<SLOT>_SHARES` lines a restart falls back on.
    #[serde(default)]
    pub devices: BTreeMap<String, crate::resources::PerDevice>,
}

impl KernelRecord {
    /// Who the kernel's usage bills to and what it holds.
    pub fn usage_meta(&self) -> KernelMeta {
        KernelMeta {
            kernel_id: self.kernel_id.clone(),
            session_id: self.session_id.clone(),
            owner_user_id: self.owner_user_id.clone(),
            owner_project_id: self.owner_project_id.clone(),
            image: self.image.clone(),
            slots: self.slots.clone(),
        }
    }

    fn allocation(&self) -> Allocation {
        let slots = self
            .slots
            .iter()
            .filter_map(|(slot, amount)| Some((slot.clone(), amount.parse::<SlotAmount>().ok()?)))
            .collect::<ResourceSlots>();
        Allocation { cpuset: self.cpuset.clone(), mem_bytes: self.mem_bytes, slots, devices: self.devices.clone() }
    }
}

/// Why a kernel operation failed. Messages name the kernel and the problem.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("unknown kernel id `{0}`")]
    UnknownKernel(String),
    #[error("kernel `{0}` already exists")]
    AlreadyExists(String),
    #[error("kernel `{kernel_id}`: {source}")]
    Spec { kernel_id: String, source: SpecError },
    #[error("kernel `{kernel_id}`: {message}")]
    Failed { kernel_id: String, message: String },
    #[error("the Docker engine is not reachable: {0}")]
    Docker(#[from] DockerError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Arguments(String),
    /// Some kernels of one `create_kernels` call failed; each is named.
    #[error("{0}")]
    Creation(String),
}

/// Where a kernel's policy puts its container: the cgroup parent and the capabilities taken.
#[derive(Debug, Default)]
struct Placement {
    cgroup_parent: Option<String>,
    cap_drop: Vec<String>,
}

impl Placement {
    fn onto(self, spec: &mut ContainerSpec) {
        spec.cgroup_parent = self.cgroup_parent;
        spec.cap_drop = self.cap_drop;
    }
}

fn failed(kernel_id: &str, message: impl std::fmt::Display) -> KernelError {
    KernelError::Failed { kernel_id: kernel_id.to_owned(), message: message.to_string() }
}

/// Owns every kernel of this agent.
pub struct KernelManager {
    agent_id: String,
    scaling_group: String,
    agent_addr: String,
    bind_host: String,
    mount_root: PathBuf,
    docker_host: Option<String>,
    docker: Mutex<Option<DockerClient>>,
    pub allocator: ResourceAllocator,
    pub ports: PortPool,
    scratch: ScratchRoot,
    slot_registry: SlotRegistry,
    /// The accelerators whose devices kernels are given (their slots are in `slot_registry`).
    accelerators: Vec<crate::resources::compute::Accelerator>,
    events: EventBus,
    store: KernelStore,
    kernels: Mutex<BTreeMap<String, KernelRecord>>,
    /// Kernels being stopped on purpose, whose container exit is not news.
    stopping: Mutex<HashSet<String>>,
    creation: Semaphore,
    stop_grace_secs: i32,
    krunner_path: PathBuf,
    runner_limits: runner::RunnerLimits,
    repls: execution::Repls,
    /// The measurements `destroy_kernel` returns as the kernel's last stats.
    metrics: Arc<MetricsState>,
    /// Each live kernel's environment as its container has it, as of the last change (for the
    /// metadata service, which cannot wait on `kernels`).
    environs: std::sync::Mutex<BTreeMap<String, BTreeMap<String, String>>>,
    /// Kernels per state as of the last change, for scrapes that cannot wait on `kernels`.
    state_counts: std::sync::Mutex<[usize; KernelState::ALL.len()]>,
    /// Set once the saved registry has been reconciled with the engine.
    ready: std::sync::atomic::AtomicBool,
    /// Images being pulled for `check_and_pull`, by the name Docker knows them by.
    pulling: Arc<std::sync::Mutex<HashSet<String>>>,
    /// How far each image being pulled has come (either kind of pull).
    pulls: PullBoard,
    /// Tells the usage meter when kernels start and end.
    usage: UsageHandle,
    /// `agent.image-commit-path`: where commits write files and their lock files.
    commit_root: PathBuf,
    /// The enforcement every kernel is put under before it starts (`None`: policy off).
    policy: Option<Arc<Enforcer>>,
    /// `[policy] kernel-devices`: device nodes every kernel's container gets.
    kernel_devices: Vec<crate::config::DeviceMapping>,
}

/// The image label that declares a kernel's services: `name:protocol:port,…`.
pub const SERVICE_PORTS_LABEL: &str = "ai.backend.service-ports";

/// An image whose own entrypoint is a Backend.AI-compatible runner says so with this label
/// set to `image`; every other image gets `bai-krunner` as its entrypoint.
pub const OWN_RUNNER_LABEL: &str = "ai.backend.kernel-runner";
/// The query-mode profile of an image (`shell`, `python`, …) and its interpreter.
pub const RUNTIME_TYPE_LABEL: &str = "ai.backend.runtime-type";
pub const RUNTIME_PATH_LABEL: &str = "ai.backend.runtime-path";
/// Where the kernel runner appears inside every kernel (read-only).
pub const KRUNNER_MOUNT: &str = "/opt/kernel/bai-krunner";

/// How a kernel's container starts: its entrypoint and command, and the runner mount.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Launch {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub runner_bind: Option<String>,
}

/// The launch for an image with `labels`. With our runner, the startup command (if any)
/// becomes the runner's main command, so the kernel still ends when that command ends.
pub fn launch(labels: &HashMap<String, String>, startup_command: Option<&str>, krunner: &std::path::Path) -> Launch {
    let startup = startup_command.map(|command| vec!["/bin/sh".to_owned(), "-c".to_owned(), command.to_owned()]);
    if labels.get(OWN_RUNNER_LABEL).is_some_and(|value| value.trim() == "image") {
        return Launch { entrypoint: None, cmd: startup, runner_bind: None };
    }
    let mut entrypoint = vec![KRUNNER_MOUNT.to_owned()];
    if let Some(kind) = labels.get(RUNTIME_TYPE_LABEL).filter(|v| !v.trim().is_empty()) {
        entrypoint.extend(["--runtime".to_owned(), kind.trim().to_owned()]);
    }
    if let Some(path) = labels.get(RUNTIME_PATH_LABEL).filter(|v| !v.trim().is_empty()) {
        entrypoint.extend(["--runtime-path".to_owned(), path.trim().to_owned()]);
    }
    if let Some(startup) = startup {
        entrypoint.push("--".to_owned());
        entrypoint.extend(startup);
    }
    Launch {
        entrypoint: Some(entrypoint),
        cmd: None,
        runner_bind: Some(format!("{}:{KRUNNER_MOUNT}:ro", krunner.display())),
    }
}

/// Services every kernel has whether its image declares them or not (Backend.AI's intrinsic ones).
const BUILTIN_SERVICES: &[(&str, &str, u16)] = &[("sshd", "tcp", 2200), ("ttyd", "http", 7681)];

/// The built-in services plus those of an `ai.backend.service-ports` label, as
/// (name, protocol, container port); a port declared twice is kept once.
pub fn service_ports(label: &str) -> Result<Vec<(String, String, u16)>, String> {
    let mut services: Vec<(String, String, u16)> =
        BUILTIN_SERVICES.iter().map(|(name, protocol, port)| (name.to_string(), protocol.to_string(), *port)).collect();
    for entry in label.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let parts: Vec<&str> = entry.split(':').collect();
        let [name, protocol, port] = parts[..] else {
            return Err(format!("`{entry}` is not name:protocol:port"));
        };
        let port: u16 =
            port.parse().ok().filter(|p| *p > 0).ok_or_else(|| format!("`{entry}`: `{port}` is not a port number"))?;
        if name.is_empty() || !["tcp", "http", "pty", "preopen", "vnc", "rdp"].contains(&protocol) {
            return Err(format!("`{entry}`: needs a name and a protocol of tcp, http, pty, preopen, vnc or rdp"));
        }
        if [2000, 2001, 2002, 2003].contains(&port) {
            return Err(format!("`{entry}`: port {port} is reserved for the kernel runner"));
        }
        if !services.iter().any(|(_, _, p)| *p == port) {
            services.push((name.to_owned(), protocol.to_owned(), port));
        }
    }
    Ok(services)
}

/// Process limit for every kernel container.
const PIDS_LIMIT: i64 = 4096;
/// Most log bytes `get_logs` returns.
const LOG_LIMIT: usize = 1 << 20;

impl KernelManager {
    pub fn new(
        config: &Config,
        allocator: ResourceAllocator,
        ports: PortPool,
        scratch: ScratchRoot,
        events: EventBus,
        metrics: Arc<MetricsState>,
    ) -> KernelManager {
        let rpc_port = config.agent.rpc_listen_addr.port();
        let public_host = config.agent.public_host.clone().unwrap_or_else(|| "127.0.0.1".to_owned());
        KernelManager {
            agent_id: config.agent.id.clone(),
            scaling_group: config.agent.scaling_group.clone(),
            agent_addr: format!("tcp://{public_host}:{rpc_port}"),
            bind_host: config.container.bind_host.to_string(),
            mount_root: config.container.mount_root.clone(),
            docker_host: config.docker.host.clone(),
            docker: Mutex::new(None),
            allocator,
            ports,
            scratch,
            slot_registry: SlotRegistry::intrinsic(),
            accelerators: Vec::new(),
            events,
            store: KernelStore::new(&config.agent.journal_dir),
            kernels: Mutex::new(BTreeMap::new()),
            stopping: Mutex::new(HashSet::new()),
            creation: Semaphore::new(config.agent.kernel_creation_concurrency.max(1)),
            stop_grace_secs: i32::try_from(config.container.stop_timeout.as_secs()).unwrap_or(i32::MAX),
            krunner_path: config.kernel_runner.path.clone(),
            runner_limits: runner::RunnerLimits {
                output_limit: usize::try_from(config.kernel_runner.output_limit).unwrap_or(usize::MAX),
                response_timeout: config.kernel_runner.response_timeout,
                connect_timeout: config.kernel_runner.connect_timeout,
            },
            repls: execution::Repls::default(),
            metrics,
            environs: std::sync::Mutex::default(),
            state_counts: std::sync::Mutex::new([0; KernelState::ALL.len()]),
            ready: std::sync::atomic::AtomicBool::new(false),
            pulling: Arc::default(),
            pulls: PullBoard::default(),
            usage: UsageHandle::disconnected(),
            commit_root: config.agent.image_commit_path.clone(),
            policy: None,
            kernel_devices: config.policy.kernel_devices.clone(),
        }
    }

    /// A kernel's environment as its container gets it.
    fn container_environ(&self, record: &KernelRecord) -> BTreeMap<String, String> {
        let mut environ = record.environ.clone();
        environ.insert("BACKENDAI_KERNEL_ID".into(), record.kernel_id.clone());
        environ.insert("BACKENDAI_SESSION_ID".into(), record.session_id.clone());
        environ.insert("BACKENDAI_AGENT_ID".into(), self.agent_id.clone());
        environ
    }

    /// Ids of the kernels being created or running, as of the last change.
    pub fn running_kernel_ids(&self) -> Vec<String> {
        self.environs.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).keys().cloned().collect()
    }

    /// A live kernel's container environment, as of the last change.
    pub fn kernel_environ(&self, kernel_id: &str) -> Option<BTreeMap<String, String>> {
        self.environs.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(kernel_id).cloned()
    }

    /// Hands out these accelerators' devices: their slots are accepted in requests from now on
    /// (the allocator holds their maps).
    pub fn set_accelerators(&mut self, accelerators: Vec<crate::resources::compute::Accelerator>) {
        for accelerator in &accelerators {
            if let Err(err) = self.slot_registry.register(&accelerator.slot(), crate::resources::SlotType::Count) {
                tracing::error!(slot = %accelerator.slot(), error = %err, "an accelerator slot could not be registered");
            }
        }
        self.accelerators = accelerators;
    }

    /// The accelerators whose devices kernels are given.
    pub fn accelerators(&self) -> &[crate::resources::compute::Accelerator] {
        &self.accelerators
    }

    /// What a kernel holding `allocation`'s devices gets in its container, every accelerator's
    /// together.
    fn container_devices(
        &self,
        devices: &BTreeMap<String, crate::resources::PerDevice>,
    ) -> crate::resources::compute::ContainerDevices {
        let mut all = crate::resources::compute::ContainerDevices::default();
        for accelerator in &self.accelerators {
            let Some(per_device) = devices.get(&accelerator.slot()) else { continue };
            let given = accelerator.container_devices(per_device);
            all.given.extend(given.given);
            all.env.extend(given.env);
            all.nodes.extend(given.nodes);
            all.allowed_only.extend(given.allowed_only);
            all.device_requests.extend(given.device_requests);
            all.resource_data.extend(given.resource_data);
        }
        all
    }

    /// `attached_devices` of `create_kernels`' result: per accelerator key, each device the
    /// kernel holds as Backend.AI's plugins report it (`device_id`, `model_name`, `data`
    /// with `smp` and `mem`), plus the slot and amount it holds (for `used_devices`).
    fn attached_devices_value(&self, record: &KernelRecord) -> Value {
        let by_key = self
            .attached_devices_of(record)
            .into_iter()
            .map(|(key, devices)| {
                let entries = devices
                    .into_iter()
                    .map(|device| {
                        map(vec![
                            ("device_id", device.device_id.as_str().into()),
                            ("model_name", device.model_name.as_str().into()),
                            ("slot", device.slot.as_str().into()),
                            ("amount", device.amount.normalize().to_string().into()),
                            (
                                "data",
                                map(vec![("smp", device.processing_units.into()), ("mem", device.memory_bytes.into())]),
                            ),
                        ])
                    })
                    .collect();
                (Value::from(key.as_str()), Value::Array(entries))
            })
            .collect();
        Value::Map(by_key)
    }

    /// The devices a kernel holds, per accelerator key.
    fn attached_devices_of(
        &self,
        record: &KernelRecord,
    ) -> Vec<(String, Vec<crate::resources::compute::AttachedDevice>)> {
        self.accelerators
            .iter()
            .filter_map(|accelerator| {
                let per_device = record.devices.get(&accelerator.slot())?;
                Some((accelerator.key.clone(), accelerator.attached_devices(per_device)))
            })
            .collect()
    }

    /// Puts every kernel created from now on (and every recovered one) under `policy`.
    pub fn set_policy(&mut self, policy: Arc<Enforcer>) {
        self.policy = Some(policy);
    }

    /// Writes a kernel's policy and returns the cgroup parent of its container; a policy that
    /// cannot be applied stops the kernel from starting.
    fn apply_policy(&self, record: &KernelRecord) -> Result<Placement, KernelError> {
        let kernel_id = record.kernel_id.as_str();
        let Some(policy) = &self.policy else { return Ok(Placement::default()) };
        let rules = crate::policy::kernel_rules(record.network_policy.as_ref())
            .map_err(|message| failed(kernel_id, format!("its network policy: {message}")))?;
        let guards = crate::policy::guards::kernel_exceptions(record.guardrails.as_ref())
            .map_err(|message| failed(kernel_id, format!("its guardrails: {message}")))?;
        let given = self.container_devices(&record.devices);
        let devices: Vec<crate::config::DeviceMapping> =
            self.kernel_devices.iter().cloned().chain(given.nodes).chain(given.allowed_only).collect();
        let input = crate::policy::KernelInput {
            rules: &rules,
            devices: &devices,
            egress_bps: record.egress_bps.unwrap_or(0),
            guards: &guards,
        };
        let cgroup_parent = policy
            .prepare_kernel(kernel_id, input)
            .map_err(|err| failed(kernel_id, format!("applying its policy: {err}")))?;
        let cap_drop = if policy.drops_net_raw(&guards) { vec!["NET_RAW".to_owned()] } else { Vec::new() };
        Ok(Placement { cgroup_parent: Some(cgroup_parent), cap_drop })
    }

    /// Paces a started kernel's egress when it has a cap.
    fn pace_started(&self, kernel_id: &str) -> Result<(), KernelError> {
        let Some(policy) = &self.policy else { return Ok(()) };
        policy.pace_kernel(kernel_id).map_err(|err| failed(kernel_id, format!("applying its egress cap: {err}")))
    }

    /// Creates and starts a kernel's container under its policy (made by [`Self::apply_policy`]):
    /// its mount guardrail waits for the container's first program, and its egress is paced
    /// once it runs; a container whose cap cannot be paced is removed again.
    async fn start_container(
        &self,
        docker: &DockerClient,
        kernel_id: &str,
        spec: &ContainerSpec,
    ) -> Result<String, KernelError> {
        // The new container's runtime mounts before its first program runs.
        if let Some(policy) = &self.policy {
            policy.disarm(kernel_id);
        }
        let container_id = docker.create_and_start(spec).await.map_err(|err| failed(kernel_id, err))?;
        if let Err(err) = self.pace_started(kernel_id) {
            let _ = docker.remove_container(&container_id).await;
            return Err(err);
        }
        Ok(container_id)
    }

    /// Changes a running kernel's own egress cap (bits per second; 0: the node's default
    /// alone); returns the cap it is held to now. Kept across restarts of kernel and agent.
    pub async fn set_egress_cap(&self, kernel_id: &str, bits_per_sec: u64) -> Result<u64, KernelError> {
        let record = self.record(kernel_id).await?;
        let Some(policy) = &self.policy else {
            return Err(failed(kernel_id, "egress caps need [policy] enabled"));
        };
        if record.state != KernelState::Running {
            return Err(failed(kernel_id, format!("cannot cap a kernel that is {}", record.state.as_str())));
        }
        let cap = policy.set_egress_cap(kernel_id, bits_per_sec).map_err(|err| failed(kernel_id, err))?;
        let own = (bits_per_sec > 0).then_some(bits_per_sec);
        self.set_state(kernel_id, KernelState::Running, |record| record.egress_bps = own).await;
        Ok(cap)
    }

    /// Meters kernels' usage through `usage` from now on.
    pub fn set_usage(&mut self, usage: UsageHandle) {
        self.usage = usage;
    }

    /// How many kernels are in each state, every state listed.
    pub fn state_counts(&self) -> Vec<(KernelState, usize)> {
        let counts = *self.state_counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        KernelState::ALL.into_iter().zip(counts).collect()
    }

    pub fn mark_ready(&self) {
        self.ready.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether recovery is done, so requests see every kernel this agent runs.
    pub fn is_ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Acquire)
    }

    async fn docker(&self) -> Result<DockerClient, KernelError> {
        let mut slot = self.docker.lock().await;
        if let Some(client) = slot.as_ref() {
            return Ok(client.clone());
        }
        let client = DockerClient::connect(self.docker_host.as_deref(), &self.agent_id).await?;
        *slot = Some(client.clone());
        Ok(client)
    }

    async fn persist(&self, kernels: &BTreeMap<String, KernelRecord>) {
        let mut counts = [0; KernelState::ALL.len()];
        for record in kernels.values() {
            counts[record.state as usize] += 1;
        }
        *self.state_counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = counts;
        *self.environs.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = kernels
            .values()
            .filter(|record| matches!(record.state, KernelState::Creating | KernelState::Running))
            .map(|record| (record.kernel_id.clone(), self.container_environ(record)))
            .collect();
        let records: Vec<KernelRecord> = kernels.values().cloned().collect();
        if let Err(err) = self.store.save(&records) {
            tracing::error!(error = %err, "persisting the kernel registry failed");
        }
    }

    async fn set_state(&self, kernel_id: &str, state: KernelState, update: impl FnOnce(&mut KernelRecord)) {
        let mut kernels = self.kernels.lock().await;
        if let Some(record) = kernels.get_mut(kernel_id) {
            record.state = state;
            update(record);
        }
        self.persist(&kernels).await;
    }

    fn emit(&self, name: &str, args: Vec<Value>) {
        self.events.emit(name, args);
    }

    /// Every kernel, for `list_kernels` and the heartbeat.
    pub async fn records(&self) -> Vec<KernelRecord> {
        self.kernels.lock().await.values().cloned().collect()
    }

    pub async fn record(&self, kernel_id: &str) -> Result<KernelRecord, KernelError> {
        self.kernels.lock().await.get(kernel_id).cloned().ok_or_else(|| KernelError::UnknownKernel(kernel_id.into()))
    }

    /// The host directory mounted at `/home/work` in the kernel.
    pub async fn work_dir(&self, kernel_id: &str) -> Result<PathBuf, KernelError> {
        self.record(kernel_id).await?;
        match self.scratch.existing(kernel_id) {
            Ok(Some(scratch)) => Ok(scratch.work),
            Ok(None) => Err(failed(kernel_id, "its scratch directory is gone")),
            Err(err) => Err(failed(kernel_id, err)),
        }
    }

    /// `create_kernels`: creates every kernel of the call, up to the creation concurrency at once.
    pub async fn create_kernels(
        self: &Arc<Self>,
        session_id: &str,
        kernel_ids: Vec<String>,
        configs: Vec<Value>,
        image_refs: HashMap<String, String>,
        network: Option<String>,
    ) -> Result<Vec<Value>, KernelError> {
        if kernel_ids.len() != configs.len() {
            return Err(KernelError::Arguments(format!(
                "create_kernels: {} kernel ids but {} configs",
                kernel_ids.len(),
                configs.len()
            )));
        }
        let mut tasks = Vec::new();
        for (kernel_id, config) in kernel_ids.into_iter().zip(configs) {
            let manager = Arc::clone(self);
            let session_id = session_id.to_owned();
            let image_ref = image_refs.get(&kernel_id).cloned();
            let network = network.clone();
            tasks.push(tokio::spawn(async move {
                let _permit = manager.creation.acquire().await;
                manager.create_kernel(&session_id, &kernel_id, &config, image_ref.as_deref(), network).await
            }));
        }
        let mut results = Vec::new();
        let mut failures = Vec::new();
        for task in tasks {
            match task.await {
                Ok(Ok(info)) => results.push(info),
                Ok(Err(err)) => failures.push(err.to_string()),
                Err(join) => failures.push(format!("a creation task failed: {join}")),
            }
        }
        if failures.is_empty() { Ok(results) } else { Err(KernelError::Creation(failures.join("; "))) }
    }

    async fn create_kernel(
        &self,
        session_id: &str,
        kernel_id: &str,
        config: &Value,
        image_ref: Option<&str>,
        network: Option<String>,
    ) -> Result<Value, KernelError> {
        scratch::validate_kernel_id(kernel_id).map_err(|err| KernelError::Arguments(err.to_string()))?;
        let spec = KernelSpec::parse(config, image_ref, &self.slot_registry)
            .map_err(|source| KernelError::Spec { kernel_id: kernel_id.into(), source })?;
        {
            let mut kernels = self.kernels.lock().await;
            if kernels.contains_key(kernel_id) {
                return Err(KernelError::AlreadyExists(kernel_id.into()));
            }
            let record = KernelRecord {
                kernel_id: kernel_id.into(),
                session_id: session_id.into(),
                state: KernelState::Preparing,
                image: spec.image.clone(),
                owner_user_id: spec.owner_user_id.clone(),
                owner_project_id: spec.owner_project_id.clone(),
                environ: spec.environ.clone(),
                shm_bytes: spec.shm_bytes,
                // A batch session's command is its job, started by trigger_batch_execution.
                startup_command: spec.startup_command.clone().filter(|_| !spec.batch_session),
                network,
                cluster_hostname: spec.cluster_hostname.clone(),
                network_policy: spec.network_policy.clone(),
                egress_bps: spec.egress_bps,
                guardrails: spec.guardrails.clone(),
                created_at: unix_now(),
                ..Default::default()
            };
            kernels.insert(kernel_id.into(), record);
            self.persist(&kernels).await;
        }
        self.emit("kernel_preparing", vec![kernel_id.into(), session_id.into()]);
        match self.bring_up(session_id, kernel_id, &spec).await {
            Ok(info) => Ok(info),
            Err(err) => {
                tracing::warn!(kernel_id, error = %err, "kernel failed to start; releasing what it held");
                self.release(kernel_id).await;
                self.emit(
                    "kernel_terminated",
                    vec![kernel_id.into(), session_id.into(), "failed-to-start".into(), Value::Nil],
                );
                Err(err)
            }
        }
    }

    /// Image, resources, scratch, ports, container: the steps after `preparing`.
    async fn bring_up(&self, session_id: &str, kernel_id: &str, spec: &KernelSpec) -> Result<Value, KernelError> {
        let docker = self.docker().await?;
        if !docker.image_present(&spec.image).await? {
            if !spec.auto_pull {
                return Err(failed(kernel_id, format!("image `{}` is not present and auto_pull is off", spec.image)));
            }
            self.set_state(kernel_id, KernelState::Pulling, |_| {}).await;
            self.emit("kernel_pulling", vec![kernel_id.into(), session_id.into(), spec.image.as_str().into()]);
            let events = self.events.clone();
            let pulls = self.pulls.clone();
            let pulled = docker
                .pull_image(&spec.image, spec.registry_auth.as_ref(), |progress| {
                    pulls.record(&spec.image, progress);
                    events.emit(
                        "kernel_pull_progress",
                        vec![
                            kernel_id.into(),
                            session_id.into(),
                            (progress.current_bytes() as f64).into(),
                            (progress.total_bytes() as f64).into(),
                            progress.status.as_str().into(),
                        ],
                    );
                })
                .await;
            self.pulls.finish(&spec.image);
            pulled.map_err(|err| failed(kernel_id, format!("pulling `{}`: {err}", spec.image)))?;
        }
        self.set_state(kernel_id, KernelState::Creating, |_| {}).await;
        self.emit("kernel_creating", vec![kernel_id.into(), session_id.into()]);
        let labels = docker.image_labels(&spec.image).await?;
        let mut services = service_ports(labels.get(SERVICE_PORTS_LABEL).map(String::as_str).unwrap_or(""))
            .map_err(|message| failed(kernel_id, format!("image label {SERVICE_PORTS_LABEL}: {message}")))?;
        for port in &spec.preopen_ports {
            if !services.iter().any(|(_, _, p)| p == port) {
                services.push((format!("port{port}"), "preopen".into(), *port));
            }
        }

        let allocation = self.allocator.allocate(kernel_id, &spec.slots).map_err(|err| failed(kernel_id, err))?;
        let mut binds = Vec::new();
        for mount in &spec.mounts {
            let host = scratch::resolve_under(&self.mount_root, std::path::Path::new(&mount.host_path))
                .map_err(|err| failed(kernel_id, err))?;
            let mode = if mount.read_only { ":ro" } else { "" };
            binds.push(format!("{}:{}{mode}", host.display(), mount.kernel_path));
        }
        let intrinsic = IntrinsicPorts::default();
        let mut container_ports = vec![intrinsic.replin, intrinsic.replout];
        container_ports.extend(services.iter().map(|(_, _, port)| *port));
        let host_ports = self.take_free_ports(container_ports.len()).map_err(|err| failed(kernel_id, err))?;
        let record_allocation = allocation.clone();
        let ports_taken = host_ports.clone();
        self.set_state(kernel_id, KernelState::Creating, |record| {
            record.cpuset = record_allocation.cpuset.clone();
            record.mem_bytes = record_allocation.mem_bytes;
            record.slots =
                record_allocation.slots.iter().map(|(slot, amount)| (slot.to_owned(), amount.to_string())).collect();
            record.devices = record_allocation.devices.clone();
            record.host_ports = ports_taken.clone();
            record.repl_in_port = ports_taken[0];
            record.repl_out_port = ports_taken[1];
            record.service_ports = services
                .iter()
                .zip(&ports_taken[2..])
                .map(|((name, protocol, container_port), host_port)| ServicePort {
                    name: name.clone(),
                    protocol: protocol.clone(),
                    container_port: *container_port,
                    host_port: *host_port,
                })
                .collect();
            record.binds = binds.clone();
        })
        .await;

        let given = self.container_devices(&allocation.devices);
        let mut resource_spec = KernelResourceSpec::for_allocation(&allocation);
        resource_spec.extra.extend(given.resource_data);
        let mut contents = ScratchContents::new(resource_spec);
        contents.environ = spec.environ.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        contents.environ.extend(given.env);
        contents.bootstrap_script = spec.bootstrap_script.clone().filter(|script| !script.trim().is_empty());
        contents.intrinsic_ports = intrinsic;
        let kernel_scratch = self.scratch.prepare(kernel_id, &contents).map_err(|err| failed(kernel_id, err))?;

        let record = self.record(kernel_id).await?;
        let launch = self.launch_checked(kernel_id, &labels, record.startup_command.as_deref())?;
        let mut container_spec =
            self.container_spec(&record, &launch, &kernel_scratch.work, &kernel_scratch.config, &container_ports);
        self.apply_policy(&record)?.onto(&mut container_spec);
        let container_id = self.start_container(&docker, kernel_id, &container_spec).await?;
        if let Err(err) = kernel_scratch.record_container_id(&container_id) {
            tracing::warn!(kernel_id, error = %err, "recording the container id in resource.txt failed");
        }
        let id_for_record = container_id.clone();
        self.set_state(kernel_id, KernelState::Running, |record| record.container_id = Some(id_for_record)).await;
        let record = self.record(kernel_id).await?;
        let info = self.creation_info(&record);
        self.emit("kernel_started", vec![kernel_id.into(), session_id.into(), "".into(), info.clone()]);
        self.usage.kernel_started(record.usage_meta());
        tracing::info!(kernel_id, session_id, container_id, image = %record.image, "kernel running");
        Ok(info)
    }

    /// [`launch`], refusing when our runner is needed but missing on the host.
    fn launch_checked(
        &self,
        kernel_id: &str,
        labels: &HashMap<String, String>,
        startup_command: Option<&str>,
    ) -> Result<Launch, KernelError> {
        let launch = launch(labels, startup_command, &self.krunner_path);
        if launch.runner_bind.is_some() && !self.krunner_path.is_file() {
            return Err(failed(
                kernel_id,
                format!(
                    "the kernel runner {} is missing (build it with `cargo xtask setup`, or set [kernel-runner] path)",
                    self.krunner_path.display()
                ),
            ));
        }
        Ok(launch)
    }

    fn container_spec(
        &self,
        record: &KernelRecord,
        launch: &Launch,
        work: &std::path::Path,
        config_dir: &std::path::Path,
        container_ports: &[u16],
    ) -> ContainerSpec {
        let mut labels = HashMap::from([
            (labels::AGENT_ID.to_owned(), self.agent_id.clone()),
            (labels::KERNEL_ID.to_owned(), record.kernel_id.clone()),
            (labels::SESSION_ID.to_owned(), record.session_id.clone()),
            (labels::OWNER_USER_ID.to_owned(), record.owner_user_id.clone()),
            (labels::OWNER_PROJECT_ID.to_owned(), record.owner_project_id.clone()),
        ]);
        labels.insert("ai.backend.internal.block-service-ports".into(), "0".into());
        let given = self.container_devices(&record.devices);
        if !given.given.is_empty() {
            labels.insert(labels::ACCELERATOR_DEVICES.to_owned(), labels::accelerator_devices(&given.given));
        }
        let mut environ = self.container_environ(record);
        environ.extend(given.env);
        let env: Vec<String> = environ.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut binds =
            vec![format!("{}:/home/work", work.display()), format!("{}:/home/config:ro", config_dir.display())];
        binds.extend(record.binds.iter().cloned());
        binds.extend(launch.runner_bind.iter().cloned());
        let image_name = record.image.rsplit('/').next().unwrap_or(&record.image).replace(':', "-");
        ContainerSpec {
            name: format!("kernel.{image_name}.{}", record.kernel_id),
            image: record.image.clone(),
            labels,
            env,
            entrypoint: launch.entrypoint.clone(),
            cmd: launch.cmd.clone(),
            cpuset: crate::resources::format_cpuset(&record.cpuset),
            memory_bytes: i64::try_from(record.mem_bytes).unwrap_or(i64::MAX),
            shm_bytes: record.shm_bytes.and_then(|b| i64::try_from(b).ok()),
            pids_limit: PIDS_LIMIT,
            binds,
            ports: container_ports.iter().copied().zip(record.host_ports.iter().copied()).collect(),
            bind_host: self.bind_host.clone(),
            working_dir: Some("/home/work".into()),
            network: record.network.clone(),
            hostname: record.cluster_hostname.clone(),
            cgroup_parent: None,
            cap_drop: Vec::new(),
            devices: self.kernel_devices.iter().cloned().chain(given.nodes).collect(),
            device_requests: given
                .device_requests
                .into_iter()
                .map(|request| crate::docker::containers::RuntimeDeviceRequest {
                    driver: request.driver,
                    device_ids: request.device_ids,
                    capabilities: request.capabilities,
                })
                .collect(),
        }
    }

    /// `create_local_network`: the bridge network of a multi-container session (idempotent).
    pub async fn create_local_network(&self, name: &str) -> Result<(), KernelError> {
        Ok(self.docker().await?.create_network(name).await?)
    }

    /// `purge_images`: removes each image, and says per image what failed (an image in use
    /// without `force`, one that is not there).
    pub async fn purge_images(
        &self,
        images: &[String],
        force: bool,
        noprune: bool,
    ) -> Result<Vec<(String, Option<String>)>, KernelError> {
        let docker = self.docker().await?;
        let mut results = Vec::with_capacity(images.len());
        for image in images {
            let outcome = docker.remove_image(image, force, noprune).await;
            if let Err(err) = &outcome {
                tracing::warn!(image, error = %err, "purging an image failed");
            }
            results.push((image.clone(), outcome.err().map(|err| err.to_string())));
        }
        Ok(results)
    }

    /// `destroy_local_network`: removes it; a network already gone is fine.
    pub async fn destroy_local_network(&self, name: &str) -> Result<(), KernelError> {
        Ok(self.docker().await?.remove_network(name).await?)
    }

    /// What a running kernel holds, for restoring after a restart: its record's cores and
    /// memory, and the devices its `resource.txt` names (the record's copy when that file
    /// cannot be read).
    fn held_allocation(&self, record: &KernelRecord) -> Allocation {
        let mut allocation = record.allocation();
        let from_file = self
            .scratch
            .existing(&record.kernel_id)
            .map_err(|err| err.to_string())
            .and_then(|scratch| scratch.ok_or_else(|| "its scratch directory is gone".to_owned()))
            .and_then(|scratch| scratch.read_resource_spec().map_err(|err| err.to_string()))
            .and_then(|spec| spec.allocation().map_err(|err| err.to_string()));
        match from_file {
            Ok(held) => allocation.devices = held.devices,
            Err(reason) if !allocation.devices.is_empty() => tracing::warn!(
                kernel_id = %record.kernel_id,
                reason,
                "resource.txt unreadable; restoring the kernel's devices from its record"
            ),
            Err(_) => {}
        }
        allocation
    }

    /// The per-kernel result of `create_kernels`, in Backend.AI's shape.
    fn creation_info(&self, record: &KernelRecord) -> Value {
        let service_ports = record
            .service_ports
            .iter()
            .map(|p| {
                map(vec![
                    ("name", p.name.as_str().into()),
                    ("protocol", p.protocol.as_str().into()),
                    ("container_ports", Value::Array(vec![p.container_port.into()])),
                    ("host_ports", Value::Array(vec![p.host_port.into()])),
                ])
            })
            .collect();
        let slots = Value::Map(record.slots.iter().map(|(k, v)| (k.as_str().into(), v.as_str().into())).collect());
        map(vec![
            ("id", record.kernel_id.as_str().into()),
            ("kernel_host", self.bind_host.as_str().into()),
            ("repl_in_port", record.repl_in_port.into()),
            ("repl_out_port", record.repl_out_port.into()),
            ("stdin_port", 0.into()),
            ("stdout_port", 0.into()),
            ("service_ports", Value::Array(service_ports)),
            ("container_id", record.container_id.as_deref().unwrap_or_default().into()),
            (
                "resource_spec",
                map(vec![
                    ("slots", slots),
                    ("container_id", record.container_id.as_deref().unwrap_or_default().into()),
                ]),
            ),
            ("attached_devices", self.attached_devices_value(record)),
            ("agent_addr", self.agent_addr.as_str().into()),
            ("scaling_group", self.scaling_group.as_str().into()),
        ])
    }

    /// `n` pool ports that nothing else on the host holds right now. The pool is shared
    /// with whatever else runs on the node, so a port some other process bound is put back
    /// (into its cooldown) and another is taken instead.
    fn take_free_ports(&self, n: usize) -> Result<Vec<u16>, String> {
        const ATTEMPTS: usize = 8;
        let mut chosen = Vec::with_capacity(n);
        for _ in 0..ATTEMPTS {
            let candidates = self.ports.take(n - chosen.len()).map_err(|err| {
                self.ports.release(&chosen);
                err.to_string()
            })?;
            let (free, busy): (Vec<u16>, Vec<u16>) = candidates
                .into_iter()
                .partition(|port| std::net::TcpListener::bind((self.bind_host.as_str(), *port)).is_ok());
            if !busy.is_empty() {
                tracing::warn!(?busy, "pool ports in use by another process on the host; skipping them");
                self.ports.release(&busy);
            }
            chosen.extend(free);
            if chosen.len() == n {
                return Ok(chosen);
            }
        }
        self.ports.release(&chosen);
        Err(format!("could not find {n} free host ports in the pool after {ATTEMPTS} tries"))
    }

    /// Gives back everything a kernel holds and forgets it.
    async fn release(&self, kernel_id: &str) {
        self.repls.forget(kernel_id).await;
        let record = self.kernels.lock().await.get(kernel_id).cloned();
        if let Some(record) = &record {
            if let Some(container_id) = &record.container_id
                && let Ok(docker) = self.docker().await
                && let Err(err) = docker.remove_container(container_id).await
            {
                tracing::warn!(kernel_id, error = %err, "removing the container failed");
            }
            self.ports.release(&record.host_ports);
        }
        self.allocator.free(kernel_id);
        if let Some(policy) = &self.policy {
            policy.release_kernel(kernel_id);
        }
        if let Err(err) = self.scratch.remove(kernel_id) {
            tracing::warn!(kernel_id, error = %err, "removing the scratch directory failed");
        }
        let mut kernels = self.kernels.lock().await;
        kernels.remove(kernel_id);
        self.persist(&kernels).await;
    }

    /// `destroy_kernel`: stop gracefully, then kill after the grace period, then clean up.
    pub async fn destroy_kernel(
        &self,
        kernel_id: &str,
        reason: Option<&str>,
        suppress_events: bool,
    ) -> Result<Value, KernelError> {
        let record = self.record(kernel_id).await?;
        let reason = reason.unwrap_or("user-requested");
        self.stopping.lock().await.insert(kernel_id.to_owned());
        self.set_state(kernel_id, KernelState::Terminating, |_| {}).await;
        if !suppress_events {
            self.emit("kernel_terminating", vec![kernel_id.into(), record.session_id.as_str().into(), reason.into()]);
        }
        let mut exit_code = Value::Nil;
        if let Some(container_id) = &record.container_id {
            let docker = self.docker().await?;
            docker.stop_container(container_id, self.stop_grace_secs).await?;
            if let Some(exit) = docker.container_exit(container_id).await? {
                exit_code = exit.exit_code.into();
            }
        }
        self.release(kernel_id).await;
        self.stopping.lock().await.remove(kernel_id);
        self.usage.kernel_terminated(kernel_id, reason);
        if !suppress_events {
            self.emit(
                "kernel_terminated",
                vec![kernel_id.into(), record.session_id.as_str().into(), reason.into(), exit_code],
            );
        }
        tracing::info!(kernel_id, reason, "kernel destroyed");
        // The last measurements, as the manager keeps them in `last_stat`.
        Ok(self.metrics.kernel_measurements(kernel_id).unwrap_or(Value::Nil))
    }

    /// `restart_kernel`: a new container over the same scratch, allocation and ports.
    pub async fn restart_kernel(&self, kernel_id: &str, image: Option<&str>) -> Result<Value, KernelError> {
        let mut record = self.record(kernel_id).await?;
        if record.state != KernelState::Running {
            return Err(failed(kernel_id, format!("cannot restart a kernel that is {}", record.state.as_str())));
        }
        let docker = self.docker().await?;
        self.stopping.lock().await.insert(kernel_id.to_owned());
        self.set_state(kernel_id, KernelState::Terminating, |_| {}).await;
        if let Some(container_id) = &record.container_id {
            docker.stop_container(container_id, self.stop_grace_secs).await?;
            docker.remove_container(container_id).await?;
        }
        if let Some(image) = image.filter(|i| !i.is_empty()) {
            record.image = image.to_owned();
        }
        let scratch = match self.scratch.existing(kernel_id) {
            Ok(Some(scratch)) => scratch,
            Ok(None) => return Err(failed(kernel_id, "its scratch directory is gone")),
            Err(err) => return Err(failed(kernel_id, err)),
        };
        let intrinsic = IntrinsicPorts::default();
        let mut container_ports = vec![intrinsic.replin, intrinsic.replout];
        container_ports.extend(record.service_ports.iter().map(|p| p.container_port));
        self.repls.forget(kernel_id).await;
        let labels = docker.image_labels(&record.image).await;
        let started = match labels
            .map_err(|err| failed(kernel_id, err))
            .and_then(|labels| self.launch_checked(kernel_id, &labels, record.startup_command.as_deref()))
        {
            Ok(launch) => match self.apply_policy(&record) {
                Ok(placement) => {
                    let mut spec =
                        self.container_spec(&record, &launch, &scratch.work, &scratch.config, &container_ports);
                    placement.onto(&mut spec);
                    self.start_container(&docker, kernel_id, &spec).await
                }
                Err(err) => Err(err),
            },
            Err(err) => Err(err),
        };
        self.stopping.lock().await.remove(kernel_id);
        let container_id = started?;
        let image = record.image.clone();
        self.set_state(kernel_id, KernelState::Running, |r| {
            r.container_id = Some(container_id.clone());
            r.image = image;
        })
        .await;
        let record = self.record(kernel_id).await?;
        self.usage.kernel_started(record.usage_meta());
        self.emit(
            "kernel_started",
            vec![kernel_id.into(), record.session_id.as_str().into(), "restarting".into(), self.creation_info(&record)],
        );
        Ok(self.creation_info(&record))
    }

    /// Whether the kernel's container is running.
    /// `check_and_pull`: for each image, in the background, reports `image_pull_finished`
    /// at once when Docker has it (a `local` image is never pulled), or pulls it between
    /// `image_pull_started` and `image_pull_finished` / `image_pull_failed`. Returns a task id
    /// per canonical name, as Backend.AI's agent does (its background task ids).
    pub async fn check_and_pull(&self, images: Vec<ImagePull>) -> Result<Vec<(String, String)>, KernelError> {
        let docker = self.docker().await?;
        let mut tasks = Vec::with_capacity(images.len());
        for image in images {
            // A background task id, as Python's `uuid4().hex`.
            let task_id = uuid::Uuid::new_v4().simple().to_string();
            tasks.push((image.canonical.clone(), task_id));
            let (docker, events, agent_id, pulling, pulls) =
                (docker.clone(), self.events.clone(), self.agent_id.clone(), self.pulling.clone(), self.pulls.clone());
            tokio::spawn(async move { pull_if_missing(&docker, &events, &agent_id, (&pulling, &pulls), image).await });
        }
        Ok(tasks)
    }

    /// How far the pull of `image` (by the name Docker knows it by) has come, while it runs.
    pub fn pull_progress(&self, image: &str) -> Option<PullProgress> {
        self.pulls.get(image)
    }

    /// `check_pulling`: whether `check_and_pull` is pulling the image now.
    pub fn is_pulling(&self, image: &str) -> bool {
        self.pulling.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains(image)
    }

    /// `check_creating`: whether the kernel is being created or exists.
    pub async fn is_known(&self, kernel_id: &str) -> bool {
        self.kernels.lock().await.contains_key(kernel_id)
    }

    pub async fn check_running(&self, kernel_id: &str) -> Result<bool, KernelError> {
        let record = self.record(kernel_id).await?;
        let Some(container_id) = &record.container_id else { return Ok(false) };
        Ok(self.docker().await?.container_exit(container_id).await?.is_some_and(|exit| exit.running))
    }

    pub async fn logs(&self, kernel_id: &str) -> Result<String, KernelError> {
        let record = self.record(kernel_id).await?;
        let Some(container_id) = &record.container_id else { return Ok(String::new()) };
        Ok(self.docker().await?.container_logs(container_id, LOG_LIMIT).await?)
    }

    /// `sync_kernel_registry`: destroy kernels the manager does not know; tell it about
    /// kernels it lists that are gone here.
    pub async fn sync_with_manager(&self, known: Vec<(String, String)>) -> Result<(), KernelError> {
        let known_ids: HashSet<&str> = known.iter().map(|(kernel_id, _)| kernel_id.as_str()).collect();
        let ours: Vec<String> = self.kernels.lock().await.keys().cloned().collect();
        for kernel_id in &ours {
            if !known_ids.contains(kernel_id.as_str()) {
                self.destroy_kernel(kernel_id, Some("not-found-in-manager"), true).await?;
            }
        }
        let ours: HashSet<String> = ours.into_iter().collect();
        for (kernel_id, session_id) in known {
            if !ours.contains(&kernel_id) {
                self.emit(
                    "kernel_terminated",
                    vec![kernel_id.into(), session_id.into(), "already-terminated".into(), Value::Nil],
                );
            }
        }
        Ok(())
    }

    /// A container of ours stopped on its own (or was OOM-killed): report it and clean up.
    async fn container_stopped(&self, container_id: &str) {
        let record = {
            let kernels = self.kernels.lock().await;
            kernels.values().find(|r| r.container_id.as_deref() == Some(container_id)).cloned()
        };
        let Some(record) = record else { return };
        if record.state != KernelState::Running || self.stopping.lock().await.contains(&record.kernel_id) {
            return;
        }
        let exit = match self.docker().await {
            Ok(docker) => docker.container_exit(container_id).await.ok().flatten(),
            Err(_) => None,
        };
        let reason = if exit.is_some_and(|e| e.oom_killed) { "oom-killed" } else { "self-terminated" };
        let exit_code = exit.map_or(Value::Nil, |e| e.exit_code.into());
        tracing::info!(kernel_id = %record.kernel_id, reason, "kernel container exited");
        self.emit(
            "kernel_terminating",
            vec![record.kernel_id.as_str().into(), record.session_id.as_str().into(), reason.into()],
        );
        self.release(&record.kernel_id).await;
        self.usage.kernel_terminated(&record.kernel_id, reason);
        self.emit(
            "kernel_terminated",
            vec![record.kernel_id.as_str().into(), record.session_id.as_str().into(), reason.into(), exit_code],
        );
    }

    /// Reconciles the saved registry with the containers that carry this agent's labels:
    /// live kernels get their allocations and ports back; dead ones are cleaned and reported.
    pub async fn recover(&self) -> Result<(), KernelError> {
        let saved = match self.store.load() {
            Ok(saved) => saved,
            Err(err) => {
                let aside = self.store.quarantine();
                tracing::error!(error = %err, moved_to = ?aside, "the kernel registry is unreadable; recovering from container labels");
                Vec::new()
            }
        };
        let docker = self.docker().await?;
        self.clear_stale_commit_locks();
        let containers = docker.all_kernel_containers().await?;
        let mut by_kernel: HashMap<String, (String, bool)> = HashMap::new();
        for (container_id, container_labels, running) in containers {
            if let Some(kernel_id) = container_labels.get(labels::KERNEL_ID) {
                by_kernel.insert(kernel_id.clone(), (container_id, running));
            }
        }
        let mut recovered = 0;
        let mut live = HashSet::new();
        for mut record in saved {
            let found = by_kernel.remove(&record.kernel_id);
            let alive = matches!(found, Some((_, true))) && record.state == KernelState::Running;
            if let Some((container_id, _)) = &found {
                record.container_id = Some(container_id.clone());
            }
            if alive {
                let restored = self.allocator.restore(&record.kernel_id, self.held_allocation(&record));
                let reserved = self.ports.reserve(&record.host_ports);
                if let Err(err) = &restored {
                    tracing::error!(kernel_id = %record.kernel_id, error = %err, "restoring the allocation failed");
                }
                if let Err(err) = &reserved {
                    tracing::error!(kernel_id = %record.kernel_id, error = %err, "reserving the ports failed");
                }
                let kernel_id = record.kernel_id.clone();
                if let Err(err) = self.apply_policy(&record) {
                    tracing::error!(kernel_id, error = %err, "re-applying the kernel's own network rules failed; the node's still apply");
                } else if let Err(err) = self.pace_started(&kernel_id) {
                    tracing::error!(kernel_id, error = %err, "re-applying the kernel's egress cap failed");
                }
                let session_id = record.session_id.clone();
                let info = self.creation_info(&record);
                self.usage.kernel_started(record.usage_meta());
                live.insert(kernel_id.clone());
                self.kernels.lock().await.insert(kernel_id.clone(), record);
                self.emit(
                    "kernel_started",
                    vec![kernel_id.as_str().into(), session_id.into(), "resuming-agent-operation".into(), info],
                );
                recovered += 1;
            } else {
                let exit_code = match &record.container_id {
                    Some(id) => {
                        docker.container_exit(id).await.ok().flatten().map_or(Value::Nil, |e| e.exit_code.into())
                    }
                    None => Value::Nil,
                };
                let kernel_id = record.kernel_id.clone();
                let session_id = record.session_id.clone();
                // Held nothing in this process yet: release only removes container and scratch.
                self.kernels.lock().await.insert(kernel_id.clone(), record);
                self.release(&kernel_id).await;
                self.usage.kernel_terminated(&kernel_id, "self-terminated");
                self.emit(
                    "kernel_terminated",
                    vec![kernel_id.as_str().into(), session_id.into(), "self-terminated".into(), exit_code],
                );
            }
        }
        for (kernel_id, (container_id, running)) in by_kernel {
            tracing::warn!(
                kernel_id,
                container_id,
                running,
                "a labelled container this agent has no record of; leaving it alone"
            );
        }
        if let Some(policy) = &self.policy {
            policy.sweep(&live);
        }
        self.usage.kernels_recovered(live);
        let kernels = self.kernels.lock().await;
        self.persist(&kernels).await;
        tracing::info!(recovered, "kernel registry recovered");
        Ok(())
    }

    /// Follows container exits until shutdown.
    pub async fn follow_exits(
        self: Arc<Self>,
        mut events: mpsc::Receiver<ContainerEvent>,
        shutdown: CancellationToken,
    ) {
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return,
                event = events.recv() => match event { Some(event) => event, None => return },
            };
            match event {
                ContainerEvent::Stopped { container_id } | ContainerEvent::Removed { container_id } => {
                    self.container_stopped(&container_id).await
                }
                ContainerEvent::Snapshot(running) => {
                    let running: HashSet<String> = running.into_iter().map(|k| k.container_id).collect();
                    let gone: Vec<String> = self
                        .kernels
                        .lock()
                        .await
                        .values()
                        .filter(|r| r.state == KernelState::Running)
                        .filter_map(|r| r.container_id.clone())
                        .filter(|id| !running.contains(id))
                        .collect();
                    for container_id in gone {
                        self.container_stopped(&container_id).await;
                    }
                }
                ContainerEvent::Started(_) => {}
            }
        }
    }
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_ports_come_from_the_label_after_the_builtin_ones() {
        let services = service_ports("jupyter:http:8080, sshd:tcp:2200,vscode:http:8180").expect("valid");
        let ports: Vec<u16> = services.iter().map(|(_, _, p)| *p).collect();
        assert_eq!(ports, [2200, 7681, 8080, 8180]);
        assert_eq!(services[2], ("jupyter".to_string(), "http".to_string(), 8080));
        assert_eq!(service_ports("").expect("empty").len(), 2);
    }

    #[test]
    fn the_runner_is_the_entrypoint_unless_the_image_brings_its_own() {
        let krunner = std::path::Path::new("/opt/bai-agent/bin/bai-krunner");
        let labels = |pairs: &[(&str, &str)]| {
            pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<HashMap<_, _>>()
        };
        let python = launch(
            &labels(&[(RUNTIME_TYPE_LABEL, "python"), (RUNTIME_PATH_LABEL, "/usr/bin/python3")]),
            Some("serve --port 80"),
            krunner,
        );
        assert_eq!(
            python.entrypoint.as_deref().unwrap_or_default(),
            [KRUNNER_MOUNT, "--runtime", "python", "--runtime-path", "/usr/bin/python3", "--", "/bin/sh", "-c"]
                .iter()
                .map(|s| s.to_string())
                .chain(["serve --port 80".to_owned()])
                .collect::<Vec<_>>()
        );
        assert_eq!(python.runner_bind.as_deref(), Some("/opt/bai-agent/bin/bai-krunner:/opt/kernel/bai-krunner:ro"));
        assert_eq!(python.cmd, None);
        let plain = launch(&labels(&[]), None, krunner);
        assert_eq!(plain.entrypoint, Some(vec![KRUNNER_MOUNT.to_owned()]));
        let own = launch(&labels(&[(OWN_RUNNER_LABEL, "image")]), Some("run"), krunner);
        assert_eq!(
            own,
            Launch {
                entrypoint: None,
                cmd: Some(vec!["/bin/sh".into(), "-c".into(), "run".into()]),
                runner_bind: None
            }
        );
    }

    #[test]
    fn malformed_service_ports_are_named() {
        assert!(service_ports("jupyter:http").expect_err("short").contains("jupyter:http"));
        assert!(service_ports("web:http:eighty").expect_err("port").contains("eighty"));
        assert!(service_ports("web:smtp:25").expect_err("protocol").contains("web:smtp:25"));
        assert!(service_ports("repl:tcp:2000").expect_err("reserved").contains("reserved"));
    }
}

/// One image of a `check_and_pull` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImagePull {
    /// The manager's name of the image (the events name it so).
    pub canonical: String,
    /// The name Docker knows it by ([`spec::image_run_name`]).
    pub run_name: String,
    /// Never pulled (Backend.AI's `local` registry).
    pub is_local: bool,
    /// The registry login for the pull.
    pub auth: Option<RegistryAuth>,
}

/// Images being pulled now, with how far each has come (for `image_pull_progress`).
#[derive(Debug, Clone, Default)]
struct PullBoard(Arc<std::sync::Mutex<HashMap<String, PullProgress>>>);

impl PullBoard {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, PullProgress>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn record(&self, image: &str, progress: &PullProgress) {
        self.lock().insert(image.to_owned(), progress.clone());
    }

    fn finish(&self, image: &str) {
        self.lock().remove(image);
    }

    fn get(&self, image: &str) -> Option<PullProgress> {
        self.lock().get(image).cloned()
    }
}

/// The background step of `check_and_pull` for one image.
async fn pull_if_missing(
    docker: &DockerClient,
    events: &EventBus,
    agent_id: &str,
    (pulling, pulls): (&std::sync::Mutex<HashSet<String>>, &PullBoard),
    image: ImagePull,
) {
    let now =
        || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    let finished = |msg: Value| {
        events.emit("image_pull_finished", vec![image.canonical.as_str().into(), agent_id.into(), now().into(), msg]);
    };
    let failed = |msg: String| {
        events
            .emit("image_pull_failed", vec![image.canonical.as_str().into(), agent_id.into(), Value::Nil, msg.into()]);
    };
    match docker.image_present(&image.run_name).await {
        Ok(true) => return finished("Image already exists".into()),
        Ok(false) if image.is_local => {
            return failed(format!("local image `{}` is not in the Docker engine", image.run_name));
        }
        Ok(false) => {}
        Err(err) => return failed(err.to_string()),
    }
    let claimed = pulling.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(image.run_name.clone());
    if !claimed {
        tracing::debug!(image = %image.run_name, "already being pulled");
        return;
    }
    events.emit("image_pull_started", vec![image.canonical.as_str().into(), agent_id.into(), now().into(), Value::Nil]);
    let pulled = docker
        .pull_image(&image.run_name, image.auth.as_ref(), |progress| pulls.record(&image.run_name, progress))
        .await;
    pulls.finish(&image.run_name);
    pulling.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&image.run_name);
    match pulled {
        Ok(()) => {
            tracing::info!(image = %image.run_name, "image pulled");
            finished(Value::Nil);
        }
        Err(err) => {
            tracing::warn!(image = %image.run_name, error = %err, "image pull failed");
            failed(err.to_string());
        }
    }
}
