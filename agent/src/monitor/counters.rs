//! Where each tracked cgroup's counters live in the eBPF maps: a direct slot when its slot is
//! free (one [`CounterLine`] per CPU in an array the agent memory-maps, so a read is a few
//! loads and no syscall), else the overflow hash map (and the slot's overflow flag tells the
//! programs to look there). Registering, reading and unregistering cgroups, and each cgroup's
//! baseline: what it had counted before it was registered, read from its cgroup files.

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering, fence},
};

use agent_common::{
    BASELINES_MAP, COUNTERS_MAP, CgroupCounters, CgroupId, CounterLine, SLOT_OVERFLOW_MAP, SLOTS, SLOTS_MAP,
    line_index, slot_index,
};
use aya::{
    Ebpf,
    maps::{Array, HashMap as BpfHashMap, IterableMap, MapData, MapError, PerCpuHashMap, PerCpuValues},
};

use rustc_hash::FxHashMap as HashMap;

/// A counter map missing from the object, or failing to read or write.
#[derive(Debug, thiserror::Error)]
pub enum CounterError {
    #[error("eBPF map `{0}` is missing from the object")]
    MissingMap(&'static str),
    #[error("eBPF map `{name}`: {source}")]
    Map { name: &'static str, source: MapError },
    #[error("cgroup {0} is not attached")]
    NotAttached(CgroupId),
    #[error("reading the cgroup files of cgroup {id} for its baseline: {source}")]
    Baseline { id: CgroupId, source: std::io::Error },
}

fn map_error(name: &'static str) -> impl Fn(MapError) -> CounterError {
    move |source| CounterError::Map { name, source }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    Slot(u32),
    Overflow(u32),
}

/// Where one registered cgroup's counters are, and its baseline: what a sampling pass needs to
/// read them without looking anything up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterHandle {
    id: CgroupId,
    placement: Placement,
    baseline: CgroupCounters,
}

/// 64-bit words in a [`CounterLine`]: the cgroup id, then the counters (then padding).
const LINE_WORDS: usize = std::mem::size_of::<CounterLine>() / 8;
const COUNTER_WORDS: usize = std::mem::size_of::<CgroupCounters>() / 8;

/// The counter lines, memory-mapped from the array map (`BPF_F_MMAPABLE`).
struct MappedLines {
    base: NonNull<u8>,
    len: usize,
    lines: usize,
}

// SAFETY: the mapping is plain shared memory that lives until Drop; every access goes through
// atomic loads and stores of aligned 64-bit words, so moving it to another thread is sound.
unsafe impl Send for MappedLines {}

impl MappedLines {
    fn map(map: &MapData, lines: usize) -> io::Result<MappedLines> {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let len = (lines * std::mem::size_of::<CounterLine>()).next_multiple_of(page);
        // SAFETY: a shared read-write mapping of the map's whole value area, which the kernel
        // page-aligns for mmapable arrays; the result is checked before use.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(base.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(MappedLines { base, len, lines })
    }

    /// The `word`th 64-bit word of line `index`, shared with the programs.
    fn word(&self, index: usize, word: usize) -> Option<&AtomicU64> {
        if index >= self.lines || word >= LINE_WORDS {
            return None;
        }
        let at = index * std::mem::size_of::<CounterLine>() + word * 8;
        // SAFETY: in bounds (checked above) of a live mapping, 8-byte aligned (lines are 128
        // bytes from a page-aligned base), and only ever accessed atomically.
        Some(unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(at).cast::<u64>()) })
    }

    fn id(&self, index: usize) -> CgroupId {
        self.word(index, 0).map_or(0, |w| w.load(Ordering::Acquire))
    }

    fn counters(&self, index: usize) -> CgroupCounters {
        let mut words = [0u64; COUNTER_WORDS];
        for (i, word) in words.iter_mut().enumerate() {
            *word = self.word(index, 1 + i).map_or(0, |w| w.load(Ordering::Relaxed));
        }
        // SAFETY: CgroupCounters is #[repr(C)] with exactly COUNTER_WORDS u64 fields.
        unsafe { std::mem::transmute::<[u64; COUNTER_WORDS], CgroupCounters>(words) }
    }

    /// Zeroes a line's counters, then names its owner (the programs count only after that).
    fn claim(&self, index: usize, id: CgroupId) {
        for i in 0..COUNTER_WORDS {
            if let Some(word) = self.word(index, 1 + i) {
                word.store(0, Ordering::Relaxed);
            }
        }
        fence(Ordering::Release);
        if let Some(word) = self.word(index, 0) {
            word.store(id, Ordering::Release);
        }
    }

    fn release(&self, index: usize) {
        if let Some(word) = self.word(index, 0) {
            word.store(0, Ordering::Release);
        }
    }
}

impl Drop for MappedLines {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped; nothing borrows it past this point.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// The counters maps of one loaded object.
pub struct CounterStore {
    /// Owns the map the lines are mapped from.
    _lines_map: Array<MapData, CounterLine>,
    lines: MappedLines,
    baselines_map: BpfHashMap<MapData, CgroupId, CgroupCounters>,
    overflow_flags: Array<MapData, u32>,
    overflow: PerCpuHashMap<MapData, CgroupId, CgroupCounters>,
    placements: HashMap<CgroupId, Placement>,
    baselines: HashMap<CgroupId, CgroupCounters>,
    /// How many overflow cgroups each slot index has.
    overflow_counts: HashMap<u32, u32>,
    cpus: usize,
}

impl CounterStore {
    pub fn take_from(ebpf: &mut Ebpf, cpus: usize) -> Result<Self, CounterError> {
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(CounterError::MissingMap(name));
        let lines_map: Array<MapData, CounterLine> = Array::try_from(take(SLOTS_MAP)?).map_err(map_error(SLOTS_MAP))?;
        let lines = MappedLines::map(lines_map.map(), SLOTS as usize * cpus)
            .map_err(|source| CounterError::Map { name: SLOTS_MAP, source: MapError::IoError(source) })?;
        let baselines_map = BpfHashMap::try_from(take(BASELINES_MAP)?).map_err(map_error(BASELINES_MAP))?;
        let overflow_flags = Array::try_from(take(SLOT_OVERFLOW_MAP)?).map_err(map_error(SLOT_OVERFLOW_MAP))?;
        let overflow = PerCpuHashMap::try_from(take(COUNTERS_MAP)?).map_err(map_error(COUNTERS_MAP))?;
        Ok(Self {
            _lines_map: lines_map,
            lines,
            baselines_map,
            overflow_flags,
            overflow,
            placements: HashMap::default(),
            baselines: HashMap::default(),
            overflow_counts: HashMap::default(),
            cpus,
        })
    }

    fn per_cpu<T: aya::Pod + Clone>(&self, value: T, name: &'static str) -> Result<PerCpuValues<T>, CounterError> {
        PerCpuValues::try_from(vec![value; self.cpus])
            .map_err(|source| CounterError::Map { name, source: MapError::IoError(source) })
    }

    fn line(&self, slot: u32, cpu: usize) -> usize {
        line_index(slot, self.cpus as u32, cpu as u32) as usize
    }

    /// Rebuilds which cgroups are registered, and where, and their baselines, from maps an
    /// earlier agent filled (pinned maps outlive it); returns how many cgroups were found.
    pub fn recover(&mut self) -> Result<usize, CounterError> {
        self.placements.clear();
        self.overflow_counts.clear();
        for slot in 0..SLOTS {
            // Registration names the owner in every CPU's line.
            if let Some(id) = (0..self.cpus).map(|cpu| self.lines.id(self.line(slot, cpu))).find(|&id| id != 0) {
                self.placements.insert(id, Placement::Slot(slot));
            }
        }
        let overflowed: Vec<CgroupId> = self.overflow.keys().filter_map(Result::ok).collect();
        for id in overflowed {
            let index = slot_index(id);
            self.placements.insert(id, Placement::Overflow(index));
            *self.overflow_counts.entry(index).or_insert(0) += 1;
        }
        self.baselines = self.baselines_map.iter().filter_map(Result::ok).collect();
        let stale: Vec<CgroupId> =
            self.baselines.keys().filter(|id| !self.placements.contains_key(id)).copied().collect();
        for id in stale {
            self.baselines.remove(&id);
            let _ = self.baselines_map.remove(&id);
        }
        Ok(self.placements.len())
    }

    /// Every registered cgroup.
    pub fn registered(&self) -> Vec<CgroupId> {
        self.placements.keys().copied().collect()
    }

    /// Starts counting `id` from zero; `false` when it was registered already (recovered from
    /// pinned maps: it keeps its counts and baseline).
    pub fn register(&mut self, id: CgroupId) -> Result<bool, CounterError> {
        if self.placements.contains_key(&id) {
            return Ok(false);
        }
        let index = slot_index(id);
        let slot_taken = self.placements.values().any(|p| *p == Placement::Slot(index));
        if !slot_taken {
            for cpu in 0..self.cpus {
                self.lines.claim(self.line(index, cpu), id);
            }
            self.placements.insert(id, Placement::Slot(index));
            return Ok(true);
        }
        let zeros = self.per_cpu(CgroupCounters::default(), COUNTERS_MAP)?;
        self.overflow.insert(id, zeros, 0).map_err(map_error(COUNTERS_MAP))?;
        let count = self.overflow_counts.entry(index).or_insert(0);
        *count += 1;
        if *count == 1 {
            self.overflow_flags.set(index, 1, 0).map_err(map_error(SLOT_OVERFLOW_MAP))?;
        }
        self.placements.insert(id, Placement::Overflow(index));
        Ok(true)
    }

    /// Sets `id`'s baseline of CPU time from its cgroup files: what the cgroup ran before it
    /// was registered (a kernel's start-up, or its whole life when the agent came later), so
    /// that baseline plus counters equal the kernel's own accounting. The files are read
    /// again while a charge lands between the counters' reads around them (at most a few
    /// tries: charges come at most once per tick per CPU).
    pub fn seed_cpu_baseline(
        &mut self,
        id: CgroupId,
        mut read_files: impl FnMut() -> io::Result<u64>,
    ) -> Result<CgroupCounters, CounterError> {
        let mut seen = None;
        for _ in 0..8 {
            let before = self.read_raw(id)?.cpu_ns;
            let files = read_files().map_err(|source| CounterError::Baseline { id, source })?;
            let after = self.read_raw(id)?.cpu_ns;
            seen = Some((before, files));
            if before == after {
                break;
            }
        }
        let Some((counted, files_ns)) = seen else { return Ok(CgroupCounters::default()) };
        let baseline = CgroupCounters { cpu_ns: files_ns.saturating_sub(counted), ..CgroupCounters::default() };
        self.baselines_map.insert(id, baseline, 0).map_err(map_error(BASELINES_MAP))?;
        self.baselines.insert(id, baseline);
        Ok(baseline)
    }

    /// `id`'s counters summed over CPUs, its baseline included, read now.
    pub fn read(&self, id: CgroupId) -> Result<CgroupCounters, CounterError> {
        self.read_handle(&self.handle(id)?)
    }

    /// Where `id`'s counters are (valid until it is unregistered or its baseline set).
    pub fn handle(&self, id: CgroupId) -> Result<CounterHandle, CounterError> {
        let placement = *self.placements.get(&id).ok_or(CounterError::NotAttached(id))?;
        Ok(CounterHandle { id, placement, baseline: self.baselines.get(&id).copied().unwrap_or_default() })
    }

    /// The counters a handle points at, its baseline included, read now.
    pub fn read_handle(&self, handle: &CounterHandle) -> Result<CgroupCounters, CounterError> {
        let mut total = self.read_placement(handle.id, handle.placement)?;
        total.accumulate(&handle.baseline);
        Ok(total)
    }

    /// What the programs counted for `id` since it was registered.
    fn read_raw(&self, id: CgroupId) -> Result<CgroupCounters, CounterError> {
        let placement = *self.placements.get(&id).ok_or(CounterError::NotAttached(id))?;
        self.read_placement(id, placement)
    }

    fn read_placement(&self, id: CgroupId, placement: Placement) -> Result<CgroupCounters, CounterError> {
        let mut total = CgroupCounters::default();
        match placement {
            Placement::Slot(index) => {
                for cpu in 0..self.cpus {
                    let line = self.line(index, cpu);
                    if self.lines.id(line) == id {
                        total.accumulate(&self.lines.counters(line));
                    }
                }
            }
            Placement::Overflow(_) => {
                for cpu in self.overflow.get(&id, 0).map_err(map_error(COUNTERS_MAP))?.iter() {
                    total.accumulate(cpu);
                }
            }
        }
        Ok(total)
    }

    /// Stops counting `id`; returns its last counters (baseline included).
    pub fn unregister(&mut self, id: CgroupId) -> Result<CgroupCounters, CounterError> {
        let mut last = match self.placements.remove(&id) {
            Some(Placement::Slot(index)) => {
                // Read after the owner is cleared: nothing counts into the lines any more.
                let mut last = CgroupCounters::default();
                for cpu in 0..self.cpus {
                    self.lines.release(self.line(index, cpu));
                }
                fence(Ordering::SeqCst);
                for cpu in 0..self.cpus {
                    last.accumulate(&self.lines.counters(self.line(index, cpu)));
                }
                last
            }
            Some(Placement::Overflow(index)) => {
                let mut last = CgroupCounters::default();
                if let Ok(values) = self.overflow.get(&id, 0) {
                    values.iter().for_each(|cpu| last.accumulate(cpu));
                }
                let _ = self.overflow.remove(&id);
                if let Some(count) = self.overflow_counts.get_mut(&index) {
                    *count = count.saturating_sub(1);
                    if *count == 0 {
                        self.overflow_counts.remove(&index);
                        self.overflow_flags.set(index, 0, 0).map_err(map_error(SLOT_OVERFLOW_MAP))?;
                    }
                }
                last
            }
            None => return Err(CounterError::NotAttached(id)),
        };
        if let Some(baseline) = self.baselines.remove(&id) {
            last.accumulate(&baseline);
            let _ = self.baselines_map.remove(&id);
        }
        Ok(last)
    }

    /// (cgroups in direct slots, cgroups in the overflow map)
    pub fn occupancy(&self) -> (usize, usize) {
        let direct = self.placements.values().filter(|p| matches!(p, Placement::Slot(_))).count();
        (direct, self.placements.len() - direct)
    }
}
