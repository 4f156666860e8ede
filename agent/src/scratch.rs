//! Per-kernel scratch directories under `container.scratch-root`:
//! `{root}/{kernel_id}/work` (mounted rw at `/home/work`) and `{root}/{kernel_id}/config`
//! (mounted ro at `/home/config`) holding `environ.txt`, `resource.txt` and
//! `intrinsic-ports.json`; and [`resolve_under`], which keeps vfolder host paths inside
//! `container.mount-root`.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Component, Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::resources::{KernelResourceSpec, RESOURCE_TXT, ResourceFileError, spec::append_container_id};

pub const ENVIRON_TXT: &str = "environ.txt";
pub const INTRINSIC_PORTS_JSON: &str = "intrinsic-ports.json";
/// Backend.AI keeps a pristine copy of each beside it.
pub const ENVIRON_BASE_TXT: &str = "environ_base.txt";
pub const RESOURCE_BASE_TXT: &str = "resource_base.txt";

/// Backend.AI's `work` user in kernel images.
pub const DEFAULT_KERNEL_UID: u32 = 1000;
pub const DEFAULT_KERNEL_GID: u32 = 1000;

/// Why a scratch directory could not be made, found or removed, or a mount path was refused.
#[derive(Debug, thiserror::Error)]
pub enum ScratchError {
    #[error("scratch root {path} is not an absolute path")]
    RelativeRoot { path: PathBuf },
    #[error("kernel id {kernel_id:?} cannot name a scratch directory: {reason}")]
    BadKernelId { kernel_id: String, reason: &'static str },
    #[error("environ key {key:?} is not a valid environment variable name")]
    BadEnvKey { key: String },
    #[error("environ.{key}: the value holds a line break or NUL")]
    BadEnvValue { key: String },
    #[error("environ.{key}: given twice")]
    DuplicateEnvKey { key: String },
    #[error("{path} exists but is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("scratch directory {path} is incomplete: {missing} is missing")]
    Incomplete { path: PathBuf, missing: &'static str },
    #[error("cannot {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    ResourceFile(#[from] ResourceFileError),
    #[error("mount root {root} cannot be resolved: {source}")]
    MountRootUnresolvable { root: PathBuf, source: std::io::Error },
    #[error("vfolder path {path} cannot be resolved: {source}")]
    MountPathUnresolvable { path: PathBuf, source: std::io::Error },
    #[error("vfolder path {path} resolves to {resolved}, which is not under the mount root {root}")]
    MountPathEscapes { path: PathBuf, resolved: PathBuf, root: PathBuf },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ScratchError {
    let path = path.to_path_buf();
    move |source| ScratchError::Io { action, path, source }
}

/// The ports the in-container runner binds (`/home/config/intrinsic-ports.json`); the
/// runner falls back to these defaults for a key that is absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntrinsicPorts {
    pub replin: u16,
    pub replout: u16,
    pub sshd: u16,
    pub ttyd: u16,
}

impl Default for IntrinsicPorts {
    fn default() -> Self {
        Self { replin: 2000, replout: 2001, sshd: 2200, ttyd: 7681 }
    }
}

/// The bootstrap script's name in `work/` (the kernel runner looks for it there).
pub const BOOTSTRAP_SH: &str = "bootstrap.sh";

/// What goes into a kernel's scratch directory.
#[derive(Debug, Clone, PartialEq)]
pub struct ScratchContents {
    /// `environ.txt`, one `KEY=VALUE` line each, in this order.
    pub environ: Vec<(String, String)>,
    /// `resource.txt`.
    pub resource_spec: KernelResourceSpec,
    /// `intrinsic-ports.json`.
    pub intrinsic_ports: IntrinsicPorts,
    /// Owner of `work/` (chowned only when the agent runs as root).
    pub uid: u32,
    pub gid: u32,
    /// The session's bootstrap script, written to `work/bootstrap.sh`: the kernel runner runs
    /// it once before the kernel serves, as Backend.AI's does.
    pub bootstrap_script: Option<String>,
}

impl ScratchContents {
    pub fn new(resource_spec: KernelResourceSpec) -> ScratchContents {
        ScratchContents {
            environ: Vec::new(),
            resource_spec,
            intrinsic_ports: IntrinsicPorts::default(),
            uid: DEFAULT_KERNEL_UID,
            gid: DEFAULT_KERNEL_GID,
            bootstrap_script: None,
        }
    }
}

/// One kernel's scratch directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelScratch {
    /// `{root}/{kernel_id}`.
    pub dir: PathBuf,
    /// `{root}/{kernel_id}/work` → `/home/work` (rw).
    pub work: PathBuf,
    /// `{root}/{kernel_id}/config` → `/home/config` (ro).
    pub config: PathBuf,
}

impl KernelScratch {
    fn at(dir: PathBuf) -> KernelScratch {
        KernelScratch { work: dir.join("work"), config: dir.join("config"), dir }
    }

    pub fn resource_txt(&self) -> PathBuf {
        self.config.join(RESOURCE_TXT)
    }

    pub fn environ_txt(&self) -> PathBuf {
        self.config.join(ENVIRON_TXT)
    }

    pub fn intrinsic_ports_json(&self) -> PathBuf {
        self.config.join(INTRINSIC_PORTS_JSON)
    }

    /// Reads back `resource.txt` (recovery after an agent restart).
    pub fn read_resource_spec(&self) -> Result<KernelResourceSpec, ScratchError> {
        Ok(KernelResourceSpec::read_from(&self.resource_txt())?)
    }

    /// Appends `CID=<container id>` to `resource.txt` once the container exists.
    pub fn record_container_id(&self, container_id: &str) -> Result<(), ScratchError> {
        Ok(append_container_id(&self.resource_txt(), container_id)?)
    }
}

/// `container.scratch-root`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScratchRoot {
    root: PathBuf,
}

impl ScratchRoot {
    /// `root` must be absolute; it is created on the first [`prepare`](Self::prepare).
    pub fn new(root: impl Into<PathBuf>) -> Result<ScratchRoot, ScratchError> {
        let root = root.into();
        if !root.is_absolute() {
            return Err(ScratchError::RelativeRoot { path: root });
        }
        Ok(ScratchRoot { root })
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    fn kernel_dir(&self, kernel_id: &str) -> Result<PathBuf, ScratchError> {
        validate_kernel_id(kernel_id)?;
        Ok(self.root.join(kernel_id))
    }

    /// Creates (or refreshes) the kernel's scratch directory: `work/` (0755, owned by
    /// `contents.uid:gid` when running as root) and `config/` (0755) with `environ.txt`,
    /// `resource.txt`, `intrinsic-ports.json` and Backend.AI's `*_base.txt` copies. An
    /// existing `work/` keeps its files (a restarted kernel keeps its home).
    pub fn prepare(&self, kernel_id: &str, contents: &ScratchContents) -> Result<KernelScratch, ScratchError> {
        let dir = self.kernel_dir(kernel_id)?;
        // Validate everything before touching the disk.
        let environ = environ_txt(&contents.environ)?;
        let resource = contents.resource_spec.to_resource_txt()?;
        let ports = serde_json::to_vec(&contents.intrinsic_ports).map_err(|err| ScratchError::Io {
            action: "encode",
            path: PathBuf::from(INTRINSIC_PORTS_JSON),
            source: err.into(),
        })?;

        fs::create_dir_all(&self.root).map_err(io_error("create the scratch root", &self.root))?;
        let scratch = KernelScratch::at(dir);
        for path in [&scratch.dir, &scratch.work, &scratch.config] {
            make_dir(path)?;
        }
        if running_as_root() {
            std::os::unix::fs::chown(&scratch.work, Some(contents.uid), Some(contents.gid))
                .map_err(io_error("chown", &scratch.work))?;
        }
        write_file(&scratch.environ_txt(), environ.as_bytes())?;
        write_file(&scratch.config.join(ENVIRON_BASE_TXT), environ.as_bytes())?;
        write_file(&scratch.resource_txt(), resource.as_bytes())?;
        write_file(&scratch.config.join(RESOURCE_BASE_TXT), resource.as_bytes())?;
        write_file(&scratch.intrinsic_ports_json(), &ports)?;
        if let Some(script) = &contents.bootstrap_script {
            let path = scratch.work.join(BOOTSTRAP_SH);
            write_file(&path, script.as_bytes())?;
            if running_as_root() {
                std::os::unix::fs::chown(&path, Some(contents.uid), Some(contents.gid))
                    .map_err(io_error("chown", &path))?;
            }
        }
        Ok(scratch)
    }

    /// Finds a kernel's scratch directory again (after an agent restart): `None` when there
    /// is none, an error when it is there but lacks `work/` or `config/`.
    pub fn existing(&self, kernel_id: &str) -> Result<Option<KernelScratch>, ScratchError> {
        let dir = self.kernel_dir(kernel_id)?;
        match fs::symlink_metadata(&dir) {
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(io_error("inspect", &dir)(err)),
            Ok(meta) if !meta.is_dir() => return Err(ScratchError::NotADirectory { path: dir }),
            Ok(_) => {}
        }
        let scratch = KernelScratch::at(dir);
        for (path, missing) in [(&scratch.work, "work/"), (&scratch.config, "config/")] {
            match fs::symlink_metadata(path) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => return Err(ScratchError::NotADirectory { path: path.clone() }),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                    return Err(ScratchError::Incomplete { path: scratch.dir.clone(), missing });
                }
                Err(err) => return Err(io_error("inspect", path)(err)),
            }
        }
        Ok(Some(scratch))
    }

    /// Removes the kernel's scratch directory; removing one that is not there is fine.
    pub fn remove(&self, kernel_id: &str) -> Result<(), ScratchError> {
        let dir = self.kernel_dir(kernel_id)?;
        let result = match fs::symlink_metadata(&dir) {
            Ok(meta) if meta.is_dir() => fs::remove_dir_all(&dir),
            // A stray file or symlink in its place: remove the entry, never what a link points to.
            Ok(_) => fs::remove_file(&dir),
            Err(err) => Err(err),
        };
        match result {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(io_error("remove", &dir)(err)),
            _ => Ok(()),
        }
    }

    /// Kernel ids that have a scratch directory here (recovery looks them up by label first;
    /// this finds leftovers).
    pub fn kernel_ids(&self) -> Result<Vec<String>, ScratchError> {
        let entries = match fs::read_dir(&self.root) {
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            other => other.map_err(io_error("list", &self.root))?,
        };
        let mut ids = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_error("list", &self.root))?;
            let is_dir = entry.file_type().map(|ty| ty.is_dir()).unwrap_or(false);
            if let (true, Some(name)) = (is_dir, entry.file_name().to_str()) {
                ids.push(name.to_string());
            }
        }
        ids.sort();
        Ok(ids)
    }
}

/// A kernel id must be one plain path component: not empty, `.` or `..`, no `/` or NUL,
/// at most 255 bytes.
pub fn validate_kernel_id(kernel_id: &str) -> Result<(), ScratchError> {
    let bad = |reason| Err(ScratchError::BadKernelId { kernel_id: kernel_id.to_string(), reason });
    if kernel_id.is_empty() {
        return bad("it is empty");
    }
    if kernel_id == "." || kernel_id == ".." {
        return bad("it is `.` or `..`");
    }
    if kernel_id.contains('/') {
        return bad("it holds `/`");
    }
    if kernel_id.contains('\0') {
        return bad("it holds NUL");
    }
    if kernel_id.len() > 255 {
        return bad("it is longer than 255 bytes");
    }
    Ok(())
}

/// `environ.txt`'s text, refusing names that are not environment variable names and values
/// that would break the line format.
fn environ_txt(environ: &[(String, String)]) -> Result<String, ScratchError> {
    let mut text = String::new();
    let mut seen = std::collections::HashSet::new();
    for (key, value) in environ {
        let mut chars = key.chars();
        let valid = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(ScratchError::BadEnvKey { key: key.clone() });
        }
        if value.contains(['\n', '\r', '\0']) {
            return Err(ScratchError::BadEnvValue { key: key.clone() });
        }
        if !seen.insert(key.as_str()) {
            return Err(ScratchError::DuplicateEnvKey { key: key.clone() });
        }
        text.push_str(&format!("{key}={value}\n"));
    }
    Ok(text)
}

/// Creates `path` if needed (refusing a non-directory in its place) and sets mode 0755.
fn make_dir(path: &Path) -> Result<(), ScratchError> {
    match fs::create_dir(path) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
            let meta = fs::symlink_metadata(path).map_err(io_error("inspect", path))?;
            if !meta.is_dir() {
                return Err(ScratchError::NotADirectory { path: path.to_path_buf() });
            }
        }
        Err(err) => return Err(io_error("create", path)(err)),
    }
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).map_err(io_error("chmod", path))
}

/// Writes a config file (0644) whole, through a temporary file renamed over it.
fn write_file(path: &Path, data: &[u8]) -> Result<(), ScratchError> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    fs::write(&tmp, data).map_err(io_error("write", &tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).map_err(io_error("chmod", &tmp))?;
    fs::rename(&tmp, path).map_err(io_error("rename into place", path))
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Resolves a vfolder host path (symlinks included) and checks it lies strictly under
/// `root` (`container.mount-root`). A relative `host_path` is taken relative to `root`.
/// Both must exist. Returns the resolved path, which is what should be mounted.
pub fn resolve_under(root: &Path, host_path: &Path) -> Result<PathBuf, ScratchError> {
    let resolved_root = root
        .canonicalize()
        .map_err(|source| ScratchError::MountRootUnresolvable { root: root.to_path_buf(), source })?;
    let joined = if host_path.is_absolute() { host_path.to_path_buf() } else { root.join(host_path) };
    let resolved = joined
        .canonicalize()
        .map_err(|source| ScratchError::MountPathUnresolvable { path: host_path.to_path_buf(), source })?;
    let strictly_under = resolved.starts_with(&resolved_root)
        && resolved.components().count() > resolved_root.components().count()
        && !resolved.components().any(|c| matches!(c, Component::ParentDir));
    if !strictly_under {
        return Err(ScratchError::MountPathEscapes {
            path: host_path.to_path_buf(),
            resolved,
            root: root.to_path_buf(),
        });
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::resources::{Allocation, ResourceSlots, SlotAmount};

    fn spec() -> KernelResourceSpec {
        let slots: ResourceSlots =
            [("cpu", SlotAmount::from_u64(1)), ("mem", SlotAmount::from_u64(1 << 30))].into_iter().collect();
        KernelResourceSpec::for_allocation(&Allocation {
            cpuset: vec![1],
            mem_bytes: 1 << 30,
            slots,
            devices: Default::default(),
        })
    }

    fn contents() -> ScratchContents {
        let mut contents = ScratchContents::new(spec());
        contents.environ = vec![("LANG".into(), "C.UTF-8".into()), ("BACKENDAI_KERNEL_ID".into(), "k1".into())];
        contents
    }

    fn root() -> (tempfile::TempDir, ScratchRoot) {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = ScratchRoot::new(dir.path().join("scratches")).expect("absolute");
        (dir, root)
    }

    #[test]
    fn prepare_lays_out_work_and_config() {
        let (_dir, root) = root();
        let scratch = root.prepare("k1", &contents()).expect("prepared");
        assert_eq!(scratch.work, root.path().join("k1/work"));
        assert_eq!(scratch.config, root.path().join("k1/config"));
        for dir in [&scratch.work, &scratch.config] {
            assert_eq!(fs::metadata(dir).expect("exists").permissions().mode() & 0o777, 0o755, "{}", dir.display());
        }
        let environ = fs::read_to_string(scratch.environ_txt()).expect("environ.txt");
        assert_eq!(environ, "LANG=C.UTF-8\nBACKENDAI_KERNEL_ID=k1\n");
        assert_eq!(fs::read_to_string(scratch.config.join(ENVIRON_BASE_TXT)).expect("base"), environ);
        assert_eq!(scratch.read_resource_spec().expect("resource.txt"), spec());
        assert!(scratch.config.join(RESOURCE_BASE_TXT).is_file());
        let ports: serde_json::Value =
            serde_json::from_slice(&fs::read(scratch.intrinsic_ports_json()).expect("ports")).expect("JSON");
        assert_eq!(ports, serde_json::json!({"replin": 2000, "replout": 2001, "sshd": 2200, "ttyd": 7681}));
        let work_owner = fs::metadata(&scratch.work).expect("work");
        if running_as_root() {
            assert_eq!((work_owner.uid(), work_owner.gid()), (DEFAULT_KERNEL_UID, DEFAULT_KERNEL_GID));
        } else {
            // SAFETY: getuid has no preconditions.
            assert_eq!(work_owner.uid(), unsafe { libc::getuid() }, "no chown without root");
        }
    }

    #[test]
    fn prepare_again_keeps_work_files() {
        let (_dir, root) = root();
        let scratch = root.prepare("k1", &contents()).expect("prepared");
        fs::write(scratch.work.join("notebook.ipynb"), "{}").expect("user file");
        let mut again = contents();
        again.intrinsic_ports.replin = 3000;
        let scratch = root.prepare("k1", &again).expect("prepared again");
        assert!(scratch.work.join("notebook.ipynb").is_file());
        assert!(fs::read_to_string(scratch.intrinsic_ports_json()).expect("ports").contains("3000"));
    }

    #[test]
    fn existing_finds_it_and_remove_is_idempotent() {
        let (_dir, root) = root();
        assert_eq!(root.existing("k1").expect("lookup"), None);
        let scratch = root.prepare("k1", &contents()).expect("prepared");
        assert_eq!(root.existing("k1").expect("lookup"), Some(scratch.clone()));
        assert_eq!(root.kernel_ids().expect("list"), vec!["k1".to_string()]);
        scratch.record_container_id("c0ffee").expect("CID");
        assert_eq!(scratch.read_resource_spec().expect("read").container_id.as_deref(), Some("c0ffee"));
        root.remove("k1").expect("removed");
        assert!(!scratch.dir.exists());
        root.remove("k1").expect("again");
        assert_eq!(root.existing("k1").expect("lookup"), None);
    }

    #[test]
    fn existing_reports_incomplete_directories() {
        let (_dir, root) = root();
        fs::create_dir_all(root.path().join("k2/work")).expect("mkdir");
        let err = root.existing("k2").expect_err("no config");
        assert!(err.to_string().contains("config/ is missing"), "{err}");
        fs::write(root.path().join("k3"), "").expect("file");
        assert!(matches!(root.existing("k3"), Err(ScratchError::NotADirectory { .. })));
    }

    #[test]
    fn remove_does_not_follow_a_symlink() {
        let (dir, root) = root();
        let victim = dir.path().join("victim");
        fs::create_dir_all(&victim).expect("mkdir");
        fs::write(victim.join("keep"), "x").expect("file");
        fs::create_dir_all(root.path()).expect("root");
        std::os::unix::fs::symlink(&victim, root.path().join("k4")).expect("symlink");
        assert!(matches!(root.existing("k4"), Err(ScratchError::NotADirectory { .. })));
        assert!(matches!(root.prepare("k4", &contents()), Err(ScratchError::NotADirectory { .. })));
        root.remove("k4").expect("removes the link");
        assert!(victim.join("keep").is_file());
        assert!(!root.path().join("k4").exists());
    }

    #[test]
    fn unsafe_kernel_ids_are_refused() {
        let (_dir, root) = root();
        let long = "a".repeat(256);
        for bad in ["", ".", "..", "../etc", "a/b", "nul\0", long.as_str()] {
            let err = root.prepare(bad, &contents()).expect_err("unsafe id");
            assert!(matches!(err, ScratchError::BadKernelId { .. }), "{bad:?}: {err}");
            assert!(err.to_string().contains("kernel id"), "{err}");
            assert!(root.remove(bad).is_err());
            assert!(root.existing(bad).is_err());
        }
        assert!(!root.path().exists(), "nothing was created");
        root.prepare(&"a".repeat(255), &contents()).expect("255 bytes is fine");
    }

    #[test]
    fn bad_environ_is_refused_before_anything_is_written() {
        let (_dir, root) = root();
        for (key, value) in
            [("1ABC", "x"), ("A-B", "x"), ("", "x"), ("A B", "x"), ("OK", "two\nlines"), ("OK", "nul\0")]
        {
            let mut contents = contents();
            contents.environ.push((key.into(), value.into()));
            let err = root.prepare("k1", &contents).expect_err("bad environ");
            assert!(matches!(err, ScratchError::BadEnvKey { .. } | ScratchError::BadEnvValue { .. }), "{err}");
        }
        let mut contents = contents();
        contents.environ.push(("LANG".into(), "C".into()));
        let err = root.prepare("k1", &contents).expect_err("twice");
        assert_eq!(err.to_string(), "environ.LANG: given twice");
        assert!(!root.path().join("k1").exists());
    }

    #[test]
    fn relative_roots_are_refused() {
        assert!(matches!(ScratchRoot::new("scratches"), Err(ScratchError::RelativeRoot { .. })));
    }

    #[test]
    fn vfolder_paths_must_stay_under_the_mount_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mount_root = dir.path().join("vfolders");
        let inside = mount_root.join("alice/data");
        fs::create_dir_all(&inside).expect("mkdir");
        let outside = dir.path().join("secret");
        fs::create_dir_all(&outside).expect("mkdir");
        std::os::unix::fs::symlink(&outside, mount_root.join("alice/escape")).expect("symlink");
        std::os::unix::fs::symlink(&inside, mount_root.join("alice/link")).expect("symlink");

        let resolved = resolve_under(&mount_root, &inside).expect("inside");
        assert_eq!(resolved, inside.canonicalize().expect("canonical"));
        assert_eq!(resolve_under(&mount_root, Path::new("alice/data")).expect("relative"), resolved);
        assert_eq!(resolve_under(&mount_root, &mount_root.join("alice/link")).expect("link inside"), resolved);

        let err = resolve_under(&mount_root, &mount_root.join("alice/escape")).expect_err("symlink escape");
        let message = err.to_string();
        assert!(message.contains("alice/escape") && message.contains("vfolders"), "{message}");
        assert!(matches!(err, ScratchError::MountPathEscapes { .. }));
        let err = resolve_under(&mount_root, &mount_root.join("alice/../../secret")).expect_err("dot-dot escape");
        assert!(matches!(err, ScratchError::MountPathEscapes { .. }), "{err}");
        let err = resolve_under(&mount_root, &mount_root).expect_err("the root itself");
        assert!(matches!(err, ScratchError::MountPathEscapes { .. }), "{err}");
        fs::create_dir_all(dir.path().join("vfolders-evil")).expect("mkdir");
        let err = resolve_under(&mount_root, &dir.path().join("vfolders-evil")).expect_err("prefix trick");
        assert!(matches!(err, ScratchError::MountPathEscapes { .. }), "{err}");
        let err = resolve_under(&mount_root, &mount_root.join("nobody")).expect_err("missing");
        assert!(err.to_string().contains("nobody"), "{err}");
        let err = resolve_under(&dir.path().join("nowhere"), &inside).expect_err("missing root");
        assert!(matches!(err, ScratchError::MountRootUnresolvable { .. }), "{err}");
    }
}
