//! Resource slots (`cpu`, `mem`, accelerator slots), node capacity with reservation and
//! overcommit, the per-kernel allocation map, and the `resource.txt` record of what each
//! kernel holds.
//!
//! - [`slots`]: slot names and types, exact amounts, the `resource_slots` request parser.
//! - [`capacity`]: what the host has (online cores, `MemTotal`) and what kernels may get.
//! - [`alloc`]: [`ResourceAllocator`], pinning whole cores (FILL / EVENLY) and counting bytes.
//! - [`devices`]: accelerator alloc maps (whole devices or shares), held by the allocator.
//! - [`spec`]: [`KernelResourceSpec`] and Backend.AI's `resource.txt` format.
//! - [`compute`]: accelerator plugins (CUDA through NVML) behind one trait.

pub mod alloc;
pub mod capacity;
pub mod compute;
pub mod devices;
pub mod slots;
pub mod spec;

pub use alloc::{Allocation, AllocationError, AllocationStrategy, ResourceAllocator, format_cpuset};
pub use capacity::{CapacityError, CapacityPolicy, HostResources, NodeCapacity};
pub use compute::{AcceleratorSettings, DeviceMapping};
pub use devices::{AllocationMode, DeviceAllocMap, DeviceCapacity, PerDevice};
pub use slots::{ResourceSlots, SlotAmount, SlotError, SlotRegistry, SlotType, format_binary_size, parse_binary_size};
pub use spec::{KernelResourceSpec, MountPermission, MountSpec, RESOURCE_TXT, ResourceFileError};
