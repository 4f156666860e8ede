//! RPC self-metrics: calls per method and outcome, and how long they took.

use std::time::Duration;

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::{Registry, Unit},
};

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    result,
    failure,
    cancelled,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CallLabels {
    method: String,
    outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

/// Latency buckets, seconds: from a `ping` (~0.1 ms) to a slow image pull.
const BUCKETS: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 120.0];

/// The label a call gets: its method if the agent has it; anything else a peer sends is
/// `unknown`, so a peer cannot grow the series without bound.
pub fn method_label(method: &str, known: bool) -> &str {
    if known { method } else { "unknown" }
}

#[derive(Debug, Clone)]
pub struct RpcMetrics {
    calls: Family<CallLabels, Counter>,
    latency: Family<MethodLabels, Histogram>,
}

impl Default for RpcMetrics {
    fn default() -> Self {
        RpcMetrics { calls: Family::default(), latency: Family::new_with_constructor(|| Histogram::new(BUCKETS)) }
    }
}

impl RpcMetrics {
    /// Adds the series to `registry` (they share state with `self`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "backendai_agent_rpc_requests",
            "RPC calls handled, by method and outcome (result, failure, cancelled).",
            self.calls.clone(),
        );
        registry.register_with_unit(
            "backendai_agent_rpc_request_duration",
            "Time from a call's arrival to its reply being ready, by method.",
            Unit::Seconds,
            self.latency.clone(),
        );
    }

    /// Records one call; `method` must already be a bounded label (see [`method_label`]).
    pub fn observe(&self, method: &str, outcome: Outcome, elapsed: Duration) {
        self.calls.get_or_create(&CallLabels { method: method.to_owned(), outcome }).inc();
        self.latency.get_or_create(&MethodLabels { method: method.to_owned() }).observe(elapsed.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_counted_and_timed_per_method() {
        let metrics = RpcMetrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        metrics.observe("ping", Outcome::result, Duration::from_micros(150));
        metrics.observe("ping", Outcome::result, Duration::from_micros(150));
        metrics.observe(method_label("no_such", false), Outcome::failure, Duration::from_millis(1));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        assert!(text.contains("backendai_agent_rpc_requests_total{method=\"ping\",outcome=\"result\"} 2"), "{text}");
        assert!(text.contains("backendai_agent_rpc_requests_total{method=\"unknown\",outcome=\"failure\"} 1"));
        assert!(text.contains("backendai_agent_rpc_request_duration_seconds_bucket{le=\"0.00025\",method=\"ping\"} 2"));
        assert!(text.contains("backendai_agent_rpc_request_duration_seconds_count{method=\"ping\"} 2"));
    }
}
