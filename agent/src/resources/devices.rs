//! Accelerator allocation maps: how much of each device every kernel holds, handed out as
//! Backend.AI's alloc maps do: whole devices (`cuda.device`, its `DiscretePropertyAllocMap`)
//! or shares in quanta (`cuda.shares`, its `FractionAllocMap`), FILL or EVENLY, devices on
//! the kernel's NUMA nodes first.
//!
//! A [`DeviceAllocMap`] holds no lock of its own: [`ResourceAllocator`](super::ResourceAllocator)
//! keeps its maps under the lock it takes for cores and memory, so one kernel's cores,
//! memory and devices are reserved together or not at all.

use std::collections::{BTreeMap, BTreeSet};

use rust_decimal::Decimal;
use serde::Deserialize;

use super::{AllocationStrategy, SlotAmount};

/// How a plugin's devices are handed out (`allocation-mode`, Backend.AI's `AllocationModes`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AllocationMode {
    /// Whole devices: the `{key}.device` slot, one per device.
    #[default]
    Discrete,
    /// Shares of devices: the `{key}.shares` slot, in quanta.
    Fractional,
}

impl AllocationMode {
    /// The slot this mode hands out for plugin `key` (`cuda.device`, `cuda.shares`).
    pub fn slot_name(self, key: &str) -> String {
        match self {
            AllocationMode::Discrete => format!("{key}.device"),
            AllocationMode::Fractional => format!("{key}.shares"),
        }
    }
}

/// Per-device amounts of one slot, device ids in the order they were picked.
pub type PerDevice = Vec<(String, SlotAmount)>;

/// One device an alloc map hands out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCapacity {
    pub id: String,
    /// The NUMA node it sits on, when the host says.
    pub numa_node: Option<u32>,
    /// What it holds of the slot: 1 for a whole device, its shares when fractional.
    pub capacity: Decimal,
}

/// Why devices were not handed out. Nothing is taken when one is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceAllocError {
    #[error("insufficient {slot}: requested {requested}, available {available} of {capacity}")]
    Insufficient { slot: String, requested: Decimal, available: Decimal, capacity: Decimal },
    #[error("{slot}: requested {requested} is not a whole number of devices")]
    NotWhole { slot: String, requested: Decimal },
    #[error(
        "{slot}: requested {requested} is smaller than the quantum {quantum} once split over the devices that have room"
    )]
    BelowQuantum { slot: String, requested: Decimal, quantum: Decimal },
}

/// One plugin's devices and what kernels hold of each.
#[derive(Debug, Clone)]
pub struct DeviceAllocMap {
    slot: String,
    mode: AllocationMode,
    strategy: AllocationStrategy,
    quantum: Decimal,
    devices: Vec<DeviceCapacity>,
    /// Held per device id; ids of devices this node no longer has appear after a restore.
    used: BTreeMap<String, Decimal>,
}

impl DeviceAllocMap {
    /// `quantum` is the smallest share a device gives (`0.01`); whole devices ignore it.
    pub fn new(
        slot: impl Into<String>,
        mode: AllocationMode,
        strategy: AllocationStrategy,
        quantum: Decimal,
        devices: Vec<DeviceCapacity>,
    ) -> DeviceAllocMap {
        let used = devices.iter().map(|device| (device.id.clone(), Decimal::ZERO)).collect();
        let quantum = if quantum > Decimal::ZERO { quantum } else { Decimal::new(1, 2) };
        DeviceAllocMap { slot: slot.into(), mode, strategy, quantum, devices, used }
    }

    pub fn slot(&self) -> &str {
        &self.slot
    }

    /// The slot's capacity: every device's together.
    pub fn capacity(&self) -> Decimal {
        self.devices.iter().map(|device| device.capacity).sum()
    }

    /// What kernels hold of the slot.
    pub fn used(&self) -> Decimal {
        self.used.values().copied().sum()
    }

    /// `(device id, held, capacity)` for every device, in the node's order, then any device
    /// only a restored kernel names (capacity 0).
    pub fn per_device(&self) -> Vec<(String, Decimal, Decimal)> {
        let mut rows: Vec<(String, Decimal, Decimal)> =
            self.devices.iter().map(|device| (device.id.clone(), self.held(&device.id), device.capacity)).collect();
        for (id, held) in &self.used {
            if !self.devices.iter().any(|device| &device.id == id) {
                rows.push((id.clone(), *held, Decimal::ZERO));
            }
        }
        rows
    }

    fn held(&self, id: &str) -> Decimal {
        self.used.get(id).copied().unwrap_or_default()
    }

    fn free_on(&self, device: &DeviceCapacity) -> Decimal {
        (device.capacity - self.held(&device.id)).max(Decimal::ZERO)
    }

    /// Takes `requested` of the slot, preferring devices on `numa_nodes` (the NUMA nodes of
    /// the kernel's cores; empty: no preference).
    pub fn allocate(&mut self, requested: Decimal, numa_nodes: &BTreeSet<u32>) -> Result<PerDevice, DeviceAllocError> {
        if requested <= Decimal::ZERO {
            return Ok(Vec::new());
        }
        let available: Decimal = self.devices.iter().map(|device| self.free_on(device)).sum();
        if requested > available {
            return Err(DeviceAllocError::Insufficient {
                slot: self.slot.clone(),
                requested,
                available,
                capacity: self.capacity(),
            });
        }
        let order = self.preference_order(numa_nodes);
        let picked = match self.mode {
            AllocationMode::Discrete => self.pick_whole(requested, &order)?,
            AllocationMode::Fractional => self.pick_shares(requested, &order)?,
        };
        for (id, amount) in &picked {
            *self.used.entry(id.clone()).or_default() += *amount;
        }
        Ok(picked.into_iter().filter_map(|(id, amount)| Some((id, SlotAmount::from_decimal(amount)?))).collect())
    }

    /// Devices with room, in the order this map prefers them: those on the kernel's NUMA
    /// nodes first, then the freest device first (the node's order among equals), as
    /// Backend.AI's alloc maps order them for both strategies.
    fn preference_order(&self, numa_nodes: &BTreeSet<u32>) -> Vec<usize> {
        let mut order: Vec<usize> =
            (0..self.devices.len()).filter(|&index| self.free_on(&self.devices[index]) > Decimal::ZERO).collect();
        let remote = |index: &usize| match self.devices[*index].numa_node {
            Some(node) if !numa_nodes.is_empty() => !numa_nodes.contains(&node),
            _ => false,
        };
        order.sort_by(|a, b| {
            remote(a)
                .cmp(&remote(b))
                .then_with(|| self.free_on(&self.devices[*b]).cmp(&self.free_on(&self.devices[*a])))
                .then_with(|| a.cmp(b))
        });
        order
    }

    /// Whole devices: the first `requested` devices with a free unit, one unit each.
    fn pick_whole(&self, requested: Decimal, order: &[usize]) -> Result<Vec<(String, Decimal)>, DeviceAllocError> {
        if !requested.fract().is_zero() {
            return Err(DeviceAllocError::NotWhole { slot: self.slot.clone(), requested });
        }
        let picked = self.fill_in_order(requested, order, |free| free.floor());
        let total: Decimal = picked.iter().map(|(_, amount)| *amount).sum();
        if total < requested {
            return Err(self.insufficient(requested));
        }
        Ok(picked)
    }

    /// Takes from each device in `order` what it can give (`usable` of its free amount) until
    /// `requested` is met or the devices run out.
    fn fill_in_order(
        &self,
        requested: Decimal,
        order: &[usize],
        usable: impl Fn(Decimal) -> Decimal,
    ) -> Vec<(String, Decimal)> {
        let mut remaining = requested;
        let mut picked = Vec::new();
        for &index in order {
            if remaining <= Decimal::ZERO {
                break;
            }
            let device = &self.devices[index];
            let take = usable(self.free_on(device)).min(remaining);
            if take > Decimal::ZERO {
                picked.push((device.id.clone(), take));
                remaining -= take;
            }
        }
        picked
    }

    /// Shares: one device when one can hold it all (FILL the freest, EVENLY the tightest fit,
    /// keeping bigger holes for bigger requests); else spread over the fewest devices, FILL
    /// filling the freest first, EVENLY in equal parts (a device that cannot hold its part
    /// gives what it has and the rest is split again), every part rounded down to the quantum.
    fn pick_shares(&self, requested: Decimal, order: &[usize]) -> Result<Vec<(String, Decimal)>, DeviceAllocError> {
        let requested = self.round_down(requested);
        if requested <= Decimal::ZERO {
            return Err(DeviceAllocError::BelowQuantum { slot: self.slot.clone(), requested, quantum: self.quantum });
        }
        let fits: Vec<usize> =
            order.iter().copied().filter(|index| self.free_on(&self.devices[*index]) >= requested).collect();
        let single = match self.strategy {
            AllocationStrategy::Fill => fits.first().copied(),
            AllocationStrategy::Evenly => fits.iter().copied().min_by(|a, b| {
                self.free_on(&self.devices[*a]).cmp(&self.free_on(&self.devices[*b])).then_with(|| {
                    let rank = |i: &usize| order.iter().position(|o| o == i);
                    rank(a).cmp(&rank(b))
                })
            }),
        };
        if let Some(index) = single {
            return Ok(vec![(self.devices[index].id.clone(), requested)]);
        }
        let picked = match self.strategy {
            AllocationStrategy::Fill => self.fill_in_order(requested, order, |free| self.round_down(free)),
            AllocationStrategy::Evenly => self.spread_shares(requested, order),
        };
        let total: Decimal = picked.iter().map(|(_, amount)| *amount).sum();
        if total < requested {
            return Err(self.insufficient(requested));
        }
        Ok(picked)
    }

    /// Equal parts over the fewest of the freest devices that can hold `requested` together.
    fn spread_shares(&self, requested: Decimal, order: &[usize]) -> Vec<(String, Decimal)> {
        let mut freest: Vec<usize> = order.to_vec();
        freest.sort_by(|a, b| self.free_on(&self.devices[*b]).cmp(&self.free_on(&self.devices[*a])));
        let mut count = 0;
        let mut room = Decimal::ZERO;
        for index in &freest {
            count += 1;
            room += self.round_down(self.free_on(&self.devices[*index]));
            if room >= requested {
                break;
            }
        }
        // Keep the preference order among the chosen devices, for the remainder's quanta.
        let chosen: BTreeSet<usize> = freest.into_iter().take(count).collect();
        let mut pending: Vec<usize> = order.iter().copied().filter(|index| chosen.contains(index)).collect();
        let mut remaining = requested;
        let mut picked: Vec<(String, Decimal)> = Vec::new();
        // A device that cannot hold an equal part gives all it has.
        while let Some(position) = (0..pending.len()).min_by_key(|&i| self.free_on(&self.devices[pending[i]])) {
            let device = &self.devices[pending[position]];
            let free = self.round_down(self.free_on(device));
            if free * Decimal::from(pending.len()) >= remaining {
                break;
            }
            picked.push((device.id.clone(), free));
            remaining -= free;
            pending.remove(position);
        }
        if pending.is_empty() {
            return picked;
        }
        let parts = Decimal::from(pending.len());
        let part = self.round_down(remaining / parts);
        let mut leftover = remaining - part * parts;
        for index in pending {
            let device = &self.devices[index];
            let mut take = part;
            if leftover > Decimal::ZERO && self.free_on(device) >= part + self.quantum {
                take += self.quantum;
                leftover -= self.quantum;
            }
            picked.push((device.id.clone(), take));
        }
        picked.retain(|(_, amount)| *amount > Decimal::ZERO);
        picked
    }

    fn round_down(&self, amount: Decimal) -> Decimal {
        ((amount / self.quantum).floor() * self.quantum).normalize()
    }

    fn insufficient(&self, requested: Decimal) -> DeviceAllocError {
        DeviceAllocError::Insufficient {
            slot: self.slot.clone(),
            requested,
            available: self.devices.iter().map(|device| self.free_on(device)).sum(),
            capacity: self.capacity(),
        }
    }

    /// Records what a running kernel holds (restored after an agent restart), even past a
    /// device's capacity or on a device this node no longer lists: the kernel has it.
    pub fn apply(&mut self, per_device: &[(String, SlotAmount)]) {
        for (id, amount) in per_device {
            let held = self.used.entry(id.clone()).or_default();
            *held += amount.as_decimal();
            let capacity = self.devices.iter().find(|device| &device.id == id).map(|device| device.capacity);
            if capacity.is_none_or(|capacity| *held > capacity) {
                tracing::warn!(slot = %self.slot, device = %id, held = %held, "restored kernels hold more of a device than it has");
            }
        }
    }

    /// Gives back what a kernel held.
    pub fn free(&mut self, per_device: &[(String, SlotAmount)]) {
        for (id, amount) in per_device {
            if let Some(held) = self.used.get_mut(id) {
                *held = (*held - amount.as_decimal()).max(Decimal::ZERO);
            }
        }
        // Devices only a restored kernel named go once nothing holds them.
        let listed: BTreeSet<&str> = self.devices.iter().map(|device| device.id.as_str()).collect();
        self.used.retain(|id, held| listed.contains(id.as_str()) || !held.is_zero());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(text: &str) -> Decimal {
        text.parse().expect("decimal")
    }

    fn devices(capacities: &[(&str, Option<u32>, &str)]) -> Vec<DeviceCapacity> {
        capacities
            .iter()
            .map(|(id, numa_node, capacity)| DeviceCapacity {
                id: (*id).to_owned(),
                numa_node: *numa_node,
                capacity: dec(capacity),
            })
            .collect()
    }

    fn whole(strategy: AllocationStrategy, n: usize) -> DeviceAllocMap {
        let ids: Vec<String> = (0..n).map(|i| i.to_string()).collect();
        let list: Vec<(&str, Option<u32>, &str)> = ids.iter().map(|id| (id.as_str(), None, "1")).collect();
        DeviceAllocMap::new("cuda.device", AllocationMode::Discrete, strategy, dec("0.01"), devices(&list))
    }

    fn shares(strategy: AllocationStrategy, list: &[(&str, Option<u32>, &str)]) -> DeviceAllocMap {
        DeviceAllocMap::new("cuda.shares", AllocationMode::Fractional, strategy, dec("0.01"), devices(list))
    }

    fn shown(picked: &PerDevice) -> Vec<(String, String)> {
        picked.iter().map(|(id, amount)| (id.clone(), amount.to_string())).collect()
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(id, amount)| ((*id).to_owned(), (*amount).to_owned())).collect()
    }

    const ANY: &BTreeSet<u32> = &BTreeSet::new();

    #[test]
    fn whole_devices_are_handed_out_once() {
        let mut map = whole(AllocationStrategy::Fill, 3);
        assert_eq!(shown(&map.allocate(dec("2"), ANY).expect("fits")), pairs(&[("0", "1"), ("1", "1")]));
        let err = map.allocate(dec("2"), ANY).expect_err("one left");
        assert_eq!(err.to_string(), "insufficient cuda.device: requested 2, available 1 of 3");
        assert_eq!(shown(&map.allocate(dec("1"), ANY).expect("fits")), pairs(&[("2", "1")]));
        map.free(&[("0".into(), SlotAmount::from_u64(1))]);
        assert_eq!(shown(&map.allocate(dec("1"), ANY).expect("fits")), pairs(&[("0", "1")]));
        let err = map.allocate(dec("0.5"), ANY).expect_err("no device is free");
        assert!(matches!(err, DeviceAllocError::Insufficient { .. }), "{err}");
    }

    #[test]
    fn a_fraction_of_a_whole_device_is_refused() {
        let mut map = whole(AllocationStrategy::Fill, 2);
        let err = map.allocate(dec("1.5"), ANY).expect_err("not whole");
        assert_eq!(err.to_string(), "cuda.device: requested 1.5 is not a whole number of devices");
        assert_eq!(map.used(), Decimal::ZERO);
    }

    #[test]
    fn whole_devices_prefer_the_kernels_numa_node() {
        let list = [("0", Some(0), "1"), ("1", Some(0), "1"), ("2", Some(1), "1"), ("3", Some(1), "1")];
        let mut map = DeviceAllocMap::new(
            "cuda.device",
            AllocationMode::Discrete,
            AllocationStrategy::Fill,
            dec("0.01"),
            devices(&list),
        );
        let node1 = BTreeSet::from([1]);
        assert_eq!(shown(&map.allocate(dec("1"), &node1).expect("fits")), pairs(&[("2", "1")]));
        assert_eq!(shown(&map.allocate(dec("2"), &node1).expect("fits")), pairs(&[("3", "1"), ("0", "1")]));
    }

    #[test]
    fn shares_fill_the_freest_device_first() {
        // Backend.AI's FractionAllocMap FILL: devices by free amount, most first, each given
        // what it has until the request is met.
        let mut map = shares(AllocationStrategy::Fill, &[("a", None, "1"), ("b", None, "1")]);
        assert_eq!(shown(&map.allocate(dec("0.5"), ANY).expect("fits")), pairs(&[("a", "0.5")]));
        assert_eq!(shown(&map.allocate(dec("0.3"), ANY).expect("fits")), pairs(&[("b", "0.3")]));
        assert_eq!(shown(&map.allocate(dec("0.5"), ANY).expect("fits")), pairs(&[("b", "0.5")]));
        // 0.5 on a and 0.2 on b are left: 0.6 takes a's all first.
        assert_eq!(shown(&map.allocate(dec("0.6"), ANY).expect("fits")), pairs(&[("a", "0.5"), ("b", "0.1")]));
        let err = map.allocate(dec("0.2"), ANY).expect_err("0.1 left");
        assert_eq!(err.to_string(), "insufficient cuda.shares: requested 0.2, available 0.1 of 2");
    }

    #[test]
    fn shares_evenly_take_the_tightest_fit_then_spread() {
        let mut map = shares(AllocationStrategy::Evenly, &[("a", None, "1"), ("b", None, "1"), ("c", None, "1")]);
        map.allocate(dec("0.7"), ANY).expect("fits");
        // a has 0.3 left: the tightest device for 0.25.
        assert_eq!(shown(&map.allocate(dec("0.25"), ANY).expect("fits")), pairs(&[("a", "0.25")]));
        // 1.5 fits no device: equal parts on the two freest.
        assert_eq!(shown(&map.allocate(dec("1.5"), ANY).expect("fits")), pairs(&[("b", "0.75"), ("c", "0.75")]));
        assert_eq!(map.used(), dec("2.45"));
    }

    #[test]
    fn uneven_spreads_give_the_short_device_all_it_has() {
        let mut map = shares(AllocationStrategy::Evenly, &[("a", None, "1"), ("b", None, "1")]);
        map.allocate(dec("0.8"), ANY).expect("fits");
        // a has 0.2, b 1: 1.1 needs both, a cannot hold half.
        let picked = map.allocate(dec("1.1"), ANY).expect("fits");
        assert_eq!(shown(&picked), pairs(&[("a", "0.2"), ("b", "0.9")]));
        // A remainder of one quantum goes to one device.
        let mut map = shares(AllocationStrategy::Evenly, &[("a", None, "1"), ("b", None, "1")]);
        let picked = map.allocate(dec("1.01"), ANY).expect("fits");
        assert_eq!(shown(&picked), pairs(&[("a", "0.51"), ("b", "0.5")]));
    }

    #[test]
    fn shares_are_rounded_down_to_the_quantum() {
        let mut map = DeviceAllocMap::new(
            "cuda.shares",
            AllocationMode::Fractional,
            AllocationStrategy::Fill,
            dec("0.1"),
            devices(&[("a", None, "1")]),
        );
        assert_eq!(shown(&map.allocate(dec("0.55"), ANY).expect("fits")), pairs(&[("a", "0.5")]));
        let err = map.allocate(dec("0.05"), ANY).expect_err("below the quantum");
        assert!(err.to_string().contains("smaller than the quantum 0.1"), "{err}");
    }

    #[test]
    fn restore_accounts_even_unknown_devices_and_free_forgets_them() {
        let mut map = whole(AllocationStrategy::Fill, 2);
        map.apply(&[("0".into(), SlotAmount::from_u64(1)), ("gone".into(), SlotAmount::from_u64(1))]);
        assert_eq!(map.used(), dec("2"));
        assert_eq!(map.per_device().len(), 3);
        assert_eq!(shown(&map.allocate(dec("1"), ANY).expect("fits")), pairs(&[("1", "1")]));
        map.free(&[("gone".into(), SlotAmount::from_u64(1))]);
        assert_eq!(map.per_device().len(), 2);
    }

    #[test]
    fn never_over_allocates_under_any_sequence() {
        // A small deterministic sweep: every request size in quanta against a map that
        // frees every third allocation; the held amount never passes a device's capacity.
        for strategy in [AllocationStrategy::Fill, AllocationStrategy::Evenly] {
            let mut map = shares(strategy, &[("a", None, "1"), ("b", None, "0.5"), ("c", None, "2")]);
            let mut held: Vec<PerDevice> = Vec::new();
            for step in 1..200u32 {
                let request = Decimal::new(i64::from(step * 37 % 250 + 1), 2);
                if let Ok(picked) = map.allocate(request, ANY) {
                    let total: Decimal = picked.iter().map(|(_, amount)| amount.as_decimal()).sum();
                    assert_eq!(total, request, "{strategy:?}: allocated exactly what was asked");
                    held.push(picked);
                }
                if step % 3 == 0 && !held.is_empty() {
                    let freed = held.remove(0);
                    map.free(&freed);
                }
                for (id, used, capacity) in map.per_device() {
                    assert!(used <= capacity, "{strategy:?}: {id} holds {used} of {capacity}");
                }
            }
        }
    }
}
