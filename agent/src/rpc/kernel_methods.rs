//! The kernel methods of the RPC table: argument binding for `create_kernels`,
//! `destroy_kernel`, `restart_kernel`, `check_running`, `ping_kernel`,
//! `sync_kernel_registry`, `get_logs`, `list_kernels`, `assign_port`, `release_port`, the image
//! methods of 26.9 managers (`check_and_pull`, `check_pulling`, `check_creating`) and
//! the file methods (`upload_file`, `download_file`, `download_single`, `list_files`);
//! the work itself is [`KernelManager`]'s and [`crate::kernel_files`]'.

use std::{collections::HashMap, sync::Arc};

use rmpv::Value;

use super::{
    codec::type_name,
    methods::{Args, MethodError, Methods},
};
use crate::kernel::{ImagePull, KernelError, KernelManager, KernelRecord, spec};

/// A kernel or session id: a string, or a UUID in Backend.AI's extension type (requests
/// arrive with it decoded already; in-process callers may still pass one).
pub fn id_value(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => s.as_str().map(str::to_owned),
        Value::Ext(crate::backendai::pickle::EXT_UUID, bytes) => {
            uuid::Uuid::from_slice(bytes).ok().map(|id| id.to_string())
        }
        _ => None,
    }
}

pub(super) fn id_arg(args: &Args, index: usize, name: &str, method: &str) -> Result<String, MethodError> {
    let value = args.required(index, name)?;
    id_value(value).ok_or_else(|| {
        MethodError::Arguments(format!(
            "{method}: argument `{name}` must be an id string or UUID, got {}",
            type_name(value)
        ))
    })
}

pub(super) fn kernel_failure(method: &str, err: KernelError) -> MethodError {
    match err {
        KernelError::Arguments(message) => MethodError::Arguments(format!("{method}: {message}")),
        other => MethodError::Failed { method: method.to_owned(), message: other.to_string() },
    }
}

impl Methods {
    pub(super) fn kernels(&self, method: &str) -> Result<&Arc<KernelManager>, MethodError> {
        let kernels = self.kernels.as_ref().ok_or_else(|| MethodError::Failed {
            method: method.to_owned(),
            message: "this agent does not manage kernels".into(),
        })?;
        if !kernels.is_ready() {
            return Err(MethodError::Failed {
                method: method.to_owned(),
                message: "the agent is still recovering its kernels (is the Docker engine up?); retry shortly".into(),
            });
        }
        Ok(kernels)
    }

    pub(super) async fn create_kernels(&self, args: Args) -> Result<Value, MethodError> {
        const M: &str = "create_kernels";
        args.expect(&["session_id", "kernel_ids", "configs", "cluster_info", "kernel_image_refs"])?;
        let session_id = id_arg(&args, 0, "session_id", M)?;
        let kernel_ids = args
            .array(1, "kernel_ids")?
            .iter()
            .map(|v| {
                id_value(v).ok_or_else(|| {
                    MethodError::Arguments(format!("{M}: kernel_ids must hold ids, got {}", type_name(v)))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let configs = args.array(2, "configs")?.to_vec();
        let mut image_refs = HashMap::new();
        if let Some(Value::Map(refs)) = args.get(4, "kernel_image_refs") {
            for (kernel_id, image) in refs {
                // An `ImageRef` (decoded from its pickle): a local image runs by its short name.
                let image = match image {
                    Value::String(s) => s.as_str().map(str::to_owned),
                    Value::Map(m) => {
                        let is_local = super::codec::map_get(m, "is_local").and_then(Value::as_bool) == Some(true);
                        let name = if is_local { "short" } else { "canonical" };
                        super::codec::map_get(m, name)
                            .or_else(|| super::codec::map_get(m, "canonical"))
                            .and_then(Value::as_str)
                            .map(str::to_owned)
                    }
                    _ => None,
                };
                if let (Some(kernel_id), Some(image)) = (id_value(kernel_id), image) {
                    image_refs.insert(kernel_id, image);
                }
            }
        }
        // A multi-container session's kernels join the network `create_local_network` made.
        let network = args
            .get(3, "cluster_info")
            .and_then(Value::as_map)
            .and_then(|info| super::codec::map_get(info, "network_name"))
            .and_then(Value::as_str)
            .filter(|name| !name.is_empty())
            .map(str::to_owned);
        let kernels = self.kernels(M)?;
        let created = kernels
            .create_kernels(&session_id, kernel_ids, configs, image_refs, network)
            .await
            .map_err(|err| kernel_failure(M, err))?;
        Ok(Value::Array(created))
    }

    pub(super) async fn destroy_kernel(&self, args: Args) -> Result<Value, MethodError> {
        const M: &str = "destroy_kernel";
        args.expect(&["kernel_id", "session_id", "reason", "suppress_events"])?;
        let kernel_id = id_arg(&args, 0, "kernel_id", M)?;
        let reason = args.optional_string(2, "reason")?;
        let suppress = args.boolean_or(3, "suppress_events", false)?;
        // Once begun, a destroy runs to the end even if the caller gives up waiting.
        let kernels = self.kernels(M)?.clone();
        let destroy =
            tokio::spawn(async move { kernels.destroy_kernel(&kernel_id, reason.as_deref(), suppress).await });
        destroy
            .await
            .map_err(|join| MethodError::Failed { method: M.into(), message: join.to_string() })?
            .map_err(|err| kernel_failure(M, err))
    }

    pub(super) async fn restart_kernel(&self, args: Args) -> Result<Value, MethodError> {
        const M: &str = "restart_kernel";
        args.expect(&["session_id", "kernel_id", "kernel_image", "updated_config"])?;
        let kernel_id = id_arg(&args, 1, "kernel_id", M)?;
        let image = match args.get(2, "kernel_image") {
            None | Some(Value::Nil) => None,
            Some(Value::String(s)) => s.as_str().map(str::to_owned),
            Some(Value::Map(m)) => super::codec::map_get(m, "canonical").and_then(Value::as_str).map(str::to_owned),
            Some(other) => {
                return Err(MethodError::Arguments(format!(
                    "{M}: argument `kernel_image` must be an image name or map, got {}",
                    type_name(other)
                )));
            }
        };
        let kernels = self.kernels(M)?.clone();
        let restart = tokio::spawn(async move { kernels.restart_kernel(&kernel_id, image.as_deref()).await });
        restart
            .await
            .map_err(|join| MethodError::Failed { method: M.into(), message: join.to_string() })?
            .map_err(|err| kernel_failure(M, err))
    }

    pub(super) async fn check_running(&self, args: Args) -> Result<Value, MethodError> {
        const M: &str = "check_running";
        args.expect(&["kernel_id"])?;
        let kernel_id = id_arg(&args, 0, "kernel_id", M)?;
        // An unknown kernel is not running: the manager's terminator skips a kernel forever
        // when this raises.
        match self.kernels(M)?.check_running(&kernel_id).await {
            Ok(running) => Ok(running.into()),
            Err(KernelError::UnknownKernel(_)) => Ok(false.into()),
            Err(err) => Err(kernel_failure(M, err)),
        }
    }

    /// `check_and_pull(image_configs)` → `{canonical: task id}`; the outcome of each image comes
    /// as `image_pull_finished` / `image_pull_failed` events (the manager waits for them).
    pub(super) async fn check_and_pull(&self, args: Args) -> Result<Value, MethodError> {
        const M: &str = "check_and_pull";
        args.expect(&["image_configs"])?;
        let mut images = Vec::new();
        for (key, config) in args.map(0, "image_configs")? {
            let canonical = key.as_str().ok_or_else(|| {
                MethodError::Arguments(format!("{M}: image names must be strings, got {}", type_name(key)))
            })?;
            let config = config.as_map().ok_or_else(|| {
                MethodError::Arguments(format!(
                    "{M}: the config of `{canonical}` must be a map, got {}",
                    type_name(config)
                ))
            })?;
            let run_name = spec::image_run_name(config).unwrap_or_else(|| canonical.to_owned());
            images.push(ImagePull {
                canonical: canonical.to_owned(),
                run_name,
                is_local: spec::image_is_local(config),
                auth: spec::image_registry_auth(config),
            });
        }
        let tasks = self.kernels(M)?.check_and_pull(images).await.map_err(|err| kernel_failure(M, err))?;
        Ok(Value::Map(tasks.into_iter().map(|(image, task)| (image.into(), task.into())).collect()))
    }

    /// `create_local_network(network_name)`: a session's bridge network (idempotent).
    pub(super) async fn create_local_network(&self, args: Args) -> Result<Value, MethodError> {
        const M: &str = "create_local_network";
        args.expect(&["network_name"])?;
        let name = args.string(0, "network_name")?;
        self.kernels(M)?.create_local_network(&name).await.map_err(|err| kernel_failure(M, err))?;
        Ok(Value::Nil)
    }

    /// `destroy_local_network(network_name)`: removes it (gone already is fine).
    pub(super) async fn destroy_local_network(&self, args: Args) -> Result<Value, MethodError> {
        const M: &str = "destroy_local_network";
        args.expect(&["network_name"])?;
        let name = args.string(0, "network_name")?;
        self.kernels(M)?.destroy_local_network(&name).await.map_err(|err| kernel_failure(M, err))?;
        Ok(Value::Nil)
    }

    /// `purge_images(image_canonicals, force, noprune)` → `{"responses": [{"image", "error"}]}`,
    /// `error` being nil for an image that was removed.
    pub(super) async fn purge_images(&self, args: Args) -> Result<Value, MethodError> {
        const M: &str = "purge_images";
        args.expect(&["image_canonicals", "force", "noprune"])?;
        let images = args
            .array(0, "image_canonicals")?
            .iter()
            .map(|image| {
                image.as_str().map(str::to_owned).ok_or_else(|| {
                    MethodError::Arguments(format!("{M}: image names must be strings, got {}", type_name(image)))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let flag = |index: usize, name: &str| -> Result<bool, MethodError> {
            match args.get(index, name) {
                None | Some(Value::Nil) => Ok(false),
                Some(Value::Boolean(b)) => Ok(*b),
                Some(other) => Err(MethodError::Arguments(format!(
                    "{M}: argument `{name}` must be a boolean, got {}",
                    type_name(other)
                ))),
            }
        };
        let (force, noprune) = (flag(1, "force")?, flag(2, "noprune")?);
        let results =
            self.kernels(M)?.purge_images(&images, force, noprune).await.map_err(|err| kernel_failure(M, err))?;
        let responses = results
            .into_iter()
            .map(|(image, error)| {
                Value::Map(vec![
                    ("image".into(), image.into()),
                    ("error".into(), error.map_or(Value::Nil, Value::from)),
                ])
            })
            .collect();
        Ok(Value::Map(vec![("responses".into(), Value::Array(responses))]))
    }

    /// `commit(kernel_id, subdir, *, canonical, filename, extra_labels)` → `{"bgtask_id",
    /// "kernel", "path"}`: the commit runs in the background; its outcome comes as
    /// `bgtask_done` / `bgtask_failed`, which the manager waits on.
    pub(super) async fn commit(&self, args: Args) -> Result<Value, MethodError> {
        const M: &str = "commit";
        args.expect(&["kernel_id", "subdir", "canonical", "filename", "extra_labels"])?;
        let kernel_id = id_arg(&args, 0, "kernel_id", M)?;
        let subdir = args.string(1, "subdir")?;
        let filename = args.optional_string(3, "filename")?;
        let extra_labels = match args.get(4, "extra_labels") {
            None | Some(Value::Nil) => Vec::new(),
            Some(Value::Map(labels)) => labels
                .iter()
                .map(|(key, value)| match (key.as_str(), value.as_str()) {
                    (Some(key), Some(value)) => Ok((key.to_owned(), value.to_owned())),
                    _ => Err(MethodError::Arguments(format!(
                        "{M}: extra_labels must map strings to strings, got {} → {}",
                        type_name(key),
                        type_name(value)
                    ))),
                })
                .collect::<Result<_, _>>()?,
            Some(other) => {
                return Err(MethodError::Arguments(format!(
                    "{M}: extra_labels must be a map, got {}",
                    type_name(other)
                )));
            }
        };
        let path = filename.as_ref().map(|name| format!("{subdir}/{name}"));
        let request = crate::kernel::commit::CommitRequest {
            kernel_id: kernel_id.clone(),
            subdir,
            canonical: args.optional_string(2, "canonical")?,
            filename,
            extra_labels,
        };
        let task = self.kernels(M)?.commit(request).await.map_err(|err| kernel_failure(M, err))?;
        Ok(Value::Map(vec![
            ("bgtask_id".into(), task.into()),
            ("kernel".into(), kernel_id.into()),
            ("path".into(), path.map_or(Value::Nil, Value::from)),
        ]))
    }

    /// `get_commit_status(kernel_id, subdir)` → `{"kernel", "status"}`, the status being
    /// `"ongoing"` or `"ready"`.
    pub(super) async fn get_commit_status(&self, args: Args) -> Result<Value, MethodError> {
        const M: &str = "get_commit_status";
        args.expect(&["kernel_id", "subdir"])?;
        let kernel_id = id_arg(&args, 0, "kernel_id", M)?;
        let subdir = args.string(1, "subdir")?;
        let status = self.kernels(M)?.commit_status(&kernel_id, &subdir).await.map_err(|err| kernel_failure(M, err))?;
        Ok(Value::Map(vec![("kernel".into(), kernel_id.into()), ("status".into(), status.into())]))
    }

    /// `push_image(image_ref, registry_conf)` → `{"bgtask_id", "canonical"}`: the image (an
    /// `ImageRef`, or its canonical name) is pushed in the background, logged in with the
    /// registry configuration's `username` / `password`; a local image is not pushed.
    pub(super) async fn push_image(&self, args: Args) -> Result<Value, MethodError> {
        const M: &str = "push_image";
        args.expect(&["image_ref", "registry_conf"])?;
        let (canonical, is_local) = match args.required(0, "image_ref")? {
            Value::String(s) => (s.as_str().map(str::to_owned), false),
            Value::Map(image) => (
                super::codec::map_get(image, "canonical").and_then(Value::as_str).map(str::to_owned),
                super::codec::map_get(image, "is_local").and_then(Value::as_bool).unwrap_or(false),
            ),
            other => {
                return Err(MethodError::Arguments(format!(
                    "{M}: image_ref must be an ImageRef or an image name, got {}",
                    type_name(other)
                )));
            }
        };
        let canonical = canonical
            .filter(|name| !name.is_empty())
            .ok_or_else(|| MethodError::Arguments(format!("{M}: image_ref has no canonical name")))?;
        let auth = match args.get(1, "registry_conf") {
            None | Some(Value::Nil) => None,
            Some(Value::Map(registry)) => spec::registry_auth(registry),
            Some(other) => {
                return Err(MethodError::Arguments(format!(
                    "{M}: registry_conf must be a map, got {}",
                    type_name(other)
                )));
            }
        };
        let task = self
            .kernels(M)?
            .push_image(canonical.clone(), is_local, auth)
            .await
            .map_err(|err| kernel_failure(M, err))?;
        Ok(Value::Map(vec![("bgtask_id".into(), task.into()), ("canonical".into(), canonical.into())]))
    }

    /// `scan_gpu_alloc_map(agent_id=None)` → `{device id: share of it allocated}`: per CUDA
    /// device some kernel holds, what kernels hold of it over what it has (`"0.5"` for half
    /// a device, `"1"` for a whole one), four decimals, as strings. From the allocator, which
    /// a restarted agent refills from the kernels' `resource.txt`.
    pub(super) fn scan_gpu_alloc_map(&self, args: Args) -> Result<Value, MethodError> {
        const M: &str = "scan_gpu_alloc_map";
        args.expect(&["agent_id"])?;
        self.positional_agent_id(&args, M)?;
        let kernels = self.kernels(M)?;
        let mut ratios: std::collections::BTreeMap<String, rust_decimal::Decimal> = Default::default();
        for (slot, device, held, capacity) in kernels.allocator.device_usage() {
            if !slot.starts_with("cuda.") || held.is_zero() {
                continue;
            }
            let (held, capacity) = (held.as_decimal(), capacity.as_decimal());
            // A device only restored kernels name counts as wholly allocated.
            let ratio = if capacity.is_zero() { rust_decimal::Decimal::ONE } else { held / capacity };
            *ratios.entry(device).or_default() += ratio;
        }
        Ok(Value::Map(
            ratios
                .into_iter()
                .map(|(device, ratio)| (device.into(), ratio.round_dp(4).normalize().to_string().into()))
                .collect(),
        ))
    }

    /// `check_pulling(image_name)` → whether `check_and_pull` is pulling it now.
    pub(super) async fn check_pulling(&self, args: Args) -> Result<Value, MethodError> {
        const M: &str = "check_pulling";
        args.expect(&["image_name"])?;
        let image = args.string(0, "image_name")?;
        Ok(self.kernels(M)?.is_pulling(&image).into())
    }

    /// `image_pull_progress(image_name)` (this agent's own): how far the pull of an image (by
    /// the name the engine knows it by) has come, or nil when it is not being pulled.
    pub(super) async fn image_pull_progress(&self, args: Args) -> Result<Value, MethodError> {
        const M: &str = "image_pull_progress";
        args.expect(&["image_name"])?;
        let image = args.string(0, "image_name")?;
        let Some(progress) = self.kernels(M)?.pull_progress(&image) else { return Ok(Value::Nil) };
        Ok(Value::Map(vec![
            ("image".into(), image.as_str().into()),
            ("status".into(), progress.status.as_str().into()),
            ("layers".into(), (progress.layers() as u64).into()),
            ("done_layers".into(), (progress.done_layers() as u64).into()),
            ("current_bytes".into(), progress.current_bytes().into()),
            ("total_bytes".into(), progress.total_bytes().into()),
        ]))
    }

    /// `check_creating(kernel_id)` → whether the kernel is being created or exists.
    pub(super) async fn check_creating(&self, args: Args) -> Result<Value, MethodError> {
        const M: &str = "check_creating";
        args.expect(&["kernel_id"])?;
        let kernel_id = id_arg(&args, 0, "kernel_id", M)?;
        Ok(self.kernels(M)?.is_known(&kernel_id).await.into())
    }

    pub(super) async fn ping_kernel(&self, args: Args) -> Result<Value, MethodError> {
        const M: &str = "ping_kernel";
        args.expect(&["kernel_id"])?;
        let kernel_id = id_arg(&args, 0, "kernel_id", M)?;
        let kernels = self.kernels(M)?;
        match kernels.record(&kernel_id).await {
            Ok(record) if kernels.check_running(&kernel_id).await.unwrap_or(false) => {
                Ok(Value::Map(vec![("started_at".into(), record.created_at.into())]))
            }
            Ok(_) | Err(KernelError::UnknownKernel(_)) => Ok(Value::Nil),
            Err(err) => Err(kernel_failure(M, err)),
        }
    }

    pub(super) async fn sync_kernel_registry(&self, args: Args) -> Result<Value, MethodError> {
        const M: &str = "sync_kernel_registry";
        args.expect(&["kernel_session_ids"])?;
        let mut known = Vec::new();
        for pair in args.array(0, "kernel_session_ids")? {
            let ids = pair.as_array().filter(|p| p.len() == 2).and_then(|p| Some((id_value(&p[0])?, id_value(&p[1])?)));
            known.push(ids.ok_or_else(|| {
                MethodError::Arguments(format!("{M}: each entry must be a (kernel_id, session_id) pair, got {pair}"))
            })?);
        }
        self.kernels(M)?.sync_with_manager(known).await.map_err(|err| kernel_failure(M, err))?;
        Ok(Value::Nil)
    }

    /// `set_egress_cap(kernel_id, bits_per_sec)` (this agent's own): a running kernel's egress
    /// cap, 0 for the node's default alone; answers the cap the kernel is held to now.
    pub(super) async fn set_egress_cap(&self, args: Args) -> Result<Value, MethodError> {
        const M: &str = "set_egress_cap";
        args.expect(&["kernel_id", "bits_per_sec"])?;
        let kernel_id = id_arg(&args, 0, "kernel_id", M)?;
        let bits = u64::try_from(args.integer(1, "bits_per_sec")?)
            .map_err(|_| MethodError::Arguments(format!("{M}: bits_per_sec must not be negative")))?;
        let cap = self.kernels(M)?.set_egress_cap(&kernel_id, bits).await.map_err(|err| kernel_failure(M, err))?;
        Ok(Value::Map(vec![("egress_bps".into(), cap.into())]))
    }

    pub(super) async fn get_logs(&self, args: Args) -> Result<Value, MethodError> {
        const M: &str = "get_logs";
        args.expect(&["kernel_id"])?;
        let kernel_id = id_arg(&args, 0, "kernel_id", M)?;
        let logs = self.kernels(M)?.logs(&kernel_id).await.map_err(|err| kernel_failure(M, err))?;
        Ok(Value::Map(vec![("logs".into(), logs.into())]))
    }

    pub(super) async fn list_kernels(&self, args: Args) -> Result<Value, MethodError> {
        args.expect(&[])?;
        let records = self.kernels("list_kernels")?.records().await;
        Ok(Value::Array(records.iter().map(kernel_summary).collect()))
    }

    pub(super) async fn assign_port(&self, args: Args) -> Result<Value, MethodError> {
        const M: &str = "assign_port";
        args.expect(&[])?;
        let port = self
            .kernels(M)?
            .ports
            .assign_one()
            .map_err(|err| MethodError::Failed { method: M.into(), message: err.to_string() })?;
        Ok(port.into())
    }

    pub(super) async fn release_port(&self, args: Args) -> Result<Value, MethodError> {
        const M: &str = "release_port";
        args.expect(&["port_no"])?;
        let port = args.integer(0, "port_no")?;
        let port = u16::try_from(port).map_err(|_| {
            MethodError::Arguments(format!("{M}: argument `port_no` must be a port number, got {port}"))
        })?;
        self.kernels(M)?.ports.release_one(port);
        Ok(Value::Nil)
    }
}

impl Methods {
    /// Runs a blocking file operation on a kernel's work directory.
    async fn on_work_dir<T: Send + 'static>(
        &self,
        method: &'static str,
        kernel_id: &str,
        operation: impl FnOnce(&std::path::Path) -> Result<T, crate::kernel_files::FileError> + Send + 'static,
    ) -> Result<T, MethodError> {
        let work = self.kernels(method)?.work_dir(kernel_id).await.map_err(|err| kernel_failure(method, err))?;
        let failed = |message: String| MethodError::Failed { method: method.to_owned(), message };
        tokio::task::spawn_blocking(move || operation(&work))
            .await
            .map_err(|join| failed(join.to_string()))?
            .map_err(|err| failed(format!("{}: {err}", err.exception_name())))
    }

    pub(super) async fn upload_file(&self, args: Args) -> Result<Value, MethodError> {
        const M: &str = "upload_file";
        args.expect(&["kernel_id", "filename", "filedata"])?;
        let kernel_id = id_arg(&args, 0, "kernel_id", M)?;
        let filename = args.string(1, "filename")?;
        let data = match args.required(2, "filedata")? {
            Value::Binary(bytes) => bytes.clone(),
            Value::String(s) => s.as_bytes().to_vec(),
            other => {
                return Err(MethodError::Arguments(format!(
                    "{M}: argument `filedata` must be bytes, got {}",
                    type_name(other)
                )));
            }
        };
        self.on_work_dir(M, &kernel_id, move |work| crate::kernel_files::upload(work, &filename, &data)).await?;
        Ok(Value::Nil)
    }

    pub(super) async fn download_file(&self, args: Args) -> Result<Value, MethodError> {
        const M: &str = "download_file";
        args.expect(&["kernel_id", "filepath"])?;
        let kernel_id = id_arg(&args, 0, "kernel_id", M)?;
        let path = args.string(1, "filepath")?;
        let tar = self.on_work_dir(M, &kernel_id, move |work| crate::kernel_files::download_tar(work, &path)).await?;
        Ok(Value::Binary(tar))
    }

    pub(super) async fn download_single(&self, args: Args) -> Result<Value, MethodError> {
        const M: &str = "download_single";
        args.expect(&["kernel_id", "filepath"])?;
        let kernel_id = id_arg(&args, 0, "kernel_id", M)?;
        let path = args.string(1, "filepath")?;
        let bytes =
            self.on_work_dir(M, &kernel_id, move |work| crate::kernel_files::download_single(work, &path)).await?;
        Ok(Value::Binary(bytes))
    }

    pub(super) async fn list_files(&self, args: Args) -> Result<Value, MethodError> {
        const M: &str = "list_files";
        args.expect(&["kernel_id", "path"])?;
        let kernel_id = id_arg(&args, 0, "kernel_id", M)?;
        let path = args.optional_string(1, "path")?.unwrap_or_else(|| "/home/work".into());
        let listing = self.on_work_dir(M, &kernel_id, move |work| crate::kernel_files::list(work, &path)).await?;
        Ok(listing.to_value())
    }
}

fn kernel_summary(record: &KernelRecord) -> Value {
    let text = |s: &str| Value::from(s);
    Value::Map(vec![
        ("kernel_id".into(), text(&record.kernel_id)),
        ("session_id".into(), text(&record.session_id)),
        ("state".into(), text(record.state.as_str())),
        ("image".into(), text(&record.image)),
        ("container_id".into(), record.container_id.as_deref().map_or(Value::Nil, Value::from)),
        ("cpuset".into(), text(&crate::resources::format_cpuset(&record.cpuset))),
        ("cpu".into(), text(record.slots.get("cpu").map(String::as_str).unwrap_or("0"))),
        ("mem".into(), record.mem_bytes.into()),
        ("repl_in_port".into(), record.repl_in_port.into()),
        ("repl_out_port".into(), record.repl_out_port.into()),
        ("owner_user_id".into(), text(&record.owner_user_id)),
        ("owner_project_id".into(), text(&record.owner_project_id)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_come_as_strings_or_uuid_extensions() {
        assert_eq!(id_value(&Value::from("k-1")), Some("k-1".into()));
        let bytes: Vec<u8> = (0u8..16).collect();
        assert_eq!(id_value(&Value::Ext(1, bytes)), Some("00010203-0405-0607-0809-0a0b0c0d0e0f".into()));
        assert_eq!(id_value(&Value::from(3)), None);
        assert_eq!(id_value(&Value::Ext(1, vec![1, 2])), None);
    }
}
