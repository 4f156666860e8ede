//! The watcher's mounts: mount points only directly under the mount root (a name that escapes
//! it, by `..` or a symlink, is refused by name), `mount`/`umount` run as commands, and fstab
//! lines added and removed.

use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mount name `{name}`: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("`{command}` failed: {output}")]
    Command { command: String, output: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// The mount point for `name`: one plain component directly under `root`, never a symlink
/// out of it.
pub fn mount_point(root: &Path, name: &str) -> Result<PathBuf, MountError> {
    let invalid = |reason: &str| MountError::InvalidName { name: name.to_owned(), reason: reason.to_owned() };
    let mut components = Path::new(name).components();
    let single = match (components.next(), components.next()) {
        (Some(Component::Normal(part)), None) => part.to_owned(),
        _ => return Err(invalid(&format!("must be one directory name under {}", root.display()))),
    };
    let point = root.join(single);
    if let Ok(meta) = std::fs::symlink_metadata(&point)
        && meta.file_type().is_symlink()
    {
        return Err(invalid(&format!("{} is a symlink", point.display())));
    }
    Ok(point)
}

/// The mount points directly under `root`, sorted.
pub fn list(root: &Path) -> Result<Vec<String>, MountError> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|source| MountError::Io { path: "/proc/self/mountinfo".into(), source })?;
    let mut points: Vec<String> = mounts
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .map(crate::monitor::cgroup::unescape_mount_path)
        .filter(|point| point.parent() == Some(root))
        .map(|point| point.display().to_string())
        .collect();
    points.sort();
    points.dedup();
    Ok(points)
}

/// Runs a command, failing with its output when it fails.
pub async fn run(argv: &[String]) -> Result<String, MountError> {
    let command = argv.join(" ");
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| MountError::Command { command: command.clone(), output: "no command configured".into() })?;
    let out = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .map_err(|err| MountError::Command { command: command.clone(), output: err.to_string() })?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(MountError::Command { command, output: text.trim().to_owned() })
    }
}

/// Adds `source point type options 0 0` to the fstab unless the mount point has a line.
pub fn fstab_add(fstab: &Path, source: &str, point: &Path, fs_type: &str, options: &str) -> Result<(), MountError> {
    let io = |source| MountError::Io { path: fstab.to_path_buf(), source };
    let text = std::fs::read_to_string(fstab).or_else(|err| match err.kind() {
        std::io::ErrorKind::NotFound => Ok(String::new()),
        _ => Err(err),
    });
    let mut text = text.map_err(io)?;
    let point_text = point.display().to_string();
    if text.lines().any(|line| line.split_whitespace().nth(1) == Some(point_text.as_str())) {
        return Ok(());
    }
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    let options = if options.trim().is_empty() { "defaults" } else { options.trim() };
    text.push_str(&format!("{source} {point_text} {fs_type} {options} 0 0\n"));
    std::fs::write(fstab, text).map_err(io)
}

/// Removes the fstab lines of a mount point.
pub fn fstab_remove(fstab: &Path, point: &Path) -> Result<(), MountError> {
    let io = |source| MountError::Io { path: fstab.to_path_buf(), source };
    let text = std::fs::read_to_string(fstab).map_err(io)?;
    let point_text = point.display().to_string();
    let kept: Vec<&str> =
        text.lines().filter(|line| line.split_whitespace().nth(1) != Some(point_text.as_str())).collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    std::fs::write(fstab, out).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_plain_name_under_the_root_is_a_mount_point() {
        let root = tempfile::tempdir().expect("tempdir");
        assert_eq!(mount_point(root.path(), "nfs1").expect("plain"), root.path().join("nfs1"));
        for bad in ["../etc", "a/b", "/abs", "..", ".", ""] {
            let err = mount_point(root.path(), bad).expect_err(bad).to_string();
            assert!(err.contains(&format!("`{bad}`")), "{bad}: {err}");
        }
        std::os::unix::fs::symlink("/etc", root.path().join("link")).expect("symlink");
        assert!(mount_point(root.path(), "link").is_err(), "a symlink out of the root");
    }

    #[test]
    fn fstab_lines_are_added_once_and_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fstab = dir.path().join("fstab");
        std::fs::write(&fstab, "# static\n/dev/sda1 / ext4 defaults 0 1").expect("fstab");
        let point = Path::new("/mnt/vf1");
        fstab_add(&fstab, "nas:/vol", point, "nfs", "").expect("add");
        fstab_add(&fstab, "nas:/vol", point, "nfs", "").expect("add again");
        let text = std::fs::read_to_string(&fstab).expect("read");
        assert_eq!(text.matches("/mnt/vf1").count(), 1, "{text}");
        assert!(text.contains("nas:/vol /mnt/vf1 nfs defaults 0 0"), "{text}");
        fstab_remove(&fstab, point).expect("remove");
        assert_eq!(std::fs::read_to_string(&fstab).expect("read"), "# static\n/dev/sda1 / ext4 defaults 0 1\n");
    }
}
