//! The node's allocation map: which cores each kernel is pinned to, how much memory and
//! which accelerator devices it holds, and what is left.
//!
//! [`ResourceAllocator`] is thread-safe: it keeps its state behind a `std::sync::Mutex`
//! and every method takes `&self`, so share it with an `Arc`. No method blocks on I/O.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Mutex, MutexGuard},
};

use serde::Deserialize;

use super::{
    capacity::NodeCapacity,
    devices::{DeviceAllocError, DeviceAllocMap, PerDevice},
    slots::{ResourceSlots, SlotAmount},
};

/// How cores are picked for a kernel (`resource.allocation-strategy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AllocationStrategy {
    /// Lowest-numbered cores that have room first: packs kernels, keeps high cores free.
    #[default]
    Fill,
    /// Least-loaded cores first (ties to the lowest number): spreads kernels over cores.
    Evenly,
}

/// What one kernel holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// Cores the kernel is pinned to, ascending (Docker's `CpusetCpus`).
    pub cpuset: Vec<u32>,
    /// Memory limit in bytes.
    pub mem_bytes: u64,
    /// The slots as requested (and accounted).
    pub slots: ResourceSlots,
    /// Accelerator slot → the devices it was given and how much of each (`cuda.device` →
    /// `[("0", 1)]`); empty without accelerators.
    pub devices: BTreeMap<String, PerDevice>,
}

impl Allocation {
    /// The cpuset in Docker's `CpusetCpus` form: `"0-1,3"`; empty when no core is pinned.
    pub fn cpuset_string(&self) -> String {
        format_cpuset(&self.cpuset)
    }
}

/// Formats CPU ids as a kernel CPU list (`0-1,3`), sorted and deduplicated.
pub fn format_cpuset(cpus: &[u32]) -> String {
    let mut cpus = cpus.to_vec();
    cpus.sort_unstable();
    cpus.dedup();
    let mut ranges: Vec<(u32, u32)> = Vec::new();
    for cpu in cpus {
        match ranges.last_mut() {
            Some((_, end)) if end.checked_add(1) == Some(cpu) => *end = cpu,
            _ => ranges.push((cpu, cpu)),
        }
    }
    ranges
        .iter()
        .map(|(start, end)| if start == end { start.to_string() } else { format!("{start}-{end}") })
        .collect::<Vec<_>>()
        .join(",")
}

/// Why an allocation was refused. Nothing is taken when one is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocationError {
    #[error("insufficient {slot}: requested {requested}, available {available} of {capacity}")]
    Insufficient { slot: String, requested: SlotAmount, available: SlotAmount, capacity: SlotAmount },
    #[error(
        "insufficient cpu: requested {requested} cores, but only {with_room} of {cores} cores can take another kernel"
    )]
    NotEnoughCores { requested: u32, with_room: usize, cores: usize },
    #[error("cpu: requested {requested} is not a whole number of cores (kernels are pinned to whole cores)")]
    FractionalCpu { requested: SlotAmount },
    #[error("{slot}: requested {requested} is too large")]
    TooLarge { slot: String, requested: SlotAmount },
    #[error("kernel {kernel_id} already holds an allocation")]
    AlreadyAllocated { kernel_id: String },
    #[error("cannot restore kernel {kernel_id}: {reason}")]
    BadRestore { kernel_id: String, reason: String },
    #[error(transparent)]
    Devices(#[from] DeviceAllocError),
}

#[derive(Debug, Default)]
struct State {
    /// Kernels pinned to each core (cores outside the capacity appear after a restore).
    core_load: BTreeMap<u32, u32>,
    cpu_used: u64,
    mem_used: u64,
    extra_used: BTreeMap<String, SlotAmount>,
    /// One map per accelerator slot this node hands out by device.
    device_maps: Vec<DeviceAllocMap>,
    kernels: HashMap<String, Allocation>,
}

impl State {
    /// Whether `slot` is a plain amount against its capacity: neither `cpu` or `mem` nor a
    /// slot some device map hands out.
    fn pooled(&self, slot: &str) -> bool {
        !is_intrinsic(slot) && !self.device_maps.iter().any(|map| map.slot() == slot)
    }

    fn device_map(&mut self, slot: &str) -> Option<&mut DeviceAllocMap> {
        self.device_maps.iter_mut().find(|map| map.slot() == slot)
    }

    fn free_devices(&mut self, devices: &BTreeMap<String, PerDevice>) {
        for (slot, per_device) in devices {
            if let Some(map) = self.device_map(slot) {
                map.free(per_device);
            }
        }
    }
}

/// Hands out cores, memory and accelerator amounts against a [`NodeCapacity`].
#[derive(Debug)]
pub struct ResourceAllocator {
    capacity: NodeCapacity,
    strategy: AllocationStrategy,
    /// Core → NUMA node, where the host has more than one node (devices near a kernel's
    /// cores are preferred).
    numa_of_core: BTreeMap<u32, u32>,
    state: Mutex<State>,
}

impl ResourceAllocator {
    pub fn new(capacity: NodeCapacity, strategy: AllocationStrategy) -> ResourceAllocator {
        let core_load = capacity.cores.iter().map(|core| (*core, 0)).collect();
        ResourceAllocator {
            capacity,
            strategy,
            numa_of_core: BTreeMap::new(),
            state: Mutex::new(State { core_load, ..State::default() }),
        }
    }

    /// Hands out accelerator slots by device through `maps` (each map's slot gets its
    /// capacity); other accelerator slots stay plain amounts.
    pub fn with_devices(mut self, maps: Vec<DeviceAllocMap>) -> ResourceAllocator {
        for map in &maps {
            let capacity = SlotAmount::from_decimal(map.capacity()).unwrap_or_default();
            self.capacity.extra.insert(map.slot(), capacity);
        }
        self.state.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner()).device_maps = maps;
        self
    }

    /// Which NUMA node each core is on (see [`super::capacity::numa_nodes_of_cores`]).
    pub fn with_numa(mut self, numa_of_core: BTreeMap<u32, u32>) -> ResourceAllocator {
        self.numa_of_core = numa_of_core;
        self
    }

    pub fn node_capacity(&self) -> &NodeCapacity {
        &self.capacity
    }

    pub fn strategy(&self) -> AllocationStrategy {
        self.strategy
    }

    /// A poisoned lock still holds consistent state: every method checks before it mutates.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes what `request` asks for: `cpu` as whole cores pinned from the core map, `mem`
    /// as bytes, any other slot as an amount of its capacity. All or nothing.
    pub fn allocate(&self, kernel_id: &str, request: &ResourceSlots) -> Result<Allocation, AllocationError> {
        let mut state = self.lock();
        if state.kernels.contains_key(kernel_id) {
            return Err(AllocationError::AlreadyAllocated { kernel_id: kernel_id.to_string() });
        }

        // cpu: whole cores, within the cpu slot capacity and on distinct cores with room.
        let cpu_requested = request.amount("cpu");
        if !cpu_requested.is_integer() {
            return Err(AllocationError::FractionalCpu { requested: cpu_requested });
        }
        let cores_wanted = cpu_requested
            .to_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| AllocationError::TooLarge { slot: "cpu".into(), requested: cpu_requested })?;
        let cpu_capacity = u64::from(self.capacity.cpu);
        let cpu_available = cpu_capacity.saturating_sub(state.cpu_used);
        if u64::from(cores_wanted) > cpu_available {
            return Err(AllocationError::Insufficient {
                slot: "cpu".into(),
                requested: cpu_requested,
                available: SlotAmount::from_u64(cpu_available),
                capacity: SlotAmount::from_u64(cpu_capacity),
            });
        }
        let cpuset = self.pick_cores(&state, cores_wanted)?;

        // mem: bytes.
        let mem_requested = request.amount("mem");
        let mem_bytes = mem_requested
            .to_u64()
            .ok_or_else(|| AllocationError::TooLarge { slot: "mem".into(), requested: mem_requested })?;
        let mem_available = self.capacity.mem_bytes.saturating_sub(state.mem_used);
        if mem_bytes > mem_available {
            return Err(AllocationError::Insufficient {
                slot: "mem".into(),
                requested: mem_requested,
                available: SlotAmount::from_u64(mem_available),
                capacity: SlotAmount::from_u64(self.capacity.mem_bytes),
            });
        }

        // Everything else: a plain amount against the slot's capacity (none if unknown here);
        // device slots are checked by their maps below.
        let mut extra_after = Vec::new();
        for (slot, requested) in request.iter().filter(|(slot, amount)| !amount.is_zero() && state.pooled(slot)) {
            let capacity = self.capacity.extra.amount(slot);
            let used = state.extra_used.get(slot).copied().unwrap_or_default();
            let available = capacity.checked_sub(used).unwrap_or_default();
            if requested > available {
                return Err(AllocationError::Insufficient { slot: slot.to_string(), requested, available, capacity });
            }
            let after = used
                .checked_add(requested)
                .ok_or_else(|| AllocationError::TooLarge { slot: slot.to_string(), requested })?;
            extra_after.push((slot.to_string(), after));
        }

        // Devices last, near the kernel's cores: all of them or none.
        let devices = self.allocate_devices(&mut state, request, &cpuset)?;

        // Every check passed: take it.
        for core in &cpuset {
            *state.core_load.entry(*core).or_default() += 1;
        }
        state.cpu_used += u64::from(cores_wanted);
        state.mem_used += mem_bytes;
        state.extra_used.extend(extra_after);
        let allocation = Allocation { cpuset, mem_bytes, slots: request.clone(), devices };
        state.kernels.insert(kernel_id.to_string(), allocation.clone());
        Ok(allocation)
    }

    /// Takes every device slot of `request` from its map; on a refusal gives back what the
    /// earlier slots took.
    fn allocate_devices(
        &self,
        state: &mut State,
        request: &ResourceSlots,
        cpuset: &[u32],
    ) -> Result<BTreeMap<String, PerDevice>, AllocationError> {
        let numa_nodes = cpuset.iter().filter_map(|core| self.numa_of_core.get(core).copied()).collect();
        let mut taken: BTreeMap<String, PerDevice> = BTreeMap::new();
        for (slot, requested) in request.iter().filter(|(_, amount)| !amount.is_zero()) {
            let Some(map) = state.device_map(slot) else { continue };
            match map.allocate(requested.as_decimal(), &numa_nodes) {
                Ok(per_device) => {
                    taken.insert(slot.to_owned(), per_device);
                }
                Err(err) => {
                    state.free_devices(&taken);
                    return Err(err.into());
                }
            }
        }
        Ok(taken)
    }

    fn pick_cores(&self, state: &State, wanted: u32) -> Result<Vec<u32>, AllocationError> {
        let limit = self.capacity.kernels_per_core;
        let mut candidates: Vec<(u32, u32)> = self
            .capacity
            .cores
            .iter()
            .map(|core| (*core, state.core_load.get(core).copied().unwrap_or(0)))
            .filter(|(_, load)| *load < limit)
            .collect();
        let wanted_count = usize::try_from(wanted).unwrap_or(usize::MAX);
        if candidates.len() < wanted_count {
            return Err(AllocationError::NotEnoughCores {
                requested: wanted,
                with_room: candidates.len(),
                cores: self.capacity.cores.len(),
            });
        }
        match self.strategy {
            AllocationStrategy::Fill => candidates.sort_by_key(|(core, _)| *core),
            AllocationStrategy::Evenly => candidates.sort_by_key(|(core, load)| (*load, *core)),
        }
        let mut cpuset: Vec<u32> = candidates.into_iter().take(wanted_count).map(|(core, _)| core).collect();
        cpuset.sort_unstable();
        Ok(cpuset)
    }

    /// Gives back what `kernel_id` holds; `None` (and no change) when it holds nothing.
    pub fn free(&self, kernel_id: &str) -> Option<Allocation> {
        let mut state = self.lock();
        let allocation = state.kernels.remove(kernel_id)?;
        for core in &allocation.cpuset {
            if let Some(load) = state.core_load.get_mut(core) {
                *load = load.saturating_sub(1);
            }
        }
        state.cpu_used = state.cpu_used.saturating_sub(allocation.cpuset.len() as u64);
        state.mem_used = state.mem_used.saturating_sub(allocation.mem_bytes);
        state.free_devices(&allocation.devices);
        let pooled: Vec<(&str, SlotAmount)> = allocation.slots.iter().filter(|(slot, _)| state.pooled(slot)).collect();
        for (slot, amount) in pooled {
            if let Some(used) = state.extra_used.get_mut(slot) {
                *used = used.checked_sub(amount).unwrap_or_default();
            }
        }
        Some(allocation)
    }

    /// Records an allocation found on a running kernel after an agent restart (from its
    /// `resource.txt`). The kernel is running whatever the map says, so this accounts for it
    /// even past capacity (with a warning); it refuses only a kernel that already holds an
    /// allocation, and a cpuset that names a core twice.
    pub fn restore(&self, kernel_id: &str, allocation: Allocation) -> Result<(), AllocationError> {
        let mut state = self.lock();
        if state.kernels.contains_key(kernel_id) {
            return Err(AllocationError::AlreadyAllocated { kernel_id: kernel_id.to_string() });
        }
        let mut cpuset = allocation.cpuset.clone();
        cpuset.sort_unstable();
        if cpuset.windows(2).any(|pair| pair[0] == pair[1]) {
            return Err(AllocationError::BadRestore {
                kernel_id: kernel_id.to_string(),
                reason: format!("cpuset {:?} names a core twice", allocation.cpuset),
            });
        }
        let mut extra_after = Vec::new();
        for (slot, amount) in allocation.slots.iter().filter(|(slot, _)| state.pooled(slot)) {
            let used = state.extra_used.get(slot).copied().unwrap_or_default();
            let after = used.checked_add(amount).ok_or_else(|| AllocationError::BadRestore {
                kernel_id: kernel_id.to_string(),
                reason: format!("{slot} = {amount} overflows"),
            })?;
            extra_after.push((slot.to_string(), after));
        }

        for core in &cpuset {
            let load = state.core_load.entry(*core).or_default();
            *load += 1;
            if !self.capacity.cores.contains(core) || *load > self.capacity.kernels_per_core {
                tracing::warn!(kernel_id, core, load = *load, "restored kernel is pinned past this node's core map");
            }
        }
        state.cpu_used += cpuset.len() as u64;
        state.mem_used = state.mem_used.saturating_add(allocation.mem_bytes);
        if state.cpu_used > u64::from(self.capacity.cpu) || state.mem_used > self.capacity.mem_bytes {
            tracing::warn!(
                kernel_id,
                cpu_used = state.cpu_used,
                mem_used = state.mem_used,
                "restored allocations exceed this node's capacity"
            );
        }
        state.extra_used.extend(extra_after);
        for (slot, per_device) in &allocation.devices {
            match state.device_map(slot) {
                Some(map) => map.apply(per_device),
                None => tracing::warn!(
                    kernel_id,
                    slot,
                    "a restored kernel holds devices of a slot this node no longer hands out"
                ),
            }
        }
        state.kernels.insert(kernel_id.to_string(), Allocation { cpuset, ..allocation });
        Ok(())
    }

    /// The node's slots (`cpu`, `mem`, accelerator slots).
    pub fn capacity(&self) -> ResourceSlots {
        self.capacity.slots()
    }

    /// What kernels hold now, per slot (every capacity slot is listed, zero if unused).
    pub fn used(&self) -> ResourceSlots {
        let state = self.lock();
        let mut used: ResourceSlots = self.capacity.extra.iter().map(|(slot, _)| (slot, SlotAmount::ZERO)).collect();
        for (slot, amount) in &state.extra_used {
            used.insert(slot.clone(), *amount);
        }
        for map in &state.device_maps {
            used.insert(map.slot(), SlotAmount::from_decimal(map.used()).unwrap_or_default());
        }
        used.insert("cpu", SlotAmount::from_u64(state.cpu_used));
        used.insert("mem", SlotAmount::from_u64(state.mem_used));
        used
    }

    /// What `kernel_id` holds, if anything.
    pub fn allocation(&self, kernel_id: &str) -> Option<Allocation> {
        self.lock().kernels.get(kernel_id).cloned()
    }

    /// Kernel ids holding an allocation, sorted.
    pub fn kernel_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.lock().kernels.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Every device map's devices: `(slot, device id, held, capacity)`.
    pub fn device_usage(&self) -> Vec<(String, String, SlotAmount, SlotAmount)> {
        let state = self.lock();
        let amount = |value| SlotAmount::from_decimal(value).unwrap_or_default();
        state
            .device_maps
            .iter()
            .flat_map(|map| {
                map.per_device()
                    .into_iter()
                    .map(|(id, held, capacity)| (map.slot().to_owned(), id, amount(held), amount(capacity)))
            })
            .collect()
    }

    /// Kernels pinned to each core, ascending by core.
    pub fn core_loads(&self) -> Vec<(u32, u32)> {
        self.lock().core_load.iter().map(|(core, load)| (*core, *load)).collect()
    }
}

fn is_intrinsic(slot: &str) -> bool {
    slot == "cpu" || slot == "mem"
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::resources::{
        devices::{AllocationMode, DeviceCapacity},
        slots::{SlotAmount, SlotType},
    };

    const GIB: u64 = 1 << 30;

    fn request(cpu: &str, mem: u64) -> ResourceSlots {
        let mut slots = ResourceSlots::new();
        slots.insert("cpu", SlotAmount::parse_str(cpu, SlotType::Count, "cpu").expect("amount"));
        slots.insert("mem", SlotAmount::from_u64(mem));
        slots
    }

    fn allocator(cores: &[u32], mem: u64, strategy: AllocationStrategy) -> ResourceAllocator {
        ResourceAllocator::new(NodeCapacity::fixed(cores.to_vec(), mem), strategy)
    }

    #[test]
    fn cpuset_strings_use_ranges() {
        assert_eq!(format_cpuset(&[]), "");
        assert_eq!(format_cpuset(&[3]), "3");
        assert_eq!(format_cpuset(&[0, 1, 3]), "0-1,3");
        assert_eq!(format_cpuset(&[5, 0, 2, 1, 6, 7]), "0-2,5-7");
        assert_eq!(format_cpuset(&[1, 1, 2]), "1-2");
    }

    #[test]
    fn fill_takes_the_lowest_free_cores() {
        let alloc = allocator(&[0, 1, 2, 3], 8 * GIB, AllocationStrategy::Fill);
        let a = alloc.allocate("a", &request("2", GIB)).expect("fits");
        assert_eq!(a.cpuset, vec![0, 1]);
        assert_eq!(a.cpuset_string(), "0-1");
        assert_eq!(a.mem_bytes, GIB);
        let b = alloc.allocate("b", &request("1", GIB)).expect("fits");
        assert_eq!(b.cpuset, vec![2]);
        alloc.free("a").expect("held");
        let c = alloc.allocate("c", &request("2", GIB)).expect("fits");
        assert_eq!(c.cpuset_string(), "0-1");
        let d = alloc.allocate("d", &request("1", GIB)).expect("fits");
        assert_eq!(d.cpuset, vec![3]);
    }

    #[test]
    fn evenly_takes_the_least_loaded_cores() {
        let mut capacity = NodeCapacity::fixed(vec![0, 1, 2], 8 * GIB);
        capacity.kernels_per_core = 2;
        capacity.cpu = 6;
        let alloc = ResourceAllocator::new(capacity, AllocationStrategy::Evenly);
        assert_eq!(alloc.allocate("a", &request("2", GIB)).expect("fits").cpuset, vec![0, 1]);
        assert_eq!(alloc.allocate("b", &request("2", GIB)).expect("fits").cpuset, vec![0, 2], "2 is idle, 0 ties 1");
        assert_eq!(alloc.allocate("c", &request("1", GIB)).expect("fits").cpuset, vec![1]);
        assert_eq!(alloc.core_loads(), vec![(0, 2), (1, 2), (2, 1)]);
    }

    #[test]
    fn fill_packs_shared_cores_under_overcommit() {
        let mut capacity = NodeCapacity::fixed(vec![0, 1], 8 * GIB);
        capacity.kernels_per_core = 2;
        capacity.cpu = 4;
        let alloc = ResourceAllocator::new(capacity, AllocationStrategy::Fill);
        assert_eq!(alloc.allocate("a", &request("1", GIB)).expect("fits").cpuset, vec![0]);
        assert_eq!(alloc.allocate("b", &request("1", GIB)).expect("fits").cpuset, vec![0], "core 0 is shared");
        let err = alloc.allocate("c", &request("2", GIB)).expect_err("only core 1 has room");
        assert_eq!(
            err.to_string(),
            "insufficient cpu: requested 2 cores, but only 1 of 2 cores can take another kernel"
        );
        assert_eq!(alloc.allocate("d", &request("1", GIB)).expect("fits").cpuset, vec![1]);
        assert_eq!(alloc.allocate("e", &request("1", GIB)).expect("fits").cpuset, vec![1]);
        let err = alloc.allocate("f", &request("1", GIB)).expect_err("all four shares taken");
        assert_eq!(err.to_string(), "insufficient cpu: requested 1, available 0 of 4");
    }

    #[test]
    fn a_kernel_never_gets_one_core_twice() {
        let mut capacity = NodeCapacity::fixed(vec![0, 1], 8 * GIB);
        capacity.kernels_per_core = 4;
        capacity.cpu = 8;
        let alloc = ResourceAllocator::new(capacity, AllocationStrategy::Fill);
        let err = alloc.allocate("a", &request("3", GIB)).expect_err("only two cores");
        assert!(matches!(err, AllocationError::NotEnoughCores { requested: 3, with_room: 2, cores: 2 }), "{err}");
    }

    #[test]
    fn insufficient_names_slot_and_numbers() {
        let alloc = allocator(&[0, 1], 4 * GIB, AllocationStrategy::Fill);
        alloc.allocate("a", &request("1", GIB)).expect("fits");
        let err = alloc.allocate("b", &request("4", GIB)).expect_err("too many cores");
        assert_eq!(err.to_string(), "insufficient cpu: requested 4, available 1 of 2");
        let err = alloc.allocate("b", &request("1", 4 * GIB)).expect_err("too much memory");
        assert_eq!(
            err.to_string(),
            format!("insufficient mem: requested {}, available {} of {}", 4 * GIB, 3 * GIB, 4 * GIB)
        );
        let err = alloc.allocate("b", &request("0.5", GIB)).expect_err("fraction");
        assert!(matches!(err, AllocationError::FractionalCpu { .. }), "{err}");
    }

    #[test]
    fn failed_allocation_takes_nothing() {
        let alloc = allocator(&[0, 1], 4 * GIB, AllocationStrategy::Fill);
        let before = (alloc.used(), alloc.core_loads());
        // cpu fits, mem does not: the cores must not stay taken.
        alloc.allocate("a", &request("2", 5 * GIB)).expect_err("mem too large");
        // cpu and mem fit, the accelerator does not.
        let mut with_gpu = request("1", GIB);
        with_gpu.insert("cuda.device", SlotAmount::from_u64(1));
        let err = alloc.allocate("a", &with_gpu).expect_err("no GPU here");
        assert_eq!(err.to_string(), "insufficient cuda.device: requested 1, available 0 of 0");
        assert_eq!((alloc.used(), alloc.core_loads()), before);
        assert!(alloc.allocation("a").is_none());
        alloc.allocate("a", &request("2", 4 * GIB)).expect("everything is still free");
    }

    #[test]
    fn accelerator_slots_are_pooled_amounts() {
        let capacity = NodeCapacity::fixed(vec![0, 1, 2], 4 * GIB)
            .with_slot("cuda.shares", SlotAmount::parse_str("1", SlotType::Count, "x").expect("amount"));
        let alloc = ResourceAllocator::new(capacity, AllocationStrategy::Fill);
        let mut half = request("1", GIB);
        half.insert("cuda.shares", SlotAmount::parse_str("0.5", SlotType::Count, "x").expect("amount"));
        alloc.allocate("a", &half).expect("fits");
        alloc.allocate("b", &half).expect("fits");
        let err = alloc.allocate("c", &half).expect_err("shares used up");
        assert_eq!(err.to_string(), "insufficient cuda.shares: requested 0.5, available 0 of 1");
        assert_eq!(alloc.used().amount("cuda.shares").to_string(), "1");
        alloc.free("a");
        assert_eq!(alloc.used().amount("cuda.shares").to_string(), "0.5");
    }

    #[test]
    fn double_allocation_and_free_are_handled() {
        let alloc = allocator(&[0, 1], 4 * GIB, AllocationStrategy::Fill);
        alloc.allocate("a", &request("1", GIB)).expect("fits");
        let err = alloc.allocate("a", &request("1", GIB)).expect_err("twice");
        assert_eq!(err.to_string(), "kernel a already holds an allocation");
        assert!(alloc.free("a").is_some());
        assert!(alloc.free("a").is_none(), "free is idempotent");
        assert_eq!(alloc.used(), request("0", 0));
    }

    #[test]
    fn capacity_and_used_report_slots() {
        let alloc = allocator(&[2, 3], 4 * GIB, AllocationStrategy::Fill);
        assert_eq!(alloc.capacity(), request("2", 4 * GIB));
        let a = alloc.allocate("a", &request("1", GIB)).expect("fits");
        assert_eq!(a.cpuset, vec![2]);
        assert_eq!(alloc.used(), request("1", GIB));
        assert_eq!(alloc.kernel_ids(), vec!["a".to_string()]);
        assert_eq!(alloc.allocation("a"), Some(a));
    }

    #[test]
    fn zero_cpu_pins_no_core() {
        let alloc = allocator(&[0], GIB, AllocationStrategy::Fill);
        let a = alloc.allocate("a", &request("0", GIB)).expect("fits");
        assert!(a.cpuset.is_empty());
        assert_eq!(a.cpuset_string(), "");
    }

    #[test]
    fn restore_accounts_and_refuses_doubles() {
        let alloc = allocator(&[0, 1, 2], 4 * GIB, AllocationStrategy::Fill);
        let restored =
            Allocation { cpuset: vec![1, 0], mem_bytes: GIB, slots: request("2", GIB), devices: BTreeMap::new() };
        alloc.restore("a", restored.clone()).expect("restores");
        assert_eq!(alloc.allocation("a").expect("held").cpuset, vec![0, 1]);
        assert_eq!(alloc.used(), request("2", GIB));
        let err = alloc.restore("a", restored).expect_err("twice");
        assert!(matches!(err, AllocationError::AlreadyAllocated { .. }), "{err}");
        assert_eq!(alloc.allocate("b", &request("1", GIB)).expect("fits").cpuset, vec![2]);
        let err = alloc
            .restore(
                "c",
                Allocation { cpuset: vec![1, 1], mem_bytes: 0, slots: request("2", 0), devices: BTreeMap::new() },
            )
            .expect_err("a core twice");
        assert!(err.to_string().contains("names a core twice"), "{err}");
        assert!(alloc.allocation("c").is_none());
    }

    #[test]
    fn restore_past_capacity_is_accounted() {
        let alloc = allocator(&[1], GIB, AllocationStrategy::Fill);
        // Pinned to a core this node no longer hands out (reserved-cpu changed).
        alloc
            .restore(
                "a",
                Allocation {
                    cpuset: vec![0],
                    mem_bytes: 2 * GIB,
                    slots: request("1", 2 * GIB),
                    devices: BTreeMap::new(),
                },
            )
            .expect("ok");
        assert_eq!(alloc.used(), request("1", 2 * GIB));
        let err = alloc.allocate("b", &request("1", 0)).expect_err("cpu capacity is used up");
        assert_eq!(err.to_string(), "insufficient cpu: requested 1, available 0 of 1");
        alloc.free("a");
        assert_eq!(alloc.allocate("b", &request("1", GIB)).expect("fits").cpuset, vec![1]);
    }

    #[test]
    fn concurrent_allocations_never_oversubscribe() {
        let alloc = Arc::new(allocator(&[0, 1, 2, 3, 4, 5, 6, 7], 64 * GIB, AllocationStrategy::Evenly));
        let handles: Vec<_> = (0..16)
            .map(|i| {
                let alloc = Arc::clone(&alloc);
                std::thread::spawn(move || alloc.allocate(&format!("k{i}"), &request("1", GIB)).is_ok())
            })
            .collect();
        let granted = handles.into_iter().map(|h| h.join().expect("thread")).filter(|ok| *ok).count();
        assert_eq!(granted, 8);
        assert!(alloc.core_loads().iter().all(|(_, load)| *load == 1));
    }

    fn gpus(alloc: ResourceAllocator, slot: &str, mode: AllocationMode, numa: &[Option<u32>]) -> ResourceAllocator {
        let devices = numa
            .iter()
            .enumerate()
            .map(|(index, numa_node)| DeviceCapacity {
                id: format!("gpu{index}"),
                numa_node: *numa_node,
                capacity: rust_decimal::Decimal::ONE,
            })
            .collect();
        let quantum = rust_decimal::Decimal::new(1, 2);
        alloc.with_devices(vec![DeviceAllocMap::new(slot, mode, AllocationStrategy::Fill, quantum, devices)])
    }

    fn with_slot(mut slots: ResourceSlots, slot: &str, amount: &str) -> ResourceSlots {
        slots.insert(slot, SlotAmount::parse_str(amount, SlotType::Count, slot).expect("amount"));
        slots
    }

    #[test]
    fn devices_are_reserved_with_cores_and_memory() {
        let alloc = gpus(
            allocator(&[0, 1], 4 * GIB, AllocationStrategy::Fill),
            "cuda.device",
            AllocationMode::Discrete,
            &[None, None],
        );
        assert_eq!(alloc.capacity().amount("cuda.device").to_string(), "2");
        let a = alloc.allocate("a", &with_slot(request("1", GIB), "cuda.device", "1")).expect("fits");
        assert_eq!(a.devices["cuda.device"], vec![("gpu0".to_string(), SlotAmount::from_u64(1))]);
        // Cores and memory fit, the devices do not: nothing is taken.
        let before = (alloc.used(), alloc.core_loads(), alloc.device_usage());
        let err = alloc.allocate("b", &with_slot(request("1", GIB), "cuda.device", "2")).expect_err("one device left");
        assert_eq!(err.to_string(), "insufficient cuda.device: requested 2, available 1 of 2");
        assert_eq!((alloc.used(), alloc.core_loads(), alloc.device_usage()), before);
        // The other mode's slot is not offered here.
        let err = alloc.allocate("b", &with_slot(request("1", GIB), "cuda.shares", "0.5")).expect_err("no shares");
        assert_eq!(err.to_string(), "insufficient cuda.shares: requested 0.5, available 0 of 0");
        alloc.free("a");
        assert_eq!(alloc.used().amount("cuda.device"), SlotAmount::ZERO);
        let b = alloc.allocate("b", &with_slot(request("1", GIB), "cuda.device", "2")).expect("both free again");
        assert_eq!(b.devices["cuda.device"].len(), 2);
    }

    #[test]
    fn restored_devices_are_held() {
        let alloc = gpus(
            allocator(&[0, 1], 4 * GIB, AllocationStrategy::Fill),
            "cuda.shares",
            AllocationMode::Fractional,
            &[None],
        );
        let held = Allocation {
            cpuset: vec![0],
            mem_bytes: GIB,
            slots: with_slot(request("1", GIB), "cuda.shares", "0.75"),
            devices: BTreeMap::from([(
                "cuda.shares".to_string(),
                vec![("gpu0".to_string(), SlotAmount::parse_str("0.75", SlotType::Count, "x").expect("amount"))],
            )]),
        };
        alloc.restore("a", held).expect("restores");
        assert_eq!(alloc.used().amount("cuda.shares").to_string(), "0.75");
        let err = alloc.allocate("b", &with_slot(request("1", GIB), "cuda.shares", "0.5")).expect_err("0.25 left");
        assert_eq!(err.to_string(), "insufficient cuda.shares: requested 0.5, available 0.25 of 1");
        alloc.allocate("b", &with_slot(request("1", GIB), "cuda.shares", "0.25")).expect("the rest fits");
    }

    #[test]
    fn devices_near_the_kernels_cores_come_first() {
        let alloc = gpus(
            allocator(&[0, 1], 4 * GIB, AllocationStrategy::Fill),
            "cuda.device",
            AllocationMode::Discrete,
            &[Some(0), Some(1)],
        )
        .with_numa(BTreeMap::from([(0, 0), (1, 1)]));
        // The first kernel gets core 0 (node 0), the second core 1 (node 1) and its device.
        let a = alloc.allocate("a", &request("1", GIB)).expect("fits");
        assert_eq!(a.cpuset, vec![0]);
        let b = alloc.allocate("b", &with_slot(request("1", GIB), "cuda.device", "1")).expect("fits");
        assert_eq!(b.cpuset, vec![1]);
        assert_eq!(b.devices["cuda.device"][0].0, "gpu1");
    }

    #[test]
    fn concurrent_device_requests_never_over_allocate() {
        let mut capacity = NodeCapacity::fixed(vec![0, 1], 64 * GIB);
        capacity.kernels_per_core = 64;
        capacity.cpu = 128;
        let alloc = Arc::new(gpus(
            ResourceAllocator::new(capacity, AllocationStrategy::Fill),
            "cuda.shares",
            AllocationMode::Fractional,
            &[None, None],
        ));
        let handles: Vec<_> = (0..20)
            .map(|i| {
                let alloc = alloc.clone();
                std::thread::spawn(move || {
                    alloc.allocate(&format!("k{i}"), &with_slot(request("1", GIB), "cuda.shares", "0.3")).is_ok()
                })
            })
            .collect();
        let granted = handles.into_iter().map(|h| h.join().expect("thread")).filter(|ok| *ok).count();
        assert_eq!(granted, 6, "two devices hold three 0.3 shares each");
        for (_, id, held, capacity) in alloc.device_usage() {
            assert!(held <= capacity, "{id}: {held} of {capacity}");
        }
    }

    #[test]
    fn strategy_reads_from_config_words() {
        #[derive(Deserialize)]
        struct Holder {
            strategy: AllocationStrategy,
        }
        let parse = |text: &str| serde_json::from_str::<Holder>(text).map(|h| h.strategy);
        assert_eq!(parse(r#"{"strategy":"fill"}"#).expect("fill"), AllocationStrategy::Fill);
        assert_eq!(parse(r#"{"strategy":"evenly"}"#).expect("evenly"), AllocationStrategy::Evenly);
        assert!(parse(r#"{"strategy":"random"}"#).is_err());
    }
}
