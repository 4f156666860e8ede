//! Helpers for tests that run kernels through the RPC: an agent config with its own
//! scratch root and port range, kernel creation configs, and reading results.

use std::{path::Path, process::Command};

use bai_agent::rpc::client::RpcClient;
use rmpv::Value;

use crate::test_redis;

/// Config for a kernel-running agent: its own scratch root and port range, both host
/// cores and all but 512 MiB of memory for kernels, events in the test Redis.
pub fn kernel_toml(dir: &Path, first_port: u16) -> String {
    format!(
        "[container]\nscratch-root = \"{scratch}\"\nmount-root = \"{vfolders}\"\nport-range = [{first_port}, {last}]\n\
         port-cooldown = \"1s\"\nstop-timeout = \"3s\"\n\n[resource]\nreserved-cpu = 0\nreserved-mem = \"512m\"\n\n\
         [redis]\naddr = \"{redis}\"\nevent-format = \"legacy\"\n\n[debug]\nheartbeat-interval = \"60s\"\n",
        scratch = dir.join("scratch").display(),
        vfolders = dir.join("vfolders").display(),
        last = first_port + 39,
        redis = test_redis(),
    )
}

pub fn map(entries: Vec<(&str, Value)>) -> Value {
    Value::Map(entries.into_iter().map(|(k, v)| (Value::from(k), v)).collect())
}

pub fn kernel_config(image: &str, cpu: &str, mem: &str) -> Value {
    map(vec![
        ("image", map(vec![("canonical", image.into()), ("digest", "".into()), ("labels", map(vec![]))])),
        ("resource_slots", map(vec![("cpu", cpu.into()), ("mem", mem.into())])),
        ("resource_opts", map(vec![("shmem", "64m".into())])),
        ("environ", map(vec![("GREETING", "hello".into())])),
        ("owner_user_id", "user-7".into()),
        ("owner_project_id", "project-9".into()),
        ("a_field_this_agent_does_not_use", 1.into()),
    ])
}

pub async fn create(client: &RpcClient, session: &str, kernel: &str, config: Value) -> Result<Value, String> {
    client
        .call(
            "create_kernels",
            vec![
                session.into(),
                Value::Array(vec![kernel.into()]),
                Value::Array(vec![config]),
                map(vec![("mode", "single-node".into()), ("size", 1.into())]),
                map(vec![]),
            ],
            vec![],
        )
        .await
        .map_err(|err| err.to_string())
}

pub async fn list(client: &RpcClient) -> Vec<Value> {
    match client.call("list_kernels", vec![], vec![]).await.expect("list_kernels") {
        Value::Array(items) => items,
        other => panic!("list_kernels returned {other}"),
    }
}

pub fn field<'a>(value: &'a Value, name: &str) -> &'a Value {
    value.as_map().and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some(name))).map(|(_, v)| v).unwrap_or(&Value::Nil)
}

pub fn docker_inspect(container: &str, format: &str) -> String {
    let out = Command::new("docker").args(["inspect", "-f", format, container]).output().expect("docker inspect");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

pub fn container_exists(container: &str) -> bool {
    Command::new("docker").args(["inspect", container]).output().is_ok_and(|out| out.status.success())
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

/// `config` with `key` set to `value` (replacing any earlier value).
pub fn with_field(mut config: Value, key: &str, value: Value) -> Value {
    if let Value::Map(entries) = &mut config {
        entries.retain(|(k, _)| k.as_str() != Some(key));
        entries.push((key.into(), value));
    }
    config
}

/// The id of the one kernel a `create_kernels` result describes.
pub fn created_id(result: &Value, name: &str) -> String {
    let first = result.as_array().and_then(|items| items.first()).unwrap_or(&Value::Nil);
    field(first, name).as_str().unwrap_or_default().to_owned()
}
