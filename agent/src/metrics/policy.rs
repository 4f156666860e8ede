//! Enforcement self-metrics: every verdict of the network policy per kernel, rule, verdict and
//! hook, the kernels under a policy, their egress caps, lost denial reports, and the policy
//! programs' cost.

use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Unit,
};

use crate::policy::Enforcer;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct VerdictLabels {
    kernel_id: String,
    rule: String,
    verdict: &'static str,
    hook: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct GuardLabels {
    guardrail: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KernelLabels {
    kernel_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ProgramLabels {
    program: &'static str,
}

pub struct PolicyCollector(pub Arc<Enforcer>);

impl std::fmt::Debug for PolicyCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PolicyCollector")
    }
}

impl Collector for PolicyCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let enforcer = &self.0;
        let mut verdicts = encoder.encode_descriptor(
            "backendai_agent_policy_verdicts",
            "Policy verdicts per kernel, rule (a [policy] rule's name, a kernel rule's, `metadata`, `not-allowed`, `device-not-given` or a guardrail's), verdict (allowed, denied, redirected, monitored) and hook (connect, sendmsg, egress, device, lsm). Allowed destinations no rule names, and allowed devices, are not counted.",
            None,
            MetricType::Counter,
        )?;
        for count in enforcer.verdicts() {
            let labels = VerdictLabels {
                kernel_id: count.kernel_id,
                rule: count.rule,
                verdict: count.verdict,
                hook: count.hook,
            };
            ConstCounter::new(count.count).encode(verdicts.encode_family(&labels)?)?;
        }
        let mut active = encoder.encode_descriptor(
            "backendai_agent_policy_guardrails_active",
            "1 for each guardrail that runs on this host; 0 where the host cannot run it (no BPF LSM: see the agent's log).",
            None,
            MetricType::Gauge,
        )?;
        let guards = enforcer.guards_active();
        for guard in &guards {
            let labels = GuardLabels { guardrail: guard.name };
            ConstGauge::new(i64::from(guard.active)).encode(active.encode_family(&labels)?)?;
        }
        let mut observed = encoder.encode_descriptor(
            "backendai_agent_policy_guardrails_observed",
            "1 for each guardrail that cannot run on this host but whose calls syscall tracepoints count and report \
             (outcome denied where the container runtime refused the call); the agent stops none of them.",
            None,
            MetricType::Gauge,
        )?;
        for guard in &guards {
            let labels = GuardLabels { guardrail: guard.name };
            ConstGauge::new(i64::from(guard.observed)).encode(observed.encode_family(&labels)?)?;
        }
        ConstGauge::new(i64::try_from(enforcer.kernel_count()).unwrap_or(i64::MAX)).encode(
            encoder.encode_descriptor(
                "backendai_agent_policy_kernels",
                "Kernels with their policy written (their cgroup made before their container started).",
                None,
                MetricType::Gauge,
            )?,
        )?;
        let mut caps = encoder.encode_descriptor(
            "backendai_agent_policy_egress_cap_bits_per_second",
            "The egress cap each capped kernel is held to (the node's default or its own, whichever is narrower).",
            None,
            MetricType::Gauge,
        )?;
        for (kernel_id, bits) in enforcer.egress_caps() {
            ConstGauge::new(i64::try_from(bits).unwrap_or(i64::MAX))
                .encode(caps.encode_family(&KernelLabels { kernel_id })?)?;
        }
        ConstCounter::new(enforcer.lost_reports()).encode(encoder.encode_descriptor(
            "backendai_agent_policy_denial_reports_lost",
            "Denial reports the programs could not hand to the agent (ring buffer full); the verdicts and their counts are never lost.",
            None,
            MetricType::Counter,
        )?)?;
        let stats = enforcer.program_stats();
        let mut run_time = encoder.encode_descriptor(
            "backendai_agent_policy_program_run_time",
            "Time the kernel spent running each policy program (advances while kernel.bpf_stats_enabled=1).",
            Some(&Unit::Seconds),
            MetricType::Counter,
        )?;
        for program in &stats {
            let labels = ProgramLabels { program: program.name };
            ConstCounter::new(program.run_time_ns as f64 / 1e9).encode(run_time.encode_family(&labels)?)?;
        }
        let mut runs = encoder.encode_descriptor(
            "backendai_agent_policy_program_runs",
            "Times the kernel ran each policy program (advances while kernel.bpf_stats_enabled=1).",
            None,
            MetricType::Counter,
        )?;
        for program in &stats {
            let labels = ProgramLabels { program: program.name };
            ConstCounter::new(program.run_count).encode(runs.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
