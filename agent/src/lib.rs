//! bai-agent: a Backend.AI-compatible node agent that runs kernels through Docker and
//! accounts for each one with eBPF programs attached per cgroup.

pub mod backendai;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod docker;
pub mod etcd;
pub mod events;
pub mod images;
pub mod journal;
pub mod kernel;
pub mod kernel_files;
pub mod logging;
pub mod metrics;
pub mod monitor;
pub mod msgpack_json;
pub mod policy;
pub mod ports;
pub mod resources;
pub mod rpc;
pub mod scratch;
pub mod top;
pub mod usage;
pub mod watcher;
