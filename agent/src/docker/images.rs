//! Images on the engine: whether one is there and its labels, pulls (with the registry's
//! credentials), the installed kernel images Backend.AI's manager is told about, removal, and
//! what `commit` and `push_image` do (a container committed to an image, an image saved to a
//! gzipped file, an image pushed to its registry).

use std::{collections::HashMap, path::Path, time::Duration};

use bollard::{
    auth::DockerCredentials,
    models::ContainerConfig,
    query_parameters::{CommitContainerOptions, CreateImageOptions, PushImageOptions, RemoveImageOptions},
};
use futures_util::StreamExt;

use super::{DockerClient, DockerError};

/// Pulls, commits, saves and pushes may take this long (the engine's default per request is
/// 2 minutes; Backend.AI's pull timeout defaults to 2 hours).
pub const LONG_OPERATION: Duration = Duration::from_secs(7200);

/// A registry login, from the image's registry configuration (`{name, url, username,
/// password}`) as the manager sends it.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct RegistryAuth {
    pub username: String,
    pub password: String,
    /// The registry's host (`127.0.0.1:5000`, `cr.example.com`).
    pub server: String,
}

/// The password stays out of logs.
impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAuth").field("username", &self.username).field("server", &self.server).finish()
    }
}

impl RegistryAuth {
    fn credentials(&self) -> DockerCredentials {
        DockerCredentials {
            username: Some(self.username.clone()),
            password: Some(self.password.clone()),
            serveraddress: Some(self.server.clone()),
            ..Default::default()
        }
    }
}

/// An image as Backend.AI's `InstalledImageInfo` describes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InstalledImage {
    /// A repository tag (`e2e/python:3.11`).
    pub canonical: String,
    /// The image id (`sha256:…`).
    pub digest: String,
    pub architecture: String,
}

/// Backend.AI's name of an engine architecture (`amd64` → `x86_64`, `arm64` → `aarch64`).
fn backend_ai_arch(architecture: &str) -> String {
    match architecture {
        "amd64" | "x86-64" => "x86_64".to_owned(),
        "arm64" | "aarch64_be" => "aarch64".to_owned(),
        other => other.to_owned(),
    }
}

impl DockerClient {
    /// Whether `image` is present locally.
    pub async fn image_present(&self, image: &str) -> Result<bool, DockerError> {
        match self.engine().inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(false),
            Err(source) => Err(DockerError::Request { what: format!("inspect image {image}"), source }),
        }
    }

    /// The image's labels (empty when it has none).
    pub async fn image_labels(&self, image: &str) -> Result<HashMap<String, String>, DockerError> {
        let inspected = self
            .engine()
            .inspect_image(image)
            .await
            .map_err(|source| DockerError::Request { what: format!("inspect image {image}"), source })?;
        Ok(inspected.config.and_then(|config| config.labels).unwrap_or_default())
    }

    /// Pulls `image` from its registry (logged in with `auth` when given), calling `progress`
    /// with each status line.
    pub async fn pull_image(
        &self,
        image: &str,
        auth: Option<&RegistryAuth>,
        mut progress: impl FnMut(&PullProgress),
    ) -> Result<(), DockerError> {
        let (name, tag) = split_image_tag(image);
        let options =
            CreateImageOptions { from_image: Some(name.to_owned()), tag: Some(tag.to_owned()), ..Default::default() };
        let engine = self.engine().clone().with_timeout(LONG_OPERATION);
        let mut stream = engine.create_image(Some(options), None, auth.map(RegistryAuth::credentials));
        let mut pulled = PullProgress::default();
        while let Some(item) = stream.next().await {
            let info = item.map_err(|source| DockerError::Request { what: format!("pull {image}"), source })?;
            if let Some(error) = info.error_detail.as_ref().and_then(|detail| detail.message.clone()) {
                return Err(DockerError::Refused { what: format!("pull {image}"), message: error });
            }
            if pulled.update(&info) {
                progress(&pulled);
            }
        }
        Ok(())
    }

    /// The kernel images Backend.AI's agent reports as installed: every tag of an image that
    /// has labels and a kernelspec of 1 (the default), with its id and architecture. One list
    /// request; an image is inspected (for its architecture) only the first time its id is
    /// seen, `architectures` remembering it.
    pub async fn kernel_images(
        &self,
        architectures: &mut HashMap<String, String>,
    ) -> Result<Vec<InstalledImage>, DockerError> {
        let images = self
            .engine()
            .list_images(None::<bollard::query_parameters::ListImagesOptions>)
            .await
            .map_err(|source| DockerError::Request { what: "list images".into(), source })?;
        architectures.retain(|id, _| images.iter().any(|image| &image.id == id));
        let mut installed = Vec::new();
        for image in images {
            let kernelspec = image.labels.get("ai.backend.kernelspec").map_or("1", String::as_str);
            if image.labels.is_empty() || kernelspec.trim() != "1" {
                continue;
            }
            let architecture = match architectures.get(&image.id) {
                Some(architecture) => architecture.clone(),
                None => match self.engine().inspect_image(&image.id).await {
                    Ok(inspect) => {
                        let architecture = backend_ai_arch(inspect.architecture.as_deref().unwrap_or("x86_64"));
                        architectures.insert(image.id.clone(), architecture.clone());
                        architecture
                    }
                    // Removed meanwhile.
                    Err(_) => continue,
                },
            };
            for tag in image.repo_tags.iter().filter(|tag| !tag.ends_with("<none>")) {
                installed.push(InstalledImage {
                    canonical: tag.clone(),
                    digest: image.id.clone(),
                    architecture: architecture.clone(),
                });
            }
        }
        installed.sort_by(|a, b| a.canonical.cmp(&b.canonical));
        Ok(installed)
    }

    /// Removes the image `name` (`force`: even when containers use it; `noprune`: keeping its
    /// untagged parents).
    pub async fn remove_image(&self, name: &str, force: bool, noprune: bool) -> Result<(), DockerError> {
        let options = RemoveImageOptions { force, noprune, ..Default::default() };
        self.engine()
            .remove_image(name, Some(options), None)
            .await
            .map(drop)
            .map_err(|source| DockerError::Request { what: format!("remove image {name}"), source })
    }

    /// Commits the container `container_id` to an image (tagged `repository:tag` when given,
    /// with the Dockerfile instructions `changes`, e.g. `LABEL k=v`); returns the image id.
    pub async fn commit_container(
        &self,
        container_id: &str,
        repository: Option<(&str, &str)>,
        changes: &[String],
    ) -> Result<String, DockerError> {
        let options = CommitContainerOptions {
            container: Some(container_id.to_owned()),
            repo: repository.map(|(repo, _)| repo.to_owned()),
            tag: repository.map(|(_, tag)| tag.to_owned()),
            changes: (!changes.is_empty()).then(|| changes.join("\n")),
            pause: true,
            ..Default::default()
        };
        let engine = self.engine().clone().with_timeout(LONG_OPERATION);
        let created = engine
            .commit_container(options, ContainerConfig::default())
            .await
            .map_err(|source| DockerError::Request { what: format!("commit container {container_id}"), source })?;
        Ok(created.id)
    }

    /// Saves the image `image` (`docker save`) gzipped to `path`, written to `path.partial`
    /// first and renamed when whole, so a file by the final name is always complete.
    pub async fn save_image_gzipped(&self, image: &str, path: &Path) -> Result<u64, SaveError> {
        let partial = path.with_extension("partial");
        let (tx, rx) = std::sync::mpsc::sync_channel::<bytes::Bytes>(16);
        let writer = {
            let partial = partial.clone();
            tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
                use std::io::Write;
                let file = std::fs::File::create(&partial)?;
                let mut gz = flate2::write::GzEncoder::new(std::io::BufWriter::new(file), flate2::Compression::fast());
                let mut written = 0u64;
                for chunk in rx {
                    gz.write_all(&chunk)?;
                    written += chunk.len() as u64;
                }
                gz.finish()?.into_inner().map_err(|err| err.into_error())?.sync_all()?;
                Ok(written)
            })
        };
        let engine = self.engine().clone().with_timeout(LONG_OPERATION);
        let mut stream = engine.export_image(image);
        let mut streamed: Result<(), SaveError> = Ok(());
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(chunk) => {
                    if tx.send(chunk).is_err() {
                        // The writer stopped: its error says why.
                        break;
                    }
                }
                Err(source) => {
                    streamed =
                        Err(SaveError::Docker(DockerError::Request { what: format!("save image {image}"), source }));
                    break;
                }
            }
        }
        drop(tx);
        let written = writer
            .await
            .map_err(|join| SaveError::Write { path: partial.clone(), source: std::io::Error::other(join) });
        let outcome =
            streamed.and_then(|()| written?.map_err(|source| SaveError::Write { path: partial.clone(), source }));
        match outcome {
            Ok(bytes) => {
                std::fs::rename(&partial, path)
                    .map_err(|source| SaveError::Write { path: path.to_path_buf(), source })?;
                Ok(bytes)
            }
            Err(err) => {
                let _ = std::fs::remove_file(&partial);
                Err(err)
            }
        }
    }

    /// Pushes `image` (`registry/name:tag`) to its registry, logged in with `auth` when given.
    /// The engine reports a refused push inside the stream; that is an error here too.
    pub async fn push_image(&self, image: &str, auth: Option<&RegistryAuth>) -> Result<(), DockerError> {
        let (name, tag) = split_image_tag(image);
        let options = PushImageOptions { tag: Some(tag.to_owned()), ..Default::default() };
        let engine = self.engine().clone().with_timeout(LONG_OPERATION);
        let mut stream = engine.push_image(name, Some(options), auth.map(RegistryAuth::credentials));
        while let Some(item) = stream.next().await {
            let info = item.map_err(|source| DockerError::Request { what: format!("push {image}"), source })?;
            if let Some(error) = info.error_detail.and_then(|detail| detail.message) {
                return Err(DockerError::Refused { what: format!("push {image}"), message: error });
            }
        }
        Ok(())
    }
}

/// Why an image could not be saved to a file.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error("cannot write {path}: {source}")]
    Write { path: std::path::PathBuf, source: std::io::Error },
}

/// `repo/name:tag` → (`repo/name`, `tag`); no tag means `latest`. A registry port
/// (`host:5000/name`) is not a tag.
pub fn split_image_tag(image: &str) -> (&str, &str) {
    let name_start = image.rfind('/').map_or(0, |slash| slash + 1);
    match image[name_start..].rfind(':') {
        Some(colon) => (&image[..name_start + colon], &image[name_start + colon + 1..]),
        None => (image, "latest"),
    }
}

/// How far an image's pull has come, from the engine's pull stream: each layer's bytes
/// downloaded and whether it is in place.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PullProgress {
    /// The engine's last status line (`Downloading`, `Pull complete`, `Digest: …`).
    pub status: String,
    layers: std::collections::BTreeMap<String, LayerProgress>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct LayerProgress {
    current: u64,
    total: u64,
    done: bool,
}

impl PullProgress {
    /// Takes one item of the pull stream; whether anything changed.
    pub fn update(&mut self, info: &bollard::models::CreateImageInfo) -> bool {
        let Some(status) = info.status.as_deref() else { return false };
        self.status = status.to_owned();
        let Some(id) = info.id.as_deref().filter(|_| !status.starts_with("Pulling from")) else { return true };
        let layer = self.layers.entry(id.to_owned()).or_default();
        let detail = info.progress_detail.as_ref();
        let number = |value: Option<i64>| value.and_then(|v| u64::try_from(v).ok());
        match status {
            "Downloading" => {
                if let Some(total) = number(detail.and_then(|d| d.total)) {
                    layer.total = total;
                }
                if let Some(current) = number(detail.and_then(|d| d.current)) {
                    layer.current = current;
                }
            }
            "Download complete" | "Verifying Checksum" => layer.current = layer.total,
            "Pull complete" | "Already exists" => {
                layer.current = layer.total;
                layer.done = true;
            }
            _ => {}
        }
        true
    }

    pub fn layers(&self) -> usize {
        self.layers.len()
    }

    pub fn done_layers(&self) -> usize {
        self.layers.values().filter(|layer| layer.done).count()
    }

    /// Bytes downloaded, of the layers whose size is known.
    pub fn current_bytes(&self) -> u64 {
        self.layers.values().map(|layer| layer.current).sum()
    }

    pub fn total_bytes(&self) -> u64 {
        self.layers.values().map(|layer| layer.total).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_image_tags() {
        assert_eq!(split_image_tag("bai-test/busybox:latest"), ("bai-test/busybox", "latest"));
        assert_eq!(split_image_tag("python"), ("python", "latest"));
        assert_eq!(split_image_tag("127.0.0.1:5000/lablup/python:3.11"), ("127.0.0.1:5000/lablup/python", "3.11"));
        assert_eq!(split_image_tag("127.0.0.1:5000/lablup/python"), ("127.0.0.1:5000/lablup/python", "latest"));
    }
}
