//! Kernel and slot self-metrics: kernels by lifecycle state, and the node's slot capacity
//! against what kernels hold, read from the kernel manager at scrape time.

use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, gauge::ConstGauge},
};

use crate::kernel::KernelManager;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SlotLabels {
    slot: String,
}

pub struct KernelCollector(pub Arc<KernelManager>);

impl std::fmt::Debug for KernelCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelCollector")
    }
}

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut kernels = encoder.encode_descriptor(
            "backendai_agent_kernels",
            "Kernels by lifecycle state.",
            None,
            MetricType::Gauge,
        )?;
        for (state, count) in self.0.state_counts() {
            let count = i64::try_from(count).unwrap_or(i64::MAX);
            ConstGauge::new(count).encode(kernels.encode_family(&StateLabels { state: state.as_str() })?)?;
        }
        let capacity = self.0.allocator.capacity();
        let used = self.0.allocator.used();
        for (name, help, slots) in [
            (
                "backendai_agent_slots_capacity",
                "What this node offers kernels, per slot (cores, bytes, devices).",
                &capacity,
            ),
            ("backendai_agent_slots_used", "What running kernels hold, per slot.", &used),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (slot, _) in capacity.iter() {
                let amount = slots.amount(slot).to_string().parse::<f64>().unwrap_or(0.0);
                ConstGauge::new(amount).encode(family.encode_family(&SlotLabels { slot: slot.to_owned() })?)?;
            }
        }
        Ok(())
    }
}
