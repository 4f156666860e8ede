//! Kernel containers on the engine: create and start one from a [`ContainerSpec`], stop,
//! kill and remove it, read its logs and exit state, and the bridge networks of
//! multi-container sessions.

use std::collections::HashMap;

use bollard::{
    models::{
        ContainerCreateBody, ContainerSummaryStateEnum, DeviceMapping, EndpointSettings, HostConfig,
        NetworkCreateRequest, NetworkingConfig, PortBinding,
    },
    query_parameters::{CreateContainerOptions, LogsOptions, RemoveContainerOptions, StopContainerOptions},
};
use futures_util::StreamExt;

use super::{DockerClient, DockerError};

/// Everything the engine needs to run one kernel.
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub labels: HashMap<String, String>,
    /// `KEY=VALUE` entries.
    pub env: Vec<String>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    /// Docker's `CpusetCpus` (`"0-1,3"`); empty means unpinned.
    pub cpuset: String,
    /// Memory limit; memory+swap gets the same value so a kernel cannot swap past it.
    pub memory_bytes: i64,
    pub shm_bytes: Option<i64>,
    pub pids_limit: i64,
    /// `host:container[:ro]` bind mounts.
    pub binds: Vec<String>,
    /// (container port, host port), published on `bind_host`.
    pub ports: Vec<(u16, u16)>,
    pub bind_host: String,
    pub working_dir: Option<String>,
    /// A user-defined network to join instead of the default bridge (a multi-container
    /// session's), where `hostname` is the container's alias.
    pub network: Option<String>,
    pub hostname: Option<String>,
    /// The cgroup the container's own goes under (the kernel's policy directory); `None`:
    /// the engine's default.
    pub cgroup_parent: Option<String>,
    /// Capabilities taken from the engine's default set (`NET_RAW`).
    pub cap_drop: Vec<String>,
    /// Host device nodes the container gets.
    pub devices: Vec<crate::config::DeviceMapping>,
    /// Devices a runtime hook provides (`DeviceRequests`: the NVIDIA runtime's GPUs).
    pub device_requests: Vec<RuntimeDeviceRequest>,
}

/// One `DeviceRequests` entry: devices the driver's runtime hook gives the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeDeviceRequest {
    pub driver: String,
    pub device_ids: Vec<String>,
    pub capabilities: Vec<String>,
}

/// The label Backend.AI puts on a session's cluster network.
const CLUSTER_NETWORK_LABEL: &str = "ai.backend.cluster-network";

/// How a container ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerExit {
    pub exit_code: i64,
    pub oom_killed: bool,
    pub running: bool,
}

impl DockerClient {
    /// Creates and starts the container; returns its id.
    pub async fn create_and_start(&self, spec: &ContainerSpec) -> Result<String, DockerError> {
        let exposed: Vec<String> = spec.ports.iter().map(|(port, _)| format!("{port}/tcp")).collect();
        let bindings: HashMap<String, Option<Vec<PortBinding>>> = spec
            .ports
            .iter()
            .map(|(port, host_port)| {
                let binding =
                    PortBinding { host_ip: Some(spec.bind_host.clone()), host_port: Some(host_port.to_string()) };
                (format!("{port}/tcp"), Some(vec![binding]))
            })
            .collect();
        let host_config = HostConfig {
            cpuset_cpus: (!spec.cpuset.is_empty()).then(|| spec.cpuset.clone()),
            memory: Some(spec.memory_bytes),
            memory_swap: Some(spec.memory_bytes),
            shm_size: spec.shm_bytes,
            pids_limit: Some(spec.pids_limit),
            security_opt: Some(vec!["no-new-privileges".to_owned()]),
            binds: Some(spec.binds.clone()),
            port_bindings: Some(bindings),
            init: Some(true),
            network_mode: spec.network.clone(),
            cgroup_parent: spec.cgroup_parent.clone(),
            cap_drop: (!spec.cap_drop.is_empty()).then(|| spec.cap_drop.clone()),
            devices: Some(
                spec.devices
                    .iter()
                    .map(|device| DeviceMapping {
                        path_on_host: Some(device.host_path.clone()),
                        path_in_container: Some(device.container_path.clone()),
                        cgroup_permissions: Some(device.permissions.clone()),
                    })
                    .collect(),
            ),
            device_requests: (!spec.device_requests.is_empty()).then(|| {
                spec.device_requests
                    .iter()
                    .map(|request| bollard::models::DeviceRequest {
                        driver: Some(request.driver.clone()),
                        device_ids: Some(request.device_ids.clone()),
                        capabilities: Some(vec![request.capabilities.clone()]),
                        ..Default::default()
                    })
                    .collect()
            }),
            ..Default::default()
        };
        let networking_config = spec.network.as_ref().map(|network| NetworkingConfig {
            endpoints_config: Some(HashMap::from([(
                network.clone(),
                EndpointSettings { aliases: spec.hostname.clone().map(|h| vec![h]), ..Default::default() },
            )])),
        });
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            labels: Some(spec.labels.clone()),
            env: Some(spec.env.clone()),
            entrypoint: spec.entrypoint.clone(),
            cmd: spec.cmd.clone(),
            working_dir: spec.working_dir.clone(),
            exposed_ports: Some(exposed),
            // A kernel's main process may be an interactive shell: keep its stdin open.
            tty: Some(true),
            open_stdin: Some(true),
            host_config: Some(host_config),
            hostname: spec.hostname.clone(),
            networking_config,
            ..Default::default()
        };
        let options = CreateContainerOptions { name: Some(spec.name.clone()), ..Default::default() };
        let created = self
            .engine()
            .create_container(Some(options), body)
            .await
            .map_err(|source| DockerError::Request { what: format!("create container {}", spec.name), source })?;
        if let Err(source) = self.engine().start_container(&created.id, None).await {
            let _ = self.remove_container(&created.id).await;
            return Err(DockerError::Request { what: format!("start container {}", spec.name), source });
        }
        Ok(created.id)
    }

    /// A bridge network named `name` with Backend.AI's cluster-network label, unless one exists.
    pub async fn create_network(&self, name: &str) -> Result<(), DockerError> {
        match self.engine().inspect_network(name, None).await {
            Ok(_) => return Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => {}
            Err(source) => return Err(DockerError::Request { what: format!("inspect network {name}"), source }),
        }
        let request = NetworkCreateRequest {
            name: name.to_owned(),
            driver: Some("bridge".to_owned()),
            labels: Some(HashMap::from([(CLUSTER_NETWORK_LABEL.to_owned(), "1".to_owned())])),
            ..Default::default()
        };
        match self.engine().create_network(request).await {
            Ok(_) => Ok(()),
            // Created meanwhile by a concurrent call.
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 409, .. }) => Ok(()),
            Err(source) => Err(DockerError::Request { what: format!("create network {name}"), source }),
        }
    }

    /// Removes the network `name`; one that is gone is fine.
    pub async fn remove_network(&self, name: &str) -> Result<(), DockerError> {
        match self.engine().remove_network(name).await {
            Ok(()) | Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(()),
            Err(source) => Err(DockerError::Request { what: format!("remove network {name}"), source }),
        }
    }

    /// Stops gracefully (SIGTERM, then SIGKILL after `grace_secs`); a gone container is fine.
    pub async fn stop_container(&self, id: &str, grace_secs: i32) -> Result<(), DockerError> {
        let options = StopContainerOptions { t: Some(grace_secs), signal: None };
        match self.engine().stop_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 304 | 404, .. }) => Ok(()),
            Err(source) => Err(DockerError::Request { what: format!("stop container {id}"), source }),
        }
    }

    /// Removes the container and its anonymous volumes; a gone container is fine.
    pub async fn remove_container(&self, id: &str) -> Result<(), DockerError> {
        let options = RemoveContainerOptions { force: true, v: true, link: false };
        match self.engine().remove_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(()),
            // "removal already in progress"
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 409, .. }) => Ok(()),
            Err(source) => Err(DockerError::Request { what: format!("remove container {id}"), source }),
        }
    }

    /// Exit code and OOM flag, or `None` if the container is gone.
    pub async fn container_exit(&self, id: &str) -> Result<Option<ContainerExit>, DockerError> {
        match self.engine().inspect_container(id, None).await {
            Ok(inspected) => {
                let state = inspected.state.unwrap_or_default();
                Ok(Some(ContainerExit {
                    exit_code: state.exit_code.unwrap_or(0),
                    oom_killed: state.oom_killed.unwrap_or(false),
                    running: state.running.unwrap_or(false),
                }))
            }
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(None),
            Err(source) => Err(DockerError::Request { what: format!("inspect {id}"), source }),
        }
    }

    /// The container's output so far (stdout and stderr), lossily decoded, at most `limit` bytes
    /// from the end.
    pub async fn container_logs(&self, id: &str, limit: usize) -> Result<String, DockerError> {
        let options = LogsOptions { stdout: true, stderr: true, tail: "all".into(), ..Default::default() };
        let mut stream = self.engine().logs(id, Some(options));
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|source| DockerError::Request { what: format!("logs of {id}"), source })?;
            bytes.extend_from_slice(&chunk.into_bytes());
            if bytes.len() > limit * 2 {
                bytes.drain(..bytes.len() - limit);
            }
        }
        if bytes.len() > limit {
            bytes.drain(..bytes.len() - limit);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Every container (running or not) that carries this agent's kernel labels: id → kernel id.
    pub async fn all_kernel_containers(&self) -> Result<Vec<(String, HashMap<String, String>, bool)>, DockerError> {
        let filters = HashMap::from([("label".to_owned(), self.label_filters())]);
        let options = bollard::query_parameters::ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        };
        let summaries = self
            .engine()
            .list_containers(Some(options))
            .await
            .map_err(|source| DockerError::Request { what: "list containers".into(), source })?;
        Ok(summaries
            .into_iter()
            .filter_map(|s| {
                let running = s.state == Some(ContainerSummaryStateEnum::RUNNING);
                Some((s.id?, s.labels.unwrap_or_default(), running))
            })
            .collect())
    }
}
