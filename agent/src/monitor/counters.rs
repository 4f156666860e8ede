//! Where each tracked cgroup's counters live in the eBPF maps: a direct slot when its
//! slot is free, else the overflow hash map (and the slot's overflow flag tells the
//! programs to look there). Registering, reading and unregistering cgroups.

use std::collections::HashMap;

use agent_common::{COUNTERS_MAP, CgroupCounters, CgroupId, CgroupSlot, SLOT_OVERFLOW_MAP, SLOTS_MAP, slot_index};
use aya::{
    Ebpf,
    maps::{Array, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues},
};

use super::ebpf::EbpfError;

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
}

impl CounterStore {
    pub fn take_from(ebpf: &mut Ebpf, cpus: usize) -> Result<Self, EbpfError> {
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(EbpfError::MissingMap(name));
        let slots = PerCpuArray::try_from(take(SLOTS_MAP)?).map_err(map_error(SLOTS_MAP))?;
        let overflow_flags = Array::try_from(take(SLOT_OVERFLOW_MAP)?).map_err(map_error(SLOT_OVERFLOW_MAP))?;
        let overflow = PerCpuHashMap::try_from(take(COUNTERS_MAP)?).map_err(map_error(COUNTERS_MAP))?;
        Ok(Self { slots, overflow_flags, overflow, placements: HashMap::new(), overflow_counts: HashMap::new(), cpus })
    }

    fn per_cpu<T: aya::Pod + Clone>(&self, value: T, name: &'static str) -> Result<PerCpuValues<T>, EbpfError> {
        PerCpuValues::try_from(vec![value; self.cpus])
            .map_err(|source| EbpfError::Map { name, source: MapError::IoError(source) })
    }

    /// Starts counting `id` from zero.
    pub fn register(&mut self, id: CgroupId) -> Result<(), EbpfError> {
        if self.placements.contains_key(&id) {
            return Ok(());
        }
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

    /// `id`'s counters summed over CPUs.
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
