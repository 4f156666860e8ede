//! File operations on a kernel's `/home/work`, done on the host: the RPC methods
//! `upload_file`, `download_file`, `download_single` and `list_files` act on the bind-mounted
//! host directory `{scratch-root}/{kernel_id}/work` instead of going through the container.
//!
//! A user path is relative to `/home/work` or absolute under it (`"a/b.txt"`,
//! `"/home/work/a/b.txt"`), normalized lexically first as Backend.AI does. The host path is
//! then walked one component at a time from a descriptor of the work directory
//! (`openat` with `O_NOFOLLOW`), never by a path string, so a process inside the container
//! cannot swap a directory for a symlink between a check and the use. Symlinks met on the
//! way are followed as the container would see them (absolute targets are container paths
//! and must lie under `/home/work`); a walk that leaves `/home/work` by a symlink or `..` is
//! refused with [`FileError::Escapes`]. The agent runs as root, so this is what stands
//! between a kernel's user and the host's files.
//!
//! Everything here blocks; async callers run it on `spawn_blocking`.

use std::{
    collections::VecDeque,
    ffi::{CStr, CString, OsString},
    fs::File,
    io::{self, Read, Write},
    mem::MaybeUninit,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd},
        unix::{
            ffi::{OsStrExt, OsStringExt},
            fs::{OpenOptionsExt, PermissionsExt},
        },
    },
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
};

use rmpv::Value;
use serde::Serialize;

/// Where the work directory is mounted inside every kernel.
pub const CONTAINER_WORK_DIR: &str = "/home/work";
/// The most bytes one download (a file, or a whole tar archive) and one listing may carry.
pub const MAX_TRANSFER_BYTES: u64 = 64 * 1024 * 1024;
/// Symlinks followed while resolving one path (Linux's own limit).
const MAX_SYMLINK_HOPS: u32 = 40;
/// Directory levels below `/home/work` a path or an archived tree may go (each open level
/// holds a descriptor).
pub const MAX_DEPTH: usize = 128;
/// Mode of uploaded files that replace nothing, and of directories made for them.
const NEW_FILE_MODE: u32 = 0o644;
const NEW_DIR_MODE: u32 = 0o755;

/// Why a kernel file operation was refused or failed. `path` is always the path as the
/// caller gave it.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("path `{path}` escapes {CONTAINER_WORK_DIR}")]
    Escapes { path: String },
    #[error("path `{path}` is not valid: {reason}")]
    Invalid { path: String, reason: &'static str },
    #[error("path `{path}` does not exist in {CONTAINER_WORK_DIR}")]
    NotFound { path: String },
    #[error("path `{path}` is a directory")]
    IsADirectory { path: String },
    #[error("path `{path}`: a component of it is not a directory")]
    NotADirectory { path: String },
    #[error("path `{path}` is a symbolic link; refusing to write through it")]
    Symlink { path: String },
    #[error("path `{path}` is not a regular file")]
    NotARegularFile { path: String },
    #[error("path `{path}`: too many levels of symbolic links")]
    SymlinkLoop { path: String },
    #[error("path `{path}` goes deeper than {MAX_DEPTH} directory levels")]
    TooDeep { path: String },
    #[error("path `{path}` is too large: the limit is {limit} bytes ({} MiB)", limit / (1024 * 1024))]
    TooLarge { path: String, limit: u64 },
    #[error("cannot {action} `{path}`: {source}")]
    Io { action: &'static str, path: String, source: io::Error },
}

impl FileError {
    /// The Python exception a Backend.AI agent raises in the same situation (for FAILURE
    /// replies).
    pub fn exception_name(&self) -> &'static str {
        match self {
            FileError::Escapes { .. } => "PermissionError",
            FileError::NotFound { .. } => "FileNotFoundError",
            FileError::IsADirectory { .. } => "IsADirectoryError",
            FileError::NotADirectory { .. } => "NotADirectoryError",
            FileError::Invalid { .. } | FileError::TooLarge { .. } | FileError::NotARegularFile { .. } => "ValueError",
            FileError::Symlink { .. } | FileError::SymlinkLoop { .. } | FileError::TooDeep { .. } => "OSError",
            FileError::Io { .. } => "RuntimeError",
        }
    }
}

/// Writes `data` to `filename` under the work directory `work`, creating missing parent
/// directories. The file is written to a temporary name beside it and renamed into place,
/// so readers see the old content or the new, never a part. A symlink at the target is
/// refused, not followed. New files and directories get the owner of `work` (when the agent
/// runs as root); a replaced file keeps its permission bits.
pub fn upload(work: &Path, filename: &str, data: &[u8]) -> Result<(), FileError> {
    let err = Errors(filename);
    let owner = if is_root() {
        let meta = std::fs::metadata(work).map_err(err.io("read the owner of the work directory"))?;
        Some((std::os::unix::fs::MetadataExt::uid(&meta), std::os::unix::fs::MetadataExt::gid(&meta)))
    } else {
        None
    };
    let target = resolve(work, filename, Resolve { follow_final: false, make_parents: true, owner })?;
    let Some(name) = target.name else {
        return Err(err.is_a_directory());
    };
    let (mut mode, mut owner) = (NEW_FILE_MODE, owner);
    if let Some(stat) = &target.stat {
        match stat.st_mode & libc::S_IFMT {
            libc::S_IFREG => {
                mode = stat.st_mode & 0o7777;
                owner = owner.map(|_| (stat.st_uid, stat.st_gid));
            }
            libc::S_IFLNK => return Err(FileError::Symlink { path: filename.to_owned() }),
            libc::S_IFDIR => return Err(err.is_a_directory()),
            _ => return Err(FileError::NotARegularFile { path: filename.to_owned() }),
        }
    }
    let temp = temp_name();
    let fd =
        open_at(target.dir.as_fd(), &temp, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW, 0o600)
            .map_err(err.io("create a temporary file for"))?;
    let written = (|| {
        let mut file = File::from(fd);
        file.write_all(data)?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
        }
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        rename_at(target.dir.as_fd(), &temp, &name)
    })();
    if let Err(source) = written {
        let _ = unlink_at(target.dir.as_fd(), &temp);
        return Err(FileError::Io { action: "write", path: filename.to_owned(), source });
    }
    Ok(())
}

/// A tar archive of the file or directory (recursively) at `path`, named relative to its
/// parent as `docker cp` names them (`a/b` gives `b`, `b/x`, …; `/home/work` itself gives
/// `work`, …). Directories, regular files and symlinks (as links, not followed) are
/// archived; sockets, fifos and devices are left out. At most [`MAX_TRANSFER_BYTES`].
pub fn download_tar(work: &Path, path: &str) -> Result<Vec<u8>, FileError> {
    let err = Errors(path);
    let target = resolve(work, path, Resolve::READ)?;
    let label = archive_name(path)?;
    let mut archive = Archive { path, builder: tar::Builder::new(Vec::new()) };
    match (&target.name, &target.stat) {
        (None, _) => {
            let stat = fstat(target.dir.as_fd()).map_err(err.io("read"))?;
            archive.directory(target.dir, &stat, label, 0)?;
        }
        (Some(_), None) => return Err(err.not_found()),
        (Some(name), Some(stat)) => match stat.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                let dir = open_dir_at(target.dir.as_fd(), name).map_err(err.io("open"))?;
                archive.directory(dir, stat, label, 0)?;
            }
            libc::S_IFREG => archive.file(target.dir.as_fd(), name, label)?,
            _ => return Err(FileError::NotARegularFile { path: path.to_owned() }),
        },
    }
    let bytes = archive.builder.into_inner().map_err(err.io("archive"))?;
    if bytes.len() as u64 > MAX_TRANSFER_BYTES {
        return Err(err.too_large());
    }
    Ok(bytes)
}

/// The bytes of the regular file at `path` (a directory is an error), at most
/// [`MAX_TRANSFER_BYTES`].
pub fn download_single(work: &Path, path: &str) -> Result<Vec<u8>, FileError> {
    let err = Errors(path);
    let target = resolve(work, path, Resolve::READ)?;
    match (&target.name, &target.stat) {
        (None, _) => Err(err.is_a_directory()),
        (Some(_), None) => Err(err.not_found()),
        (Some(_), Some(stat)) if stat.st_mode & libc::S_IFMT == libc::S_IFDIR => Err(err.is_a_directory()),
        (Some(name), Some(_)) => read_regular(target.dir.as_fd(), name, path).map(|(data, _)| data),
    }
}

/// One entry of a listing, as Backend.AI's `list_files` reports it (`os.scandir` with
/// `stat(follow_symlinks=False)`).
#[derive(Debug, Clone, PartialEq)]
pub struct FileEntry {
    pub filename: OsString,
    /// `stat.filemode()`: `-rw-r--r--`, `drwxr-xr-x`, `lrwxrwxrwx`, …
    pub mode: String,
    pub size: u64,
    /// Seconds since the epoch, with fractions (Python's `st_ctime` etc.).
    pub ctime: f64,
    pub mtime: f64,
    pub atime: f64,
}

/// The result of `list_files`, in Backend.AI's shape: `files` is the JSON text the Python
/// agent's in-container script prints (a list of `{mode, size, ctime, mtime, atime,
/// filename}`, newline-terminated; empty when listing failed), `errors` what it wrote to
/// stderr (empty on success), `abspath` the path as the caller gave it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FileList {
    pub files: String,
    pub errors: String,
    pub abspath: String,
    #[serde(skip)]
    pub entries: Vec<FileEntry>,
}

impl FileList {
    /// The RPC reply: `{"files": str, "errors": str, "abspath": str}`.
    pub fn to_value(&self) -> Value {
        Value::Map(vec![
            (Value::from("files"), Value::from(self.files.as_str())),
            (Value::from("errors"), Value::from(self.errors.as_str())),
            (Value::from("abspath"), Value::from(self.abspath.as_str())),
        ])
    }
}

/// Lists the directory at `path` (entries sorted by name). A path outside `/home/work` is
/// an error, as in Backend.AI; a missing path or a non-directory is reported in `errors`
/// with the `files` text empty, as Backend.AI's in-container script reports it.
pub fn list(work: &Path, path: &str) -> Result<FileList, FileError> {
    let container_path = container_path(path)?;
    let result = |files: String, errors: String, entries| FileList { files, errors, abspath: path.to_owned(), entries };
    let python_error = |name: &str, errno: i32, text: &str| {
        result(String::new(), format!("{name}: [Errno {errno}] {text}: {}\n", python_str(&container_path)), Vec::new())
    };
    let err = Errors(path);
    let target = match resolve(work, path, Resolve::READ) {
        Ok(target) => target,
        Err(FileError::NotFound { .. }) => {
            return Ok(python_error("FileNotFoundError", libc::ENOENT, "No such file or directory"));
        }
        Err(FileError::NotADirectory { .. }) => {
            return Ok(python_error("NotADirectoryError", libc::ENOTDIR, "Not a directory"));
        }
        Err(FileError::SymlinkLoop { .. }) => {
            return Ok(python_error("OSError", libc::ELOOP, "Too many levels of symbolic links"));
        }
        Err(other) => return Err(other),
    };
    let dir = match (&target.name, &target.stat) {
        (None, _) => target.dir,
        (Some(_), None) => return Ok(python_error("FileNotFoundError", libc::ENOENT, "No such file or directory")),
        (Some(name), Some(stat)) if stat.st_mode & libc::S_IFMT == libc::S_IFDIR => {
            open_dir_at(target.dir.as_fd(), name).map_err(err.io("open"))?
        }
        (Some(_), Some(_)) => return Ok(python_error("NotADirectoryError", libc::ENOTDIR, "Not a directory")),
    };
    let mut entries = Vec::new();
    let mut json_len = 0u64;
    for name in read_dir_names(dir.as_fd()).map_err(err.io("list"))? {
        let Ok(cname) = CString::new(name.as_bytes()) else { continue };
        // An entry removed since it was listed is left out.
        let Ok(stat) = lstat_at(dir.as_fd(), &cname) else { continue };
        json_len += 128 + name.len() as u64 * 6;
        if json_len > MAX_TRANSFER_BYTES {
            return Err(err.too_large());
        }
        entries.push(FileEntry {
            mode: filemode(stat.st_mode),
            size: u64::try_from(stat.st_size).unwrap_or(0),
            ctime: timestamp(stat.st_ctime, stat.st_ctime_nsec),
            mtime: timestamp(stat.st_mtime, stat.st_mtime_nsec),
            atime: timestamp(stat.st_atime, stat.st_atime_nsec),
            filename: name,
        });
    }
    let files = python_json(&entries);
    Ok(result(files, String::new(), entries))
}

/// The normalized absolute container path of `path` (`"a/../b"` → `"/home/work/b"`), or
/// [`FileError::Escapes`] when it is not under `/home/work`.
pub fn container_path(path: &str) -> Result<String, FileError> {
    let components = relative_components(path)?;
    let mut text = String::from(CONTAINER_WORK_DIR);
    for component in components {
        text.push('/');
        text.push_str(&component.to_string_lossy());
    }
    Ok(text)
}

/// `path`'s components below `/home/work`, after `os.path.normpath(/home/work / path)`.
fn relative_components(path: &str) -> Result<Vec<OsString>, FileError> {
    if path.contains('\0') {
        return Err(FileError::Invalid { path: path.to_owned(), reason: "it holds a NUL byte" });
    }
    let joined = if path.starts_with('/') { path.to_owned() } else { format!("{CONTAINER_WORK_DIR}/{path}") };
    let mut normal: Vec<&str> = Vec::new();
    for part in joined.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                normal.pop();
            }
            other => normal.push(other),
        }
    }
    match normal.as_slice() {
        ["home", "work", rest @ ..] => Ok(rest.iter().map(OsString::from).collect()),
        _ => Err(FileError::Escapes { path: path.to_owned() }),
    }
}

/// The name an archive of `path` starts with: its last component, `work` for `/home/work`.
fn archive_name(path: &str) -> Result<OsString, FileError> {
    Ok(relative_components(path)?.pop().unwrap_or_else(|| OsString::from("work")))
}

/// How [`resolve`] treats the last component and missing directories.
#[derive(Clone, Copy)]
struct Resolve {
    /// Follow a symlink in the last component (reads) or report it (writes).
    follow_final: bool,
    /// Make missing directories on the way (uploads).
    make_parents: bool,
    /// Owner for directories it makes.
    owner: Option<(u32, u32)>,
}

impl Resolve {
    const READ: Resolve = Resolve { follow_final: true, make_parents: false, owner: None };
}

/// Where a path landed: the directory holding it and its name there (`None`: the directory
/// itself is the target), with the `lstat` of that name when it exists.
struct Target {
    dir: OwnedFd,
    name: Option<CString>,
    stat: Option<libc::stat>,
}

/// Walks `path` from the work directory one component at a time, as described in the
/// module documentation.
fn resolve(work: &Path, path: &str, how: Resolve) -> Result<Target, FileError> {
    let err = Errors(path);
    let mut pending: VecDeque<OsString> = relative_components(path)?.into();
    let root = File::options()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(work)
        .map_err(|source| FileError::Io { action: "open the work directory for", path: path.to_owned(), source })?;
    // stack[0] is /home/work; each further entry the directory below the previous one.
    let mut stack: Vec<OwnedFd> = vec![root.into()];
    let mut hops = 0u32;
    while let Some(component) = pending.pop_front() {
        let dir = stack.last().expect("the stack always holds the work directory").as_fd();
        match component.as_bytes() {
            b"" | b"." => continue,
            b".." => {
                if stack.len() == 1 {
                    return Err(FileError::Escapes { path: path.to_owned() });
                }
                stack.pop();
                continue;
            }
            _ => {}
        }
        let last = pending.iter().all(|c| c.as_bytes() == b"." || c.as_bytes().is_empty());
        let name = CString::new(component.as_bytes())
            .map_err(|_| FileError::Invalid { path: path.to_owned(), reason: "it holds a NUL byte" })?;
        let stat = match lstat_at(dir, &name) {
            Ok(stat) => stat,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                if last {
                    let dir = stack.pop().expect("non-empty");
                    return Ok(Target { dir, name: Some(name), stat: None });
                }
                if !how.make_parents {
                    return Err(err.not_found());
                }
                hops += 1;
                if hops > MAX_SYMLINK_HOPS * 4 {
                    return Err(FileError::Io {
                        action: "create the directories of",
                        path: path.to_owned(),
                        source: io::Error::other("the directory kept changing"),
                    });
                }
                match mkdir_at(dir, &name, NEW_DIR_MODE) {
                    Ok(()) => {
                        if let Some((uid, gid)) = how.owner {
                            let made = open_dir_at(dir, &name).map_err(err.io("open the new directory in"))?;
                            std::os::unix::fs::fchown(&made, Some(uid), Some(gid))
                                .map_err(err.io("set the owner of a directory made for"))?;
                        }
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                    Err(source) => {
                        return Err(FileError::Io { action: "create a directory for", path: path.into(), source });
                    }
                }
                pending.push_front(component);
                continue;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => return Err(err.not_a_directory()),
            Err(source) => return Err(FileError::Io { action: "look up", path: path.to_owned(), source }),
        };
        match stat.st_mode & libc::S_IFMT {
            libc::S_IFLNK if last && !how.follow_final => {
                let dir = stack.pop().expect("non-empty");
                return Ok(Target { dir, name: Some(name), stat: Some(stat) });
            }
            libc::S_IFLNK => {
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    return Err(FileError::SymlinkLoop { path: path.to_owned() });
                }
                let link = read_link_at(dir, &name).map_err(err.io("read the symlink in"))?;
                let link = link.as_bytes();
                let parts: Vec<&[u8]> = link.split(|&b| b == b'/').filter(|p| !p.is_empty() && *p != b".").collect();
                let relative = if link.starts_with(b"/") {
                    // A container path: it must stay under /home/work. Its `..` parts are
                    // walked physically below, as the kernel walks them.
                    let [b"home", b"work", rest @ ..] = parts.as_slice() else {
                        return Err(FileError::Escapes { path: path.to_owned() });
                    };
                    stack.truncate(1);
                    rest
                } else {
                    parts.as_slice()
                };
                for part in relative.iter().rev() {
                    pending.push_front(OsString::from_vec(part.to_vec()));
                }
            }
            libc::S_IFDIR if last => {
                let dir = stack.pop().expect("non-empty");
                return Ok(Target { dir, name: Some(name), stat: Some(stat) });
            }
            libc::S_IFDIR => {
                if stack.len() > MAX_DEPTH {
                    return Err(FileError::TooDeep { path: path.to_owned() });
                }
                let next = open_dir_at(dir, &name).map_err(|source| match source.raw_os_error() {
                    // It became a symlink or a file since the lookup: look again.
                    Some(libc::ELOOP) | Some(libc::ENOTDIR) => FileError::Io {
                        action: "open",
                        path: path.to_owned(),
                        source: io::Error::other("a directory on the way changed while it was opened"),
                    },
                    _ => FileError::Io { action: "open a directory of", path: path.to_owned(), source },
                })?;
                stack.push(next);
            }
            _ if last => {
                let dir = stack.pop().expect("non-empty");
                return Ok(Target { dir, name: Some(name), stat: Some(stat) });
            }
            _ => return Err(err.not_a_directory()),
        }
    }
    // Every component was consumed by directories: the target is the directory on top.
    let dir = stack.pop().expect("non-empty");
    Ok(Target { dir, name: None, stat: None })
}

/// Builds a `docker cp`-style archive, bounded by [`MAX_TRANSFER_BYTES`].
struct Archive<'a> {
    path: &'a str,
    builder: tar::Builder<Vec<u8>>,
}

impl Archive<'_> {
    fn header(stat: &libc::stat, kind: tar::EntryType) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(stat.st_mode & 0o7777);
        header.set_uid(u64::from(stat.st_uid));
        header.set_gid(u64::from(stat.st_gid));
        header.set_mtime(u64::try_from(stat.st_mtime).unwrap_or(0));
        header.set_size(0);
        header
    }

    /// Fails once the archive would pass the cap with `more` bytes added.
    fn reserve(&self, more: u64) -> Result<(), FileError> {
        // Each entry adds a header, maybe a long-name entry, and the archive ends in 1 KiB.
        let used = self.builder.get_ref().len() as u64;
        if used + more + 3 * 512 > MAX_TRANSFER_BYTES {
            return Err(Errors(self.path).too_large());
        }
        Ok(())
    }

    fn io(&self, action: &'static str) -> impl FnOnce(io::Error) -> FileError + use<'_> {
        Errors(self.path).io(action)
    }

    fn file(&mut self, dir: BorrowedFd<'_>, name: &CStr, entry: OsString) -> Result<(), FileError> {
        let (data, stat) = read_regular(dir, name, self.path)?;
        self.reserve(data.len() as u64 + entry.len() as u64)?;
        let mut header = Self::header(&stat, tar::EntryType::Regular);
        header.set_size(data.len() as u64);
        self.builder.append_data(&mut header, Path::new(&entry), data.as_slice()).map_err(self.io("archive"))
    }

    fn directory(&mut self, dir: OwnedFd, stat: &libc::stat, entry: OsString, depth: usize) -> Result<(), FileError> {
        if depth > MAX_DEPTH {
            return Err(FileError::TooDeep { path: self.path.to_owned() });
        }
        self.reserve(entry.len() as u64)?;
        let mut header = Self::header(stat, tar::EntryType::Directory);
        let mut dir_entry = entry.clone();
        dir_entry.push("/");
        self.builder.append_data(&mut header, Path::new(&dir_entry), io::empty()).map_err(self.io("archive"))?;
        let names = read_dir_names(dir.as_fd()).map_err(self.io("list"))?;
        self.reserve(names.len() as u64 * 512)?;
        for name in names {
            let Ok(cname) = CString::new(name.as_bytes()) else { continue };
            // An entry removed since it was listed is left out.
            let Ok(stat) = lstat_at(dir.as_fd(), &cname) else { continue };
            let child = Path::new(&entry).join(&name).into_os_string();
            match stat.st_mode & libc::S_IFMT {
                libc::S_IFDIR => match open_dir_at(dir.as_fd(), &cname) {
                    Ok(sub) => self.directory(sub, &stat, child, depth + 1)?,
                    Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ELOOP | libc::ENOTDIR)) => {}
                    Err(source) => return Err(FileError::Io { action: "open", path: self.path.to_owned(), source }),
                },
                libc::S_IFREG => {
                    self.reserve(u64::try_from(stat.st_size).unwrap_or(0))?;
                    match self.file(dir.as_fd(), &cname, child) {
                        // Removed or replaced since it was listed: left out.
                        Err(FileError::NotFound { .. } | FileError::NotARegularFile { .. }) => {}
                        other => other?,
                    }
                }
                libc::S_IFLNK => {
                    let Ok(target) = read_link_at(dir.as_fd(), &cname) else { continue };
                    self.reserve(child.len() as u64 + target.len() as u64)?;
                    let mut header = Self::header(&stat, tar::EntryType::Symlink);
                    self.builder
                        .append_link(&mut header, Path::new(&child), Path::new(&target))
                        .map_err(self.io("archive"))?;
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Reads the regular file `name` in `dir` without following a symlink and without blocking
/// on a fifo, at most [`MAX_TRANSFER_BYTES`].
fn read_regular(dir: BorrowedFd<'_>, name: &CStr, path: &str) -> Result<(Vec<u8>, libc::stat), FileError> {
    let err = Errors(path);
    let fd = match open_at(dir, name, libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY, 0) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Err(err.not_found()),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(FileError::NotARegularFile { path: path.to_owned() });
        }
        Err(source) => return Err(FileError::Io { action: "open", path: path.to_owned(), source }),
    };
    let stat = fstat(fd.as_fd()).map_err(err.io("read"))?;
    match stat.st_mode & libc::S_IFMT {
        libc::S_IFREG => {}
        libc::S_IFDIR => return Err(err.is_a_directory()),
        _ => return Err(FileError::NotARegularFile { path: path.to_owned() }),
    }
    if u64::try_from(stat.st_size).unwrap_or(0) > MAX_TRANSFER_BYTES {
        return Err(err.too_large());
    }
    let mut data = Vec::with_capacity(usize::try_from(stat.st_size).unwrap_or(0));
    File::from(fd).take(MAX_TRANSFER_BYTES + 1).read_to_end(&mut data).map_err(err.io("read"))?;
    if data.len() as u64 > MAX_TRANSFER_BYTES {
        return Err(err.too_large());
    }
    Ok((data, stat))
}

/// Error constructors for one caller-given path.
#[derive(Clone, Copy)]
struct Errors<'a>(&'a str);

impl<'a> Errors<'a> {
    fn io(self, action: &'static str) -> impl FnOnce(io::Error) -> FileError + use<'a> {
        move |source| FileError::Io { action, path: self.0.to_owned(), source }
    }
    fn not_found(self) -> FileError {
        FileError::NotFound { path: self.0.to_owned() }
    }
    fn is_a_directory(self) -> FileError {
        FileError::IsADirectory { path: self.0.to_owned() }
    }
    fn not_a_directory(self) -> FileError {
        FileError::NotADirectory { path: self.0.to_owned() }
    }
    fn too_large(self) -> FileError {
        FileError::TooLarge { path: self.0.to_owned(), limit: MAX_TRANSFER_BYTES }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A name no other upload uses at the same time.
fn temp_name() -> CString {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let name = format!(".bai-upload-{}-{nanos}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
    CString::new(name).expect("no NUL in a formatted name")
}

// Thin wrappers over the *at system calls, all with O_CLOEXEC.

fn cvt(result: libc::c_int) -> io::Result<libc::c_int> {
    if result < 0 { Err(io::Error::last_os_error()) } else { Ok(result) }
}

fn open_at(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    // SAFETY: `name` is NUL-terminated and `dir` an open descriptor; on success the new
    // descriptor is ours alone.
    let fd = cvt(unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
    // SAFETY: `fd` was just returned by openat and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_dir_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    open_at(dir, name, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW, 0)
}

fn lstat_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<libc::stat> {
    let mut stat = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: valid descriptor, NUL-terminated name, and a buffer of the right type.
    cvt(unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), stat.as_mut_ptr(), libc::AT_SYMLINK_NOFOLLOW) })?;
    // SAFETY: fstatat succeeded, so it filled the buffer.
    Ok(unsafe { stat.assume_init() })
}

fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut stat = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: valid descriptor and a buffer of the right type.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), stat.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded, so it filled the buffer.
    Ok(unsafe { stat.assume_init() })
}

fn read_link_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<OsString> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: the buffer holds `buf.len()` bytes; readlinkat writes at most that many.
    let n = unsafe { libc::readlinkat(dir.as_raw_fd(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(OsString::from_vec(buf))
}

fn mkdir_at(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: valid descriptor and NUL-terminated name.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t) }).map(drop)
}

fn rename_at(dir: BorrowedFd<'_>, from: &CStr, to: &CStr) -> io::Result<()> {
    // SAFETY: valid descriptor and NUL-terminated names.
    cvt(unsafe { libc::renameat(dir.as_raw_fd(), from.as_ptr(), dir.as_raw_fd(), to.as_ptr()) }).map(drop)
}

fn unlink_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: valid descriptor and NUL-terminated name.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) }).map(drop)
}

/// The names in directory `dir` (without `.` and `..`), sorted.
fn read_dir_names(dir: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    // A descriptor of its own for the stream, which closedir closes.
    let fd = open_at(dir, c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?.into_raw_fd();
    // SAFETY: `fd` is an open directory descriptor we own; on success the stream owns it.
    let stream = unsafe { libc::fdopendir(fd) };
    if stream.is_null() {
        let error = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so `fd` is still ours to close.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
        return Err(error);
    }
    let mut names = Vec::new();
    let result = loop {
        // SAFETY: errno is thread-local; clearing it tells end-of-stream from an error.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `stream` is a live DIR*.
        let entry = unsafe { libc::readdir(stream) };
        if entry.is_null() {
            let error = io::Error::last_os_error();
            break if error.raw_os_error().unwrap_or(0) == 0 { Ok(()) } else { Err(error) };
        }
        // SAFETY: readdir returned a valid entry whose d_name is NUL-terminated.
        let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) }.to_bytes();
        if name != b"." && name != b".." {
            names.push(OsString::from_vec(name.to_vec()));
        }
    };
    // SAFETY: `stream` is live and closed exactly once.
    unsafe { libc::closedir(stream) };
    result?;
    names.sort();
    Ok(names)
}

/// Python's `st_*time` float: `sec + nsec * 1e-9`.
fn timestamp(sec: i64, nsec: i64) -> f64 {
    sec as f64 + nsec as f64 * 1e-9
}

/// Python's `stat.filemode()`.
pub fn filemode(mode: u32) -> String {
    let kind = match mode & libc::S_IFMT {
        libc::S_IFLNK => 'l',
        libc::S_IFSOCK => 's',
        libc::S_IFREG => '-',
        libc::S_IFBLK => 'b',
        libc::S_IFDIR => 'd',
        libc::S_IFCHR => 'c',
        libc::S_IFIFO => 'p',
        _ => '?',
    };
    let bit = |mask: u32, ch: char| if mode & mask != 0 { ch } else { '-' };
    let exec = |x: u32, special: u32, both: char, only_special: char| match (mode & x != 0, mode & special != 0) {
        (true, true) => both,
        (false, true) => only_special,
        (true, false) => 'x',
        (false, false) => '-',
    };
    [
        kind,
        bit(0o400, 'r'),
        bit(0o200, 'w'),
        exec(0o100, libc::S_ISUID, 's', 'S'),
        bit(0o040, 'r'),
        bit(0o020, 'w'),
        exec(0o010, libc::S_ISGID, 's', 'S'),
        bit(0o004, 'r'),
        bit(0o002, 'w'),
        exec(0o001, libc::S_ISVTX, 't', 'T'),
    ]
    .into_iter()
    .collect()
}

/// `json.dumps(files)` followed by print's newline, as the Python agent's script writes it:
/// `", "` and `": "` separators, ASCII-only escapes, undecodable name bytes as the lone
/// surrogates Python's file system encoding gives them.
fn python_json(entries: &[FileEntry]) -> String {
    let mut out = String::from("[");
    for (i, entry) in entries.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str("{\"mode\": ");
        json_str(&mut out, entry.mode.as_bytes());
        out.push_str(&format!(
            ", \"size\": {}, \"ctime\": {}, \"mtime\": {}, \"atime\": {}, \"filename\": ",
            entry.size,
            python_float(entry.ctime),
            python_float(entry.mtime),
            python_float(entry.atime)
        ));
        json_str(&mut out, entry.filename.as_bytes());
        out.push('}');
    }
    out.push_str("]\n");
    out
}

/// `repr(float)`: the shortest text that reads back the same, always with a fraction.
fn python_float(value: f64) -> String {
    serde_json::to_string(&value).unwrap_or_else(|_| "NaN".to_owned())
}

fn json_str(out: &mut String, bytes: &[u8]) {
    use std::fmt::Write as _;
    out.push('"');
    for chunk in bytes.utf8_chunks() {
        for ch in chunk.valid().chars() {
            match ch {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                ' '..='~' => out.push(ch),
                _ => {
                    let mut units = [0u16; 2];
                    for unit in ch.encode_utf16(&mut units) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
            }
        }
        for byte in chunk.invalid() {
            let _ = write!(out, "\\u{:04x}", 0xdc00 | u16::from(*byte));
        }
    }
    out.push('"');
}

/// `repr()` of a Python `str` (for error texts).
fn python_str(text: &str) -> String {
    let quote = if text.contains('\'') && !text.contains('"') { '"' } else { '\'' };
    let mut out = String::from(quote);
    for ch in text.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn work() -> (tempfile::TempDir, std::path::PathBuf) {
        let scratch = tempfile::tempdir().expect("tempdir");
        let work = scratch.path().join("work");
        std::fs::create_dir(&work).expect("work dir");
        (scratch, work)
    }

    fn entries(archive: &[u8]) -> Vec<(String, tar::EntryType, Vec<u8>)> {
        let mut reader = tar::Archive::new(archive);
        let mut out = Vec::new();
        for entry in reader.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            let name = entry.path().expect("path").to_string_lossy().into_owned();
            let kind = entry.header().entry_type();
            let mut data = Vec::new();
            if kind == tar::EntryType::Symlink {
                data = entry.link_name_bytes().expect("link").into_owned();
            } else {
                entry.read_to_end(&mut data).expect("data");
            }
            out.push((name, kind, data));
        }
        out
    }

    #[test]
    fn container_paths_are_normalized_and_confined() {
        assert_eq!(container_path("a/b.txt").unwrap(), "/home/work/a/b.txt");
        assert_eq!(container_path("/home/work/a/../b").unwrap(), "/home/work/b");
        assert_eq!(container_path("").unwrap(), "/home/work");
        assert_eq!(container_path(".").unwrap(), "/home/work");
        assert_eq!(container_path("../work/x").unwrap(), "/home/work/x");
        for bad in ["../../etc/passwd", "..", "/etc/passwd", "/home/worker/x", "/home", "a/../../x", "/home/work/../x"]
        {
            let err = container_path(bad).expect_err(bad);
            assert_eq!(err.to_string(), format!("path `{bad}` escapes /home/work"));
        }
        assert!(matches!(container_path("a\0b"), Err(FileError::Invalid { .. })));
    }

    #[test]
    fn upload_writes_files_and_makes_parents() {
        let (_scratch, work) = work();
        upload(&work, "a/b/c.txt", b"hello").expect("upload");
        assert_eq!(std::fs::read(work.join("a/b/c.txt")).unwrap(), b"hello");
        upload(&work, "/home/work/top.bin", &[0, 1, 2]).expect("absolute path");
        assert_eq!(std::fs::read(work.join("top.bin")).unwrap(), [0, 1, 2]);
        // Replacing keeps the file's permission bits and leaves no temporary file.
        std::fs::set_permissions(work.join("top.bin"), std::fs::Permissions::from_mode(0o600)).unwrap();
        upload(&work, "top.bin", b"new").expect("replace");
        assert_eq!(std::fs::read(work.join("top.bin")).unwrap(), b"new");
        let mode = std::fs::metadata(work.join("top.bin")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(&work).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        // Directories are not files.
        assert!(matches!(upload(&work, "a/b", b"x"), Err(FileError::IsADirectory { .. })));
        assert!(matches!(upload(&work, "/home/work", b"x"), Err(FileError::IsADirectory { .. })));
        assert!(matches!(upload(&work, "top.bin/x", b"x"), Err(FileError::NotADirectory { .. })));
    }

    #[test]
    fn upload_refuses_escapes_and_symlinks() {
        let (scratch, work) = work();
        let outside = scratch.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        for bad in ["../outside/x", "../../x", "/etc/bai-agent-test", "/home/work/../outside/x"] {
            let err = upload(&work, bad, b"x").expect_err(bad);
            assert_eq!(err.to_string(), format!("path `{bad}` escapes /home/work"));
        }
        // A symlinked directory pointing outside (by host path, or as a container path).
        symlink(&outside, work.join("out")).unwrap();
        symlink("/etc", work.join("etc")).unwrap();
        symlink("../outside", work.join("rel")).unwrap();
        for bad in ["out/x", "etc/x", "rel/x"] {
            let err = upload(&work, bad, b"x").expect_err(bad);
            assert!(matches!(err, FileError::Escapes { .. }), "{bad}: {err}");
        }
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        // A symlink as the target is not written through, even one pointing inside.
        std::fs::write(work.join("real.txt"), b"keep").unwrap();
        symlink("real.txt", work.join("link.txt")).unwrap();
        symlink(outside.join("f"), work.join("dangling")).unwrap();
        for link in ["link.txt", "dangling"] {
            let err = upload(&work, link, b"x").expect_err(link);
            assert_eq!(err.to_string(), format!("path `{link}` is a symbolic link; refusing to write through it"));
        }
        assert_eq!(std::fs::read(work.join("real.txt")).unwrap(), b"keep");
        assert!(!outside.join("f").exists());
        // Symlinked directories that stay inside are followed, as in the container.
        std::fs::create_dir(work.join("data")).unwrap();
        symlink("data", work.join("d1")).unwrap();
        symlink("/home/work/data", work.join("d2")).unwrap();
        upload(&work, "d1/x", b"1").expect("relative link inside");
        upload(&work, "d2/y", b"2").expect("container-absolute link inside");
        assert_eq!(std::fs::read(work.join("data/x")).unwrap(), b"1");
        assert_eq!(std::fs::read(work.join("data/y")).unwrap(), b"2");
    }

    #[test]
    fn download_single_reads_regular_files_only() {
        let (scratch, work) = work();
        std::fs::create_dir_all(work.join("a")).unwrap();
        std::fs::write(work.join("a/b.txt"), b"content").unwrap();
        assert_eq!(download_single(&work, "a/b.txt").unwrap(), b"content");
        assert_eq!(download_single(&work, "/home/work/a/b.txt").unwrap(), b"content");
        symlink("a/b.txt", work.join("alias")).unwrap();
        assert_eq!(download_single(&work, "alias").unwrap(), b"content");
        assert!(matches!(download_single(&work, "a"), Err(FileError::IsADirectory { .. })));
        assert!(matches!(download_single(&work, "."), Err(FileError::IsADirectory { .. })));
        let err = download_single(&work, "a/missing").expect_err("missing");
        assert_eq!(err.to_string(), "path `a/missing` does not exist in /home/work");
        // Escapes, by `..`, absolute paths and symlinks.
        std::fs::write(scratch.path().join("secret"), b"secret").unwrap();
        symlink(scratch.path().join("secret"), work.join("host-abs")).unwrap();
        symlink("../secret", work.join("host-rel")).unwrap();
        symlink("/etc/passwd", work.join("passwd")).unwrap();
        for bad in ["../secret", "/etc/passwd", "host-abs", "host-rel", "passwd", "a/../../secret"] {
            let err = download_single(&work, bad).expect_err(bad);
            assert_eq!(err.to_string(), format!("path `{bad}` escapes /home/work"), "{bad}");
        }
        // A fifo is refused without blocking.
        let fifo = CString::new(work.join("fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        assert!(matches!(download_single(&work, "fifo"), Err(FileError::NotARegularFile { .. })));
        // Loops end.
        symlink("loop2", work.join("loop1")).unwrap();
        symlink("loop1", work.join("loop2")).unwrap();
        assert!(matches!(download_single(&work, "loop1"), Err(FileError::SymlinkLoop { .. })));
    }

    #[test]
    fn downloads_are_capped() {
        let (_scratch, work) = work();
        let big = File::create(work.join("big")).unwrap();
        big.set_len(MAX_TRANSFER_BYTES + 1).unwrap();
        let err = download_single(&work, "big").expect_err("too large");
        assert_eq!(err.to_string(), "path `big` is too large: the limit is 67108864 bytes (64 MiB)");
        let err = download_tar(&work, "big").expect_err("too large");
        assert!(matches!(err, FileError::TooLarge { .. }), "{err}");
        std::fs::create_dir(work.join("d")).unwrap();
        File::create(work.join("d/half1")).unwrap().set_len(MAX_TRANSFER_BYTES / 2).unwrap();
        File::create(work.join("d/half2")).unwrap().set_len(MAX_TRANSFER_BYTES / 2).unwrap();
        assert!(matches!(download_tar(&work, "d"), Err(FileError::TooLarge { .. })));
    }

    #[test]
    fn download_tar_names_entries_like_docker_cp() {
        let (scratch, work) = work();
        std::fs::create_dir_all(work.join("proj/src")).unwrap();
        std::fs::write(work.join("proj/README"), b"readme").unwrap();
        std::fs::write(work.join("proj/src/main.py"), b"print(1)").unwrap();
        symlink("README", work.join("proj/link")).unwrap();
        symlink(scratch.path(), work.join("proj/outside")).unwrap();
        let archive = download_tar(&work, "proj").expect("tar");
        let got: Vec<_> =
            entries(&archive).into_iter().map(|(n, k, d)| (n, k, String::from_utf8(d).unwrap())).collect();
        let want = vec![
            ("proj/".to_owned(), tar::EntryType::Directory, String::new()),
            ("proj/README".to_owned(), tar::EntryType::Regular, "readme".to_owned()),
            ("proj/link".to_owned(), tar::EntryType::Symlink, "README".to_owned()),
            // Links are archived as links, never followed, wherever they point.
            ("proj/outside".to_owned(), tar::EntryType::Symlink, scratch.path().display().to_string()),
            ("proj/src/".to_owned(), tar::EntryType::Directory, String::new()),
            ("proj/src/main.py".to_owned(), tar::EntryType::Regular, "print(1)".to_owned()),
        ];
        assert_eq!(got, want);
        let single = entries(&download_tar(&work, "/home/work/proj/src/main.py").expect("file"));
        assert_eq!(single, vec![("main.py".to_owned(), tar::EntryType::Regular, b"print(1)".to_vec())]);
        let whole = entries(&download_tar(&work, "").expect("work dir"));
        assert_eq!(whole[0].0, "work/");
        assert!(whole.iter().any(|(n, _, _)| n == "work/proj/src/main.py"));
        for bad in ["..", "proj/outside", "/etc"] {
            let err = download_tar(&work, bad).expect_err(bad);
            assert_eq!(err.to_string(), format!("path `{bad}` escapes /home/work"));
        }
        assert!(matches!(download_tar(&work, "nope"), Err(FileError::NotFound { .. })));
    }

    #[test]
    fn list_matches_backend_ai_shape() {
        let (scratch, work) = work();
        std::fs::create_dir(work.join("dir")).unwrap();
        std::fs::write(work.join("f.txt"), b"12345").unwrap();
        std::fs::set_permissions(work.join("f.txt"), std::fs::Permissions::from_mode(0o640)).unwrap();
        symlink("/nowhere", work.join("ln")).unwrap();
        std::fs::write(work.join("sn\u{e9}\"q"), b"").unwrap();
        let listing = list(&work, ".").expect("list");
        assert_eq!(listing.errors, "");
        assert_eq!(listing.abspath, ".");
        assert!(listing.files.ends_with("]\n"));
        let parsed: serde_json::Value = serde_json::from_str(&listing.files).expect("JSON");
        let files = parsed.as_array().expect("a list");
        let names: Vec<_> = files.iter().map(|f| f["filename"].as_str().unwrap().to_owned()).collect();
        assert_eq!(names, ["dir", "f.txt", "ln", "sn\u{e9}\"q"]);
        let f = &files[1];
        assert_eq!(f["mode"], "-rw-r-----");
        assert_eq!(f["size"], 5);
        let keys: Vec<_> = f.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys.len(), 6);
        for key in ["mode", "size", "ctime", "mtime", "atime", "filename"] {
            assert!(keys.iter().any(|k| k == key), "{key}");
        }
        assert!(f["mtime"].as_f64().unwrap() > 1.0e9);
        assert_eq!(files[0]["mode"].as_str().unwrap().chars().next(), Some('d'));
        assert_eq!(files[2]["mode"], "lrwxrwxrwx");
        // Python's json.dumps text: separators and ASCII escapes.
        assert!(listing.files.starts_with("[{\"mode\": \"drwx"), "{}", listing.files);
        assert!(listing.files.contains("\"filename\": \"sn\\u00e9\\\"q\"}"), "{}", listing.files);
        let value = listing.to_value();
        let keys: Vec<_> = value.as_map().unwrap().iter().map(|(k, _)| k.as_str().unwrap()).collect();
        assert_eq!(keys, ["files", "errors", "abspath"]);
        // Subdirectories, absolute paths, and an empty directory.
        assert_eq!(list(&work, "/home/work/dir").unwrap().files, "[]\n");
        // Missing paths and files are reported in `errors`, as the Python script does.
        let missing = list(&work, "nope").expect("reported");
        assert_eq!(missing.files, "");
        assert_eq!(missing.errors, "FileNotFoundError: [Errno 2] No such file or directory: '/home/work/nope'\n");
        let file = list(&work, "f.txt").expect("reported");
        assert!(file.errors.starts_with("NotADirectoryError: [Errno 20]"), "{}", file.errors);
        // Escapes are refused.
        symlink(scratch.path(), work.join("up")).unwrap();
        for bad in ["..", "/etc", "up", "up/work"] {
            let err = list(&work, bad).expect_err(bad);
            assert_eq!(err.to_string(), format!("path `{bad}` escapes /home/work"));
            assert_eq!(err.exception_name(), "PermissionError");
        }
    }

    #[test]
    fn filemode_matches_python() {
        assert_eq!(filemode(libc::S_IFREG | 0o644), "-rw-r--r--");
        assert_eq!(filemode(libc::S_IFDIR | 0o755), "drwxr-xr-x");
        assert_eq!(filemode(libc::S_IFDIR | 0o1777), "drwxrwxrwt");
        assert_eq!(filemode(libc::S_IFREG | 0o4755), "-rwsr-xr-x");
        assert_eq!(filemode(libc::S_IFREG | 0o2644), "-rw-r-Sr--");
        assert_eq!(filemode(libc::S_IFIFO | 0o600), "prw-------");
    }

    #[test]
    fn python_json_escapes_like_json_dumps() {
        let entry = FileEntry {
            filename: OsString::from_vec(vec![b'a', 0xff, b'\n']),
            mode: "-rw-r--r--".into(),
            size: 3,
            ctime: 1_700_000_000.0,
            mtime: 1_700_000_000.25,
            atime: 1.5,
        };
        assert_eq!(
            python_json(&[entry]),
            "[{\"mode\": \"-rw-r--r--\", \"size\": 3, \"ctime\": 1700000000.0, \"mtime\": 1700000000.25, \
             \"atime\": 1.5, \"filename\": \"a\\udcff\\n\"}]\n"
        );
        let mut out = String::new();
        json_str(&mut out, "\u{1F600}".as_bytes());
        assert_eq!(out, "\"\\ud83d\\ude00\"");
    }
}
