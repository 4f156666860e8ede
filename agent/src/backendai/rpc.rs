//! The replies of the 26.9 manager's typed calls (`rpc_function_v2`: a pydantic request
//! `req`, a pydantic response): `health_v2` → `HealthResp`, `gather_hwinfo_v2` →
//! `GatherHwinfoResp`. The facts come from the RPC handlers; the shapes live here.

use rmpv::Value;

use crate::msgpack_json::map;

/// One of the agent's dependencies as `health_v2` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthCheck<'a> {
    /// `service_group` (`docker`, `monitor`).
    pub group: &'a str,
    /// `component_id` (`docker-engine`, `container-monitor`).
    pub component: &'a str,
    /// Unknown (not wired in this process) counts as healthy.
    pub healthy: Option<bool>,
    /// `error_message` when unhealthy.
    pub problem: &'a str,
}

/// `HealthResp`: `{status, version, component, connectivity: {overall_healthy,
/// connectivity_checks: [{service_group, component_id, is_healthy, last_checked_at,
/// error_message}], timestamp}}`; `now` is an RFC 3339 time.
pub fn health_v2(version: &str, checks: &[HealthCheck<'_>], now: &str) -> Value {
    let healthy = checks.iter().all(|check| check.healthy.unwrap_or(true));
    let checks = checks
        .iter()
        .map(|check| {
            let ok = check.healthy.unwrap_or(true);
            map(vec![
                ("service_group", Value::from(check.group)),
                ("component_id", Value::from(check.component)),
                ("is_healthy", Value::from(ok)),
                ("last_checked_at", Value::from(now)),
                ("error_message", if ok { Value::Nil } else { Value::from(check.problem) }),
            ])
        })
        .collect();
    map(vec![
        ("status", Value::from(if healthy { "ok" } else { "degraded" })),
        ("version", Value::from(version)),
        ("component", Value::from("agent")),
        (
            "connectivity",
            map(vec![
                ("overall_healthy", Value::from(healthy)),
                ("connectivity_checks", Value::Array(checks)),
                ("timestamp", Value::from(now)),
            ]),
        ),
    ])
}

/// `GatherHwinfoResp`: `{devices: [{device_name, status, status_info, metadata}]}` from
/// `gather_hwinfo`'s `{device: {status, status_info, metadata}}`.
pub fn hwinfo_v2(by_device: &Value) -> Value {
    let devices = by_device
        .as_map()
        .map(|entries| {
            entries
                .iter()
                .map(|(name, entry)| {
                    let mut fields = vec![(Value::from("device_name"), name.clone())];
                    fields.extend(entry.as_map().cloned().unwrap_or_default());
                    Value::Map(fields)
                })
                .collect()
        })
        .unwrap_or_default();
    map(vec![("devices", Value::Array(devices))])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unhealthy_check_degrades_the_agent_and_says_why() {
        let checks = [
            HealthCheck { group: "docker", component: "docker-engine", healthy: Some(false), problem: "not connected" },
            HealthCheck { group: "monitor", component: "container-monitor", healthy: None, problem: "not synced" },
        ];
        let reply = health_v2("1.0", &checks, "2026-12-05T00:00:00Z");
        let json = crate::msgpack_json::to_json(&reply);
        assert_eq!(json["status"], "degraded", "{json}");
        assert_eq!(json["connectivity"]["overall_healthy"], false, "{json}");
        let checks = &json["connectivity"]["connectivity_checks"];
        assert_eq!((&checks[0]["is_healthy"], &checks[0]["error_message"]), (&false.into(), &"not connected".into()));
        assert_eq!((&checks[1]["is_healthy"], &checks[1]["error_message"]), (&true.into(), &serde_json::Value::Null));
    }
}
