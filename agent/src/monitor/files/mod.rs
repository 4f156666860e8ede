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
    blkio::BlockIoReader,
    cpu::{CpuReader, CpuTimes, read_cpu_total},
    memory::MemoryReader,
    netdev::NetDevReader,
    oom::OomReader,
    pids::PidsReader,
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
    /// CPU time as the cgroup files last said: the kernel's user/system split (and the total,
    /// where CPU time comes from files).
    pub cpu_files: CpuTimes,
    /// `counters.cpu_ns` split into user and system time in the ratio of `cpu_files`.
    pub cpu_time: crate::monitor::CpuSplit,
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

/// Every this many passes a container's files are all read, whatever moved.
pub const FULL_READ_EVERY: u32 = 10;

/// A container's readers: the subsystems eBPF never counts, and the fallbacks for the
/// resources whose eBPF program is not running.
///
/// Most kernels on a node sit idle most of the time, so a pass reads only what can have
/// changed. A kernel's tasks must run to allocate, fork, exit, write to `/dev/shm` or be
/// throttled, so when its CPU time did not move, its files are not read; when it did, memory
/// usage, throttling, tasks and `/dev/shm` are, and the memory breakdown (the expensive
/// `memory.stat`) when usage moved. Every [`FULL_READ_EVERY`]th pass reads everything, the
/// limit and peak included, so what others do to an idle kernel (reclaiming its page cache)
/// shows within that many passes.
#[derive(Debug)]
pub struct CgroupReaders {
    memory: Option<MemoryReader>,
    cpu: Option<CpuReader>,
    pids: Option<PidsReader>,
    shm: Option<ShmReader>,
    block_io: Option<BlockIoReader>,
    oom: Option<OomReader>,
    network: Option<NetDevReader>,
    /// Passes since everything was read; `None` before the first read.
    since_full: Option<u32>,
    /// Whether `cpu` reads the CPU time itself (eBPF does not count it).
    cpu_time_from_files: bool,
    /// The CPU time when the kernel's user/system split was last read (v1 `cpuacct.stat`).
    split_read_at_ns: Option<u64>,
    last_usage: u64,
    last_cpu_ns: u64,
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
            since_full: None,
            cpu_time_from_files: from_files(Resource::Cpu),
            split_read_at_ns: None,
            last_usage: 0,
            last_cpu_ns: 0,
        };
        (readers, missing)
    }

    /// Reads what can have changed into `readings` (see [`CgroupReaders`]). The counters of
    /// file-read resources replace those fields of `readings.counters`; the rest keeps what
    /// eBPF put there. A file that fails to read (the container is exiting) leaves its fields
    /// as they were.
    pub fn read(&mut self, buf: &mut Vec<u8>, readings: &mut ContainerReadings) -> io::Result<()> {
        let mut first_error = None;
        let mut keep = |result: io::Result<()>| {
            if let Err(err) = result {
                first_error.get_or_insert(err);
            }
        };
        // The counting fallbacks, every pass.
        if let Some(reader) = &self.cpu {
            keep(reader.read_usage(buf, &mut readings.cpu, &mut readings.cpu_files));
            if self.cpu_time_from_files {
                readings.counters.cpu_ns = readings.cpu_files.total_ns;
            }
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

        let full = self.since_full.is_none_or(|passes| passes + 1 >= FULL_READ_EVERY);
        let cpu_moved = readings.counters.cpu_ns != self.last_cpu_ns;
        if full || cpu_moved {
            if let Some(reader) = &self.memory {
                match reader.read_usage(buf) {
                    Ok(usage) => {
                        if full || usage != self.last_usage {
                            keep(reader.read_breakdown(buf, usage, &mut readings.memory));
                        }
                        readings.memory.usage = usage;
                        self.last_usage = usage;
                    }
                    Err(err) => keep(Err(err)),
                }
                if full {
                    keep(reader.read_limits(buf, &mut readings.memory));
                }
            }
            if let Some(reader) = self.cpu.as_ref().filter(|reader| !reader.usage_brings_throttling()) {
                keep(reader.read(buf, &mut readings.cpu, &mut readings.cpu_files));
            }
            if let Some(reader) = &self.pids {
                keep(reader.read(buf).map(|processes| readings.processes = processes));
            }
            if let Some(reader) = &self.shm {
                keep(reader.read().map(|bytes| readings.shm_bytes = Some(bytes)));
            }
        }
        if let Some(reader) = &self.cpu
            && !self.cpu_time_from_files
            && split_is_stale(self.split_read_at_ns, readings.counters.cpu_ns)
        {
            keep(reader.read_split(buf, &mut readings.cpu, &mut readings.cpu_files));
            self.split_read_at_ns = Some(readings.counters.cpu_ns);
        }
        self.last_cpu_ns = readings.counters.cpu_ns;
        self.since_full = Some(if full { 0 } else { self.since_full.map_or(0, |passes| passes + 1) });
        first_error.map_or(Ok(()), Err)
    }
}

/// CPU time that may go unsplit before the kernel's user/system split is read again: the split
/// of the total is then off by at most this share of it (and a kernel that keeps running
/// costs a read only every 1 % of growth).
const SPLIT_STALE_SHARE: u64 = 100;
const SPLIT_STALE_MIN_NS: u64 = 20_000_000;

/// Whether CPU time grew enough since the split was read at `read_at_ns` to read it again.
fn split_is_stale(read_at_ns: Option<u64>, cpu_ns: u64) -> bool {
    read_at_ns.is_none_or(|at| cpu_ns.saturating_sub(at) > (cpu_ns / SPLIT_STALE_SHARE).max(SPLIT_STALE_MIN_NS))
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

    /// A pure-v2-shaped cgroup directory of plain files.
    fn fake_cgroup(dir: &Path) -> ContainerCgroups {
        for (name, text) in [
            ("memory.current", "1000\n"),
            ("memory.stat", "anon 100\nfile 800\ninactive_file 300\nshmem 10\nfile_mapped 5\n"),
            ("memory.max", "max\n"),
            ("cpu.stat", "usage_usec 10\nnr_periods 4\nnr_throttled 1\nthrottled_usec 7\n"),
            ("pids.current", "3\n"),
        ] {
            std::fs::write(dir.join(name), text).expect("write");
        }
        ContainerCgroups {
            mode: crate::monitor::cgroup::CgroupMode::Unified,
            unified: crate::monitor::UnifiedCgroup { id: 1, path: dir.to_path_buf() },
            v1: std::collections::HashMap::new(),
        }
    }

    #[test]
    fn only_what_can_have_changed_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cgroups = fake_cgroup(dir.path());
        let mut sources = Sources::default();
        for resource in Resource::ALL {
            sources.set(resource, crate::monitor::Source::Ebpf);
        }
        let (mut readers, _missing) = CgroupReaders::open(&cgroups, std::process::id(), &sources);
        let (mut buf, mut readings) = (Vec::new(), ContainerReadings::default());
        readers.read(&mut buf, &mut readings).expect("reads");
        assert_eq!((readings.memory.usage, readings.memory.working_set, readings.memory.limit), (1000, 700, None));
        assert_eq!((readings.cpu.throttled_periods, readings.processes), (1, Some(3)));

        // Idle (CPU time unchanged): nothing is read.
        std::fs::write(dir.path().join("memory.current"), "1100\n").expect("write");
        std::fs::write(dir.path().join("memory.stat"), "anon 100\nfile 800\ninactive_file 500\n").expect("write");
        std::fs::write(dir.path().join("pids.current"), "4\n").expect("write");
        std::fs::write(dir.path().join("memory.max"), "4096\n").expect("write");
        readers.read(&mut buf, &mut readings).expect("reads");
        assert_eq!((readings.memory.usage, readings.memory.working_set, readings.processes), (1000, 700, Some(3)));
        // CPU time moved: usage, its breakdown (usage moved) and tasks are read again.
        readings.counters.cpu_ns += 1;
        readers.read(&mut buf, &mut readings).expect("reads");
        assert_eq!((readings.memory.usage, readings.memory.working_set, readings.processes), (1100, 600, Some(4)));
        // CPU time moved but usage did not: the breakdown is not read.
        std::fs::write(dir.path().join("memory.stat"), "anon 100\nfile 800\ninactive_file 900\n").expect("write");
        readings.counters.cpu_ns += 1;
        readers.read(&mut buf, &mut readings).expect("reads");
        assert_eq!(readings.memory.working_set, 600);
        assert_eq!(readings.memory.limit, None, "limits wait for the full read");
        for _ in 0..FULL_READ_EVERY {
            readers.read(&mut buf, &mut readings).expect("reads");
        }
        assert_eq!((readings.memory.limit, readings.memory.working_set), (Some(4096), 200));
    }

    #[test]
    fn a_missing_file_names_its_path() {
        let err = StatFile::open(PathBuf::from("/nonexistent/memory.stat")).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/memory.stat"), "{err}");
    }
}
