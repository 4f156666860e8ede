//! The daemon's wiring: one task per job (Docker watcher, monitor, stats writer, HTTP server, RPC server),
//! one cancellation token to stop them, and an orderly shutdown that leaves containers running.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    docker, etcd,
    events::{self, EventService, EventSettings, RedisTarget},
    kernel::KernelManager,
    metrics::{self, MetricsState, rpc::RpcMetrics, server},
    monitor::{self, CgroupLayout, ContainerMonitor, EbpfMonitor, node::NodeReader},
    policy,
    ports::PortPool,
    resources::{CapacityPolicy, HostResources, NodeCapacity, ResourceAllocator, compute},
    rpc::{self, RpcServer},
    scratch::ScratchRoot,
    usage::{self, UsageService, UsageSettings},
};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Cgroup(#[from] monitor::cgroup::CgroupError),
    #[error(transparent)]
    Ebpf(#[from] monitor::EbpfError),
    #[error("cannot listen on {addr} (agent.internal-addr): {source}")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("the internal HTTP server failed: {0}")]
    Serve(std::io::Error),
    #[error("cannot listen on {addr} (agent.rpc-listen-addr): {}", rpc_bind_reason(error))]
    RpcBind { addr: std::net::SocketAddr, error: rpc::RpcError },
    #[error("the RPC server failed: {0}")]
    Rpc(String),
    #[error("cannot start the event outbox (agent.journal-dir, redis): {0}")]
    Events(#[from] events::EventsError),
    #[error("cannot start the usage meter (agent.journal-dir, [usage]): {0}")]
    Usage(#[from] usage::UsageError),
    #[error("cannot set up kernel resources: {0}")]
    Resources(String),
    #[error(transparent)]
    Etcd(#[from] etcd::EtcdError),
    #[error("cannot enforce the network policy ([policy]; `enabled = false` runs kernels without it): {0}")]
    Policy(String),
}

/// How many monitor passes the node is read every: one stats interval's worth.
fn node_every(config: &Config) -> u64 {
    let interval = config.monitor.interval.as_nanos().max(1);
    u64::try_from(config.monitor.stats_interval.as_nanos() / interval).unwrap_or(1).max(1)
}

/// Checks that the eBPF CPU program counts what this kernel charges (see
/// [`monitor::selfcheck`]); where it does not, CPU time is counted from the cgroup files.
fn check_cpu_counting(ebpf: &mut EbpfMonitor, layout: &CgroupLayout) -> Option<monitor::selfcheck::CpuCheck> {
    if !ebpf.sources().ebpf(monitor::Resource::Cpu) {
        return None;
    }
    match monitor::selfcheck::check_cpu(ebpf, layout) {
        Ok(check) if check.exact() => {
            tracing::info!(
                counted_ns = check.counted_ns,
                kernel_ns = check.kernel_ns,
                "the eBPF CPU program counts exactly what the kernel charges (start-up check)"
            );
            Some(check)
        }
        Ok(check) => {
            tracing::error!(
                counted_ns = check.counted_ns,
                kernel_ns = check.kernel_ns,
                error_pct = check.error() * 100.0,
                from = monitor::Resource::Cpu.fallback(),
                "the eBPF CPU program does not count what this kernel charges (start-up check); counting CPU time from cgroup files instead"
            );
            ebpf.use_files_for(monitor::Resource::Cpu);
            Some(check)
        }
        Err(err) => {
            tracing::warn!(error = %err, "the start-up check of the eBPF CPU program could not run; counting with it unchecked");
            None
        }
    }
}

/// The socket's own reason, without repeating the address the message already names.
fn rpc_bind_reason(error: &rpc::RpcError) -> String {
    match error {
        rpc::RpcError::Bind { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

/// Requests to re-read the configuration file (SIGHUP): what changes at run time is the
/// network policy's node rules and metadata mode; everything else needs a restart.
pub struct Reloads {
    /// The file the configuration came from (`None`: embedded defaults, nothing to re-read).
    pub path: Option<std::path::PathBuf>,
    pub signals: mpsc::Receiver<()>,
}

/// Runs the agent until `shutdown` is cancelled, then detaches and returns.
pub async fn run(mut config: Config, reloads: Reloads, shutdown: CancellationToken) -> Result<(), DaemonError> {
    // The shared configuration in etcd comes first: everything below runs with it.
    let etcd = etcd::Etcd::connect(&config).await?;
    if let Some(etcd) = &etcd {
        etcd.apply_shared_config(&mut config).await?;
    }
    let layout = CgroupLayout::detect()?;
    tracing::info!(mode = ?layout.mode, unified_root = %layout.unified_root.display(), "cgroup layout");
    let pins = if config.monitor.bpffs_dir.as_os_str().is_empty() {
        None
    } else {
        match monitor::pins::PinDir::prepare(&config.monitor.bpffs_dir, &config.agent.id) {
            Ok(pins) => Some(pins),
            Err(err) => {
                tracing::warn!(error = %err, "cannot pin the counters (monitor.bpffs-dir); they start afresh whenever the agent restarts");
                None
            }
        }
    };
    let pins_root = pins.as_ref().map(|pins| pins.root().to_path_buf());
    let mut ebpf = EbpfMonitor::load(&config.monitor.cgroup_file_resources, pins)?;
    let cpu_check = check_cpu_counting(&mut ebpf, &layout);
    for (resource, source) in ebpf.sources().iter() {
        tracing::info!(%resource, source = source.as_str(), "counting");
    }
    release_freed_memory();

    let policy = start_policy(&config, &layout, pins_root.as_deref()).await?;

    let listener = server::bind(config.agent.internal_addr)
        .await
        .map_err(|source| DaemonError::Bind { addr: config.agent.internal_addr, source })?;
    tracing::info!(addr = %config.agent.internal_addr, "serving /metrics, /health, /livez, /readyz");
    let rpc_server = RpcServer::bind(config.agent.rpc_listen_addr)
        .await
        .map_err(|error| DaemonError::RpcBind { addr: config.agent.rpc_listen_addr, error })?;
    // Events to the manager (the first heartbeat and agent_started now, heartbeats, and
    // agent_terminated at the end). Code that emits events gets a clone of
    // `event_service.bus()`, an `events::EventBus`. Every heartbeat, the first included,
    // advertises what the allocator can give kernels (reserved resources and overcommit
    // applied): the manager schedules against it from the first one.
    let detected = compute::detect(&compute::DetectOptions {
        fake_cuda_devices: config.debug.fake_cuda_devices,
        mock_config: config.resource.mock_accelerator.as_deref(),
        mock_node_dir: &config.agent.journal_dir.join("mock-devices"),
        settings: &config.accelerators,
    })
    .map_err(|err| {
        let source =
            if config.resource.mock_accelerator.is_some() { "resource.mock-accelerator" } else { "accelerators" };
        DaemonError::Resources(format!("{source}: {err}"))
    })?;
    let allocator = node_allocator(&config, &detected.accelerators)?;
    let first_capacity = allocator.capacity().to_string_map();
    let capacity_source: Arc<std::sync::OnceLock<Arc<KernelManager>>> = Arc::default();
    let slots_source = capacity_source.clone();
    let slots: events::heartbeat::SlotProvider = Arc::new(move || match slots_source.get() {
        Some(kernels) => kernels.allocator.capacity().to_string_map(),
        None => first_capacity.clone(),
    });
    let mut event_settings = EventSettings::from_config(&config);
    event_settings.identity.plugin_info = detected
        .accelerators
        .iter()
        .map(|accelerator| (accelerator.key.clone(), accelerator.extra_info.clone()))
        .collect();
    let mut event_service = EventService::start(event_settings, slots, &shutdown)?;

    let metrics_state = Arc::new(MetricsState::default());
    let mut usage_service = UsageService::start(UsageSettings::from_config(&config), metrics_state.subscribe())?;
    let mut kernel_manager = kernel_manager(&config, allocator, event_service.bus(), metrics_state.clone())?;
    kernel_manager.set_accelerators(detected.accelerators);
    kernel_manager.set_usage(usage_service.handle());
    if let Some((enforcer, _, _)) = &policy {
        kernel_manager.set_policy(enforcer.clone());
    }
    let kernels = Arc::new(kernel_manager);
    let _ = capacity_source.set(kernels.clone());
    let ip = events::heartbeat::AgentIdentity::from_config(&config).ip;
    let registration =
        etcd.map(|etcd| etcd.register(&config.agent.id, &ip, config.watcher.service_addr.port(), shutdown.clone()));

    let (events_tx, events_rx) = mpsc::channel(1024);
    let (exits_tx, exits_rx) = mpsc::channel(1024);
    let (connected_tx, connected_rx) = watch::channel(false);
    let (synced_tx, synced_rx) = watch::channel(false);

    let watcher = tokio::spawn(docker::watch_containers(
        config.docker.host.clone(),
        config.agent.id.clone(),
        vec![events_tx, exits_tx],
        connected_tx,
        shutdown.clone(),
    ));
    let node = NodeReader::new(&[config.container.scratch_root.as_path()]);
    let monitor = tokio::spawn(monitor::run_monitor(
        ContainerMonitor::new(ebpf, layout, config.monitor.gone_series_grace, node, detected.plugins)
            .with_cpu_check(cpu_check)
            .with_node_every(node_every(&config)),
        events_rx,
        config.monitor.interval,
        metrics_state.clone(),
        synced_tx,
        shutdown.clone(),
    ));
    let lifecycle = tokio::spawn(run_kernels(kernels.clone(), exits_rx, shutdown.clone()));
    let stats_writer = config.redis.addr.clone().map(|addr| {
        let target = RedisTarget { addr, password: config.redis.password.clone(), db: config.redis.stats_db };
        tokio::spawn(metrics::stats::run_stats_writer(
            target,
            config.agent.id.clone(),
            metrics_state.clone(),
            config.monitor.stats_interval,
            shutdown.clone(),
        ))
    });
    // Which kernel images this node has, for the manager, at the heartbeat's pace.
    let image_report = config.redis.addr.clone().map(|addr| {
        let target = RedisTarget { addr, password: config.redis.password.clone(), db: config.redis.image_db };
        tokio::spawn(crate::images::run_report(
            config.docker.host.clone(),
            config.agent.id.clone(),
            target,
            config.debug.heartbeat_interval,
            shutdown.clone(),
        ))
    });
    // Which kernels are being committed, for the manager's `get_commit_status`.
    let commit_status = config.redis.addr.clone().map(|addr| {
        let target = RedisTarget { addr, password: config.redis.password.clone(), db: config.redis.stats_db };
        tokio::spawn(crate::kernel::commit::run_commit_status_report(kernels.clone(), target, shutdown.clone()))
    });
    let policy_tasks = policy.map(|(enforcer, listener, redirect)| {
        let metadata_config = policy::metadata::MetadataConfig {
            kernels_cgroup_root: enforcer.kernels_dir().to_path_buf(),
            sandbox_type: config.policy.sandbox_type.clone(),
            proc_root: "/proc".into(),
        };
        let directory: Arc<dyn policy::metadata::KernelDirectory> = Arc::new(KernelDirectory(kernels.clone()));
        let metadata = tokio::spawn(policy::metadata::serve(listener, directory, metadata_config, shutdown.clone()));
        let denials = enforcer
            .take_denials()
            .map(|ring| tokio::spawn(policy::run_denial_log(enforcer.clone(), ring, shutdown.clone())));
        tokio::spawn(reload_policy(enforcer.clone(), config.policy.clone(), redirect, reloads, shutdown.clone()));
        (enforcer, metadata, denials)
    });
    let rpc_metrics = RpcMetrics::default();
    let methods = rpc::Methods::new(config.clone())
        .with_readiness(connected_rx.clone(), synced_rx.clone())
        .with_kernels(kernels.clone());
    let mut registry = metrics::registry(metrics_state.clone(), &config.agent.id);
    rpc_metrics.register(&mut registry);
    registry.register_collector(Box::new(metrics::kernels::KernelCollector(kernels.clone())));
    registry.register_collector(Box::new(metrics::usage::UsageCollector(usage_service.view())));
    registry.register_collector(Box::new(metrics::events::EventCollector(event_service.bus())));
    if let Some((enforcer, _, _)) = &policy_tasks {
        registry.register_collector(Box::new(metrics::policy::PolicyCollector(enforcer.clone())));
    }
    let server_state = Arc::new(server::ServerState {
        registry,
        metrics: metrics_state,
        agent_id: config.agent.id.clone(),
        docker_connected: connected_rx,
        monitor_synced: synced_rx,
        kernels_ready: Some(kernels.clone()),
    });
    let mut http_task = tokio::spawn(server::serve(listener, server_state, shutdown.clone()));
    let mut rpc_task = tokio::spawn(rpc_server.serve(Arc::new(methods), rpc_metrics, shutdown.clone()));

    // The servers end on shutdown, or early on failure: either way everything stops.
    let (http_served, rpc_served) = tokio::select! {
        served = &mut http_task => {
            shutdown.cancel();
            (served, rpc_task.await)
        }
        served = &mut rpc_task => {
            shutdown.cancel();
            (http_task.await, served)
        }
    };
    let _ = watcher.await;
    let _ = monitor.await;
    let _ = lifecycle.await;
    if let Some(stats_writer) = stats_writer {
        let _ = stats_writer.await;
    }
    if let Some(commit_status) = commit_status {
        let _ = commit_status.await;
    }
    if let Some(image_report) = image_report {
        let _ = image_report.await;
    }
    if let Some(registration) = registration {
        let _ = registration.await;
    }
    if let Some((_, metadata, denials)) = policy_tasks {
        match metadata.await {
            Ok(Err(err)) => tracing::warn!(error = %err, "the metadata service failed"),
            Err(join) => tracing::warn!(error = %join, "the metadata service failed"),
            Ok(Ok(())) => {}
        }
        if let Some(denials) = denials {
            let _ = denials.await;
        }
    }
    // After the monitor's last snapshot: kernels that just ended get their final record.
    usage_service.shutdown().await;
    event_service.shutdown().await;
    match http_served {
        Ok(Ok(())) => {}
        Ok(Err(err)) => return Err(DaemonError::Serve(err)),
        Err(join) => return Err(DaemonError::Serve(std::io::Error::other(join.to_string()))),
    }
    match rpc_served {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(DaemonError::Rpc(err.to_string())),
        Err(join) => Err(DaemonError::Rpc(join.to_string())),
    }
}

/// The enforcement programs attached and the metadata service's listener bound, before any
/// kernel can start; with `[policy] enabled = false`, earlier agents' pinned policy programs
/// are removed and kernels run without one.
async fn start_policy(
    config: &Config,
    layout: &CgroupLayout,
    pins_root: Option<&std::path::Path>,
) -> Result<Option<(Arc<policy::Enforcer>, tokio::net::TcpListener, std::net::SocketAddrV4)>, DaemonError> {
    let section = &config.policy;
    if !section.enabled {
        if let Some(root) = pins_root {
            policy::programs::remove_pins(root);
        }
        tracing::warn!("[policy] enabled = false: kernels run without network policy or metadata protection");
        return Ok(None);
    }
    let host = policy::metadata_host(section.metadata_service_host).map_err(DaemonError::Policy)?;
    let addr = std::net::SocketAddr::new(host.into(), section.metadata_service_port);
    let listener = policy::metadata::bind(addr).await.map_err(|err| DaemonError::Policy(err.to_string()))?;
    let redirect = match listener.local_addr() {
        Ok(std::net::SocketAddr::V4(bound)) => bound,
        Ok(other) => return Err(DaemonError::Policy(format!("the metadata service bound {other}, not IPv4"))),
        Err(err) => return Err(DaemonError::Policy(format!("the metadata service's address: {err}"))),
    };
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|err| DaemonError::Policy(format!("/proc/self/mountinfo: {err}")))?;
    let hierarchies = monitor::cgroup::hierarchy_mounts(&mountinfo);
    let enforcer =
        policy::Enforcer::start(section, &config.agent.id, &layout.unified_root, hierarchies, pins_root, redirect)
            .map_err(|err| DaemonError::Policy(err.to_string()))?;
    tracing::info!(addr = %redirect, "serving the metadata service to kernels");
    Ok(Some((Arc::new(enforcer), listener, redirect)))
}

/// The file's `[policy]`, where lists the file leaves unset keep what they had (etcd's, read at
/// start).
fn keep_unset_lists(config: Config, running: &crate::config::PolicySection) -> crate::config::PolicySection {
    let mut fresh = config.policy;
    if !config.explicit_keys.contains("policy.deny") {
        fresh.deny = running.deny.clone();
    }
    if !config.explicit_keys.contains("policy.allow") {
        fresh.allow = running.allow.clone();
    }
    fresh
}

/// Applies the file's `[policy]` rules and metadata mode on each reload request; a file that
/// does not parse, or a change that needs a restart, is logged and the running policy stays.
async fn reload_policy(
    enforcer: Arc<policy::Enforcer>,
    mut running: crate::config::PolicySection,
    redirect: std::net::SocketAddrV4,
    mut reloads: Reloads,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            signal = reloads.signals.recv() => if signal.is_none() { return },
        }
        let Some(path) = &reloads.path else {
            tracing::warn!("running on embedded defaults: there is no file to re-read");
            continue;
        };
        let fresh = match Config::from_file(path) {
            Ok(config) => keep_unset_lists(config, &running),
            Err(err) => {
                tracing::error!(error = %err, "not reloading: the configuration is invalid; the running policy stays");
                continue;
            }
        };
        for (key, changed) in [
            ("policy.enabled", fresh.enabled != running.enabled),
            ("policy.cgroup-parent", fresh.cgroup_parent != running.cgroup_parent),
            ("policy.metadata-service-host", fresh.metadata_service_host != running.metadata_service_host),
            ("policy.metadata-service-port", fresh.metadata_service_port != running.metadata_service_port),
            ("policy.devices", fresh.devices != running.devices),
            ("policy.kernel-devices", fresh.kernel_devices != running.kernel_devices),
        ] {
            if changed {
                tracing::warn!(key, "changed in the file; it takes effect when the agent restarts");
            }
        }
        match enforcer.set_node_policy(&fresh, redirect) {
            Ok(()) => {
                tracing::info!(
                    deny = fresh.deny.len(),
                    allow = fresh.allow.len(),
                    metadata = ?fresh.metadata,
                    egress_bps = fresh.egress_bps,
                    "network policy reloaded"
                );
                running = fresh;
            }
            Err(err) => tracing::error!(error = %err, "reloading the network policy failed; the running policy stays"),
        }
    }
}

/// The kernel registry as the metadata service sees it.
struct KernelDirectory(Arc<KernelManager>);

impl policy::metadata::KernelDirectory for KernelDirectory {
    fn kernel_ids(&self) -> Vec<String> {
        self.0.running_kernel_ids()
    }

    fn environ(&self, kernel_id: &str) -> Option<std::collections::BTreeMap<String, String>> {
        self.0.kernel_environ(kernel_id)
    }
}

/// Hands the heap that start-up freed back to the system: parsing the kernel's BTF to load
/// the eBPF programs takes tens of MiB for a moment, which the allocator would keep.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The kernel manager over this node's resources, port pool and scratch root.
/// The allocator of the node's capacity for kernels (`[resource]`: reserved, overcommit).
/// Accelerators' devices are handed out by their alloc maps, near the kernel's cores.
fn node_allocator(config: &Config, accelerators: &[compute::Accelerator]) -> Result<ResourceAllocator, DaemonError> {
    let host = HostResources::detect().map_err(|err| DaemonError::Resources(err.to_string()))?;
    let capacity = NodeCapacity::compute(&host, &CapacityPolicy::from(&config.resource))
        .map_err(|err| DaemonError::Resources(format!("[resource]: {err}")))?;
    let strategy = config.resource.allocation_strategy;
    let maps = accelerators.iter().map(|accelerator| accelerator.alloc_map(strategy)).collect();
    let numa = crate::resources::capacity::numa_nodes_of_cores(std::path::Path::new("/sys/devices/system/node"));
    Ok(ResourceAllocator::new(capacity, strategy).with_devices(maps).with_numa(numa))
}

fn kernel_manager(
    config: &Config,
    allocator: ResourceAllocator,
    events: events::EventBus,
    metrics: Arc<MetricsState>,
) -> Result<KernelManager, DaemonError> {
    let [low, high] = config.container.port_range;
    let ports = PortPool::new(low..=high, config.container.port_cooldown)
        .map_err(|err| DaemonError::Resources(format!("container.port-range: {err}")))?;
    let scratch = ScratchRoot::new(config.container.scratch_root.clone())
        .map_err(|err| DaemonError::Resources(format!("container.scratch-root: {err}")))?;
    Ok(KernelManager::new(config, allocator, ports, scratch, events, metrics))
}

/// Recovers the kernels this agent ran before (retrying until the engine answers), then
/// follows container exits until shutdown.
async fn run_kernels(
    kernels: Arc<KernelManager>,
    exits: mpsc::Receiver<docker::ContainerEvent>,
    shutdown: CancellationToken,
) {
    loop {
        match kernels.recover().await {
            Ok(()) => break,
            Err(err) => tracing::warn!(error = %err, "kernel recovery failed; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
        }
    }
    kernels.mark_ready();
    kernels.follow_exits(exits, shutdown).await;
}
