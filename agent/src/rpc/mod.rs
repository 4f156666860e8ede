//! The manager-facing RPC: callosum-compatible messages over a ZeroMQ ROUTER on
//! `agent.rpc-listen-addr`, the method table, and the matching client.
//!
//! - [`codec`]: the wire format (msgpack header and envelope, snappy, failure metadata);
//! - [`server`]: the ROUTER socket, keepalive, per-order-key scheduling, shutdown;
//! - [`methods`]: Backend.AI's methods (`ping`, `health`, `gather_hwinfo`, …) and argument binding;
//! - [`kernel_methods`], [`exec_methods`]: the kernel lifecycle and code-execution methods;
//! - [`client`]: the DEALER side, for `bai-agentctl` and tests.

pub mod client;
pub mod codec;
pub mod exec_methods;
pub mod kernel_methods;
pub mod methods;
pub mod server;

pub use client::{CallOptions, RpcClient, RpcClientError};
pub use codec::RpcError;
pub use methods::{Args, MethodError, Methods};
pub use server::RpcServer;
