//! What Backend.AI's manager speaks, by version: the module a person changes when Backend.AI
//! changes. The handlers (RPC methods, events, the kernel's creation config) work in one
//! internal form; the translations to and from each manager's wire live here.
//!
//! | what | 26.9 (the default) | ≤ 25.x | where |
//! |---|---|---|---|
//! | event stream entries | `payload`: the event model's fields as JSON | `args`: a msgpack tuple | [`events`] |
//! | broadcast copies | kernel lifecycle and session results also on `events_all`; `bgtask_*` only there, cached | none | [`events`] |
//! | lifecycle reasons | 26.9's `KernelLifecycleEventReason` (an OOM kill is `self-terminated`) | `oom-killed` too | [`events`] |
//! | the heartbeat's `agent_info` | `AgentInfo` (slots as entries) | a map | [`events`] |
//! | extension types in requests | pickled enums, `ImageRef`, `ResourceSlot`, … decoded without executing anything | the same | [`pickle`] |
//! | typed calls | `health_v2`, `gather_hwinfo_v2` replies | absent | [`rpc`] |
//! | `agent_id=` on every call (≥ 25.19) | claimed, another agent's refused | absent | `rpc::methods::Args::claim_agent_id` |
//! | a Python agent's `agent.toml` | keys translated, unused ones reported | | `config::python` |
//!
//! `redis.event-format` picks the event wire; requests are understood in every form at once.

pub mod events;
pub mod pickle;
pub mod rpc;
