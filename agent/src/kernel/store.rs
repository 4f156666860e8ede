//! The kernel registry on disk: a versioned JSON document written atomically (temp file,
//! fsync, rename, fsync of the directory) so a restarted agent knows what it ran.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::KernelRecord;

const FORMAT: &str = "bai-agent.kernels";
const VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot write the kernel registry {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot read the kernel registry {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the kernel registry {path} is not valid: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Serialize, Deserialize)]
struct Document {
    format: String,
    version: u32,
    kernels: Vec<KernelRecord>,
}

/// Where the registry lives.
#[derive(Debug, Clone)]
pub struct KernelStore {
    path: PathBuf,
}

impl KernelStore {
    pub fn new(dir: &Path) -> KernelStore {
        KernelStore { path: dir.join("kernels.json") }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved kernels; none if the file does not exist yet.
    pub fn load(&self) -> Result<Vec<KernelRecord>, StoreError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(StoreError::Read { path: self.path.clone(), source }),
        };
        let invalid = |message: String| StoreError::Invalid { path: self.path.clone(), message };
        let document: Document = serde_json::from_str(&text).map_err(|err| invalid(err.to_string()))?;
        if document.format != FORMAT {
            return Err(invalid(format!("format is `{}`, expected `{FORMAT}`", document.format)));
        }
        if document.version != VERSION {
            return Err(invalid(format!("version {} is not {VERSION}", document.version)));
        }
        Ok(document.kernels)
    }

    /// Replaces the saved registry with `kernels`, atomically.
    pub fn save(&self, kernels: &[KernelRecord]) -> Result<(), StoreError> {
        let write_error = |source| StoreError::Write { path: self.path.clone(), source };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(write_error)?;
        let document = Document { format: FORMAT.into(), version: VERSION, kernels: kernels.to_vec() };
        let body = serde_json::to_vec_pretty(&document).map_err(|err| write_error(std::io::Error::other(err)))?;
        let temp = self.path.with_extension("json.tmp");
        let mut file = std::fs::File::create(&temp).map_err(write_error)?;
        file.write_all(&body).map_err(write_error)?;
        file.sync_all().map_err(write_error)?;
        std::fs::rename(&temp, &self.path).map_err(write_error)?;
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(write_error)?;
        Ok(())
    }

    /// Moves an unreadable registry aside so the agent can start from the containers' labels.
    pub fn quarantine(&self) -> Option<PathBuf> {
        let aside = self.path.with_extension(format!("json.corrupt-{}", std::process::id()));
        std::fs::rename(&self.path, &aside).ok().map(|()| aside)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::{KernelRecord, KernelState};

    fn record(id: &str) -> KernelRecord {
        KernelRecord { kernel_id: id.into(), session_id: "s".into(), state: KernelState::Running, ..Default::default() }
    }

    #[test]
    fn saves_and_loads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = KernelStore::new(dir.path());
        assert!(store.load().expect("no file is empty").is_empty());
        store.save(&[record("a"), record("b")]).expect("save");
        let loaded = store.load().expect("load");
        assert_eq!(loaded.iter().map(|r| r.kernel_id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    fn a_corrupt_file_is_an_error_and_can_be_moved_aside() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = KernelStore::new(dir.path());
        std::fs::write(store.path(), "{\"format\": \"bai-agent.kernels\", \"vers").expect("write");
        assert!(matches!(store.load(), Err(StoreError::Invalid { .. })));
        assert!(store.quarantine().is_some());
        assert!(store.load().expect("gone").is_empty());
    }
}
