//! Saving a kernel as an image, as Backend.AI's "commit" and "convert to image" use it:
//! `commit` (the container committed to an image, optionally saved as a gzipped file under
//! `agent.image-commit-path/<subdir>/`), `get_commit_status`, `push_image`, and the
//! `kernel.<id>.commit` keys that tell the manager which commits are ongoing.
//!
//! A commit in progress is marked by the file `<image-commit-path>/<subdir>/lock/<kernel id>`
//! (the Python agent's layout), made exclusively when the commit starts and removed when it
//! ends, so one kernel is never committed twice at once. The work runs as a background task
//! ([`crate::events::bgtask`]): the call answers with the task id at once.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio_util::sync::CancellationToken;

use super::{KernelError, KernelManager, failed};
use crate::{
    docker::images::{RegistryAuth, split_image_tag},
    events::{RedisLink, RedisTarget, bgtask},
};

/// How often the ongoing commits are written for the manager (the Python agent's period)…
pub const COMMIT_STATUS_PERIOD: Duration = Duration::from_secs(7);
/// …and how long each key lives, so a finished commit stops showing within seconds.
pub const COMMIT_STATUS_TTL_SECS: u64 = 13;

/// What `commit` is asked to do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitRequest {
    pub kernel_id: String,
    /// The directory under `agent.image-commit-path` (the manager sends the owner's e-mail
    /// with `@` replaced); one path component.
    pub subdir: String,
    /// Tag the committed image so (`registry/project/name:tag`), unless it goes to a file.
    pub canonical: Option<String>,
    /// Save the image as this gzipped tar in the subdir instead of keeping it; one component.
    pub filename: Option<String>,
    /// `LABEL`s added to the image.
    pub extra_labels: Vec<(String, String)>,
}

/// A commit's in-progress marker, removed when the commit ends however it ends.
struct CommitLock(PathBuf);

impl CommitLock {
    fn acquire(path: PathBuf, kernel_id: &str) -> Result<CommitLock, KernelError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|err| failed(kernel_id, format!("cannot create {}: {err}", dir.display())))?;
        }
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(_) => Ok(CommitLock(path)),
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(failed(kernel_id, "a commit of this kernel is already in progress"))
            }
            Err(err) => Err(failed(kernel_id, format!("cannot create {}: {err}", path.display()))),
        }
    }
}

impl Drop for CommitLock {
    fn drop(&mut self) {
        if let Err(err) = std::fs::remove_file(&self.0) {
            tracing::warn!(lock = %self.0.display(), %err, "cannot remove a commit's lock file");
        }
    }
}

/// `value` as one plain path component under the commit directory: not empty, no `/`, not
/// `.` or `..`, no NUL; anything else could write outside `agent.image-commit-path`.
fn path_component<'a>(what: &str, value: &'a str) -> Result<&'a str, KernelError> {
    let plain = !value.is_empty() && value != "." && value != ".." && !value.contains(['/', '\0']);
    if plain {
        Ok(value)
    } else {
        Err(KernelError::Arguments(format!(
            "`{what}` must be a plain file name inside the commit directory, got {value:?}"
        )))
    }
}

/// A Dockerfile `LABEL` instruction with the key and value quoted (a value such as the kernel
/// features list has spaces).
fn label_instruction(key: &str, value: &str) -> String {
    let quote = |text: &str| serde_json::Value::from(text).to_string();
    format!("LABEL {}={}", quote(key), quote(value))
}

impl KernelManager {
    fn commit_lock_path(&self, subdir: &str, kernel_id: &str) -> PathBuf {
        self.commit_root.join(subdir).join("lock").join(kernel_id)
    }

    /// `commit`: starts committing the kernel's container and returns the background task's
    /// id. With a `filename` the image is saved to `<subdir>/<filename>` (gzipped `docker
    /// save`) and then removed from the engine, untagged: the Python agent tags it with the
    /// `canonical` it is given (for a file, the session's own image) and then deletes it,
    /// which leaves the session's image untagged on the node. Without one it stays, tagged
    /// `canonical`, for `push_image`.
    pub async fn commit(&self, request: CommitRequest) -> Result<String, KernelError> {
        let kernel_id = request.kernel_id.as_str();
        let record = self.record(kernel_id).await?;
        let container_id =
            record.container_id.clone().ok_or_else(|| failed(kernel_id, "it has no container to commit"))?;
        let subdir = path_component("subdir", &request.subdir)?;
        let file = request.filename.as_deref().map(|name| path_component("filename", name)).transpose()?;
        let target = file.map(|name| self.commit_root.join(subdir).join(name));
        let repository = match (&target, &request.canonical) {
            (None, Some(canonical)) => {
                let (repo, tag) = split_image_tag(canonical);
                Some((repo.to_owned(), tag.to_owned()))
            }
            _ => None,
        };
        let changes: Vec<String> =
            request.extra_labels.iter().map(|(key, value)| label_instruction(key, value)).collect();
        let docker = self.docker().await?;
        let lock = CommitLock::acquire(self.commit_lock_path(subdir, kernel_id), kernel_id)?;
        tracing::info!(kernel_id, container_id, file = ?target, canonical = ?request.canonical, "committing a kernel");
        let kernel = kernel_id.to_owned();
        Ok(bgtask::start(&self.events, "commit", async move {
            let _lock = lock;
            let repository = repository.as_ref().map(|(repo, tag)| (repo.as_str(), tag.as_str()));
            let image_id =
                docker.commit_container(&container_id, repository, &changes).await.map_err(|err| err.to_string())?;
            let Some(path) = target else {
                tracing::info!(kernel_id = %kernel, image_id, "kernel committed");
                return Ok(Some(format!("committed as {image_id}")));
            };
            let saved = docker.save_image_gzipped(&image_id, &path).await;
            if let Err(err) = docker.remove_image(&image_id, false, false).await {
                tracing::warn!(image_id, %err, "cannot remove the committed image after saving it");
            }
            let bytes = saved.map_err(|err| err.to_string())?;
            tracing::info!(kernel_id = %kernel, path = %path.display(), bytes, "kernel committed to a file");
            Ok(Some(format!("saved to {}", path.display())))
        }))
    }

    /// `get_commit_status`: `"ongoing"` while a commit of the kernel into `subdir` runs,
    /// `"ready"` otherwise (Backend.AI's `CommitStatus`).
    pub async fn commit_status(&self, kernel_id: &str, subdir: &str) -> Result<&'static str, KernelError> {
        self.record(kernel_id).await?;
        let subdir = path_component("subdir", subdir)?;
        Ok(if self.commit_lock_path(subdir, kernel_id).exists() { "ongoing" } else { "ready" })
    }

    /// The kernels with a commit in progress (a lock file in any subdir).
    pub fn ongoing_commits(&self) -> Vec<String> {
        ongoing_commits(&self.commit_root)
    }

    /// Lock files left by an agent that stopped mid-commit: no commit outlives its agent.
    pub(super) fn clear_stale_commit_locks(&self) {
        for (kernel_id, path) in lock_files(&self.commit_root) {
            match std::fs::remove_file(&path) {
                Ok(()) => tracing::warn!(kernel_id, "a commit was cut off by the agent's stop; its lock is removed"),
                Err(err) => tracing::warn!(lock = %path.display(), %err, "cannot remove a stale commit lock"),
            }
        }
    }

    /// `push_image`: pushes `image` to its registry in the background (logged in with `auth`)
    /// and returns the task id; a local image is not pushed (the task is done at once).
    pub async fn push_image(
        &self,
        image: String,
        is_local: bool,
        auth: Option<RegistryAuth>,
    ) -> Result<String, KernelError> {
        let docker = self.docker().await?;
        Ok(bgtask::start(&self.events, "push_image", async move {
            if is_local {
                return Ok(Some(format!("{image} is a local image; not pushed")));
            }
            tracing::info!(image, "pushing an image");
            docker.push_image(&image, auth.as_ref()).await.map_err(|err| err.to_string())?;
            tracing::info!(image, "image pushed");
            Ok(Some(format!("pushed {image}")))
        }))
    }
}

fn lock_files(root: &Path) -> Vec<(String, PathBuf)> {
    let Ok(subdirs) = std::fs::read_dir(root) else { return Vec::new() };
    let mut found = Vec::new();
    for subdir in subdirs.flatten() {
        let Ok(locks) = std::fs::read_dir(subdir.path().join("lock")) else { continue };
        for lock in locks.flatten() {
            if let Some(kernel_id) = lock.file_name().to_str() {
                found.push((kernel_id.to_owned(), lock.path()));
            }
        }
    }
    found
}

fn ongoing_commits(root: &Path) -> Vec<String> {
    let mut kernels: Vec<String> = lock_files(root).into_iter().map(|(kernel_id, _)| kernel_id).collect();
    kernels.sort();
    kernels.dedup();
    kernels
}

/// Writes `kernel.<id>.commit = "ongoing"` (for [`COMMIT_STATUS_TTL_SECS`]) in the stats
/// database every [`COMMIT_STATUS_PERIOD`] for each ongoing commit, which the manager's
/// `get_commit_status` reads, until `shutdown`.
pub async fn run_commit_status_report(kernels: Arc<KernelManager>, target: RedisTarget, shutdown: CancellationToken) {
    let client = match target.client() {
        Ok(client) => client,
        Err(err) => {
            tracing::error!(redis = %target.addr, %err, "cannot set up the Redis client; commit statuses are not reported");
            return;
        }
    };
    let mut link = RedisLink::new(client);
    let mut failing = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(COMMIT_STATUS_PERIOD) => {}
        }
        let ongoing = kernels.ongoing_commits();
        if ongoing.is_empty() {
            continue;
        }
        let mut pipe = redis::pipe();
        for kernel_id in &ongoing {
            pipe.cmd("SET")
                .arg(format!("kernel.{kernel_id}.commit"))
                .arg("ongoing")
                .arg("EX")
                .arg(COMMIT_STATUS_TTL_SECS)
                .ignore();
        }
        match link.run(&pipe).await {
            Ok(()) => failing = false,
            Err(err) if !failing => {
                failing = true;
                tracing::warn!(redis = %target.addr, %err, "cannot write commit statuses to Redis; retrying");
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_leave_the_commit_directory_are_refused() {
        for bad in ["", ".", "..", "../x", "a/b", "/etc", "x\0y"] {
            let err = path_component("subdir", bad).expect_err(bad);
            assert!(err.to_string().contains("subdir"), "{err}");
        }
        assert_eq!(
            path_component("filename", "2026-12-05_s_python-3.11.tar.gz").ok(),
            Some("2026-12-05_s_python-3.11.tar.gz")
        );
        assert_eq!(path_component("subdir", "user_example.com").ok(), Some("user_example.com"));
    }

    #[test]
    fn labels_are_quoted() {
        assert_eq!(
            label_instruction("ai.backend.features", "batch query uid-match"),
            r#"LABEL "ai.backend.features"="batch query uid-match""#
        );
        assert_eq!(label_instruction("k", "say \"hi\""), r#"LABEL "k"="say \"hi\"""#);
    }

    #[test]
    fn a_lock_is_exclusive_and_removed_when_dropped() {
        let root = tempfile::tempdir().expect("tempdir");
        let path = root.path().join("user_example.com/lock/k1");
        let lock = CommitLock::acquire(path.clone(), "k1").expect("first");
        assert_eq!(ongoing_commits(root.path()), vec!["k1".to_owned()]);
        let again = CommitLock::acquire(path.clone(), "k1").err().expect("second refused");
        assert!(again.to_string().contains("already in progress"), "{again}");
        drop(lock);
        assert!(!path.exists());
        assert!(ongoing_commits(root.path()).is_empty());
    }
}
