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
pub const FULL_READ_EVERY: u32 = 30;

/// CPU time a kernel must have used since its files were last read for them to be read again
/// before the next full read: what it takes to allocate, fork or write enough to show (50 ms of
/// page faults is a few hundred MiB). A kernel that wakes now and then does not get there
/// between its full reads.
pub const ACTIVE_CPU_NS: u64 = 50_000_000;

/// A change of memory usage that makes the memory breakdown (`memory.stat`) worth reading
/// again before the next full read: 1 % of the usage at the last breakdown, at least 1 MiB.
fn breakdown_is_stale(breakdown_usage: u64, usage: u64) -> bool {
    usage.abs_diff(breakdown_usage) > (breakdown_usage / 100).max(1 << 20)
}

/// Every this many full reads the settings (memory limit, CPU quota) are read, which change
/// only when someone updates the container.
const EVERYTHING_EVERY_FULL_READS: u32 = 4;

/// Every this many full reads the breakdown is read whatever usage did: the kernel ages page
/// cache from active to inactive without changing usage, but slowly, and `memory.stat` is the
/// costliest file (about 50 µs on cgroup v1, ten times any other).
const BREAKDOWN_EVERY_FULL_READS: u32 = 10;

/// Which of the less frequent memory reads a pass makes (see [`CgroupReaders`]).
#[derive(Debug, Clone, Copy)]
struct MemoryReads {
    full: bool,
    everything: bool,
    aged: bool,
}

/// A container's readers: the subsystems eBPF never counts, and the fallbacks for the
/// resources whose eBPF program is not running.
///
/// Most kernels on a node sit idle most of the time, and most of the rest change little from
/// one second to the next, so a pass reads only what can have changed:
/// - A kernel's tasks must run to allocate, fork, exit, write to `/dev/shm` or be throttled,
///   so until it has used [`ACTIVE_CPU_NS`] of CPU time since its files were last read,
///   nothing is read (CPU time itself comes from eBPF every pass).
/// - Then: memory usage and tasks (one small file each); the throttling counters only when
///   the kernel has a CPU quota; the memory breakdown (`memory.stat`, the expensive file) and
///   `/dev/shm` (whose pages are charged to the kernel) only when usage moved by more than 1 %
///   (at least 1 MiB) since the last breakdown, and once more at the first read where usage
///   stands still after a breakdown read while it moved (so the end of a burst, e.g. a file
///   written to `/dev/shm`, shows exactly). Until then the working set follows usage: small
///   changes are the kernel's own allocations and frees, not inactive page cache.
/// - Every [`FULL_READ_EVERY`]th pass reads usage, tasks and the peak whatever the kernel did
///   (and the breakdown by the rule above), so that what others do to an idle kernel
///   (reclaiming its page cache) shows; every [`EVERYTHING_EVERY_FULL_READS`]th full read reads
///   the memory limit and the CPU quota too, and every [`BREAKDOWN_EVERY_FULL_READS`]th the
///   breakdown whatever usage did. Kernels take their full passes in turn, not all in the same
///   one.
#[derive(Debug)]
pub struct CgroupReaders {
    memory: Option<MemoryReader>,
    cpu: Option<CpuReader>,
    pids: Option<PidsReader>,
    shm: Option<ShmReader>,
    block_io: Option<BlockIoReader>,
    oom: Option<OomReader>,
    network: Option<NetDevReader>,
    /// Passes until the next full read (0: this one; `None` before the first read).
    until_full: Option<u32>,
    /// This kernel's turn in the cycle of full reads.
    phase: u32,
    /// Whether `cpu` reads the CPU time itself (eBPF does not count it).
    cpu_time_from_files: bool,
    /// Whether the kernel has a CPU quota (so throttling counters can move), as of the last
    /// full read.
    has_quota: bool,
    /// The CPU time when the kernel's user/system split was last read.
    split_read_at_ns: Option<u64>,
    /// The CPU time at the last pass: a kernel whose CPU time stood still since is resting.
    last_cpu_ns: u64,
    /// Memory usage at the last breakdown.
    breakdown_usage: u64,
    /// Memory usage at the last read of it.
    last_usage: u64,
    /// The last breakdown was read while usage was still moving: read it once more when usage
    /// stands still, so that what a burst left behind shows (not a reading from its middle).
    breakdown_mid_move: bool,
    /// Full reads so far.
    full_reads: u32,
    /// CPU time when the files were last read.
    read_at_cpu_ns: u64,
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
            until_full: None,
            phase: (cgroups.unified.id % u64::from(FULL_READ_EVERY)) as u32,
            cpu_time_from_files: from_files(Resource::Cpu),
            has_quota: true,
            split_read_at_ns: None,
            last_cpu_ns: 0,
            breakdown_usage: 0,
            last_usage: 0,
            breakdown_mid_move: false,
            full_reads: 0,
            read_at_cpu_ns: 0,
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
        self.read_fallbacks(buf, readings, &mut keep);
        let full = self.until_full.is_none_or(|left| left == 0);
        // Every few full reads, everything (the first one included).
        let everything = full && self.full_reads.is_multiple_of(EVERYTHING_EVERY_FULL_READS);
        let aged = full && self.full_reads.is_multiple_of(BREAKDOWN_EVERY_FULL_READS);
        if full {
            self.full_reads += 1;
        }
        let cpu_ns = readings.counters.cpu_ns;
        let mut stat_read = false;
        if full || cpu_ns.saturating_sub(self.read_at_cpu_ns) >= ACTIVE_CPU_NS {
            self.read_memory(buf, readings, MemoryReads { full, everything, aged }, &mut keep);
            stat_read = self.read_throttling(buf, readings, everything, &mut keep);
            if let Some(reader) = &self.pids {
                keep(reader.read(buf).map(|processes| readings.processes = processes));
            }
            self.read_at_cpu_ns = cpu_ns;
        }
        self.read_cpu_split(buf, readings, full, stat_read, &mut keep);
        self.until_full = Some(match self.until_full {
            // After the first read (at attach), each kernel's full reads fall on its own turn.
            None => self.phase,
            Some(0) => FULL_READ_EVERY - 1,
            Some(left) => left - 1,
        });
        first_error.map_or(Ok(()), Err)
    }

    /// The counting fallbacks (resources eBPF does not count here), every pass.
    fn read_fallbacks(
        &self,
        buf: &mut Vec<u8>,
        readings: &mut ContainerReadings,
        keep: &mut impl FnMut(io::Result<()>),
    ) {
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
    }

    /// Memory usage; its breakdown and `/dev/shm` when they are stale (or `aged`); on full reads
    /// the peak, and with `everything` the limit.
    fn read_memory(
        &mut self,
        buf: &mut Vec<u8>,
        readings: &mut ContainerReadings,
        MemoryReads { full, everything, aged }: MemoryReads,
        keep: &mut impl FnMut(io::Result<()>),
    ) {
        let Some(reader) = &self.memory else { return };
        let usage = match reader.read_usage(buf) {
            Ok(usage) => usage,
            Err(err) => return keep(Err(err)),
        };
        let moving = usage != self.last_usage;
        self.last_usage = usage;
        let settled = self.breakdown_mid_move && !moving;
        let stale = aged || settled || breakdown_is_stale(self.breakdown_usage, usage);
        if stale {
            keep(reader.read_breakdown(buf, usage, &mut readings.memory));
            self.breakdown_usage = usage;
            self.breakdown_mid_move = moving;
            if let Some(shm) = &self.shm {
                keep(shm.read().map(|bytes| readings.shm_bytes = Some(bytes)));
            }
        } else {
            let memory = &mut readings.memory;
            memory.working_set = (memory.working_set + usage).saturating_sub(memory.usage).min(usage);
            memory.usage = usage;
        }
        if full {
            keep(reader.read_peak(buf, &mut readings.memory));
        }
        if everything {
            keep(reader.read_limit(buf, &mut readings.memory));
        }
    }

    /// The throttling counters, where a quota can throttle (and with `everything`, whether one
    /// does); true when `cpu.stat` was read.
    fn read_throttling(
        &mut self,
        buf: &mut Vec<u8>,
        readings: &mut ContainerReadings,
        everything: bool,
        keep: &mut impl FnMut(io::Result<()>),
    ) -> bool {
        let Some(reader) = self.cpu.as_ref().filter(|reader| !reader.usage_brings_throttling()) else { return false };
        if everything {
            match reader.has_quota(buf) {
                Ok(has_quota) => self.has_quota = has_quota,
                Err(err) => keep(Err(err)),
            }
        }
        if !(everything || self.has_quota) {
            return false;
        }
        let read = reader.read(buf, &mut readings.cpu, &mut readings.cpu_files);
        let ok = read.is_ok();
        keep(read);
        ok
    }

    /// The kernel's user/system split, when CPU time grew enough since it was last read, or
    /// grew at all and the kernel came to rest or this is a full read. On v2 the split is in
    /// `cpu.stat`: when this pass read that file already (`stat_read`), the split came with it.
    fn read_cpu_split(
        &mut self,
        buf: &mut Vec<u8>,
        readings: &mut ContainerReadings,
        full: bool,
        stat_read: bool,
        keep: &mut impl FnMut(io::Result<()>),
    ) {
        let Some(reader) = self.cpu.as_ref().filter(|_| !self.cpu_time_from_files) else { return };
        let cpu_ns = readings.counters.cpu_ns;
        // A kernel that just came to rest gets its final split at once; one that keeps working
        // every 1 % of growth (at least 100 ms), or at its full reads.
        let resting = std::mem::replace(&mut self.last_cpu_ns, cpu_ns) == cpu_ns;
        if stat_read && reader.split_in_stat() {
            self.split_read_at_ns = Some(cpu_ns);
            return;
        }
        let unsplit = self.split_read_at_ns.is_none_or(|at| at < cpu_ns);
        if split_is_stale(self.split_read_at_ns, cpu_ns) || (unsplit && (full || resting)) {
            keep(reader.read_split(buf, &mut readings.cpu, &mut readings.cpu_files));
            self.split_read_at_ns = Some(cpu_ns);
        }
    }
}

/// CPU time that may be split in an older ratio before the kernel's user/system split is read
/// again: the split is then off by at most this share of the total or 100 ms, whichever is
/// more (a kernel that keeps running costs a read only every 1 % of growth; one that wakes
/// now and then, at its full reads). The kernel's own split is in ticks, 4–10 ms each.
const SPLIT_STALE_SHARE: u64 = 100;
const SPLIT_STALE_MIN_NS: u64 = 100_000_000;

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

    const MIB: u64 = 1 << 20;

    /// A pure-v2-shaped cgroup directory of plain files (cgroup id 15: its first full read
    /// after the one at attach is the seventh pass).
    fn fake_cgroup(dir: &Path) -> ContainerCgroups {
        for (name, text) in [
            ("memory.current", format!("{}\n", 100 * MIB)),
            ("memory.stat", format!("anon {}\nfile {}\ninactive_file {}\n", 20 * MIB, 80 * MIB, 30 * MIB)),
            ("memory.max", "max\n".to_owned()),
            (
                "cpu.stat",
                "usage_usec 10\nuser_usec 6\nsystem_usec 4\nnr_periods 4\nnr_throttled 1\nthrottled_usec 7\n"
                    .to_owned(),
            ),
            ("cpu.max", "max 100000\n".to_owned()),
            ("pids.current", "3\n".to_owned()),
        ] {
            std::fs::write(dir.join(name), text).expect("write");
        }
        ContainerCgroups {
            mode: crate::monitor::cgroup::CgroupMode::Unified,
            unified: crate::monitor::UnifiedCgroup { id: 15, path: dir.to_path_buf() },
            v1: std::collections::HashMap::new(),
        }
    }

    fn write(dir: &Path, name: &str, text: String) {
        std::fs::write(dir.join(name), text).expect("write");
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
        let d = dir.path();
        // At attach: everything.
        readers.read(&mut buf, &mut readings).expect("reads");
        assert_eq!(
            (readings.memory.usage, readings.memory.working_set, readings.memory.limit),
            (100 * MIB, 70 * MIB, None)
        );
        assert_eq!((readings.cpu.throttled_periods, readings.processes), (1, Some(3)));

        // Idle (CPU time unchanged): nothing is read.
        write(d, "memory.current", format!("{}\n", 100 * MIB + 4096));
        write(d, "pids.current", "4\n".into());
        write(d, "memory.max", format!("{}\n", 512 * MIB));
        readers.read(&mut buf, &mut readings).expect("reads");
        assert_eq!((readings.memory.usage, readings.processes), (100 * MIB, Some(3)));

        // CPU time moved, usage by a page: usage and tasks are read, the working set follows
        // usage without the breakdown, and there is no quota to throttle (no cpu.stat).
        write(d, "memory.stat", format!("anon {}\nfile {}\ninactive_file {}\n", 20 * MIB, 80 * MIB, 90 * MIB));
        readings.counters.cpu_ns += ACTIVE_CPU_NS / 2;
        readers.read(&mut buf, &mut readings).expect("reads");
        assert_eq!((readings.memory.usage, readings.processes), (100 * MIB, Some(3)), "not yet active enough");
        readings.counters.cpu_ns += ACTIVE_CPU_NS / 2;
        readers.read(&mut buf, &mut readings).expect("reads");
        assert_eq!((readings.memory.usage, readings.processes), (100 * MIB + 4096, Some(4)));
        assert_eq!(readings.memory.working_set, 70 * MIB + 4096, "working set follows usage");
        assert_eq!(readings.cpu.throttled_periods, 1, "no quota: throttling is not read");
        assert_eq!(readings.memory.limit, None, "limits wait for the full read");

        // Usage moved by more than 1 MiB: the breakdown is read again.
        write(d, "memory.current", format!("{}\n", 102 * MIB));
        readings.counters.cpu_ns += ACTIVE_CPU_NS;
        readers.read(&mut buf, &mut readings).expect("reads");
        assert_eq!(readings.memory.working_set, 12 * MIB);

        // A full read within the cycle: usage stands still after a breakdown read while it
        // moved, so the breakdown is read once more (the page cache aged meanwhile shows);
        // after that, only when usage moved by more than 1 MiB. The limit waits for the read
        // of everything.
        write(d, "memory.stat", format!("anon {}\nfile {}\ninactive_file {}\n", 20 * MIB, 80 * MIB, 2 * MIB));
        let full_cycle = |readers: &mut CgroupReaders, readings: &mut ContainerReadings, buf: &mut Vec<u8>| {
            for _ in 0..FULL_READ_EVERY {
                readers.read(buf, readings).expect("reads");
            }
        };
        full_cycle(&mut readers, &mut readings, &mut buf);
        assert_eq!(
            (readings.memory.limit, readings.memory.working_set),
            (None, 100 * MIB),
            "usage settled: read again"
        );
        write(d, "memory.current", format!("{}\n", 102 * MIB + 512 * 1024));
        full_cycle(&mut readers, &mut readings, &mut buf);
        assert_eq!(readings.memory.working_set, 100 * MIB + 512 * 1024, "half a MiB: usage followed, no breakdown");
        write(d, "memory.stat", format!("anon {}\nfile {}\ninactive_file {}\n", 20 * MIB, 80 * MIB, 2 * MIB));
        write(d, "memory.current", format!("{}\n", 104 * MIB + 512 * 1024));
        full_cycle(&mut readers, &mut readings, &mut buf);
        assert_eq!((readings.memory.limit, readings.memory.working_set), (None, 102 * MIB + 512 * 1024));
        // The limit, the quota and throttling wait for the read of everything, every fourth full
        // read (the first, at attach, was one).
        assert_eq!(readings.cpu.throttled_periods, 1);
        write(d, "cpu.stat", "usage_usec 10\nnr_periods 9\nnr_throttled 5\nthrottled_usec 70\n".into());
        write(d, "memory.stat", format!("anon {}\nfile {}\ninactive_file {}\n", 20 * MIB, 80 * MIB, 3 * MIB));
        full_cycle(&mut readers, &mut readings, &mut buf);
        // Usage stood still after the breakdown read while it moved: read once more.
        assert_eq!((readings.memory.limit, readings.memory.working_set), (Some(512 * MIB), 101 * MIB + 512 * 1024));
        assert_eq!(readings.cpu.throttled_periods, 5, "the read of everything reads throttling too");
        // The breakdown, whatever usage did, every tenth full read: aged page cache shows.
        write(d, "memory.stat", format!("anon {}\nfile {}\ninactive_file {}\n", 20 * MIB, 80 * MIB, 4 * MIB));
        for _ in 5..BREAKDOWN_EVERY_FULL_READS {
            full_cycle(&mut readers, &mut readings, &mut buf);
            assert_eq!(readings.memory.working_set, 101 * MIB + 512 * 1024);
        }
        full_cycle(&mut readers, &mut readings, &mut buf);
        assert_eq!(readings.memory.working_set, 100 * MIB + 512 * 1024);

        // With a quota, throttling is read whenever the kernel was active.
        write(d, "cpu.max", "50000 100000\n".into());
        for _ in 0..EVERYTHING_EVERY_FULL_READS {
            full_cycle(&mut readers, &mut readings, &mut buf);
        }
        write(d, "cpu.stat", "usage_usec 10\nnr_periods 12\nnr_throttled 8\nthrottled_usec 90\n".into());
        readings.counters.cpu_ns += ACTIVE_CPU_NS;
        readers.read(&mut buf, &mut readings).expect("reads");
        assert_eq!(readings.cpu.throttled_periods, 8);
    }

    #[test]
    fn the_split_is_read_when_work_grew_enough_or_on_a_full_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cgroups = fake_cgroup(dir.path());
        let mut sources = Sources::default();
        sources.set(Resource::Cpu, crate::monitor::Source::Ebpf);
        let (mut readers, _missing) = CgroupReaders::open(&cgroups, std::process::id(), &sources);
        let (mut buf, mut readings) = (Vec::new(), ContainerReadings::default());
        let split = |user_usec: u64, system_usec: u64| {
            format!("usage_usec 0\nuser_usec {user_usec}\nsystem_usec {system_usec}\n")
        };
        let mut pass = |readings: &mut ContainerReadings, grew_ns: u64| {
            readings.counters.cpu_ns += grew_ns;
            readers.read(&mut buf, readings).expect("reads");
            (readings.cpu_files.user_ns / 1000, readings.cpu_files.system_ns / 1000)
        };
        assert_eq!(pass(&mut readings, 0), (6, 4), "at attach");
        write(dir.path(), "cpu.stat", split(60, 40));
        assert_eq!(pass(&mut readings, SPLIT_STALE_MIN_NS - 1), (6, 4), "grew too little to read again");
        assert_eq!(pass(&mut readings, 2), (60, 40), "grew by more than the stale share");
        write(dir.path(), "cpu.stat", split(60, 90));
        assert_eq!(pass(&mut readings, 1000), (60, 40), "grew a little");
        assert_eq!(pass(&mut readings, 0), (60, 90), "came to rest: the final split");
        write(dir.path(), "cpu.stat", split(61, 90));
        assert_eq!(pass(&mut readings, 1000), (60, 90), "grew a little again");
        write(dir.path(), "cpu.stat", split(60, 90));
        let on_full_read = (0..FULL_READ_EVERY).map(|_| pass(&mut readings, 0)).last();
        assert_eq!(on_full_read, Some((60, 90)), "a full read splits what grew");
        write(dir.path(), "cpu.stat", split(70, 90));
        let on_full_read = (0..FULL_READ_EVERY).map(|_| pass(&mut readings, 0)).last();
        assert_eq!(on_full_read, Some((60, 90)), "nothing new to split");
    }

    #[test]
    fn kernels_take_their_full_reads_in_turn() {
        let full_passes = |id: u64| {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut cgroups = fake_cgroup(dir.path());
            cgroups.unified.id = id;
            let (mut readers, _) = CgroupReaders::open(&cgroups, std::process::id(), &Sources::default());
            let (mut buf, mut readings) = (Vec::new(), ContainerReadings::default());
            (0..50)
                .filter(|_| {
                    let full = readers.until_full.is_none_or(|left| left == 0);
                    readers.read(&mut buf, &mut readings).expect("reads");
                    full
                })
                .collect::<Vec<u32>>()
        };
        assert_eq!(full_passes(10), [0, 11, 41]);
        assert_eq!(full_passes(43), [0, 14, 44]);
    }

    #[test]
    fn a_missing_file_names_its_path() {
        let err = StatFile::open(PathBuf::from("/nonexistent/memory.stat")).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/memory.stat"), "{err}");
    }
}
