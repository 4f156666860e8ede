//! The cgroup-file readers: one small reader per subsystem (memory, CPU, pids, `/dev/shm`,
//! and block I/O, OOM kills, CPU time and network where eBPF does not count them), each
//! opening its files once per container and re-reading them with `pread` every sample.

mod blkio;
mod cpu;
mod memory;
mod netdev;
mod oom;
mod pids;
mod shm;

use std::{
    fs::File,
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

use agent_common::CgroupCounters;

pub use self::{
    blkio::BlockIoReader, cpu::CpuReader, memory::MemoryReader, netdev::NetDevReader, oom::OomReader, pids::PidsReader,
    shm::ShmReader,
};
use super::{
    cgroup::ContainerCgroups,
    sources::{Resource, Sources},
};

/// Memory as the container's cgroup accounts it, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Everything charged to the cgroup, page cache included.
    pub usage: u64,
    /// `usage` less inactive page cache: what the kernel cannot reclaim easily
    /// (cAdvisor's and Backend.AI's "memory used").
    pub working_set: u64,
    /// Page cache (file-backed memory).
    pub cache: u64,
    /// Anonymous memory (heap, stacks).
    pub rss: u64,
    /// Swap in use.
    pub swap: u64,
    /// Shared memory (tmpfs, shm segments), part of `cache`.
    pub shmem: u64,
    /// File pages mapped into processes.
    pub mapped_file: u64,
    /// The hard limit; `None` when unlimited.
    pub limit: Option<u64>,
    /// The highest `usage` seen, where the kernel records it.
    pub max_usage: Option<u64>,
}

/// CPU bandwidth control (CFS quota) as the cgroup accounts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuThrottling {
    pub periods: u64,
    pub throttled_periods: u64,
    pub throttled_ns: u64,
}

/// Everything one sample reads of a container.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ContainerReadings {
    /// CPU, network, block I/O and OOM kills since the container started (all runs).
    pub counters: CgroupCounters,
    pub memory: MemoryStats,
    pub cpu: CpuThrottling,
    /// Tasks in the cgroup.
    pub processes: Option<u64>,
    /// Bytes used in the container's `/dev/shm`.
    pub shm_bytes: Option<u64>,
}

/// A cgroup (or proc) file kept open and re-read from the start each time.
#[derive(Debug)]
pub struct StatFile {
    file: File,
    path: PathBuf,
}

impl StatFile {
    pub fn open(path: PathBuf) -> io::Result<Self> {
        let file = File::open(&path).map_err(|err| io::Error::new(err.kind(), format!("{}: {err}", path.display())))?;
        Ok(Self { file, path })
    }

    /// Opens `name` in `dir`, or `None` when the directory is unknown or the file missing.
    fn open_in(dir: Option<&Path>, name: &str) -> Option<Self> {
        Self::open(dir?.join(name)).ok()
    }

    /// The file's whole content, into `buf` (grown as needed, never shrunk).
    pub fn read<'b>(&self, buf: &'b mut Vec<u8>) -> io::Result<&'b [u8]> {
        if buf.len() < 4096 {
            buf.resize(4096, 0);
        }
        loop {
            let n = self
                .file
                .read_at(buf, 0)
                .map_err(|err| io::Error::new(err.kind(), format!("{}: {err}", self.path.display())))?;
            if n < buf.len() {
                return Ok(&buf[..n]);
            }
            // Filled the buffer: the file may be longer; read again with room to spare.
            let grown = buf.len() * 2;
            buf.resize(grown, 0);
        }
    }

    /// A file holding one number (`max` reads as `None`).
    pub fn read_u64(&self, buf: &mut Vec<u8>) -> io::Result<Option<u64>> {
        let text = self.read(buf)?;
        Ok(parse_u64(trim(text)))
    }
}

fn trim(text: &[u8]) -> &[u8] {
    let end = text.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(0, |i| i + 1);
    &text[..end]
}

/// A decimal number, without allocating; `None` for anything else (e.g. `max`).
pub fn parse_u64(text: &[u8]) -> Option<u64> {
    if text.is_empty() {
        return None;
    }
    let mut value: u64 = 0;
    for &b in text {
        if !b.is_ascii_digit() {
            return None;
        }
        value = value.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(value)
}

/// Calls `each(key, value)` for every `key value` line (memory.stat, cpu.stat, memory.events).
pub fn for_each_keyed(text: &[u8], mut each: impl FnMut(&[u8], u64)) {
    for line in text.split(|&b| b == b'\n') {
        let mut fields = line.split(|&b| b == b' ').filter(|f| !f.is_empty());
        if let (Some(key), Some(value)) = (fields.next(), fields.next())
            && let Some(value) = parse_u64(value)
        {
            each(key, value);
        }
    }
}

/// A container's readers: the subsystems eBPF never counts, and the fallbacks for the
/// resources whose eBPF program is not running.
#[derive(Debug)]
pub struct CgroupReaders {
    memory: Option<MemoryReader>,
    cpu: Option<CpuReader>,
    pids: Option<PidsReader>,
    shm: Option<ShmReader>,
    block_io: Option<BlockIoReader>,
    oom: Option<OomReader>,
    network: Option<NetDevReader>,
}

impl CgroupReaders {
    /// Opens every reader it can; what cannot be opened (a controller the host lacks) is
    /// returned by name so the caller can say so once.
    pub fn open(cgroups: &ContainerCgroups, pid: u32, sources: &Sources) -> (Self, Vec<String>) {
        let mut missing = Vec::new();
        let from_files = |resource| !sources.ebpf(resource);
        let readers = CgroupReaders {
            memory: opened(MemoryReader::open(cgroups), "memory", &mut missing),
            cpu: opened(CpuReader::open(cgroups, from_files(Resource::Cpu)), "cpu", &mut missing),
            pids: opened(PidsReader::open(cgroups), "pids", &mut missing),
            shm: opened(ShmReader::open(pid), "/dev/shm", &mut missing),
            block_io: from_files(Resource::BlockIo)
                .then(|| opened(BlockIoReader::open(cgroups), "block I/O", &mut missing))
                .flatten(),
            oom: from_files(Resource::Oom)
                .then(|| opened(OomReader::open(cgroups), "OOM kills", &mut missing))
                .flatten(),
            network: from_files(Resource::Network)
                .then(|| opened(NetDevReader::open(pid), "network", &mut missing))
                .flatten(),
        };
        (readers, missing)
    }

    /// Reads every subsystem into `readings`. The counters of file-read resources replace
    /// those fields of `readings.counters`; the rest keeps what eBPF put there. A file that
    /// fails to read (the container is exiting) leaves its fields as they were.
    pub fn read(&mut self, buf: &mut Vec<u8>, readings: &mut ContainerReadings) -> io::Result<()> {
        let mut first_error = None;
        let mut keep = |result: io::Result<()>| {
            if let Err(err) = result {
                first_error.get_or_insert(err);
            }
        };
        if let Some(reader) = &self.memory {
            keep(reader.read(buf).map(|memory| readings.memory = memory));
        }
        if let Some(reader) = &self.cpu {
            keep(reader.read(buf, &mut readings.cpu, &mut readings.counters));
        }
        if let Some(reader) = &self.pids {
            keep(reader.read(buf).map(|processes| readings.processes = processes));
        }
        if let Some(reader) = &self.shm {
            keep(reader.read().map(|bytes| readings.shm_bytes = Some(bytes)));
        }
        if let Some(reader) = &self.block_io {
            keep(reader.read(buf, &mut readings.counters));
        }
        if let Some(reader) = &self.oom {
            keep(reader.read(buf).map(|kills| readings.counters.oom_kills = kills));
        }
        if let Some(reader) = &self.network {
            keep(reader.read(buf, &mut readings.counters));
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// The reader, or `None` with the reason noted in `missing`.
fn opened<T>(reader: io::Result<T>, what: &str, missing: &mut Vec<String>) -> Option<T> {
    reader.map_err(|err| missing.push(format!("{what}: {err}"))).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_parse_without_allocating() {
        assert_eq!(parse_u64(b"0"), Some(0));
        assert_eq!(parse_u64(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_u64(b"18446744073709551616"), None);
        assert_eq!(parse_u64(b"max"), None);
        assert_eq!(parse_u64(b""), None);
        assert_eq!(parse_u64(b"-1"), None);
    }

    #[test]
    fn keyed_lines_are_split_on_spaces() {
        let mut seen = Vec::new();
        for_each_keyed(b"cache 4096\nrss 8192\n\nbroken\nswap x\n", |k, v| seen.push((k.to_vec(), v)));
        assert_eq!(seen, vec![(b"cache".to_vec(), 4096), (b"rss".to_vec(), 8192)]);
    }

    #[test]
    fn a_file_longer_than_the_buffer_is_read_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("big");
        let text: String = (0..2000).map(|i| format!("k{i} {i}\n")).collect();
        std::fs::write(&path, &text).expect("write");
        let file = StatFile::open(path).expect("opens");
        let mut buf = Vec::new();
        assert_eq!(file.read(&mut buf).expect("reads"), text.as_bytes());
        std::fs::write(dir.path().join("one"), "42\n").expect("write");
        let one = StatFile::open(dir.path().join("one")).expect("opens");
        assert_eq!(one.read_u64(&mut buf).expect("reads"), Some(42));
    }

    #[test]
    fn a_missing_file_names_its_path() {
        let err = StatFile::open(PathBuf::from("/nonexistent/memory.stat")).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/memory.stat"), "{err}");
    }
}
