//! Where each tracked cgroup's counters live in the eBPF maps: a direct slot when its
//! slot is free, else the overflow hash map (and the slot's overflow flag tells the
//! programs to look there). Registering, reading and unregistering cgroups; a sampling
//! pass reads every direct slot in one batch syscall instead of one lookup per cgroup.

use std::collections::HashMap;

use agent_common::{
    COUNTERS_MAP, CgroupCounters, CgroupId, CgroupSlot, SLOT_OVERFLOW_MAP, SLOTS, SLOTS_MAP, slot_index,
};
use std::os::fd::{AsFd, AsRawFd, RawFd};

use aya::{
    Ebpf,
    maps::{Array, IterableMap, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues},
};

use super::ebpf::EbpfError;

/// From this many tracked cgroups on, one batch copy of all [`SLOTS`] slots costs less than a
/// lookup per cgroup (measured: the batch costs about as much as 200 lookups).
const BATCH_FROM_CGROUPS: usize = 256;

fn map_error(name: &'static str) -> impl Fn(MapError) -> EbpfError {
    move |source| EbpfError::Map { name, source }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    Slot(u32),
    Overflow(u32),
}

/// The counters maps of one loaded object.
pub struct CounterStore {
    slots: PerCpuArray<MapData, CgroupSlot>,
    overflow_flags: Array<MapData, u32>,
    overflow: PerCpuHashMap<MapData, CgroupId, CgroupCounters>,
    placements: HashMap<CgroupId, Placement>,
    /// How many overflow cgroups each slot index has.
    overflow_counts: HashMap<u32, u32>,
    cpus: usize,
    /// Every direct slot's per-CPU copies as of the last [`CounterStore::refresh`].
    batch: Vec<u8>,
    /// Whether `batch` is current (a refresh worked and nothing was registered since).
    batch_fresh: bool,
}

impl CounterStore {
    pub fn take_from(ebpf: &mut Ebpf, cpus: usize) -> Result<Self, EbpfError> {
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(EbpfError::MissingMap(name));
        let slots = PerCpuArray::try_from(take(SLOTS_MAP)?).map_err(map_error(SLOTS_MAP))?;
        let overflow_flags = Array::try_from(take(SLOT_OVERFLOW_MAP)?).map_err(map_error(SLOT_OVERFLOW_MAP))?;
        let overflow = PerCpuHashMap::try_from(take(COUNTERS_MAP)?).map_err(map_error(COUNTERS_MAP))?;
        Ok(Self {
            slots,
            overflow_flags,
            overflow,
            placements: HashMap::new(),
            overflow_counts: HashMap::new(),
            cpus,
            batch: Vec::new(),
            batch_fresh: false,
        })
    }

    fn per_cpu<T: aya::Pod + Clone>(&self, value: T, name: &'static str) -> Result<PerCpuValues<T>, EbpfError> {
        PerCpuValues::try_from(vec![value; self.cpus])
            .map_err(|source| EbpfError::Map { name, source: MapError::IoError(source) })
    }

    /// Rebuilds which cgroups are registered, and where, from maps an earlier agent filled
    /// (pinned maps outlive it); returns how many cgroups were found.
    pub fn recover(&mut self) -> Result<usize, EbpfError> {
        self.placements.clear();
        self.overflow_counts.clear();
        for index in 0..SLOTS {
            let slot = self.slots.get(&index, 0).map_err(map_error(SLOTS_MAP))?;
            // Registration writes the id into every CPU's copy.
            if let Some(id) = slot.iter().map(|cpu| cpu.cgroup_id).find(|&id| id != 0) {
                self.placements.insert(id, Placement::Slot(index));
            }
        }
        let overflowed: Vec<CgroupId> = self.overflow.keys().filter_map(Result::ok).collect();
        for id in overflowed {
            let index = slot_index(id);
            self.placements.insert(id, Placement::Overflow(index));
            *self.overflow_counts.entry(index).or_insert(0) += 1;
        }
        self.batch_fresh = false;
        Ok(self.placements.len())
    }

    /// Every registered cgroup.
    pub fn registered(&self) -> Vec<CgroupId> {
        self.placements.keys().copied().collect()
    }

    /// Starts counting `id` from zero.
    pub fn register(&mut self, id: CgroupId) -> Result<(), EbpfError> {
        if self.placements.contains_key(&id) {
            return Ok(());
        }
        // The batch holds whoever had this slot before.
        self.batch_fresh = false;
        let index = slot_index(id);
        let slot_taken = self.placements.values().any(|p| *p == Placement::Slot(index));
        if !slot_taken {
            let fresh = self.per_cpu(CgroupSlot { cgroup_id: id, counters: CgroupCounters::default() }, SLOTS_MAP)?;
            self.slots.set(index, fresh, 0).map_err(map_error(SLOTS_MAP))?;
            self.placements.insert(id, Placement::Slot(index));
            return Ok(());
        }
        let zeros = self.per_cpu(CgroupCounters::default(), COUNTERS_MAP)?;
        self.overflow.insert(id, zeros, 0).map_err(map_error(COUNTERS_MAP))?;
        let count = self.overflow_counts.entry(index).or_insert(0);
        *count += 1;
        if *count == 1 {
            self.overflow_flags.set(index, 1, 0).map_err(map_error(SLOT_OVERFLOW_MAP))?;
        }
        self.placements.insert(id, Placement::Overflow(index));
        Ok(())
    }

    /// Prepares a sampling pass: with many cgroups tracked, reads every direct slot at once
    /// ([`CounterStore::refresh_batch`]); with few, one lookup each is cheaper than copying
    /// every slot, and [`CounterStore::read_sampled`] looks each one up.
    pub fn refresh(&mut self) {
        if self.placements.len() >= BATCH_FROM_CGROUPS {
            self.refresh_batch();
        } else {
            self.batch_fresh = false;
        }
    }

    /// Reads every direct slot at once (`BPF_MAP_LOOKUP_BATCH`), for [`CounterStore::read_sampled`];
    /// false when the kernel cannot, and the pass reads slot by slot instead.
    pub fn refresh_batch(&mut self) -> bool {
        let stride = std::mem::size_of::<CgroupSlot>().next_multiple_of(8);
        self.batch.resize(SLOTS as usize * self.cpus * stride, 0);
        let fd = self.slots.map().fd().as_fd().as_raw_fd();
        self.batch_fresh = match lookup_batch(fd, SLOTS, &mut self.batch) {
            Ok(()) => true,
            Err(err) => {
                tracing::debug!(error = %err, "batch lookup of the counter slots failed; reading them one by one");
                false
            }
        };
        self.batch_fresh
    }

    /// `id`'s counters summed over CPUs as of the last refresh (direct slots), or read now.
    pub fn read_sampled(&self, id: CgroupId) -> Result<CgroupCounters, EbpfError> {
        let Some(Placement::Slot(index)) = self.placements.get(&id) else { return self.read(id) };
        if !self.batch_fresh {
            return self.read(id);
        }
        let stride = std::mem::size_of::<CgroupSlot>().next_multiple_of(8);
        let mut total = CgroupCounters::default();
        for cpu in 0..self.cpus {
            let at = (*index as usize * self.cpus + cpu) * stride;
            let Some(bytes) = self.batch.get(at..at + std::mem::size_of::<CgroupSlot>()) else { break };
            // SAFETY: CgroupSlot is plain #[repr(C)] integers and `bytes` holds one whole slot
            // as the kernel copied it; read_unaligned copes with any alignment.
            let slot: CgroupSlot = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            if slot.cgroup_id == id {
                total.accumulate(&slot.counters);
            }
        }
        Ok(total)
    }

    /// `id`'s counters summed over CPUs, read now.
    pub fn read(&self, id: CgroupId) -> Result<CgroupCounters, EbpfError> {
        let mut total = CgroupCounters::default();
        match self.placements.get(&id) {
            Some(Placement::Slot(index)) => {
                for cpu in self.slots.get(index, 0).map_err(map_error(SLOTS_MAP))?.iter() {
                    if cpu.cgroup_id == id {
                        total.accumulate(&cpu.counters);
                    }
                }
            }
            Some(Placement::Overflow(_)) => {
                for cpu in self.overflow.get(&id, 0).map_err(map_error(COUNTERS_MAP))?.iter() {
                    total.accumulate(cpu);
                }
            }
            None => return Err(EbpfError::NotAttached(id)),
        }
        Ok(total)
    }

    /// Stops counting `id`; returns its last counters.
    pub fn unregister(&mut self, id: CgroupId) -> Result<CgroupCounters, EbpfError> {
        let last = self.read(id);
        match self.placements.remove(&id) {
            Some(Placement::Slot(index)) => {
                let free = self.per_cpu(CgroupSlot::default(), SLOTS_MAP)?;
                self.slots.set(index, free, 0).map_err(map_error(SLOTS_MAP))?;
            }
            Some(Placement::Overflow(index)) => {
                let _ = self.overflow.remove(&id);
                if let Some(count) = self.overflow_counts.get_mut(&index) {
                    *count = count.saturating_sub(1);
                    if *count == 0 {
                        self.overflow_counts.remove(&index);
                        self.overflow_flags.set(index, 0, 0).map_err(map_error(SLOT_OVERFLOW_MAP))?;
                    }
                }
            }
            None => return Err(EbpfError::NotAttached(id)),
        }
        last
    }

    /// (cgroups in direct slots, cgroups in the overflow map)
    pub fn occupancy(&self) -> (usize, usize) {
        let direct = self.placements.values().filter(|p| matches!(p, Placement::Slot(_))).count();
        (direct, self.placements.len() - direct)
    }
}

/// `BPF_MAP_LOOKUP_BATCH` of the first `count` entries of an array map into `values`
/// (aya 0.14 has no batch operations): one syscall for what would be `count` lookups.
fn lookup_batch(map_fd: RawFd, count: u32, values: &mut [u8]) -> std::io::Result<()> {
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    #[repr(C)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    let mut keys = vec![0u32; count as usize];
    let mut next_batch: u32 = 0;
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: std::ptr::addr_of_mut!(next_batch) as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count,
        map_fd: u32::try_from(map_fd).map_err(std::io::Error::other)?,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: attr is fully initialised and its size passed; keys, values and next_batch
    // outlive the call and are as large as `count` entries need (the caller sized values for
    // every possible CPU); the kernel writes no more than that.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_BATCH,
            std::ptr::addr_of_mut!(attr),
            std::mem::size_of::<BatchAttr>(),
        )
    };
    // ENOENT: the batch reached the end of the map, with every entry copied.
    if rc != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOENT) {
        return Err(std::io::Error::last_os_error());
    }
    if attr.count != count {
        return Err(std::io::Error::other(format!("batch lookup copied {} of {count} slots", attr.count)));
    }
    Ok(())
}
